"""Reconstruction of experimental micrographs (stemnet.reconstruct).

Exactness of the pieces is tested with fixed Keras models built here (tiling = one pass,
TTA inverse transforms, calibration, intensity rule); the whole pipeline with a real
model, trained in a fixture on simulated data, on a specimen it never saw (other pixel
size, larger field, shot noise), read from TIFF, HyperSpy, EMD and .npy.
"""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

from stemnet import reconstruct as R
from stemnet.cli import cli
from stemnet.errors import UserError
from stemnet.reconstruct import outputs as reconstruct_outputs
from stemnet.reconstruct import parse_channel_map, read_images, unit_to_ang

REPO = Path(__file__).resolve().parents[1]
CHANNELS = ["haadf", "abf"]
A_ANG = 3.905
TRAIN_PIXEL = 7.81 / 16  # tiny_stem: 16 px over two SrTiO3 cells
# The trained fixture: tiny_stem with a cheaper detector/sampling (HAADF 40-100 mrad
# allows 0.08 Å multislice sampling) and a narrower prior (a0a0c+, A fixed), so that a
# tiny model learns displacements from 56 training samples in ~20 s on 2 cores.
SIM_OVERRIDES = [
    "simulation.num_samples=64",
    "simulation.splits={train: 0.875, val: 0.0625, test: 0.0625}",
    "simulation.sampling_ang=0.08",
    "simulation.stem.detectors={haadf: [40.0, 100.0], abf: [10.0, 20.0]}",
    "simulation.specimen.thickness_cells=[2,2]",
    "simulation.distortion.glazer=[a0a0c+]",
    "simulation.distortion.tilt_deg=[0.0,10.0]",
    "simulation.distortion.polar_A_ang=0.0",
]
TRAIN_OVERRIDES = ["train.steps=600", "train.learning_rate=0.01", "train.head_weights.displacement=30",
                   "train.val_every=100000", "train.checkpoint_every=100000"]


def invoke(*args):
    """`stemnet reconstruct ARGS` through the real click command (exceptions kept for asserts)."""
    return CliRunner().invoke(cli, ["reconstruct", *map(str, args)], catch_exceptions=True)


# --------------------------------------------------------------------------- helpers
def signal(data, title, scale, units, nav=0):
    """A rosettasciio signal dictionary (for its writers)."""
    names = ["channel"] * nav + ["y", "x"]
    axes = [dict(name=n, size=s, scale=(1.0 if i < nav else scale), offset=0.0,
                 units=(None if i < nav else units), navigate=i < nav)
            for i, (n, s) in enumerate(zip(names, data.shape))]
    return dict(data=data, axes=axes, metadata={"General": {"title": title}, "Signal": {"signal_type": ""}},
                original_metadata={}, learning_results={}, models={}, attributes={"_lazy": False},
                package_info={"package": "", "package_version": ""}, tmp_parameters={})


def lattice_images(cells=4, pixel=0.4, b_shift=(0.0, 0.0), a=A_ANG, sigma=0.35, supercell=None, contrast=0.05,
                   rotation_deg=0.0):
    """Synthetic [001] perovskite HAADF + ABF (Gaussian columns): A bright, B dimmer, O in ABF.
    ``supercell`` "2x1" or "sqrt2": every other A column (along x, or in a checkerboard)
    ``contrast`` brighter, a weak superlattice as octahedral tilts or ordering give.
    ``rotation_deg``: the O columns moved as octahedra rotated about z by that angle,
    counter-clockwise around the B columns with (i + j) even, clockwise around the others."""
    n = int(round(cells * a / pixel))
    c = (np.arange(n) + 0.5) * pixel
    yy, xx = np.meshgrid(c, c, indexing="ij")
    haadf = np.zeros((n, n))
    abf = np.ones((n, n))
    for i in range(-1, cells + 1):
        for j in range(-1, cells + 1):
            bright = {"2x1": i % 2, "sqrt2": (i + j) % 2}.get(supercell, 0)
            # rotation θ about the B at ((i, j) + 0.75) a: an O at r from it moves θ (−r_y, r_x)
            turn = (-1) ** (i + j) * np.radians(rotation_deg) * a / 2
            sites = [((i + 0.25) * a, (j + 0.25) * a, 1.0 + contrast * bright, 0.2),
                     ((i + 0.75) * a + b_shift[0], (j + 0.75) * a + b_shift[1], 0.55, 0.2),
                     ((i + 0.75) * a + turn, (j + 0.25) * a, 0.0, 0.1), ((i + 0.25) * a, (j + 0.75) * a - turn, 0.0, 0.1)]
            for x0, y0, amp, dip in sites:
                g = np.exp(-((xx - x0) ** 2 + (yy - y0) ** 2) / (2 * sigma**2))
                haadf += amp * g
                abf -= dip * g
    return np.stack([0.004 * haadf, 0.7 * abf]).astype(np.float32)


# -------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def fake_run(tmp_path_factory):
    """A run folder with an exported, untrained tiny model (for everything but accuracy)."""
    from simulation.config import load_simulation
    from stemnet.config import load_config
    from stemnet.models import build_model
    from stemnet.train.run import save_run_files

    run = tmp_path_factory.mktemp("fake") / "run"
    cfg = load_config(REPO / "configs/training/tiny.yaml")
    info = {"input_field": "stem", "input_shape": [16, 16, 2], "output_shape": [16, 16],
            "targets": ["potential", "displacement"], "channels": {"potential": 1, "displacement": 9},
            "input_channels": CHANNELS, "fov_ang": 7.81, "pixel_size_ang": TRAIN_PIXEL, "energy_ev": 2e5,
            "materials": {"SrTiO3": {"A": "Sr", "B": "Ti", "X": "O", "a": A_ANG}}}
    norm = {"kind": "stem", "method": "standardize", "scale": 1.0, "channel_mean": [0.0011, 0.707],
            "channel_std": [0.0028, 0.04], "potential_mean": 225.0, "potential_std": 213.0}
    save_run_files(run, cfg, info, norm)
    model = build_model(cfg.model, (16, 16, 2), (16, 16))
    (run / "export").mkdir()
    model.save_weights(str(run / "export" / "weights.h5"))
    return run


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """tiny_stem (cheaper physics, see SIM_OVERRIDES) simulated, then a tiny model trained on it."""
    from simulation.generator import generate
    from simulation.config import load_simulation
    from stemnet.config import load_config
    from stemnet.train.loop import train

    root = tmp_path_factory.mktemp("trained")
    sim = load_simulation(REPO / "configs/simulation/tiny_stem.yaml", SIM_OVERRIDES)
    generate(sim, root / "data", workers=2, progress=False)
    cfg = load_config(REPO / "configs/training/tiny.yaml", TRAIN_OVERRIDES)
    train(cfg, root / "data", root / "run", progress=False)
    return root / "run", sim


@pytest.fixture(scope="module")
def unseen(trained_run):
    """A specimen the model never saw: 4x4-cell a0a0c+ 8°, B shifted 0.12 Å along x, imaged
    over three cells (11.7 Å, 24 px at the training sampling vs 16) at 0.404 Å pixels
    (training: 0.488 Å), with shot noise."""
    from simulation.multislice import add_poisson_noise, stem_images
    from simulation.structures import build_specimen, material_from_dict

    _, sim = trained_run
    spec = build_specimen(material_from_dict("SrTiO3", {"A": "Sr", "B": "Ti", "X": "O", "a": A_ANG}), 4, 2,
                          glazer="a0a0c+", tilt_deg=(0.0, 0.0, 8.0), polar_B_ang=(0.12, 0.0, 0.0))
    fov, n = 3 * A_ANG, 29
    mic = sim.microscope
    clean = stem_images(spec.atoms, energy_ev=mic.energy_ev, convergence_mrad=mic.convergence_mrad, shape=(n, n),
                        fov_ang=((0.0, 0.0), (fov, fov)), sampling_ang=sim.sampling_ang,
                        slice_thickness_ang=A_ANG / 2, detectors=dict(sim.stem.detectors))
    noisy = add_poisson_noise(clean, 1e6, (fov / n) ** 2, np.random.default_rng(7))
    return spec, noisy, fov / n


# ------------------------------------------------------------------------ unit tests
def test_units_and_channel_map():
    assert unit_to_ang("nm") == 10 and unit_to_ang("Å") == 1 and unit_to_ang("A") == 1
    assert unit_to_ang("angstrom") == 1 and unit_to_ang("pm") == 0.01 and unit_to_ang("µm") == 1e4
    assert unit_to_ang("\\u00C5") == 1 and unit_to_ang(None) is None and unit_to_ang("<undefined>") is None
    with pytest.raises(UserError, match="not a real-space length"):
        unit_to_ang("1 / nm")
    assert parse_channel_map("HAADF=a.dm4, abf=b.dm4") == {"haadf": Path("a.dm4"), "abf": Path("b.dm4")}
    with pytest.raises(UserError, match="NAME=FILE"):
        parse_channel_map("haadf")


def test_readers_and_calibration(tmp_path):
    import tifffile
    from rsciio.emd import file_writer as emd_writer
    from rsciio.hspy import file_writer as hspy_writer
    from rsciio.tiff import file_writer as tiff_writer

    img = lattice_images(cells=2)
    tiff_writer(str(tmp_path / "rs.tif"), signal(img[0], "HAADF", 0.04, "nm"))
    tifffile.imwrite(tmp_path / "ij.tif", img[1], imagej=True, resolution=(1 / 0.04, 1 / 0.04),
                     metadata={"unit": "nm"})
    hspy_writer(str(tmp_path / "stack.hspy"), signal(img, "stack", 0.4, "Å", nav=1), show_progressbar=False)
    emd_writer(str(tmp_path / "two.emd"), signal(img[0], "HAADF", 40.0, "pm"))
    with h5py.File(tmp_path / "two.emd", "a") as f:  # a second signal, as Velox/NCEM files have several
        f["signals"].copy("HAADF", "ABF Detector")
        f["signals/ABF Detector/data"][...] = img[1].T
    with h5py.File(tmp_path / "plain.h5", "w") as f:
        f.create_dataset("scan/images", data=img).attrs.update({"pixel_size": 0.4, "units": "Å"})
    np.savez(tmp_path / "two.npz", images=img, other=img[0])

    for name in ("rs.tif", "ij.tif"):
        (im,) = read_images(tmp_path / name)
        assert np.allclose(im.pixel_size_ang, (0.4, 0.4), rtol=1e-6), name
    stack = read_images(tmp_path / "stack.hspy")
    assert len(stack) == 2 and all(s.stacked for s in stack) and np.allclose(stack[0].pixel_size_ang, 0.4)
    emd = read_images(tmp_path / "two.emd")
    assert sorted(im.title for im in emd) == ["ABF Detector", "HAADF"]
    assert all(np.allclose(im.pixel_size_ang, 0.4) for im in emd)
    m = R.load_micrograph(tmp_path / "two.emd", CHANNELS)  # titles matched case-insensitively
    assert np.allclose(m.data, img, atol=1e-6) and m.calibration == "file"
    m = R.load_micrograph(tmp_path / "plain.h5", CHANNELS, dataset="/scan/images")
    assert np.allclose(m.data, img) and m.pixel_size_ang == (0.4, 0.4)
    m = R.load_micrograph(tmp_path / "two.npz", CHANNELS, dataset="images", pixel_size=0.4)
    assert m.calibration == "--pixel-size" and len(m.sources[0]["sha256"]) == 64
    m = R.load_micrograph({"haadf": tmp_path / "rs.tif", "abf": tmp_path / "ij.tif"}, CHANNELS)
    assert np.allclose(m.data, img, atol=1e-6)


INSTRUMENT = REPO / "tests" / "data" / "instrument"  # `make testdata` (tests/scripts/instrument_files.py)


@pytest.fixture(scope="module")
def instrument():
    if not (INSTRUMENT / "fei_emd_image.emd").is_file():
        pytest.fail(f"{INSTRUMENT}: real instrument files missing; run `make testdata`")
    return INSTRUMENT


def test_real_instrument_files(instrument):
    """Files written by microscope software, shipped by public packages (fetched by
    `make testdata`), read with their calibration and integer data types:
    - fei_emd_image.emd: a Velox EMD HAADF image (HyperSpy 1.7.6 wheel,
      hyperspy/tests/io/emd_files/fei_emd_files.zip; HyperSpy's test expects 0.00530241 µm);
    - test_STEM_image.dm3: a FEI Titan STEM image saved by DigitalMicrograph (hyperspy/tests/io/
      dm3_2D_data; 0.2485 nm pixels, uint32);
    - test_loading_image_saved_with_imageJ.tif / _with_DM.tif: TIFFs saved by ImageJ and by
      DigitalMicrograph (hyperspy/tests/io/tiff_files; HyperSpy's test expects 0.16867 µm);
    - dm{3,4}_test-N: 2x2 images of each integer type written by DigitalMicrograph
      (hyperspy/tests/io/dm{3,4}_2D_data/test-{1,6,7,9,10,11}, values [[1, 2], [3, 4]]);
    - epu2.9_example.mrc: an MRC image written by Thermo Fisher EPU 2.9 (mrcfile 1.5.4 sdist,
      tests/test_data; 4096x4096 uint16)."""
    (emd,) = read_images(instrument / "fei_emd_image.emd")  # select_type="images" (Velox)
    assert emd.title == "HAADF" and emd.data.shape == (512, 512) and emd.data.dtype == np.uint16
    assert np.allclose(emd.pixel_size_ang, 53.0241, rtol=1e-5)
    (dm,) = read_images(instrument / "test_STEM_image.dm3")
    assert dm.data.dtype == np.uint32 and np.allclose(dm.pixel_size_ang, 2.48538, rtol=1e-5)
    for name, dtype in (("imageJ", np.float32), ("DM", np.int32)):
        (tif,) = read_images(instrument / f"test_loading_image_saved_with_{name}.tif")
        assert tif.data.dtype == dtype and np.allclose(tif.pixel_size_ang, 1686.7, atol=0.1), name
    for n, dtype in ((1, np.int16), (6, np.uint8), (7, np.int32), (9, np.int8), (10, np.uint16), (11, np.uint32)):
        for v in (3, 4):
            (im,) = read_images(instrument / f"dm{v}_test-{n}.dm{v}")
            assert im.data.dtype == dtype and im.data.tolist() == [[1, 2], [3, 4]], (n, v)
    (mrc,) = read_images(instrument / "epu2.9_example.mrc")
    assert mrc.data.shape == (4096, 4096) and mrc.data.dtype == np.uint16
    assert np.allclose(mrc.pixel_size_ang, 0.66655, rtol=1e-4)
    m = R.load_micrograph(instrument / "fei_emd_image.emd", ["haadf"])  # a HAADF-only run takes it as is
    assert m.data.dtype == np.float64 and m.pixel_size_ang == pytest.approx((53.0241, 53.0241), rel=1e-5)
    assert m.sources[0]["dtype"] == "uint16" and m.calibration == "file"
    assert np.array_equal(m.data[0], emd.data.astype(np.float64))
    with pytest.raises(UserError, match="no image titled 'abf'"):  # a HAADF+ABF run lists what it expects
        R.load_micrograph(instrument / "fei_emd_image.emd", CHANNELS)


def test_resample_keeps_the_probe_band_and_removes_the_noise_above_it():
    """Shrinking a fine image keeps everything below the probe's transfer limit
    1/(2·Nyquist step): the result is the point samples of the band-limited image at the
    training pixels, aliasing included, as the simulation samples its training images.
    White noise above the limit goes: its variance falls to the band's share π·fc²·q²."""
    q, p, nyquist = 0.1, TRAIN_PIXEL, 0.3135  # fc = 1.59 / Å; the output's Nyquist is 1.02 / Å
    n = 240
    x = (np.arange(n) + 0.5) * q
    f = lambda y, x: np.cos(2 * np.pi * x / 0.8) + 0.5 * np.sin(2 * np.pi * y / 1.1)  # noqa: E731  1.25, 0.91 / Å
    out = R.resample(f(*np.meshgrid(x, x, indexing="ij"))[None], (q, q), p, nyquist_ang=nyquist)
    y = (np.arange(out.shape[1]) + 0.5) * p
    inner = (slice(4, -4), slice(4, -4))
    expected = f(*np.meshgrid(y, y, indexing="ij"))
    print(f"\nband-limited point samples: max error {np.abs(out[0] - expected)[inner].max():.4f} (amplitude 1)")
    assert np.abs(out[0] - expected)[inner].max() < 0.05  # a Gaussian anti-alias filter loses ~70 % of it
    noise = np.random.default_rng(0).normal(size=(1, n, n))
    share = float(R.resample(noise, (q, q), p, nyquist_ang=nyquist)[0][inner].var())
    print(f"noise variance kept {share:.4f}, expected {np.pi * (q / (2 * nyquist)) ** 2:.4f}")
    assert share == pytest.approx(np.pi * (q / (2 * nyquist)) ** 2, rel=0.15)


def test_resample_keeps_pixel_centres_and_intensity_rule():
    q, p = 0.4, TRAIN_PIXEL
    n = 60
    x = (np.arange(n) + 0.5) * q  # a smooth field sampled at pixel centres
    f = lambda y, x: np.cos(2 * np.pi * x / 3.3) + 0.5 * np.sin(2 * np.pi * y / 4.1)  # noqa: E731
    image = f(*np.meshgrid(x, x, indexing="ij"))[None]
    out = R.resample(image, (q, q), p)
    m = R.resampled_shape((n, n), (q, q), p)
    assert out.shape == (1,) + m == (1, 49, 49)
    y = (np.arange(m[0]) + 0.5) * p
    expected = f(*np.meshgrid(y, y, indexing="ij"))
    inner = (slice(3, -3), slice(3, -3))  # away from the mirrored border
    assert np.abs(out[0][inner] - expected[inner]).max() < 0.03  # half a pixel off would be ~0.5
    assert np.array_equal(R.resample(image, (p, p), p), image)  # already at the training sampling

    from stemnet.data import Normalization

    norm = Normalization("stem", "standardize", channel_mean=(0.0011, 0.707), channel_std=(0.0028, 0.04))
    img = lattice_images(cells=2).astype(np.float64)
    scaled = img * np.array([7.0, 0.3])[:, None, None] + np.array([100.0, -5.0])[:, None, None]
    a, b = R.match_intensity(img, norm), R.match_intensity(scaled, norm)
    assert np.allclose(a, b, atol=1e-4)  # detector gain and offset do not matter
    assert np.allclose(a.mean(axis=(0, 1)), 0, atol=1e-5) and np.allclose(a.std(axis=(0, 1)), 1, atol=1e-4)
    hot = img.copy()
    hot[0, 5, 5] = 1e3  # a hot pixel is clipped away: the rest of the image keeps its scale
    clean, spoilt = R.match_intensity(R.clip_outliers(img), norm), R.match_intensity(R.clip_outliers(hot), norm)
    spoilt[5, 5], clean[5, 5] = 0, 0
    assert np.abs(spoilt - clean).max() < 0.3
    assert np.abs(R.match_intensity(hot, norm)[..., 0] - a[..., 0]).max() > 5  # unclipped: scale ruined
    raw = R.match_intensity(img, norm, "raw")  # simulation units: the training normalisation only
    assert np.allclose(raw[..., 1], (img[1] - 0.707) / 0.04, atol=1e-4)


def _pointwise_model():
    import tensorflow as tf

    rng = np.random.default_rng(3)
    x = tf.keras.Input((None, None, 2))
    pot = tf.keras.layers.Conv2D(1, 1, name="p")(x)
    disp = tf.keras.layers.Conv2D(9, 1, name="d")(x)
    model = tf.keras.Model(x, {"potential": pot, "displacement": disp})
    for layer in ("p", "d"):
        k, b = model.get_layer(layer).get_weights()
        model.get_layer(layer).set_weights([rng.normal(size=k.shape), rng.normal(size=b.shape)])
    return model


def test_tiling_equals_single_pass():
    w = R.window(16)
    assert R.tile_stride(16) == 4 and R.OVERLAP == 4 and w.min() > 0
    quarter = w.reshape(4, 4)  # the four windows over a pixel, a quarter tile apart
    # the same weighted mean everywhere: weights summing to 2, squares to 3/2 (no seam)
    assert np.allclose(quarter.sum(axis=0), 2.0) and np.allclose((quarter ** 2).sum(axis=0), 1.5)
    assert R.tile_starts(40, 16) == list(range(0, 25, 4)) and R.tile_starts(43, 16)[-2:] == [24, 27]  # last flush
    predict = R.keras_predictor(_pointwise_model())
    rng = np.random.default_rng(0)
    for shape in ((37, 45), (16, 16), (12, 30), (16, 70)):
        image = rng.normal(size=shape + (2,)).astype(np.float32)
        tiled = R.predict_tiled(predict, image, (16, 16), batch_size=5)
        whole = R.predict_tiled(predict, image, None)
        for key in whole:
            assert tiled[key].shape == shape + whole[key].shape[-1:]
            assert np.abs(tiled[key] - whole[key]).max() < 1e-5, (shape, key)


def _gradient_model(constant=False):
    """potential = channel 0; B_dx, B_dy = the central-difference gradient of channel 0
    (D4-equivariant as a vector field), or a constant (1, 0) B displacement."""
    import tensorflow as tf

    x = tf.keras.Input((None, None, 2))
    first = tf.keras.layers.Lambda(lambda t: t[..., :1])(x)
    ddx = np.zeros((3, 3, 1, 1))
    ddx[1, 2, 0, 0], ddx[1, 0, 0, 0] = 0.5, -0.5
    kernel = np.zeros((3, 3, 1, 9))
    kernel[..., 3], kernel[..., 4] = ddx[..., 0], np.transpose(ddx, (1, 0, 2, 3))[..., 0]
    conv = tf.keras.layers.Conv2D(9, 3, padding="same", use_bias=True, name="grad")
    disp = conv(first)
    bias = np.zeros(9)
    if constant:
        kernel[:] = 0
        bias[3] = 1.0
    conv.set_weights([kernel, bias])
    return tf.keras.Model(x, {"potential": first, "displacement": disp})


def test_tta_inverse_transforms():
    for g in R.D4:
        assert R.d4_inverse(R.d4_inverse(g)) == g
    assert R.d4_inverse((1, 1, 0)) == (1, 0, 1)  # rot90 one way undoes rot90 the other way
    image = np.random.default_rng(1).normal(size=(13, 19, 2)).astype(np.float32)
    members = R.tta_members(R.keras_predictor(_gradient_model()), image, None)
    assert len(members) == 8 and len(R.tta_members(R.keras_predictor(_gradient_model()), image, None, tta=False)) == 1
    plain = members[0]  # identity element first
    for m in members[1:]:  # an equivariant model: every member maps back onto the plain prediction
        for key in plain:
            assert np.abs(m[key] - plain[key]).max() < 1e-5, key
    gy, gx = np.gradient(image[..., 0])
    assert np.allclose(plain["displacement"][1:-1, 1:-1, 3], gx[1:-1, 1:-1], atol=1e-5)
    assert np.allclose(plain["displacement"][1:-1, 1:-1, 4], gy[1:-1, 1:-1], atol=1e-5)
    # a constant vector (1, 0) is not invariant: the 8 members carry it to ±x (4) and ±y (4)
    const = R.tta_members(R.keras_predictor(_gradient_model(constant=True)), image, None)
    d = np.stack([m["displacement"] for m in const])
    assert np.allclose(d.mean(axis=0), 0, atol=1e-6)
    assert np.allclose(d.std(axis=0)[..., 3], np.sqrt(0.5)) and np.allclose(d.std(axis=0)[..., 4], np.sqrt(0.5))
    assert sorted(np.round(d[:, 0, 0, 3]).tolist()) == [-1, -1, 0, 0, 0, 0, 1, 1]


def test_fundamental_basis_undoes_supercells_but_keeps_weak_fundamentals():
    """Peak lists: half-order spots (2a × a, √2a × √2a) holding 1 % of the power give way to
    the fundamental reflections; (100) spots weaker than (110) but holding 20 % are kept."""
    from stemnet.reconstruct.lattice import fundamental_basis

    def peaks(spots):
        ks = np.array([[h * s, k * s] for (h, k), _ in spots for s in (1, -1)], float) / 10
        return ks, np.array([p for _, p in spots for _ in (1, -1)], float)

    fundamental = [((1, 0), 5.0), ((0, 1), 5.0), ((1, 1), 9.0), ((1, -1), 9.0), ((2, 0), 2.0), ((0, 2), 2.0)]
    for extra in ([((0.5, 0), 0.3), ((1.5, 0), 0.2)], [((0.5, 0.5), 0.2), ((0.5, -0.5), 0.2)]):
        g = fundamental_basis(*peaks(fundamental + extra))
        assert abs(abs(np.linalg.det(g)) - 0.01) < 1e-9, extra  # the cell of the (100), (010) reflections
    g = fundamental_basis(*peaks(fundamental))
    assert sorted(np.round(np.linalg.norm(g, axis=1), 6)) == [0.1, 0.1]  # not the centred (110) lattice
    # the shortest spot is a weak one off every half order (a tilt superlattice seen through a
    # shear: the shipped demo micrograph's HAADF, a 6.2 x 4.4 Å cell at 61° before), with
    # the (1, -1) spots 3 % off their lattice (a centroid on a noisy spectrum): the (100),
    # (010) cell
    for odd in ([((0.6, 0.35), 0.3)], [((0.5, 0.25), 0.3), ((0.25, 0.5), 0.3)]):
        ks, power = peaks(fundamental + odd)
        ks[6:8] *= [1.03, 0.97]  # the (1, -1) pair
        g = fundamental_basis(ks, power)
        assert abs(abs(np.linalg.det(g)) - 0.01) < 1e-9 and np.allclose(np.linalg.norm(g, axis=1), 0.1), odd
    assert fundamental_basis(np.array([[0.1, 0], [-0.1, 0], [0.2, 0]]), np.ones(3)) is None  # collinear


@pytest.mark.parametrize("supercell", ["2x1", "sqrt2"])
def test_fft_lattice_is_the_perovskite_cell_under_a_superlattice(supercell):
    """Half-order reflections (every other A column 30 % brighter; the two shortest spots
    gave a 2a × a or √2a × √2a cell before) are the shortest spots of the spectrum; the
    lattice found is still the perovskite's a."""
    pixel = 0.1
    img = lattice_images(cells=8, pixel=pixel, supercell=supercell, contrast=0.3)
    basis = R.fft_basis(img[0])
    assert np.allclose(np.linalg.norm(basis, axis=1) * pixel, A_ANG, rtol=0.005)
    spec = np.abs(np.fft.fft2(img[0] - img[0].mean()))
    half = (4, 0) if supercell == "2x1" else (4, 4)  # 8 cells: the half-order spot is 4 bins out
    assert spec[half[1], half[0]] > 0.08 * spec.max()  # the superlattice is there to be seen


@pytest.mark.parametrize("pixel", [0.1, TRAIN_PIXEL])
def test_columns_on_a_synthetic_lattice(pixel):
    """FFT lattice, Gaussian fits, sublattices by Z contrast, O on the ABF, polarisation:
    a B shift of (0.15, −0.05) Å is recovered to 1 pm at 0.1 Å and at the run's 0.49 Å pixels."""
    img = lattice_images(cells=6, pixel=pixel, b_shift=(0.15, -0.05))
    basis = R.fft_basis(img[0])
    assert np.allclose(np.linalg.norm(basis, axis=1) * pixel, A_ANG, rtol=0.005)
    found, lattice = R.find_lattice_columns(img[0], abf=img[1])
    assert abs(lattice.a_px * pixel - A_ANG) < 0.005 and abs(lattice.angle_deg - 90) < 0.1
    sub = found["sublattice"]
    assert (sub == 0).sum() >= 16 and (sub == 1).sum() >= 16 and (sub == 2).sum() >= 32
    assert found["amplitude"][sub == 0].mean() > found["amplitude"][sub == 1].mean()  # A brighter (Sr > Ti)
    found_swapped, _ = R.find_lattice_columns(img[0], a_is_brighter=False)  # Z(A) < Z(B): the roles swap
    assert found_swapped["amplitude"][found_swapped["sublattice"] == 0].mean() < \
        found_swapped["amplitude"][found_swapped["sublattice"] == 1].mean()
    zero = {"displacement": np.zeros((8, 8, 9)), "potential": np.zeros((8, 8, 1))}
    table, summary = R.column_statistics(found, lattice, pixel, zero, zero, TRAIN_PIXEL)
    on_b = table["sublattice"] == 1
    assert np.allclose(np.nanmean(table["fit_dx_ang"][on_b]), 0.15, atol=0.01)
    assert np.allclose(np.nanmean(table["fit_dy_ang"][on_b]), -0.05, atol=0.01)
    assert abs(summary["mean_pol_fit_x_pm"] - 15) < 1 and abs(summary["mean_pol_fit_y_pm"] + 5) < 1
    assert np.nanmax(np.abs(table["fit_dx_ang"][table["sublattice"] == 0])) < 0.01
    assert summary["O"]["count"] >= 32 and summary["tilt_deg"] == 0.0


def test_tilt_about_z_from_the_fitted_O_columns():
    """Octahedra rotated 6° about z in a checkerboard (a0a0c+ seen along it): the fitted O
    positions around each B give ±6° (to 0.2°), the sign alternating from cell to cell; the
    network's estimate (zero maps here) gives 0."""
    pixel = 0.1
    img = lattice_images(cells=6, pixel=pixel, rotation_deg=6.0)
    found, lattice = R.find_lattice_columns(img[0], abf=img[1])
    zero = {"displacement": np.zeros((8, 8, 9)), "potential": np.zeros((8, 8, 1))}
    table, summary = R.column_statistics(found, lattice, pixel, zero, zero, TRAIN_PIXEL)
    b = np.flatnonzero((table["sublattice"] == 1) & np.isfinite(table["tilt_z_deg_from_O_fit"]))
    assert len(b) >= 16
    fit = table["tilt_z_deg_from_O_fit"][b]
    assert np.allclose(np.abs(fit), 6.0, atol=0.2), fit
    # neighbouring cells (one lattice step apart) turn the opposite way
    u, v = np.floor(table["u"][b]).astype(int), np.floor(table["v"][b]).astype(int)  # B at (u + ½, v + ½)
    parity = (u + v) % 2
    assert len(set(np.sign(fit[parity == 0]))) == 1 and len(set(np.sign(fit[parity == 1]))) == 1
    assert np.sign(fit[parity == 0][0]) == -np.sign(fit[parity == 1][0])
    assert abs(summary["mean_abs_tilt_z_deg_from_O_fit"] - 6.0) < 0.2
    assert np.allclose(table["tilt_z_deg_from_O"][b], 0.0)


def test_one_peak_finder_everywhere():
    """evaluate and stage find column centres with the same scikit-image peak finder."""
    import stemnet.evaluate as E
    import stemnet.stage as S

    assert E.find_peaks is R.find_peaks and S.find_peaks is R.find_peaks
    m = np.zeros((12, 12))
    m[3, 4], m[11, 0], m[6, 6] = 1.0, 0.9, 0.3
    assert R.find_peaks(m, 1, 0.5).tolist() == [[3, 4], [11, 0]]
    assert sorted(R.find_peaks(m, 1, 0.5, wrap=True).tolist()) == [[3, 4], [11, 0]]
    fit = R.fit_gaussians(lattice_images(cells=2, pixel=0.1)[0], np.array([[8.0, 10.5]]), 5, 3.5)
    assert np.allclose(fit[0, :2], [0.25 * A_ANG / 0.1 - 0.5, 0.25 * A_ANG / 0.1 - 0.5], atol=0.01)


# ---------------------------------------------------------------------- bad inputs
def test_bad_inputs_fail_in_one_line_without_output(fake_run, tmp_path):
    img = lattice_images(cells=4)
    np.save(tmp_path / "ok.npy", img)
    nan = img.copy()
    nan[1, 3, 4] = np.nan
    np.save(tmp_path / "nan.npy", nan)
    np.save(tmp_path / "four_d.npy", np.zeros((2, 2, 8, 8)))
    np.save(tmp_path / "one.npy", img[0])
    np.save(tmp_path / "three.npy", np.concatenate([img, img[:1]]))
    np.save(tmp_path / "tiny.npy", img[:, :18, :18])  # 7.2 Å: less than two cells
    np.save(tmp_path / "const.npy", np.stack([img[0], np.full_like(img[1], 0.7)]))
    np.save(tmp_path / "big_cell.npy", lattice_images(cells=4, a=4.4))  # +13 %: no trained material
    np.save(tmp_path / "noise.npy", np.random.default_rng(0).normal(size=img.shape))
    (tmp_path / "junk.dm4").write_bytes(b"not a DigitalMicrograph file" * 10)
    (tmp_path / "img.xyz").write_text("?")
    nofinal = tmp_path / "unfinished"
    nofinal.mkdir()
    for name in ("config.yaml", "data.json", "normalization.json"):
        (nofinal / name).write_bytes((fake_run / name).read_bytes())
    cases = [
        ((fake_run, tmp_path / "junk.dm4", "--pixel-size", 0.4), "cannot read as DM"),
        ((fake_run, tmp_path / "img.xyz"), "unknown image format"),
        ((fake_run, tmp_path / "four_d.npy", "--pixel-size", 0.4), "4-D array"),
        ((fake_run, tmp_path / "ok.npy"), "no pixel-size calibration"),
        ((fake_run, tmp_path / "nan.npy", "--pixel-size", 0.4), "NaN/Inf"),
        ((fake_run, tmp_path / "one.npy", "--pixel-size", 0.4), "expects channels"),
        ((fake_run, tmp_path / "three.npy", "--pixel-size", 0.4), "a 3-D stack of 3 images; the run expects 2 planes (C, H, W) in the order ['haadf', 'abf']"),
        ((fake_run, "--channels", f"haadf={tmp_path / 'one.npy'},bf={tmp_path / 'one.npy'}",
          "--pixel-size", 0.4), "missing ['abf']"),
        ((fake_run, tmp_path / "ok.npy", "--pixel-size", 0.7), "0.7 Å (y) is coarser than this run can "
                                                                "reconstruct: expected at most 0.6102 Å"),
        ((fake_run, tmp_path / "tiny.npy", "--pixel-size", 0.4), "covers 7.2×7.2 Å; expected at least 2 unit cells"),
        ((fake_run, tmp_path / "const.npy", "--pixel-size", 0.4), "channel 'abf' is constant"),
        ((fake_run, tmp_path / "big_cell.npy", "--pixel-size", 0.4), "lattice parameter 4.400 Å, expected 3.905 Å"),
        ((fake_run, tmp_path / "noise.npy", "--pixel-size", 0.4), "lattice"),
        ((fake_run, "--channels", f"haadf={tmp_path / 'three.npy'},abf={tmp_path / 'one.npy'}", "--pixel-size", 0.4),
         "a 3-D stack of 3 images for channel 'haadf'; expected one 2-D image"),
        ((nofinal, tmp_path / "ok.npy", "--pixel-size", 0.4), "weights.h5 missing"),
        ((fake_run, tmp_path / "missing.npy"), "no such file"),
    ]
    for args, expected in cases:
        out = tmp_path / "out"
        result = invoke(*args, "--out", out, "--no-progress")
        assert isinstance(result.exception, UserError), (args, result.output, result.exception)
        message = str(result.exception)
        assert expected in message and "\n" not in message, (expected, message)
        assert not out.exists() or not any(out.iterdir()), message


def test_fill_nan_cli_and_hspy_layout(fake_run, tmp_path):
    from rsciio.hspy import file_reader

    img = lattice_images(cells=5, pixel=0.6)
    img[0, 10, 10] = np.inf
    path = tmp_path / "scan.npy"
    np.save(path, img)
    result = invoke(fake_run, path, "--pixel-size", 0.6, "--fill-nan", "--out", tmp_path / "out", "--no-progress")
    assert result.exit_code == 0, (result.output, result.exception)
    line = result.output.strip()
    assert "\n" not in line and line.startswith("scan: 19.5×19.5 Å at 0.488 Å/px") and "tilt" in line
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["scan.hspy", "scan.png", "scan_columns.csv"]
    signals = {d["metadata"]["General"]["title"]: d for d in file_reader(str(tmp_path / "out/scan.hspy"))}
    assert set(signals) == {"input", "potential", "potential_std", "displacement", "displacement_std"}
    disp = signals["displacement"]
    assert disp["data"].shape == (9, 40, 40) and [a["units"] for a in disp["axes"][1:]] == ["Å", "Å"]
    assert np.isclose(disp["axes"][2]["scale"], TRAIN_PIXEL) and disp["axes"][0]["navigate"]
    assert signals["potential"]["data"].shape == (40, 40) and signals["input"]["data"].shape == (2, 40, 40)
    with h5py.File(tmp_path / "out/scan.hspy") as f:
        prov = f["stemnet"].attrs
        assert prov["filled_nonfinite_pixels"] == 1 and prov["stemnet_version"]
        assert R.sha256(path) in prov["inputs"] and str(fake_run.resolve()) == prov["run"]
        cols = f["stemnet/columns"]
        assert set(np.unique(cols["sublattice"][()])) == {0, 1, 2} and len(cols["x_ang"]) > 30
        table = np.genfromtxt(tmp_path / "out/scan_columns.csv", delimiter=",", names=True)
        assert np.allclose(table["x_ang"], cols["x_ang"][()], rtol=1e-5)  # the CSV holds the same table
        assert np.allclose(table["dx_ang"], cols["dx_ang"][()], rtol=1e-4, atol=1e-9)
        for key in ("fit_dx_ang", "pol_net_x_pm", "tilt_z_deg_from_O", "std_dx_ang", "ideal_x_ang"):
            assert key in cols, key
        assert prov["forced"] == 0 and "lattice_check" in prov


def test_failed_write_leaves_nothing(tmp_path, monkeypatch):
    maps = {"potential": np.ones((8, 8, 1), np.float32), "displacement": np.zeros((8, 8, 9), np.float32)}
    rec = R.Reconstruction("x", 0.5, np.ones((2, 8, 8)), maps, maps, {"x_ang": np.zeros(1)}, {"a": 1.0},
                           {"channels": CHANNELS})
    R.write_hspy(tmp_path / "ok.hspy", rec)
    calls = []

    def fail_late(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise OSError("disk full")
        return real(*args, **kwargs)

    real = reconstruct_outputs._write_signal
    monkeypatch.setattr(reconstruct_outputs, "_write_signal", fail_late)
    with pytest.raises(OSError, match="disk full"):
        R.write_hspy(tmp_path / "bad.hspy", rec)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ok.hspy"]


# ----------------------------------------------------------------------- round trip
@pytest.mark.slow
def test_round_trip_on_unseen_specimen(trained_run, unseen, tmp_path):
    """Four file formats, one reconstruction; displacements at the true column sites
    beat the zero baseline: all channels together RMSE < 0.75 × zero, the O tilt
    columns < 0.6 × zero, and the tilt estimate within 8° ± 4°."""
    from rsciio.emd import file_writer as emd_writer
    from rsciio.hspy import file_writer as hspy_writer
    from rsciio.tiff import file_writer as tiff_writer
    from rsciio.hspy import file_reader
    from simulation.labels import column_maps, find_columns
    from stemnet.evaluate import column_rmse

    run, sim = trained_run
    spec, noisy, pixel = unseen
    np.save(tmp_path / "npy.npy", noisy)
    tiff_writer(str(tmp_path / "h.tif"), signal(noisy[0], "HAADF", pixel / 10, "nm"))
    tiff_writer(str(tmp_path / "a.tif"), signal(noisy[1], "ABF", pixel / 10, "nm"))
    hspy_writer(str(tmp_path / "hspy.hspy"), signal(noisy, "stack", pixel, "Å", nav=1), show_progressbar=False)
    emd_writer(str(tmp_path / "emd.emd"), signal(noisy[0], "HAADF", pixel, "Å"))
    with h5py.File(tmp_path / "emd.emd", "a") as f:
        f["signals"].copy("HAADF", "ABF")
        f["signals/ABF/data"][...] = noisy[1].T
    result = invoke(run, tmp_path / "npy.npy", "--pixel-size", pixel, "--out", tmp_path / "cli", "--no-progress")
    assert result.exit_code == 0, (result.output, result.exception)
    assert result.output.startswith("npy: 11.7×11.7 Å at 0.488 Å/px; columns A ")
    written = {d["metadata"]["General"]["title"]: d["data"] for d in file_reader(str(tmp_path / "cli/npy.hspy"))}
    recs = [r for r, _ in R.reconstruct_files(run, [tmp_path / "hspy.hspy", tmp_path / "emd.emd"], tmp_path / "out")]
    recs += [r for r, _ in R.reconstruct_files(run, out=tmp_path / "out", plot=False,
                                               channels=f"haadf={tmp_path / 'h.tif'},abf={tmp_path / 'a.tif'}")]
    for rec in recs:  # same pixels, same calibration: the same reconstruction whatever the format
        assert np.abs(np.moveaxis(rec.maps["displacement"], -1, 0) - written["displacement"]).max() < 1e-4
        assert np.abs(rec.spread["potential"][..., 0] - written["potential_std"]).max() < 1e-2
    reference = recs[0]

    h, w = reference.input.shape[1:]
    assert (h, w) == (24, 24)  # 11.7 Å at the training sampling: larger than the 16 px tile
    cell = tuple(np.diag(spec.atoms.cell.array)[:2])
    disp, mask = column_maps(find_columns(spec), cell_ang=cell, fov_ang=w * TRAIN_PIXEL, shape=(h, w),
                             sigma_ang=sim.label_sigma_ang)
    truth = np.moveaxis(disp, 0, -1)[None]
    mask = np.repeat(np.moveaxis(mask, 0, -1), 3, axis=-1)[None]
    pred = reference.maps["displacement"][None]
    model, zero = column_rmse(truth, pred, mask), column_rmse(truth, 0 * pred, mask)
    total = lambda d: float(np.sqrt(np.mean(np.square(list(d.values())))))  # noqa: E731
    o_model = np.hypot(model["O_dx"], model["O_dy"])
    o_zero = np.hypot(zero["O_dx"], zero["O_dy"])
    print(f"\nround trip: displacement RMSE model {total(model):.4f} Å, zero baseline {total(zero):.4f} Å; "
          f"O in-plane {o_model:.4f} vs {o_zero:.4f} Å; tilt {reference.summary['tilt_deg']:.2f}° "
          f"± {reference.summary['tilt_spread_deg']:.2f}° (truth 8°)")
    assert total(model) < 0.75 * total(zero)
    assert o_model < 0.6 * o_zero
    assert abs(reference.summary["tilt_deg"] - 8.0) < 4.0
    assert reference.summary["A"]["count"] >= 4 and reference.summary["O"]["count"] >= 8
    assert np.all(reference.spread["displacement"] >= 0) and reference.spread["displacement"].max() > 0


# ------------------------------------------------------------- HAADF-only run, seams
HAADF_OVERRIDES = [o for o in SIM_OVERRIDES if not o.startswith(("simulation.stem.detectors", "simulation.num_samples",
                                                                 "simulation.splits"))] + [
    "simulation.stem.detectors={haadf: [40.0, 100.0]}", "simulation.num_samples=48",
    "simulation.splits={train: 0.75, val: 0.125, test: 0.125}", "simulation.seed=99"]


@pytest.fixture(scope="module")
def haadf_run(tmp_path_factory):
    """A run trained on the HAADF detector only (tiny_stem, HAADF_OVERRIDES)."""
    from simulation.generator import generate
    from simulation.config import load_simulation
    from stemnet.config import load_config
    from stemnet.train.loop import train

    root = tmp_path_factory.mktemp("haadf")
    sim = load_simulation(REPO / "configs/simulation/tiny_stem.yaml", HAADF_OVERRIDES)
    generate(sim, root / "data", workers=2, progress=False)
    cfg = load_config(REPO / "configs/training/tiny.yaml", TRAIN_OVERRIDES[:1] + ["train.steps=400"] + TRAIN_OVERRIDES[2:])
    train(cfg, root / "data", root / "run", progress=False)
    return root / "run", root / "data", sim


@pytest.fixture(scope="module")
def crystal(haadf_run):
    """A periodic 4x4-cell specimen (a0a0c+ 8°, B shifted (0.12, −0.06) Å) imaged on HAADF
    over the whole supercell at the run's 0.488 Å pixels (32 px), with its truth maps."""
    from simulation.labels import column_maps, find_columns
    from simulation.multislice import stem_images
    from simulation.structures import build_specimen, material_from_dict

    _, _, sim = haadf_run
    spec = build_specimen(material_from_dict("SrTiO3", {"A": "Sr", "B": "Ti", "X": "O", "a": A_ANG}), 4, 2,
                          glazer="a0a0c+", tilt_deg=(0.0, 0.0, 8.0), polar_B_ang=(0.12, -0.06, 0.0))
    fov, n = float(spec.atoms.cell[0, 0]), 32  # the tilted cell (a·cos 8° per cell): 0.483 Å pixels
    mic = sim.microscope
    image = stem_images(spec.atoms, energy_ev=mic.energy_ev, convergence_mrad=mic.convergence_mrad, shape=(n, n),
                        fov_ang=((0.0, 0.0), (fov, fov)), sampling_ang=sim.sampling_ang,
                        slice_thickness_ang=A_ANG / 2, detectors=dict(sim.stem.detectors))
    disp, mask = column_maps(find_columns(spec), cell_ang=(fov, fov), fov_ang=fov, shape=(n, n),
                             sigma_ang=sim.label_sigma_ang)
    return image, fov / n, np.moveaxis(disp, 0, -1), np.moveaxis(mask, 0, -1), spec


@pytest.mark.slow
def test_haadf_only_run_on_a_five_times_finer_image(haadf_run, crystal, tmp_path):
    """A HAADF-only run reconstructs a single-detector image sampled 5x finer than its
    training (0.097 Å, from a Nyquist scan's Fourier series): columns fitted at the native
    sampling (B polarisation within 3 pm of the true (12, −6) pm), the network's input the
    band-limited image at the run's pixels (within 2 %); --channels lists what it expects."""
    from simulation.imaging import evaluate, nyquist_step_ang, spectrum
    from simulation.multislice import stem_images

    run, _, sim = haadf_run
    image, pixel, truth, mask, spec = crystal
    # a scan at the probe's Nyquist step or finer (50 px: 0.309 Å) holds the whole band-limited
    # image; its Fourier series gives it exactly at any pixel centres (simulation.imaging)
    mic = sim.microscope
    fov = float(spec.atoms.cell[0, 0])
    scan = stem_images(spec.atoms, energy_ev=mic.energy_ev, convergence_mrad=mic.convergence_mrad, shape=(50, 50),
                       fov_ang=((0.0, 0.0), (fov, fov)), sampling_ang=sim.sampling_ang,
                       slice_thickness_ang=A_ANG / 2, detectors=dict(sim.stem.detectors))[0]
    assert fov / 50 <= nyquist_step_ang(mic.energy_ev, mic.convergence_mrad)
    at_centres = lambda n, step: np.stack(np.meshgrid(*[(np.arange(n) + 0.5) * step] * 2, indexing="xy"), -1)  # noqa: E731
    fine = evaluate(spectrum(scan), (fov, fov), at_centres(160, fov / 160))  # 5x finer than the crystal's pixels
    np.save(tmp_path / "fine.npy", fine.astype(np.float32))
    result = invoke(run, tmp_path / "fine.npy", "--pixel-size", pixel / 5, "--out", tmp_path / "out", "--no-progress")
    assert result.exit_code == 0, (result.output, result.exception)
    with h5py.File(tmp_path / "out/fine.hspy") as f:
        assert f["Experiments/input/data"].shape == (1, 31, 31)  # 15.47 Å at the run's 0.488 Å sampling
        cols = {k: f["stemnet/columns"][k][()] for k in f["stemnet/columns"]}
    b = cols["sublattice"] == 1
    assert b.sum() >= 9 and (cols["sublattice"] == 0).sum() >= 9
    pol = np.nanmean(cols["pol_fit_x_pm"][b]), np.nanmean(cols["pol_fit_y_pm"][b])
    print(f"\nHAADF-only, 5x finer: Gaussian-fit polarisation ({pol[0]:.1f}, {pol[1]:.1f}) pm (truth 12, -6)")
    assert abs(pol[0] - 12) < 3 and abs(pol[1] + 6) < 3
    rec, _ = R.reconstruct_files(run, [tmp_path / "fine.npy"], tmp_path / "again", pixel_size=pixel / 5, plot=False)[0]
    # the downsampling is faithful: the network's input is the band-limited image sampled
    # at the run's pixel centres (as the simulation samples its training images)
    exact = evaluate(spectrum(scan), (fov, fov), at_centres(31, TRAIN_PIXEL))
    assert rec.input.shape == (1, 31, 31)
    rel = float(np.sqrt(np.mean((rec.input[0] - exact) ** 2)) / exact.std())
    print(f"network input vs the band-limited image at the run's pixels: RMS difference {rel:.4f} of its std")
    assert rel < 0.02
    result = invoke(run, "--channels", f"haadf={tmp_path / 'fine.npy'},abf={tmp_path / 'fine.npy'}",
                    "--pixel-size", 0.1, "--out", tmp_path / "bad", "--no-progress")
    assert "the run expects channels ['haadf']; unknown ['abf']" in str(result.exception)
    assert not (tmp_path / "bad").exists()


@pytest.mark.slow
def test_no_seams(haadf_run, crystal):
    """Translating the input by half and by a quarter of a tile changes the maps by less
    than the ensemble spread; the error at tile borders is no larger than elsewhere
    (ratio <= 1.2) on a crystal twice the tile."""
    from stemnet.data import Normalization
    from stemnet.reconstruct.pipeline import run_info
    from stemnet.train.run import load_run

    run, _, _ = haadf_run
    image, pixel, truth, mask, spec = crystal
    info, norm = run_info(run)
    norm = Normalization.from_dict(norm)
    model, *_ = load_run(run)
    predict = R.keras_predictor(model)
    x = R.match_intensity(image, norm)
    tile = tuple(info["input_shape"][:2])
    assert tile == (16, 16) and x.shape[:2] == (32, 32)

    def ensemble(img):
        members = [norm.denormalize(m)["displacement"] for m in R.tta_members(predict, img, tile)]
        return np.mean(members, axis=0), np.std(members, axis=0)

    mean, spread = ensemble(x)
    inner = (slice(4, -4), slice(4, -4))
    for shift in (8, 4):  # the specimen is periodic: rolling the image translates the crystal
        moved, _ = ensemble(np.roll(x, (shift, shift), axis=(0, 1)))
        back = np.roll(moved, (-shift, -shift), axis=(0, 1))
        change = float(np.abs(back - mean)[inner].mean())
        print(f"\nshift {shift} px: mean |change| {change:.4f} Å vs mean spread {float(spread[inner].mean()):.4f} Å")
        assert change < float(spread[inner].mean())
    # Seam ratio: every column is seen at a tile border for some translations of the input
    # and inside a tile for others, so comparing the same columns in both positions
    # measures the tiling alone (not which columns happen to lie on the tile grid).
    centres = np.repeat(mask >= 0.5, 3, axis=-1)
    k = np.arange(32)
    border_sum, border_n = np.zeros_like(truth), np.zeros_like(truth)
    inside_sum, inside_n = np.zeros_like(truth), np.zeros_like(truth)
    stride = R.tile_stride(tile[0])  # a tile starts every 4 px
    for shift in range(stride):  # every phase of the tile grid
        moved, _ = ensemble(np.roll(x, (shift, shift), axis=(0, 1))) if shift else (mean, None)
        err = np.abs(np.roll(moved, (-shift, -shift), axis=(0, 1)) - truth)  # (H, W, 9)
        near = np.isin((k + shift) % stride, (0, stride - 1))  # a tile's first or last pixel
        at_border = np.broadcast_to((near[:, None] | near[None, :])[..., None], err.shape)
        border_sum += err * at_border
        border_n += at_border
        inside_sum += err * ~at_border
        inside_n += ~at_border
    both = centres & (border_n > 0) & (inside_n > 0)
    ratio = float((border_sum[both] / border_n[both]).mean() / (inside_sum[both] / inside_n[both]).mean())
    print(f"seam ratio (error of the same columns at tile borders / inside tiles) {ratio:.3f}")
    assert ratio <= 1.2


@pytest.mark.slow
def test_uncertainty_calibrated_on_validation(haadf_run, crystal, tmp_path):
    """The variance scale fitted on the validation split gives 68 % coverage there, is
    reported with the held-out test split's coverage, and scales the column uncertainties."""
    from stemnet.reconstruct.calibration import ensemble_on_samples

    run, data, _ = haadf_run
    image, pixel, _, _, _ = crystal
    np.save(tmp_path / "img.npy", image)
    before, _ = R.reconstruct_files(run, [tmp_path / "img.npy"], tmp_path / "a", pixel_size=pixel, plot=False)[0]
    result = R.calibrate_uncertainty(run, data, "val")
    try:
        scale = result["variance_scale"]
        assert 0.6 <= result["coverage_scaled"] <= 0.75 and result["values"] > 50
        held_out = ensemble_on_samples(run, data, "test")
        t, m, s = held_out["displacement_t"], held_out["displacement_m"], held_out["displacement_s"]
        raw, scaled = R.coverage(t, m, s), R.coverage(t, m, scale * s)
        print(f"\nvariance scale {scale:.2f}: 1-sigma coverage on the test split {raw:.1%} raw -> {scaled:.1%} "
              f"(validation {result['coverage_raw']:.1%} -> {result['coverage_scaled']:.1%})")
        assert 0.45 <= scaled <= 0.9
        after, _ = R.reconstruct_files(run, [tmp_path / "img.npy"], tmp_path / "b", pixel_size=pixel, plot=False)[0]
        per = result["variance_scale_per_sublattice"]  # what reconstruction applies, A, B and O each
        assert after.summary["variance_scale"] == pytest.approx(per) and len(set(per.values())) == 3
        factor = np.array([per[n] for n in R.SUBLATTICES])[after.columns["sublattice"]]
        assert np.allclose(after.columns["std_dx_ang"], factor * before.columns["std_dx_ang"], rtol=1e-5)
        sub = held_out["displacement_sub"]
        for k, name in enumerate(R.SUBLATTICES):
            assert result["coverage_scaled_per_sublattice"][name] == pytest.approx(0.683, abs=0.03), name
            on = sub == k
            print(f"{name}: scale {per[name]:.2f}, test split coverage {R.coverage(t[on], m[on], per[name] * s[on]):.1%}")
        assert after.summary["spread_vs_validation"] > 0
    finally:
        (run / "uncertainty.json").unlink(missing_ok=True)  # the other tests use the uncalibrated run



@pytest.mark.slow
def test_uncertainty_calibrated_on_realistic_micrographs(haadf_run):
    """``micrographs=1``: the variance scale is the 68.3 % quantile of |error|/spread over a
    realistic micrograph inside the training draws, reconstructed as a user's file is (the
    same micrograph again for the same seed; not the split's samples, which give only the
    reference spread); it is what reconstruction then applies."""
    from stemnet.reconstruct.calibration import ensemble_on_micrographs, ensemble_on_samples, variance_scale

    run, data, _ = haadf_run
    try:
        result = R.calibrate_uncertainty(run, data, "val", micrographs=1, seed=5)
        scale = result["variance_scale"]
        assert result["micrographs"] == 1 and "micrographs" in result["method"] and result["values"] > 100
        assert json.loads((run / "uncertainty.json").read_text())["variance_scale"] == pytest.approx(scale)
        v = ensemble_on_micrographs(run, data, 1, seed=5)
        t, m, s = v["displacement_t"], v["displacement_m"], v["displacement_s"]
        assert t.size == result["values"] and scale == pytest.approx(variance_scale(t, m, s))
        assert R.coverage(t, m, scale * s) == pytest.approx(0.683, abs=0.02)
        sub = v["displacement_sub"]
        assert set(np.unique(sub)) == {0, 1, 2} and sub.size == t.size
        per = result["variance_scale_per_sublattice"]
        for k, name in enumerate(R.SUBLATTICES):  # each sublattice's own 68.3 % quantile
            on = sub == k
            assert per[name] == pytest.approx(variance_scale(t[on], m[on], s[on])), name
            assert R.coverage(t[on], m[on], per[name] * s[on]) == pytest.approx(0.683, abs=0.03), name
        split = ensemble_on_samples(run, data, "val")
        assert result["val_spread_ang"] == pytest.approx(float(np.median(split["displacement_s"])))
        assert scale != pytest.approx(variance_scale(split["displacement_t"], split["displacement_m"],
                                                     split["displacement_s"]), rel=1e-3)
        other = ensemble_on_micrographs(run, data, 1, seed=6)
        t, m, s = other["displacement_t"], other["displacement_m"], other["displacement_s"]
        print(f"\nvariance scale {scale:.2f} from one micrograph; on another: {R.coverage(t, m, s):.1%} raw, "
              f"{R.coverage(t, m, scale * s):.1%} scaled (split raw {result['split_coverage_raw']:.1%})")
    finally:
        (run / "uncertainty.json").unlink(missing_ok=True)  # the other tests use the uncalibrated run

def test_tilt_transforms_as_an_axial_vector():
    """Tilt angles (about x, y, z) under the 8 symmetries: rotations keep the tilt about z,
    mirrors flip it; in-plane components turn with the vectors; each inverse undoes it."""
    from stemnet.data import d4_vectors

    t = np.array([1.0, 2.0, 3.0])
    for g in R.D4:
        det = (-1) ** sum(g)  # transpose and each mirror have det -1
        moved = R.tilt_vectors(t, g)
        assert moved[2] == det * 3.0, g
        assert np.allclose(R.tilt_vectors(moved, R.d4_inverse(g)), t), g
        d = d4_vectors(np.array([0, 0, 0, 1.0, 2.0, 0, 0, 0, 0]), g)[3:5]  # a polar (dx, dy)
        assert np.allclose(moved[:2], det * d), g  # an axial vector turns like a polar one, times det


def test_tta_members_agree_on_tilt_magnitudes_of_an_equivariant_predictor():
    """The tilt head predicts |angle| per axis (stemnet.data.tilt_target), which a symmetry
    only permutes. A predictor equivariant by construction (tilt about x: |∂I/∂y|, about y:
    |∂I/∂x|, about z: I) gives eight members that agree once mapped back; mapping magnitudes
    back as signed axial vectors would negate the mirrored members' maps."""
    rng = np.random.default_rng(3)
    image = rng.normal(size=(12, 12, 1)).astype(np.float32)

    def predict(batch):
        gy = np.abs(np.diff(batch[..., 0], axis=1, prepend=0.0) + np.diff(batch[..., 0], axis=1, append=0.0))
        gx = np.abs(np.diff(batch[..., 0], axis=2, prepend=0.0) + np.diff(batch[..., 0], axis=2, append=0.0))
        return {"tilt": np.stack([gy, gx, batch[..., 0]], axis=-1)}

    members = R.tta_members(predict, image, None)
    assert len(members) == 8
    for member in members[1:]:
        np.testing.assert_allclose(member["tilt"], members[0]["tilt"], atol=1e-5)
    np.testing.assert_allclose(members[0]["tilt"], predict(image[None])["tilt"][0], atol=1e-6)  # identity first
