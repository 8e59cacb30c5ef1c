"""DeepSpeed's `deepspeed.moe.sharded_moe`: not built yet."""
from __future__ import annotations

from ..config.unbuilt import unbuilt_class, unbuilt_function

_FEATURE = "mixture of experts (MoE)"
TopKGate = unbuilt_class(_FEATURE, "deepspeed.moe.sharded_moe.TopKGate")
MOELayer = unbuilt_class(_FEATURE, "deepspeed.moe.sharded_moe.MOELayer")
top1gating = unbuilt_function(_FEATURE, "deepspeed.moe.sharded_moe.top1gating")
top2gating = unbuilt_function(_FEATURE, "deepspeed.moe.sharded_moe.top2gating")
topkgating = unbuilt_function(_FEATURE, "deepspeed.moe.sharded_moe.topkgating")
