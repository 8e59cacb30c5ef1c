"""Optimizers named by the ds_config ``optimizer`` section, and the factory that builds them."""
from __future__ import annotations

from shardspeed.optim.factory import (
    AdamNoBiasCorrection,
    build_optimizer,
    supported_optimizer_names,
)
from shardspeed.optim.lamb import Lamb
from shardspeed.optim.lion import Lion

__all__ = ["AdamNoBiasCorrection", "Lamb", "Lion", "build_optimizer", "supported_optimizer_names"]
