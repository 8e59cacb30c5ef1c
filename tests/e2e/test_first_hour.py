"""What a new user meets first, run as they would run it: logs that speak without any logging set-up,
and the README's main command run twice (the second run must go on training, and a second config
must not pick up the first one's checkpoint)."""
from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CLI = [sys.executable, "-m", "shardspeed.launcher.cli"]


def _port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _launch(args: list[str], cwd: Path) -> str:
    proc = subprocess.run([*CLI, "--num_gpus", "2", "--master_port", str(_port()), *args], cwd=cwd, capture_output=True,
                          text=True, timeout=240, env={**os.environ, "HOME": str(cwd)})
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    return out


@pytest.mark.timeout(300)
def test_step_lines_show_on_rank0_only_without_any_logging_setup(tmp_path: Path) -> None:
    """Catches step, timing and memory lines swallowed by Python's default logging (the guide's
    out-of-memory advice, `memory_breakdown: true`, printing nothing) or printed once per rank."""
    out = _launch([str(ROOT / "tests/e2e/scripts/quiet_user.py")], tmp_path)
    assert "done rank 0" in out and "done rank 1" in out
    steps = re.findall(r"\[rank (\d) \| dp=2 pp=1 tp=1 ep=1\] step=(\d) ", out)
    assert sorted(steps) == [("0", "1"), ("0", "2")], out[-3000:]
    assert len(re.findall(r"time \(ms\) \| forward", out)) == 2
    assert len(re.findall(r"memory breakdown \(bytes\)", out)) == 2


def _example(tmp: Path, config: str, steps: int, *extra: str) -> str:
    return _launch([str(ROOT / "examples/train_gpt.py"), "--deepspeed_config", str(ROOT / "examples/configs" / config),
                    "--steps", str(steps), "--layers", "1", "--hidden", "64", "--heads", "2", "--seq_len", "32",
                    "--corpus_bytes", "200000", *extra], tmp)


def _val_loss(out: str) -> float:
    found = re.search(r"summary: .* val loss ([\d.]+)", out)
    assert found, out[-2000:]
    return float(found.group(1))


@pytest.mark.timeout(600)
def test_a_second_run_resumes_and_keeps_training_and_configs_keep_their_own_checkpoints(tmp_path: Path) -> None:
    """Catches a resumed run whose LR schedule has already ended (it then trains at the schedule's floor
    and the loss stalls), a progress count restarting at 0, and one config resuming another's checkpoint."""
    first = _example(tmp_path, "stage0_fp32.json", 100)  # the config's WarmupCosineLR spans 100 steps
    saved = tmp_path / "checkpoints/stage0_fp32"
    assert (saved / "latest").read_text() == "global_step100"
    # DeepSpeed users run the zero_to_fp32.py each checkpoint folder carries.
    proc = subprocess.run([sys.executable, "zero_to_fp32.py", ".", "fp32.bin"], cwd=saved, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0 and "wrote fp32.bin" in proc.stdout, proc.stderr[-2000:]
    second = _example(tmp_path, "stage0_fp32.json", 40)
    resumed = re.search(r"resumed from \S+global_step100 at step 100 \(lr ([\d.e+-]+)\); training to step 140; "
                        r"LR schedule stretched from 100 to 140 steps", second)
    assert resumed, second[-2000:]
    assert float(resumed.group(1)) < 1e-6  # where the schedule had ended: training on there would stall
    assert _val_loss(second) < _val_loss(first) - 0.01, (_val_loss(first), _val_loss(second))
    assert "140/140" in second  # the progress bar counts on from the resumed step
    other = _example(tmp_path, "stage1_fp32.json", 2)
    assert "resumed from" not in other and (tmp_path / "checkpoints/stage1_fp32/latest").is_file()
    # The same folder with another model shape is refused, naming what differs.
    proc = subprocess.run([*CLI, "--num_gpus", "2", "--master_port", str(_port()), str(ROOT / "examples/train_gpt.py"),
                           "--deepspeed_config", str(ROOT / "examples/configs/stage0_fp32.json"), "--steps", "2",
                           "--layers", "2", "--hidden", "64", "--heads", "2", "--seq_len", "32", "--corpus_bytes", "200000"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=240, env={**os.environ, "HOME": str(tmp_path)})
    assert proc.returncode != 0 and "layers 1 there, 2 here" in proc.stdout + proc.stderr
