"""`init_inference(checkpoint=...)`: whole weights from a checkpoint into a model built without them.

What `checkpoint` may name:
- a shardspeed training checkpoint: the folder `engine.save_checkpoint` wrote (holding `latest`), saved at
  any ZeRO stage and data-, tensor- or pipeline-parallel size; its fp32 weights are consolidated
  (`checkpoint.zero_to_fp32`) and the model is then cast and sharded for the inference tensor-parallel size;
- DeepSpeed's descriptor, a dict or a `.json` file: `{"type": "ds_model", "checkpoints": [files],
  "version": 1.0}` (`base_dir`, from the descriptor or the config, prefixes relative file names; a
  JSON file's own folder otherwise); each file a state dict (`.safetensors`, or `torch.save`'d
  `.bin` / `.pt` / `.pth`) holding some of the weights, whole (checkpoints already split for tensor
  parallelism, DeepSpeed's `mp_size` / `parallelization: "tp"` and its Megatron type, are refused);
- one state-dict file.

The model may have been built on the meta device (`shardspeed.OnDevice(device="meta")`, or
`torch.device("meta")`), under `zero.Init` (its parameters partitioned), or normally. Parameters and
persistent buffers are taken from the checkpoint (tied parameters stay tied); a module's non-persistent
buffers left on the meta device (Hugging Face's RoPE tables) are rebuilt by constructing that module
again from its `config`. Every parameter must be in the checkpoint: missing names are an error naming
them. The consolidated state dict is held in memory once while loading.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config.errors import ConfigError
from ..zero.param_shards import is_partitioned

logger = logging.getLogger("shardspeed")

_STATE_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
_DESCRIPTOR_TYPES = ("ds_model", "bloom")


def read_checkpoint(spec: str | dict[str, Any], base_dir: str = "") -> dict[str, torch.Tensor]:
    """The whole weights `spec` names (see the module docstring), on the CPU."""
    if isinstance(spec, dict):
        return _read_descriptor(spec, Path(base_dir) if base_dir else None, "`checkpoint`")
    path = Path(spec)
    if not path.exists():
        raise ConfigError(f"`checkpoint` {spec!r} does not exist: give a shardspeed checkpoint folder, a checkpoint "
                          "descriptor (.json) or a state-dict file")
    if path.is_dir():
        from ..checkpoint.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        return get_fp32_state_dict_from_zero_checkpoint(path)
    if path.suffix == ".json":
        try:
            descriptor = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            raise ConfigError(f"`checkpoint` {spec!r}: cannot read it as a JSON checkpoint descriptor: {err}") from err
        if not isinstance(descriptor, dict):
            raise ConfigError(f"`checkpoint` {spec!r} holds a {type(descriptor).__name__}, not a descriptor object")
        return _read_descriptor(descriptor, Path(base_dir) if base_dir else path.parent, f"`checkpoint` {spec!r}")
    return _read_state_file(path)


def _read_descriptor(descriptor: dict[str, Any], base: Path | None, what: str) -> dict[str, torch.Tensor]:
    kind = str(descriptor.get("type", "")).lower()
    if kind not in _DESCRIPTOR_TYPES:
        raise ConfigError(f"{what}: checkpoint type {descriptor.get('type')!r} is not supported by shardspeed; "
                          f"use one of {', '.join(_DESCRIPTOR_TYPES)} (whole weights in state-dict files) or a shardspeed "
                          "checkpoint folder")
    if int(descriptor.get("mp_size", 1) or 1) > 1 or str(descriptor.get("parallelization", "pp")).lower() == "tp":
        raise ConfigError(f"{what}: checkpoints already split for tensor parallelism (`mp_size` / `parallelization: "
                          "\"tp\"`) are not supported by shardspeed; give whole weights (any inference tp_size works)")
    files = descriptor.get("checkpoints")
    if isinstance(files, str):
        files = [files]
    if not isinstance(files, list) or not files:
        raise ConfigError(f"{what}: `checkpoints` must list the state-dict files, got {files!r}")
    root = Path(descriptor["base_dir"]) if descriptor.get("base_dir") else base
    state: dict[str, torch.Tensor] = {}
    for name in files:
        file = Path(name) if root is None or Path(name).is_absolute() else root / name
        if not file.is_file():
            raise ConfigError(f"{what}: checkpoint file {str(file)!r} does not exist")
        state.update(_read_state_file(file))
    return state


def _read_state_file(path: Path) -> dict[str, torch.Tensor]:
    if not path.name.endswith(_STATE_SUFFIXES):
        raise ConfigError(f"`checkpoint` file {str(path)!r}: expected a state dict ({', '.join(_STATE_SUFFIXES)}), a "
                          "descriptor (.json) or a shardspeed checkpoint folder")
    state: Any
    try:
        if path.name.endswith(".safetensors"):
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a damaged or foreign file: say which
        raise ConfigError(f"`checkpoint` file {str(path)!r} could not be read as a state dict: {err}") from err
    if isinstance(state, dict) and isinstance(state.get("module"), dict):
        state = state["module"]  # DeepSpeed's model-states files keep the weights under "module"
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError(f"`checkpoint` file {str(path)!r} is not a state dict of tensors")
    return state


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
    replaced: dict[int, nn.Parameter] = {}
    with torch.no_grad():
        for names in by_tensor.values():
            value = next(state[n] for n in names if n in state)
            for name in names:
                _set(model, name, value, replaced)
    _rebuild_meta_buffers(model)


def _set(model: nn.Module, name: str, value: torch.Tensor, replaced: dict[int, nn.Parameter]) -> None:
    owner_name, _, leaf = name.rpartition(".")
    owner = model.get_submodule(owner_name) if owner_name else model
    if leaf in owner._parameters:
        param = owner._parameters[leaf]
        assert param is not None
        if id(param) in replaced:  # a tied alias: the same new parameter
            owner._parameters[leaf] = replaced[id(param)]
            return
        shape = param.ds_shape if is_partitioned(param) else param.shape
        dtype = param.ds_tensor.dtype if is_partitioned(param) and param.ds_tensor.numel() else param.dtype
        if tuple(value.shape) != tuple(shape):
            raise ConfigError(f"`checkpoint`: `{name}` has shape {tuple(value.shape)}, the model's {tuple(shape)}")
        # A new parameter: the old one may be on the meta device or a partitioned stage-3 parameter.
        fresh = nn.Parameter(value.to(dtype=dtype, copy=True), requires_grad=param.requires_grad)
        owner._parameters[leaf] = fresh
        replaced[id(param)] = fresh
        return
    buffer = owner._buffers[leaf]
    assert buffer is not None
    if tuple(value.shape) != tuple(buffer.shape):
        raise ConfigError(f"`checkpoint`: `{name}` has shape {tuple(value.shape)}, the model's {tuple(buffer.shape)}")
    owner._buffers[leaf] = value.to(dtype=buffer.dtype, copy=True)


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


__all__ = ["check_names", "load_whole_weights", "read_checkpoint"]
