"""Inference benchmarks (issue 15): decode speed of init_inference against DeepSpeed and Hugging Face,
and ZeRO-Inference from NVMe against Accelerate's disk offload. Each section is one run, its systems
side by side in interleaved rounds (A, B, C, A, B, C, ...), reported as medians over rounds.

    .venv/bin/python benchmarks/bench_inference.py decode [--rounds 3] [--repeats 3] [--ds-python PATH] [--json PATH]
    .venv/bin/python benchmarks/bench_inference.py zero [--rounds 3] [--repeats 3] [--nvme /tmp] [--json PATH]
    .venv/bin/python benchmarks/bench_inference.py {decode,zero} --from-json PATH   # the report again, no runs

Both sections first wait (up to --max-wait seconds, checking every minute) until the 1-minute load
average is at most --max-load, and report the load each run finished under: this 2-core machine is
shared, and a busy neighbour halves a single-threaded run's speed.

decode (`_inference_worker.py`): a random Llama, hidden 512, 8 layers, 8 heads / 4 KV heads,
intermediate 1376, vocabulary 16000 with tied embeddings (31.4M parameters; a 32000 vocabulary
would make the LM head 41 % of the weights read per token), fp32, prompt 32, 64 new tokens, greedy,
batch 1 and 8, one thread per process/rank. Four processes per round (torchrun):
shardspeed TP 1 (HF `generate`, the fast path, the plain engine, the weight-read floor), DeepSpeed
TP 1 (HF `generate` again, `deepspeed.init_inference`), shardspeed TP 2 (fast path, plain) and
DeepSpeed TP 2 (AutoTP), world 2, one thread per rank. Target: fast path >= 1.5x DeepSpeed at TP 1,
judged on the medians and, because the processes run at different moments of a shared machine, also
paired through HF `generate` (the same code in both processes): per round (fast / HF) / (DeepSpeed / HF).

zero (`_zero_inference_worker.py`): a random Llama, hidden 1024, 8 layers, 8 heads / 4 KV heads,
intermediate 2816, vocabulary 4096, untied (102.8M parameters, 392 MiB of fp32 weights), saved
once with `save_pretrained` under --nvme; batch 1, prompt 16, 16 new tokens, greedy, one thread.
Systems: shardspeed ZeRO-3 `offload_param: nvme` (O_DIRECT swap file under --nvme; prefetch and
live window 2H^2, persistence H, 3 swap buffers of the largest unit); Accelerate
`load_checkpoint_and_dispatch` with every module on "disk", as it runs (the page cache keeps its
offload folder after the first token) and with the page cache dropped after every weight read
(`--cold-cache`: what a memory limit at the process's RSS would force); with `--buffered-swap`, also
shardspeed with its swap file opened without O_DIRECT (reads from the page cache after the first
token, like Accelerate's, which it then competes with like for like). All processes run with
glibc's mmap threshold fixed at 1 MiB (MALLOC_MMAP_THRESHOLD_=1048576, as tests/memory.py does),
so RSS follows the live tensors; `--malloc-default` leaves glibc's dynamic threshold, under which
freed layers stay in the heap. Also per round: this disk's single-thread O_DIRECT read speed
(the checkpoint file, 1 MiB reads), which bounds any system that reads every weight per token.

Checks printed (PASS/FAIL): shardspeed's generate-phase peak RSS within the analytic bound
(baseline + swap buffers + the units in flight beyond the pool, largest unit x max(0, 1 + prefetch depth
- buffer_count), since at one rank a gathered unit is the buffer it was read into + KV cache +
activations + a measured 20 MiB of runtime slack, every term printed); weights / RSS growth >= 4; tokens/s >= 1.5x Accelerate's at equal or lower peak RSS.
"""
from __future__ import annotations

import argparse
import json
import math
import mmap
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _driver import HERE, Run, deepspeed_python, median, median_peak_rss, python, run_once

MIB = float(1 << 20)
DECODE_WORKER, ZERO_WORKER = "_inference_worker.py", "_zero_inference_worker.py"
DECODE_MODEL = dict(hidden=512, layers=8, heads=8, kv_heads=4, intermediate=1376, vocab=16000)
RUNTIME_SLACK_MIB = 20
RSS_EQUAL = 0.01  # peak RSS medians this close count as equal: one system's rounds spread 1-2 MiB (0.3-0.5 %)
ZERO_MODEL = dict(hidden=1024, layers=8, heads=8, kv_heads=4, intermediate=2816, vocab=4096)


def model_args(model: dict[str, int]) -> list[str]:
    return [f"--{k.replace('_', '-')}={v}" for k, v in model.items()]


def wait_for_quiet(max_load: float, max_wait: float) -> float:
    """Sleep a minute at a time (up to `max_wait` s) while the 1-minute load is above `max_load`."""
    waited = 0.0
    load = os.getloadavg()[0]
    while load > max_load and waited < max_wait:
        print(f"  load {load:.2f} > {max_load}: waiting 60 s ({waited:.0f} s so far)", flush=True)
        time.sleep(60)
        waited += 60
        load = os.getloadavg()[0]
    print(f"1-minute load before measuring: {load:.2f} (waited {waited:.0f} s)", flush=True)
    return load


def rounds(runs: list[tuple[Run, int, str]], n: int, show: Any, first: int = 0) -> None:
    """Run every (run, world, worker) once per round, in order, printing `show(run, result)`."""
    for r in range(first, first + n):
        for run, world, worker in runs:
            result = run_once(run, world, worker)
            run.results.append(result)
            print(f"  round {r + 1} {run.label:<26} {show(run, result)}  load {result['loadavg_1m']:.2f}", flush=True)


# ---- decode ------------------------------------------------------------------------------------------
def decode_runs(args: argparse.Namespace, ds: str) -> list[tuple[Run, int, str]]:
    common = [f"--repeats={args.repeats}", f"--prompt-len={args.prompt_len}", f"--new-tokens={args.new_tokens}",
              "--batches", *map(str, args.batches), *model_args(DECODE_MODEL)]
    plan = [("shardspeed tp1", python(), "shardspeed", 1), ("DeepSpeed tp1", ds, "deepspeed", 1),
            ("shardspeed tp2", python(), "shardspeed", 2), ("DeepSpeed tp2", ds, "deepspeed", 2)]
    return [(Run(label, py, [f"--system={system}", f"--tp={tp}", *common]), tp, DECODE_WORKER)
            for label, py, system, tp in plan]


def decode_systems(run: Run) -> list[str]:
    """The systems one decode process timed, in its order."""
    names = (k.split("|")[0] for k in run.results[0] if "|b" in k and not k.startswith(("floor", "all_reduce", "gloo_all_reduce")))
    return list(dict.fromkeys(names))


def show_decode(run: Run, result: dict) -> str:
    cells = [f"{k.split('|')[0]} b{k.split('|b')[1]} {v:.0f}" for k, v in result.items()
             if "|b" in k and not k.startswith(("floor", "all_reduce", "gloo_all_reduce"))]
    return "; ".join(cells) + " tok/s"


def report_decode(runs: list[Run], batches: list[int]) -> dict[str, Any]:
    ds_name = "DeepSpeed init_inference tp1"
    ds_run = next(r for r in runs if ds_name in decode_systems(r))
    base = {b: median(ds_run, f"{ds_name}|b{b}") for b in batches}
    head = " | ".join(f"batch {b} tok/s | x DS tp1" for b in batches)
    print(f"\n| system | process | {head} | greedy tokens = HF | peak RSS/rank MiB |")
    print("| --- | --- |" + " ---: | ---: |" * len(batches) + " --- | ---: |")
    summary: dict[str, Any] = {}
    for run in runs:
        for name in decode_systems(run):
            rates = {b: median(run, f"{name}|b{b}") for b in batches}
            same = all(r["matches_hf"][name] for r in run.results)
            cells = " | ".join(f"{rates[b]:.1f} | {rates[b] / base[b]:.2f}" for b in batches)
            print(f"| {name} | {run.label} | {cells} | {'yes' if same else 'NO'} | {median_peak_rss(run):.0f} |")
            summary[name] = {"tokens_per_s": rates, "matches_hf": same,
                             "rounds": {b: [r[f"{name}|b{b}"] for r in run.results] for b in batches}}
    floor = {b: {k: statistics.median(r[f"floor|b{b}"][k] for r in runs[0].results)
                 for k in ("tokens_per_s", "step_ms", "prefill_ms", "gb_per_s")} for b in batches}
    cells = " | ".join(f"{floor[b]['tokens_per_s']:.1f} | {floor[b]['tokens_per_s'] / base[b]:.2f}" for b in batches)
    print(f"| weight-read floor (every Linear once per step) | {runs[0].label} | {cells} | - | - |")
    summary["floor"] = floor
    print()
    for run in runs:
        for name in decode_systems(run):
            print(f"  {name:<40} per round: " + "; ".join(
                f"b{b} " + ", ".join(f"{x:.0f}" for x in summary[name]["rounds"][b]) for b in batches))
    for run in runs:
        if f"all_reduce_us|b{batches[0]}" in run.results[0]:
            summary[f"all_reduce_us {run.label}"] = {b: median(run, f"all_reduce_us|b{b}") for b in batches}
            gloo = (" (plain gloo: " + ", ".join(f"b{b} {median(run, f'gloo_all_reduce_us|b{b}'):.0f} us" for b in batches)
                    + ")") if f"gloo_all_reduce_us|b{batches[0]}" in run.results[0] else ""
            print(f"  {run.label}: one all-reduce of [batch, 1, hidden] fp32: " + ", ".join(
                f"b{b} {median(run, f'all_reduce_us|b{b}'):.0f} us" for b in batches) + gloo + " (17 per decode step)")
    ss_run = runs[0]
    for b in batches:
        fast = summary["shardspeed fast path tp1"]["tokens_per_s"][b]
        ratio = fast / base[b]
        paired = paired_ratios(ss_run, ds_run, b)
        within = {"fast / HF": within_process(ss_run, "shardspeed fast path tp1", "HF generate", b),
                  "plain / HF": within_process(ss_run, "shardspeed plain tp1", "HF generate", b),
                  "floor / HF": within_process(ss_run, "floor", "HF generate", b),
                  "DeepSpeed / HF": within_process(ds_run, ds_name, "HF generate (DeepSpeed's process)", b)}
        summary[f"paired fast/DS b{b}"], summary[f"within-process b{b}"] = paired, within
        print(f"batch {b}: fast path / DeepSpeed tp1 = {ratio:.3f} from the medians (target >= 1.5: "
              f"{'MET' if ratio >= 1.5 else 'MISSED'}); paired through HF = {statistics.median(paired):.3f} "
              f"(per round {', '.join(f'{x:.3f}' for x in paired)}: {'MET' if statistics.median(paired) >= 1.5 else 'MISSED'})")
        print(f"  within one process, median of per-round ratios: " + "; ".join(f"{k} {v:.3f}" for k, v in within.items()))
        print(f"  floor: step {floor[b]['step_ms']:.2f} ms ({floor[b]['gb_per_s']:.1f} GB/s of weights), prefill "
              f"{floor[b]['prefill_ms']:.1f} ms")
    return summary


def within_process(run: Run, num: str, den: str, batch: int) -> float:
    """Median over rounds of `num`'s tokens/s over `den`'s, both timed call by call in one process and round."""
    def rate(result: dict, name: str) -> float:
        value = result[f"{name}|b{batch}"]
        return value["tokens_per_s"] if isinstance(value, dict) else value

    return statistics.median(rate(r, num) / rate(r, den) for r in run.results)


def paired_ratios(ss_run: Run, ds_run: Run, batch: int) -> list[float]:
    """Per round, (fast path / HF in shardspeed's process) / (DeepSpeed / HF in DeepSpeed's process): HF
    `generate` is the same code in both, so it cancels the load each process happened to run under."""
    fast, hf = f"shardspeed fast path tp1|b{batch}", f"HF generate|b{batch}"
    ds, ds_hf = f"DeepSpeed init_inference tp1|b{batch}", f"HF generate (DeepSpeed's process)|b{batch}"
    return [(s[fast] / s[hf]) / (d[ds] / d[ds_hf]) for s, d in zip(ss_run.results, ds_run.results)]


def decode(args: argparse.Namespace) -> dict[str, Any]:
    ds = deepspeed_python(args.ds_python)
    if ds is None:
        raise SystemExit("no usable DeepSpeed install (pass --ds-python): this benchmark compares against it")
    runs = decode_runs(args, ds)
    print(f"decode: {DECODE_MODEL}, fp32, prompt {args.prompt_len}, {args.new_tokens} new tokens, batches {args.batches}, "
          f"{args.repeats} timed generate calls per system per process, {args.rounds} rounds", flush=True)
    load = wait_for_quiet(args.max_load, args.max_wait)
    rounds(runs, args.rounds, show_decode)
    if args.json:  # the rounds first: a report that fails can be printed again with --from-json
        Path(args.json).write_text(json.dumps({"rounds": {run.label: run.results for run, _, _ in runs}}, default=str))
    summary = report_decode([run for run, _, _ in runs], args.batches)
    return {"load_before": load, "summary": summary, "rounds": {run.label: run.results for run, _, _ in runs}}


# ---- ZeRO-Inference ------------------------------------------------------------------------------------
def o_direct_read_gbps(path: Path, block: int = 1 << 20) -> float:
    """One thread of sequential O_DIRECT 1 MiB reads of `path` (no page cache), GB/s."""
    buf = mmap.mmap(-1, block)  # page-aligned, as O_DIRECT needs
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        total, start = 0, time.perf_counter()
        while (n := os.preadv(fd, [buf], total)) > 0:
            total += n
            if n < block:
                break
        return total / (time.perf_counter() - start) / 1e9
    finally:
        os.close(fd)
        buf.close()


def zero_runs(args: argparse.Namespace, ds: str, ckpt: Path, nvme: Path) -> list[tuple[Run, int, str]]:
    common = [f"--ckpt={ckpt}", f"--nvme={nvme}", f"--repeats={args.repeats}", f"--prompt-len={args.prompt_len}",
              f"--new-tokens={args.new_tokens}", *model_args(ZERO_MODEL)]
    pool = [f"--buffer-count={args.buffer_count}", *(["--touch-pool"] if args.touch_pool else [])]
    plan = [("shardspeed ZeRO-3 nvme", python(), ["--system=shardspeed", *pool]),
            ("Accelerate disk (warm cache)", ds, ["--system=accelerate"]),
            ("Accelerate disk (cold cache)", ds, ["--system=accelerate", "--cold-cache"])]
    if args.buffered_swap:
        plan.append(("shardspeed nvme, page cache", python(), ["--system=shardspeed", "--buffered-swap", *pool]))
    return [(Run(label, py, [*extra, *common]), 1, ZERO_WORKER) for label, py, extra in plan]


def show_zero(run: Run, result: dict) -> str:
    return (f"{result['tokens_per_s']:6.2f} tok/s  generate peak {result['generate_peak_mib']:6.1f} MiB "
            f"(baseline {result['baseline_rss_mib']:.1f}, after build {result['after_build_rss_mib']:.1f})  "
            f"build peak {result['build_peak_mib']:.0f} MiB")


def analytic_bound(result: dict, args: argparse.Namespace) -> dict[str, float]:
    """shardspeed's generate-phase RSS bound (MiB), term by term, from its config and the model's shapes."""
    m, z = ZERO_MODEL, result["zero_config"]
    largest = max(m["vocab"] * m["hidden"], m["hidden"] * m["intermediate"]) * 4  # embedding / LM head vs MLP
    depth = math.ceil(z["stage3_prefetch_bucket_size"] * 4 / largest)  # units read ahead of the running one
    head_dim, buffers, widest = m["hidden"] // m["heads"], z["offload_param"]["buffer_count"], max(m["intermediate"], m["vocab"])
    positions = args.prompt_len + args.new_tokens
    terms = {"baseline (imports + skeleton + warm-up)": result["baseline_rss_mib"] * MIB,
             f"swap buffers ({buffers} x largest unit)": buffers * largest,
             # one rank: a gathered unit is the swap buffer it was read into; only units beyond the pool take more
             f"gathered outside the pool: largest unit x max(0, 1 + prefetch depth {depth} - {buffers})":
                 largest * max(0, 1 + depth - buffers),
             "persistent parameters": result["memory_breakdown"].get("persistent_parameters", 0),
             "KV cache": 2 * m["layers"] * m["kv_heads"] * head_dim * positions * 4,
             # not analytic: `zero --rounds 1 --touch-pool` (the pool resident before generating) measured 11.8 MiB
             # the build leaves in the heap (from_pretrained, the in-memory reference, initialize) + 6.6 MiB of
             # generate's own working set; an earlier one-off probe gave 7.5 + 4.5
             "runtime slack (measured: build residue + generate working set)": RUNTIME_SLACK_MIB * MIB,
             # the widest prefill tensors (MLP, logits) a few at a time
             "activations (4 x prompt x max(intermediate, vocab) x 4 B)": 4 * args.prompt_len * widest * 4}
    return {k: v / MIB for k, v in terms.items()}


def report_zero(runs: list[Run], args: argparse.Namespace, disk: list[float], weight_mib: float) -> dict[str, Any]:
    ss, warm, cold = runs[:3]
    print("\n| system | tokens/s (median) | x Accelerate warm | x Accelerate cold | generate peak RSS MiB | "
          "growth over baseline MiB | weights / growth | peak RssAnon / RssFile MiB | build peak MiB |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    summary: dict[str, Any] = {}
    for run in runs:
        tps, peak = median(run, "tokens_per_s"), median(run, "generate_peak_mib")
        growth = peak - median(run, "baseline_rss_mib")
        print(f"| {run.label} | {tps:.2f} | {tps / median(warm, 'tokens_per_s'):.2f} | {tps / median(cold, 'tokens_per_s'):.2f} | "
              f"{peak:.0f} | {growth:.0f} | {weight_mib / growth:.1f} | {median(run, 'peak_rssanon_mib'):.0f} / "
              f"{median(run, 'peak_rssfile_mib'):.0f} | {median(run, 'build_peak_mib'):.0f} |")
        summary[run.label] = {"tokens_per_s": tps, "generate_peak_mib": peak, "growth_mib": growth,
                              "rounds_tokens_per_s": [r["tokens_per_s"] for r in run.results]}
    for run in runs:
        print(f"  {run.label:<30} tok/s per round: " + ", ".join(f"{r['tokens_per_s']:.2f}" for r in run.results))
    same = all(r["tokens"] == runs[0].results[0]["tokens"] for run in runs for r in run.results)
    same_mem = all(r["tokens_equal_in_memory"] for r in ss.results)
    print(f"greedy tokens identical across systems and rounds: {same}; shardspeed = its in-memory model: {same_mem}")
    disk_gbps = statistics.median(disk)
    swap = {k: statistics.median(r["swap_last_call"][k] for r in ss.results) for k in ss.results[0]["swap_last_call"]}
    call_s, in_memory = args.new_tokens / median(ss, "tokens_per_s"), median(ss, "in_memory_tokens_per_s")
    print(f"disk: O_DIRECT 1-thread read {disk_gbps:.2f} GB/s (per round: {', '.join(f'{g:.2f}' for g in disk)}); reading "
          f"the weights once per token bounds any such system at {disk_gbps * 1e9 / (weight_mib * MIB):.2f} tokens/s")
    print(f"shardspeed per generate call ({call_s:.2f} s): {swap['reads']:.0f} swap reads, {swap['read_bytes'] / 1e9:.2f} GB "
          f"({swap['read_bytes'] / 1e9 / call_s:.2f} GB/s over the call); waiting for reads {swap['read_wait_s']:.2f} s, "
          f"finish_gather in all {swap['finish_gather_s']:.2f} s (so the copy into the gathered tensor "
          f"{swap['finish_gather_s'] - swap['read_wait_s']:.2f} s); the same model in memory: "
          f"{in_memory:.1f} tokens/s ({args.new_tokens / in_memory:.2f} s per call)")
    bound = analytic_bound(ss.results[0], args)
    total = sum(bound.values())
    for term, mib in bound.items():
        print(f"  bound term: {term:<58} {mib:8.1f} MiB")
    ss_peak, ss_tps = median(ss, "generate_peak_mib"), median(ss, "tokens_per_s")
    verdicts = {"rss_within_bound": ss_peak <= total,
                "weights_at_least_4x_growth": weight_mib / summary[ss.label]["growth_mib"] >= 4}
    print(f"[{'PASS' if verdicts['rss_within_bound'] else 'FAIL'}] shardspeed generate peak RSS {ss_peak:.1f} MiB <= "
          f"analytic bound {total:.1f} MiB")
    print(f"[{'PASS' if verdicts['weights_at_least_4x_growth'] else 'FAIL'}] weights {weight_mib:.0f} MiB >= 4 x shardspeed's "
          f"RSS growth {summary[ss.label]['growth_mib']:.0f} MiB")
    for acc in (warm, cold):
        speed, rss = ss_tps / median(acc, "tokens_per_s"), ss_peak / median(acc, "generate_peak_mib")
        ok = speed >= 1.5 and rss <= 1.0 + RSS_EQUAL
        verdicts[f"vs {acc.label}"] = ok
        print(f"[{'PASS' if ok else 'FAIL'}] tokens/s >= 1.5x {acc.label} at equal (within {RSS_EQUAL:.0%}) or lower RSS: "
              f"{speed:.2f}x, peak RSS {rss:.3f}x ({ss_peak:.1f} vs {median(acc, 'generate_peak_mib'):.1f} MiB)")
    for extra in runs[3:]:
        speed = median(extra, "tokens_per_s") / median(warm, "tokens_per_s")
        rss = median(extra, "generate_peak_mib") / median(warm, "generate_peak_mib")
        ok = speed >= 1.5 and rss <= 1.0 + RSS_EQUAL
        verdicts[f"{extra.label} vs {warm.label}"] = ok
        print(f"[{'PASS' if ok else 'FAIL'}] like for like, both reading from the page cache: {extra.label} vs {warm.label} "
              f"{speed:.2f}x tokens/s at peak RSS {rss:.3f}x")
    summary.update(bound_mib=bound, bound_total_mib=total, swap_per_call=swap, disk_gbps=disk, verdicts=verdicts,
                   tokens_identical=same)
    return summary


def zero(args: argparse.Namespace) -> dict[str, Any]:
    ds = deepspeed_python(args.ds_python)
    if ds is None:
        raise SystemExit("no usable DeepSpeed environment (pass --ds-python): Accelerate runs from it")
    if not args.malloc_default:
        os.environ["MALLOC_MMAP_THRESHOLD_"] = str(1 << 20)
    work = Path(tempfile.mkdtemp(prefix="shardspeed_zero_inference_", dir=args.nvme))
    ckpt, nvme = work / "ckpt", work / "nvme"
    nvme.mkdir()
    try:
        saved = subprocess.run([python(), str(HERE / ZERO_WORKER), "--system=save", f"--ckpt={ckpt}", *model_args(ZERO_MODEL)],
                               capture_output=True, text=True, check=True,
                               env={**os.environ, "PYTHONPATH": str(HERE.parent)}).stdout.splitlines()[-1]
        info = json.loads(saved)
        weight_mib = info["weight_bytes"] / MIB
        print(f"zero: {ZERO_MODEL}, {info['params'] / 1e6:.1f}M parameters, {weight_mib:.0f} MiB fp32, saved to {ckpt}; "
              f"batch 1, prompt {args.prompt_len}, {args.new_tokens} new tokens, {args.repeats} timed calls per process, "
              f"{args.rounds} rounds; malloc {'default' if args.malloc_default else 'mmap threshold 1 MiB'}", flush=True)
        load = wait_for_quiet(args.max_load, args.max_wait)
        runs = zero_runs(args, ds, ckpt, nvme)
        disk: list[float] = []
        for r in range(args.rounds):
            disk.append(o_direct_read_gbps(ckpt / "model.safetensors"))
            rounds(runs, 1, show_zero, first=r)
        summary = report_zero([run for run, _, _ in runs], args, disk, weight_mib)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {"load_before": load, "summary": summary, "disk_gbps": disk, "weight_mib": weight_mib,
            "rounds": {run.label: run.results for run, _, _ in runs}}


def report_saved(args: argparse.Namespace) -> None:
    """Print a section's report again from the rounds a `--json` file kept (no runs)."""
    data = json.loads(Path(args.from_json).read_text())
    runs = [Run(label, "", [], results) for label, results in data["rounds"].items()]
    if args.section == "decode":
        batches = sorted(int(k.split("|b")[1]) for k in runs[0].results[0] if k.startswith("HF generate|b"))
        report_decode(runs, batches)
    else:
        report_zero(runs, args, data["disk_gbps"], data["weight_mib"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("section", choices=["decode", "zero"])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--repeats", type=int, default=3, help="timed generate calls per system per process")
    p.add_argument("--prompt-len", type=int, default=None, help="default: 32 (decode), 16 (zero)")
    p.add_argument("--new-tokens", type=int, default=None, help="default: 64 (decode), 16 (zero)")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8], help="decode batch sizes")
    p.add_argument("--nvme", default="/tmp", help="zero: the folder standing in for the NVMe drive")
    p.add_argument("--buffered-swap", action="store_true", help="zero: add shardspeed with buffered (page cache) swap reads")
    p.add_argument("--buffer-count", type=int, default=3, help="zero: shardspeed's offload_param.buffer_count")
    p.add_argument("--touch-pool", action="store_true",
                   help="zero: shardspeed writes its swap pool after initialize (after-build RSS then holds it whole)")
    p.add_argument("--malloc-default", action="store_true", help="zero: keep glibc's dynamic mmap threshold")
    p.add_argument("--max-load", type=float, default=1.5)
    p.add_argument("--max-wait", type=float, default=900)
    p.add_argument("--ds-python", default=None)
    p.add_argument("--json", default=None, help="also write every round's results here")
    p.add_argument("--from-json", default=None, help="print the report again from a --json file, running nothing")
    args = p.parse_args()
    decoding = args.section == "decode"
    args.prompt_len = args.prompt_len or (32 if decoding else 16)
    args.new_tokens = args.new_tokens or (64 if decoding else 16)
    if args.from_json:
        report_saved(args)
        return
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} CPU cores", flush=True)
    out = decode(args) if decoding else zero(args)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1, default=str))


if __name__ == "__main__":
    main()
