"""Monitoring: TensorBoard / CSV / W&B metric writers and the wall-clock and throughput timers."""
from __future__ import annotations

from .monitor import (
    CsvWriter,
    Event,
    EventWriter,
    MonitorMaster,
    MonitorUnavailableError,
    TensorBoardWriter,
    WandbWriter,
    csv_file_name,
    log_dir_for,
)
from .timers import NOOP_TIMER, NoopTimer, ThroughputTimer, Timer, WallClockTimers

__all__ = [
    "CsvWriter",
    "Event",
    "EventWriter",
    "MonitorMaster",
    "MonitorUnavailableError",
    "NOOP_TIMER",
    "NoopTimer",
    "TensorBoardWriter",
    "ThroughputTimer",
    "Timer",
    "WallClockTimers",
    "WandbWriter",
    "csv_file_name",
    "log_dir_for",
]
