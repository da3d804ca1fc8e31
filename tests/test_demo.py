"""The demo pipeline end to end (tiny configs), its comparison with the shipped
micrograph's truth, the shipped micrograph's calibration, and the README's commands exist."""

import csv
import json
import re
import shlex

import click
import numpy as np
import pytest

from stemnet.cli import cli
from stemnet.demo import run_demo

from conftest import REPO


@pytest.mark.slow
def test_tiny_demo_end_to_end(tmp_path):
    report = run_demo(tmp_path / "demo", tiny=True, workers=2, progress=False)
    text = report.read_text()
    assert text.startswith("# stemnet demo report (tiny configuration)")
    for figure in ("figures/evaluate.png", "figures/samples.png", "figures/truth.png", "reconstruction/haadf.png"):
        assert figure in text and (report.parent / figure).is_file(), figure
    rows = [line for line in text.splitlines() if line.startswith("model ") or line.startswith("zero ")]
    assert len(rows) == 2  # the metrics table holds the model and the baselines
    assert re.search(r"\| \*\*total\*\* \| \*\*\d+\.\d s\*\* \|", text)
    check_comparison(report.parent, text)
    # a rerun reuses everything: no shard, checkpoint or exported weight is written again
    kept = sorted(p for p in (tmp_path / "demo").glob("data/*/shard-*.lmdb")) + sorted(
        p for pattern in ("run/checkpoints/*", "run/export/*", "run/config.yaml") for p in (tmp_path / "demo").glob(pattern))
    assert len(kept) > 5

    def state():
        return {p: (p.stat().st_ino, p.stat().st_mtime_ns, p.read_bytes()) for p in kept}

    before = state()
    again = run_demo(tmp_path / "demo", tiny=True, workers=2, progress=False).read_text()
    assert again.startswith("# stemnet demo report (tiny configuration)")
    assert state() == before


def _table_row(text, start):
    (line,) = [ln for ln in text.splitlines() if ln.startswith(f"| {start}")]
    return [cell.strip() for cell in line.strip("|").split("|")][1:]


def check_comparison(root, text):
    """The report's numbers against ones recomputed here from the written column table
    and ``truth.npz`` alone: each column placed in the specimen at the probe position of
    its nearest pixel, matched to the nearest true column of its sublattice (periodic)."""
    from scipy.spatial import cKDTree

    from simulation.labels import find_columns
    from simulation.micrograph import realistic_specimen
    from stemnet.demo import MICROGRAPH

    with open(root / "reconstruction/haadf_columns.csv") as f:
        rows = list(csv.DictReader(f))
    c = {k: np.array([float(r[k]) for r in rows]) for k in rows[0]}
    z = np.load(MICROGRAPH / "truth.npz")
    desc = json.loads(str(z["description"]))
    spec = realistic_specimen(desc)
    t = find_columns(spec)
    t_d = t.displacement - t.displacement[t.sublattice == 0].mean(0)
    box = np.diag(spec.atoms.cell.array)[:2]
    p = desc["pixel_size_ang"]
    i = np.clip(np.round(c["ideal_y_ang"] / p - 0.5).astype(int), 0, desc["pixels"] - 1)
    j = np.clip(np.round(c["ideal_x_ang"] / p - 0.5).astype(int), 0, desc["pixels"] - 1)
    xy = np.mod(z["positions_ang"][i, j].astype(float), box) % box
    sub = c["sublattice"].astype(int)
    true_d = np.full((len(sub), 2), np.nan)
    for s in (0, 1):
        on, ton = np.flatnonzero(sub == s), np.flatnonzero(t.sublattice == s)
        d, k = cKDTree(np.mod(t.xy[ton], box) % box, boxsize=box).query(xy[on])
        ok = d < 0.25 * desc["a_ang"]
        true_d[on[ok]] = t_d[ton[k[ok]], :2]
    use = np.isfinite(true_d[:, 0]) & np.isfinite(c["fit_dx_ang"]) & np.isfinite(c["fit_dy_ang"])
    assert use.sum() >= 30
    net = 100 * np.sqrt(np.mean((np.column_stack([c["dx_ang"], c["dy_ang"]])[use] - true_d[use]) ** 2))
    fit = 100 * np.sqrt(np.mean((np.column_stack([c["fit_dx_ang"], c["fit_dy_ang"]])[use] - true_d[use]) ** 2))
    cells = _table_row(text, "in-plane displacement RMSE")
    assert float(cells[0]) == pytest.approx(net, abs=0.006) and float(cells[1]) == pytest.approx(fit, abs=0.006)
    assert f"{use.sum()} columns" in text
    # polarisation: the truth's mean is the specimen's B shift (A does not move); the network's the table's mean
    pol = _table_row(text, "polarisation, mean")
    assert pol[3] == f"({100 * desc['polar_B_ang'][0]:.1f}, {100 * desc['polar_B_ang'][1]:.1f})"
    b = (sub == 1) & np.isfinite(c["pol_net_x_pm"]) & np.isfinite(true_d[:, 0])
    assert pol[0] == f"({np.mean(c['pol_net_x_pm'][b]):.1f}, {np.mean(c['pol_net_y_pm'][b]):.1f})"
    # tilts: the tiny run has a tilt head; its MAE per axis and the zero baseline are numbers, the
    # zero baseline is the specimen's tilt magnitude (every cell of a-a-c+ is tilted by the full angle)
    for axis, angle in zip("xyz", desc["tilt_deg"]):
        row = _table_row(text, f"tilt about {axis}")
        assert float(row[2]) == pytest.approx(angle, abs=0.05), axis
        assert np.isfinite(float(row[0])), axis
    # the rotation about z read from the O columns around each B: a−a−c+ turns every cell by
    # the full angle about z in phase, so the zero baseline is that angle (sin θ in radians)
    row = _table_row(text, "tilt from the O columns, about z")
    assert float(row[2]) == pytest.approx(np.degrees(np.sin(np.radians(desc["tilt_deg"][2]))), abs=0.1)
    assert np.isfinite(float(row[0])) and np.isfinite(float(row[1]))
    values = json.loads((root / "comparison.json").read_text())
    assert values["dxdy_rmse_pm_network"] == pytest.approx(net, abs=1e-3)


def test_shipped_micrograph_is_realistic_and_calibrated():
    """The shipped micrograph, read by the reconstruction's own reader in both formats:
    at least 256 x 256 pixels of 0.09-0.1 Å, float32, its calibration intact in the EMD
    copy, small files, and a lattice the demo run trains on."""
    from stemnet.demo import MICROGRAPH
    from stemnet.reconstruct import read_images

    for name in ("haadf", "abf"):
        (hspy,) = read_images(MICROGRAPH / f"{name}.hspy")
        (emd,) = read_images(MICROGRAPH / f"{name}.emd")
        for image in (hspy, emd):
            assert min(image.data.shape) >= 256 and image.data.dtype == np.float32
            assert all(0.085 <= v <= 0.105 for v in image.pixel_size_ang), image.pixel_size_ang
        assert emd.pixel_size_ang == pytest.approx(hspy.pixel_size_ang, rel=1e-6)
        np.testing.assert_array_equal(emd.data, hspy.data)
    assert sum(f.stat().st_size for f in MICROGRAPH.iterdir()) < 3e6
    desc = json.loads(str(np.load(MICROGRAPH / "truth.npz")["description"]))
    assert desc["material"] in ("SrTiO3", "BaTiO3")
    assert abs(desc["lattice_ang"][0] / desc["a_ang"] - 1) < 0.05


def readme_commands():
    text = (REPO / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.S)
    return [line.strip() for block in blocks for line in block.splitlines() if line.strip()]


def make_targets():
    return set(re.findall(r"^([a-z][a-z-]*):", (REPO / "Makefile").read_text(), flags=re.M))


@pytest.mark.parametrize("line", readme_commands())
def test_readme_command_exists(line):
    """Every command in the README's code blocks: a make target, or a stemnet command
    whose options parse (nothing is run)."""
    words = shlex.split(line.split("#")[0])
    if words[0] == "make":
        assert words[1] in make_targets(), line
        return
    assert ".venv/bin/stemnet" in words, line
    args = words[words.index(".venv/bin/stemnet") + 1:]
    command = cli
    while isinstance(command, click.Group) and args and not args[0].startswith("-"):
        name, args = args[0], args[1:]
        assert name in command.commands, f"{line}: no sub-command {name!r}"
        command = command.commands[name]
    if args == ["--version"] or not args and isinstance(command, click.Group):
        return
    command.make_context(command.name, list(args))  # raises on unknown options or bad values
