"""``bench simulate``: the CBED generator against a bare FFT multislice loop and naive
abTEM, and STEM images by a Nyquist scan + Fourier interpolation against a direct fine
scan (imports ``simulation``, and so abTEM, only when it runs)."""

from __future__ import annotations

from stemnet.bench.common import rate, shipped


def bench_simulate(config=None, samples: int = 4, naive_grid=(2, 2), direct_pixel_ang: float = 0.1) -> dict:
    """CBED patterns/s of the generator vs a bare scipy.fft multislice loop and naive abTEM.

    All three run single-threaded in this process on the same specimen, grid and slices;
    the generator's rate includes the potential, the labels and the shard-ready arrays.
    The naive rate is per pattern on a ``naive_grid`` subset (one multislice call each).
    """
    from simulation import multislice
    from simulation.generator import draw_specimen, simulate_sample
    from simulation.config import load_simulation

    config = config or shipped("simulation/bench.yaml")
    cfg = load_simulation(config)
    gx, gy = cfg.cbed.grid
    specimen, _ = draw_specimen(cfg, 0)
    common = dict(energy_ev=cfg.microscope.energy_ev, convergence_mrad=cfg.microscope.convergence_mrad,
                  fov_ang=((0, 0), (cfg.fov_ang, cfg.fov_ang)), k=cfg.cbed.k,
                  max_angle_mrad=cfg.cbed.max_angle_mrad, sampling_ang=cfg.sampling_ang,
                  slice_thickness_ang=specimen.params["a"] / 2)
    simulate_sample(cfg, 0)  # warm-up: numba compilation, FFTW plans
    ours = rate(lambda: [simulate_sample(cfg, i) for i in range(samples)], samples * gx * gy, repeats=2)
    floor = rate(lambda: multislice.fft_floor_cbed(specimen.atoms, grid=(gx, gy), **common), gx * gy, repeats=2)
    nx, ny = naive_grid
    naive = rate(lambda: multislice.naive_abtem_cbed(specimen.atoms, grid=(nx, ny), **common), nx * ny, repeats=1)
    return {
        "config": str(config),
        "grid": [gx, gy], "k": cfg.cbed.k, "slices": int(round(specimen.params["m"] * 2)),
        "generator_patterns_per_s": ours,
        "fft_floor_patterns_per_s": floor,
        "naive_abtem_patterns_per_s": naive,
        "ratio_vs_fft_floor": ours / floor,
        "ratio_vs_naive_abtem": ours / naive,
        **bench_nyquist_vs_direct(direct_pixel_ang),
    }


def bench_nyquist_vs_direct(pixel_ang: float = 0.1, thickness_cells: int = 4) -> dict:
    """HAADF + ABF of one SrTiO3 cell (polar Ti, ``thickness_cells`` thick) at
    ``pixel_ang``: the probe scanned at its Nyquist step and the images Fourier-interpolated
    (:func:`simulation.stem.record`) against the probe scanned directly at ``pixel_ang``.
    The RMS difference is relative to the direct image's standard deviation (worst
    detector), before noise."""
    import numpy as np

    from simulation import imaging, multislice, stem
    from simulation.structures import Material, build_specimen

    spec = build_specimen(Material("SrTiO3", "Sr", "Ti", "O", 3.905), 1, thickness_cells, polar_B_ang=(0.12, -0.08, 0.0))
    cell = tuple(float(v) for v in np.diag(spec.atoms.cell.array)[:2])
    pixels = int(round(cell[0] / pixel_ang))
    kw = dict(energy_ev=200e3, convergence_mrad=20.0, sampling_ang=0.055, slice_thickness_ang=3.905 / 2,
              detectors={"haadf": (60.0, 150.0), "abf": (10.0, 20.0)})
    positions = imaging.pixel_positions((pixels, pixels), cell)
    nyquist = imaging.nyquist_step_ang(200e3, 20.0)
    out = {}

    def interpolated():
        out["nyquist"] = stem.record(spec.atoms, cell_ang=cell, positions_ang=positions, scan_step_ang=nyquist,
                                     draws={}, **kw)

    def direct():
        out["direct"] = multislice.stem_images(spec.atoms, shape=(pixels, pixels), fov_ang=((0, 0), cell), **kw)

    fast = rate(interpolated, 1, repeats=2)
    slow = rate(direct, 1, repeats=1)
    rms = np.sqrt(np.mean((out["nyquist"] - out["direct"]) ** 2, axis=(1, 2))) / out["direct"].std(axis=(1, 2))
    return {"nyquist_vs_direct_pixels": [pixels, pixels], "nyquist_vs_direct_pixel_ang": cell[0] / pixels,
            "nyquist_step_ang": nyquist, "ratio_nyquist_vs_direct": fast / slow,
            "nyquist_vs_direct_rms_rel": float(rms.max())}
