"""DeepSpeed's `deepspeed.runtime.zero.stage_1_and_2` path: its ZeRO-2 memory estimators
(shardspeed's ZeRO-1/2 strategy itself is `shardspeed.zero.partitioned`)."""
from __future__ import annotations

from ...profiling.memory_estimators import (estimate_zero2_model_states_mem_needs,
                                            estimate_zero2_model_states_mem_needs_all_cold,
                                            estimate_zero2_model_states_mem_needs_all_live)
from ...profiling.memory_estimators import zero2_model_to_params as model_to_params

__all__ = ["estimate_zero2_model_states_mem_needs", "estimate_zero2_model_states_mem_needs_all_cold",
           "estimate_zero2_model_states_mem_needs_all_live", "model_to_params"]
