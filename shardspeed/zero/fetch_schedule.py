"""The order in which modules ask for their parameters, recorded on one step and replayed on the next.

ZeRO-3 gathers a module's parameters when the module runs. Knowing what runs next lets the
engine start those gathers early (prefetch) and keep a unit gathered when it is about to be used
again (reuse distance). The first step records events (forward and backward, per module call);
later steps check every event against the record. One mismatch (another branch ran) stops all
prediction for the rest of that step and the step's own events become the new record: a wrong
guess costs memory or time, never correctness, because every module still fetches what it needs.
"""
from __future__ import annotations

import bisect
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
        self._cursor = 0  # events before this one have had their prefetches issued
        self._prefix: list[int] = [0]  # _prefix[i]: elements of the units of trace[:i]
        self._occurrences: dict[int, list[int]] = {}  # id(unit) -> trace positions using it
        self.valid = False
        self.active = False

    def begin_step(self) -> None:
        self._recording = []
        self._pos = 0
        self._cursor = 0
        self.valid = self.trace is not None
        self.active = True

    def event(self, phase: str, module: Any, units: Sequence[Any]) -> None:
        event = Event((phase, id(module)), tuple(units))
        self._recording.append(event)
        if not self.valid:
            return
        assert self.trace is not None  # valid is only set when there is a trace to follow
        if self._pos < len(self.trace) and self.trace[self._pos].key == event.key and self.trace[self._pos].units == event.units:
            self._pos += 1
            self._cursor = max(self._cursor, self._pos)
        else:
            self.valid = False  # another path ran: stop predicting until the step ends

    def end_step(self) -> None:
        """Keep the record if this step followed it (a prefix, e.g. an eval forward, also follows it)."""
        if not self.active:
            return
        if not self.valid:
            self._set_trace(self._recording)
        self._recording = []
        self.valid = False
        self.active = False

    def _set_trace(self, trace: list[Event]) -> None:
        self.trace = trace
        self._prefix = [0]
        self._occurrences = {}
        for i, event in enumerate(trace):
            self._prefix.append(self._prefix[-1] + sum(u.full_numel for u in event.units))
            for unit in event.units:
                self._occurrences.setdefault(id(unit), []).append(i)

    def prefetch_window(self, elements: int) -> Iterator[tuple[int, tuple[Any, ...]]]:
        """(position, units) of the events not yet prefetched that start within `elements` of now."""
        if not self.valid:
            return
        assert self.trace is not None  # valid is only set when there is a trace to follow
        end = self._prefix[self._pos] + elements
        i = self._cursor
        while i < len(self.trace) and self._prefix[i] < end:
            yield i, self.trace[i].units
            i += 1

    def prefetched_ahead(self) -> int:
        """Elements of the events between now and the prefetch cursor (already on their way)."""
        if not self.valid:
            return 0
        assert self.trace is not None  # valid is only set when there is a trace to follow
        return self._prefix[min(self._cursor, len(self.trace))] - self._prefix[self._pos]

    def prefetched_through(self, position: int) -> None:
        self._cursor = max(self._cursor, position + 1)

    def _next_use(self, unit: Any) -> int | None:
        occurrences = self._occurrences.get(id(unit), ())
        j = bisect.bisect_left(occurrences, self._pos)
        return occurrences[j] if j < len(occurrences) else None

    def reuse_distance(self, unit: Any) -> float:
        """Elements gathered by the events before `unit` is used again in this step (inf: not again)."""
        if not self.valid:
            return float("inf")
        nxt = self._next_use(unit)
        return float("inf") if nxt is None else self._prefix[nxt] - self._prefix[self._pos]

    def released(self, unit: Any) -> None:
        """A unit was released: if its next use was already prefetched past, look at it again."""
        if self.valid:
            nxt = self._next_use(unit)
            if nxt is not None and nxt < self._cursor:
                self._cursor = max(self._pos, nxt)
