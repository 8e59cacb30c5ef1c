"""One rank of a side-by-side training benchmark: the same GPT, data and optimizer under
torch DDP, FSDP2, shardspeed or DeepSpeed, timed after a warm-up. Started by a benchmark driver
through torchrun; rank 0 prints one JSON line with tokens/s, the peak resident memory of every rank,
the model-state bytes of every rank (total, and by kind) and the mean seconds per phase (forward,
backward, step) on rank 0.

Model-state bytes are measured once, after the timed steps, between one more backward and its
optimizer step: the point where gradients, optimizer states and parameters all exist. For shardspeed
the breakdown is `engine.memory_breakdown()`; its `nvme_*` entries (bytes in swap files, with
`offload_optimizer.device: nvme`) are reported in the breakdown but left out of the resident total.

ZeRO-Offload (`--offload_optimizer`, `--offload_param`, `--nvme_path`, `--sub_group_size`,
`--pipeline_rw`) goes into the same `zero_optimization` section for shardspeed and DeepSpeed. Both
build the optimizer from the config's `optimizer` section (AdamW, lr 1e-4, weight decay 0.01,
gradient clipping 1.0): DeepSpeed then builds its DeepSpeedCPUAdam (adamw_mode) whenever the
optimizer is offloaded, shardspeed steps torch's AdamW (fused CPU kernel) on the host copies.
With `--timers 1` shardspeed runs with `wall_clock_breakdown` on and the JSON gets rank 0's
seconds per timed step in each offload timer (`offload_s`): on a CPU device its timers only read
`time.perf_counter()` (no device synchronization), so they cost next to nothing.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "examples"))
from gpt import GPT, GPTConfig  # noqa: E402


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser()
    p.add_argument("--system", choices=["ddp", "fsdp2", "shardspeed", "deepspeed"], required=True)
    p.add_argument("--stage", type=int, default=0)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--micro", type=int, default=4)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--bucket", type=float, default=6.5e6, help="Gradient bucket elements (DDP: the same bytes).")
    p.add_argument("--overlap_comm", type=int, choices=[0, 1], default=None,
                   help="Set zero_optimization.overlap_comm (shardspeed/DeepSpeed); unset leaves the key out.")
    p.add_argument("--reshard_after_forward", type=int, choices=[0, 1], default=0,
                   help="FSDP2: 0 keeps parameters gathered from forward through backward (ZeRO-2 peer), 1 is "
                        "FSDP2's default resharding (ZeRO-3 peer).")
    p.add_argument("--max_live", type=int, default=None, help="zero_optimization.stage3_max_live_parameters (unset: left out).")
    p.add_argument("--max_reuse", type=int, default=None, help="zero_optimization.stage3_max_reuse_distance (unset: left out).")
    p.add_argument("--offload_optimizer", choices=["none", "cpu", "nvme"], default="none",
                   help="zero_optimization.offload_optimizer.device (none: the section is left out).")
    p.add_argument("--offload_param", choices=["none", "cpu", "nvme"], default="none",
                   help="zero_optimization.offload_param.device, stage 3 (none: the section is left out).")
    p.add_argument("--nvme_path", default=None, help="nvme_path of the offload sections whose device is nvme.")
    p.add_argument("--sub_group_size", type=int, default=None, help="zero_optimization.sub_group_size (unset: left out).")
    p.add_argument("--pipeline_rw", type=int, choices=[0, 1], default=None,
                   help="offload_optimizer.pipeline_read and pipeline_write (unset: left out).")
    p.add_argument("--timers", type=int, choices=[0, 1], default=0,
                   help="shardspeed: wall_clock_breakdown on, offload timers reported per step as `offload_s`.")
    p.add_argument("--local_rank", type=int, default=-1)
    args = p.parse_args()
    if "nvme" in (args.offload_optimizer, args.offload_param) and not args.nvme_path:
        p.error("--nvme_path is needed when an offload device is nvme")
    return args


def offload_config(args: argparse.Namespace) -> dict:
    """The ZeRO-Offload keys of `zero_optimization`; empty when nothing is offloaded or set."""
    zero: dict = {}
    if args.offload_optimizer != "none":
        section: dict = {"device": args.offload_optimizer}
        if args.offload_optimizer == "nvme":
            section["nvme_path"] = args.nvme_path
        if args.pipeline_rw is not None:
            section["pipeline_read"] = section["pipeline_write"] = bool(args.pipeline_rw)
        zero["offload_optimizer"] = section
    if args.offload_param != "none":
        section = {"device": args.offload_param}
        if args.offload_param == "nvme":
            section["nvme_path"] = args.nvme_path
        zero["offload_param"] = section
    if args.sub_group_size is not None:
        zero["sub_group_size"] = args.sub_group_size
    return zero


def ds_config(args: argparse.Namespace) -> dict:
    zero: dict = {"stage": args.stage, "reduce_bucket_size": int(args.bucket), "allgather_bucket_size": int(args.bucket)}
    if args.overlap_comm is not None:
        zero["overlap_comm"] = bool(args.overlap_comm)
    if args.max_live is not None:
        zero["stage3_max_live_parameters"] = args.max_live
    if args.max_reuse is not None:
        zero["stage3_max_reuse_distance"] = args.max_reuse
    zero.update(offload_config(args))
    return {
        "train_micro_batch_size_per_gpu": args.micro,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 1.0,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "weight_decay": 0.01}},
        "zero_optimization": zero,
        "steps_per_print": 10**9,
    }


@dataclass
class System:
    """One training system, split into phases so that each can be timed."""
    forward: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    backward: Callable[[torch.Tensor], None]
    step: Callable[[], None]
    model_state: Callable[[], dict[str, int]]  # bytes this rank holds, by kind
    reset_timers: Callable[[], None] | None = None  # forget what the warm-up steps recorded
    timers_ms: Callable[[], dict[str, float]] | None = None  # total ms per named timer since the reset
    info: dict = field(default_factory=dict)  # extra JSON keys (engines: which optimizer steps)


def nbytes(tensors: Iterable[torch.Tensor | None]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def state_tensors(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v) and v.dim() > 0]


def storage_bytes(tensors: Iterable[torch.Tensor | None], seen: set[int]) -> int:
    """Bytes of the distinct storages behind `tensors` not already in `seen` (views count once)."""
    total = 0
    for t in tensors:
        if t is None or not torch.is_tensor(t) or t.numel() == 0:
            continue
        storage = t.untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total += storage.nbytes()
    return total


def torch_optimizer_phases(module: torch.nn.Module, opt: torch.optim.Optimizer) -> tuple[Callable, Callable, Callable]:
    def forward(x, y):
        return module(x, y)

    def backward(loss):
        loss.backward()

    def step():
        torch.nn.utils.clip_grad_norm_(module.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
    return forward, backward, step


def build_ddp(args: argparse.Namespace, model: torch.nn.Module) -> System:
    from torch.nn.parallel import DistributedDataParallel as DDP

    dist.init_process_group("gloo")
    ddp = DDP(model, bucket_cap_mb=args.bucket * 4 / 2**20)
    opt = torch.optim.AdamW(ddp.parameters(), lr=1e-4, weight_decay=0.01)

    def model_state():
        # Parameters, their .grad and AdamW's exp_avg/exp_avg_sq. DDP's reducer also keeps flat
        # bucket buffers the gradients are copied out of (gradient_as_bucket_view is off here, as in
        # the stage-0 benchmark); they are not counted, so DDP's figure is a lower bound.
        params = list(model.parameters())
        return {"parameters": nbytes(params), "gradients": nbytes(p.grad for p in params),
                "optimizer_states": nbytes(state_tensors(opt))}
    return System(*torch_optimizer_phases(ddp, opt), model_state)


def build_fsdp2(args: argparse.Namespace, model: torch.nn.Module) -> System:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    # reshard_after_forward=False is the closest peer to ZeRO-2: parameters stay unsharded from
    # forward through backward (no re-gather in backward); gradients and optimizer states are
    # sharded. True (FSDP2's default) frees each block's parameters after its forward and gathers
    # them again in backward: the ZeRO-3 peer.
    reshard = bool(args.reshard_after_forward)
    for block in model.blocks:
        fully_shard(block, mesh=mesh, reshard_after_forward=reshard)
    fully_shard(model, mesh=mesh, reshard_after_forward=reshard)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01)

    def local(t):
        return None if t is None else (t.to_local() if hasattr(t, "to_local") else t)

    def model_state():
        # Local shards of the parameters, of their gradients and of AdamW's states (DTensors). Measured
        # after backward, when the unsharded parameters have been freed again. Not counted: the
        # unsharded parameters gathered during forward and backward (all of them from forward through
        # backward without resharding, 4 bytes/param; a few blocks at a time with resharding).
        params = list(model.parameters())
        return {"parameters": nbytes(local(p) for p in params), "gradients": nbytes(local(p.grad) for p in params),
                "optimizer_states": nbytes(local(t) for t in state_tensors(opt))}
    return System(*torch_optimizer_phases(model, opt), model_state)


def build_engine(args: argparse.Namespace, model: torch.nn.Module) -> System:
    if args.system == "shardspeed":
        import shardspeed as engine_lib
    else:
        import deepspeed as engine_lib

        engine_lib.init_distributed(dist_backend="gloo")
    config = ds_config(args)
    if args.system == "shardspeed" and args.timers:
        config["wall_clock_breakdown"] = True
    engine, _, _, _ = engine_lib.initialize(model=model, model_parameters=model.parameters(), config=config)
    if args.system == "shardspeed":
        def model_state():
            return dict(engine.memory_breakdown())
    elif args.stage == 3:
        def model_state():
            return deepspeed_stage3_model_state(engine, model)
    else:
        def model_state():
            return deepspeed_model_state(engine, model)

    def forward(x, y):
        return engine(x, y)
    info = {"zero_config": config["zero_optimization"], "optimizer": inner_optimizer_name(engine)}
    if args.system != "shardspeed" or not args.timers:
        return System(forward, engine.backward, engine.step, model_state, info=info)

    def reset_timers():
        for timer in engine.timers.get_timers().values():
            timer.reset()

    def timers_ms():
        return {name: timer.elapsed(reset=False) for name, timer in engine.timers.get_timers().items()}
    return System(forward, engine.backward, engine.step, model_state, reset_timers, timers_ms, info)


def inner_optimizer_name(engine) -> str:
    """The class that steps the parameters: the torch optimizer inside the ZeRO wrapper (DeepSpeed: its
    `.optimizer`; shardspeed's engine keeps the user's optimizer as `.optimizer`)."""
    opt = engine.optimizer
    inner = getattr(opt, "optimizer", opt)
    return type(inner).__name__


def deepspeed_model_state(engine, model: torch.nn.Module) -> dict[str, int]:
    """What DeepSpeed holds, by distinct storage (its params are views into flat groups, its gradient
    partitions views into shared buffers): the flat fp32 model parameters (or the params themselves),
    the full gradients the params still hold (.grad and DeepSpeed's `grad_accum`), the gradient
    partitions (`averaged_gradients`, `grads_in_partition`, `all_grad_tensors`, the IPG bucket
    buffers while they exist), its separate fp32 partition (`single_partition_of_fp32_groups`, a copy
    even when the model is fp32) and the torch optimizer's states. Temporary buffers inside a
    collective are out of reach."""
    opt = engine.optimizer
    seen: set[int] = set()
    params = list(model.parameters())
    out = {"parameters": storage_bytes([*getattr(opt, "bit16_groups_flat", []), *params], seen)}
    full_grads = [p.grad for p in params] + [getattr(p, "grad_accum", None) for p in params]
    partitions: list = []
    for value in getattr(opt, "averaged_gradients", {}).values():
        partitions.extend(value if isinstance(value, (list, tuple)) else [value])
    for value in (getattr(opt, "all_grad_tensors", {}) or {}).values():
        partitions.extend(value or [])
    partitions.append(getattr(opt, "grads_in_partition", None))
    for bucket in getattr(opt, "ipg_buckets", {}).values():
        partitions.extend(bucket.buffer)
    fp32 = list(getattr(opt, "single_partition_of_fp32_groups", []))
    partitions.extend(t.grad for t in fp32)
    out["gradients"] = storage_bytes(full_grads + partitions, seen)
    out["master_weights"] = storage_bytes(fp32, seen)
    inner = getattr(opt, "optimizer", opt)
    out["optimizer_states"] = storage_bytes(state_tensors(inner), seen)
    return out


def deepspeed_stage3_model_state(engine, model: torch.nn.Module) -> dict[str, int]:
    """What DeepSpeed's ZeRO-3 optimizer holds on this rank, by distinct storage, keyed like
    shardspeed's `memory_breakdown()`: the parameter partitions (`fp16_partitioned_groups_flat`,
    which every `ds_tensor` is a view of, plus any `ds_tensor` outside it), the persistent
    parameters' whole data (`ds_persist`, kept gathered), the unsharded data of any other parameter
    still gathered at this point (`gathered_parameters`), the gradient partitions
    (`grad_partitions_flat_buffer`, which `averaged_gradients` views, plus any `.grad` still held),
    the IPG bucket buffer (`reduce_bucket_size` elements, allocated once and kept:
    `gradient_buckets`), the fp32 partition the optimizer steps (`fp32_partitioned_groups_flat`,
    a copy even when the model is fp32: `master_weights`) and the torch optimizer's states."""
    opt = engine.optimizer
    seen: set[int] = set()
    params = list(model.parameters())
    out = {"parameters": storage_bytes([*getattr(opt, "fp16_partitioned_groups_flat", []),
                                        *(getattr(p, "ds_tensor", None) for p in params)], seen)}
    persistent = [p.data for p in params if getattr(p, "ds_persist", False)]
    out["persistent_parameters"] = storage_bytes(persistent, seen)
    out["gathered_parameters"] = storage_bytes([p.data for p in params if not getattr(p, "ds_persist", False)], seen)
    grads: list = [getattr(opt, "grad_partitions_flat_buffer", None)]
    for value in (getattr(opt, "averaged_gradients", {}) or {}).values():
        grads.extend(value if isinstance(value, (list, tuple)) else [value])
    grads.extend(p.grad for p in params)
    fp32 = list(getattr(opt, "fp32_partitioned_groups_flat", []))
    grads.extend(t.grad for t in fp32)
    out["gradients"] = storage_bytes(grads, seen)
    out["gradient_buckets"] = storage_bytes([b.buffer for b in getattr(opt, "ipg_buckets", {}).values()], seen)
    out["master_weights"] = storage_bytes(fp32, seen)
    inner = getattr(opt, "optimizer", opt)
    out["optimizer_states"] = storage_bytes(state_tensors(inner), seen)
    return out


def build(args: argparse.Namespace, model: torch.nn.Module) -> System:
    if args.system == "ddp":
        return build_ddp(args, model)
    if args.system == "fsdp2":
        return build_fsdp2(args, model)
    return build_engine(args, model)


def gather(value: float, world: int) -> list[float]:
    gathered = [torch.zeros(1, dtype=torch.float64) for _ in range(world)]
    dist.all_gather(gathered, torch.tensor([value], dtype=torch.float64))
    return [t.item() for t in gathered]


def main() -> None:
    args = parse()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=args.vocab, seq_len=args.seq, num_layers=args.layers, hidden_size=args.hidden,
                          num_heads=args.heads, tie_embeddings=False))
    params = sum(p.numel() for p in model.parameters())  # before any system shards them
    system = build(args, model)
    rank, world = dist.get_rank(), dist.get_world_size()
    g = torch.Generator().manual_seed(1 + rank)
    data = [torch.randint(0, args.vocab, (args.micro, args.seq + 1), generator=g) for _ in range(4)]
    for i in range(args.warmup):
        system.backward(system.forward(data[i % 4][:, :-1], data[i % 4][:, 1:]))
        system.step()
    if system.reset_timers is not None:
        system.reset_timers()
    dist.barrier()
    phase = {"forward": 0.0, "backward": 0.0, "step": 0.0}
    t0 = time.perf_counter()
    for i in range(args.steps):
        ta = time.perf_counter()
        loss = system.forward(data[i % 4][:, :-1], data[i % 4][:, 1:])
        tb = time.perf_counter()
        system.backward(loss)
        tc = time.perf_counter()
        system.step()
        td = time.perf_counter()
        phase["forward"] += tb - ta
        phase["backward"] += tc - tb
        phase["step"] += td - tc
    dist.barrier()
    elapsed = time.perf_counter() - t0
    timers = system.timers_ms() if system.timers_ms is not None else None
    rss = gather(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, world)
    # One more step, untimed, to measure model state between its backward and its optimizer step.
    system.backward(system.forward(data[0][:, :-1], data[0][:, 1:]))
    breakdown = system.model_state()
    system.step()
    # Bytes in swap files (`nvme_*`) are not held in memory: left out of the resident total.
    state = gather(float(sum(v for k, v in breakdown.items() if not k.startswith("nvme_"))), world)
    breakdowns: list = [None] * world
    dist.all_gather_object(breakdowns, breakdown)
    if rank == 0:
        extra = dict(system.info)
        if timers is not None:
            extra["offload_s"] = {k: round(v / 1000.0 / args.steps, 4) for k, v in timers.items()
                                  if k not in ("forward", "backward", "step")}
        print(json.dumps({
            "system": args.system, "stage": args.stage, "world": world, "params": params,
            "tokens_per_s": args.steps * args.micro * args.seq * world / elapsed,
            "peak_rss_mib": [round(v, 1) for v in rss], "final_loss": loss.item(),
            "model_state_bytes": [int(v) for v in state], "model_state_breakdown": breakdown,
            "model_state_breakdown_ranks": breakdowns,
            "phase_s": {k: round(v / args.steps, 4) for k, v in phase.items()}, **extra,
        }), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
