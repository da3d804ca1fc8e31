"""The dataset generator: sample i = f(seed, i) → shards, on any number of workers/ranks.

Writers
-------
``world`` ranks × ``workers`` processes give W writers; writer w = rank·workers + local
writes shard ``{split}/shard-{w:05d}.lmdb`` and simulates the samples of each split whose
position p in the split has p mod W = w, skipping every index already present in any
shard of that split (so a rerun resumes, even with another W). Rank 0 (or
``stemnet simulate --finalize``) writes the manifest once every index is present.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import shutil
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import lmdb
import numpy as np
import yaml
from tqdm import tqdm

from simulation import stem
from simulation.labels import column_maps, find_columns, tilt_map
from simulation.structures import build_specimen, draw_distortion, material_from_dict, parse_glazer
from stemnet import __version__
from simulation.config import SimulationConfig
from stemnet.config import digest
from stemnet.errors import UserError, argument
from stemnet.log import get_logger
from stemnet.shards import (
    MANIFEST_NAME,
    SPLITS,
    FieldSpec,
    ShardReader,
    ShardWriter,
    finalize_manifest,
    shard_path,
)

log = get_logger("simulate")
GENERATOR = "stemnet.simulation"
CONFIG_NAME = "simulation.yaml"
VECTOR_PARAMS = ("tilt_deg", "polar_A_ang", "polar_B_ang")


# ----------------------------------------------------------------------------- plan
def split_ranges(cfg: SimulationConfig) -> Dict[str, range]:
    """Contiguous global index ranges per split, sizes from the configured fractions."""
    n = cfg.num_samples
    bounds, start, acc = {}, 0, 0.0
    for split in SPLITS:
        acc += cfg.splits.get(split, 0.0)
        stop = n if split == SPLITS[-1] else int(round(acc * n))
        bounds[split] = range(start, stop)
        start = stop
    return bounds


def writer_indices(cfg: SimulationConfig, split: str, writer: int, writers: int) -> range:
    """The global indices of ``split`` that writer ``writer`` of ``writers`` simulates."""
    rng = split_ranges(cfg)[split]
    return rng[writer::writers]


def param_names(cfg: SimulationConfig) -> List[str]:
    """Names of the per-sample parameter vector (units in the names)."""
    names = ["material_index", "a_ang", "glazer_index"]
    for key in VECTOR_PARAMS:
        names += [f"{key}_{axis}" for axis in "xyz"]
    names += [
        "thickness_cells", "thickness_ang", "energy_ev", "convergence_mrad", "defocus_ang", "cs_ang",
        "offset_x_ang", "offset_y_ang",
    ]
    if cfg.mode == "stem":
        names += ["lattice_x_ang", "lattice_y_ang", "lattice_z_ang", "pixel_size_ang", "nyquist_step_ang",
                  "scan_step_x_ang", "scan_step_y_ang"]
    if cfg.imperfections is not None:
        names += list(stem.IMPERFECTION_PARAMS)
    return names


def sampling(cfg: SimulationConfig) -> dict:
    """Pixel size of images and label maps, the probe's Nyquist step and the scan step
    (Å) of a dataset -- or a one-line error for an aliased STEM scan (see
    :func:`simulation.stem.check_sampling`)."""
    return stem.check_sampling(cfg)


def fields(cfg: SimulationConfig) -> Dict[str, FieldSpec]:
    """Field name → shape/dtype of one sample (channels first)."""
    h, w = cfg.output_shape
    if cfg.mode == "cbed":
        gx, gy = cfg.cbed.grid
        inputs = FieldSpec((gx * gy, cfg.cbed.k, cfg.cbed.k), "<f4")
    else:
        inputs = FieldSpec((len(cfg.stem.detectors), h, w), "<f4")
    out = {
        cfg.mode: inputs,
        "potential": FieldSpec((1, h, w), "<f4"),
        "displacement": FieldSpec((9, h, w), "<f4"),
        "columns": FieldSpec((3, h, w), "<f4"),
    }
    if cfg.tilt_labels:
        out["tilt"] = FieldSpec((3, h, w), "<f4")
    return out


# --------------------------------------------------------------------------- sample
def _thickness_choices(cfg: SimulationConfig, glazer: str) -> List[int]:
    lo, hi = cfg.specimen.thickness_cells
    _, axes = parse_glazer(glazer)
    needs_even = any(sign == "-" for _, sign in axes) or any(s != "0" for _, s in axes[:2])
    choices = [m for m in range(lo, hi + 1) if not needs_even or m % 2 == 0]
    if not choices:
        raise UserError(
            f"simulation.specimen.thickness_cells: {[lo, hi]} holds no even thickness, "
            f"which Glazer system {glazer} needs for a periodic supercell"
        )
    return choices


def draw_specimen(cfg: SimulationConfig, index: int):
    """The specimen of sample ``index`` and the generator that draws the rest of it."""
    rng = np.random.default_rng([cfg.seed, index])
    names = cfg.specimen.materials
    material_index = int(rng.integers(len(names)))
    material = material_from_dict(names[material_index], cfg.materials[names[material_index]].model_dump())
    dist = cfg.distortion
    distortion = draw_distortion(
        rng,
        glazer_systems=dist.glazer,
        tilt_range_deg=dist.tilt_deg,
        polar_A_max_ang=dist.polar_A_ang,
        polar_B_max_ang=dist.polar_B_ang,
    )
    thickness = int(rng.choice(_thickness_choices(cfg, distortion["glazer"])))
    if dist.polar_in_plane:
        for key in ("polar_A_ang", "polar_B_ang"):
            distortion[key] = (distortion[key][0], distortion[key][1], 0.0)
    specimen = build_specimen(material, cfg.specimen.cells, thickness, zone=cfg.specimen.zone, **distortion)
    if dist.frame == "A":  # move the whole crystal so that the A sublattice sits on its ideal sites
        specimen.atoms.positions = specimen.atoms.positions - np.asarray(distortion["polar_A_ang"])
    if cfg.random_offset:
        specimen = translate(specimen, rng.uniform(0.0, material.a, size=2))
    return specimen, rng


def translate(specimen, shift_ang):
    """The same crystal moved by ``-shift_ang`` (x, y; Å), wrapped into its periodic cell:
    the field of view [0, fov) then starts at ``shift_ang`` of the original crystal."""
    from simulation.structures import Specimen

    cell = np.diag(specimen.atoms.cell.array)
    offset = np.array([shift_ang[0], shift_ang[1], 0.0])
    ideal = np.mod(specimen.ideal_positions - offset, cell)
    atoms = specimen.atoms.copy()
    atoms.positions = ideal + (specimen.atoms.positions - specimen.ideal_positions)
    params = dict(specimen.params, offset_ang=(float(shift_ang[0]), float(shift_ang[1])))
    return Specimen(atoms=atoms, ideal_positions=ideal, sublattice=specimen.sublattice, params=params,
                    octahedron_tilt_deg=specimen.octahedron_tilt_deg)


def slice_thickness_ang(specimen) -> float:
    """Half a (contracted) pseudo-cubic cell along the beam, Å: the atomic planes then sit
    between slice boundaries."""
    p = specimen.params
    lattice = p.get("lattice_ang", (p["a"],) * 3)
    return 0.5 * p["a"] * (lattice[2] if p.get("zone", "001") == "001" else lattice[0]) / p["a"]


def measure(cfg: SimulationConfig, specimen, rng: np.random.Generator) -> Dict[str, np.ndarray]:
    """Inputs (the configured measurement, with noise) and label maps of one specimen.

    The sample's drawn imperfections and sampling are added to ``specimen.params``
    (``imperfections``, ``sampling``).
    """
    from simulation import multislice  # abTEM is imported only where it is used

    phonon_seed = int(rng.integers(2**31))
    draws = stem.draw_imperfections(cfg.imperfections, rng)
    mic, dist = cfg.microscope, cfg.distortion
    slice_ang = slice_thickness_ang(specimen)
    fov = ((0.0, 0.0), (cfg.fov_ang, cfg.fov_ang))
    atoms = specimen.atoms
    if draws.get("amorphous_ang"):
        from simulation.specimen import add_amorphous_layer

        imp = cfg.imperfections
        atoms, draws["amorphous_ang"] = add_amorphous_layer(
            atoms, draws["amorphous_ang"], element=imp.amorphous_element,
            density_g_cm3=imp.amorphous_density_g_cm3, slice_ang=slice_ang, rng=rng)
    phonons = None
    if dist.phonon_rms_ang:
        phonons = {el: dist.phonon_rms_ang.get(el, 0.0) for el in set(atoms.get_chemical_symbols())}
    common = dict(sampling_ang=cfg.sampling_ang, slice_thickness_ang=slice_ang, phonon_rms_ang=phonons,
                  num_phonon_configs=dist.phonon_configs, seed=phonon_seed)
    probe = dict(energy_ev=mic.energy_ev, convergence_mrad=mic.convergence_mrad,
                 defocus_ang=mic.defocus_ang, cs_ang=mic.cs_ang)
    cell = tuple(np.diag(specimen.atoms.cell.array)[:2])
    positions = None
    if cfg.mode == "cbed":
        gx, gy = cfg.cbed.grid
        inputs = multislice.cbed_stack(atoms, grid=cfg.cbed.grid, fov_ang=fov, k=cfg.cbed.k,
                                       max_angle_mrad=cfg.cbed.max_angle_mrad, **probe, **common)
        pixel_area = (cfg.fov_ang / gx) * (cfg.fov_ang / gy)
        if cfg.noise_dose_e_per_ang2:
            inputs = multislice.add_poisson_noise(inputs, cfg.noise_dose_e_per_ang2, pixel_area, rng)
    else:
        grid = sampling(cfg)
        imp = cfg.imperfections
        positions = stem.scan_positions(cfg.output_shape, cfg.fov_ang, draws, rng=rng,
                                        flyback_decay_px=imp.flyback_decay_px if imp else 1.0)
        images = stem.record(atoms, cell_ang=cell, positions_ang=positions, scan_step_ang=grid["scan_step_ang"],
                             detectors=cfg.stem.detectors, draws=draws, method=cfg.stem.method,
                             focal_points=imp.focal_points if imp else 1, **probe, **common)
        pixel_area = (cfg.fov_ang / cfg.output_shape[0]) * (cfg.fov_ang / cfg.output_shape[1])
        inputs = stem.detect_all(images, draws, pixel_area_ang2=pixel_area,
                                 dose_e_per_ang2=cfg.noise_dose_e_per_ang2, rng=rng)
        scan = np.divide(cell, stem.imaging.scan_shape(cell, grid["scan_step_ang"])[::-1])
        specimen.params["sampling"] = dict(grid, scan_step_x_ang=float(scan[0]), scan_step_y_ang=float(scan[1]))
    specimen.params["imperfections"] = draws
    potential = multislice.projected_potential(specimen.atoms, shape=cfg.output_shape, fov_ang=fov,
                                               sampling_ang=cfg.sampling_ang, slice_thickness_ang=slice_ang,
                                               positions_ang=positions)
    displacement, columns = column_maps(find_columns(specimen), cell_ang=cell, fov_ang=cfg.fov_ang,
                                        shape=cfg.output_shape, sigma_ang=cfg.label_sigma_ang,
                                        positions_ang=positions)
    sample = {
        cfg.mode: np.asarray(inputs, np.float32),
        "potential": np.asarray(potential, np.float32),
        "displacement": displacement,
        "columns": columns,
    }
    if cfg.tilt_labels:
        where = positions if positions is not None else stem.imaging.pixel_positions(cfg.output_shape, cfg.fov_ang)
        sample["tilt"] = tilt_map(specimen, where)
    return sample


def simulate_sample(cfg: SimulationConfig, index: int) -> tuple:
    """Simulate sample ``index``: a pure function of (cfg.seed, index).

    Returns ``(sample, params)``: a dict of float32 arrays shaped as :func:`fields`, and
    the float64 parameter vector named by :func:`param_names`.
    """
    specimen, rng = draw_specimen(cfg, index)
    sample = measure(cfg, specimen, rng)
    p, mic = specimen.params, cfg.microscope
    glazer = [parse_glazer(g)[0] for g in cfg.distortion.glazer]
    values = [cfg.specimen.materials.index(p["material"]), p["a"], glazer.index(p["glazer"])]
    for key in VECTOR_PARAMS:
        values += list(np.broadcast_to(np.asarray(p[key], float), 3))
    values += [p["m"], float(specimen.atoms.cell[2, 2]), mic.energy_ev, mic.convergence_mrad, mic.defocus_ang,
               mic.cs_ang]
    values += list(p.get("offset_ang", (0.0, 0.0)))
    if cfg.mode == "stem":
        grid = p["sampling"]
        values += list(p["lattice_ang"]) + [grid["pixel_size_ang"], grid["nyquist_step_ang"],
                                            grid["scan_step_x_ang"], grid["scan_step_y_ang"]]
    values += [p["imperfections"][name] for name in stem.IMPERFECTION_PARAMS if cfg.imperfections is not None]
    return sample, np.asarray(values, np.float64)


# -------------------------------------------------------------------------- writing
def _meta(cfg: SimulationConfig) -> dict:
    return {
        "generator": GENERATOR,
        "generator_version": __version__,
        "config_digest": digest(cfg),
        "seed": cfg.seed,
        "mode": cfg.mode,
        "materials": list(cfg.specimen.materials),
        "glazer": list(cfg.distortion.glazer),
    }


def done_indices(out: Path) -> Dict[str, set]:
    """Indices already committed, per split, over every shard in ``out``.

    Read before any writer of this run starts: readers do not lock, so shards must not be
    read while another process writes them.
    """
    done: Dict[str, set] = {}
    for split in SPLITS:
        done[split] = set()
        for path in sorted((out / split).glob("shard-*.lmdb")):
            with ShardReader(path, verify=False) as reader:
                done[split].update(reader.indices())
    return done


def _write_shards(cfg: SimulationConfig, out: Path, writer: int, writers: int,
                  done: Dict[str, set], report) -> int:
    """Simulate and write writer ``writer``'s samples not in ``done``; returns how many.

    ``report(n, resumed)`` is called after each new sample, and once per split for the
    samples a previous run already committed.
    """
    written = 0
    for split in SPLITS:
        assigned = writer_indices(cfg, split, writer, writers)
        todo = [i for i in assigned if i not in done[split]]
        if len(assigned) > len(todo):
            report(len(assigned) - len(todo), True)
        if not todo:
            continue
        with ShardWriter(
            shard_path(out, split, writer), fields(cfg), param_names(cfg), _meta(cfg),
            txn_samples=cfg.shard.txn_samples, map_size=cfg.shard.map_size_kib << 10,
        ) as shard:
            for index in todo:
                try:
                    sample, params = simulate_sample(cfg, index)
                except ValueError as err:  # bad physics settings, named by the simulator
                    raise UserError(f"simulation: sample {index}: {err}") from None
                shard.write(index, sample, params)
                written += 1
                report(1, False)
    return written


def _worker(cfg_dict: dict, out: str, writer: int, writers: int, done: dict, messages) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    cfg = SimulationConfig.model_validate(cfg_dict)
    try:
        _write_shards(cfg, Path(out), writer, writers, done, lambda n, resumed: messages.put(("progress", (n, resumed))))
        messages.put(("done", writer))
    except UserError as err:
        messages.put(("error", err.marked))  # the marked text: the CLI words the arguments
    except Exception as err:  # a bug: report it rather than hang the parent
        messages.put(("error", f"writer {writer}: {type(err).__name__}: {err}"))


def check_physics(cfg: SimulationConfig) -> None:
    """Refuse settings the simulator rejects (e.g. ``cbed.k`` beyond the pattern) before
    anything is written: sample 0 is simulated once, in memory."""
    try:
        simulate_sample(cfg, 0)
    except ValueError as err:  # bad physics settings, named by the simulator
        raise UserError(f"simulation: {err}") from None


def check_output(cfg: SimulationConfig, out: Path, overwrite: bool, world: int) -> None:
    """Refuse a folder holding another dataset; with ``overwrite``, clear it."""
    existing = sorted(out.glob("*/shard-*.lmdb")) + sorted(out.glob(MANIFEST_NAME))
    if not existing:
        return
    if overwrite:
        if world > 1:
            raise UserError(f"{argument('overwrite')}: clear the folder from a single process, not from every rank")
        for split in SPLITS:
            shutil.rmtree(out / split, ignore_errors=True)
        for name in (MANIFEST_NAME, CONFIG_NAME):
            (out / name).unlink(missing_ok=True)
        return
    theirs = _dataset_digest(out)
    if theirs is not None and theirs != digest(cfg):
        raise UserError(
            f"{out}: holds another dataset (config digest {theirs}, this config {digest(cfg)}); "
            f"use {argument('overwrite')} to replace it, or another {argument('out')}"
        )


def _dataset_digest(out: Path) -> Optional[str]:
    for path in sorted(out.glob("*/shard-*.lmdb")):
        with ShardReader(path, verify=False) as reader:
            return reader.header["meta"].get("config_digest")
    return None


def missing_indices(cfg: SimulationConfig, out: Path) -> int:
    """How many planned samples are not yet in any shard (all writers must have ended)."""
    done = done_indices(out)
    return sum(1 for split, rng in split_ranges(cfg).items() for i in rng if i not in done[split])


def _missing_while_others_write(cfg: SimulationConfig, out: Path) -> Optional[int]:
    """:func:`missing_indices` while other ranks may still write: None if unreadable now."""
    try:
        return missing_indices(cfg, out)
    except (UserError, lmdb.Error):
        return None


def finalize(cfg: SimulationConfig, out: Path) -> dict:
    """Write ``manifest.json`` from the shard headers once every sample is present."""
    missing = missing_indices(cfg, out)
    if missing:
        raise UserError(
            f"{out}: {missing} of {cfg.num_samples} samples are not written yet; "
            f"rerun the simulation to finish them, then {argument('finalize')}"
        )
    extra = {"simulation": cfg.model_dump(mode="json"), "param_names": param_names(cfg),
             "sampling": sampling(cfg)}
    return finalize_manifest(out, extra=extra)


def generate(
    cfg: SimulationConfig,
    out: Path,
    *,
    workers: int = 1,
    rank: int = 0,
    world: int = 1,
    overwrite: bool = False,
    wait_s: float = 600.0,
    progress: bool = True,
) -> dict:
    """Generate (or resume) the dataset in ``out``; returns a summary dict."""
    if workers < 1:
        raise UserError(f"{argument('workers')}: expected a positive integer, got {workers}")
    out = Path(out)
    start = time.perf_counter()
    sampling(cfg)  # an aliased scan is refused before anything is written
    check_physics(cfg)
    if rank == 0:
        check_output(cfg, out, overwrite, world)
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise UserError(f"{argument('out')} {out}: cannot create it ({err.strerror}); expected a writable folder path") from None
        (out / CONFIG_NAME).write_text(yaml.safe_dump({"simulation": cfg.model_dump(mode="json")}, sort_keys=False))
    writers = workers * world
    mine = [rank * workers + local for local in range(workers)]
    total = sum(len(writer_indices(cfg, s, w, writers)) for s in SPLITS for w in mine)
    done = done_indices(out)
    bar = tqdm(total=total, desc=f"simulate[{rank}]" if world > 1 else "simulate", unit="sample",
               disable=not progress, dynamic_ncols=True)
    if workers == 1:
        written = _write_shards(cfg, out, mine[0], writers, done, lambda n, resumed: bar.update(n))
    else:
        written = _run_workers(cfg, out, mine, writers, done, bar)
    bar.close()
    elapsed = time.perf_counter() - start
    summary = {"written": written, "planned": total, "seconds": elapsed,
               "samples_per_s": written / elapsed if elapsed > 0 else 0.0, "finalized": False}
    if rank == 0:
        deadline = time.monotonic() + (wait_s if world > 1 else 0.0)
        while _missing_while_others_write(cfg, out) != 0 and time.monotonic() < deadline:
            time.sleep(2.0)
        if _missing_while_others_write(cfg, out) == 0:
            finalize(cfg, out)
            summary["finalized"] = True
        else:
            log.warning("%s: other ranks are still writing; finalize it (`stemnet simulate --finalize %s`) when they end", out, out)
    return summary


def _run_workers(cfg: SimulationConfig, out: Path, mine: Sequence[int], writers: int,
                 done: Dict[str, set], bar) -> int:
    ctx = mp.get_context("spawn")  # no forked TF/abTEM state; each worker imports afresh
    messages = ctx.Queue()
    procs = [
        ctx.Process(target=_worker, args=(cfg.model_dump(mode="json"), str(out), w, writers, done, messages), daemon=True)
        for w in mine
    ]
    for proc in procs:
        proc.start()
    finished, written, error = 0, 0, None
    try:
        while finished < len(procs) and error is None:
            try:
                kind, value = messages.get(timeout=1.0)
            except queue.Empty:
                dead = [p for p in procs if p.exitcode not in (None, 0)]
                if dead:
                    error = f"a simulation worker died (exit code {dead[0].exitcode})"
                continue
            if kind == "progress":
                count, resumed = value
                bar.update(count)
                written += 0 if resumed else count
            elif kind == "done":
                finished += 1
            else:
                error = value
    finally:
        if error is not None:
            for proc in procs:
                proc.terminate()
        for proc in procs:
            proc.join()
    if error is not None:
        raise UserError(error)
    return written
