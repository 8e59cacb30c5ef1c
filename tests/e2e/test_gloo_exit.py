"""A torchrun job whose script never calls destroy_process_group (DeepSpeed-style scripts and the Hugging
Face Trainer's don't) exits 0: under torch 2.13 a gloo group alive at interpreter teardown aborts the
process more often than not ("terminate called without an active exception"), so the group that
shardspeed.init_distributed made is destroyed at a clean exit. A failing script still fails, promptly."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

TORCHRUN = str(Path(sys.executable).parent / "torchrun")
SCRIPT = """
import sys, torch, torch.distributed as dist, shardspeed
shardspeed.init_distributed()
t = torch.ones(1000)
for _ in range(10):
    dist.all_reduce(t)
if sys.argv[1:] == ["--fail"] and dist.get_rank() == 1:
    raise RuntimeError("this rank fails on purpose")
dist.barrier()
"""
RUNS = 4  # without the fix 3 in 4 runs aborted here: 4 clean runs in a row would be luck of about 0.4%


def launch(script: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([TORCHRUN, "--standalone", "--nproc_per_node=2", str(script), *args], capture_output=True,
                          text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.mark.timeout(600)
def test_clean_exit_without_destroy_process_group(tmp_path):
    script = tmp_path / "no_destroy.py"
    script.write_text(SCRIPT)
    for _ in range(RUNS):
        done = launch(script)
        assert done.returncode == 0 and "terminate called" not in done.stderr, done.stderr[-3000:]


@pytest.mark.timeout(300)
def test_a_failing_rank_still_fails(tmp_path):
    script = tmp_path / "fails.py"
    script.write_text(SCRIPT)
    done = launch(script, "--fail")
    assert done.returncode != 0 and "this rank fails on purpose" in done.stderr
