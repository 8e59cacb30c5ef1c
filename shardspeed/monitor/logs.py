"""shardspeed's log lines speak on rank 0 out of the box, as DeepSpeed's do.

`steps_per_print`, `wall_clock_breakdown` and `memory_breakdown` write at INFO to the `shardspeed`
logger. Python's default (no handler, WARNING) would swallow them unless the program configured
logging itself, which most training scripts do not. So at `initialize`:
- a level the program set on the `shardspeed` logger is kept, whatever it is;
- otherwise rank 0 logs INFO and the other ranks WARNING (quiet: one copy of each line);
- and when nobody configured logging (no handler on the root logger nor on ours), rank 0 gets its
  own stdout handler, without propagation, so the root logger is left as the program left it.
A program that configured the root logger gets our INFO lines through its own handlers.
"""
from __future__ import annotations

import logging
import sys

LOGGER = "shardspeed"


def speak_on_rank0(rank: int) -> None:
    """Set up the `shardspeed` logger as described above (idempotent)."""
    logger = logging.getLogger(LOGGER)
    if logger.level != logging.NOTSET:
        return  # the program (or an earlier engine) chose
    if rank != 0:
        logger.setLevel(logging.WARNING)
        return
    logger.setLevel(logging.INFO)
    if not logger.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("[shardspeed] %(message)s"))
        logger.addHandler(handler)
        logger.propagate = False
