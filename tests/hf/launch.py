"""Launch a Hugging Face script the way users do (torchrun, accelerate launch, the shardspeed launcher)
and read back the JSON line it prints as `RESULT {...}` on its main process.

Every launch has a deadline, so a hang fails the test instead of stalling the suite; a non-zero exit
fails it with the tail of the output.
"""
from __future__ import annotations

import importlib.metadata
import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

SCRIPTS = Path(__file__).resolve().parent / "scripts"
REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
DEADLINE_S = 240


def require_alias() -> None:
    """The HF tests run on the `deepspeed` alias that scripts/setup.sh installs; say so if it is missing."""
    try:
        version = importlib.metadata.version("deepspeed")
    except importlib.metadata.PackageNotFoundError:
        pytest.fail("the `deepspeed` alias is not installed in this environment: run `bash scripts/setup.sh` "
                    "(or `shardspeed install-deepspeed-alias`)")
    if "+shardspeed." not in version:
        pytest.fail(f"a real DeepSpeed {version} is installed here; the HF tests need shardspeed's alias instead "
                    "(use a separate environment)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(world: int) -> list[str]:
    return [str(BIN / "torchrun"), "--standalone", f"--nproc_per_node={world}"]


def run(command: list[str], cwd: Path, deadline: float = DEADLINE_S) -> dict[str, Any]:
    """Run `command`, fail on a non-zero exit or a missed deadline, return the last RESULT line's JSON."""
    done = _launch(command, cwd, deadline)
    output = done.stdout + done.stderr
    if done.returncode != 0:
        pytest.fail(f"`{' '.join(command)}` exited {done.returncode}; output tail:\n{output[-6000:]}")
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if not lines:
        pytest.fail(f"`{' '.join(command)}` printed no RESULT line; output tail:\n{output[-6000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def run_output(command: list[str], cwd: Path, deadline: float = DEADLINE_S) -> str:
    """Run `command`, fail on a non-zero exit or a missed deadline, return its output."""
    done = _launch(command, cwd, deadline)
    output = done.stdout + done.stderr
    if done.returncode != 0:
        pytest.fail(f"`{' '.join(command)}` exited {done.returncode}; output tail:\n{output[-6000:]}")
    return output


def run_failing(command: list[str], cwd: Path, deadline: float = DEADLINE_S) -> str:
    """Run `command`, which must exit non-zero within the deadline; return its output."""
    done = _launch(command, cwd, deadline)
    if done.returncode == 0:
        pytest.fail(f"`{' '.join(command)}` was expected to fail but exited 0")
    return done.stdout + done.stderr


def _launch(command: list[str], cwd: Path, deadline: float) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1",
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    try:
        return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=deadline)
    except subprocess.TimeoutExpired as err:
        out = err.stdout.decode(errors="replace") if isinstance(err.stdout, bytes) else (err.stdout or "")
        pytest.fail(f"`{' '.join(command)}` passed its {deadline:.0f}s deadline (hang?); output tail:\n{out[-3000:]}")


def save_tiny_llama(path: Path) -> Path:
    """The scripts' tiny random Llama (seed 0), saved for their --from_pretrained: every run of a test
    module starts from these weights."""
    import torch

    from tests.hf.scripts.trainer_run import model_config
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    LlamaForCausalLM(model_config()).save_pretrained(path)
    return path


def write_config(path: Path, config: dict[str, Any]) -> str:
    path.write_text(json.dumps(config, indent=1))
    return str(path)
