"""The model a plan is for, as a module on the meta device (shapes, no memory).

A plan needs the model's parameters one by one (ZeRO's layouts pad and partition each parameter)
and a forward pass to trace (activations). It takes a Hugging Face config (an object, a JSON file,
or a model type with keyword arguments, built with `AutoConfig.for_model`) or any `nn.Module`:
one built on the meta device is used as it is, a real one is copied onto the meta device without
copying its weights.
"""
from __future__ import annotations

import copy
import itertools
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

ModelSpec = Any  # nn.Module | transformers.PretrainedConfig | a config JSON path | a model type name


class PlannerError(ValueError):
    """A plan cannot be made from what was given; the message says what to give instead."""


def hf_config(spec: str | os.PathLike[str], **kwargs: Any) -> Any:
    """A Hugging Face config from a JSON file (`config.json`) or a model type (`"llama"`, `"gpt2"`)."""
    try:
        from transformers import AutoConfig
    except ImportError as err:  # pragma: no cover - transformers is a test dependency
        raise PlannerError("planning from a Hugging Face config needs transformers: pip install transformers") from err
    path = Path(spec)
    if path.is_file() or str(spec).endswith(".json"):
        if not path.is_file():
            raise PlannerError(f"model config file {path} does not exist")
        values = {**json.loads(path.read_text()), **kwargs}
        model_type = values.pop("model_type", None)
        if model_type is None:
            raise PlannerError(f"{path} has no `model_type`; it must be a Hugging Face config.json")
        return AutoConfig.for_model(model_type, **values)
    try:
        return AutoConfig.for_model(str(spec), **kwargs)
    except ValueError as err:
        raise PlannerError(f"unknown model {spec!r}: give a config.json path or a Hugging Face model type "
                           f"(llama, gpt2, mistral, qwen2, ...): {err}") from None


def meta_model(spec: ModelSpec) -> torch.nn.Module:
    """A meta-device module for `spec`, never sharing state with a module the caller passed."""
    if isinstance(spec, torch.nn.Module):
        return meta_copy(spec)
    config = hf_config(spec) if isinstance(spec, (str, os.PathLike)) else spec
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        try:
            return AutoModelForCausalLM.from_config(config)
        except ValueError as err:
            raise PlannerError(f"cannot build a causal language model from this config: {err}") from None


def meta_copy(module: torch.nn.Module) -> torch.nn.Module:
    """A deep copy of `module` whose parameters and buffers are meta tensors of the same shapes
    (parameters partitioned by ZeRO-3 get their whole shape); nothing of the weights is copied."""
    memo: dict[int, Any] = {}
    for t in itertools.chain(module.parameters(), module.buffers()):
        shape = getattr(t, "ds_shape", t.shape)
        empty = torch.empty(shape, dtype=t.dtype, device="meta")
        memo[id(t)] = torch.nn.Parameter(empty, requires_grad=t.requires_grad) if isinstance(t, torch.nn.Parameter) else empty
    return copy.deepcopy(module, memo)


@dataclass(frozen=True)
class ModelShape:
    """What ZeRO partitions: the trainable parameters (once each, in registration order) and the frozen ones."""

    module: torch.nn.Module  # on the meta device
    trainable: tuple[tuple[str, torch.nn.Parameter], ...]
    frozen_numel: int

    @classmethod
    def of(cls, module: torch.nn.Module) -> ModelShape:
        named = list(module.named_parameters())
        return cls(module, tuple((n, p) for n, p in named if p.requires_grad),
                   sum(p.numel() for _, p in named if not p.requires_grad))

    @property
    def numel(self) -> int:
        """Trainable elements (Ψ)."""
        return sum(p.numel() for _, p in self.trainable)

    @property
    def total_numel(self) -> int:
        return self.numel + self.frozen_numel

    @property
    def name(self) -> str:
        config = getattr(self.module, "config", None)
        return str(getattr(config, "model_type", None) or type(self.module).__name__)
