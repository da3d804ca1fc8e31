"""Typed configuration: pydantic models, YAML files, dotted command-line overrides.

A config file is a YAML mapping of sections (``simulation``, ``model``, ``train``,
``data``, ``distributed``); a command asks for the sections it needs. ``model`` may be a
path to another YAML file (relative to the file naming it) whose ``model`` section is
used. Every error is a one-line :class:`ConfigError` naming the file (or the ``-o``
override), the dotted key, what was wrong and what was expected.

The ``simulation`` section belongs to the simulator: its schema is
``simulation.config.SimulationConfig``, and ``simulation.config.load_config`` validates
it (with this module's loader and messages, ``schema=SimulationFile``). Here it is an
opaque mapping: the library reads what a dataset recorded of it from the manifest
(:func:`stemnet.shards.simulation_section`), never the section itself.
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
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from stemnet.errors import UserError

PositiveInt = typing.Annotated[int, Field(gt=0)]
PositiveFloat = typing.Annotated[float, Field(gt=0)]
NonNegativeFloat = typing.Annotated[float, Field(ge=0)]
Fraction = typing.Annotated[float, Field(ge=0, le=1)]
# What a model can be trained to predict: the names of stemnet.data.layout.TARGETS (a test
# checks they agree; the config module does not import the data package)
Target = Literal["potential", "displacement", "tilt"]


class ConfigError(UserError, ValueError):
    """A configuration problem, as one line: ``where: key: what; expected what``."""


class Section(BaseModel):
    """Base of every config section: unknown keys are refused, assignments validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)


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
    heads: Dict[Target, PositiveInt] = Field(
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
    head_weights: Dict[Target, NonNegativeFloat] = Field(
        default_factory=lambda: {"potential": 1.0, "displacement": 1.0}
    )
    val_every: PositiveInt = 50
    checkpoint_every: PositiveInt = 50
    keep_checkpoints: PositiveInt = 3
    seed: int = 0
    record_batches: bool = False  # debug: RUN/batches-rank{r}.jsonl, per step the sample indices, lr, loss scale


class DataConfig(Section):
    """Input pipeline: targets, normalisation, augmentation."""

    targets: List[Target] = Field(
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

    simulation: Optional[Dict[str, Any]] = None  # the simulator's; validated by simulation.config
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
    schema: type = Config,
) -> Config:
    """Load, override and validate a config file.

    Parameters
    ----------
    path : YAML file of sections.
    overrides : ``"dotted.key=value"`` strings (values parsed as YAML), applied in order.
    require : sections the caller needs, e.g. ``("simulation",)``: a file without one is
        refused (``data`` and ``distributed`` always fall back to their defaults).
    schema : the root model validated, :class:`Config` or a subclass that types more of
        the file (``simulation.config.SimulationFile`` types the ``simulation`` section).
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
        config = schema.model_validate(data)
    except ValidationError as error:
        raise validation_error(error, where, applied, root=schema) from None
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
