"""Mutation check (`make mutate`): plant known bugs in a copy of the repo, run the tests
that should catch each, and count how many were caught.

Each mutant replaces one exact snippet (found in whichever file under stemnet/ or
simulation/ holds it exactly once, so files may move between packages). A mutant whose
snippet is not found is reported STALE (the code changed: update the mutant), never
counted as caught. A mutant is caught when its tests fail; the unmutated copy must pass
them (checked first with --baseline).

Usage: python tools/mutate.py [--only NAME ...] [--list] [--baseline] [--keep]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import List, NamedTuple, Tuple

REPO = Path(__file__).resolve().parents[1]
SEARCH = ("stemnet", "simulation")


class Mutant(NamedTuple):
    name: str
    old: str
    new: str
    tests: Tuple[str, ...]  # pytest node ids / -k expressions as "file::test" or "file -k expr"


M = Mutant
MUTANTS: List[Mutant] = [
    # --- the planted bugs of issue 13
    M("glazer-tilt-sign", "step = 0.5 * lattice[bond] * math.tan(math.radians(tilts[axis]))",
      "step = -0.5 * lattice[bond] * math.tan(math.radians(tilts[axis]))",
      ("tests/test_structures.py", "tests/test_labels.py")),
    M("resume-ignores-data-position", "epoch=start_step // per_epoch, start_batch=start_step % per_epoch",
      "epoch=0, start_batch=0", ("tests/test_resume.py -k sigkill",)),
    M("lr-without-world-scaling", "WarmupDecay(tcfg.learning_rate * world,", "WarmupDecay(tcfg.learning_rate,",
      ("tests/test_distributed.py -k resumes_and_only_rank0",)),
    M("r2-error-halved", "return float(1.0 - sse / sst)", "return float(1.0 - 0.5 * sse / sst)",
      ("tests/test_evaluate.py",)),
    M("tilt-formula-doubled", "math.atan(2 * rms / float(a_ang[i]))", "math.atan(4 * rms / float(a_ang[i]))",
      ("tests/test_evaluate.py",)),
    M("multi-rank-step-does-nothing", "opt.apply_gradients(zip(grads, variables), **backend.apply_options)",
      "opt.apply_gradients(zip([tf.zeros_like(g) for g in grads], variables), **backend.apply_options)",
      ("tests/test_distributed.py -k concatenated",)),
    M("cbed-binning-transposed", '"ai,pij,bj->pba"', '"ai,pij,bj->pab"', ("tests/test_multislice.py -k pattern_centre_of_mass",)),
    # --- the defects fixed in issue 13, put back
    M("loss-per-rank-mean", "global_mean = backend.size > 1 and backend.averages", "global_mean = False",
      ("tests/test_distributed.py -k padding",)),
    M("unseeded-initialisers", "tf.keras.utils.set_random_seed(tcfg.seed + rank)", "tf.random.set_seed(tcfg.seed + rank)",
      ("tests/test_resume.py -k same_seed",)),
    M("no-run-lock", "fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)", "pass",
      ("tests/test_run_folder.py -k lock",)),
    M("corrupt-checkpoint-fatal", "first[:200])\n            continue", "first[:200])\n            raise",
      ("tests/test_run_folder.py -k truncated",)),
    # --- one per core module
    M("metrics-ssim-data-range", "data_range=data_range, win_size=3", "data_range=1.0, win_size=3",
      ("tests/test_evaluate.py",)),
    M("metrics-column-rmse-unscaled", "err = (pred[..., ch][sel] - truth[..., ch][sel]) / m[sel]",
      "err = pred[..., ch][sel] - truth[..., ch][sel]", ("tests/test_evaluate.py",)),
    M("column-fit-single-centroid", "CENTROID_ITERATIONS = 20", "CENTROID_ITERATIONS = 1",
      ("tests/test_evaluate.py",)),
    M("losses-mask-ignored", "    if mask is None:\n        per_sample = tf.reduce_mean(err, axis=axes)",
      "    if True:\n        per_sample = tf.reduce_mean(err, axis=axes)", ("tests/test_losses.py",)),
    M("schedule-no-warmup", "warmup = self.peak * tf.minimum((step + 1.0) / warm, 1.0)", "warmup = self.peak",
      ("tests/test_losses.py",)),
    M("shards-crc-unchecked", "if computed != crc:", "if False:", ("tests/test_shards.py -k crc",)),
    M("data-same-order-every-epoch", "rng = np.random.default_rng([int(seed), int(epoch), int(plan.rank), 0x5EED])",
      "rng = np.random.default_rng([int(seed), 0, int(plan.rank), 0x5EED])", ("tests/test_data.py -k seeded_determinism",)),
    M("labels-no-periodic-images", "for dx_img in (-cx, 0.0, cx):", "for dx_img in (0.0,):",
      ("tests/test_labels.py",)),
    M("checkpoint-state-not-repaired", "    if committed is None:\n        candidates = on_disk(directory)",
      "    if committed is None:\n        candidates = []", ("tests/test_run_folder.py -k malformed",)),
    # --- the tilt head's magnitudes (a projection shows |angle|, not its sense)
    M("tilt-target-signed", 'arrays["tilt"][...] = tilt_target(arrays["tilt"])',
      'arrays["tilt"][...] = arrays["tilt"]', ("tests/test_data.py -k reference_transform",)),
    M("tta-tilt-signed", "moved = moved[..., tilt_table(element)[0]]",
      "moved = moved[..., tilt_table(element)[0]] * tilt_table(element)[1]",
      ("tests/test_reconstruct.py -k equivariant",)),
    # --- the FFT lattice under a superlattice; CPU ranks wait out the allreduce overhead
    M("supercell-kept", "            best = g\n", "            pass\n",
      ("tests/test_reconstruct.py -k superlattice",)),
    M("overhead-on-compute", "            work += transfer  #", "            work += overhead + transfer  #",
      ("tests/test_scaling_checks.py -k computing_core",)),
    # --- column-centred frozen phonons; the tilt head's magnitudes clipped at 0
    M("phonons-not-centred", "        if atoms.get_tags().any():\n", "        if False:\n",
      ("tests/test_multislice.py -k projected_potential_on_its_site",)),
    M("centred-rms-not-kept", "    scale = np.sqrt(count / np.maximum(count - 1, 1))\n", "    scale = np.ones_like(count)\n",
      ("tests/test_multislice.py -k keep_each_atom_rms",)),
    M("negative-tilt-magnitudes", "value = np.maximum(value * np.float32(self.tilt_scale), np.float32(0))",
      "value = value * np.float32(self.tilt_scale)", ("tests/test_data.py -k normalization_round_trip",)),
    M("fft-basis-from-shortest-spot", "            return basis\n    return first\n", "            return first\n    return first\n",
      ("tests/test_reconstruct.py -k fundamental_basis",)),
    M("tilt-mean-baseline-channels-first", "    return np.asarray(means, np.float64).reshape(-1, 3).mean(axis=0)",
      "    return np.asarray(means, np.float64).reshape(3, -1).mean(axis=1)",
      ("tests/test_tilt_target.py -k sim2real",)),
    M("b-only-rmse-on-a-columns", "b_only = good & (c[\"sublattice\"][cat] == 1)", "b_only = good & (c[\"sublattice\"][cat] == 0)",
      ("tests/test_tilt_target.py -k sim2real",)),
    M("o-fit-tilt-from-network", 'rotation_deg(rx, ry, table["fit_dx_ang"][o], table["fit_dy_ang"][o])',
      'rotation_deg(rx, ry, table["dx_ang"][o], table["dy_ang"][o])',
      ("tests/test_reconstruct.py -k tilt_about_z_from_the_fitted",)),
    M("rotation-cross-sign", "return math.degrees(float(np.mean((rx * dy - ry * dx) / (rx**2 + ry**2))))",
      "return math.degrees(float(np.mean((rx * dy + ry * dx) / (rx**2 + ry**2))))",
      ("tests/test_reconstruct.py -k tilt_about_z_from_the_fitted",)),
]


def locate(root: Path, old: str) -> List[Path]:
    hits = []
    for top in SEARCH:
        for path in (root / top).rglob("*.py"):
            if path.read_text().count(old) == 1:
                hits.append(path)
    return hits


def copy_repo(dest: Path) -> Path:
    ignore = shutil.ignore_patterns(".git", ".venv*", "__pycache__", "*.egg-info", "demo", "bench", ".pytest_cache")
    shutil.copytree(REPO, dest, ignore=ignore)
    return dest


def tiny_dataset(work: Path) -> Path:
    """The tests' tiny dataset, simulated once by the unmutated code (reused by mutants
    outside simulation/, whose tests would otherwise simulate it again each time)."""
    out = work / "tiny-data"
    cmd = [sys.executable, "-m", "stemnet.cli", "simulate", "--config", str(REPO / "configs/simulation/tiny.yaml"),
           "--out", str(out), "--no-progress"]
    subprocess.run(cmd, check=True, capture_output=True, env=dict(os.environ, PYTHONPATH=str(REPO)))
    return out


def run_tests(root: Path, tests: Tuple[str, ...], data: Path = None) -> Tuple[bool, str]:
    """True when every test target passes in ``root``."""
    env = dict(os.environ, PYTHONPATH=str(root))
    if data is not None:
        env["STEMNET_TEST_TINY_DATASET"] = str(data)
    for target in tests:
        cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-m", "", *target.split()]
        proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            tail = [line for line in proc.stdout.splitlines() if line.startswith(("FAILED", "ERROR"))][:1]
            return False, f"{target}: {tail[0] if tail else proc.stdout.strip().splitlines()[-1:]}"
    return True, ""


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", help="Mutant names to run (default: all).")
    parser.add_argument("--list", action="store_true", help="List the mutants and exit.")
    parser.add_argument("--baseline", action="store_true", help="First check that the unmutated copy passes.")
    parser.add_argument("--keep", action="store_true", help="Keep the temporary copies.")
    args = parser.parse_args(argv)
    by_name = {m.name: m for m in MUTANTS}
    unknown = [n for n in args.only or [] if n not in by_name]
    if unknown:
        parser.error(f"unknown mutant {unknown[0]!r}; see --list")
    mutants = [by_name[n] for n in args.only] if args.only else MUTANTS  # in the order asked
    if args.list:
        for m in mutants:
            print(f"{m.name:34s} {' '.join(m.tests)}")
        return 0
    work = Path(tempfile.mkdtemp(prefix="stemnet-mutate-"))
    caught, stale, missed = [], [], []
    try:
        data = tiny_dataset(work)
        if args.baseline:
            base = copy_repo(work / "baseline")
            targets = tuple(dict.fromkeys(t for m in mutants for t in m.tests))
            ok, why = run_tests(base, targets, data)
            print(f"baseline: {'pass' if ok else 'FAIL ' + why}", flush=True)
            if not ok:
                return 1
        for m in mutants:
            t0 = time.monotonic()
            root = copy_repo(work / m.name)
            hits = locate(root, m.old)
            if len(hits) != 1:
                stale.append(m.name)
                print(f"STALE   {m.name}: snippet found in {len(hits)} files", flush=True)
                continue
            path = hits[0]
            path.write_text(path.read_text().replace(m.old, m.new))
            reuse = data if path.relative_to(root).parts[0] != "simulation" else None
            passed, why = run_tests(root, m.tests, reuse)
            (missed if passed else caught).append(m.name)
            verdict = "MISSED " if passed else "caught "
            print(f"{verdict} {m.name} ({path.relative_to(root)}; {time.monotonic() - t0:.0f} s) {why}", flush=True)
            if not args.keep:
                shutil.rmtree(root, ignore_errors=True)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print(f"mutants caught: {len(caught)} of {len(mutants)} ({len(missed)} missed, {len(stale)} stale)")
    return 0 if len(caught) == len(mutants) else 1


if __name__ == "__main__":
    sys.exit(main())
