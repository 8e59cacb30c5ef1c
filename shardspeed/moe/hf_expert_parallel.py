"""Expert parallelism for Hugging Face MoE models (DeepSpeed's `expert_parallel` / AutoEP section).

In transformers 5 the experts of Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE and similar blocks are one module
holding fused 3-D weights, `gate_up_proj [E, 2I, H]` and `down_proj [E, H, I]`, called as
`experts(hidden [S, H], top_k_index [S, k], top_k_weights [S, k])`. Under expert parallelism of size
P each rank keeps rows r*E/P .. (r+1)*E/P of both weights and the block's router stays a dense
(replicated) parameter, so routing, combine weights and the model's aux loss are the model's own;
only where each expert runs changes. Tokens travel with `dispatch.dispatch_and_combine` (all-to-all-v,
no capacity: HF routing never drops).

Each kept slice is marked like DeepSpeed's experts (`allreduce = False`, `group_name = ep_size_<P>`)
plus `expert_rows = (start, stop, E)`, which checkpoints use to store whole weights.
"""
from __future__ import annotations

import re
from collections.abc import Callable, Sequence
import torch
from torch import Tensor, nn

from ..comm import expert_groups
from ..comm.topology import Topology
from ..config.errors import ConfigError
from ..config.sections import ExpertParallelConfig
from .dispatch import ExpertParallel, dispatch_and_combine

# transformers' model types whose MoE blocks have this experts layout (DeepSpeed's presets, and more).
PRESETS = ("mixtral", "qwen2_moe", "qwen3_moe", "qwen3_5_moe", "olmoe")


class ExpertParallelFusedExperts(nn.Module):
    """The local rows of a fused-experts module, running routed tokens of the whole expert-parallel group."""

    def __init__(self, original: nn.Module, ep: ExpertParallel | None, group_name: str) -> None:
        super().__init__()
        gate_up, down = _weights(original)
        num_experts = int(gate_up.shape[0])
        size, rank = (ep.size, ep.rank) if ep is not None else (1, 0)
        local = num_experts // size
        start, stop = rank * local, (rank + 1) * local
        self.num_experts = num_experts
        self.num_local_experts = local
        self.ep = ep
        self.act_fn: Callable[[Tensor], Tensor] = getattr(original, "act_fn")
        self.gate_up_proj = nn.Parameter(gate_up.detach()[start:stop].clone(), requires_grad=gate_up.requires_grad)
        self.down_proj = nn.Parameter(down.detach()[start:stop].clone(), requires_grad=down.requires_grad)
        for p in (self.gate_up_proj, self.down_proj):
            p.allreduce = False  # type: ignore[attr-defined]  # DeepSpeed's expert mark
            p.group_name = group_name  # type: ignore[attr-defined]
            p.expert_rows = (start, stop, num_experts)  # type: ignore[attr-defined]  # read by zero.param_names

    def _run(self, chunks: Sequence[Tensor]) -> list[Tensor]:
        out = []
        for i, rows in enumerate(chunks):
            gate, up = nn.functional.linear(rows, self.gate_up_proj[i]).chunk(2, dim=-1)
            out.append(nn.functional.linear(self.act_fn(gate) * up, self.down_proj[i]))
        return out

    def forward(self, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor) -> Tensor:
        routes = top_k_index.t().contiguous()  # [k, S]
        weights = top_k_weights.t().float()
        return dispatch_and_combine(hidden_states, routes, weights, self.num_experts, self._run, self.ep).to(hidden_states.dtype)


def _fused_experts(module: nn.Module, expert_name: str) -> nn.Module | None:
    experts = getattr(module, expert_name, None)
    if not isinstance(experts, nn.Module) or isinstance(experts, ExpertParallelFusedExperts):
        return None
    gate_up, down = getattr(experts, "gate_up_proj", None), getattr(experts, "down_proj", None)
    if not isinstance(gate_up, nn.Parameter) or not isinstance(down, nn.Parameter) or gate_up.dim() != 3:
        return None
    return experts


def _weights(experts: nn.Module) -> tuple[nn.Parameter, nn.Parameter]:
    return getattr(experts, "gate_up_proj"), getattr(experts, "down_proj")


def _check_layout(name: str, experts: nn.Module) -> None:
    gate_up, down = _weights(experts)
    e, two_i, h = gate_up.shape
    if (getattr(experts, "has_bias", False) or getattr(experts, "is_transposed", False) or two_i % 2
            or tuple(down.shape) != (e, h, two_i // 2) or not hasattr(experts, "act_fn")):
        raise ConfigError(f"`expert_parallel`: the experts at `{name}` ({type(experts).__name__}, gate_up_proj "
                          f"{tuple(gate_up.shape)}, down_proj {tuple(down.shape)}) are not in the fused [E, 2I, H] / "
                          "[E, H, I] layout without biases that shardspeed splits; expert parallelism is not supported "
                          "yet for this model")


def apply_expert_parallel(model: nn.Module, section: ExpertParallelConfig, topology: Topology,
                          data_before_expert: bool = False) -> list[str]:
    """Split the fused experts of every MoE block of `model` over `section.autoep_size` ranks (collective).
    Returns the names of the blocks changed; none found is an error naming what was looked for."""
    for key, allowed in ExpertParallelConfig.NEUTRAL.items():
        if getattr(section, key) not in allowed:
            raise ConfigError(f"`expert_parallel.{key}` = {getattr(section, key)!r} is not supported yet by shardspeed "
                              f"(it keeps the model's own routing and experts); use {allowed[0]!r} or remove the key")
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if section.preset_model is not None and section.preset_model not in PRESETS:
        raise ConfigError(f"`expert_parallel.preset_model` {section.preset_model!r} is not one of {', '.join(PRESETS)}")
    if section.preset_model is not None and model_type is not None and section.preset_model != model_type:
        raise ConfigError(f"`expert_parallel.preset_model` is {section.preset_model!r} but the model is {model_type!r}")
    size = section.autoep_size
    dp = topology.size("data")
    if dp % size:
        raise ConfigError(f"`expert_parallel.autoep_size` {size} must divide the data-parallel size {dp}")
    pattern = re.compile(section.moe_layer_pattern) if section.moe_layer_pattern else None
    expert_name = section.expert_pattern or "experts"
    found = [(name, module, experts) for name, module in model.named_modules()
             if (experts := _fused_experts(module, expert_name)) is not None and (pattern is None or pattern.search(name))]
    if not found:
        raise ConfigError(f"`expert_parallel.enabled` is true but {type(model).__name__} has no MoE block with fused experts "
                          f"(a child `{expert_name}` holding 3-D gate_up_proj and down_proj); expert parallelism for "
                          "Hugging Face models needs transformers 5's fused layout (Mixtral, Qwen2/3-MoE, OLMoE)")
    group_name = expert_groups.register(topology, size, data_before_expert)
    ep_axis = expert_groups.expert_parallel(group_name)
    ep = ExpertParallel.of(ep_axis) if ep_axis.size > 1 else None
    changed = []
    for name, module, experts in found:
        _check_layout(f"{name}.{expert_name}" if name else expert_name, experts)
        num_experts = int(_weights(experts)[0].shape[0])
        if num_experts % size:
            raise ConfigError(f"`expert_parallel.autoep_size` {size} must divide the number of experts {num_experts} of `{name}`")
        setattr(module, expert_name, ExpertParallelFusedExperts(experts, ep, group_name))
        changed.append(name)
    return changed


__all__ = ["ExpertParallelFusedExperts", "apply_expert_parallel", "PRESETS"]
