"""What the chat trainers share: reaching the model inside an engine, generating through the actor's
engine, and DeepSpeed-Chat's EMA of the actor (`moving_average`, `dschat/utils/utils.py`)."""
from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..runtime.engine import ShardspeedEngine
from ..runtime.hybrid_engine import DeepSpeedHybridEngine
from ..zero import GatheredParameters


def unwrap(model: nn.Module) -> nn.Module:
    """The user's module inside an engine; anything else as it is.

    DeepSpeed's engine forwards unknown attributes (`engine.forward_value`) to its module; shardspeed's
    does not, so the trainers call such methods on `unwrap(engine)` (ZeRO-3's hooks sit on the module).
    """
    return model.module if isinstance(model, ShardspeedEngine) else model


def generate(actor: nn.Module, prompts: Tensor, mask: Tensor | None, **kwargs: Any) -> Tensor:
    """`generate` through the actor's engine: the hybrid engine's when it is one (ZeRO-3: parameters
    gathered once), otherwise the module's (ZeRO-3 engines make `synced_gpus=True` its default)."""
    with torch.no_grad():
        if isinstance(actor, DeepSpeedHybridEngine):
            return actor.generate(prompts, attention_mask=mask, **kwargs)
        return unwrap(actor).generate(prompts, attention_mask=mask, **kwargs)  # type: ignore[operator]


def moving_average(model: nn.Module, model_ema: nn.Module, beta: float = 0.992, device: Any = None,
                   zero_stage: int = 0) -> None:
    """ema <- lerp(theta, ema, beta) = beta * ema + (1 - beta) * theta, parameter by parameter.

    At ZeRO-3 each module's parameters are gathered (`zero_stage` is accepted for DeepSpeed-Chat's
    signature; gathering whole parameters is a no-op). DeepSpeed-Chat gathers the EMA without a
    modifier rank, so DeepSpeed drops the update at ZeRO-3; here the EMA's new values are kept.
    """
    pairs = list(zip(unwrap(model).modules(), unwrap(model_ema).modules()))
    seen: set[int] = set()  # a tied weight (embeddings and LM head) is updated once
    with torch.no_grad():
        for module, module_ema in pairs:
            params = list(module.parameters(recurse=False))
            params_ema = list(module_ema.parameters(recurse=False))
            if len(params) != len(params_ema):
                raise ValueError(f"moving_average: {type(module).__name__} has {len(params)} parameters but its EMA "
                                 f"copy {len(params_ema)}; the EMA model must have the actor's structure")
            fresh = [i for i, p in enumerate(params) if id(p) not in seen]
            seen.update(id(p) for p in params)
            params, params_ema = [params[i] for i in fresh], [params_ema[i] for i in fresh]
            if not params:
                continue
            with GatheredParameters(params), GatheredParameters(params_ema, modifier_rank=0):
                for param, param_ema in zip(params, params_ema):
                    data = param.data if device is None else param.data.to(device)
                    param_ema.data.copy_(torch.lerp(data, param_ema.data, beta))


def all_ranks_agree(flag: bool, device: torch.device | None = None, group: Any = None) -> bool:
    """True when `flag` holds on every rank of `group` (one small all-reduce; no-op without torch.distributed)."""
    if not dist.is_initialized() or dist.get_world_size(group) == 1:
        return flag
    value = torch.tensor([int(flag)], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MIN, group=group)
    return bool(value.item())


__all__ = ["all_ranks_agree", "generate", "moving_average", "unwrap"]
