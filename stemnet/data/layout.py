"""The label layout: field names, sublattices, displacement channels, the 8 symmetries.

The single owner of these conventions; simulation labels, the input pipeline,
evaluation and reconstruction import them from here.

Arrays are indexed ``[y, x]`` (rows follow y). A symmetry of the square is
``element = (transpose, flip_y, flip_x)``: swap x and y, then mirror y, then mirror x;
:data:`ELEMENTS` lists the eight in the order ``e = 4·transpose + 2·flip_y + flip_x``.
Displacement vectors transform with it: transpose swaps (dx, dy), a flip of y negates
dy, a flip of x negates dx, dz never changes; so ``np.rot90`` (transpose, then flip y)
maps (dx, dy) → (dy, −dx). Tilt angles (about x, y, z) are axial vectors
(:func:`tilt_vectors`). Masks and the potential transform as scalars.
"""

from __future__ import annotations

import math
from typing import Dict, Optional, Sequence, Tuple

import numpy as np

from stemnet.errors import UserError
from stemnet.shards import header_fields, simulation_section

# ------------------------------------------------------------------------------ fields
TARGETS = ("potential", "displacement", "tilt")  # what a model can be trained to predict
SUBLATTICES = ("A", "B", "O")  # perovskite ABO3 column sublattices, in channel order
COMPONENTS = ("dx", "dy", "dz")  # displacement components (Å)
DISPLACEMENT_CHANNELS = tuple(f"{s}_{c}" for s in SUBLATTICES for c in COMPONENTS)
TILT_CHANNELS = ("tilt_x_deg", "tilt_y_deg", "tilt_z_deg")  # octahedral tilt about x, y, z (deg)
# Label fields on the real-space map grid and how each transforms under a symmetry:
# "scalar" (moved as a map), "vector" (moved, and its (dx, dy) components turned).
# "axial": the per-cell octahedral tilt angles (deg) about x, y, z, a pseudovector (a mirror
# turns it and flips its sign, :func:`tilt_vectors`). A new label field is added here with
# its channel names and transform, and, if predictable, to TARGETS.
LABEL_FIELDS: Dict[str, str] = {"potential": "scalar", "displacement": "vector", "columns": "scalar",
                                "tilt": "axial"}
LABEL_CHANNELS: Dict[str, Tuple[str, ...]] = {
    "potential": ("potential",),
    "displacement": DISPLACEMENT_CHANNELS,
    "columns": SUBLATTICES,
    "tilt": TILT_CHANNELS,
}
TARGET_FIELDS = tuple(LABEL_FIELDS)
INPUT_FIELDS = ("cbed", "stem")


def displacement_channel(sublattice: str, component: str) -> int:
    """Index of ``(sublattice, component)`` in the 9 displacement channels (``"O", "dx"`` → 6)."""
    return SUBLATTICES.index(sublattice) * len(COMPONENTS) + COMPONENTS.index(component)


def column_channel(sublattice: str) -> int:
    """Index of a sublattice's mask in ``columns`` (``"B"`` → 1)."""
    return SUBLATTICES.index(sublattice)


DX = np.array([displacement_channel(s, "dx") for s in SUBLATTICES])  # [0, 3, 6]
DY = np.array([displacement_channel(s, "dy") for s in SUBLATTICES])  # [1, 4, 7]
SWAP_XY = np.arange(len(DISPLACEMENT_CHANNELS))  # displacement channels under a transpose
SWAP_XY[DX], SWAP_XY[DY] = DY, DX

# ------------------------------------------------------------------------------ symmetries
Element = Tuple[int, int, int]
ELEMENTS: Tuple[Element, ...] = tuple(((e >> 2) & 1, (e >> 1) & 1, e & 1) for e in range(8))
IDENTITY: Element = (0, 0, 0)


def element_index(element: Sequence[int]) -> int:
    """``4·transpose + 2·flip_y + flip_x``: the position of ``element`` in :data:`ELEMENTS`."""
    t, fy, fx = (int(bool(e)) for e in element)
    return 4 * t + 2 * fy + fx


def d4_inverse(element: Sequence[int]) -> Element:
    """The inverse symmetry, in closed form.

    Flips are their own inverses and commute, so without a transpose the element is its
    own inverse. With one, ``g = Fx^a·Fy^b·T`` and ``g⁻¹ = T·Fy^b·Fx^a = Fx^b·Fy^a·T``
    (a flip of y before the transpose is a flip of x after it): the flips swap.

    >>> d4_inverse((1, 1, 0))  # rot90 -> rot270
    (1, 0, 1)
    """
    t, fy, fx = (int(bool(e)) for e in element)
    return (1, fx, fy) if t else (0, fy, fx)


def _flip(a: np.ndarray, axis: int, origin: float) -> np.ndarray:
    """Mirror a grid sampled at ``(i + origin)·d`` about the centre of its field of view."""
    flipped = np.flip(a, axis)
    return flipped if origin else np.roll(flipped, 1, axis)


def d4_array(a: np.ndarray, element: Sequence[int], axes: Tuple[int, int] = (-2, -1),
             origin: float = 0.5) -> np.ndarray:
    """Apply a symmetry of the square to the (y, x) axes of ``a`` (a view when possible).

    ``element = (transpose, flip_y, flip_x)``: swap y and x, then mirror y, then mirror
    x. ``origin`` is the sampling offset of the grid in pixels (0.5 = pixel centres,
    0 = the first sample on the field-of-view edge).
    """
    t, fy, fx = (bool(e) for e in element)
    ay, ax = axes
    if t:
        a = np.swapaxes(a, ay, ax)
    if fy:
        a = _flip(a, ay, origin)
    if fx:
        a = _flip(a, ax, origin)
    return a


def d4_signs(element: Sequence[int]) -> np.ndarray:
    """``(9,)`` float32 signs of the displacement channels under ``element`` (after
    :data:`SWAP_XY` when it transposes)."""
    _, fy, fx = (bool(e) for e in element)
    sign = np.ones(len(DISPLACEMENT_CHANNELS), np.float32)
    if fy:
        sign[DY] = -1
    if fx:
        sign[DX] = -1
    return sign


def d4_vectors(d: np.ndarray, element: Sequence[int], channel_axis: int = -1) -> np.ndarray:
    """Transform the 9 displacement channels (A, B, O × dx, dy, dz) as vectors.

    Only the components: combine with :func:`d4_array` for the positions.
    """
    d = np.moveaxis(np.asarray(d), channel_axis, -1)
    if element[0]:
        d = d[..., SWAP_XY]
    return np.moveaxis(d * d4_signs(element).astype(d.dtype), -1, channel_axis)


def tilt_vectors(t: np.ndarray, element) -> np.ndarray:
    """Transform tilt angles (about x, y, z; last axis) as an axial vector: a mirror ``R``
    maps ``t`` to ``det(R)·R·t`` (transpose, then mirror y, then mirror x)."""
    tr, fy, fx = (bool(e) for e in element)
    t = np.asarray(t)
    if tr:
        t = -t[..., [1, 0, 2]]
    if fy:
        t = t * np.array([-1.0, 1.0, -1.0], t.dtype)
    if fx:
        t = t * np.array([1.0, -1.0, -1.0], t.dtype)
    return t


def tilt_target(t: np.ndarray) -> np.ndarray:
    """The tilt head's target from tilt labels (deg, about x, y, z): the magnitude per axis.

    A projection along the beam cannot show the sense of a tilt about an in-plane axis
    (mirroring the crystal through a plane normal to the beam flips it and leaves the
    projection alone), nor which sense an anti-phase tilt has at the entrance surface; it
    shows the angle. The labels keep the signed angles; the head predicts ``|angle|``,
    which a symmetry only permutes: ``|tilt_vectors(t, g)| == |t|[..., tilt_table(g)[0]]``.
    """
    return np.abs(t)


def tilt_table(element) -> Tuple[np.ndarray, np.ndarray]:
    """``(source channel, sign)`` of each of the 3 tilt channels under ``element``:
    ``tilt_vectors(t, element)[j] == sign[j] * t[source[j]]`` (read off
    :func:`tilt_vectors` applied to the basis vectors, so the two cannot disagree)."""
    basis = tilt_vectors(np.eye(len(TILT_CHANNELS)), element)  # row i: the image of e_i
    source = np.argmax(np.abs(basis), axis=0)
    sign = basis[source, np.arange(len(TILT_CHANNELS))]
    return source.astype(np.int64), sign.astype(np.float32)


# ------------------------------------------------------------------------------ a dataset's fields
def input_field(manifest: dict) -> str:
    """The measurement field of a dataset: ``cbed`` or ``stem`` (or whatever is not a label).

    The simulation section's ``mode`` wins when present; otherwise the single field that
    is not a label field.
    """
    names = [f["name"] for f in manifest["fields"]]
    mode = simulation_section(manifest).mode
    if mode in names:
        return mode
    rest = [n for n in names if n not in TARGET_FIELDS]
    if len(rest) != 1:
        raise UserError(
            f"manifest fields {names}: expected exactly one input field besides "
            f"{list(TARGET_FIELDS)}, found {rest}"
        )
    return rest[0]


def is_cbed(manifest: dict, name: Optional[str] = None) -> bool:
    """Whether the input field is a CBED stack: by name (``cbed``/``stem``), else by the
    simulation mode, else by shape (patterns are not on the label grid)."""
    name = input_field(manifest) if name is None else name
    if name in INPUT_FIELDS:
        return name == "cbed"
    mode = simulation_section(manifest).mode
    if mode:
        return mode == "cbed"
    fields = header_fields(manifest)
    labels = [fields[n].shape[1:] for n in TARGET_FIELDS if n in fields]
    return bool(labels) and tuple(fields[name].shape[1:]) != tuple(labels[0])


def probe_grid(manifest: dict, grid: Optional[Sequence[int]] = None) -> Optional[Tuple[int, int]]:
    """``(gx, gy)`` of a CBED dataset: ``grid`` if given, else the simulation config, else
    the square root of the number of patterns (None if that is not a square)."""
    name = input_field(manifest)
    patterns = int(header_fields(manifest)[name].shape[0])
    if grid is None:
        sim = simulation_section(manifest)
        grid = sim.cbed.grid if (sim.mode or name) == "cbed" else None
    if grid is None:
        root = math.isqrt(patterns)
        return (root, root) if root * root == patterns else None
    gx, gy = (int(g) for g in grid)
    if gx * gy != patterns:
        raise UserError(
            f"probe grid {gx}x{gy}: {gx * gy} positions, but field {name!r} holds {patterns} patterns"
        )
    return gx, gy


def map_shape(manifest: dict) -> Tuple[int, int]:
    """``(H, W)`` of the label maps (of the input when the dataset has no labels)."""
    fields = header_fields(manifest)
    labels = [n for n in TARGET_FIELDS if n in fields]
    return tuple(fields[labels[0] if labels else input_field(manifest)].shape[1:])
