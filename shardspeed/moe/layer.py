"""DeepSpeed's `deepspeed.moe.layer`: not built yet."""
from __future__ import annotations

from ..config.unbuilt import unbuilt_class

MoE = unbuilt_class("mixture of experts (MoE)", "deepspeed.moe.layer.MoE")
