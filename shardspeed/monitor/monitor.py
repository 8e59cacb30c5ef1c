"""Training-metric writers for the `tensorboard`, `csv_monitor` and `wandb` config sections.

The engine hands `MonitorMaster` the three parsed sections and its global rank, then calls
`write_events([(name, value, step), ...])` once per logged step and `close()` at the end.

What lands where (the same layout DeepSpeed writes, so existing dashboards and scripts work):

- TensorBoard: event files `events.out.tfevents.*` in `<output_path>/<job_name>/`. DeepSpeed's
  default `output_path` is "" — the job folder is created in the launch directory (there is no
  implicit `runs/` folder). `~` is expanded, which DeepSpeed does not do.
- CSV: one file per event name in `<output_path>/<job_name>/`, named after the event with `/`
  and whitespace (and characters no file system accepts) replaced by `_`:
  `Train/Samples/train_loss` -> `Train_Samples_train_loss.csv`. The first row is the header
  `step,<last segment of the name>` (`step,train_loss`), then one `step,value` row per event.
  Unlike DeepSpeed, a file that already has rows (a resumed run) does not get a second header.
- W&B: `wandb.init(project=project, group=group, entity=team)` once, then one
  `log({name: value, ...}, step=step)` per distinct step; `WANDB_MODE=offline` works as usual.

Only rank 0 writes. Every rank checks that the packages an enabled section needs are importable,
so a missing package fails the whole job at start-up instead of rank 0 alone.
"""
from __future__ import annotations

import csv
import importlib.util
import os
import re
from collections.abc import Iterable, Sequence
from typing import IO, Any, Protocol

from shardspeed.config.errors import ConfigError

Event = tuple[str, float, int]
"""`(name, value, step)`: a scalar metric, DeepSpeed naming (`Train/Samples/train_loss`)."""


class MonitorUnavailableError(ConfigError, ImportError):
    """An enabled monitor section needs a package that is not installed.

    Both a `ConfigError` (the user changes `<section>.enabled` or installs the package) and an
    `ImportError` (what it is underneath), so either `except` clause catches it.
    """


class LogDirSection(Protocol):
    """The `tensorboard` and `csv_monitor` sections (any object with these attributes)."""

    enabled: bool
    output_path: str
    job_name: str


class WandbSection(Protocol):
    """The `wandb` section (any object with these attributes)."""

    enabled: bool
    group: str | None
    team: str | None
    project: str


class EventWriter(Protocol):
    """One monitoring back end: writes scalar events, releases its files on `close()`."""

    def write_events(self, events: Sequence[Event]) -> None: ...

    def close(self) -> None: ...


def _is_on(section: Any) -> bool:
    return section is not None and bool(getattr(section, "enabled", False))


def _require(module: str, key: str) -> None:
    """Raise `MonitorUnavailableError` naming `key` when `module` cannot be imported."""
    try:
        found = importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        raise MonitorUnavailableError(
            f"`{key}` is true but the `{module}` package is not installed: "
            f"run `pip install {module}`, or set `{key}` to false."
        )


def log_dir_for(section: LogDirSection) -> str:
    """`<output_path>/<job_name>`, with "" (DeepSpeed's default) meaning the launch directory."""
    return os.path.join(os.path.expanduser(section.output_path or ""), section.job_name or "")


def _scalar(value: Any) -> float | int:
    """A plain Python number from a float, an int or a one-element tensor."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return value
    if hasattr(value, "item"):
        return value.item()
    return float(value)


_UNSAFE = re.compile(r'[\s/\\:*?"<>|\x00-\x1f]')


def csv_file_name(name: str) -> str:
    """The CSV file for event `name`: `Train/Samples/lr` -> `Train_Samples_lr.csv`."""
    if not name:
        raise ValueError("a monitor event needs a non-empty name")
    return _UNSAFE.sub("_", name) + ".csv"


class TensorBoardWriter:
    """Scalars to TensorBoard event files in `<output_path>/<job_name>/`, flushed per call."""

    def __init__(self, section: LogDirSection) -> None:
        _require("tensorboard", "tensorboard.enabled")
        from torch.utils.tensorboard import SummaryWriter

        self.log_dir = log_dir_for(section)
        os.makedirs(self.log_dir or ".", exist_ok=True)
        self._writer: Any = SummaryWriter(log_dir=self.log_dir or ".")

    def write_events(self, events: Sequence[Event]) -> None:
        for name, value, step in events:
            self._writer.add_scalar(name, _scalar(value), step)
        self._writer.flush()  # a crashed run still has every step written before the crash

    def close(self) -> None:
        self._writer.close()


class CsvWriter:
    """One `step,<metric>` CSV per event name in `<output_path>/<job_name>/`, flushed per call."""

    def __init__(self, section: LogDirSection) -> None:
        self.log_dir = log_dir_for(section)
        os.makedirs(self.log_dir or ".", exist_ok=True)
        self._files: dict[str, IO[str]] = {}
        self._owner: dict[str, str] = {}  # file name -> the event name writing it

    def path_for(self, name: str) -> str:
        """Where the rows of event `name` go."""
        return os.path.join(self.log_dir, csv_file_name(name))

    def _file(self, name: str) -> IO[str]:
        handle = self._files.get(name)
        if handle is not None:
            return handle
        file_name = csv_file_name(name)
        other = self._owner.setdefault(file_name, name)
        if other != name:
            raise ValueError(
                f"csv_monitor: events `{other}` and `{name}` would share the file `{file_name}`; "
                "rename one of them"
            )
        path = self.path_for(name)
        is_new = not os.path.exists(path) or os.path.getsize(path) == 0
        handle = open(path, "a", newline="", encoding="utf-8")
        if is_new:
            csv.writer(handle).writerow(["step", name.rsplit("/", 1)[-1]])
        self._files[name] = handle
        return handle

    def write_events(self, events: Sequence[Event]) -> None:
        touched = set()
        for name, value, step in events:
            handle = self._file(name)
            csv.writer(handle).writerow([step, _scalar(value)])
            touched.add(name)
        for name in touched:
            self._files[name].flush()

    def close(self) -> None:
        for handle in self._files.values():
            handle.close()
        self._files.clear()


class WandbWriter:
    """A W&B run started with `wandb.init(project, group, entity=team)`; one `log` per step."""

    def __init__(self, section: WandbSection) -> None:
        _require("wandb", "wandb.enabled")
        import wandb

        self._run: Any = wandb.init(project=section.project, group=section.group, entity=section.team)

    def write_events(self, events: Sequence[Event]) -> None:
        rows: dict[int, dict[str, float | int]] = {}  # insertion-ordered by first appearance
        for name, value, step in events:
            rows.setdefault(step, {})[name] = _scalar(value)
        for step, row in rows.items():
            self._run.log(row, step=step)

    def close(self) -> None:
        self._run.finish()


class MonitorMaster:
    """Fans `write_events` out to every enabled back end; only rank 0 writes anything.

    `enabled` is true when any section is enabled and is the same on every rank, so the engine
    may use it to decide on work that involves all ranks (such as averaging the loss for the
    log). `writes` is true only on the rank that actually writes (rank 0 with a section on).
    A missing package for an enabled section raises `MonitorUnavailableError` on every rank.
    """

    def __init__(
        self,
        tensorboard: LogDirSection | None,
        csv_monitor: LogDirSection | None,
        wandb: WandbSection | None,
        rank: int,
    ) -> None:
        self.rank = rank
        self.enabled = any(_is_on(s) for s in (tensorboard, csv_monitor, wandb))
        if _is_on(tensorboard):
            _require("tensorboard", "tensorboard.enabled")
        if _is_on(wandb):
            _require("wandb", "wandb.enabled")
        self._writers: list[EventWriter] = []
        if rank == 0:
            self._open(tensorboard, csv_monitor, wandb)

    def _open(self, tensorboard: Any, csv_monitor: Any, wandb: Any) -> None:
        try:
            if _is_on(tensorboard):
                self._writers.append(TensorBoardWriter(tensorboard))
            if _is_on(wandb):
                self._writers.append(WandbWriter(wandb))
            if _is_on(csv_monitor):
                self._writers.append(CsvWriter(csv_monitor))
        except BaseException:
            self.close()
            raise

    @property
    def writes(self) -> bool:
        """Whether this rank writes events (rank 0 with at least one section enabled)."""
        return bool(self._writers)

    @property
    def writers(self) -> tuple[EventWriter, ...]:
        """The open back ends, in the order TensorBoard, W&B, CSV (empty off rank 0)."""
        return tuple(self._writers)

    def write_events(self, events: Iterable[Event]) -> None:
        """Write `(name, value, step)` scalars to every enabled back end; a no-op off rank 0."""
        if not self._writers:
            return
        batch = list(events)
        for writer in self._writers:
            writer.write_events(batch)

    def close(self) -> None:
        """Flush and close every back end (finishes the W&B run); safe to call twice."""
        writers, self._writers = self._writers, []
        for writer in writers:
            writer.close()
