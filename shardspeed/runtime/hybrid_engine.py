"""DeepSpeed's `deepspeed.runtime.hybrid_engine` (the RLHF hybrid engine): not built yet."""
from __future__ import annotations

from ..config.unbuilt import unbuilt_class

DeepSpeedHybridEngine = unbuilt_class("the RLHF hybrid engine (hybrid_engine)", "deepspeed.runtime.hybrid_engine.DeepSpeedHybridEngine")
