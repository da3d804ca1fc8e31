"""Typed configuration: pydantic models, YAML files, dotted command-line overrides.

A config file is a YAML mapping of sections (``simulation``, ``model``, ``train``,
``data``, ``distributed``); a command asks for the sections it needs. ``model`` may be a
path to another YAML file (relative to the file naming it) whose ``model`` section is
used. Every error is a one-line :class:`ConfigError` naming the file (or the ``-o``
override), the dotted key, what was wrong and what was expected.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import re
import typing
from pathlib import Path
from typing import Any, Dict, List, Literal, Optional, Sequence, Tuple

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from stemnet.errors import UserError

PositiveInt = typing.Annotated[int, Field(gt=0)]
PositiveFloat = typing.Annotated[float, Field(gt=0)]
NonNegativeFloat = typing.Annotated[float, Field(ge=0)]
Fraction = typing.Annotated[float, Field(ge=0, le=1)]


class ConfigError(UserError, ValueError):
    """A configuration problem, as one line: ``where: key: what; expected what``."""


class Section(BaseModel):
    """Base of every config section: unknown keys are refused, assignments validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)


# --------------------------------------------------------------------------- simulation
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

    source_fwhm_ang: Range = (0.3, 0.6)              # effective Gaussian source size (FWHM)
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


# -------------------------------------------------------------------------------- model
class ModelConfig(Section):
    """FC-DenseNet encoder-decoder (Tiramisu family)."""

    name: Literal["fcdensenet"] = "fcdensenet"
    initial_filters: PositiveInt = 24
    growth: PositiveInt = 12
    layers_per_block: List[PositiveInt] = Field(default_factory=lambda: [2, 3, 4], min_length=1)
    bottleneck_layers: PositiveInt = 4
    kernel_size: PositiveInt = 3
    pooling: Literal["max", "avg"] = "max"
    dropout: float = Field(0.0, ge=0, lt=1)
    batch_norm: bool = True
    coordconv: bool = False
    heads: Dict[Literal["potential", "displacement"], PositiveInt] = Field(
        default_factory=lambda: {"potential": 1, "displacement": 9}
    )


# ------------------------------------------------------------------------- train / data
class TrainConfig(Section):
    """Optimisation: steps, batch, optimizer, schedule, precision, checkpoints."""

    steps: PositiveInt = 100
    batch_size: PositiveInt = 8
    optimizer: Literal["adam", "sgd"] = "adam"
    learning_rate: PositiveFloat = 1e-3
    momentum: Fraction = 0.9
    lars: bool = False
    clip_norm: Optional[PositiveFloat] = None
    warmup_steps: int = Field(0, ge=0)
    schedule: Literal["constant", "cosine", "step"] = "cosine"
    ema_decay: Optional[Fraction] = None
    precision: Literal["float32", "mixed_bfloat16", "mixed_float16"] = "float32"
    loss: Literal["l1", "mse", "huber"] = "mse"
    head_weights: Dict[Literal["potential", "displacement"], NonNegativeFloat] = Field(
        default_factory=lambda: {"potential": 1.0, "displacement": 1.0}
    )
    val_every: PositiveInt = 50
    checkpoint_every: PositiveInt = 50
    keep_checkpoints: PositiveInt = 3
    seed: int = 0
    record_batches: bool = False  # debug: RUN/batches-rank{r}.jsonl, per step the sample indices, lr, loss scale


class DataConfig(Section):
    """Input pipeline: targets, normalisation, augmentation."""

    targets: List[Literal["potential", "displacement"]] = Field(
        default_factory=lambda: ["potential", "displacement"], min_length=1
    )
    cbed_normalization: Literal["none", "sqrt", "log1p", "standardize"] = "sqrt"
    augment: bool = True
    noise_std: NonNegativeFloat = 0.0
    shuffle_buffer: PositiveInt = 256
    verify_crc: bool = True


GROUPING_PATTERN = re.compile(r"^(none|layer|graph|count:[1-9][0-9]*)$")


class DistributedConfig(Section):
    """The backend (auto, horovod, mwms), gradient grouping, compression, Horovod's knobs.

    ``fusion_threshold_mib`` is Horovod's fusion buffer, and under ``mwms`` the pack size
    of the ``none`` strategy (TensorFlow's ``bytes_per_pack``).
    """

    backend: Literal["auto", "horovod", "mwms"] = "auto"
    grouping: str = "graph"
    group_bytes_mib: PositiveFloat = 16.0
    first_group_bytes_mib: PositiveFloat = 1.0
    compression: Literal["none", "fp16"] = "none"
    op: Literal["average", "adasum"] = "average"
    gradient_predivide_factor: PositiveFloat = 1.0
    cache_capacity: int = Field(1024, ge=0)
    cycle_time_ms: PositiveFloat = 1.0
    fusion_threshold_mib: NonNegativeFloat = 64.0
    timeline: Optional[str] = None

    @field_validator("grouping")
    @classmethod
    def _grouping(cls, value):
        if not GROUPING_PATTERN.match(value):
            raise ValueError(f"expected one of none, layer, graph, count:N (N > 0), got {value!r}")
        return value


class Config(Section):
    """A whole config file; a command checks that the sections it needs are present."""

    simulation: Optional[SimulationConfig] = None
    model: Optional[ModelConfig] = None
    train: Optional[TrainConfig] = None
    data: DataConfig = Field(default_factory=DataConfig)
    distributed: DistributedConfig = Field(default_factory=DistributedConfig)


# ------------------------------------------------------------------------------ loading
def _read_yaml(path: Path, where: str) -> dict:
    if not path.is_file():
        raise ConfigError(f"{where}: no such config file")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"{where}: YAML syntax error{at}: {problem}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping of sections, got {type(data).__name__}")
    return data


def _resolve_model_reference(data: dict, path: Path, where: str) -> None:
    """Replace ``model: other.yaml`` by that file's ``model`` section."""
    ref = data.get("model")
    if not isinstance(ref, str):
        return
    ref_path = (path.parent / ref).resolve()
    ref_where = f"{where}: model: {ref}"
    ref_data = _read_yaml(ref_path, ref_where)
    if "model" not in ref_data or not isinstance(ref_data["model"], dict):
        raise ConfigError(f"{ref_where}: expected a file with a 'model' section")
    data["model"] = ref_data["model"]


def parse_override(text: str) -> Tuple[List[str], Any]:
    """``"train.batch_size=8"`` -> (["train", "batch_size"], 8); values are parsed as YAML."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"-o {text}: expected KEY=VALUE with a dotted key, e.g. train.batch_size=8")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def _apply_override(data: dict, parts: List[str], value: Any, text: str) -> None:
    node = data
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            where = ".".join(parts[: i + 1])
            raise ConfigError(f"-o {text}: {where} is a value, not a section; expected a key inside a section")
        node = child
    node[parts[-1]] = value


def _section_model(loc: Sequence, root: Optional[type] = None) -> Optional[type]:
    """The pydantic model class under ``root`` (default :class:`Config`) that holds the last key of ``loc``."""
    model: Any = root or Config
    for part in loc[:-1]:
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            return None
        field = model.model_fields.get(str(part))
        if field is None:
            return None
        model = _unwrap(field.annotation)
        if typing.get_origin(model) in (dict, Dict):  # dict[str, Model]: skip the free key
            model = _unwrap(typing.get_args(model)[1])
    return model if isinstance(model, type) and issubclass(model, BaseModel) else None


def _unwrap(annotation):
    """Optional[X] / Annotated[X, ...] -> X."""
    while True:
        origin = typing.get_origin(annotation)
        args = typing.get_args(annotation)
        if origin is typing.Annotated:
            annotation = args[0]
        elif origin is typing.Union:
            rest = [a for a in args if a is not type(None)]
            if len(rest) != 1:
                return annotation
            annotation = rest[0]
        else:
            return annotation


def _describe_error(err: dict, root: Optional[type] = None) -> str:
    """One pydantic error -> 'what was wrong; expected what'."""
    kind, ctx, given = err["type"], err.get("ctx", {}), err.get("input")
    got = f"got {given!r}" if not isinstance(given, (dict, list)) else f"got a {type(given).__name__}"
    if kind == "extra_forbidden":
        model = _section_model(err["loc"], root)
        key = str(err["loc"][-1])
        known = sorted(model.model_fields) if model else []
        close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
        hint = f"did you mean {close[0]!r}?" if close else f"expected one of {', '.join(known)}"
        return f"unknown key; {hint}"
    if kind == "missing":
        return "missing required key"
    if kind == "greater_than":
        if ctx.get("gt") == 0 and isinstance(given, int) and not isinstance(given, bool):
            return f"expected a positive integer, {got}"
        return f"expected a number > {ctx.get('gt')}, {got}"
    if kind == "greater_than_equal":
        return f"expected a number >= {ctx.get('ge')}, {got}"
    if kind == "less_than":
        return f"expected a number < {ctx.get('lt')}, {got}"
    if kind == "less_than_equal":
        return f"expected a number <= {ctx.get('le')}, {got}"
    if kind in ("int_parsing", "int_type", "int_from_float"):
        return f"expected an integer, {got}"
    if kind in ("float_parsing", "float_type"):
        return f"expected a number, {got}"
    if kind in ("bool_parsing", "bool_type"):
        return f"expected true or false, {got}"
    if kind in ("string_type",):
        return f"expected a string, {got}"
    if kind in ("literal_error", "enum"):
        return f"expected one of {ctx.get('expected')}, {got}"
    if kind in ("dict_type", "model_type", "model_attributes_type"):
        return f"expected a mapping, {got}"
    if kind in ("list_type", "tuple_type"):
        return f"expected a list, {got}"
    if kind == "too_short":
        return f"expected at least {ctx.get('min_length')} item(s), {got}"
    if kind == "too_long":
        return f"expected at most {ctx.get('max_length')} item(s), {got}"
    if kind == "value_error":
        return str(ctx.get("error", err["msg"]))
    return f"{err['msg']}, {got}"


def validation_error(error: ValidationError, where: str, overrides: Optional[Dict[str, str]] = None, *,
                     root: Optional[type] = None, prefix: Sequence[str] = ()) -> ConfigError:
    """The first error of a pydantic validation as one line: ``WHERE: dotted.key: what; expected what``.

    ``root`` is the model validated (default :class:`Config`, for "did you mean" hints),
    ``prefix`` the keys above it in the file, ``overrides`` ``{dotted key: "-o" text}``.
    """
    err = error.errors()[0]
    loc = [*prefix, *(str(p) for p in err["loc"])]
    message = _describe_error(err, root)
    if err["type"] == "value_error" and re.match(r"^[a-z_.]+: ", message):
        # a model-level check names its own key relative to the section
        sub, _, message = message.partition(": ")
        loc = loc + sub.split(".")
    key = ".".join(loc)
    for okey, otext in (overrides or {}).items():
        if key == okey or key.startswith(okey + "."):
            where = f"-o {otext}"
    return ConfigError(f"{where}: {key}: {message}" if key else f"{where}: {message}")


def load_config(
    path: str | Path,
    overrides: Sequence[str] = (),
    *,
    require: Sequence[str] = (),
) -> Config:
    """Load, override and validate a config file.

    Parameters
    ----------
    path : YAML file of sections.
    overrides : ``"dotted.key=value"`` strings (values parsed as YAML), applied in order.
    require : sections the caller needs, e.g. ``("simulation",)``: a file without one is
        refused (``data`` and ``distributed`` always fall back to their defaults).
    """
    path = Path(path)
    where = str(path)
    data = _read_yaml(path, where)
    _resolve_model_reference(data, path, where)
    applied: Dict[str, str] = {}
    for text in overrides:
        parts, value = parse_override(text)
        if parts[0] == "model" and len(parts) == 1 and isinstance(value, str):
            data["model"] = value
            _resolve_model_reference(data, path, where)
        else:
            _apply_override(data, parts, value, text)
        applied[".".join(parts)] = text
    try:
        config = Config.model_validate(data)
    except ValidationError as error:
        raise validation_error(error, where, applied) from None
    missing = [s for s in require if getattr(config, s) is None]
    if missing:
        raise ConfigError(f"{where}: {missing[0]}: missing section; expected a '{missing[0]}:' mapping")
    return config


def to_yaml(config: BaseModel) -> str:
    """The config as YAML that :func:`load_config` reads back to an equal config."""
    data = config.model_dump(mode="json", exclude_none=True)
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=None)


def digest(section: BaseModel) -> str:
    """SHA-256 (hex, 16 chars) of a section's canonical JSON: identifies a dataset/run."""
    text = json.dumps(section.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]
