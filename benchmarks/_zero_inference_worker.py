"""One process of the ZeRO-Inference benchmark (bench_inference.py `zero`): greedy generation from a
model whose weights live on disk, with as little of it in memory as each system allows.

    --system save        : build the random Llama (seed 0, fp32) and `save_pretrained` it to --ckpt
    --system shardspeed  : `LlamaForCausalLM.from_pretrained(--ckpt)`, then `shardspeed.initialize` with
                           ZeRO-3 `offload_param: nvme` (a folder under --nvme) and no optimizer;
                           `engine.module.generate`
    --system accelerate  : the model built under `init_empty_weights`, then `load_checkpoint_and_dispatch`
                           with every decoder layer, the embedding, the final norm and the LM head on
                           "disk" (`offload_folder` under --nvme; accelerate copies each weight there
                           as a .dat file and memory-maps it at use); the execution device is the CPU

Phases and memory (RSS from /proc/self/status): `baseline` = current RSS after importing torch,
transformers and the system, with the model skeleton built on the meta device (no weights);
`build` = loading + offloading, its own peak (VmHWM reset before it, `/proc/self/clear_refs`);
`generate` = a warm-up call then --repeats timed calls, peak VmHWM reset after the build. A sampler
thread (every 5 ms) also keeps the generate phase's largest RssAnon (private memory) and RssFile
(mapped file pages): accelerate's memory-mapped reads show up in the latter.

Speed: tokens/s = batch x new tokens / median seconds of the timed `generate` calls (prefill
included). shardspeed also reports, per timed call, the parameter reads from its swap file (count,
bytes) and the seconds spent waiting for them in `Unit.finish_gather` (`ParamSwapper.read` is wrapped
in this process), and the seconds in `finish_gather` overall (wait + the copy into the gathered
tensor); and, before partitioning, the same model's in-memory `generate` rate (`in_memory_tokens_per_s`,
what the compute alone costs) and tokens (the ZeRO tokens must equal them).

`--cold-cache` (accelerate): after each weight is read, its file's pages are dropped from the page
cache (`posix_fadvise(DONTNEED)`), as a memory limit that held the process to its RSS would force;
without it the page cache keeps the whole offload folder (as big as the model) after the first
token, outside the process's RSS. shardspeed's swap reads use O_DIRECT by default (no page cache);
`--touch-pool` writes every swap buffer right after `initialize`, so that the after-build RSS holds the
whole pool (untouched pages are not resident) and what generation adds on top is its own working set.
`--buffered-swap` opens its swap file without O_DIRECT (`SwapSpace(..., o_direct=False)`), so that
reads after the first token come from the page cache, as accelerate's do.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
MIB = float(1 << 20)
STATS: dict[str, float] = {"reads": 0, "read_bytes": 0, "read_wait_s": 0.0, "finish_gather_s": 0.0}


def parse() -> argparse.Namespace:
    """The model's dimensions come from the driver (bench_inference.ZERO_MODEL); the rest has defaults."""
    p = argparse.ArgumentParser()
    p.add_argument("--system", choices=["save", "shardspeed", "accelerate"], required=True)
    p.add_argument("--ckpt", required=True, help="folder of the saved model")
    p.add_argument("--nvme", default="/tmp", help="folder standing in for the NVMe drive")
    ints = {"prompt-len": 16, "new-tokens": 16, "repeats": 3, "threads": 1, "buffer-count": 3, "local_rank": -1,
            "persistence-threshold": 0}  # persistence 0: the hidden size, as DeepSpeedExamples
    for name, default in ints.items():
        p.add_argument(f"--{name}", type=int, default=default)
    for name in ("hidden", "layers", "heads", "kv-heads", "intermediate", "vocab"):
        p.add_argument(f"--{name}", type=int, required=True)
    p.add_argument("--cold-cache", action="store_true")
    p.add_argument("--buffered-swap", action="store_true")
    p.add_argument("--touch-pool", action="store_true")
    return p.parse_args()


def llama_config(args: argparse.Namespace) -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=args.hidden, intermediate_size=args.intermediate, num_hidden_layers=args.layers,
                       num_attention_heads=args.heads, num_key_value_heads=args.kv_heads, vocab_size=args.vocab,
                       max_position_embeddings=1024, tie_word_embeddings=False, pad_token_id=0, eos_token_id=1,
                       bos_token_id=2)


def zero_config(args: argparse.Namespace, largest_unit: int) -> dict[str, Any]:
    """DeepSpeedExamples' ZeRO-Inference settings (run_model.py): prefetch 2H^2, persistence H, live 2H^2;
    swap buffers sized by the largest unit shardspeed gathers (the embedding / LM head here)."""
    h = args.hidden
    return {"train_micro_batch_size_per_gpu": 1,
            "zero_optimization": {"stage": 3, "stage3_prefetch_bucket_size": 2 * h * h,
                                  "stage3_param_persistence_threshold": args.persistence_threshold or h,
                                  "stage3_max_live_parameters": 2 * h * h,
                                  "offload_param": {"device": "nvme", "nvme_path": args.nvme,
                                                    "buffer_count": args.buffer_count, "buffer_size": largest_unit}}}


# ---- memory probes ---------------------------------------------------------------------------------
def status_kib(*keys: str) -> dict[str, int]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            name = line.split(":")[0]
            if name in keys:
                out[name] = int(line.split()[1])
    return out


def rss_mib() -> float:
    return status_kib("VmRSS")["VmRSS"] / 1024


def reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def peak_mib() -> float:
    return status_kib("VmHWM")["VmHWM"] / 1024


class RssSampler:
    """Largest RssAnon / RssFile seen every `period` seconds while running."""

    def __init__(self, period: float = 0.005) -> None:
        self.period, self.peak = period, {"RssAnon": 0, "RssFile": 0}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            for key, kib in status_kib("RssAnon", "RssFile").items():
                self.peak[key] = max(self.peak[key], kib)
            self._stop.wait(self.period)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()

    def mib(self) -> dict[str, float]:
        return {f"peak_{k.lower()}_mib": v / 1024 for k, v in self.peak.items()}


# ---- timing --------------------------------------------------------------------------------------
def timed_generations(model: Any, args: argparse.Namespace, on_call: Any = None) -> tuple[list[float], torch.Tensor]:
    """One warm-up `generate` then `repeats` timed ones (greedy, exactly `new_tokens`); their seconds and tokens."""
    ids = torch.randint(3, args.vocab, (1, args.prompt_len), generator=torch.Generator().manual_seed(0))
    kwargs = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False, pad_token_id=0)
    out = model.generate(ids, **kwargs)
    seconds = []
    for _ in range(args.repeats):
        if on_call is not None:
            on_call()
        start = time.perf_counter()
        out = model.generate(ids, **kwargs)
        seconds.append(time.perf_counter() - start)
    return seconds, out


def warm_up_generation() -> None:
    """One `generate` of a throw-away 1-layer Llama, so that the baseline includes what torch and
    transformers keep after their first generation (kernels' scratch, caches), not only the imports."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tiny = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                                        num_key_value_heads=2, vocab_size=256, pad_token_id=0, eos_token_id=1)).eval()
    tiny.generate(torch.ones(1, 4, dtype=torch.long), max_new_tokens=4, do_sample=False)
    del tiny
    gc.collect()


def meta_skeleton(args: argparse.Namespace) -> Any:
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        return LlamaForCausalLM(llama_config(args))


# ---- the systems ---------------------------------------------------------------------------------
def save(args: argparse.Namespace) -> dict[str, Any]:
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(llama_config(args)).eval()
    model.save_pretrained(args.ckpt)
    nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    return {"params": sum(p.numel() for p in model.parameters()), "weight_bytes": nbytes}


def count_swap_reads() -> None:
    """Wrap ParamSwapper.read (this process only) to count reads and time the waits for them."""
    from shardspeed.offload.param_swap import ParamSwapper
    from shardspeed.zero.param_shards import Unit

    class TimedRequest:
        def __init__(self, request: Any) -> None:
            self.request = request

        def wait(self) -> Any:
            start = time.perf_counter()
            out = self.request.wait()
            STATS["read_wait_s"] += time.perf_counter() - start
            return out

    read, finish = ParamSwapper.read, Unit.finish_gather

    def counted_read(self: Any, key: Any, numel: int, dtype: torch.dtype) -> Any:
        buf, view, request = read(self, key, numel, dtype)
        STATS["reads"] += 1
        STATS["read_bytes"] += view.numel() * view.element_size()
        return buf, view, TimedRequest(request)

    def timed_finish(self: Any) -> None:
        start = time.perf_counter()
        finish(self)
        STATS["finish_gather_s"] += time.perf_counter() - start

    setattr(ParamSwapper, "read", counted_read)
    setattr(Unit, "finish_gather", timed_finish)


def run_shardspeed(args: argparse.Namespace, result: dict[str, Any]) -> tuple[Any, Any]:
    import shardspeed
    import shardspeed.offload.swap_space as swap_space
    from transformers import LlamaForCausalLM

    if args.buffered_swap:
        swap_space.USE_O_DIRECT = False
    warm_up_generation()
    skeleton = meta_skeleton(args)
    largest = max(p.numel() for p in skeleton.parameters())
    result["baseline_rss_mib"] = rss_mib()
    reset_peak()
    model = LlamaForCausalLM.from_pretrained(args.ckpt, dtype=torch.float32).eval()
    seconds, result["in_memory_tokens"] = timed_generations(model, args)
    result["in_memory_tokens_per_s"] = args.new_tokens / statistics.median(seconds)
    engine, *_ = shardspeed.initialize(model=model, config=zero_config(args, largest))
    del model
    if args.touch_pool:  # make the whole pool resident now, so after-build RSS minus the pool is the build's residue
        for buf in engine.strategy.manager.param_swapper.buffers:
            buf.fill_(0)
    engine.module.eval()
    count_swap_reads()
    breakdown = engine.memory_breakdown() if hasattr(engine, "memory_breakdown") else {}
    result["memory_breakdown"] = {k: int(v) for k, v in breakdown.items()}
    result["zero_config"] = zero_config(args, largest)["zero_optimization"]
    return engine, engine.module


def drop_page_cache_after_reads() -> None:
    """accelerate: evict each offloaded weight's file pages right after reading it."""
    import accelerate.utils.offload as offload

    load = offload.load_offloaded_weight

    def load_and_drop(weight_file: str, weight_info: dict) -> torch.Tensor:
        weight = load(weight_file, weight_info)
        fd = os.open(weight_file, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
        return weight

    offload.load_offloaded_weight = load_and_drop


def run_accelerate(args: argparse.Namespace, result: dict[str, Any]) -> tuple[Any, Any]:
    from accelerate import init_empty_weights, load_checkpoint_and_dispatch
    from transformers import LlamaForCausalLM

    warm_up_generation()
    with init_empty_weights():
        model = LlamaForCausalLM(llama_config(args)).eval()
    result["baseline_rss_mib"] = rss_mib()
    reset_peak()
    device_map = {"model.embed_tokens": "disk", "model.rotary_emb": "cpu", "model.norm": "disk", "lm_head": "disk",
                  **{f"model.layers.{i}": "disk" for i in range(args.layers)}}
    folder = Path(args.nvme) / f"accelerate_offload_{os.getpid()}"
    model = load_checkpoint_and_dispatch(model, args.ckpt, device_map=device_map, offload_folder=str(folder))
    if args.cold_cache:
        drop_page_cache_after_reads()
    result["offload_folder_mib"] = sum(f.stat().st_size for f in folder.iterdir()) / MIB
    return folder, model


def main() -> None:
    args = parse()
    torch.set_num_threads(args.threads)
    result: dict[str, Any] = {"system": args.system}
    if args.system == "save":
        print(json.dumps(save(args)), flush=True)
        return
    start = time.perf_counter()
    handle, model = (run_shardspeed if args.system == "shardspeed" else run_accelerate)(args, result)
    gc.collect()
    result["build_s"] = time.perf_counter() - start
    result["build_peak_mib"] = peak_mib()
    result["after_build_rss_mib"] = rss_mib()
    reset_peak()

    def per_call_reset() -> None:
        STATS.update(reads=0, read_bytes=0, read_wait_s=0.0, finish_gather_s=0.0)

    with RssSampler() as sampler:
        seconds, tokens = timed_generations(model, args, per_call_reset)
    result["generate_peak_mib"] = peak_mib()
    result.update(sampler.mib())
    result["seconds"] = seconds
    result["tokens_per_s"] = args.new_tokens / statistics.median(seconds)
    result["peak_rss_mib"] = [result["generate_peak_mib"]]
    if args.system == "shardspeed":
        result["swap_last_call"] = dict(STATS)
        result["tokens_equal_in_memory"] = bool(torch.equal(tokens, result.pop("in_memory_tokens")))
        if hasattr(handle, "destroy"):
            handle.destroy()
    else:
        import shutil

        shutil.rmtree(handle, ignore_errors=True)
    result["tokens"] = tokens[0, -args.new_tokens:].tolist()
    result["loadavg_1m"] = os.getloadavg()[0]
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
