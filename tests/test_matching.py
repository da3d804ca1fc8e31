"""`stemnet config match`: a simulation config matched to a micrograph, the source of each
value, one-line errors naming the missing options. Real instrument files from
`make testdata` (HyperSpy 1.7.6's test data: a Velox EMD HAADF image, DM3 files)."""

import subprocess
import sys

import numpy as np
import pytest
import yaml

from simulation.matching import file_metadata, match
from simulation.config import SimulationConfig, load_simulation
from stemnet.errors import UserError

from conftest import REPO

INSTRUMENT = REPO / "tests" / "data" / "instrument"
STEMNET = [sys.executable, "-m", "stemnet.cli"]


@pytest.fixture(scope="module")
def instrument():
    if not (INSTRUMENT / "fei_emd_image.emd").is_file():
        pytest.fail(f"{INSTRUMENT}: real instrument files missing; run `make testdata`")
    return INSTRUMENT


def write_hspy(folder, pixel_ang, energy_ev=None, convergence_mrad=None):
    """A HyperSpy file as a microscope program saves it (axes in nm, optional metadata)."""
    from simulation.micrograph import save_images

    image = np.random.default_rng(0).random((1, 40, 40))
    save_images(folder, {"haadf": None}, image, pixel_ang, energy_ev=energy_ev, convergence_mrad=convergence_mrad)
    return folder / "haadf.hspy"


def test_real_files_give_their_metadata(instrument):
    """rosettasciio's mapping of the original metadata: the beam energy of a Velox EMD and
    of a DigitalMicrograph file (both 200 kV; neither records the convergence angle)."""
    for name in ("fei_emd_image.emd", "test_STEM_image.dm3"):
        tem = file_metadata(instrument / name)["Acquisition_instrument"]["TEM"]
        assert tem["beam_energy"] == pytest.approx(200.0)
        assert "convergence_angle" not in tem
    with pytest.raises(UserError, match=r"test_STEM_image.dm3: not in the file's metadata: give "
                                        r"convergence_mrad MRAD, haadf_mrad INNER,OUTER"):
        match(instrument / "test_STEM_image.dm3", material="SrTiO3")
    # the energy comes from the file; the pixel (2.49 Å, a survey image) cannot resolve columns
    with pytest.raises(UserError, match=r"2\.485 Å pixels cannot resolve the atomic columns of SrTiO3"):
        match(instrument / "test_STEM_image.dm3", material="SrTiO3", convergence_mrad=20, detectors_mrad={"haadf": "60,200"})
    cfg, sources = match(instrument / "test_STEM_image.dm3", material="SrTiO3", convergence_mrad=20,
                         detectors_mrad={"haadf": "60,200"}, pixel_size_ang=0.1)
    assert cfg["simulation"]["microscope"]["energy_ev"] == 200e3
    assert sources["energy_ev"] == "file metadata (Acquisition_instrument.TEM.beam_energy)"
    assert sources["pixel_size_ang"] == "option --pixel-size"


def test_uncalibrated_file_asks_for_the_pixel_size(instrument):
    proc = subprocess.run(STEMNET + ["config", "match", str(instrument / "dm3_test-1.dm3"), "--material", "SrTiO3"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"error: {instrument / 'dm3_test-1.dm3'}: the image has no length calibration; give --pixel-size (Å per pixel)"]


def test_calibrated_file_with_metadata_gives_a_valid_matched_config(tmp_path):
    path = write_hspy(tmp_path, 0.09, energy_ev=300e3, convergence_mrad=24.0)
    out = tmp_path / "cfg.yaml"
    proc = subprocess.run(STEMNET + ["config", "match", str(path), "--material", "SrTiO3", "--haadf-mrad", "70,200",
                                     "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == out.read_text()
    assert "#   energy_ev: file metadata (Acquisition_instrument.TEM.beam_energy)" in proc.stdout
    assert "#   convergence_mrad: file metadata (Acquisition_instrument.TEM.convergence_angle)" in proc.stdout
    assert "#   detectors.haadf: option --haadf-mrad" in proc.stdout
    sim = load_simulation(out)
    assert sim.microscope.energy_ev == 300e3 and sim.microscope.convergence_mrad == 24.0
    assert sim.stem.detectors == {"haadf": (70.0, 200.0)}
    assert sim.output_shape == (88, 88) and sim.fov_ang == pytest.approx(88 * 0.09)  # >= 2 cells, 8 | pixels
    assert sim.fov_ang / sim.output_shape[0] == pytest.approx(0.09)
    assert sim.specimen.materials == ["SrTiO3"] and sim.scan_step_ang is None and not sim.undersampled_ok
    # the wave sampling carries the 200 mrad detector: lambda(300 keV) / (3 * 0.2) = 0.0328 Å
    assert sim.sampling_ang < 0.0197 / (3 * 0.2) * 1.0
    # an option overrides the file
    cfg, sources = match(path, material="SrTiO3", energy_kev=200, detectors_mrad={"haadf": "70,200"})
    assert cfg["simulation"]["microscope"]["energy_ev"] == 200e3 and sources["energy_ev"] == "option --energy-kev"
    SimulationConfig.model_validate(cfg["simulation"])


def test_calibrated_file_without_metadata_names_every_missing_option(tmp_path):
    path = write_hspy(tmp_path, 0.1)
    proc = subprocess.run(STEMNET + ["config", "match", str(path), "--material", "SrTiO3", "--out",
                                     str(tmp_path / "never.yaml")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and not (tmp_path / "never.yaml").exists()
    assert proc.stderr.strip().splitlines() == [
        f"error: {path}: not in the file's metadata: give --energy-kev KEV, --convergence-mrad MRAD, "
        "--haadf-mrad INNER,OUTER (and/or --abf-mrad, --bf-mrad)"]
    with pytest.raises(UserError, match=r"abf_mrad 20,10: expected 0 <= INNER < OUTER"):
        match(path, material="SrTiO3", energy_kev=200, convergence_mrad=20, detectors_mrad={"abf": "20,10"})
    cfg, sources = match(path, material="SrTiO3", energy_kev=200, convergence_mrad=20,
                         detectors_mrad={"haadf": "60,150", "abf": "10,20"})
    assert yaml.safe_load(yaml.safe_dump(cfg))["simulation"]["stem"]["detectors"] == {"haadf": [60.0, 150.0],
                                                                                       "abf": [10.0, 20.0]}
    assert sources["convergence_mrad"] == "option --convergence-mrad"
