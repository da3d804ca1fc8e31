"""Typed configs: loading, overrides, YAML round trip, and every one-line error."""

from pathlib import Path

import pytest

import simulation.config
from stemnet.config import ConfigError, load_config, to_yaml, parse_override

REPO = Path(__file__).resolve().parents[1]


def write(tmp_path, text, name="x.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_training_config_resolves_model_reference():
    cfg = load_config(REPO / "configs/training/tiny.yaml", require=("model", "train"))
    assert cfg.model.growth == 4
    assert cfg.model.layers_per_block == [2, 2]
    assert cfg.train.batch_size == 4
    assert cfg.distributed.grouping == "graph"


def test_overrides_are_typed_and_validated(tmp_path):
    path = write(tmp_path, "train: {batch_size: 4}\n")
    cfg = load_config(path, ["train.batch_size=8", "train.learning_rate=1e-4", "train.lars=true",
                             "model.layers_per_block=[3, 3]"])
    assert cfg.train.batch_size == 8 and isinstance(cfg.train.batch_size, int)
    assert cfg.train.learning_rate == pytest.approx(1e-4)
    assert cfg.train.lars is True
    assert cfg.model.layers_per_block == [3, 3]


def test_yaml_round_trip(tmp_path):
    cfg = load_config(REPO / "configs/training/tiny.yaml", ["train.steps=7"])
    again = load_config(write(tmp_path, to_yaml(cfg)))
    assert again == cfg
    assert again.train.steps == 7


def test_negative_batch_size_message(tmp_path):
    path = write(tmp_path, "train:\n  batch_size: -3\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value) == f"{path}: train.batch_size: expected a positive integer, got -3"


def test_wrong_type(tmp_path):
    path = write(tmp_path, "train:\n  learning_rate: fast\n")
    with pytest.raises(ConfigError, match=r"train\.learning_rate: expected a number, got 'fast'"):
        load_config(path)


def test_unknown_key_suggests(tmp_path):
    path = write(tmp_path, "train:\n  batch_sze: 4\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value) == f"{path}: train.batch_sze: unknown key; did you mean 'batch_size'?"


def test_unknown_nested_key_suggests(tmp_path):
    path = write(tmp_path, "simulation:\n  microscope:\n    energy_kev: 200\n")
    with pytest.raises(ConfigError, match=r"simulation\.microscope\.energy_kev: unknown key; did you mean 'energy_ev'\?"):
        simulation.config.load_config(path)


def test_unknown_section_suggests(tmp_path):
    path = write(tmp_path, "trian:\n  steps: 3\n")
    with pytest.raises(ConfigError, match=r"trian: unknown key; did you mean 'train'\?"):
        load_config(path)


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match=r"nope\.yaml: no such config file"):
        load_config(tmp_path / "nope.yaml")


def test_yaml_syntax_error_names_line(tmp_path):
    path = write(tmp_path, "train:\n  steps: [1, 2\n  batch_size: 3\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value).startswith(f"{path}: YAML syntax error at line")
    assert "\n" not in str(err.value)


def test_override_error_names_the_override(tmp_path):
    path = write(tmp_path, "train: {}\n")
    with pytest.raises(ConfigError) as err:
        load_config(path, ["train.batch_size=zero"])
    assert str(err.value) == "-o train.batch_size=zero: train.batch_size: expected an integer, got 'zero'"


def test_override_syntax():
    assert parse_override("a.b=[1, 2]") == (["a", "b"], [1, 2])
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        parse_override("train.batch_size")


def test_missing_required_section(tmp_path):
    path = write(tmp_path, "train: {}\n")
    with pytest.raises(ConfigError, match=r"simulation: missing section"):
        load_config(path, require=("simulation",))


def test_literal_choice(tmp_path):
    path = write(tmp_path, "train: {precision: float16}\n")
    with pytest.raises(ConfigError, match=r"train\.precision: expected one of 'float32', 'mixed_bfloat16' or 'mixed_float16'"):
        load_config(path)


def test_grouping_values(tmp_path):
    path = write(tmp_path, "distributed: {grouping: 'count:4'}\n")
    assert load_config(path).distributed.grouping == "count:4"
    with pytest.raises(ConfigError, match=r"distributed\.grouping: expected one of none, layer, graph, count:N"):
        load_config(path, ["distributed.grouping=count:0"])


def test_unknown_material_in_specimen(tmp_path):
    path = write(tmp_path, "simulation:\n  specimen: {materials: [SrTiO3, Unobtainium]}\n")
    with pytest.raises(ConfigError, match=r"simulation\.specimen\.materials: unknown material 'Unobtainium'"):
        simulation.config.load_config(path)


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*/*.yaml")), ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_shipped_config_validates(path):
    """Every config in configs/ loads; simulation/training/model files have their section and a comment."""
    if path.parent.name == "machines":
        from stemnet.hpc.machines import load_profile

        profile = load_profile(path.stem)  # both sections, validated
        assert profile.machine.name == path.stem and profile.network.gpus_per_node >= 1
        return
    if path.parent.name == "scaling":
        from stemnet.distributed.validate import load_point

        assert load_point(path).sources  # a published scaling point, every input with a source
        return
    section = {"simulation": "simulation", "training": "train", "model": "model"}[path.parent.name]
    cfg = simulation.config.load_config(path, require=(section,))  # every section typed
    assert getattr(cfg, section) is not None
    assert path.read_text().startswith("#"), f"{path}: first line should say what the config is for"
