"""One rank of the MoE benchmark: a small GPT whose every MLP is an expert-parallel MoE layer, trained
with ZeRO-2 under shardspeed or DeepSpeed. The model code is the same for both; only where `MoE` and
`initialize` come from differs. Started by `bench_moe.py` through torchrun; rank 0 prints one JSON line.

Model: token and position embeddings, `--layers` pre-LayerNorm blocks (causal attention, then
`MoE(hidden, expert=Linear-GELU-Linear (4x), num_experts, ep_size, k, capacity_factor,
eval_capacity_factor, min_capacity)`), a final LayerNorm and an untied head. The loss is the
next-token cross-entropy plus `--aux` times the sum of the layers' `l_aux`.

Initial weights: every rank seeds torch with 0 and builds the model (dense weights equal on all ranks).
DeepSpeed's `Experts` deep-copies one `expert`, so every expert would start equal; here each expert is
then drawn again from a generator seeded by (layer, global expert id), global expert
`ep_rank * num_local_experts + i` with ep_rank = rank % ep_size (DeepSpeed's expert-parallel groups are
consecutive ranks). Both systems therefore start from the same weights, as long as their `MoE`
constructors draw the same random numbers (shardspeed builds in DeepSpeed's order).

JSON: tokens/s (all ranks' tokens over the timed steps), each rank's peak RSS, the first step's loss
on each rank, rank 0's mean seconds per phase (`phase_s`: forward, backward, step; and `moe_forward`,
the wall time inside the MoE layers' forward), and each rank's expert optimizer-state bytes: the
tensors the torch optimizer keeps for the params of its MoE param groups (`"moe": True`, named
`ep_size_<n>`), by distinct storage.
"""
from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import resource
import time
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from _gpt_worker import gather, inner_optimizer_name, storage_bytes


INT_ARGS = dict(layers=4, hidden=256, heads=4, vocab=8192, seq=128, micro=4, experts=8,
                ep=2,  # MoE(ep_size=): ranks one layer's experts are split over
                k=2, min_capacity=4, stage=2, warmup=3, steps=10)


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser()
    p.add_argument("--system", choices=["shardspeed", "deepspeed"], required=True)
    for name, default in INT_ARGS.items():
        p.add_argument(f"--{name}", type=int, default=default)
    p.add_argument("--capacity_factor", type=float, default=1.25, help="Also the eval_capacity_factor.")
    p.add_argument("--aux", type=float, default=0.01, help="Coefficient of the summed l_aux in the loss.")
    p.add_argument("--local_rank", type=int, default=-1)
    return p.parse_args()


class MoEBlock(nn.Module):
    """Causal self-attention, then an MoE in place of the MLP; forward returns (x, l_aux)."""

    def __init__(self, args: argparse.Namespace, moe_cls: type) -> None:
        super().__init__()
        h = args.hidden
        self.heads = args.heads
        self.ln1 = nn.LayerNorm(h)
        self.qkv = nn.Linear(h, 3 * h)
        self.proj = nn.Linear(h, h)
        self.ln2 = nn.LayerNorm(h)
        expert = nn.Sequential(nn.Linear(h, 4 * h), nn.GELU(), nn.Linear(4 * h, h))
        self.moe = moe_cls(h, expert, num_experts=args.experts, ep_size=args.ep, k=args.k,
                           capacity_factor=args.capacity_factor, eval_capacity_factor=args.capacity_factor,
                           min_capacity=args.min_capacity)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, t, c = x.shape
        q, k, v = (z.view(b, t, self.heads, c // self.heads).transpose(1, 2) for z in self.qkv(self.ln1(x)).split(c, 2))
        attn = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(attn.transpose(1, 2).reshape(b, t, c))
        out, l_aux, _ = self.moe(self.ln2(x))
        return x + out, l_aux


class MoEGPT(nn.Module):
    def __init__(self, args: argparse.Namespace, moe_cls: type) -> None:
        super().__init__()
        self.aux = args.aux
        self.tok = nn.Embedding(args.vocab, args.hidden)
        self.pos = nn.Embedding(args.seq, args.hidden)
        self.blocks = nn.ModuleList(MoEBlock(args, moe_cls) for _ in range(args.layers))
        self.ln_f = nn.LayerNorm(args.hidden)
        self.lm_head = nn.Linear(args.hidden, args.vocab, bias=False)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        x = self.tok(input_ids) + self.pos(torch.arange(input_ids.shape[1]))
        l_aux = x.new_zeros(())
        for block in self.blocks:
            x, aux = block(x)
            l_aux = l_aux + aux
        logits = self.lm_head(self.ln_f(x))
        return F.cross_entropy(logits.view(-1, logits.shape[-1]), labels.reshape(-1)) + self.aux * l_aux


def draw_experts(model: MoEGPT, rank: int) -> None:
    """Give each global expert its own weights (see the module docstring), the same under both systems."""
    layers: list[Any] = [block.moe for block in model.blocks]
    for layer, moe in enumerate(layers):
        local = moe.num_local_experts
        ep_rank = rank % moe.ep_size
        for i, expert in enumerate(moe.deepspeed_moe.experts.deepspeed_experts):
            g = torch.Generator().manual_seed(1000 * layer + ep_rank * local + i)
            for lin in (m for m in expert.modules() if isinstance(m, nn.Linear)):
                bound = 1 / math.sqrt(lin.in_features)  # nn.Linear's default range
                with torch.no_grad():
                    lin.weight.uniform_(-bound, bound, generator=g)
                    lin.bias.uniform_(-bound, bound, generator=g)


def config(args: argparse.Namespace) -> dict:
    return {"train_micro_batch_size_per_gpu": args.micro, "gradient_accumulation_steps": 1, "gradient_clipping": 1.0,
            "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "weight_decay": 0.01}},
            "zero_optimization": {"stage": args.stage}, "steps_per_print": 10**9}


def expert_state_bytes(engine: Any) -> tuple[int, list[str]]:
    """Bytes of optimizer state (Adam moments) for the params of the MoE param groups, and their names.
    Both engines hand the torch optimizer the groups DeepSpeed builds (`"moe": True`, `name` ep_size_<n>),
    with each group's params replaced by this rank's flat fp32 partition."""
    inner = getattr(engine.optimizer, "optimizer", engine.optimizer)
    groups = [g for g in inner.param_groups if g.get("moe", False)]
    states = [v for g in groups for p in g["params"] for v in inner.state.get(p, {}).values()
              if torch.is_tensor(v) and v.dim() > 0]  # 0-d: Adam's step counter
    return storage_bytes(states, set()), [g.get("name", "?") for g in groups]


class MoEClock:
    """Wall time inside the MoE layers' forward (hooks around each layer; backward is not seen)."""

    def __init__(self, model: nn.Module, moe_cls: type) -> None:
        self.total = 0.0
        self._start = 0.0
        for module in model.modules():
            if isinstance(module, moe_cls):
                module.register_forward_pre_hook(self._enter)
                module.register_forward_hook(self._leave)

    def _enter(self, *_: object) -> None:
        self._start = time.perf_counter()

    def _leave(self, *_: object) -> None:
        self.total += time.perf_counter() - self._start


def build(args: argparse.Namespace) -> tuple[Any, MoEClock, int]:
    """The engine, a clock on its MoE layers, and this rank's parameter count (dense + its local experts)."""
    lib = importlib.import_module(args.system)
    moe_cls = importlib.import_module(f"{args.system}.moe.layer").MoE
    if args.system == "deepspeed":
        lib.init_distributed(dist_backend="gloo")  # shardspeed's initialize picks gloo on a CPU host itself
    torch.manual_seed(0)
    model = MoEGPT(args, moe_cls)
    draw_experts(model, int(os.environ.get("RANK", "0")))
    params = sum(p.numel() for p in model.parameters())
    engine, _, _, _ = lib.initialize(model=model, model_parameters=model.parameters(), config=config(args))
    return engine, MoEClock(model, moe_cls), params


def main() -> None:
    args = parse()
    torch.set_num_threads(1)
    engine, clock, params = build(args)
    rank, world = dist.get_rank(), dist.get_world_size()
    g = torch.Generator().manual_seed(1 + rank)
    data = [torch.randint(0, args.vocab, (args.micro, args.seq + 1), generator=g) for _ in range(4)]
    warmup_losses = []
    for i in range(args.warmup):
        loss = engine(data[i % 4][:, :-1], data[i % 4][:, 1:])
        warmup_losses.append(loss.item())
        engine.backward(loss)
        engine.step()
    dist.barrier()
    phase = dict.fromkeys(("forward", "backward", "step"), 0.0)
    clock.total = 0.0
    t0 = time.perf_counter()
    for i in range(args.steps):
        marks = [time.perf_counter()]
        loss = engine(data[i % 4][:, :-1], data[i % 4][:, 1:])
        marks.append(time.perf_counter())
        engine.backward(loss)
        marks.append(time.perf_counter())
        engine.step()
        marks.append(time.perf_counter())
        for name, a, b in zip(phase, marks, marks[1:]):
            phase[name] += b - a
    dist.barrier()
    elapsed = time.perf_counter() - t0
    phase["moe_forward"] = clock.total
    rss = gather(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, world)
    first_losses = gather(warmup_losses[0], world)
    expert_bytes, groups = expert_state_bytes(engine)
    expert_bytes_ranks = [int(v) for v in gather(float(expert_bytes), world)]
    if rank == 0:
        print(json.dumps({
            "system": args.system, "stage": args.stage, "world": world, "params_per_rank": params,
            "tokens_per_s": args.steps * args.micro * args.seq * world / elapsed,
            "peak_rss_mib": [round(v, 1) for v in rss],
            "first_loss": first_losses, "final_loss": loss.item(),
            "expert_optimizer_bytes": expert_bytes_ranks,
            "moe_groups": groups, "optimizer": inner_optimizer_name(engine),
            "phase_s": {k: round(v / args.steps, 4) for k, v in phase.items()},
        }), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
