"""Shipped configs, job templates and the demo micrograph: by name, from a checkout and
from an installed wheel (outside the checkout)."""

import os
import subprocess
import sys
import venv
from pathlib import Path

import pytest

from stemnet.errors import UserError
from stemnet.shipped import copy_config, resolve_config, shipped_config, shipped_configs, shipped_dir

REPO = Path(__file__).resolve().parents[1]


def test_names_resolve_to_the_shipped_files(tmp_path):
    assert shipped_dir("configs") == REPO / "configs"  # a checkout: the repository folders
    assert shipped_dir("jobs") == REPO / "jobs" and (shipped_dir("micrograph") / "haadf.hspy").is_file()
    listed = shipped_configs()
    assert listed["training"] == ["demo", "tiny"] and "summit" in listed["machines"]
    assert resolve_config("demo", ("training",)) == REPO / "configs/training/demo.yaml"
    assert resolve_config("demo", ("simulation",)) == REPO / "configs/simulation/demo.yaml"
    assert shipped_config("model/tiny") == REPO / "configs/model/tiny.yaml"
    own = tmp_path / "demo"
    own.write_text("train: {}\n")
    assert resolve_config(str(own), ("training",)) == own  # an existing file wins over a name
    with pytest.raises(UserError, match="nope: no such file or shipped config; expected .*training/demo"):
        resolve_config("nope", ("training",))
    copied = copy_config("training/tiny", tmp_path)
    assert copied.read_text() == (REPO / "configs/training/tiny.yaml").read_text()
    with pytest.raises(UserError, match="already exists"):
        copy_config("training/tiny", tmp_path)


@pytest.mark.slow
def test_wheel_runs_outside_the_checkout(tmp_path):
    """``pip wheel`` of the project, installed into a fresh venv that sees the shared
    venv's dependencies, runs config list/copy, submit --dry-run, scaling --machine
    summit and the demo's configs from a folder outside the checkout."""
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(wheels),
                    str(REPO)], check=True, capture_output=True, timeout=600)
    wheel = next(wheels.glob("stemnet-*.whl"))
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(system_site_packages=False, with_pip=False).create(env_dir)
    python = env_dir / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import site; print(site.getsitepackages()[0])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    shared = subprocess.run([sys.executable, "-c", "import site; print(site.getsitepackages()[0])"],
                            check=True, capture_output=True, text=True).stdout.strip()
    Path(site, "shared-deps.pth").write_text(shared + "\n")  # the dependencies, not stemnet
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--target", site, str(wheel)],
                   check=True, capture_output=True, timeout=600)
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    def run(*args):
        cmd = [str(python), "-m", "stemnet.cli", *args]
        return subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=600)

    where = subprocess.run(
        [str(python), "-c", "import stemnet, stemnet.shipped as s; print(stemnet.__file__); print(s.shipped_dir('jobs'))"],
        cwd=work, env=env, capture_output=True, text=True, timeout=120)
    assert where.returncode == 0, where.stderr
    module, jobs = where.stdout.split()
    assert str(REPO) not in module and jobs.startswith(site)
    listed = run("config", "list")
    assert listed.returncode == 0 and "summit" in listed.stdout and site in listed.stdout, listed.stderr
    copied = run("config", "copy", "training/tiny", "mine.yaml")
    assert copied.returncode == 0 and (work / "mine.yaml").is_file(), copied.stderr
    (work / "data").mkdir()
    (work / "data" / "manifest.json").write_text("{}")  # submit only checks that it is there
    dry = run("submit", "train", "--machine", "summit", "--nodes", "2", "--walltime", "01:00", "--project", "MAT1",
              "--config", "tiny", "--data", str(work / "data"), "--out", str(work / "run"), "--dry-run")
    assert dry.returncode == 0 and "#BSUB" in dry.stdout and "jsrun" in dry.stdout, dry.stderr[-800:]
    scaling = run("scaling", "--model", "demo", "--machine", "summit", "--gpus", "6,96")
    assert scaling.returncode == 0 and "96" in scaling.stdout, scaling.stderr[-800:]
    demo = subprocess.run([str(python), "-c", "from stemnet.demo import _configs, MICROGRAPH; _configs(True); "
                           "assert (MICROGRAPH / 'haadf.hspy').is_file(); print(MICROGRAPH)"],
                          cwd=work, env=env, capture_output=True, text=True, timeout=300)
    assert demo.returncode == 0 and demo.stdout.strip().startswith(site), demo.stderr[-800:]
