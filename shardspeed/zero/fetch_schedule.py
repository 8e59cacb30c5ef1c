"""The order in which modules ask for their parameters, recorded on one step and replayed on the next.

ZeRO-3 gathers a module's parameters when the module runs. Knowing what runs next lets the
engine start those gathers early (prefetch) and keep a unit gathered when it is about to be used
again (reuse distance). The first step records events (forward and backward, per module call);
later steps check every event against the record. One mismatch (another branch ran) stops all
prediction for the rest of that step and the step's own events become the new record: a wrong
guess costs memory or time, never correctness, because every module still fetches what it needs.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Event:
    key: tuple[str, int]  # ("F" | "B", id(module))
    units: tuple[Any, ...]


class FetchSchedule:
    def __init__(self) -> None:
        self.trace: list[Event] | None = None
        self._recording: list[Event] = []
        self._pos = 0
        self.valid = False
        self.active = False

    def begin_step(self) -> None:
        self._recording = []
        self._pos = 0
        self.valid = self.trace is not None
        self.active = True

    def event(self, phase: str, module: Any, units: Sequence[Any]) -> None:
        event = Event((phase, id(module)), tuple(units))
        self._recording.append(event)
        if not self.valid:
            return
        if self._pos < len(self.trace) and self.trace[self._pos].key == event.key and self.trace[self._pos].units == event.units:
            self._pos += 1
        else:
            self.valid = False  # another path ran: stop predicting until the step ends

    def end_step(self) -> None:
        """Keep the record if this step followed it (a prefix, e.g. an eval forward, also follows it)."""
        if not self.active:
            return
        if not self.valid:
            self.trace = self._recording
        self._recording = []
        self.valid = False
        self.active = False

    def upcoming(self) -> Iterator[Any]:
        """Units of the events still ahead in this step, in order, each once."""
        if not self.valid:
            return
        seen: set[int] = set()
        for event in self.trace[self._pos:]:
            for unit in event.units:
                if id(unit) not in seen:
                    seen.add(id(unit))
                    yield unit

    def reuse_distance(self, unit: Any) -> float:
        """Elements gathered by other units before `unit` is used again in this step (inf: not again)."""
        if not self.valid:
            return float("inf")
        between = 0
        for event in self.trace[self._pos:]:
            if any(u is unit for u in event.units):
                return between
            between += sum(u.full_numel for u in event.units)
        return float("inf")
