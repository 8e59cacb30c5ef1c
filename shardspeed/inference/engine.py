"""DeepSpeed's `deepspeed.inference.engine`: not built yet."""
from __future__ import annotations

from ..config.unbuilt import unbuilt_class

InferenceEngine = unbuilt_class("the inference engine (init_inference)", "deepspeed.inference.engine.InferenceEngine")
