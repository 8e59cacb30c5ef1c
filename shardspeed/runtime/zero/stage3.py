"""DeepSpeed's `deepspeed.runtime.zero.stage3` path: its ZeRO-3 memory estimators
(shardspeed's ZeRO-3 strategy itself is `shardspeed.zero.stage3`)."""
from __future__ import annotations

from ...profiling.memory_estimators import (estimate_zero3_model_states_mem_needs,
                                            estimate_zero3_model_states_mem_needs_all_cold,
                                            estimate_zero3_model_states_mem_needs_all_live)
from ...profiling.memory_estimators import zero3_model_to_params as model_to_params

__all__ = ["estimate_zero3_model_states_mem_needs", "estimate_zero3_model_states_mem_needs_all_cold",
           "estimate_zero3_model_states_mem_needs_all_live", "model_to_params"]
