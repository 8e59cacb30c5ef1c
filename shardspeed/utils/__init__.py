"""DeepSpeed's `deepspeed.utils` path: its logger, rank-filtered logging, stage-3 leaf marks, and the
checkpoint converter under its old home."""
from __future__ import annotations

import logging
from collections.abc import Iterable

import torch.distributed as dist

from ..zero.unit_plan import get_z3_leaf_modules, set_z3_leaf_modules, unset_z3_leaf_modules, z3_leaf_module
from . import groups

logger = logging.getLogger("shardspeed")


def is_initialized() -> bool:
    """Whether torch.distributed is set up (some Hugging Face model code asks `deepspeed.utils` for this)."""
    return dist.is_available() and dist.is_initialized()


def log_dist(message: str, ranks: Iterable[int] | None = None, level: int = logging.INFO) -> None:
    """Log `message` on the given global ranks only (all when None or containing -1), as DeepSpeed's does."""
    wanted = list(ranks) if ranks is not None else [-1]
    rank = dist.get_rank() if dist.is_initialized() else 0
    if -1 in wanted or rank in wanted:
        logger.log(level, f"[Rank {rank}] {message}")


__all__ = ["get_z3_leaf_modules", "groups", "is_initialized", "log_dist", "logger", "set_z3_leaf_modules", "unset_z3_leaf_modules",
           "z3_leaf_module"]
