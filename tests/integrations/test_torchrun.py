"""examples/torchrun_ddp.py under a real torchrun: two CPU processes, one run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.client.conftest import read_spool

ROOT = Path(__file__).resolve().parents[2]


def test_both_ranks_of_a_torchrun_job_share_one_run(tmp_path: Path):
    spool = tmp_path / "spool"
    env = {
        **os.environ,
        "LAYERWATCH_MODE": "offline",
        "LAYERWATCH_SPOOL_DIR": str(spool),
        "OMP_NUM_THREADS": "1",
        "CUDA_VISIBLE_DEVICES": "",  # gloo on CPU even on a GPU machine: the test is about the run key
        "PYTHONPATH": os.pathsep.join([str(ROOT / "client"), os.environ.get("PYTHONPATH", "")]),
    }
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    command += [str(ROOT / "examples" / "torchrun_ddp.py"), "--steps", "4", "--every", "2"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr

    batches = read_spool(spool)
    keys = {b["run"]["key"] for b in batches}
    assert len(keys) == 1 and next(iter(keys)).startswith("torchrun-")
    assert f"layerwatch run key {next(iter(keys))} (2 ranks)" in done.stdout
    assert {b["rank"] for b in batches} == {0, 1}
    assert {b["run"]["world_size"] for b in batches} == {2}
    # Reports are combined across ranks (layerwatch.ranks): rank 0 sends the job's rows, every rank its end.
    steps = {rank: [s for b in batches if b["rank"] == rank for s in b["steps"]] for rank in (0, 1)}
    assert [s["step"] for s in steps[0]] == [0, 1, 2, 3] and steps[1] == []
    assert all({"loss_min", "loss_max", "loss_argmax_rank"} <= set(s["scalars"]) for s in steps[0])
    for rank in (0, 1):
        assert [b["end"]["status"] for b in batches if b["rank"] == rank and b.get("end")] == ["finished"]
