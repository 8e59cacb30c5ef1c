"""Decode throughput of Hugging Face `generate` vs shardspeed's fast decode path (one process).

    python benchmarks/_fast_decode_bench.py [--batches 1 8] [--new-tokens 64] [--prompt-len 32] [--repeats 5]
                                            [--threads N] [--compile]

A ~32M-parameter random Llama (hidden 512, 8 layers, 8 heads / 4 KV heads, intermediate 768,
vocabulary 32000, tied embeddings), fp32, greedy, exactly `new_tokens` tokens per row. Reports
generated tokens per second over the whole `generate` call (prefill included): the median of
`repeats` timed calls, the variants interleaved call by call so that load drifting on a shared
machine hits them alike. `decode_tokens_per_second` is the one-model form, for other benchmarks.
"""
from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from shardspeed.inference.fast_decode import build_fast_model


def _prompt(model: Any, batch: int, prompt_len: int) -> torch.Tensor:
    ids = torch.randint(3, model.config.vocab_size, (batch, prompt_len), generator=torch.Generator().manual_seed(0))
    return ids.to(model.device)


def _timed_generate(model: Any, ids: torch.Tensor, new_tokens: int) -> float:
    """Seconds for one greedy `generate` of exactly `new_tokens` tokens per row."""
    cuda = ids.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start


def decode_tokens_per_second(model: Any, batch: int, prompt_len: int, new_tokens: int, repeats: int = 3) -> float:
    """Generated tokens per second of `model.generate` (greedy, exactly `new_tokens` per row), the
    median of `repeats` calls after one warm-up (allocations, first-call paths, compilation)."""
    ids = _prompt(model, batch, prompt_len)
    _timed_generate(model, ids, new_tokens)
    return batch * new_tokens / statistics.median(_timed_generate(model, ids, new_tokens) for _ in range(repeats))


def interleaved_rates(models: dict[str, Any], batch: int, prompt_len: int, new_tokens: int,
                      repeats: int) -> dict[str, float]:
    """`decode_tokens_per_second` for several models, timing them in turn within each repeat."""
    prompts = {name: _prompt(m, batch, prompt_len) for name, m in models.items()}
    for name, m in models.items():
        _timed_generate(m, prompts[name], new_tokens)
    times: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(repeats):
        for name, m in models.items():
            times[name].append(_timed_generate(m, prompts[name], new_tokens))
    return {name: batch * new_tokens / statistics.median(t) for name, t in times.items()}


def bench_llama(max_position_embeddings: int = 1024) -> LlamaForCausalLM:
    config = LlamaConfig(hidden_size=512, intermediate_size=768, num_hidden_layers=8, num_attention_heads=8,
                         num_key_value_heads=4, vocab_size=32000, max_position_embeddings=max_position_embeddings,
                         tie_word_embeddings=True, pad_token_id=0, eos_token_id=1, bos_token_id=2)
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--max-out-tokens", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--compile", action="store_true", help="add a copy of the fast path under compile_decode()")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    hf = bench_llama().to(args.device)
    models: dict[str, Any] = {"HF generate (sdpa, dynamic cache)": hf,
                              "shardspeed fast path (eager)": build_fast_model(hf, args.max_out_tokens)}
    if args.compile:
        compiled = build_fast_model(hf, args.max_out_tokens)
        compiled.compile_decode()
        models["shardspeed fast path (compile_decode)"] = compiled
    params = sum(p.numel() for p in hf.parameters())
    print(f"llama {params / 1e6:.1f}M params, fp32, {args.device}, torch threads {torch.get_num_threads()}, "
          f"prompt {args.prompt_len}, {args.new_tokens} new tokens, max_out_tokens {args.max_out_tokens}")
    rates = {b: interleaved_rates(models, b, args.prompt_len, args.new_tokens, args.repeats) for b in args.batches}
    base = next(iter(models))
    for name in models:
        cells = "  ".join(f"batch {b}: {r[name]:8.1f} tok/s ({r[name] / r[base]:.2f}x)" for b, r in rates.items())
        print(f"{name:40s} {cells}")


if __name__ == "__main__":
    main()
