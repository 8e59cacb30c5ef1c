"""DeepSpeed-Chat's ds_config builders and optimizer groups (`dschat/utils/ds_utils.py`, `dschat/utils/utils.py`).

The configs are DeepSpeed-Chat's, key for key. One addition: `dtype="fp32"` (no mixed precision), for
CPUs; DeepSpeed-Chat knows only "fp16" and "bf16".
"""
from __future__ import annotations

from typing import Any, Sequence

from torch import nn

from ..config.errors import ConfigError

GLOBAL_BATCH_SIZE = 32
MICRO_BATCH_SIZE = 4
NO_DECAY_NAMES = ("bias", "layer_norm.weight", "layernorm.weight", "norm.weight", "ln_f.weight")
LORA_NAMES = ("lora_right_weight", "lora_left_weight")


def _precision(dtype: str) -> dict[str, Any]:
    if dtype == "fp16":
        return {"fp16": {"enabled": True, "loss_scale_window": 100}}
    if dtype == "bf16":
        return {"bf16": {"enabled": True}}
    if dtype == "fp32":
        return {}
    raise ConfigError(f"--dtype {dtype!r}: choose fp16, bf16 or fp32")


def get_train_ds_config(offload: bool, dtype: str, stage: int = 2, enable_hybrid_engine: bool = False,
                        inference_tp_size: int = 1, release_inference_cache: bool = False, pin_parameters: bool = True,
                        tp_gather_partition_size: int = 8, max_out_tokens: int = 512, enable_tensorboard: bool = False,
                        enable_mixed_precision_lora: bool = False, tb_path: str = "", tb_name: str = "") -> dict[str, Any]:
    """The config of a trained engine (actor, critic), with the `hybrid_engine` section."""
    if enable_mixed_precision_lora:
        raise ConfigError("--enable_mixed_precision_lora (DeepSpeed's MixZ++: quantized frozen weights, hpZ) is not "
                          "supported by shardspeed; leave it off")
    device = "cpu" if offload else "none"
    return {
        "train_batch_size": GLOBAL_BATCH_SIZE,
        "train_micro_batch_size_per_gpu": MICRO_BATCH_SIZE,
        "steps_per_print": 10,
        "zero_optimization": {
            "stage": stage, "overlap_comm": True, "offload_param": {"device": device},
            "offload_optimizer": {"device": device}, "stage3_param_persistence_threshold": 1e4,
            "stage3_max_live_parameters": 3e7, "stage3_prefetch_bucket_size": 3e7, "memory_efficient_linear": False,
        },
        **_precision(dtype),
        "gradient_clipping": 1.0,
        "prescale_gradients": False,
        "wall_clock_breakdown": False,
        "hybrid_engine": {
            "enabled": enable_hybrid_engine, "max_out_tokens": max_out_tokens, "inference_tp_size": inference_tp_size,
            "release_inference_cache": release_inference_cache, "pin_parameters": pin_parameters,
            "tp_gather_partition_size": tp_gather_partition_size,
        },
        "tensorboard": {"enabled": enable_tensorboard, "output_path": f"{tb_path}/ds_tensorboard_logs/",
                        "job_name": f"{tb_name}_tensorboard"},
    }


def get_eval_ds_config(offload: bool, dtype: str, stage: int = 0) -> dict[str, Any]:
    """The config of a frozen engine (reference, reward): no optimizer."""
    return {
        "train_batch_size": GLOBAL_BATCH_SIZE,
        "train_micro_batch_size_per_gpu": MICRO_BATCH_SIZE,
        "steps_per_print": 10,
        "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 1e4,
                              "offload_param": {"device": "cpu" if offload else "none"}, "memory_efficient_linear": False},
        **_precision(dtype),
        "gradient_clipping": 1.0,
        "prescale_gradients": False,
        "wall_clock_breakdown": False,
    }


def get_optimizer_grouped_parameters(model: nn.Module, weight_decay: float, lora_lr: float = 5e-4,
                                     no_decay_name_list: Sequence[str] = NO_DECAY_NAMES,
                                     lora_name_list: Sequence[str] = LORA_NAMES) -> list[dict[str, Any]]:
    """Trainable parameters in (up to) three groups: decayed, LoRA (own learning rate), not decayed (biases, norms)."""
    def named(decay: bool, lora: bool | None) -> list[nn.Parameter]:
        found = []
        for name, param in model.named_parameters():
            lowered = name.lower()
            if not param.requires_grad or any(k in lowered for k in no_decay_name_list) == decay:
                continue
            if lora is None or any(k in lowered for k in lora_name_list) == lora:
                found.append(param)
        return found

    groups = [{"params": named(True, False), "weight_decay": weight_decay},
              {"params": named(True, True), "weight_decay": weight_decay, "lr": lora_lr},
              {"params": named(False, None), "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


__all__ = ["get_eval_ds_config", "get_optimizer_grouped_parameters", "get_train_ds_config"]
