"""DeepSpeed's `deepspeed.utils.groups` accessors: not built yet.

DeepSpeed keeps its expert and sequence-parallel groups in module globals; shardspeed keeps groups in
the topology an engine is built with (`engine.topology.axis(...)`). These accessors arrive with
expert parallelism (MoE) and sequence parallelism.
"""
from __future__ import annotations

from ..config.unbuilt import unbuilt_function

_EXPERT = "expert-parallel groups (MoE)"
_SEQUENCE = "sequence parallelism"
_get_expert_parallel_group = unbuilt_function(_EXPERT, "deepspeed.utils.groups._get_expert_parallel_group")
_get_expert_data_parallel_group = unbuilt_function(_EXPERT, "deepspeed.utils.groups._get_expert_data_parallel_group")
_get_expert_parallel_world_size = unbuilt_function(_EXPERT, "deepspeed.utils.groups._get_expert_parallel_world_size")
_get_expert_data_parallel_world_size = unbuilt_function(_EXPERT, "deepspeed.utils.groups._get_expert_data_parallel_world_size")
_get_expert_parallel_rank = unbuilt_function(_EXPERT, "deepspeed.utils.groups._get_expert_parallel_rank")
_get_max_expert_size = unbuilt_function(_EXPERT, "deepspeed.utils.groups._get_max_expert_size")
_get_sequence_parallel_group = unbuilt_function(_SEQUENCE, "deepspeed.utils.groups._get_sequence_parallel_group")
_get_sequence_parallel_world_size = unbuilt_function(_SEQUENCE, "deepspeed.utils.groups._get_sequence_parallel_world_size")
