"""DeepSpeed's `deepspeed.runtime.zero.stage_1_and_2` path: its memory estimators are not built yet."""
from __future__ import annotations

from ...config.unbuilt import unbuilt_function

_FEATURE = "the ZeRO-2 memory estimators"
estimate_zero2_model_states_mem_needs_all_live = unbuilt_function(
    _FEATURE, "deepspeed.runtime.zero.stage_1_and_2.estimate_zero2_model_states_mem_needs_all_live")
estimate_zero2_model_states_mem_needs_all_cold = unbuilt_function(
    _FEATURE, "deepspeed.runtime.zero.stage_1_and_2.estimate_zero2_model_states_mem_needs_all_cold")
