"""Pipeline bubble: each stage's idle fraction next to the 1F1B/GPipe theory (p - 1) / (m + p - 1).

    .venv/bin/python benchmarks/bench_pipeline_bubble.py [--stages 2 4] [--micro 4 8 16] [--batches 6]
                                                          [--schedule 1f1b] [--hidden 1024] [--layers 8]

One process per stage (world = stages, no data parallelism), gloo on 127.0.0.1, one thread per
rank. The model is `layers` equal blocks (Linear(h, h) + GELU) split uniformly, so every stage
does the same work; micro batches of 64 rows. The first two batches are warm-up; figures are
medians over the timed batches. Two measures per stage:

- wait: the time its receives block (`engine.pipe_stats.recv_wait_s`) out of its own schedule
  time (`schedule_s`: forwards, backwards and messages; not the data-parallel reduction or the step);
- idle: 1 - busy / window, where busy is schedule_s - recv_wait_s and window is the longest
  stage's schedule_s in that batch (stages start a batch together: the previous step ends with
  collectives over the pipe axis).

Theory, with equal stages: over the pipeline's window every stage idles (p - 1)(t_f + t_b) out of
(m + p - 1)(t_f + t_b), i.e. (p - 1) / (m + p - 1); compare `idle` with it. `wait` differs by
design at the ends: the last stage's window ends before the first stage's last backward and its
only waits are the first stage's forwards, so its wait is about (p - 1) t_f / (m (t_f + t_b)).
Measured figures include message latency and, with more ranks than cores, time-slicing (a blocked
stage gives its core to another): judge 4 stages on this 2-core machine with that in mind.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

import torch
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

ROWS = 64


class Block(torch.nn.Module):
    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.gelu(self.lin(x))


def _mse(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.mse_loss(out, target)


def _worker(rank: int, world: int, store_path: str, args: argparse.Namespace, micro: int, out: mp.Queue) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank)})
    dist.init_process_group("gloo", store=dist.FileStore(store_path, world), rank=rank, world_size=world)
    import shardspeed
    from shardspeed.pipe import LayerSpec, PipelineModule

    net = PipelineModule([LayerSpec(Block, args.hidden) for _ in range(args.layers)], loss_fn=_mse, num_stages=world,
                         partition_method="uniform")
    engine, _, _, _ = shardspeed.initialize(model=net, config={
        "train_micro_batch_size_per_gpu": ROWS, "gradient_accumulation_steps": micro, "gradient_clipping": 1.0,
        "optimizer": {"type": "SGD", "params": {"lr": 1e-3}}})
    engine.set_pipeline_schedule(args.schedule)
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(ROWS, args.hidden, generator=g), torch.randn(ROWS, args.hidden, generator=g)) for _ in range(micro)]
    stats = []
    for batch in range(args.batches + 2):
        engine.train_batch(iter(data))
        if batch >= 2:
            stats.append((engine.pipe_stats.schedule_s, engine.pipe_stats.recv_wait_s))
    out.put((rank, stats))
    dist.barrier()
    dist.destroy_process_group()


def measure(args: argparse.Namespace, stages: int, micro: int) -> list[list[tuple[float, float]]]:
    """Per stage, per timed batch: (schedule seconds, seconds blocked in receives)."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        procs = [ctx.Process(target=_worker, args=(r, stages, str(Path(tmp) / "store"), args, micro, queue))
                 for r in range(stages)]
        for p in procs:
            p.start()
        results = dict(queue.get(timeout=600) for _ in procs)
        for p in procs:
            p.join(timeout=60)
    return [results[r] for r in range(stages)]


def summarize(per_stage: list[list[tuple[float, float]]]) -> tuple[list[float], list[float], float]:
    """(median wait fraction per stage, median idle fraction per stage, median window seconds)."""
    batches = range(len(per_stage[0]))
    windows = [max(stage[b][0] for stage in per_stage) for b in batches]
    wait = [statistics.median(w / s for s, w in stage) for stage in per_stage]
    idle = [statistics.median(1 - (stage[b][0] - stage[b][1]) / windows[b] for b in batches) for stage in per_stage]
    return wait, idle, statistics.median(windows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stages", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--micro", type=int, nargs="+", default=[4, 8, 16])
    parser.add_argument("--batches", type=int, default=6)
    parser.add_argument("--schedule", choices=["1f1b", "gpipe"], default="1f1b")
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=8)
    args = parser.parse_args()
    print(f"schedule={args.schedule} hidden={args.hidden} layers={args.layers} rows/micro={ROWS} cores={os.cpu_count()}")
    print(f"{'p':>2} {'m':>3} | {'theory':>6} | {'idle per stage':<27} | {'wait per stage':<27} | window s")
    for stages in args.stages:
        for micro in args.micro:
            wait, idle, window = summarize(measure(args, stages, micro))
            theory = (stages - 1) / (micro + stages - 1)
            print(f"{stages:>2} {micro:>3} | {theory:6.3f} | {' '.join(f'{f:.3f}' for f in idle):<27} | "
                  f"{' '.join(f'{f:.3f}' for f in wait):<27} | {window:.3f}", flush=True)

if __name__ == "__main__":
    main()
