"""One rank of the §12.1-shaped benchmark: runs examples/hf/train_llama_lora.py in this process (its
arguments pass through) and, on rank 0, prints one JSON line: steady-state tokens/s (rank 0's optimizer
steps after the first, from a Trainer callback) and every rank's peak RSS.

Under real DeepSpeed (the peer) on a CPU-only host, accelerate 1.16 finds no distributed backend and
lets every rank believe it is alone, so the Trainer's batch sizes disagree with DeepSpeed's world
(an assertion at start-up). This worker gives the peer the same fix shardspeed makes inside its
`init_distributed` (gloo, and accelerate's shared state told so); shardspeed runs untouched.
"""
from __future__ import annotations

import json
import os
import resource
import runpy
import sys
import time
from pathlib import Path

import torch.distributed as dist
import transformers

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "hf" / "train_llama_lora.py"


class StepClock(transformers.TrainerCallback):
    def __init__(self) -> None:
        self.times: list[float] = []

    def on_step_end(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
        self.times.append(time.perf_counter())


def give_deepspeed_the_cpu_backend() -> None:
    import deepspeed
    import deepspeed.comm

    if "+shardspeed." in deepspeed.__version__:
        return
    original = deepspeed.comm.init_distributed

    def init_distributed(*args, **kwargs):  # type: ignore[no-untyped-def]
        from accelerate.state import PartialState

        if PartialState._shared_state.get("backend") is None:
            PartialState._shared_state["backend"] = "gloo"
        kwargs["dist_backend"] = "gloo"
        return original(*args, **kwargs)

    deepspeed.comm.init_distributed = init_distributed


def main() -> None:
    clock = StepClock()
    trainer_init = transformers.Trainer.__init__

    def init(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        trainer_init(self, *args, **kwargs)
        self.add_callback(clock)

    transformers.Trainer.__init__ = init  # type: ignore[method-assign]
    give_deepspeed_the_cpu_backend()
    sys.argv = [str(EXAMPLE), *sys.argv[1:]]
    runpy.run_path(str(EXAMPLE), run_name="__main__")

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    world = dist.get_world_size() if dist.is_initialized() else 1
    peaks: list[float] = [0.0] * world
    if world > 1:
        dist.all_gather_object(peaks, peak)
    else:
        peaks = [peak]
    args = {k.lstrip("-"): v for k, v in zip(sys.argv[1::2], sys.argv[2::2])}
    tokens_per_step = world * 4 * 8 * int(args.get("max_length", 128))  # the example's batch 4, accumulation 8
    timed = clock.times[1:]  # the first step includes start-up (engine build, first allocations)
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps({"tokens_per_s": tokens_per_step * (len(timed) - 1) / (timed[-1] - timed[0]),
                          "peak_rss_mib": peaks, "steps": len(clock.times)}), flush=True)


if __name__ == "__main__":
    main()
