"""One rank of the ZeRO-3 host-overhead benchmark: a model so small that compute is negligible
(48 x Linear(64, 64) + Tanh, fp32, micro batch 8), trained under torch DDP, FSDP2, shardspeed or
DeepSpeed ZeRO stage 3, so the time per step is almost all framework Python (hooks, bookkeeping,
partitioning) plus the latency of the collectives each system issues. Started through torchrun by
bench_zero3_host.py; rank 0 prints one JSON line.

Measured on rank 0, after `--warmup` untimed steps:
- `ms_per_step`: the mean wall time of the `--steps` timed steps (between two barriers);
- `collectives`: calls per timed step to each torch.distributed collective function. They are
  counted by wrapping the functions in the `torch.distributed` and `distributed_c10d` namespaces
  before any system is imported or built (DeepSpeed binds some of them when it initializes), and
  only the outermost call counts (in torch 2.13 `all_gather_into_tensor` calls `all_gather_single`);
- `c10d_ops`: collective ops per step seen by torch.profiler in `COUNT_STEPS` extra untimed steps.
  This sees collectives issued from C++ too, which Python wrappers cannot: DDP's reducer
  all-reduces its gradient buckets that way, and FSDP2's gradient clipping reduces the DTensor
  norm through functional collectives.

`--profile PATH`: rank 0 runs the timed steps under cProfile and dumps the stats to PATH (that
run's timings are inflated by cProfile; the driver runs it apart from the timed rounds).
"""
from __future__ import annotations

import argparse
import cProfile
import collections
import functools
import json
import os
import threading
import time
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d

LAYERS = 48
WIDTH = 64
LR = 1e-3
WEIGHT_DECAY = 0.01  # torch AdamW's default, spelled out so DeepSpeed's config builds the same optimizer
CLIP = 1.0
COUNT_STEPS = 2  # profiled steps for `c10d_ops`: collectives repeat exactly from step to step
COLLECTIVES = (
    "all_reduce", "all_reduce_coalesced", "reduce", "all_gather", "all_gather_into_tensor", "all_gather_single",
    "_all_gather_base", "all_gather_object", "reduce_scatter", "reduce_scatter_tensor", "reduce_scatter_single",
    "_reduce_scatter_base", "broadcast", "broadcast_object_list", "all_to_all", "all_to_all_single", "gather",
    "scatter", "barrier", "send", "recv", "isend", "irecv", "batch_isend_irecv",
)

Step = Callable[[torch.Tensor], torch.Tensor]  # one whole training step on a micro batch; returns the loss


class CollectiveCounter:
    """Counts calls to torch.distributed's collectives while `active`, by function name."""

    def __init__(self) -> None:
        self.counts: collections.Counter[str] = collections.Counter()
        self.active = False
        self._local = threading.local()

    def install(self) -> None:
        wrappers: dict[int, Callable] = {}
        for name in COLLECTIVES:
            for module in (dist, c10d):
                original = getattr(module, name, None)
                if callable(original):
                    wrapper = wrappers.setdefault(id(original), self._wrap(name, original))
                    setattr(module, name, wrapper)

    def _wrap(self, name: str, fn: Callable) -> Callable:
        @functools.wraps(fn)
        def counted(*args, **kwargs):
            depth = getattr(self._local, "depth", 0)
            if self.active and depth == 0:
                self.counts[name] += 1
            self._local.depth = depth + 1
            try:
                return fn(*args, **kwargs)
            finally:
                self._local.depth = depth
        return counted


class HostModel(torch.nn.Module):
    """48 x (Linear(64, 64), Tanh); forward returns the loss, so an engine is called as `loss = engine(x)`."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = torch.nn.Sequential(*(m for _ in range(LAYERS) for m in (torch.nn.Linear(WIDTH, WIDTH), torch.nn.Tanh())))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x).pow(2).mean()


def torch_step(module: torch.nn.Module, params: list[torch.nn.Parameter]) -> Step:
    opt = torch.optim.AdamW(params, lr=LR, weight_decay=WEIGHT_DECAY)

    def step(x: torch.Tensor) -> torch.Tensor:
        loss = module(x)
        loss.backward()
        # On FSDP2's DTensor gradients this computes the global norm (one all-reduce).
        torch.nn.utils.clip_grad_norm_(params, CLIP)
        opt.step()
        opt.zero_grad()
        return loss
    return step


def build_ddp(model: HostModel) -> Step:
    from torch.nn.parallel import DistributedDataParallel as DDP

    dist.init_process_group("gloo")
    ddp = DDP(model)
    return torch_step(ddp, list(ddp.parameters()))


def build_fsdp2(model: HostModel) -> Step:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for layer in model.layers:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return torch_step(model, list(model.parameters()))


def engine_config(micro: int) -> dict:
    return {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": CLIP,
        "optimizer": {"type": "AdamW", "params": {"lr": LR, "weight_decay": WEIGHT_DECAY}},
        # Threshold 0: every parameter is partitioned and gathered around its module (none persist).
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
        "steps_per_print": 10**9,
    }


def build_engine(system: str, model: HostModel, micro: int) -> tuple[Step, dict]:
    if system == "shardspeed":
        import shardspeed as lib
    else:
        import deepspeed as lib

        lib.init_distributed(dist_backend="gloo")
    engine, _, _, _ = lib.initialize(model=model, model_parameters=model.parameters(), config=engine_config(micro))

    def step(x: torch.Tensor) -> torch.Tensor:
        loss = engine(x)
        engine.backward(loss)
        engine.step()
        return loss
    # Which install was measured (the driver puts the benchmark's own worktree first on PYTHONPATH).
    return step, {"library": os.path.dirname(lib.__file__), "version": getattr(lib, "__version__", "?")}


def c10d_ops_per_step(step: Step, data: list[torch.Tensor]) -> dict[str, float]:
    """Collective ops per step as the profiler sees them, outermost only (a functional collective
    runs a c10d op inside; gloo adds its own `gloo:` record)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for i in range(COUNT_STEPS):
            step(data[i % len(data)])

    def collective(name: str) -> bool:
        # Not `wait_tensor` or `_wrap_tensor_autograd`: bookkeeping of functional collectives.
        return name.split("::")[0] in ("c10d", "_c10d_functional") and any(
            word in name for word in ("reduce", "gather", "scatter", "broadcast", "all_to_all", "alltoall",
                                      "send", "recv", "barrier"))

    def nested(event) -> bool:
        parent = event.cpu_parent
        while parent is not None:
            if collective(parent.name):
                return True
            parent = parent.cpu_parent
        return False
    counts = collections.Counter(e.name for e in prof.events() if collective(e.name) and not nested(e))
    return {k: v / COUNT_STEPS for k, v in sorted(counts.items())}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--system", choices=["ddp", "fsdp2", "shardspeed", "deepspeed"], required=True)
    p.add_argument("--micro", type=int, default=8)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--profile", default=None, help="cProfile the timed steps on rank 0, stats to this path.")
    p.add_argument("--local_rank", type=int, default=-1)
    args = p.parse_args()
    torch.set_num_threads(1)
    counter = CollectiveCounter()
    counter.install()  # before DeepSpeed or shardspeed is imported, so any function they bind is the wrapper
    torch.manual_seed(0)
    model = HostModel()
    params = sum(p.numel() for p in model.parameters())
    info: dict = {}
    if args.system == "ddp":
        step = build_ddp(model)
    elif args.system == "fsdp2":
        step = build_fsdp2(model)
    else:
        step, info = build_engine(args.system, model, args.micro)
    rank = dist.get_rank()
    g = torch.Generator().manual_seed(1 + rank)
    data = [torch.randn(args.micro, WIDTH, generator=g) for _ in range(4)]
    for i in range(args.warmup):
        step(data[i % 4])
    profiler = cProfile.Profile() if args.profile and rank == 0 else None
    dist.barrier()
    t0 = time.perf_counter()
    counter.active = True
    if profiler is not None:
        profiler.enable()
    for i in range(args.steps):
        loss = step(data[i % 4])
    if profiler is not None:
        profiler.disable()
    counter.active = False
    dist.barrier()
    elapsed = time.perf_counter() - t0
    if profiler is not None:
        profiler.dump_stats(args.profile)
    ops = c10d_ops_per_step(step, data)
    if rank == 0:
        print(json.dumps({
            "system": args.system, "world": dist.get_world_size(), "params": params, "micro": args.micro,
            "steps": args.steps, "ms_per_step": 1000.0 * elapsed / args.steps, "final_loss": loss.item(),
            "collectives": {k: v / args.steps for k, v in sorted(counter.counts.items())},
            "c10d_ops": ops, "torch": torch.__version__, **info,
        }), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
