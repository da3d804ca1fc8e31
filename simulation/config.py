"""The simulator's config schema: the ``simulation:`` section of a config file.

Every model here is a :class:`stemnet.config.Section` (unknown keys refused); the file is
loaded, overridden and its errors worded by :mod:`stemnet.config`, with
:class:`SimulationFile` as the schema so that the ``simulation`` section is typed.

>>> cfg = load_simulation("configs/simulation/tiny.yaml", ["simulation.num_samples=4"])  # doctest: +SKIP
>>> cfg.num_samples                                                                      # doctest: +SKIP
4
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Literal, Optional, Sequence, Tuple

from pydantic import Field, field_validator, model_validator

import stemnet.config
from stemnet.config import Config, Fraction, NonNegativeFloat, PositiveFloat, PositiveInt, Section

__all__ = [
    "MaterialConfig", "SpecimenConfig", "DistortionConfig", "MicroscopeConfig", "ImperfectionsConfig",
    "CbedConfig", "StemConfig", "ShardConfig", "SimulationConfig", "SimulationFile",
    "load_config", "load_simulation",
]


class MaterialConfig(Section):
    """An ABX3 perovskite: species and pseudo-cubic lattice parameter ``a`` (Å)."""

    A: str
    B: str
    X: str = "O"
    a: PositiveFloat


class SpecimenConfig(Section):
    """Supercell geometry: ``cells`` × ``cells`` unit cells across, thickness in cells."""

    materials: List[str] = Field(min_length=1)
    cells: PositiveInt = 4
    thickness_cells: Tuple[PositiveInt, PositiveInt] = (4, 8)
    zone: Literal["001", "110"] = "001"

    @field_validator("thickness_cells")
    @classmethod
    def _ordered(cls, value):
        if value[0] > value[1]:
            raise ValueError(f"expected [min, max] with min <= max, got {list(value)}")
        return value


class DistortionConfig(Section):
    """Per-sample distributions: Glazer tilt systems and angles (deg), polar shifts (Å)."""

    glazer: List[str] = Field(default_factory=lambda: ["a0a0a0"], min_length=1)
    tilt_deg: Tuple[NonNegativeFloat, NonNegativeFloat] = (0.0, 12.0)
    polar_A_ang: NonNegativeFloat = 0.0
    polar_B_ang: NonNegativeFloat = 0.0
    polar_in_plane: bool = False  # polar vectors drawn in the x-y plane (dz = 0)
    # displacement labels relative to the A sublattice ("A": what an image can show, since
    # a uniform shift of the whole crystal is invisible) or to the ideal sites ("crystal")
    frame: Literal["A", "crystal"] = "A"
    phonon_rms_ang: Dict[str, NonNegativeFloat] = Field(default_factory=dict)
    phonon_configs: PositiveInt = 1

    @field_validator("tilt_deg")
    @classmethod
    def _tilt_range(cls, value):
        if value[0] > value[1] or value[1] > 15:
            raise ValueError(f"expected [min, max] within 0-15 degrees, got {list(value)}")
        return value


class MicroscopeConfig(Section):
    """Probe: energy (eV), convergence semi-angle (mrad), defocus and Cs (Å)."""

    energy_ev: float = Field(200e3, ge=60e3, le=300e3)
    convergence_mrad: PositiveFloat = 20.0
    defocus_ang: float = 0.0
    cs_ang: float = 0.0


Range = Tuple[float, float]


def _ordered_range(value):
    if value[0] > value[1]:
        raise ValueError(f"expected [min, max] with min <= max, got {list(value)}")
    return value


class ImperfectionsConfig(Section):
    """Per-sample imperfections of a real instrument, each drawn uniformly from its
    ``[min, max]`` range (a range ``[0, 0]`` turns it off; gain ``[1, 1]``). The defaults
    are typical of a 200-300 kV aberration-corrected STEM. Every drawn value is stored in
    the sample's ``params`` under the same name."""

    source_fwhm_ang: Range = (0.3, 0.8)              # effective Gaussian source size (FWHM): 0.6 taught shrinkage at 0.9
    defocus_ang: Range = (-30.0, 30.0)               # residual defocus, added to microscope.defocus_ang
    astigmatism_ang: Range = (0.0, 20.0)             # two-fold astigmatism C12 (angle drawn in 0-180°)
    coma_ang: Range = (0.0, 200.0)                   # axial coma C21 (angle drawn in 0-360°)
    cs_ang: Range = (-10000.0, 10000.0)              # residual C30, added to microscope.cs_ang
    focal_spread_ang: Range = (20.0, 50.0)           # chromatic defocus spread (1 sigma, Cc dE/E)
    focal_points: PositiveInt = 3                    # Gauss-Hermite nodes of the focal average
    mistilt_mrad: Range = (0.0, 3.0)                 # crystal mistilt (direction drawn in 0-360°)
    amorphous_ang: Range = (0.0, 0.0)                # amorphous layer on the entrance surface
    amorphous_element: str = "C"
    amorphous_density_g_cm3: PositiveFloat = 2.0
    jitter_ang: Range = (0.0, 0.15)                  # line-to-line scan jitter along x (rms)
    drift_x_ang_per_line: Range = (-0.005, 0.005)    # linear drift: shear
    drift_y_ang_per_line: Range = (-0.005, 0.005)    # linear drift: stretch along the slow scan
    flyback_ang: Range = (0.0, 0.3)                  # lag of the first column of every row
    flyback_decay_px: PositiveFloat = 3.0
    dose_e_per_ang2: Range = (2.0e4, 2.0e5)          # shot noise (Poisson)
    read_noise_e: Range = (0.0, 1.0)                 # Gaussian read noise, electrons rms per pixel
    gain: Range = (0.8, 1.25)
    offset_frac: Range = (0.0, 0.05)                 # offset, in fractions of the incident beam

    _ranges = field_validator(
        "source_fwhm_ang", "defocus_ang", "astigmatism_ang", "coma_ang", "cs_ang", "focal_spread_ang",
        "mistilt_mrad", "amorphous_ang", "jitter_ang", "drift_x_ang_per_line", "drift_y_ang_per_line",
        "flyback_ang", "dose_e_per_ang2", "read_noise_e", "gain", "offset_frac",
    )(_ordered_range)

    @field_validator("source_fwhm_ang", "astigmatism_ang", "coma_ang", "focal_spread_ang", "mistilt_mrad",
                     "amorphous_ang", "jitter_ang", "dose_e_per_ang2", "read_noise_e")
    @classmethod
    def _non_negative(cls, value):
        if value[0] < 0:
            raise ValueError(f"expected a range of non-negative values, got {list(value)}")
        return value

    @field_validator("gain")
    @classmethod
    def _positive_gain(cls, value):
        if value[0] <= 0:
            raise ValueError(f"expected a range of positive gains, got {list(value)}")
        return value


class CbedConfig(Section):
    """4D-STEM: a gx × gy probe grid over the field of view, patterns binned to k × k."""

    grid: Tuple[PositiveInt, PositiveInt] = (4, 4)
    k: PositiveInt = 32
    max_angle_mrad: PositiveFloat = 40.0


class StemConfig(Section):
    """Annular detectors: name -> (inner, outer) collection angles in mrad."""

    detectors: Dict[str, Tuple[NonNegativeFloat, PositiveFloat]] = Field(
        default_factory=lambda: {"haadf": (70.0, 200.0), "abf": (10.0, 20.0), "bf": (0.0, 10.0)}
    )
    method: Literal["multislice", "prism"] = "multislice"


class ShardConfig(Section):
    """Writer settings: samples per LMDB transaction, initial map size (KiB; it grows)."""

    txn_samples: PositiveInt = 8
    map_size_kib: PositiveInt = 65536


class SimulationConfig(Section):
    """Everything that decides a simulated dataset (sample i = f(seed, i))."""

    seed: int = 0
    num_samples: PositiveInt = 16
    splits: Dict[Literal["train", "val", "test"], Fraction] = Field(
        default_factory=lambda: {"train": 0.8, "val": 0.1, "test": 0.1}
    )
    mode: Literal["cbed", "stem"] = "cbed"
    materials: Dict[str, MaterialConfig] = Field(
        default_factory=lambda: {"SrTiO3": MaterialConfig(A="Sr", B="Ti", a=3.905)}
    )
    specimen: SpecimenConfig = Field(default_factory=lambda: SpecimenConfig(materials=["SrTiO3"]))
    distortion: DistortionConfig = Field(default_factory=DistortionConfig)
    microscope: MicroscopeConfig = Field(default_factory=MicroscopeConfig)
    sampling_ang: PositiveFloat = 0.05
    fov_ang: PositiveFloat = 7.81
    random_offset: bool = False  # translate each specimen by a random in-cell shift (for tiling)
    output_shape: Tuple[PositiveInt, PositiveInt] = (32, 32)
    label_sigma_ang: PositiveFloat = 0.3
    noise_dose_e_per_ang2: Optional[PositiveFloat] = None
    # stem mode: probe step over the periodic cell (None: the probe's Nyquist step
    # lambda/(4 alpha)); images go to output_shape by Fourier interpolation. A step or an
    # output pixel coarser than Nyquist is refused unless undersampled_ok (then aliased).
    scan_step_ang: Optional[PositiveFloat] = None
    undersampled_ok: bool = False
    imperfections: Optional[ImperfectionsConfig] = None  # None: a perfect instrument
    tilt_labels: bool = False  # add the per-cell octahedral tilt maps (deg) as field 'tilt'
    cbed: CbedConfig = Field(default_factory=CbedConfig)
    stem: StemConfig = Field(default_factory=StemConfig)
    shard: ShardConfig = Field(default_factory=ShardConfig)

    @field_validator("splits")
    @classmethod
    def _splits_sum_to_one(cls, value):
        total = sum(value.values())
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"expected fractions summing to 1, got {total:g}")
        return value

    @model_validator(mode="after")
    def _imperfections_need_stem(self):
        if self.imperfections is not None and self.mode != "stem":
            raise ValueError("imperfections: drawn imperfections are modelled for mode stem only; "
                             f"expected null for mode {self.mode}")
        return self

    @model_validator(mode="after")
    def _known_materials(self):
        unknown = [m for m in self.specimen.materials if m not in self.materials]
        if unknown:
            raise ValueError(
                f"specimen.materials: unknown material {unknown[0]!r}; "
                f"expected one of {sorted(self.materials)}"
            )
        name = min(self.specimen.materials, key=lambda m: self.materials[m].a)
        width = self.specimen.cells * self.materials[name].a
        # STEM images are summed as Fourier series of the periodic cell: any field of view
        if self.fov_ang > width and self.mode != "stem":
            raise ValueError(
                f"fov_ang: field of view {self.fov_ang:g} Å is larger than the specimen "
                f"({self.specimen.cells} cells of {name} = {width:.2f} Å); expected fov_ang <= {width:.2f}"
            )
        return self


class SimulationFile(Config):
    """A whole config file as the simulator reads it: :class:`stemnet.config.Config` with
    the ``simulation`` section typed."""

    simulation: Optional[SimulationConfig] = None


def load_config(path: str | Path, overrides: Sequence[str] = (), *, require: Sequence[str] = ()) -> SimulationFile:
    """:func:`stemnet.config.load_config` with the ``simulation`` section validated too."""
    return stemnet.config.load_config(path, overrides, require=require, schema=SimulationFile)


def load_simulation(path: str | Path, overrides: Sequence[str] = ()) -> SimulationConfig:
    """The ``simulation`` section of a config file (required), overridden and validated."""
    return load_config(path, overrides, require=("simulation",)).simulation
