"""The `stemnet` command: version, config show/validate, one-line errors, `info`."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from stemnet import __version__
from stemnet.cli import main

REPO = Path(__file__).resolve().parents[1]
STEMNET = [sys.executable, "-m", "stemnet.cli"]


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_version(capsys):
    code, out, _ = run(capsys, "--version")
    assert code == 0 and out.strip() == f"stemnet {__version__}"


def test_config_show_applies_overrides(capsys):
    code, out, err = run(capsys, "config", "show", str(REPO / "configs/training/tiny.yaml"),
                         "-o", "train.batch_size=16", "-o", "model.growth=6")
    assert code == 0, err
    shown = yaml.safe_load(out)
    assert shown["train"]["batch_size"] == 16
    assert shown["model"]["growth"] == 6
    assert shown["model"]["layers_per_block"] == [2, 2]  # resolved from ../model/tiny.yaml


def test_config_validate_ok(capsys):
    code, out, _ = run(capsys, "config", "validate", str(REPO / "configs/training/tiny.yaml"))
    assert code == 0
    assert out.strip().endswith("ok (model, train, data, distributed)")


def test_config_validate_error_is_one_line(capsys, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  batch_size: -3\n")
    code, out, err = run(capsys, "config", "validate", str(bad))
    assert code == 2 and out == ""
    assert err == f"error: {bad}: train.batch_size: expected a positive integer, got -3\n"


@pytest.mark.parametrize("argv,fragment", [
    (["config", "show"], "Missing argument 'FILE'"),
    (["nonsense"], "No such command 'nonsense'"),
    (["config", "show", "x.yaml", "--bogus"], "--bogus"),
])
def test_bad_arguments_give_one_line(capsys, argv, fragment):
    code, out, err = run(capsys, *argv)
    assert code == 2
    assert err.count("\n") == 1 and fragment in err and err.startswith("error: ")


def _info_fields():
    proc = subprocess.run(STEMNET + ["info"], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr
    fields = dict(line.split(":", 1) for line in proc.stdout.splitlines())
    return {k.strip(): v.strip() for k, v in fields.items()}


def test_info_reports_the_stack_and_backend():
    """`stemnet info` names the installed stack and the backend `auto` picks here."""
    import importlib.util

    import numpy

    fields = _info_fields()
    if importlib.util.find_spec("horovod") is not None:
        assert fields["stack"].startswith("pinned") and fields["backend"].startswith("horovod")
        assert numpy.__version__ < "2" and fields["abtem"] == "1.0.9"
    else:
        assert fields["stack"].startswith("modern") and fields["backend"].startswith("mwms (")
        assert numpy.__version__ >= "2" and fields["abtem"] == "1.0.11"
        assert int(fields["tensorflow"].split(".")[1]) >= 16 and fields["keras"].startswith("2.")
    assert fields["numpy"] == numpy.__version__


@pytest.mark.horovod
def test_info_reports_horovod_build():
    """`stemnet info` in a fresh process: TensorFlow 2.15 and Horovod built with TF + Gloo."""
    fields = _info_fields()
    assert fields["tensorflow"] == "2.15.1"
    assert fields["keras"].startswith("2.15")
    assert fields["horovod"] == "0.28.1"
    assert "TensorFlow" in fields["horovod frameworks"].split(", ")
    assert "Gloo" in fields["horovod controllers"].split(", ")
    assert fields["abtem"] == "1.0.9"
    assert int(fields["cpus"]) >= 1
    assert fields["bf16 (cpu)"] in ("yes", "no")
