"""DeepSpeed's `deepspeed.runtime.zero.stage3` path: its memory estimators are not built yet."""
from __future__ import annotations

from ...config.unbuilt import unbuilt_function

_FEATURE = "the ZeRO-3 memory estimators"
estimate_zero3_model_states_mem_needs_all_live = unbuilt_function(
    _FEATURE, "deepspeed.runtime.zero.stage3.estimate_zero3_model_states_mem_needs_all_live")
estimate_zero3_model_states_mem_needs_all_cold = unbuilt_function(
    _FEATURE, "deepspeed.runtime.zero.stage3.estimate_zero3_model_states_mem_needs_all_cold")
