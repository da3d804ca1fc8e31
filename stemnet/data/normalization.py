"""How raw sample arrays become network inputs and targets, and back (:class:`Normalization`).

One definition: :meth:`Normalization.input_terms` and :meth:`Normalization.target_terms`
give the per-channel ``(sub, mul, nonlinearity)`` that both :meth:`Normalization.inputs`
(reconstruction, evaluation) and the input pipeline's compiled gather apply.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np

from stemnet.data.layout import input_field, is_cbed
from stemnet.errors import UserError
from stemnet.shards import read_manifest

CBED_NORMALIZATIONS = ("none", "sqrt", "log1p", "standardize")
STEM_NORMALIZATIONS = ("none", "standardize")
EPS = 1e-6


@dataclass
class Normalization:
    """How raw sample arrays become network inputs and targets, and back.

    Built from the manifest statistics (:meth:`from_manifest`), saved with a run
    (:meth:`to_dict` / :meth:`from_dict`) and applied to experimental data later.

    - CBED (``kind="cbed"``): ``none`` (raw), ``sqrt`` (``sqrt(max(x, 0) / scale)``),
      ``log1p`` (``log1p(max(x, 0) / scale)``), with ``scale`` the dataset's mean
      intensity so values are O(1); ``standardize``: each pattern to zero mean and unit
      standard deviation over its own K×K pixels (per sample, no dataset statistics).
    - STEM (``kind="stem"``): ``standardize`` each detector channel with the dataset's
      per-channel mean and std; or ``none``.
    - potential: ``(v - mean) / std`` with the dataset's statistics.
    - displacement: divided by ``displacement_scale`` (Å), the root-mean-square
      displacement at column sites estimated from the statistics (``sqrt(E[d²] /
      E[columns])``), so the network regresses O(1) numbers; :meth:`denormalize` gives Å.
    - tilt: divided by ``tilt_scale`` (degrees), the root-mean-square tilt angle over all
      three channels and pixels (one scale for the three axes: a symmetry swaps the tilts
      about x and y, so per-axis scales would break the augmentation's equivariance).
    """

    kind: str
    method: str
    scale: float = 1.0
    channel_mean: Tuple[float, ...] = ()
    channel_std: Tuple[float, ...] = ()
    potential_mean: float = 0.0
    potential_std: float = 1.0
    displacement_scale: float = 1.0
    tilt_scale: float = 1.0

    def __post_init__(self):
        allowed = CBED_NORMALIZATIONS if self.kind == "cbed" else STEM_NORMALIZATIONS
        if self.method not in allowed:
            raise UserError(
                f"normalization {self.method!r} for {self.kind} inputs: expected one of {list(allowed)}"
            )

    @classmethod
    def from_manifest(cls, manifest: dict, cbed_normalization: str = "sqrt") -> "Normalization":
        """Normalisation for a dataset; for STEM inputs ``standardize`` is used unless
        ``cbed_normalization`` is ``"none"``."""
        name = input_field(manifest)
        stats = manifest.get("stats") or {}
        if name not in stats:
            raise UserError(f"manifest has no statistics for field {name!r}; rerun finalize")
        kind = "cbed" if is_cbed(manifest, name) else "stem"
        pot = stats.get("potential") or {"mean": 0.0, "std": 1.0}
        common = dict(potential_mean=float(pot["mean"] or 0.0),
                      potential_std=_safe_std(pot.get("std")),
                      displacement_scale=_displacement_scale(stats), tilt_scale=_rms_scale(stats.get("tilt")))
        if kind == "cbed":
            if cbed_normalization not in CBED_NORMALIZATIONS:
                raise UserError(
                    f"cbed_normalization {cbed_normalization!r}: expected one of {list(CBED_NORMALIZATIONS)}"
                )
            mean = float(stats[name].get("mean") or 0.0)
            return cls("cbed", cbed_normalization, scale=mean if mean > 0 else 1.0, **common)
        channels = stats[name]["channels"]
        method = "none" if cbed_normalization == "none" else "standardize"
        return cls("stem", method, channel_mean=tuple(float(m) for m in channels["mean"]),
                   channel_std=tuple(_safe_std(s) for s in channels["std"]), **common)

    def to_dict(self) -> dict:
        """JSON-ready description (inverse: :meth:`from_dict`)."""
        return {"kind": self.kind, "method": self.method, "scale": self.scale,
                "channel_mean": list(self.channel_mean), "channel_std": list(self.channel_std),
                "potential_mean": self.potential_mean, "potential_std": self.potential_std,
                "displacement_scale": self.displacement_scale, "tilt_scale": self.tilt_scale}

    @classmethod
    def from_dict(cls, data: dict) -> "Normalization":
        data = dict(data)
        data["channel_mean"] = tuple(data.get("channel_mean", ()))
        data["channel_std"] = tuple(data.get("channel_std", ()))
        return cls(**data)

    # -- forward: one definition of every transform, used by inputs() and the pipeline
    def input_terms(self, x: Optional[np.ndarray] = None):
        """``(sub, mul, nonlinear)`` with normalised inputs ``g((x - sub) · mul)``.

        ``sub`` and ``mul`` are float32 ``(B, C)`` (or ``(1, C)``) per channel; ``g`` is
        ``"none"``, ``"sqrt"`` (``sqrt(max(·, 0))``) or ``"log1p"`` (``log1p(max(·, 0))``).
        ``x`` (``(B, C, N)`` channels-first, float32) is needed only for per-pattern
        standardisation, whose terms are each pattern's mean and 1/(std + EPS).
        """
        if self.method == "none":
            return np.zeros((1, 1), np.float32), np.ones((1, 1), np.float32), "none"
        if self.kind == "cbed" and self.method == "standardize":
            mean = x.mean(axis=2, dtype=np.float32)
            std = np.sqrt(np.square(x - mean[..., None]).mean(axis=2)) + np.float32(EPS)
            return mean, (np.float32(1.0) / std).astype(np.float32), "none"
        if self.kind == "cbed":
            return np.zeros((1, 1), np.float32), np.full((1, 1), 1.0 / self.scale, np.float32), self.method
        mean = np.asarray(self.channel_mean, np.float32)[None]
        return mean, (1.0 / np.asarray(self.channel_std, np.float32))[None], "none"

    def target_terms(self, name: str) -> Tuple[float, float]:
        """``(sub, mul)`` of a target: normalised ``(v - sub) · mul``."""
        if name == "potential":
            return np.float32(self.potential_mean), np.float32(1.0 / self.potential_std)
        if name == "displacement":
            return np.float32(0.0), np.float32(1.0 / self.displacement_scale)
        if name == "tilt":
            return np.float32(0.0), np.float32(1.0 / self.tilt_scale)
        raise UserError(f"target {name!r}: expected 'potential', 'displacement' or 'tilt'")

    def inputs(self, x: np.ndarray, *, channels_last: bool = True, out: Optional[np.ndarray] = None) -> np.ndarray:
        """Normalised float32 inputs of shape ``(..., H, W, C)`` (or ``(..., C, H, W)``).

        ``out=x`` normalises in place (``x`` must then be float32).
        """
        x = np.asarray(x)
        if out is None:
            out = np.array(x, dtype=np.float32, copy=True)
        elif out is not x:
            out[...] = x
        if self.method == "none":
            return out
        cf = np.moveaxis(out, -1, -3) if channels_last else out  # a view: (..., C, H, W)
        lead, (c, h, w) = cf.shape[:-3], cf.shape[-3:]
        sub, mul, nonlinear = self.input_terms(cf.reshape((-1, c, h * w)))

        def per_channel(t):
            return t.reshape(lead + (c, 1, 1)) if t.shape[0] > 1 else t.reshape(t.shape[1], 1, 1)

        cf -= per_channel(sub)
        cf *= per_channel(mul)
        if nonlinear != "none":
            np.maximum(out, 0, out=out)
            (np.sqrt if nonlinear == "sqrt" else np.log1p)(out, out=out)
        return out

    def potential(self, v: np.ndarray, out: Optional[np.ndarray] = None) -> np.ndarray:
        """Standardised potential (any layout)."""
        v = np.asarray(v)
        if out is None:
            out = np.array(v, dtype=np.float32, copy=True)
        elif out is not v:
            out[...] = v
        sub, mul = self.target_terms("potential")
        out -= sub
        out *= mul
        return out

    # -- inverse
    def denormalize(self, predictions) -> dict:
        """Predictions in physical units: potential in V·Å, displacement in Å, tilt in degrees
        (the tilt head's magnitudes, clipped at 0).

        ``predictions``: a dict with ``potential``, ``displacement``, ``tilt`` (numpy or
        tensors), or a bare potential array.
        """
        if not isinstance(predictions, dict):
            predictions = {"potential": predictions}
        out = {}
        for key, value in predictions.items():
            value = np.asarray(value, dtype=np.float32)
            if key == "potential":
                value = value * np.float32(self.potential_std) + np.float32(self.potential_mean)
            elif key == "displacement":
                value = value * np.float32(self.displacement_scale)
            elif key == "tilt":  # magnitudes per axis (tilt_target): a negative output means 0
                value = np.maximum(value * np.float32(self.tilt_scale), np.float32(0))
            out[key] = value
        return out

    def denormalize_inputs(self, x: np.ndarray, *, channels_last: bool = True) -> np.ndarray:
        """Inverse of :meth:`inputs` where one exists (not for per-pattern standardisation)."""
        x = np.asarray(x, dtype=np.float32)
        if self.method == "none":
            return x.copy()
        if self.kind == "cbed":
            if self.method == "sqrt":
                return np.square(x) * np.float32(self.scale)
            if self.method == "log1p":
                return np.expm1(x) * np.float32(self.scale)
            raise UserError("per-pattern standardisation has no inverse (pattern means are not kept)")
        shape = (-1,) if channels_last else (-1, 1, 1)
        return x * np.asarray(self.channel_std, np.float32).reshape(shape) + np.asarray(
            self.channel_mean, np.float32).reshape(shape)


def _displacement_scale(stats: dict) -> float:
    """RMS displacement at column sites (Å): sqrt(E[d²] / E[mask]) over the label maps."""
    d, c = stats.get("displacement"), stats.get("columns")
    if not d or not c or not c.get("mean"):
        return 1.0
    second = float(d.get("std") or 0.0) ** 2 + float(d.get("mean") or 0.0) ** 2
    scale = math.sqrt(second / float(c["mean"]))
    return scale if scale > 1e-4 else 1.0


def _rms_scale(stats: Optional[dict]) -> float:
    """RMS value of a field over all its channels and pixels, sqrt(std² + mean²); 1 if absent or ~0."""
    if not stats:
        return 1.0
    scale = math.sqrt(float(stats.get("std") or 0.0) ** 2 + float(stats.get("mean") or 0.0) ** 2)
    return scale if scale > 1e-4 else 1.0


def _safe_std(value) -> float:
    value = float(value or 0.0)
    return value if value > EPS else 1.0


def load_normalization(path, cbed_normalization: str = "sqrt") -> Normalization:
    """:meth:`Normalization.from_manifest` of the dataset at ``path``."""
    return Normalization.from_manifest(read_manifest(path), cbed_normalization)
