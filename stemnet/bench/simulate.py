"""``bench simulate``: the CBED generator against a bare FFT multislice loop and naive
abTEM (imports ``simulation``, and so abTEM, only when it runs)."""

from __future__ import annotations

from stemnet.bench.common import rate, shipped


def bench_simulate(config=None, samples: int = 4, naive_grid=(2, 2)) -> dict:
    """CBED patterns/s of the generator vs a bare scipy.fft multislice loop and naive abTEM.

    All three run single-threaded in this process on the same specimen, grid and slices;
    the generator's rate includes the potential, the labels and the shard-ready arrays.
    The naive rate is per pattern on a ``naive_grid`` subset (one multislice call each).
    """
    from simulation import multislice
    from simulation.generator import draw_specimen, simulate_sample
    from stemnet.config import load_config

    config = config or shipped("simulation/bench.yaml")
    cfg = load_config(config, require=("simulation",)).simulation
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
    }
