"""The inference engine (DeepSpeed's `deepspeed.inference`): `InferenceEngine`, its config, tensor-parallel
inference and the fast decode path. `shardspeed.init_inference` (in `shardspeed.inference_api`) builds it."""
from __future__ import annotations

from .config import DeepSpeedInferenceConfig
from .engine import InferenceEngine

__all__ = ["DeepSpeedInferenceConfig", "InferenceEngine"]
