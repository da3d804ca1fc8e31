"""ABO3 perovskite specimens with octahedral tilts (Glazer notation) and polar displacements.

Geometry conventions
--------------------
* Crystal (pseudo-cubic) frame: A at ``(i, j, k)·a``, B at ``(i+½, j+½, k+½)·a`` and, for
  each cell, the three X (O) sites on the +x, +y, +z bonds of its B:
  ``B + (a/2)·e_b``. Each X is therefore owned by exactly one cell and shared by the two
  B sites of its bond.
* Lab frame: the beam is along +z. Zone ``"001"`` is the crystal frame itself; zone
  ``"110"`` has lab x = [-110]/√2, y = [001], z = [110]/√2 (orthogonal cell
  ``a√2 × a × a√2`` holding two formula-unit cells).
* Tilts: B cations stay on their sites (ideal + polar). For a tilt of angle θ about axis
  ``n``, the X on a bond along ``b ≠ n`` moves along ``n × e_b`` by ``s·(a_b/2)·tan θ``, so
  the B–X–B bond, seen along ``n``, is buckled by exactly θ (B–X–B angle 180° − 2θ).
  The sign ``s = ±1`` belongs to the octahedron of the bond's lower B (cell ``(i, j, k)``):
  ``(-1)^(sum of indices ⟂ n)`` for ``+`` (in-phase) and ``(-1)^(i+j+k)`` for ``-``
  (anti-phase). Contributions of the tilt axes add (each moves the X along a different
  direction), so every octahedron is centrosymmetric and each shared X has one position.
* Rigid octahedra (as SPuDS): the B–X bond keeps the length ``a/2`` of the untilted
  cubic cell, so the pseudo-cubic cell contracts along each crystal axis ``b`` to
  ``a_b = a / sqrt(1 + Σ_{n≠b} tan²θ_n)`` (B–B = ``a_b``; a B–X bond along ``b`` is then
  exactly ``(a_b/2)·sqrt(1 + Σ tan²θ_n) = a/2``; the O–B–O angles deviate from 90° only
  to second order, by ``tan θ_m tan θ_n``). Zone ``"110"`` needs equal ``a_x`` and ``a_y``
  for an orthogonal cell and uses their mean (bonds then within ``|a_x − a_y| / 2a``).
* Sign convention: a positive angle about ``+n`` rotates the octahedron of cell (0, 0, 0)
  counter-clockwise seen from the tip of ``+n`` (right-handed): about z, its +x bond
  turns towards +y (seen from +z). Every octahedron's signed angles are kept in
  ``Specimen.octahedron_tilt_deg``.
* Polar displacements (Å) are given in the crystal frame and shift every A (or B) by the
  same vector; X sites carry only the tilt displacements.

All lengths are in Å, all angles in degrees.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
from ase import Atoms
from ase.data import atomic_numbers

from stemnet.errors import UserError

MAX_TILT_DEG = 15.0
SUBLATTICE_A, SUBLATTICE_B, SUBLATTICE_X = 0, 1, 2
_AXES = "xyz"
_GLAZER = re.compile(r"([abc])([0+-])" * 3)

# Lab axes (rows, in crystal coordinates) and supercell vectors (rows, in cubic cells) per zone.
_ZONES = {
    "001": (np.eye(3), lambda n, m: np.array([[n, 0, 0], [0, n, 0], [0, 0, m]])),
    "110": (
        np.array([[-1.0, 1.0, 0.0], [0.0, 0.0, math.sqrt(2.0)], [1.0, 1.0, 0.0]]) / math.sqrt(2.0),
        lambda n, m: np.array([[-n, n, 0], [0, 0, n], [m, m, 0]]),
    ),
}


class StructureError(UserError, ValueError):
    """Bad specimen input, as one line naming the argument and what was expected."""


@dataclass(frozen=True)
class Material:
    """An ABX3 perovskite: chemical symbols of the A, B and X sites, pseudo-cubic ``a`` (Å)."""

    name: str
    A: str
    B: str
    X: str
    a: float

    def __post_init__(self):
        for site in ("A", "B", "X"):
            symbol = getattr(self, site)
            if not isinstance(symbol, str) or atomic_numbers.get(symbol, 0) == 0:
                raise StructureError(
                    f"material {self.name!r}: {site} = {symbol!r} is not a chemical element; "
                    f"expected a symbol such as 'Sr', 'Ti', 'O'")
        try:
            a = float(self.a)
        except (TypeError, ValueError):
            a = float("nan")
        if not (math.isfinite(a) and a > 0):
            raise StructureError(f"material {self.name!r}: a = {self.a!r}; expected a positive "
                                 "lattice parameter in Å")
        object.__setattr__(self, "a", a)


def material_from_dict(name: str, d: Mapping) -> Material:
    """Build a :class:`Material` from a mapping with exactly the keys ``A, B, X, a`` (a in Å)."""
    keys = {"A", "B", "X", "a"}
    missing, extra = sorted(keys - set(d)), sorted(set(d) - keys)
    if missing or extra:
        raise StructureError(f"material {name!r}: missing keys {missing}, unknown keys {extra}; "
                             "expected exactly A, B, X, a")
    return Material(name=name, A=d["A"], B=d["B"], X=d["X"], a=d["a"])


@dataclass(frozen=True, eq=False)
class Specimen:
    """A built specimen.

    Attributes
    ----------
    atoms : ase.Atoms
        Distorted structure, orthogonal cell (Å), ``pbc=True``, beam along +z.
        ``atoms.positions - ideal_positions`` is the displacement of each atom (Å); a
        displaced atom near a cell face may lie just outside the cell (call
        ``atoms.wrap()`` on a copy if a consumer needs it inside).
    ideal_positions : (N, 3) float64
        Undistorted sites (Å), wrapped into the cell.
    sublattice : (N,) int8
        0 = A, 1 = B, 2 = X (O). Atoms are ordered all A, then all B, then all X.
    params : dict
        ``material, A, B, X, a`` (Å), ``glazer`` (ASCII), ``tilt_deg`` (about crystal
        x, y, z), ``polar_A_ang``, ``polar_B_ang`` (crystal frame, Å), ``n``, ``m``, ``zone``,
        ``lattice_ang`` (the contracted pseudo-cubic ``a_x, a_y, a_z``, Å).
    octahedron_tilt_deg : (N, 3) float64 or None
        Signed tilt angles (deg, about crystal x, y, z) of the octahedron of each B atom
        (0 for A and X atoms).
    """

    atoms: Atoms
    ideal_positions: np.ndarray
    sublattice: np.ndarray
    params: dict
    octahedron_tilt_deg: np.ndarray | None = None


def parse_glazer(glazer: str) -> tuple[str, tuple[tuple[str, str], ...]]:
    """Parse a Glazer symbol such as ``"a0a0c+"`` or ``"a−a−a−"`` (unicode minus accepted).

    Returns
    -------
    normalized : str
        The ASCII form, e.g. ``"a-a-a-"``.
    axes : tuple of (letter, sign)
        One pair per crystal axis x, y, z; sign is ``"0"``, ``"+"`` or ``"-"``.
    """
    text = str(glazer).replace("\u2212", "-").replace(" ", "")
    match = _GLAZER.fullmatch(text)
    if not match:
        raise StructureError(f"glazer {glazer!r}: expected three letter+sign pairs such as "
                             "'a0a0c+' or 'a-a-a-' (letters a/b/c, signs 0/+/-)")
    groups = match.groups()
    axes = tuple(zip(groups[0::2], groups[1::2]))
    for letter in set(groups[0::2]):
        signs = {s for l, s in axes if l == letter}
        if "0" in signs and len(signs) > 1:
            raise StructureError(f"glazer {glazer!r}: letter {letter!r} is both untilted ('0') "
                                 "and tilted; equal letters mean equal tilt angles")
    return text, axes


def _tilts_deg(axes, tilt_deg, glazer) -> np.ndarray:
    """Validate the per-axis tilt angles (deg) against the Glazer symbol."""
    tilts = np.asarray(tilt_deg, dtype=float)
    if tilts.shape != (3,):
        raise StructureError(f"tilt_deg = {tilt_deg!r}; expected three angles (deg) about x, y, z")
    for axis, ((letter, sign), angle) in enumerate(zip(axes, tilts)):
        if not (0.0 <= angle <= MAX_TILT_DEG):
            raise StructureError(f"tilt_deg: angle about {_AXES[axis]} is {angle}°; expected "
                                 f"0 to {MAX_TILT_DEG}°")
        if sign == "0" and angle != 0:
            raise StructureError(f"tilt_deg: glazer {glazer!r} has no tilt about {_AXES[axis]} "
                                 f"but the angle is {angle}°; expected 0")
    for i in range(3):
        for j in range(i + 1, 3):
            if axes[i][0] == axes[j][0] and abs(tilts[i] - tilts[j]) > 1e-9:
                raise StructureError(
                    f"tilt_deg: glazer {glazer!r} gives {_AXES[i]} and {_AXES[j]} the same letter "
                    f"but the angles are {tilts[i]}° and {tilts[j]}°; expected equal angles")
    return tilts


def _vector(value, name: str) -> np.ndarray:
    vec = np.asarray(value, dtype=float)
    if vec.shape != (3,) or not np.all(np.isfinite(vec)):
        raise StructureError(f"{name} = {value!r}; expected a vector (dx, dy, dz) in Å")
    return vec


def _zone(zone) -> str:
    key = str(zone).strip("[]")
    if key not in _ZONES:
        raise StructureError(f"zone = {zone!r}; expected one of {sorted(_ZONES)}")
    return key


def _sign(cells: np.ndarray, axis: int, sign: str) -> np.ndarray:
    """Rotation sense (±1) of the octahedron of each cell for a tilt about ``axis``."""
    if sign == "+":
        parity = cells[:, [k for k in range(3) if k != axis]].sum(axis=1)
    else:
        parity = cells.sum(axis=1)
    return 1 - 2 * (parity % 2)


def _check_closes(axes, tilts, vectors, names, glazer, zone):
    """Each supercell vector must map every active sign pattern onto itself."""
    for axis, (_, sign) in enumerate(axes):
        if sign == "0" or tilts[axis] == 0:
            continue
        for vector, (name, value) in zip(vectors, names):
            if _sign(vector[None, :], axis, sign)[0] != 1:
                raise StructureError(
                    f"{name} = {value}: glazer {glazer!r} in zone [{zone}] needs an even {name} "
                    f"so the {sign} tilt about {_AXES[axis]} closes across the periodic cell")


def _cells_in(vectors: np.ndarray) -> np.ndarray:
    """Integer cube-cell origins inside the parallelepiped spanned by ``vectors`` (rows)."""
    corners = np.array([[i, j, k] for i in (0, 1) for j in (0, 1) for k in (0, 1)]) @ vectors
    ranges = [np.arange(lo, hi + 1) for lo, hi in zip(corners.min(0), corners.max(0))]
    grid = np.stack(np.meshgrid(*ranges, indexing="ij"), axis=-1).reshape(-1, 3)
    frac = np.round(grid @ np.linalg.inv(vectors), 9)
    cells = grid[np.all((frac >= 0) & (frac < 1), axis=1)]
    assert len(cells) == round(abs(np.linalg.det(vectors)))
    return cells


def build_specimen(material: Material, n: int, m: int, *, glazer: str = "a0a0a0",
                   tilt_deg: Sequence[float] = (0.0, 0.0, 0.0),
                   polar_A_ang: Sequence[float] = (0.0, 0.0, 0.0),
                   polar_B_ang: Sequence[float] = (0.0, 0.0, 0.0),
                   zone: str = "001") -> Specimen:
    """Build a distorted ABX3 supercell.

    Parameters
    ----------
    material : Material
    n, m : int
        Zone ``"001"``: ``n × n`` cubic cells across (x, y) and ``m`` along the beam.
        Zone ``"110"``: ``n × n`` orthogonal cells (a√2 along x, a along y) and ``m``
        along the beam (a√2 each). Any tilt needs an even ``n``; tilts whose pattern
        alternates along the beam need an even ``m`` (checked, ValueError otherwise).
    glazer : str
        Glazer tilt system, e.g. ``"a0a0c+"``, ``"a-a-a-"``, ``"a+b-b-"``.
    tilt_deg : (3,) float
        Tilt angles (deg, 0–15) about crystal x, y, z. They are used as given per axis;
        axes with equal letters must have equal angles and '0' axes angle 0 (checked).
        Positive angles rotate the octahedron of cell (0, 0, 0) counter-clockwise.
    polar_A_ang, polar_B_ang : (3,) float
        Uniform displacement (Å, crystal frame) of every A and every B cation.
    zone : {"001", "110"}
        Beam direction (crystal frame); brackets are accepted ("[110]").

    Returns
    -------
    Specimen
    """
    zone = _zone(zone)
    for name, value in (("n", n), ("m", m)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise StructureError(f"{name} = {value!r}; expected a positive integer number of cells")
    glazer, axes = parse_glazer(glazer)
    tilts = _tilts_deg(axes, tilt_deg, glazer)
    d_a, d_b = _vector(polar_A_ang, "polar_A_ang"), _vector(polar_B_ang, "polar_B_ang")
    lab_axes, supercell = _ZONES[zone]
    vectors = supercell(int(n), int(m))
    _check_closes(axes, tilts, vectors, [("n", n), ("n", n), ("m", m)], glazer, zone)

    a = material.a
    lattice = rigid_octahedra_lattice_ang(a, tilts, zone)
    cells = _cells_in(vectors)
    count = len(cells)
    unit = np.eye(3)
    ideal = [cells.astype(float), cells + 0.5] + [cells + 0.5 + 0.5 * unit[b] for b in range(3)]
    shift = [np.tile(d_a, (count, 1)), np.tile(d_b, (count, 1))]
    for bond in range(3):
        d_x = np.zeros((count, 3))
        for axis, (_, sign) in enumerate(axes):
            if axis != bond and sign != "0" and tilts[axis] != 0:
                step = 0.5 * lattice[bond] * math.tan(math.radians(tilts[axis]))
                d_x += np.outer(_sign(cells, axis, sign) * step, np.cross(unit[axis], unit[bond]))
        shift.append(d_x)
    octahedra = np.zeros((5 * count, 3))
    for axis, (_, sign) in enumerate(axes):
        if sign != "0":
            octahedra[count : 2 * count, axis] = _sign(cells, axis, sign) * tilts[axis]

    ideal = (np.concatenate(ideal) * lattice) @ lab_axes.T
    shift = np.concatenate(shift) @ lab_axes.T
    lengths = np.abs(np.diag((vectors * lattice) @ lab_axes.T))
    ideal = ideal - np.floor(np.round(ideal / lengths, 9)) * lengths
    sublattice = np.repeat(np.array([0, 1, 2, 2, 2], dtype=np.int8), count)
    symbols = np.array([material.A, material.B, material.X])[sublattice]

    atoms = Atoms(symbols=list(symbols), positions=ideal + shift, cell=np.diag(lengths), pbc=True)
    atoms.set_tags(column_tags(ideal, sublattice, lengths))  # frozen phonons are centred per column
    params = dict(material=material.name, A=material.A, B=material.B, X=material.X, a=a,
                  glazer=glazer, tilt_deg=tuple(float(t) for t in tilts),
                  polar_A_ang=tuple(float(v) for v in d_a),
                  polar_B_ang=tuple(float(v) for v in d_b), n=int(n), m=int(m), zone=zone,
                  lattice_ang=tuple(float(v) for v in lattice))
    return Specimen(atoms=atoms, ideal_positions=ideal, sublattice=sublattice, params=params,
                    octahedron_tilt_deg=octahedra)


def column_tags(ideal_ang: np.ndarray, sublattice: np.ndarray, lengths_ang, tolerance_ang: float = 0.05) -> np.ndarray:
    """Per atom, its column along the beam (z) as a tag 1, 2, … (ASE ``tags``): atoms of one
    sublattice on one ideal (x, y) site [Å] in the periodic cell ``lengths_ang``."""
    cell = np.asarray(lengths_ang, np.float64)[:2]
    keys = np.mod(np.round(np.mod(np.asarray(ideal_ang)[:, :2], cell) / tolerance_ang).astype(np.int64),
                  np.round(cell / tolerance_ang).astype(np.int64))
    table = np.column_stack([np.asarray(sublattice, np.int64), keys])
    return np.unique(table, axis=0, return_inverse=True)[1].ravel() + 1


def rigid_octahedra_lattice_ang(a: float, tilt_deg: Sequence[float], zone: str = "001") -> np.ndarray:
    """Pseudo-cubic lattice parameters ``(a_x, a_y, a_z)`` [Å] of rigid octahedra (B–X =
    ``a/2``) tilted by ``tilt_deg`` about crystal x, y, z: ``a / sqrt(1 + Σ_{n≠b} tan²θ_n)``
    (zone "110": a_x and a_y replaced by their mean, for an orthogonal cell)."""
    tan2 = np.tan(np.radians(np.asarray(tilt_deg, float))) ** 2
    lattice = a / np.sqrt(1.0 + tan2.sum() - tan2)
    if _zone(zone) == "110":
        lattice[:2] = lattice[:2].mean()
    return lattice


def measure_tilts(specimen: Specimen) -> np.ndarray:
    """Mean absolute B–X–B buckling tilt (deg) about crystal x, y, z, from the atom positions.

    For every X, its two B neighbours are the B sites at ``a/2`` in the *ideal* structure
    (periodic boundaries included). With minimum-image vectors from the *actual* positions,
    ``u = X − (B1 + B2)/2`` is the X offset from its bond midpoint and ``d = B2 − B1`` the
    bond, both rotated into the crystal frame. For the tilt about axis ``n`` of an X on a
    bond along ``b ≠ n``, the component ``u_p`` along the third axis ``p`` gives the
    projected buckling ``atan(2|u_p| / |d|)`` (half of 180° minus the B–X–B angle seen along
    ``n``). Before that, the mean of ``u_p`` over all X of the same bond direction is
    subtracted: a uniform shift of the B against the X (polar displacement) is not a
    rotation, while tilt patterns average to zero over a closed periodic cell. The result
    for ``n`` is the mean over the X on both bond directions perpendicular to ``n``.
    """
    atoms, sub = specimen.atoms, specimen.sublattice
    lattice = np.asarray(specimen.params.get("lattice_ang", (specimen.params["a"],) * 3))
    lab_axes = _ZONES[specimen.params["zone"]][0]
    lengths = atoms.cell.lengths()
    if not np.allclose(atoms.cell.array, np.diag(lengths)):
        raise StructureError("measure_tilts: expected an orthogonal cell")

    from scipy.spatial import cKDTree

    ideal = np.mod(specimen.ideal_positions, lengths)
    ideal[np.isclose(ideal, lengths)] = 0.0
    b_idx, x_idx = np.flatnonzero(sub == SUBLATTICE_B), np.flatnonzero(sub == SUBLATTICE_X)
    dist, near = cKDTree(ideal[b_idx], boxsize=lengths).query(ideal[x_idx], k=2)
    frac = np.mod(ideal[x_idx] @ lab_axes / lattice + 0.25, 1.0)  # bond axis: the integer coordinate
    half = lattice[np.argmin(np.abs(frac - 0.25), axis=1)] / 2
    if not np.allclose(dist, half[:, None], atol=1e-6 * lattice.max()):
        raise StructureError("measure_tilts: every X needs two B neighbours at a/2 in the "
                             "ideal structure")

    def mic(v):
        return v - np.round(v / lengths) * lengths

    pos = atoms.positions
    to_b1 = mic(pos[b_idx[near[:, 0]]] - pos[x_idx])
    to_b2 = mic(pos[b_idx[near[:, 1]]] - pos[x_idx])
    u = -(to_b1 + to_b2) / 2 @ lab_axes          # crystal frame
    bond = (to_b2 - to_b1) @ lab_axes
    bond_axis = np.argmax(np.abs(bond), axis=1)
    bond_len = np.linalg.norm(bond, axis=1)

    per_axis = [[], [], []]
    for b in range(3):
        on_b = bond_axis == b
        for n in range(3):
            if n == b or not on_b.any():
                continue
            p = 3 - n - b
            offset = u[on_b, p] - u[on_b, p].mean()
            per_axis[n].append(np.degrees(np.arctan(2 * np.abs(offset) / bond_len[on_b])))
    return np.array([np.concatenate(t).mean() for t in per_axis])


def draw_distortion(rng: np.random.Generator, *, glazer_systems: Sequence[str],
                    tilt_range_deg: tuple[float, float], polar_A_max_ang: float,
                    polar_B_max_ang: float) -> dict:
    """Draw one distortion; a pure function of ``rng``.

    The Glazer system is drawn uniformly from ``glazer_systems``; one angle per distinct
    tilted letter uniformly in ``tilt_range_deg`` (deg; equal letters share it, '0' axes
    get 0); each polar vector uniformly in the ball of radius ``polar_*_max_ang`` (Å).
    The random stream is consumed in a fixed order whatever the values drawn.

    Returns
    -------
    dict
        Keyword arguments for :func:`build_specimen`: ``glazer``, ``tilt_deg``,
        ``polar_A_ang``, ``polar_B_ang``.
    """
    if len(glazer_systems) == 0:
        raise StructureError("glazer_systems is empty; expected at least one system like 'a0a0c+'")
    lo, hi = (float(t) for t in tilt_range_deg)
    if not 0.0 <= lo <= hi <= MAX_TILT_DEG:
        raise StructureError(f"tilt_range_deg = {tuple(tilt_range_deg)}; expected "
                             f"0 <= lo <= hi <= {MAX_TILT_DEG} (deg)")
    for name, value in (("polar_A_max_ang", polar_A_max_ang), ("polar_B_max_ang", polar_B_max_ang)):
        if not (math.isfinite(value) and value >= 0):
            raise StructureError(f"{name} = {value!r}; expected a non-negative length in Å")
    parsed = [parse_glazer(g) for g in glazer_systems]

    glazer, axes = parsed[int(rng.integers(len(parsed)))]
    angle_of = {letter: float(rng.uniform(lo, hi)) for letter in "abc"}
    tilts = tuple(0.0 if sign == "0" else angle_of[letter] for letter, sign in axes)

    def ball(radius):
        direction = rng.normal(size=3)
        direction /= np.linalg.norm(direction)
        return tuple(float(v) for v in direction * radius * rng.uniform() ** (1 / 3))

    return dict(glazer=glazer, tilt_deg=tilts, polar_A_ang=ball(polar_A_max_ang),
                polar_B_ang=ball(polar_B_max_ang))


def rms_displacements(material: Material, rms_by_element: Mapping[str, float]) -> dict[str, float]:
    """Thermal RMS displacement (Å) of the material's A, B, X elements, for frozen phonons.

    ``rms_by_element`` maps chemical symbols to RMS displacements (Å) and may list other
    elements too; each of the material's elements must be present.
    """
    out = {}
    for symbol in (material.A, material.B, material.X):
        if symbol not in rms_by_element:
            raise StructureError(f"phonon RMS for {symbol!r} (material {material.name!r}) is "
                                 "missing; expected an RMS displacement in Å per element")
        value = float(rms_by_element[symbol])
        if not (math.isfinite(value) and value >= 0):
            raise StructureError(f"phonon RMS for {symbol!r} = {value!r}; expected >= 0 Å")
        out[symbol] = value
    return out
