"""A real two-process Horovod job over Gloo on localhost."""

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

HOROVODRUN = str(Path(sys.executable).parent / "horovodrun")

ALLREDUCE = textwrap.dedent("""
    import os
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2"
    import tensorflow as tf
    import horovod.tensorflow as hvd
    from stemnet.ranks import rank_info
    hvd.init()
    info = rank_info()
    mean = hvd.allreduce(tf.constant(float(hvd.rank())), op=hvd.Average, name="rank_mean")
    total = hvd.allreduce(tf.constant([float(hvd.rank()), 1.0]), op=hvd.Sum, name="rank_sum")
    print(f"RESULT rank={hvd.rank()} size={hvd.size()} src={info.source}/{info.rank}/{info.world} "
          f"mean={float(mean):.6f} sum={total.numpy().tolist()}", flush=True)
""")


@pytest.mark.horovod
def test_two_ranks_allreduce_their_rank_numbers(tmp_path):
    script = tmp_path / "allreduce.py"
    script.write_text(ALLREDUCE)
    proc = subprocess.run(
        [HOROVODRUN, "-np", "2", "-H", "localhost:2", "--gloo", sys.executable, str(script)],
        capture_output=True, text=True, timeout=240,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    results = sorted(line.split("RESULT ", 1)[1] for line in proc.stdout.splitlines() if "RESULT " in line)
    assert results == [
        "rank=0 size=2 src=horovod/0/2 mean=0.500000 sum=[1.0, 2.0]",
        "rank=1 size=2 src=horovod/1/2 mean=0.500000 sum=[1.0, 2.0]",
    ]
