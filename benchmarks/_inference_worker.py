"""One process (one rank under torchrun) of the decode benchmark (bench_inference.py `decode`).

    --system shardspeed --tp 1: HF `generate`, `shardspeed.init_inference(replace_with_kernel_inject=True)`
                                (the fast path) and `init_inference` without kernel injection, plus the
                                weight-read floor (below);
    --system shardspeed --tp 2: the fast path and the plain engine, `tensor_parallel={"tp_size": 2}`;
    --system deepspeed  --tp 1: HF `generate` (a calibration row: the same code as shardspeed's process
                                runs) and `deepspeed.init_inference(model, dtype=torch.float32)`;
    --system deepspeed  --tp 2: `deepspeed.init_inference(..., tensor_parallel={"tp_size": 2})` (AutoTP).

Every engine gets its own model, built from the same seed (init_inference shards and re-points the
model it is given). The systems of one process are timed in turn within each repeat
(`_fast_decode_bench.interleaved_rates`: one warm-up call each, then the median of `--repeats`
greedy `generate` calls of exactly `--new-tokens` tokens per row, prefill included). Every rank
times; rank 0 prints one JSON line. (Importing `_fast_decode_bench` also imports shardspeed's
fast_decode module in DeepSpeed's process; nothing of it runs there.) Before timing, each system's greedy tokens (batch 2, all new
tokens) are compared with an unsharded HF model's in the same process (`matches_hf`). At TP 2 each
process also times one all-reduce of a decode step's activations (`all_reduce_us`; shardspeed's
also over plain gloo, `gloo_all_reduce_us`): the fast path and AutoTP do two per layer and one for
the LM head per step.

The weight-read floor (--system shardspeed --tp 1, timed in turn with the other systems): the
fastest a decoder that multiplies every Linear weight (lm_head included) once per step could go:
`prompt` rows per sequence through every weight, then `new_tokens - 1` steps of one row per
sequence, no attention, norms, RoPE or sampling. Its tokens/s bounds any fp32 decode path on this
CPU; its GB/s is the weight bytes over the per-step time.

DeepSpeed on CPU: kernel injection needs CUDA ops (`init_inference(replace_with_kernel_inject=True)`
fails with "This op had not been implemented on CPU backend."), so at TP 1 DeepSpeed's engine runs
the Hugging Face model itself. Its TP all-reduce is the shm op (`inference_all_reduce`), which reads
`LOCAL_SIZE` (exported by the `deepspeed` launcher, not by torchrun) and segfaults on its first call
when it is missing: the worker sets it from torchrun's LOCAL_WORLD_SIZE. The op also leaves a ~66 MB
file per rank in /dev/shm; the worker removes its own at the end.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _fast_decode_bench import interleaved_rates  # noqa: E402


def parse() -> argparse.Namespace:
    """The model's dimensions come from the driver (bench_inference.DECODE_MODEL); the rest has defaults."""
    p = argparse.ArgumentParser()
    p.add_argument("--system", choices=["shardspeed", "deepspeed"], required=True)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    for name, default in {"tp": 1, "prompt-len": 32, "new-tokens": 64, "repeats": 3, "local_rank": -1}.items():
        p.add_argument(f"--{name}", type=int, default=default)
    for name in ("hidden", "layers", "heads", "kv-heads", "intermediate", "vocab"):
        p.add_argument(f"--{name}", type=int, required=True)
    return p.parse_args()


def build_llama(args: argparse.Namespace) -> Any:
    """The benchmark Llama: random weights from seed 0, fp32, tied embeddings, default (sdpa) attention."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=args.hidden, intermediate_size=args.intermediate, num_hidden_layers=args.layers,
                         num_attention_heads=args.heads, num_key_value_heads=args.kv_heads, vocab_size=args.vocab,
                         max_position_embeddings=1024, tie_word_embeddings=True, pad_token_id=0, eos_token_id=1,
                         bos_token_id=2)
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


class Generator:
    """What `interleaved_rates` drives: an engine's `generate`, with the `config` and `device` it reads."""

    def __init__(self, engine: Any, config: Any) -> None:
        self.engine, self.config, self.device = engine, config, torch.device("cpu")

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        return self.engine.generate(*args, **kwargs)


def max_out_tokens(args: argparse.Namespace) -> int:
    return args.prompt_len + args.new_tokens


def shardspeed_systems(args: argparse.Namespace) -> dict[str, Any]:
    import shardspeed

    systems: dict[str, Any] = {}
    if args.tp == 1:
        hf = build_llama(args)
        systems["HF generate"] = Generator(hf, hf.config)
    tp = {"tensor_parallel": {"tp_size": args.tp}} if args.tp > 1 else {}
    for label, inject in (("shardspeed fast path", True), ("shardspeed plain", False)):
        model = build_llama(args)
        engine = shardspeed.init_inference(model, dtype=torch.float32, replace_with_kernel_inject=inject,
                                           max_out_tokens=max_out_tokens(args), **tp)
        systems[f"{label} tp{args.tp}"] = Generator(engine, model.config)
    return systems


def deepspeed_systems(args: argparse.Namespace) -> dict[str, Any]:
    os.environ.setdefault("LOCAL_SIZE", os.environ.get("LOCAL_WORLD_SIZE", "1"))
    import deepspeed

    systems: dict[str, Any] = {}
    tp: dict[str, Any] = {}
    if args.tp == 1:
        hf = build_llama(args)
        systems["HF generate (DeepSpeed's process)"] = Generator(hf, hf.config)
    else:
        deepspeed.init_distributed(dist_backend="gloo")
        tp = {"tensor_parallel": {"tp_size": args.tp}}
    model = build_llama(args)
    engine = deepspeed.init_inference(model, dtype=torch.float32, max_out_tokens=max_out_tokens(args), **tp)
    label = "DeepSpeed init_inference" if args.tp == 1 else "DeepSpeed AutoTP"
    systems[f"{label} tp{args.tp}"] = Generator(engine, model.config)
    return systems


def matches_hf(systems: dict[str, Any], args: argparse.Namespace) -> dict[str, bool]:
    """Each system's greedy tokens (batch 2) equal to an unsharded HF model's, in this process."""
    reference = build_llama(args)
    ids = torch.randint(3, args.vocab, (2, args.prompt_len), generator=torch.Generator().manual_seed(1))
    kwargs = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False, pad_token_id=0)
    expected = reference.generate(ids, **kwargs)
    return {name: bool(torch.equal(system.generate(ids, **kwargs), expected)) for name, system in systems.items()}


class WeightFloor:
    """The weight-read floor as a system `interleaved_rates` can time beside the others: its `generate`
    multiplies every nn.Linear weight (lm_head included; tied to the embedding, counted once) by the
    prompt's rows, then by one row per sequence for each further token."""

    def __init__(self, model: Any) -> None:
        self.config, self.device = model.config, torch.device("cpu")
        self.weights = [m.weight.detach() for m in model.modules() if isinstance(m, torch.nn.Linear)]
        self.nbytes = sum(w.numel() * w.element_size() for w in self.weights)
        self._inputs: dict[int, list[torch.Tensor]] = {}
        self.prefill_s: list[float] = []
        self.step_s: list[float] = []

    def _chain(self, rows: int, steps: int) -> float:
        if rows not in self._inputs:
            self._inputs[rows] = [torch.randn(rows, w.shape[1]) for w in self.weights]
        inputs = self._inputs[rows]
        start = time.perf_counter()
        for _ in range(steps):
            for x, w in zip(inputs, self.weights):
                F.linear(x, w)
        return time.perf_counter() - start

    def generate(self, ids: torch.Tensor, max_new_tokens: int, **_: Any) -> None:
        self._chain(ids.shape[0], 0)  # inputs made before timing starts
        self._chain(ids.numel(), 0)
        self.prefill_s.append(self._chain(ids.numel(), 1))
        self.step_s.append(self._chain(ids.shape[0], max_new_tokens - 1) / (max_new_tokens - 1))

    def summary(self, tokens_per_s: float) -> dict[str, float]:
        """The timed calls' medians (the warm-up call dropped), then ready for the next batch size."""
        step, prefill = statistics.median(self.step_s[1:]), statistics.median(self.prefill_s[1:])
        self.step_s, self.prefill_s = [], []
        return {"tokens_per_s": tokens_per_s, "step_ms": step * 1e3, "prefill_ms": prefill * 1e3,
                "gb_per_s": self.nbytes / step / 1e9, "weight_mib": self.nbytes / (1 << 20)}


def all_reduce_us(system: str, batch: int, hidden: int, calls: int = 200) -> float:
    """Median microseconds of one all-reduce of a decode step's [batch, 1, hidden] fp32 activations over
    the world (the tensor group here), by the collective each system's tensor parallelism uses:
    shardspeed's shared-memory all-reduce (`comm.shm_allreduce`, what its CPU engine uses; "gloo": plain
    torch.distributed over gloo, for reference), DeepSpeed's `inference_all_reduce` (shm) for DeepSpeed."""
    import torch.distributed as dist

    if system == "deepspeed":
        import deepspeed.comm as ds_comm

        reduce = ds_comm.inference_all_reduce
    elif system == "gloo":
        reduce = dist.all_reduce
    else:
        from shardspeed.comm.shm_allreduce import ShmAllReduce
        from shardspeed.comm.topology import AxisGroup

        reduce = ShmAllReduce(AxisGroup(None, tuple(range(dist.get_world_size())), dist.get_rank()))
    x = torch.randn(batch, 1, hidden)
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        reduce(x)
        times.append(time.perf_counter() - start)
    return statistics.median(times[calls // 10:]) * 1e6


def remove_shm_buffers() -> None:
    """DeepSpeed's shm all-reduce leaves a ~66 MB file per rank in /dev/shm (RAM) when the process ends:
    remove this rank's, once every rank is past its last collective."""
    addr, port, rank = (os.environ.get(k, "") for k in ("MASTER_ADDR", "MASTER_PORT", "RANK"))
    for path in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{addr}_{port}_{rank}"):
        path.unlink(missing_ok=True)


def vm_hwm_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return 0.0


def gather(value: Any) -> list[Any]:
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [value]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def main() -> None:
    args = parse()
    torch.set_num_threads(1)
    systems = shardspeed_systems(args) if args.system == "shardspeed" else deepspeed_systems(args)
    params = sum(p.numel() for p in build_llama(args).parameters())
    matches = matches_hf(systems, args)
    result: dict[str, Any] = {"system": args.system, "tp": args.tp, "params": params, "matches_hf": matches}
    floor = WeightFloor(build_llama(args)) if args.system == "shardspeed" and args.tp == 1 else None
    if floor is not None:
        systems["floor"] = floor
    for batch in args.batches:
        for name, rate in interleaved_rates(systems, batch, args.prompt_len, args.new_tokens, args.repeats).items():
            result[f"{name}|b{batch}"] = floor.summary(rate) if name == "floor" and floor is not None else rate
        if args.tp > 1:
            result[f"all_reduce_us|b{batch}"] = all_reduce_us(args.system, batch, args.hidden)
            if args.system == "shardspeed":
                result[f"gloo_all_reduce_us|b{batch}"] = all_reduce_us("gloo", batch, args.hidden)
    result["peak_rss_mib"] = gather(round(vm_hwm_mib(), 1))  # also: every rank is past its collectives
    result["loadavg_1m"] = os.getloadavg()[0]
    if args.system == "deepspeed" and args.tp > 1:
        remove_shm_buffers()
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
