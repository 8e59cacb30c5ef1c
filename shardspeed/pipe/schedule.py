"""Pipeline schedules as pure functions: the ordered list of steps one stage runs for one batch.

A step is a forward or a backward of one micro batch. Communication follows from the step and the
stage's place in the pipeline, so a schedule never names it:

- forward of micro batch i: a stage after the first receives its input from the previous stage
  first; a stage before the last sends its output to the next stage after;
- backward of micro batch i: a stage before the last receives the gradient of its output from
  the next stage first; a stage after the first sends the gradient of its input back after.

Sends never block (they are queued) and receives block where the data is needed; under that rule
a schedule is deadlock-free when `simulate` finishes it. Backwards run in micro-batch order in
every schedule here, so all of them accumulate gradients in the same order (1F1B and GPipe give
bitwise-equal gradients).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal

FORWARD: Literal["forward"] = "forward"
BACKWARD: Literal["backward"] = "backward"


@dataclass(frozen=True)
class Step:
    kind: Literal["forward", "backward"]
    micro_batch: int

    def __repr__(self) -> str:
        return f"{self.kind[0].upper()}{self.micro_batch}"


def _check(stage: int, num_stages: int, micro_batches: int) -> None:
    if num_stages < 1 or not 0 <= stage < num_stages:
        raise ValueError(f"stage {stage} is outside a pipeline of {num_stages} stages")
    if micro_batches < 1:
        raise ValueError(f"a pipeline batch needs at least one micro batch, got {micro_batches}")


def one_f_one_b(stage: int, num_stages: int, micro_batches: int) -> list[Step]:
    """1F1B (PipeDream-Flush): warm-up forwards, then one forward one backward, then cool-down backwards.

    Stage s keeps at most `num_stages - s` micro batches' activations alive (GPipe keeps all of them).
    """
    _check(stage, num_stages, micro_batches)
    warmup = min(num_stages - stage - 1, micro_batches)
    steps = [Step(FORWARD, i) for i in range(warmup)]
    for i in range(micro_batches - warmup):
        steps += [Step(FORWARD, warmup + i), Step(BACKWARD, i)]
    steps += [Step(BACKWARD, i) for i in range(micro_batches - warmup, micro_batches)]
    return steps


def gpipe(stage: int, num_stages: int, micro_batches: int) -> list[Step]:
    """GPipe: every forward, then every backward (same bubble as 1F1B, activations of all micro batches live)."""
    _check(stage, num_stages, micro_batches)
    return [Step(FORWARD, i) for i in range(micro_batches)] + [Step(BACKWARD, i) for i in range(micro_batches)]


def inference(stage: int, num_stages: int, micro_batches: int) -> list[Step]:
    """Forwards only (eval_batch)."""
    _check(stage, num_stages, micro_batches)
    return [Step(FORWARD, i) for i in range(micro_batches)]


SCHEDULES: dict[str, Callable[[int, int, int], list[Step]]] = {"1f1b": one_f_one_b, "gpipe": gpipe}


def peak_live_activations(steps: list[Step]) -> int:
    """The most micro batches whose forward ran and whose backward has not yet, at any point."""
    live = peak = 0
    for step in steps:
        live += 1 if step.kind == FORWARD else -1
        peak = max(peak, live)
    return peak


def simulate(schedules: list[list[Step]]) -> list[tuple[int, Step]]:
    """Run every stage's steps under the communication rule above; returns the global order of steps.

    Raises RuntimeError naming the stuck steps if the schedules deadlock, or if a stage's steps do
    not run each micro batch's forward before its backward.
    """
    num_stages = len(schedules)
    done: set[tuple[int, Step]] = set()
    cursor = [0] * num_stages
    order: list[tuple[int, Step]] = []
    while any(cursor[s] < len(schedules[s]) for s in range(num_stages)):
        progressed = False
        for s in range(num_stages):
            if cursor[s] == len(schedules[s]):
                continue
            step = schedules[s][cursor[s]]
            if _ready(s, step, num_stages, done):
                done.add((s, step))
                order.append((s, step))
                cursor[s] += 1
                progressed = True
        if not progressed:
            stuck = {s: schedules[s][cursor[s]] for s in range(num_stages) if cursor[s] < len(schedules[s])}
            raise RuntimeError(f"pipeline schedule deadlocks; stages wait at {stuck}")
    return order


def _ready(stage: int, step: Step, num_stages: int, done: set[tuple[int, Step]]) -> bool:
    if step.kind == FORWARD:
        return stage == 0 or (stage - 1, step) in done
    if (stage, Step(FORWARD, step.micro_batch)) not in done:
        raise RuntimeError(f"stage {stage} runs the backward of micro batch {step.micro_batch} before its forward")
    return stage == num_stages - 1 or (stage + 1, step) in done
