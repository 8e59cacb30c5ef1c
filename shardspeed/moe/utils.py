"""DeepSpeed's `deepspeed.moe.utils`: not built yet."""
from __future__ import annotations

from ..config.unbuilt import unbuilt_function

_FEATURE = "mixture of experts (MoE)"
is_moe_param = unbuilt_function(_FEATURE, "deepspeed.moe.utils.is_moe_param")
split_params_into_different_moe_groups_for_optimizer = unbuilt_function(
    _FEATURE, "deepspeed.moe.utils.split_params_into_different_moe_groups_for_optimizer")
