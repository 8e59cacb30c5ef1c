"""Shared driver: run benchmark workers through torchrun in interleaved rounds and report medians.

Interleaving (A, B, C, A, B, C, ...) spreads this noisy machine's slow moments over all systems,
so the ratios are fairer than running each system's rounds back to back.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
DS_PYTHON_DEFAULT = "/work/dsvenv/bin/python"
EXIT_ABORT = "terminate called without an active exception"
# The GPT that bench_zero12, bench_zero3 and bench_offload train (the worker's defaults).
MODEL = dict(vocab=8192, seq=128, layers=6, hidden=512, heads=8)


def gpt_config():
    """The benchmark model's GPTConfig (examples/gpt.py), for counting its parameters."""
    sys.path.insert(0, str(HERE.parent / "examples"))
    from gpt import GPTConfig

    return GPTConfig(vocab_size=MODEL["vocab"], seq_len=MODEL["seq"], num_layers=MODEL["layers"],
                     hidden_size=MODEL["hidden"], num_heads=MODEL["heads"], tie_embeddings=False)


@dataclass
class Run:
    label: str
    python: str
    args: list[str]
    results: list[dict] = field(default_factory=list)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def deepspeed_python(path: str | None) -> str | None:
    """The interpreter of a DeepSpeed install, if one is usable (DeepSpeed is a peer, never a dependency)."""
    candidate = path or os.environ.get("SHARDSPEED_DS_PYTHON") or DS_PYTHON_DEFAULT
    if not candidate or not Path(candidate).exists():
        return None
    ok = subprocess.run([candidate, "-c", "import deepspeed"], capture_output=True,
                        env={**os.environ, "DS_ACCELERATOR": "cpu"}).returncode == 0
    return candidate if ok else None


def run_once(run: Run, world: int, worker: str = "_gpt_worker.py", timeout: float = 900) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu",
           "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache/shardspeed_bench_ext")),
           "PYTHONPATH": str(HERE.parent) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [run.python, "-m", "torch.distributed.run", f"--nproc_per_node={world}", "--nnodes=1",
           f"--master_port={free_port()}", str(HERE / worker), *run.args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if lines and proc.returncode != 0 and EXIT_ABORT in proc.stderr:
        # The run finished and reported; a gloo process group torch (FSDP2's device mesh, in practice)
        # still held at interpreter teardown aborted the process on its way out. Keep the result.
        print(f"  note: {run.label} aborted at exit after reporting ({EXIT_ABORT!r}); result kept", flush=True)
        return json.loads(lines[-1])
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{run.label} failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1])


def interleave(runs: list[Run], world: int, rounds: int, worker: str = "_gpt_worker.py") -> None:
    for r in range(rounds):
        for run in runs:
            result = run_once(run, world, worker)
            run.results.append(result)
            print(f"  round {r + 1} {run.label:<28} {result['tokens_per_s']:8.1f} tokens/s  "
                  f"peak RSS {max(result['peak_rss_mib']):7.1f} MiB", flush=True)


def median(run: Run, key: str = "tokens_per_s") -> float:
    return statistics.median(r[key] for r in run.results)


def median_peak_rss(run: Run) -> float:
    return statistics.median(max(r["peak_rss_mib"]) for r in run.results)


def median_state_per_param(run: Run) -> float:
    """Model-state bytes per model parameter on the rank that holds the most, median over rounds."""
    return statistics.median(max(r["model_state_bytes"]) / r["params"] for r in run.results)


def median_phase(run: Run, phase: str) -> float:
    """Median over rounds of rank 0's mean seconds per step in `phase` (forward, backward, step)."""
    return statistics.median(r["phase_s"][phase] for r in run.results)


def per_round(run: Run, key: str = "tokens_per_s") -> str:
    return ", ".join(f"{r[key]:.0f}" for r in run.results)


def table(runs: list[Run], baseline: Run) -> str:
    base = median(baseline)
    rows = [f"| {'run':<28} | tokens/s (median) | x {baseline.label} | peak RSS/rank MiB (median) |",
            f"| {'-' * 28} | ---: | ---: | ---: |"]
    for run in runs:
        rows.append(f"| {run.label:<28} | {median(run):.1f} | {median(run) / base:.3f} | {median_peak_rss(run):.0f} |")
    return "\n".join(rows)


def python() -> str:
    return sys.executable


__all__ = ["Run", "deepspeed_python", "interleave", "median", "median_peak_rss", "median_phase",
           "median_state_per_param", "per_round", "python", "shutil", "table"]
