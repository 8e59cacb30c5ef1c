"""DeepSpeed's `deepspeed.moe.sharded_moe`: the top-1 / top-2 / top-k gates and the MoE layer core.

Routing reproduces DeepSpeed 0.19.8 decision for decision: which (token, expert) routes survive the
capacity limit, their combine weights, `l_aux` and `exp_counts`, and the random numbers drawn (the
same torch RNG calls in the same order, so a seed gives the same routing as DeepSpeed's).

What differs is the data movement (`dispatch.py`): DeepSpeed pads every expert to the capacity C and
swaps `[E, C, M]` buffers; here only the kept routes travel, in an all-to-all-v. Consequences:

- `drop_tokens=False` needs no all-reduce of the capacity inside `MOELayer` (nothing is dropped, so
  the capacity only sized DeepSpeed's buffers). The public `top1gating` / `top2gating` / `topkgating`
  still all-reduce it over `ep_group`, since their dense outputs are `[S, E, C]`.
- each rank's capacity comes from its own token count (DeepSpeed's formula), so ranks of one
  expert-parallel group may hold different numbers of tokens, also with `drop_tokens=True`.

Not reproduced: DeepSpeed pads the `drop_tokens=False` capacity to the tensor-parallel size when a
Megatron `mpu` is registered in `deepspeed.utils.groups`; shardspeed has no such registry here (the
capacity is then only a buffer size, so routes are unaffected). Tutel is not used (`use_tutel` is
accepted and ignored: it changes speed, not results).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from ..comm.topology import AxisGroup
from .dispatch import FIRST_ALLTOALL as FIRST_ALLTOALL_TIMER
from .dispatch import SECOND_ALLTOALL as SECOND_ALLTOALL_TIMER
from .dispatch import ExpertParallel, dispatch_and_combine
from .experts import Experts

TOPK_GATE_TIMER = "topk_gate"
MOE_TIMER = "moe"

NOISY_GATE_POLICIES = (None, "None", "Jitter", "RSample")
MIN_CAPACITY_MESSAGE = ("No. of tokens (batch-size) should be greater than min_capacity. "
                        "Either set min_capacity to 0 or increase your batch size.")


# ---- noise (the same torch.distributions draws as DeepSpeed, so seeds line up) ------------------------

def multiplicative_jitter(x: Tensor, device: torch.device, epsilon: float = 1e-2) -> Tensor:
    """`x` times noise drawn uniformly from [1 - epsilon, 1 + epsilon) (Switch Transformer's jitter)."""
    if epsilon == 0:
        return x
    low = torch.tensor(1.0 - epsilon, device=device)
    high = torch.tensor(1.0 + epsilon, device=device)
    return x * torch.distributions.uniform.Uniform(low, high).rsample(x.shape)


def gumbel_rsample(shape: tuple[int, ...] | torch.Size, device: torch.device) -> Tensor:
    """Standard Gumbel(0, 1) samples of `shape`."""
    zero = torch.tensor(0.0, device=device)
    one = torch.tensor(1.0, device=device)
    return torch.distributions.gumbel.Gumbel(zero, one).rsample(torch.Size(shape))


def _uniform01(shape: torch.Size, device: torch.device) -> Tensor:
    # Uniform(0, 1).rsample is `0 + rand * 1`: the same bits and the same RNG draw as torch.rand.
    return torch.rand(shape, device=device)


# ---- routing --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Routing:
    """One gate's decisions for S local tokens, k routes each (k = 1 for top-1), in DeepSpeed's terms.

    `experts` [k, S] int64: the global expert of each route, -1 where the route was dropped (over
    capacity, or masked by `used_token`). `locations` [k, S] int64: the route's slot in its expert's
    capacity buffer (0 where dropped). `weights` [k, S] fp32: the combine weight (0 where dropped),
    differentiable. `capacity`: 0-d int64, this rank's capacity (with `drop_tokens=False`, the largest
    local expert count: the all-reduce over the expert-parallel group is left to the caller).
    """

    l_aux: Tensor
    exp_counts: Tensor
    experts: Tensor
    locations: Tensor
    weights: Tensor
    capacity: Tensor


def _capacity(num_tokens: int, num_experts: int, capacity_factor: float, min_capacity: int) -> Tensor:
    # DeepSpeed multiplies a python float by a 0-d tensor of the default dtype (fp32), so the product is
    # rounded to fp32 before the ceil; a float64 product can round the other way. Kept as DeepSpeed does.
    capacity = torch.ceil((num_tokens / num_experts) * torch.tensor(capacity_factor)).to(torch.int64)
    return torch.maximum(capacity, torch.tensor(min_capacity).to(torch.int64))


def _slots(mask: Tensor) -> Tensor:
    """Each kept route's position among its expert's kept routes (cumulative count minus one)."""
    return torch.cumsum(mask, dim=0) - 1


def route_top1(logits: Tensor, capacity_factor: float, min_capacity: int, used_token: Tensor | None = None,
               noisy_gate_policy: str | None = None, drop_tokens: bool = True, use_rts: bool = True, *,
               first_come_without_rts: bool = False) -> Routing:
    """Top-1 routing. Priority among an expert's tokens: a uniform random draw per token (RTS), or
    without RTS torch.topk's order among equal scores (DeepSpeed), or position (`first_come_without_rts`)."""
    noisy = logits + gumbel_rsample(logits.shape, logits.device) if noisy_gate_policy == "RSample" else None
    gates = F.softmax(logits, dim=1)
    num_tokens, num_experts = gates.shape
    capacity = _capacity(num_tokens, num_experts, capacity_factor, min_capacity)
    choice = torch.argmax(noisy if noisy is not None else gates, dim=1)
    mask = F.one_hot(choice, num_classes=num_experts)
    if used_token is not None:
        if used_token.numel() != num_tokens:
            raise ValueError(f"used_token has {used_token.numel()} entries but the input has {num_tokens} tokens")
        mask = used_token.reshape(-1, 1) * mask  # the dtype follows used_token's, as in DeepSpeed
    exp_counts = torch.sum(mask, dim=0).detach()
    l_aux = torch.sum(torch.mean(gates, dim=0) * torch.mean(mask.float(), dim=0)) * num_experts
    priority = mask * _uniform01(mask.shape, logits.device) if use_rts else mask
    if num_tokens < min_capacity:
        raise ValueError(f"{MIN_CAPACITY_MESSAGE} (tokens: {num_tokens}, min_capacity: {min_capacity})")
    if not drop_tokens:
        # Every route is kept: DeepSpeed's capacity here is at least each expert's count, so its top-k
        # selection returns all of them. The RTS draw above is still made, to keep the RNG in step.
        capacity = torch.clamp(exp_counts.max().to(torch.int64), max=num_tokens)
        kept = mask
    elif first_come_without_rts and not use_rts:
        kept = mask * (torch.cumsum(mask != 0, dim=0) <= capacity)
    else:
        top = torch.topk(priority, k=min(int(capacity), num_tokens), dim=0)[1]
        kept = mask * torch.zeros_like(mask).scatter_(0, top, 1)
    locations = torch.sum(_slots(kept) * kept, dim=1).to(torch.int64)
    weight = torch.sum(gates * kept, dim=1)
    expert = torch.where(kept.sum(dim=1) != 0, choice, torch.full_like(choice, -1))
    return Routing(l_aux, exp_counts, expert.unsqueeze(0), locations.unsqueeze(0), weight.unsqueeze(0), capacity)


def route_top2(logits: Tensor, capacity_factor: float, min_capacity: int, drop_tokens: bool = True,
               top2_2nd_expert_sampling: bool = True) -> Routing:
    """Top-2 routing. The second expert is drawn by Gumbel-max over the others when sampling is on.
    Priority is position, and every token's first choice queues before any token's second choice;
    the two kept weights are renormalised to sum to one (a lone kept route gets weight 1)."""
    gates = F.softmax(logits, dim=1)
    num_tokens, num_experts = gates.shape
    first = torch.argmax(gates, dim=1)
    mask1 = F.one_hot(first, num_classes=num_experts)
    scores2 = logits + gumbel_rsample(logits.shape, logits.device) if top2_2nd_expert_sampling else logits
    second = torch.argmax(scores2.masked_fill(mask1.bool(), float("-inf")), dim=1)
    mask2 = F.one_hot(second, num_classes=num_experts)
    slots1 = _slots(mask1)
    slots2 = _slots(mask2) + torch.sum(mask1, dim=0, keepdim=True)
    l_aux = torch.mean(torch.mean(gates, dim=0) * torch.mean(mask1.float(), dim=0)) * num_experts * num_experts
    exp_counts = torch.sum(mask1 + mask2, dim=0).detach()
    if drop_tokens:
        capacity = _capacity(num_tokens, num_experts, capacity_factor * 2, min_capacity)
        mask1 = mask1 * torch.lt(slots1, capacity)
        mask2 = mask2 * torch.lt(slots2, capacity)
    else:
        capacity = exp_counts.max().to(torch.int64)
    gate1 = torch.sum(gates * mask1.float(), dim=1)
    gate2 = torch.sum(gates * mask2.float(), dim=1)
    denom = torch.clamp(gate1 + gate2, min=torch.finfo(gates.dtype).eps)
    experts = torch.stack([torch.where(mask1.any(dim=1), first, torch.full_like(first, -1)),
                           torch.where(mask2.any(dim=1), second, torch.full_like(second, -1))])
    locations = torch.stack([torch.sum(slots1 * mask1, dim=1), torch.sum(slots2 * mask2, dim=1)])
    return Routing(l_aux, exp_counts, experts, locations, torch.stack([gate1 / denom, gate2 / denom]), capacity)


def route_topk(logits: Tensor, k: int, capacity_factor: float, min_capacity: int, drop_tokens: bool = True,
               drop_policy: str = "probs") -> Routing:
    """Top-k routing (k > 2 in `TopKGate`). Over capacity, an expert keeps its tokens with the largest
    gate probability ('probs', the only policy `TopKGate` uses) or the earliest ('position'). Kept
    weights are renormalised over each token's kept routes. Routes are ordered by descending gate."""
    gates = F.softmax(logits, dim=1)
    num_tokens, num_experts = gates.shape
    top_gate, top_idx = torch.topk(gates, k=k, dim=1)
    mask = torch.zeros_like(gates, dtype=torch.bool).scatter_(1, top_idx, True)
    exp_counts = torch.sum(mask, dim=0).detach()
    l_aux = torch.mean(torch.mean(gates, dim=0) * torch.mean(mask.float(), dim=0)) * num_experts * num_experts / k
    if not drop_tokens:
        capacity = exp_counts.max().to(torch.int64)
        slots = _slots(mask)
    elif drop_policy == "probs":
        capacity = _capacity(num_tokens, num_experts, capacity_factor * k, min_capacity)
        by_prob = torch.zeros_like(gates).scatter(1, top_idx, top_gate)
        best = torch.topk(by_prob, k=min(int(capacity), num_tokens), dim=0, sorted=False)[1]
        mask &= torch.zeros_like(gates, dtype=torch.bool).scatter_(0, best, True)
        slots = _slots(mask)
    elif drop_policy == "position":
        capacity = _capacity(num_tokens, num_experts, capacity_factor * k, min_capacity)
        slots = _slots(mask)
        mask &= torch.lt(slots, capacity)
    else:
        raise ValueError(f"Invalid drop_policy: {drop_policy!r} (valid: 'probs', 'position')")
    masked = gates * mask
    masked = masked / torch.clamp(torch.sum(masked, dim=-1, keepdim=True), min=torch.finfo(masked.dtype).eps)
    kept = mask.gather(1, top_idx)
    experts = torch.where(kept, top_idx, torch.full_like(top_idx, -1))
    locations = slots.gather(1, top_idx) * kept
    return Routing(l_aux, exp_counts, experts.t().contiguous(), locations.t().contiguous(),
                   masked.gather(1, top_idx).t().contiguous(), capacity)


# ---- DeepSpeed's public gating functions ------------------------------------------------------------

def _group_capacity(routing: Routing, ep_group: Any, cap: int | None = None) -> Tensor:
    """DeepSpeed's `drop_tokens=False` capacity: the largest expert count over the expert-parallel group."""
    capacity = routing.exp_counts.max().clone()
    group = ep_group.group if isinstance(ep_group, AxisGroup) else ep_group
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(capacity, op=dist.ReduceOp.MAX, group=group)
    if cap is not None:
        capacity = torch.clamp(capacity, max=cap)
    return capacity


def _gate_output(routing: Routing, capacity: Tensor, num_experts: int, sparse_routes: bool) -> tuple[Any, ...]:
    """DeepSpeed's return values: `(l_aux, combine_weights [S,E,C], dispatch_mask [S,E,C], exp_counts)`,
    or with `sparse_routes` `(l_aux, capacity, E, indices [k,S] int32, locations [k,S] int32, gates [k,S], exp_counts)`."""
    if sparse_routes:
        return (routing.l_aux, capacity, num_experts, routing.experts.to(torch.int32),
                routing.locations.to(torch.int32), routing.weights, routing.exp_counts)
    k, num_tokens = routing.experts.shape
    cap = int(capacity)
    kept = routing.experts >= 0
    tokens = torch.arange(num_tokens, device=kept.device).expand(k, num_tokens)[kept]
    flat = (tokens * num_experts + routing.experts[kept]) * cap + routing.locations[kept]
    combine = routing.weights.new_zeros(num_tokens * num_experts * cap).index_put((flat, ), routing.weights[kept],
                                                                                  accumulate=True)
    combine = combine.view(num_tokens, num_experts, cap)
    return routing.l_aux, combine, combine.bool(), routing.exp_counts


def top1gating(logits: Tensor, capacity_factor: float, min_capacity: int, used_token: Tensor | None = None,
               noisy_gate_policy: str | None = None, drop_tokens: bool = True, use_rts: bool = True,
               ep_group: Any = None, sparse_routes: bool = False, use_tutel: bool = False, *,
               first_come_without_rts: bool = False) -> tuple[Any, ...]:
    """DeepSpeed's top-1 gating on fp32 `logits` [S, E] (see `route_top1`); `use_tutel` is ignored."""
    routing = route_top1(logits, capacity_factor, min_capacity, used_token, noisy_gate_policy, drop_tokens, use_rts,
                         first_come_without_rts=first_come_without_rts)
    capacity = routing.capacity if drop_tokens else _group_capacity(routing, ep_group, cap=logits.shape[0])
    return _gate_output(routing, capacity, logits.shape[1], sparse_routes)


def top2gating(logits: Tensor, capacity_factor: float, min_capacity: int, drop_tokens: bool = True,
               ep_group: Any = None, top2_2nd_expert_sampling: bool = True,
               sparse_routes: bool = False) -> tuple[Any, ...]:
    """DeepSpeed's top-2 gating on fp32 `logits` [S, E] (see `route_top2`)."""
    routing = route_top2(logits, capacity_factor, min_capacity, drop_tokens, top2_2nd_expert_sampling)
    capacity = routing.capacity if drop_tokens else _group_capacity(routing, ep_group)
    return _gate_output(routing, capacity, logits.shape[1], sparse_routes)


def topkgating(logits: Tensor, k: int, capacity_factor: float, min_capacity: int, drop_tokens: bool = True,
               ep_group: Any = None, drop_policy: str = "probs", sparse_routes: bool = False) -> tuple[Any, ...]:
    """DeepSpeed's top-k gating on fp32 `logits` [S, E] (see `route_topk`)."""
    routing = route_topk(logits, k, capacity_factor, min_capacity, drop_tokens, drop_policy)
    capacity = routing.capacity if drop_tokens else _group_capacity(routing, ep_group)
    return _gate_output(routing, capacity, logits.shape[1], sparse_routes)


# ---- modules --------------------------------------------------------------------------------------

def check_gate_arguments(num_experts: int, k: int, noisy_gate_policy: str | None, use_rts: bool,
                         first_come_without_rts: bool) -> None:
    """Raise ValueError naming the value for a gate configuration DeepSpeed would fail on (or misuse)."""
    if num_experts < 1:
        raise ValueError(f"num_experts must be at least 1, got {num_experts}")
    if not 1 <= k <= num_experts:
        raise ValueError(f"k (experts per token) must be between 1 and num_experts ({num_experts}), got k={k}")
    if noisy_gate_policy not in NOISY_GATE_POLICIES:
        raise ValueError(f"Unsupported noisy_gate_policy: {noisy_gate_policy} (valid: None, 'None', 'Jitter', 'RSample')")
    if first_come_without_rts and use_rts:
        raise ValueError("first_come_without_rts=True orders tokens by position instead of random token selection; "
                         "it needs use_rts=False")


class TopKGate(nn.Module):
    """DeepSpeed's gate: `wg` (Linear, no bias) scores each token in fp32, then top-1, top-2 or top-k routing.

    Noise only in training: 'Jitter' scales the input by U(0.99, 1.01), 'RSample' (top-1) picks the
    expert by Gumbel-max. `capacity_factor` applies in training, `eval_capacity_factor` in eval.

    Keyword-only additions (defaults keep DeepSpeed's behaviour):
    `eval_2nd_expert_sampling=False` turns off top-2's Gumbel draw of the second expert in eval() (DeepSpeed
    draws it in eval too, so two eval forwards differ); `first_come_without_rts=True` makes top-1 with
    `use_rts=False` keep an expert's earliest tokens instead of torch.topk's order among ties.
    """

    wg: nn.Linear

    def __init__(self, model_dim: int, num_experts: int, k: int = 1, capacity_factor: float = 1.0,
                 eval_capacity_factor: float = 1.0, min_capacity: int = 8, noisy_gate_policy: str | None = None,
                 drop_tokens: bool = True, use_rts: bool = True, ep_group: Any = None,
                 top2_2nd_expert_sampling: bool = True, *, eval_2nd_expert_sampling: bool = True,
                 first_come_without_rts: bool = False) -> None:
        super().__init__()
        check_gate_arguments(num_experts, k, noisy_gate_policy, use_rts, first_come_without_rts)
        self.wg = nn.Linear(model_dim, num_experts, bias=False)
        self.ep_group = ep_group
        self.k = k
        self.capacity_factor = capacity_factor
        self.eval_capacity_factor = eval_capacity_factor
        self.min_capacity = min_capacity
        self.noisy_gate_policy = noisy_gate_policy
        self.drop_tokens = drop_tokens
        self.use_rts = use_rts
        self.top2_2nd_expert_sampling = top2_2nd_expert_sampling
        self.eval_2nd_expert_sampling = eval_2nd_expert_sampling
        self.first_come_without_rts = first_come_without_rts
        self.wall_clock_breakdown = False
        self.gate_time = 0.0

    def _set_ep_group(self, ep_group: Any) -> None:
        if self.ep_group is not None:
            raise RuntimeError("Attempting to override an existing ep_group")
        self.ep_group = ep_group

    def _logits(self, x: Tensor) -> Tensor:
        x32 = x.float()
        if self.noisy_gate_policy == "Jitter" and self.training:
            x32 = multiplicative_jitter(x32, device=x.device)
        return F.linear(x32, weight=self.wg.weight.float(), bias=None)

    def route(self, x: Tensor, used_token: Tensor | None = None) -> Routing:
        """The routing of tokens `x` [S, M], with no collective (the capacity is this rank's)."""
        start = time.perf_counter()
        logits = self._logits(x)
        factor = self.capacity_factor if self.training else self.eval_capacity_factor
        if self.k == 1:
            routing = route_top1(logits, factor, self.min_capacity, used_token,
                                 self.noisy_gate_policy if self.training else None, self.drop_tokens, self.use_rts,
                                 first_come_without_rts=self.first_come_without_rts)
        elif self.k == 2:
            sample = self.top2_2nd_expert_sampling and (self.training or self.eval_2nd_expert_sampling)
            routing = route_top2(logits, factor, self.min_capacity, self.drop_tokens, sample)
        else:
            routing = route_topk(logits, self.k, factor, self.min_capacity, self.drop_tokens)
        if self.wall_clock_breakdown:
            self.gate_time = (time.perf_counter() - start) * 1000.0
        return routing

    def forward(self, input: Tensor, used_token: Tensor | None = None, sparse_routes: bool = False,
                use_tutel: bool = False) -> tuple[Any, ...]:
        """DeepSpeed's gate output for tokens `input` [S, M] (see `top1gating`'s return values)."""
        routing = self.route(input, used_token)
        if self.drop_tokens:
            capacity = routing.capacity
        else:
            capacity = _group_capacity(routing, self.ep_group, cap=input.shape[0] if self.k == 1 else None)
        return _gate_output(routing, capacity, self.wg.out_features, sparse_routes)


class MOELayer(nn.Module):
    """Gate, send each kept route to its expert's rank, run the local experts, send back, combine.

    Before: every rank holds its own tokens and `num_local_experts` experts (global ids
    `ep_rank * num_local_experts + i`). After: every rank holds its tokens' outputs, the sum over kept
    routes of weight x expert(token), accumulated in fp32 and cast to the experts' output dtype.
    `l_aux` and `exp_counts` of the last forward stay on the module, as in DeepSpeed.
    """

    def __init__(self, gate: TopKGate, experts: Experts, ep_group_name: str, ep_size: int,
                 num_local_experts: int, use_tutel: bool = False) -> None:
        super().__init__()
        self.gate = gate
        self.experts = experts
        self.ep_group: Any = None
        self.ep_size = ep_size
        self.ep_group_name = ep_group_name
        self.num_local_experts = num_local_experts
        self.use_tutel = False  # Tutel changes speed, not results: not used (see the module docstring)
        self.wall_clock_breakdown = False
        self.time_falltoall = 0.0
        self.time_salltoall = 0.0
        self.time_moe = 0.0
        self.l_aux: Tensor | None = None
        self.exp_counts: Tensor | None = None

    def _set_ep_group(self, ep_group: Any) -> None:
        self.ep_group = ep_group
        self.gate._set_ep_group(ep_group)

    def _expert_parallel(self) -> ExpertParallel | None:
        if self.ep_size == 1:
            return None
        if self.ep_group is None:
            raise RuntimeError(f"MoE layer with ep_size={self.ep_size} has no expert-parallel group: call "
                               "set_deepspeed_parallelism() (deepspeed.initialize does) or _set_ep_group(group) first")
        ep = ExpertParallel.of(self.ep_group)
        if ep.size != self.ep_size:
            raise ValueError(f"expert-parallel group {self.ep_group_name!r} has {ep.size} ranks but ep_size={self.ep_size}")
        return ep

    def forward(self, *input: Any, **kwargs: Any) -> Tensor:
        """`input[0]`: hidden states [..., M]; `input[1]` (optional): DeepSpeed's `used_token` mask."""
        start = time.perf_counter()
        hidden: Tensor = input[0]
        used_token = input[1] if len(input) > 1 else None
        tokens = hidden.reshape(-1, hidden.shape[-1])
        routing = self.gate.route(tokens, used_token)
        self.l_aux, self.exp_counts = routing.l_aux, routing.exp_counts
        timings: dict[str, float] = {}
        num_experts = self.ep_size * self.num_local_experts
        out = dispatch_and_combine(tokens, routing.experts, routing.weights, num_experts,
                                   self.experts.forward_each, self._expert_parallel(), timings)
        if self.wall_clock_breakdown:
            self.time_falltoall = timings.get(FIRST_ALLTOALL_TIMER, 0.0)
            self.time_salltoall = timings.get(SECOND_ALLTOALL_TIMER, 0.0)
            self.time_moe = (time.perf_counter() - start) * 1000.0
        return out.reshape(hidden.shape)
