"""The README's main job, shortened: the launcher runs the GPT example on 2 ranks, it saves a
checkpoint and a summary, and a second start resumes from that checkpoint."""
from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _run(tmp: Path, config: str, steps: int) -> str:
    cmd = [sys.executable, "-m", "shardspeed.launcher.cli", "--num_gpus", "2", "--master_port", str(_free_port()),
           str(ROOT / "examples/train_gpt.py"), "--deepspeed_config", str(ROOT / "examples/configs" / config),
           "--steps", str(steps), "--layers", "1", "--hidden", "64", "--heads", "2", "--seq_len", "32",
           "--corpus_bytes", "200000", "--save_dir", str(tmp / "ckpt")]
    proc = subprocess.run(cmd, cwd=tmp, capture_output=True, text=True, timeout=240, env={**os.environ, "HOME": str(tmp)})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout + proc.stderr


@pytest.mark.timeout(300)
@pytest.mark.parametrize("config", ["stage0_fp32.json", "stage1_fp32.json", "stage2_bf16.json", "stage3_bf16.json"])
def test_example_trains_saves_and_resumes(tmp_path, config):
    """Catches a broken example, launcher, checkpoint or resume path (the README's main job)."""
    first = _run(tmp_path, config, 4)
    summary = re.search(r"summary: .* steps (\d+), train loss ([\d.]+), val loss ([\d.]+)", first)
    assert summary and summary.group(1) == "4", first[-2000:]
    assert float(summary.group(2)) < 5.6, "loss should start falling from ln(256) = 5.55"
    assert (tmp_path / "ckpt" / "latest").read_text() == "global_step4"
    second = _run(tmp_path, config, 2)
    assert "resumed from" in second and "global_step4" in second
    assert (tmp_path / "ckpt" / "latest").read_text() == "global_step6"


@pytest.mark.timeout(300)
def test_autotp_example_trains_and_its_gathered_model_reloads_unsharded(tmp_path):
    """Catches a broken AutoTP example, or a gathered 16-bit save that the unsharded model cannot load."""
    cmd = [sys.executable, "-m", "shardspeed.launcher.cli", "--num_gpus", "2", "--master_port", str(_free_port()),
           str(ROOT / "examples/train_hf_autotp.py"), "--deepspeed_config", str(ROOT / "examples/configs/autotp2_stage1_fp32.json"),
           "--steps", "3", "--layers", "1", "--hidden", "64", "--heads", "2", "--seq_len", "32",
           "--corpus_bytes", "200000", "--save_dir", str(tmp_path / "out")]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=240, env={**os.environ, "HOME": str(tmp_path)})
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert re.search(r"summary: gpt2, steps 3, .*params per rank .* \(5\d%\)", out), out[-2000:]
    reload = re.search(r"reloaded unsharded: val loss ([\d.]+) vs sharded engine ([\d.]+)", out)
    assert reload and abs(float(reload.group(1)) - float(reload.group(2))) < 1e-4, out[-2000:]
