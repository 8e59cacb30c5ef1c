"""One rank of the tensor-parallel benchmark (bench_tensor_parallel.py): a Hugging Face GPT-2 or Llama
with random weights, trained by the shardspeed engine (ZeRO stage 0, fp32) with or without AutoTP.

Started through torchrun by the driver; rank 0 prints one JSON line. Every rank builds the same
model from the same seed (AutoTP broadcasts rank 0's weights anyway) and reads the same batches:
with `--tp` equal to the world size there is no data parallelism, so both ranks of a tensor-parallel
group must see the same tokens, and the global batch is one micro batch, as in the world-1 runs.

Measured on rank 0 unless said otherwise:
- step_s: seconds per timed step (forward + backward + optimizer step), every step; the driver
  takes the median;
- phase_s: median seconds per step in forward, backward and step;
- comm_s / comm_calls: seconds per step spent inside torch.distributed all_reduce / all_gather
  calls, and how many calls, by phase (the functions are wrapped for the timed steps). With tp=2
  these are the tensor-parallel collectives (two per block each way, the embedding's, the
  loss's) plus whatever the engine reduces in its step; a call's time includes waiting for the
  other rank to reach it;
- cpu_per_wall: CPU seconds of the process over wall seconds, timed steps (rank 0): how many cores
  the rank actually got (about 2 for unsharded-2t on an idle 2-core machine);
- param_bytes: sum of numel * element_size over engine.module.parameters(), every rank;
- peak_rss_mib: ru_maxrss of every rank;
- losses: the loss of every step (warm-up included), every system runs the same batches, so the
  trajectories should agree up to floating-point summation order.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time
from collections import defaultdict

import torch
import torch.distributed as dist

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser()
    p.add_argument("--model", choices=["gpt2", "llama"], default="gpt2")
    p.add_argument("--tp", type=int, default=1, help="tensor_parallel.autotp_size (1: the key is left out).")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads in every rank.")
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--micro", type=int, default=4)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--local_rank", type=int, default=-1)
    return p.parse_args()


def build_model(args: argparse.Namespace) -> torch.nn.Module:
    if args.model == "gpt2":
        from transformers import GPT2Config, GPT2LMHeadModel

        config = GPT2Config(vocab_size=args.vocab, n_positions=args.seq, n_embd=args.hidden, n_layer=args.layers,
                            n_head=args.heads, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                            bos_token_id=0, eos_token_id=0)
        config._attn_implementation = "eager"
        return GPT2LMHeadModel(config)
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.hidden * 8 // 3 // 64 * 64,
                         num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.heads,
                         max_position_embeddings=args.seq, attention_dropout=0.0, tie_word_embeddings=False)
    config._attn_implementation = "eager"
    return LlamaForCausalLM(config)


class CommTimer:
    """Wraps torch.distributed.all_reduce / all_gather to count calls and seconds, by phase."""

    def __init__(self) -> None:
        self.phase = None
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        for name in ("all_reduce", "all_gather"):
            setattr(dist, name, self._wrap(getattr(dist, name)))

    def _wrap(self, fn):
        def timed(*a, **k):
            if self.phase is None:
                return fn(*a, **k)
            start = time.perf_counter()
            out = fn(*a, **k)
            self.seconds[self.phase] += time.perf_counter() - start
            self.calls[self.phase] += 1
            return out
        return timed


def gather_objects(value, world: int) -> list:
    out: list = [None] * world
    dist.all_gather_object(out, value)
    return out


def main() -> None:
    args = parse()
    torch.set_num_threads(args.threads)
    import shardspeed

    torch.manual_seed(0)
    model = build_model(args)
    full_params = sum(p.numel() for p in model.parameters())
    config = {
        "train_micro_batch_size_per_gpu": args.micro,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 1.0,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "weight_decay": 0.01}},
        "zero_optimization": {"stage": 0},
        "steps_per_print": 10**9,
    }
    if args.tp > 1:
        config["tensor_parallel"] = {"autotp_size": args.tp}
    engine, _, _, _ = shardspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
    rank, world = dist.get_rank(), dist.get_world_size()
    dp = world // args.tp

    # The same batches on every rank (dp is 1 in this benchmark; with dp > 1 data ranks would differ).
    g = torch.Generator().manual_seed(1 + rank // args.tp)
    batches = [torch.randint(0, args.vocab, (args.micro, args.seq), generator=g) for _ in range(args.warmup + args.steps)]
    comm = CommTimer()
    losses, step_s = [], []
    phases: dict[str, list[float]] = {"forward": [], "backward": [], "step": []}
    per_step_comm: list[dict[str, float]] = []
    per_step_calls: list[dict[str, int]] = []
    cpu_s = 0.0
    for i, ids in enumerate(batches):
        timed = i >= args.warmup
        if timed:
            dist.barrier()
        c0 = time.process_time()
        if timed:
            comm.seconds.clear()
            comm.calls.clear()
        ta = time.perf_counter()
        comm.phase = "forward" if timed else None
        out = engine(input_ids=ids, labels=ids)
        tb = time.perf_counter()
        comm.phase = "backward" if timed else None
        engine.backward(out.loss)
        tc = time.perf_counter()
        comm.phase = "step" if timed else None
        engine.step()
        td = time.perf_counter()
        comm.phase = None
        losses.append(out.loss.item())
        if timed:
            cpu_s += time.process_time() - c0
            step_s.append(td - ta)
            phases["forward"].append(tb - ta)
            phases["backward"].append(tc - tb)
            phases["step"].append(td - tc)
            per_step_comm.append(dict(comm.seconds))
            per_step_calls.append(dict(comm.calls))

    param_bytes = sum(p.numel() * p.element_size() for p in engine.module.parameters())
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    params_all = gather_objects(param_bytes, world)
    rss_all = gather_objects(round(rss, 1), world)
    local_numel = gather_objects(sum(p.numel() for p in engine.module.parameters()), world)
    if rank == 0:
        comm_s = {ph: statistics.median(s.get(ph, 0.0) for s in per_step_comm) for ph in phases}
        comm_calls = {ph: max(c.get(ph, 0) for c in per_step_calls) for ph in phases}
        print(json.dumps({
            "model": args.model, "tp": args.tp, "dp": dp, "world": world, "threads": args.threads,
            "params": full_params, "local_params": local_numel,
            "step_s": [round(s, 5) for s in step_s],
            "median_step_s": statistics.median(step_s),
            "tokens_per_s": args.micro * args.seq * dp / statistics.median(step_s),
            "phase_s": {k: round(statistics.median(v), 5) for k, v in phases.items()},
            "comm_s": {k: round(v, 5) for k, v in comm_s.items()}, "comm_calls": comm_calls,
            "cpu_per_wall": round(cpu_s / sum(step_s), 3),
            "param_bytes": params_all, "peak_rss_mib": rss_all,
            "losses": losses, "final_loss": losses[-1],
            "torch": torch.__version__,
        }), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
