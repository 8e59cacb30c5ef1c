"""Whole weights named by `init_inference(checkpoint=...)`, read into a state dict on the CPU.

What `checkpoint` may name:
- a shardspeed training checkpoint: the folder `engine.save_checkpoint` wrote (holding `latest`), saved at
  any ZeRO stage and data-, tensor- or pipeline-parallel size; its fp32 weights are consolidated
  (`checkpoint.zero_to_fp32`);
- DeepSpeed's descriptor, a dict or a `.json` file: `{"type": "ds_model", "checkpoints": [files],
  "version": 1.0}` (`base_dir`, from the descriptor or the config, prefixes relative file names; a
  JSON file's own folder otherwise); each file a state dict (`.safetensors`, or `torch.save`'d
  `.bin` / `.pt` / `.pth`) holding some of the weights, whole (checkpoints already split for tensor
  parallelism, DeepSpeed's `mp_size` / `parallelization: "tp"` and its Megatron type, are refused);
- one state-dict file.

`inference.checkpoint_loading` puts the result into the model.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ..config.errors import ConfigError
from .zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

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


__all__ = ["read_checkpoint"]
