"""CPU Adam step speed: shardspeed's DeepSpeedCPUAdam against torch's AdamW paths and DeepSpeed's op.

An fp32 AdamW step reads parameter, gradient and both moments and writes parameter and moments:
28 bytes per parameter, so its bytes/s is compared with a plain ``dst.copy_(src)`` and with an
in-place ``buf.add_(1)`` measured in the same run (both counted as 8 bytes read + written per
element).  A copy also reads each destination line before writing it (write-allocate), which the
in-place pass, like Adam, does not; so Adam can exceed the "memcpy" figure.  Every system steps one flat tensor of
``--params`` elements, as ZeRO-Offload does with its partition.  Systems are interleaved round by
round (A, B, C, A, B, C) so machine noise spreads over all of them; medians are reported.

DeepSpeed runs in its own virtual environment (``--dsvenv``, default /work/dsvenv) as a worker
subprocess that the parent drives round by round; its CPU Adam op is JIT-built on first use
into ``$TORCH_EXTENSIONS_DIR`` (default ~/.cache/shardspeed_bench_ext), before any timing.

The "unscale+step" rows time what ZeRO does per step with a loss-scale/clip factor f: a separate
``_foreach_mul_(grads, f)`` pass and then the step (DeepSpeed's way), against the factor folded
into the kernel (``step(grad_scale=1/f)``).  f alternates 0.5 / 2.0 so the reused gradient stays
bounded.  A separate 5-step check reports how far apart the two land, and each from float64.

    python benchmarks/bench_cpu_adam.py [--params 100000000] [--threads 2] [--rounds 5] [--steps 5]
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import torch

from shardspeed.offload.cpu_optimizers import DeepSpeedCPUAdam

ADAM_BYTES = 28  # fp32 AdamW: read p, g, m, v (16) + write p, m, v (12)
HYPER = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
FACTORS = (0.5, 2.0)

_DS_WORKER = r"""
import itertools, json, sys, time, torch
n, threads = int(sys.argv[1]), int(sys.argv[2])
torch.set_num_threads(threads)
import deepspeed
from deepspeed.ops.adam import DeepSpeedCPUAdam
p = torch.nn.Parameter(torch.randn(n))
p.grad = torch.randn(n)
opt = DeepSpeedCPUAdam([p], lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01, adamw_mode=True)
opt.step()
factors = itertools.cycle((0.5, 2.0))
print("@@" + json.dumps({"deepspeed": deepspeed.__version__, "torch": torch.__version__}), flush=True)
for line in sys.stdin:
    cmd, steps = line.split()
    t = time.perf_counter()
    for k in range(int(steps)):
        if cmd == "mulstep":
            torch._foreach_mul_([p.grad], next(factors))
        opt.step()
    print("@@" + json.dumps(time.perf_counter() - t), flush=True)
"""


class DeepSpeedWorker:
    """DeepSpeed's DeepSpeedCPUAdam stepping in a subprocess of the DeepSpeed venv, on command."""

    def __init__(self, python: Path, n: int, threads: int, build_timeout_s: float = 1200) -> None:
        env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS=str(threads))
        env.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "shardspeed_bench_ext"))
        self.proc = subprocess.Popen([str(python), "-c", _DS_WORKER, str(n), str(threads)], env=env, text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        self.info = self._reply(build_timeout_s)

    def _reply(self, timeout_s: float) -> object:
        deadline = time.monotonic() + timeout_s
        assert self.proc.stdout is not None
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError(f"DeepSpeed worker exited with code {self.proc.wait()}")
            if line.startswith("@@"):
                return json.loads(line[2:])
        raise TimeoutError("DeepSpeed worker did not answer in time")

    def run(self, cmd: str, steps: int) -> float:
        assert self.proc.stdin is not None
        self.proc.stdin.write(f"{cmd} {steps}\n")
        self.proc.stdin.flush()
        return float(self._reply(600))  # type: ignore[arg-type]

    def close(self) -> None:
        if self.proc.stdin:
            self.proc.stdin.close()
        self.proc.wait(timeout=60)


def _param(n: int, grad: torch.Tensor) -> torch.nn.Parameter:
    p = torch.nn.Parameter(torch.randn(n))
    p.grad = grad
    return p


def _timed(fn: Callable[[int], None]) -> Callable[[int], float]:
    def run(steps: int) -> float:
        t = time.perf_counter()
        for k in range(steps):
            fn(k)
        return time.perf_counter() - t
    return run


def build_systems(n: int, forloop: bool) -> dict[str, Callable[[int], float]]:
    """name -> run(steps) returning seconds; each system is warmed by one step (allocates state)."""
    grad = torch.randn(n)  # shared: no system's speed depends on the gradient's values
    src, dst, buf = torch.randn(n), torch.empty(n), torch.randn(n)
    ours_p = _param(n, grad)
    ours = DeepSpeedCPUAdam([ours_p], **HYPER)
    systems: dict[str, Callable[[int], float]] = {
        "memcpy": _timed(lambda k: dst.copy_(src)),
        "in-place": _timed(lambda k: buf.add_(1.0)),
        "shardspeed DeepSpeedCPUAdam": _timed(lambda k: ours.step()),
    }
    for name, kw in [("torch AdamW fused", dict(fused=True)), ("torch AdamW foreach", dict(foreach=True))] + (
            [("torch AdamW for-loop", dict(foreach=False, fused=False))] if forloop else []):
        opt = torch.optim.AdamW([_param(n, grad)], **HYPER, **kw)
        systems[name] = _timed(lambda k, opt=opt: opt.step())
    kp, km, kv, ks = torch.randn(n), torch.zeros(n), torch.zeros(n), torch.zeros((), dtype=torch.float32)

    def direct(k: int) -> None:
        ks.add_(1)
        torch._fused_adamw_([kp], [grad], [km], [kv], [], [ks], lr=1e-3, beta1=0.9, beta2=0.999,
                            weight_decay=0.01, eps=1e-8, amsgrad=False, maximize=False)
    systems["torch._fused_adamw_ direct"] = _timed(direct)

    factors = itertools.cycle(FACTORS)  # one sequence across both variants and all rounds: grad stays bounded

    def mul_then_step(k: int) -> None:
        torch._foreach_mul_([grad], next(factors))
        ours.step()
    systems["shardspeed unscale: mul + step"] = _timed(mul_then_step)
    systems["shardspeed unscale: folded grad_scale"] = _timed(lambda k: ours.step(grad_scale=1 / next(factors)))
    for run in systems.values():
        run(1)
    return systems


def unscale_agreement(n: int, steps: int = 5) -> dict[str, float]:
    """How far mul-then-step and the folded grad_scale land from each other and from float64 truth.

    A realistic factor: f = 1 / (loss scale 2**16 * clip ratio 1.7), not a power of two, so the
    two fp32 paths round differently; the float64 run (multiply, then step) is the reference.
    """
    f = 1 / (65536 * 1.7)
    gen = torch.Generator().manual_seed(0)
    p0 = torch.randn(n, generator=gen)
    grads = [torch.randn(n, generator=gen) * 65536 * 1.7 for _ in range(steps)]
    out = {}
    for name, dtype, fold in (("mul", torch.float32, False), ("fold", torch.float32, True),
                              ("fp64", torch.float64, False)):
        p = torch.nn.Parameter(p0.to(dtype, copy=True))
        opt = DeepSpeedCPUAdam([p], **HYPER)
        for g in grads:
            p.grad = g.to(dtype, copy=True)  # the steps below change p.grad in place
            if fold:
                opt.step(grad_scale=1 / f)
            else:
                torch._foreach_mul_([p.grad], f)
                opt.step()
        out[name] = p.detach().double()
    return {"max_abs_mul_vs_fold": (out["mul"] - out["fold"]).abs().max().item(),
            "frac_elements_differ": (out["mul"] != out["fold"]).double().mean().item(),
            "max_abs_mul_vs_fp64": (out["mul"] - out["fp64"]).abs().max().item(),
            "max_abs_fold_vs_fp64": (out["fold"] - out["fp64"]).abs().max().item()}


def start_deepspeed(dsvenv: Path, n: int, threads: int) -> tuple[DeepSpeedWorker | None, str]:
    """The DeepSpeed worker, or None and the reason it is skipped."""
    python = dsvenv / "bin" / "python"
    if not python.exists():
        return None, f"DeepSpeed skipped: no {python}"
    try:
        return DeepSpeedWorker(python, n, threads), ""
    except (RuntimeError, TimeoutError, ValueError) as exc:
        return None, f"DeepSpeed skipped: {exc}"


def medians(systems: dict[str, Callable[[int], float]], rounds: int, steps: int) -> dict[str, float]:
    """Seconds per step of each system, median over rounds; systems interleaved within a round."""
    times: dict[str, list[float]] = {name: [] for name in systems}
    for _ in range(rounds):
        for name, run in systems.items():
            times[name].append(run(steps) / steps)
    return {name: statistics.median(t) for name, t in times.items()}


def report(args: argparse.Namespace, med: dict[str, float], ds_version: str | None,
           agreement: dict[str, float]) -> dict[str, object]:
    """Print the table and ratios; return the JSON record."""
    n = args.params
    memcpy_gbs = 8 * n / med.pop("memcpy") / 1e9
    inplace_gbs = 8 * n / med.pop("in-place") / 1e9
    print(f"{n:,} fp32 parameters, {args.threads} threads, median of {args.rounds} rounds x {args.steps} steps; "
          f"torch {torch.__version__} ({torch.backends.cpu.get_cpu_capability()})"
          + (f"; DeepSpeed {ds_version}" if ds_version else ""))
    print(f"{'memcpy (dst.copy_(src), read+write)':40s} {memcpy_gbs:8.2f} GB/s")
    print(f"{'in place (buf.add_(1), read+write)':40s} {inplace_gbs:8.2f} GB/s")
    print(f"{'system':40s} {'ms/step':>9s} {'Mparam/s':>9s} {'GB/s@28B':>9s} {'/memcpy':>8s}")
    rows = {}
    for name, sec in med.items():
        gbs = ADAM_BYTES * n / sec / 1e9
        rows[name] = {"ms_per_step": sec * 1e3, "params_per_s": n / sec, "gb_per_s": gbs}
        print(f"{name:40s} {sec * 1e3:9.1f} {n / sec / 1e6:9.1f} {gbs:9.2f} {gbs / memcpy_gbs:8.2f}")
    ours, folded = med["shardspeed DeepSpeedCPUAdam"], med["shardspeed unscale: folded grad_scale"]
    ratios = {"shardspeed_step_bytes_over_memcpy": ADAM_BYTES * n / ours / 1e9 / memcpy_gbs,
              "shardspeed_step_bytes_over_in_place": ADAM_BYTES * n / ours / 1e9 / inplace_gbs,
              "folded_over_mul_step_speedup": med["shardspeed unscale: mul + step"] / folded}
    if ds_version:
        ratios["shardspeed_over_deepspeed_speed"] = med["DeepSpeed DeepSpeedCPUAdam"] / ours
        ratios["shardspeed_folded_over_deepspeed_mul_step"] = med["DeepSpeed unscale: mul + step"] / folded
    for key, value in ratios.items():
        print(f"{key:48s} {value:6.3f}")
    print(f"unscale, 5 steps at {min(n, 10_000_000):,} params: max |folded - mul+step| "
          f"{agreement['max_abs_mul_vs_fold']:.3g} ({agreement['frac_elements_differ']:.1%} of elements differ); "
          f"vs float64: mul+step {agreement['max_abs_mul_vs_fp64']:.3g}, "
          f"folded {agreement['max_abs_fold_vs_fp64']:.3g}")
    return {"bench": "cpu_adam", "params": n, "threads": args.threads, "rounds": args.rounds, "steps": args.steps,
            "torch": torch.__version__, "deepspeed": ds_version, "memcpy_gb_per_s": memcpy_gbs,
            "in_place_gb_per_s": inplace_gbs, "systems": rows, "ratios": ratios, "unscale_agreement": agreement}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", type=int, default=100_000_000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--forloop", action="store_true", help="also time torch's single-tensor (for-loop) AdamW")
    ap.add_argument("--dsvenv", type=Path, default=Path("/work/dsvenv"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    ds, ds_note = start_deepspeed(args.dsvenv, args.params, args.threads)
    try:
        agreement = unscale_agreement(min(args.params, 10_000_000))
        systems = build_systems(args.params, args.forloop)
        if ds is not None:
            systems["DeepSpeed DeepSpeedCPUAdam"] = lambda steps: ds.run("step", steps)
            systems["DeepSpeed unscale: mul + step"] = lambda steps: ds.run("mulstep", steps)
        med = medians(systems, args.rounds, args.steps)
    finally:
        if ds is not None:
            ds.close()
    record = report(args, med, str(ds.info["deepspeed"]) if ds else None, agreement)  # type: ignore[index]
    if ds_note:
        print(ds_note)
    print(json.dumps({**record, "note": ds_note or None}))


if __name__ == "__main__":
    main()
