"""`init_inference(checkpoint=...)`: whole weights put into a model built without them.

`checkpoint.weights_source.read_checkpoint` reads what `checkpoint` names into a state dict; this puts it
into the model. The model may have been built on the meta device (`shardspeed.OnDevice(device="meta")`,
or `torch.device("meta")`), under `zero.Init` (its parameters partitioned), or normally. Parameters and
persistent buffers are taken from the state dict (tied parameters stay tied); a module's non-persistent
buffers left on the meta device (Hugging Face's RoPE tables) are rebuilt by constructing that module
again from its `config`. Every parameter must be in the state dict: missing names are an error naming
them. The consolidated state dict is held in memory once while loading.
"""
from __future__ import annotations

import logging

import torch
from torch import nn

from ..config.errors import ConfigError
from ..zero.param_shards import is_partitioned

logger = logging.getLogger("shardspeed")


def check_names(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[int, list[str]]:
    """`model`'s state-dict names grouped by tensor (tied aliases together); an error naming the weights
    `state` lacks (a tied alias may be absent when another name of it is there)."""
    own = model.state_dict(keep_vars=True)
    by_tensor: dict[int, list[str]] = {}
    for name, tensor in own.items():
        by_tensor.setdefault(id(tensor), []).append(name)
    missing = [names[0] for names in by_tensor.values() if not any(n in state for n in names)]
    if missing:
        raise ConfigError(f"`checkpoint` lacks {len(missing)} of the model's weights: {', '.join(missing[:8])}"
                          f"{' ...' if len(missing) > 8 else ''}; is it a checkpoint of this model?")
    unexpected = [k for k in state if k not in own]
    if unexpected:
        logger.warning("init_inference: the checkpoint has %d name(s) the model lacks, not loaded: %s", len(unexpected),
                       ", ".join(unexpected[:5]))
    return by_tensor


def load_whole_weights(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Make `state` the weights of `model` (built on meta, under zero.Init, or normally), in place."""
    by_tensor = check_names(model, state)
    replaced: dict[int, torch.Tensor] = {}  # old tensor's id -> its new tensor, shared by tied aliases
    with torch.no_grad():
        for names in by_tensor.values():
            value = next(state[n] for n in names if n in state)
            for name in names:
                _set(model, name, value, replaced)
    _rebuild_meta_buffers(model)


def _set(model: nn.Module, name: str, value: torch.Tensor, replaced: dict[int, torch.Tensor]) -> None:
    """A new tensor for `name` (the old one may be on the meta device, or a partitioned stage-3 parameter whose
    released `.data` still has its dtype)."""
    owner_name, _, leaf = name.rpartition(".")
    owner = model.get_submodule(owner_name) if owner_name else model
    slots = owner._parameters if leaf in owner._parameters else owner._buffers
    old = slots[leaf]
    assert old is not None
    if id(old) not in replaced:
        shape = old.ds_shape if is_partitioned(old) else old.shape
        if tuple(value.shape) != tuple(shape):
            raise ConfigError(f"`checkpoint`: `{name}` has shape {tuple(value.shape)}, the model's {tuple(shape)}")
        new = value.to(dtype=old.dtype, copy=True)
        replaced[id(old)] = nn.Parameter(new, requires_grad=old.requires_grad) if slots is owner._parameters else new
    slots[leaf] = replaced[id(old)]  # type: ignore[assignment]


def refuse_without_weights(model: nn.Module, partitioned_ok: bool = False) -> None:
    """An error naming the first tensor a forward could not use: on the meta device, or (unless ZeRO-Inference
    serves it partitioned) partitioned by zero.Init; for a model given no `checkpoint`, or after loading one."""
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if is_partitioned(tensor):
            if partitioned_ok:
                continue
            raise ConfigError(f"`{name}` is partitioned (the model was built under zero.Init): give its weights with "
                              "`checkpoint=`, or serve it partitioned with ZeRO-Inference (`zero: {stage: 3}`)")
        if tensor.is_meta:
            raise ConfigError(f"`{name}` is on the meta device: give the weights with `checkpoint=` (a shardspeed "
                              "checkpoint folder, a descriptor or a state-dict file)")


def _rebuild_meta_buffers(model: nn.Module) -> None:
    for module_name, module in model.named_modules():
        meta = [n for n, b in module._buffers.items() if b is not None and b.is_meta]
        if not meta:
            continue
        config = getattr(module, "config", None)
        try:
            with torch.device("cpu"):
                rebuilt = type(module)(config) if config is not None else None
        except Exception:  # a constructor that needs more than the config
            rebuilt = None
        if rebuilt is None:
            raise ConfigError(f"`{module_name}.{meta[0]}` is a non-persistent buffer still on the meta device, which no "
                              "checkpoint holds; build this module on the CPU (or register the buffer as persistent)")
        for n in meta:
            module._buffers[n] = rebuilt._buffers[n]
        for attr, value in vars(rebuilt).items():  # tensors kept as plain attributes (e.g. RoPE's original_inv_freq)
            if isinstance(value, torch.Tensor) and isinstance(getattr(module, attr, None), torch.Tensor) \
                    and getattr(module, attr).is_meta:
                setattr(module, attr, value)


__all__ = ["check_names", "load_whole_weights", "refuse_without_weights"]
