"""Bad input writes nothing: each refusal is a one-line error before --out is created, and
the corrected command then succeeds in the same --out without --overwrite."""

import subprocess
import sys

import pytest

from conftest import TINY_SIMULATION, TINY_TRAINING

STEMNET = [sys.executable, "-m", "stemnet.cli"]
SMALL = ["-o", "simulation.num_samples=4"]  # 2 train, 1 val, 1 test: the corrected rerun stays short


def run(*args, timeout=600):
    return subprocess.run(STEMNET + list(args), capture_output=True, text=True, timeout=timeout)


def one_line_error(proc, *words):
    assert proc.returncode == 2, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    for word in words:
        assert word in last, last
    return last


def test_simulate_refusal_writes_nothing_and_the_corrected_rerun_succeeds(tmp_path):
    out = tmp_path / "data"
    bad = run("simulate", "--config", str(TINY_SIMULATION), "--out", str(out), "--no-progress", *SMALL,
              "-o", "simulation.cbed.k=4096")
    one_line_error(bad, "k=4096")
    assert not out.exists()
    good = run("simulate", "--config", str(TINY_SIMULATION), "--out", str(out), "--no-progress", *SMALL)
    assert good.returncode == 0, good.stderr[-3000:]
    assert (out / "manifest.json").is_file() and "simulated 4 new of 4 samples" in good.stdout


def test_simulate_into_an_uncreatable_folder_is_a_one_line_error(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder\n")
    bad = run("simulate", "--config", str(TINY_SIMULATION), "--out", str(blocker / "data"), "--no-progress", *SMALL)
    one_line_error(bad, str(blocker / "data"))
    assert blocker.read_text() == "not a folder\n"


@pytest.mark.parametrize("override,words", [
    ("model.heads.displacement=6", ["model.heads.displacement", "expected 9"]),
    ("data.targets=[potential]", ["model.heads.displacement", "data.targets"]),
])
def test_train_refusal_writes_nothing_and_the_corrected_rerun_succeeds(tiny_dataset, tmp_path, override, words):
    from stemnet.config import load_config
    from stemnet.errors import UserError
    from stemnet.train.loop import train

    out = tmp_path / "run"
    with pytest.raises(UserError) as err:
        train(load_config(TINY_TRAINING, [override], require=("model", "train")), tiny_dataset, out, progress=False)
    assert all(word in str(err.value) for word in words) and "\n" not in str(err.value)
    assert not out.exists()
    good = train(load_config(TINY_TRAINING, ["train.steps=2"], require=("model", "train")), tiny_dataset, out,
                 progress=False)
    assert good["steps"] == 2 and good["finished"] and (out / "export" / "weights.h5").is_file()


def test_train_on_a_missing_dataset_writes_nothing(tmp_path):
    from stemnet.config import load_config
    from stemnet.errors import UserError
    from stemnet.train.loop import train

    with pytest.raises(UserError, match="manifest"):
        train(load_config(TINY_TRAINING, require=("model", "train")), tmp_path / "no-data", tmp_path / "run",
              progress=False)
    assert not (tmp_path / "run").exists()


def test_train_into_an_uncreatable_folder_is_a_one_line_error(tiny_dataset, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    bad = run("train", "--config", str(TINY_TRAINING), "--data", str(tiny_dataset), "--out", str(blocker / "run"),
              "--no-progress", "-o", "train.steps=1")
    one_line_error(bad, str(blocker / "run"))
