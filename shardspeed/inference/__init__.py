"""The inference engine (DeepSpeed's `deepspeed.init_inference`): not built yet."""
from __future__ import annotations

from ..config.unbuilt import unbuilt_function
from .engine import InferenceEngine

_FEATURE = "the inference engine (init_inference)"
init_inference = unbuilt_function(_FEATURE, "deepspeed.init_inference")
default_inference_config = unbuilt_function(_FEATURE, "deepspeed.default_inference_config")

__all__ = ["InferenceEngine", "default_inference_config", "init_inference"]
