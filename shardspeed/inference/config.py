"""DeepSpeed 0.19.8's inference config (`deepspeed.inference.config.DeepSpeedInferenceConfig`), strict.

Every field, alias and default is DeepSpeed's; unknown keys fail naming the closest valid one. The
deprecated keys (`mp_size`, `mpu`, `ep_size`, `ep_group`, `ep_mp_group`, `moe_experts`, `moe_type`)
are moved to their replacements with a warning, and giving one together with its replacement is an
error, as in DeepSpeed. `parse_inference_config` merges a config (dict or JSON path) with keyword
arguments the way `deepspeed.init_inference` does.
"""
from __future__ import annotations

import json
import logging
import os
from enum import Enum
from typing import Any, Literal

import torch
from pydantic import Field, ValidationError, field_validator

from ..config.base import Int, StrictModel
from ..config.errors import ConfigError
from ..config.loader import describe_validation_error

logger = logging.getLogger("shardspeed")

# DeepSpeed's DtypeEnum spellings.
_DTYPES: dict[torch.dtype, tuple[str, ...]] = {
    torch.float16: ("torch.float16", "fp16", "float16", "half"),
    torch.float32: ("torch.float32", "fp32", "float32", "float"),
    torch.bfloat16: ("torch.bfloat16", "bf16", "bfloat16", "bfloat"),
    torch.int8: ("torch.int8", "int8"),
}


def parse_dtype(value: Any) -> torch.dtype:
    if isinstance(value, torch.dtype):
        return value
    if isinstance(value, str):
        for dtype, names in _DTYPES.items():
            if value in names:
                return dtype
        known = ", ".join(n for names in _DTYPES.values() for n in names)
        raise ValueError(f"'{value}' is not a valid dtype (one of: {known})")
    raise TypeError(f"Invalid type for dtype: {type(value)}")


class DeepSpeedTPConfig(StrictModel):
    enabled: bool = Field(default=True, description="Tensor parallelism on (with tp_size > 1).")
    tp_size: Int = Field(default=1, ge=1, description="Ranks one model is split over.")
    tp_grain_size: Int = Field(default=64, ge=1, description="DeepSpeed's MLP split granularity (shardspeed splits evenly).")
    mpu: Any = Field(default=None, description="A Megatron-style mpu whose tensor group to use.")
    tp_group: Any = Field(default=None, description="A torch.distributed group to use as the tensor group.")


class MoETypeEnum(str, Enum):
    residual = "residual"
    standard = "standard"


class DeepSpeedMoEConfig(StrictModel):
    enabled: bool = Field(default=True)
    ep_size: Int = Field(default=1, ge=1)
    moe_experts: list[Any] = Field(default_factory=lambda: [1], alias="num_experts")
    type: MoETypeEnum = Field(default=MoETypeEnum.standard)
    ep_mp_group: Any = Field(default=None)
    ep_group: Any = Field(default=None, alias="expert_group")


class BaseQuantConfig(StrictModel):
    enabled: bool = Field(default=True)
    num_bits: Int = Field(default=8)
    q_type: Literal["symmetric", "asymmetric"] = Field(default="symmetric")
    q_groups: Int = Field(default=1)


class WeightQuantConfig(BaseQuantConfig):
    quantized_initialization: dict[str, Any] = Field(default_factory=dict)
    post_init_quant: dict[str, Any] = Field(default_factory=dict)


class ActivationQuantConfig(BaseQuantConfig):
    pass


class QKVQuantConfig(StrictModel):
    enabled: bool = Field(default=True)


class QuantizationConfig(StrictModel):
    enabled: bool = Field(default=True)
    activation: ActivationQuantConfig = Field(default_factory=ActivationQuantConfig)
    weight: WeightQuantConfig = Field(default_factory=WeightQuantConfig)
    qkv: QKVQuantConfig = Field(default_factory=QKVQuantConfig)


class InferenceCheckpointConfig(StrictModel):
    checkpoint_dir: str | None = Field(default=None)
    save_mp_checkpoint_path: str | None = Field(default=None)
    base_dir: str | None = Field(default=None)


class DeepSpeedInferenceConfig(StrictModel):
    """The `init_inference` config, DeepSpeed 0.19.8's fields and defaults."""

    replace_with_kernel_inject: bool = Field(default=False, alias="kernel_inject",
                                             description="shardspeed's fast decode path (Llama, Qwen2, Mistral, GPT-2).")
    dtype: Any = Field(default=torch.float16, description="The dtype the model is cast to (a torch dtype or DeepSpeed's strings).")
    tensor_parallel: DeepSpeedTPConfig = Field(default_factory=DeepSpeedTPConfig, alias="tp")
    enable_cuda_graph: bool = Field(default=False, description="Capture the decode step in a CUDA graph (CUDA only).")
    use_triton: bool = Field(default=False)
    triton_autotune: bool = Field(default=False)
    zero: dict[str, Any] = Field(default_factory=dict, description="A ZeRO-3 section: ZeRO-Inference (DeepSpeed ignores it).")
    triangular_masking: bool = Field(default=True, alias="tm")
    moe: DeepSpeedMoEConfig | bool = Field(default_factory=DeepSpeedMoEConfig)
    keep_module_on_host: bool = Field(default=False)
    quant: QuantizationConfig = Field(default_factory=QuantizationConfig)
    checkpoint: str | dict[str, Any] | None = Field(default=None)
    base_dir: str = Field(default="")
    set_empty_params: bool = Field(default=False)
    save_mp_checkpoint_path: str | None = Field(default=None)
    checkpoint_config: InferenceCheckpointConfig = Field(default_factory=InferenceCheckpointConfig, alias="ckpt_config")
    return_tuple: bool = Field(default=True)
    training_mp_size: Int = Field(default=1)
    replace_method: str = Field(default="auto")
    injection_policy: dict[Any, Any] | None = Field(default=None, alias="injection_dict")
    injection_policy_tuple: tuple[Any, ...] | None = Field(default=None)
    config: dict[str, Any] | Any = Field(default=None, alias="args")
    max_out_tokens: Int = Field(default=1024, alias="max_tokens", gt=0)
    min_out_tokens: Int = Field(default=1, alias="min_tokens")
    transposed_mode: bool = Field(default=False)
    # deprecated, moved to their replacements by `_move_deprecated`
    mp_size: Int = Field(default=1)
    mpu: Any = Field(default=None)
    ep_size: Int = Field(default=1)
    ep_group: Any = Field(default=None, alias="expert_group")
    ep_mp_group: Any = Field(default=None, alias="expert_mp_group")
    moe_experts: list[Any] = Field(default_factory=lambda: [1])
    moe_type: MoETypeEnum = Field(default=MoETypeEnum.standard)

    @field_validator("dtype", mode="before")
    @classmethod
    def _dtype(cls, value: Any) -> torch.dtype:
        return parse_dtype(value)

    @field_validator("moe", mode="before")
    @classmethod
    def _moe(cls, value: Any) -> Any:
        return DeepSpeedMoEConfig(enabled=value) if isinstance(value, bool) else value

    @property
    def moe_config(self) -> DeepSpeedMoEConfig:
        assert isinstance(self.moe, DeepSpeedMoEConfig)
        return self.moe


# deprecated key -> (section, field) it moves to
_DEPRECATED = {"mp_size": ("tensor_parallel", "tp_size"), "mpu": ("tensor_parallel", "mpu"), "ep_size": ("moe", "ep_size"),
               "ep_group": ("moe", "ep_group"), "ep_mp_group": ("moe", "ep_mp_group"),
               "moe_experts": ("moe", "moe_experts"), "moe_type": ("moe", "type")}
_ALIASES = {"expert_group": "ep_group", "expert_mp_group": "ep_mp_group"}


def _move_deprecated(raw: dict[str, Any]) -> dict[str, Any]:
    raw = dict(raw)
    for old_spelling, canonical in _ALIASES.items():
        if old_spelling in raw:
            raw[canonical] = raw.pop(old_spelling)
    for key, (section, field) in _DEPRECATED.items():
        if key not in raw:
            continue
        value = raw.pop(key)
        section_key = "tp" if section == "tensor_parallel" and "tp" in raw else section
        target = raw.get(section_key)
        target = {} if target is None else (target.model_dump(by_alias=False) if isinstance(target, StrictModel) else
                                            {"enabled": target} if isinstance(target, bool) else dict(target))
        aliases = {"moe_experts": "num_experts", "ep_group": "expert_group"}
        if field in target or aliases.get(field) in target:
            raise ConfigError(f"Cannot provide deprecated parameter '{key}' and replacing parameter "
                              f"'{section}.{field}' together")
        logger.warning("inference config key `%s` is deprecated (as in DeepSpeed); use `%s.%s` instead", key, section, field)
        target[field] = value
        raw[section_key] = target
    if "replace_method" in raw:
        logger.warning("inference config key `replace_method`: This parameter is no longer needed, please remove from "
                       "your call to DeepSpeed-inference")
    return raw


def read_inference_config(config: Any) -> dict[str, Any]:
    if config is None:
        return {}
    if isinstance(config, (str, os.PathLike)):
        with open(config) as handle:
            return dict(json.load(handle))
    if isinstance(config, dict):
        return dict(config)
    raise ValueError(f"'config' argument expected string or dictionary, got {type(config)}")


def _same(a: Any, b: Any) -> bool:
    try:
        return bool(a == b)
    except Exception:  # tensors, groups: compare identity
        return a is b


def parse_inference_config(config: Any = None, **kwargs: Any) -> DeepSpeedInferenceConfig:
    """DeepSpeed's merge: the config (dict or JSON path) plus keyword arguments; a key given both ways with
    different values is an error naming both."""
    raw = read_inference_config(config)
    for key, value in kwargs.items():
        if key in raw and not _same(raw[key], value):
            raise ValueError(f"Conflicting argument '{key}' in 'config':{raw[key]} and kwargs:{value}")
    raw.update(kwargs)
    raw = _move_deprecated(raw)
    try:
        return DeepSpeedInferenceConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(describe_validation_error(err, DeepSpeedInferenceConfig, "inference config")) from None


__all__ = ["DeepSpeedInferenceConfig", "DeepSpeedMoEConfig", "DeepSpeedTPConfig", "QuantizationConfig",
           "parse_dtype", "parse_inference_config"]
