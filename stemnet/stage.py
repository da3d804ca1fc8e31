"""Look at a dataset (:func:`inspect_dataset`, :func:`plot_samples`) and stage a rank's
shards onto node-local storage (:func:`stage`).

Staging follows the Summit burst-buffer pattern: before training, every rank copies the
shards it will read (the same assignment as :func:`stemnet.data.make_dataset`) from the
shared file system to the node's NVMe, verifies the copies (every record's CRC, every
header against the manifest), and trains from there.

A staged folder holds ``manifest.json`` — the source manifest, unchanged except for a
``"staged"`` entry (source, rank, world, splits, shard list) — and only this rank's
shards. Because the manifest still lists every shard with its count, ``make_dataset``
on the staged folder with the same ``rank``/``world`` computes the same assignment and
the same number of batches per epoch as on the source. (``shards.verify_dataset`` on a
staged folder reports the other ranks' shards as missing; :func:`inspect_dataset`
checks only the staged ones.)
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np

from stemnet.atomic import write_json_atomic
from stemnet.data import (
    DISPLACEMENT_CHANNELS,
    SUBLATTICES,
    assign_shards,
    input_field,
    probe_grid,
)
from stemnet.errors import UserError
from stemnet.log import get_logger
from stemnet.reconstruct.peaks import find_peaks
from stemnet.shards import (
    MANIFEST_NAME,
    SPLITS,
    ShardError,
    ShardReader,
    close_shards,
    header_fields,
    is_shard_name,
    key_text,
    read_header,
    read_manifest,
    reading,
    record_keys,
    record_layout,
    shared_env,
    simulation_section,
    verify_dataset,
    verify_shard,
)

log = get_logger("stage")


# ================================================================================ stage
def staged_shards(manifest: dict, *, rank: int, world: int, splits: Sequence[str] = ("train", "val"),
                  where: str = "dataset") -> List[str]:
    """Relative paths of the shards ``rank`` reads from ``splits`` (empty splits skipped)."""
    paths: List[str] = []
    for split in splits:
        if split not in SPLITS:
            raise UserError(f"split {split!r}: expected one of {list(SPLITS)}")
        entry = (manifest.get("splits") or {}).get(split)
        if not entry or not entry.get("count"):
            log.info("%s: split %r is empty; nothing to stage", where, split)
            continue
        for piece in assign_shards(manifest, split, rank, world, where)[rank]:
            if piece.path not in paths:
                paths.append(piece.path)
    return paths


def stage(path, dest, *, rank: int = 0, world: int = 1, splits: Sequence[str] = ("train", "val")) -> Path:
    """Copy this rank's shards and the manifest to ``dest``, verify them, return ``dest``.

    Parameters
    ----------
    path : path-like
        The dataset folder on shared storage.
    dest : path-like
        Node-local folder; ``{rank}`` in it is replaced by the rank (one folder per
        rank when several ranks share a node).
    rank, world : int
        As given to :func:`stemnet.data.make_dataset` later.
    splits : sequence of str
        Splits to stage (each with the same assignment as training).

    Returns
    -------
    Path
        The folder to pass to ``make_dataset(..., rank=rank, world=world)``.

    Raises
    ------
    UserError
        Missing manifest, bad rank/world, more ranks than samples, ``dest`` already
        holding an unstaged dataset or being the source, too little free space, a copy
        that fails verification (it is deleted).

    Notes
    -----
    Re-running is cheap: a shard already in ``dest`` with the source's size is verified
    instead of copied again. Shards of an earlier staging that this rank no longer
    reads are removed.
    """
    src = Path(path)
    dest = Path(str(dest).replace("{rank}", str(int(rank))))
    manifest = read_manifest(src)
    if dest.resolve() == src.resolve():
        raise UserError(f"{dest}: the staging folder is the dataset itself; choose another folder")
    old = dest / MANIFEST_NAME
    if old.is_file():
        try:
            previous = json.loads(old.read_text())
        except (OSError, ValueError):
            previous = {}
        if "staged" not in previous:
            raise UserError(f"{dest}: holds a dataset that was not staged; choose another folder")
    todo = staged_shards(manifest, rank=rank, world=world, splits=splits, where=str(src))
    if not todo:
        raise UserError(f"{src}: nothing to stage for splits {list(splits)}")
    for rel in todo:
        if not (src / rel).is_file():
            raise ShardError(f"{src / rel}: no such shard file; the manifest lists it")
    close_shards(dest)
    dest.mkdir(parents=True, exist_ok=True)
    sizes = {rel: (src / rel).stat().st_size for rel in todo}
    needed = sum(size for rel, size in sizes.items()
                 if not ((dest / rel).is_file() and (dest / rel).stat().st_size == size))
    free = shutil.disk_usage(dest).free
    if needed > free:
        raise UserError(
            f"{dest}: {needed / 2**20:.1f} MiB to stage but {free / 2**20:.1f} MiB free"
        )
    start, copied = time.perf_counter(), 0
    for rel in todo:
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.is_file() and target.stat().st_size == sizes[rel]:
            faults = _verify_copy(target, manifest)
            if not faults:
                continue
            target.unlink()
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        try:
            shutil.copyfile(src / rel, tmp)
            os.replace(tmp, target)
        finally:
            if tmp.exists():
                tmp.unlink()
        copied += sizes[rel]
        faults = _verify_copy(target, manifest)
        if faults:
            target.unlink()
            raise ShardError(f"staging {src / rel} -> {target}: {faults[0]}")
    _remove_stale(dest, set(todo))
    staged = dict(manifest)
    staged["staged"] = {"source": str(src.resolve()), "rank": int(rank), "world": int(world),
                        "splits": list(splits), "shards": todo}
    write_json_atomic(dest / MANIFEST_NAME, staged)
    seconds = time.perf_counter() - start
    log.info("staged %d shards (%.1f MiB copied, %.1f MiB/s) for rank %d of %d into %s",
             len(todo), copied / 2**20, copied / 2**20 / max(seconds, 1e-9), rank, world, dest)
    return dest


def _verify_copy(path: Path, manifest: dict) -> List[str]:
    """Every record's CRC and the header against the manifest (one line per fault)."""
    close_shards(path.parent)
    return verify_shard(path, manifest)


def _remove_stale(dest: Path, keep: set) -> None:
    for split in SPLITS:
        folder = dest / split
        if not folder.is_dir():
            continue
        for file in folder.iterdir():
            if is_shard_name(file.name) and f"{split}/{file.name}" not in keep:
                file.unlink()


# ============================================================================== inspect
def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _stats_line(name: str, stats: dict) -> List[str]:
    lines = [f"  {name:<14} mean {_fmt(stats.get('mean'))}  std {_fmt(stats.get('std'))}  "
             f"min {_fmt(stats.get('min'))}  max {_fmt(stats.get('max'))}  (n={stats.get('count')})"]
    channels = stats.get("channels") or {}
    count = len(channels.get("mean", []))
    if 1 < count <= 12:
        labels = list(DISPLACEMENT_CHANNELS) if name == "displacement" and count == 9 else None
        if name == "columns" and count == len(SUBLATTICES):
            labels = list(SUBLATTICES)
        for c in range(count):
            label = labels[c] if labels else f"[{c}]"
            lines.append(f"    {label:<10} mean {_fmt(channels['mean'][c])}  std {_fmt(channels['std'][c])}  "
                         f"min {_fmt(channels['min'][c])}  max {_fmt(channels['max'][c])}")
    elif count > 12:
        means = np.asarray(channels["mean"], float)
        lines.append(f"    {count} channels: mean ranges {means.min():.4g} .. {means.max():.4g}")
    return lines


def _simulation_digest(manifest: dict) -> List[str]:
    sim = simulation_section(manifest)
    if not sim.present:
        return ["simulation: (no simulation config in the manifest)"]
    line = [f"mode {sim.mode}", f"seed {sim.seed}", f"{sim.num_samples} samples",
            f"materials {sim.specimen.materials}", f"output {sim.output_shape}",
            f"fov {sim.fov_ang} Å", f"sampling {sim.sampling_ang} Å"]
    if sim.mode == "cbed":
        cbed = sim.cbed
        line.append(f"grid {list(cbed.grid) if cbed.grid else None} k {cbed.k} ±{cbed.max_angle_mrad} mrad")
    else:
        line.append(f"detectors {sim.detectors}")
    line += [f"{sim.microscope.energy_ev} eV", f"{sim.microscope.convergence_mrad} mrad",
             f"glazer {sim.distortion.glazer}", f"dose {sim.noise_dose_e_per_ang2}"]
    return ["simulation: " + ", ".join(str(x) for x in line)]


def inspect_dataset(path, verify: bool = False) -> Tuple[str, List[str]]:
    """A readable description of a dataset and the faults found.

    Without ``verify``, the manifest is read and every listed shard's header is checked
    against it (cheap). With ``verify``, every record's CRC is checked too
    (:func:`stemnet.shards.verify_dataset`; on a staged folder only its own shards).

    Returns
    -------
    (str, list of str)
        The description and one line per fault (empty when sound).
    """
    root = Path(path)
    try:
        manifest = read_manifest(root)
    except ShardError as error:
        return f"dataset: {root}", [str(error)]
    lines = [f"dataset: {root}  (schema {manifest.get('schema_version')}, "
             f"record format {manifest.get('format_version')}, {manifest.get('total')} samples)"]
    lines.append(f"generator: {manifest.get('generator')} {manifest.get('generator_version')}, "
                 f"config digest {manifest.get('config_digest')}, seed {manifest.get('seed')}")
    staged = manifest.get("staged")
    if staged:
        lines.append(f"staged: from {staged.get('source')} for rank {staged.get('rank')} of "
                     f"{staged.get('world')}: {len(staged.get('shards', []))} shards present")
    lines += _simulation_digest(manifest)
    try:
        name = input_field(manifest)
        grid = probe_grid(manifest) if name == "cbed" else None
        lines.append(f"input field: {name}" + (f" (probe grid {grid[0]}x{grid[1]})" if grid else ""))
    except UserError as error:
        lines.append(f"input field: ? ({error})")
    lines.append("fields (channels first, as stored):")
    for field, spec in header_fields(manifest).items():
        lines.append(f"  {field:<14} {spec.dtype}  {list(spec.shape)}")
    params = manifest.get("param_names", [])
    lines.append(f"params ({len(params)}, {manifest.get('params_dtype')}): {', '.join(params)}")
    lines.append("splits:")
    for split, entry in (manifest.get("splits") or {}).items():
        counts = [s["count"] for s in entry["shards"]]
        spread = f" ({min(counts)}..{max(counts)} per shard)" if counts else ""
        lines.append(f"  {split:<6} {entry['count']:>8} samples in {len(counts)} shards{spread}")
    lines.append(f"statistics (from {', '.join(manifest.get('stats_from', []))}):")
    for field, stats in (manifest.get("stats") or {}).items():
        lines += _stats_line(field, stats)
    faults = _check(root, manifest, verify)
    lines.append(f"faults: {len(faults)}" if faults else
                 f"ok ({'every record CRC-checked' if verify else 'headers checked; --verify checks every record'})")
    return "\n".join(lines), faults


def _check(root: Path, manifest: dict, verify: bool) -> List[str]:
    close_shards(root)
    staged = manifest.get("staged")
    if verify and not staged:
        return verify_dataset(root)
    wanted = set(staged["shards"]) if staged else None
    faults: List[str] = []
    owner: dict = {}
    for entry in (manifest.get("splits") or {}).values():
        for shard in entry["shards"]:
            if wanted is not None and shard["path"] not in wanted:
                continue
            file = root / shard["path"]
            if verify:
                faults += verify_shard(file, manifest, owner)
                continue
            try:
                with ShardReader(file, verify=False, manifest=manifest):
                    pass
            except ShardError as error:
                faults.append(str(error))
    return faults


# ================================================================================ plots
def _read_samples(root: Path, manifest: dict, n: int, split: Optional[str]):
    order = [split] if split else [s for s in SPLITS if (manifest["splits"].get(s) or {}).get("count")]
    out = []
    for name in order:
        for entry in manifest["splits"][name]["shards"]:
            file = root / entry["path"]
            if not entry["count"] or not file.is_file():
                continue
            env = shared_env(file)
            with reading(env, file) as txn:
                layout = record_layout(read_header(txn, file))
                for key in record_keys(txn):
                    sample = layout.decode(bytes(txn.get(key)), True, f"{file}:{key_text(key)}")
                    out.append((f"{name} #{int(key)}", {k: np.array(v) for k, v in sample.items()}))
                    if len(out) >= n:
                        return out
    if not out:
        raise UserError(f"{root}: no samples to plot")
    return out


def plot_samples(path, png, n: int = 3, split: Optional[str] = None) -> Path:
    """Write a montage of ``n`` samples to ``png`` (matplotlib, Agg backend).

    One row per sample: the input (CBED: the mean pattern and the pattern at the grid
    centre; STEM: up to three detector images), the potential, the column weights of the
    A/B/O sublattices (as RGB), and the B-sublattice displacement (dx, dy) drawn as
    arrows at the B column sites over the potential (arrows magnified; the title gives
    the largest |d| in Å). Images are shown with row 0 at the top, x to the right,
    y downwards, as the arrays are indexed ``[y, x]``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    root = Path(path)
    manifest = read_manifest(root)
    samples = _read_samples(root, manifest, int(n), split)
    name = input_field(manifest)
    grid = probe_grid(manifest) if name == "cbed" else None
    fields = header_fields(manifest)
    input_panels = 2 if name == "cbed" else min(3, fields[name].shape[0])
    cols = input_panels + sum(f in fields for f in ("potential", "columns")) + ("displacement" in fields)
    fig, axes = plt.subplots(len(samples), cols, figsize=(2.6 * cols, 2.6 * len(samples)), squeeze=False)
    for row, (label, sample) in enumerate(samples):
        ax = list(axes[row])
        x = sample[name]
        if name == "cbed":
            centre = (grid[1] // 2) * grid[0] + grid[0] // 2 if grid else len(x) // 2
            _show(ax.pop(0), x.mean(axis=0), f"{label}\nmean pattern [ky, kx]", "magma")
            _show(ax.pop(0), x[centre], f"pattern p={centre}", "magma")
        else:
            for d in range(input_panels):
                _show(ax.pop(0), x[d], f"{label}\n{name}[{d}]", "gray")
        pot = sample.get("potential")
        if pot is not None:
            _show(ax.pop(0), pot[0], "potential (V·Å)", "viridis")
        if "columns" in sample:
            rgb = np.clip(np.moveaxis(sample["columns"], 0, -1), 0, 1)
            a = ax.pop(0)
            a.imshow(rgb, interpolation="nearest")
            a.set_title("columns A/B/O = R/G/B", fontsize=8)
            a.axis("off")
        if "displacement" in sample:
            a = ax.pop(0)
            background = pot[0] if pot is not None else np.zeros(sample["displacement"].shape[1:])
            a.imshow(background, cmap="gray", interpolation="nearest")
            d = sample["displacement"]
            weight = sample["columns"][1] if "columns" in sample else np.abs(d[3:5]).sum(axis=0)
            rows, cols_ = find_peaks(weight, 1, 0.5, wrap=True).T  # column centres (periodic map)
            u, v = d[3][rows, cols_], d[4][rows, cols_]
            largest = float(np.hypot(u, v).max()) if len(u) else 0.0
            if largest > 0:
                spacing = max(2.0, min(d.shape[1:]) / max(np.sqrt(len(u)), 1) / 2)
                a.quiver(cols_, rows, u, v, angles="xy", scale_units="xy",
                         scale=largest / spacing, color="red", width=0.012)
            a.scatter(cols_, rows, s=4, c="yellow")
            a.set_title(f"B (dx, dy), max {largest:.3f} Å", fontsize=8)
            a.axis("off")
    fig.tight_layout()
    png = Path(png)
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return png


def _show(ax, image, title, cmap):
    ax.imshow(image, cmap=cmap, interpolation="nearest")
    ax.set_title(title, fontsize=8)
    ax.axis("off")
