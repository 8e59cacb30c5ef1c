"""Train a Hugging Face GPT-2 or Llama with AutoTP tensor parallelism, byte by byte, on the Python
standard library's source.

    .venv/bin/shardspeed --num_gpus 2 examples/train_hf_autotp.py --deepspeed_config examples/configs/autotp2_stage1_fp32.json

The model is built from a small transformers config with random weights (nothing is downloaded),
then `initialize` shards it over `tensor_parallel.autotp_size` ranks. With more ranks than that,
the rest is data parallelism: `--num_gpus 4` with the same config is data parallel 2 x tensor
parallel 2. Tensor-parallel peers must see the same batch, so batches are picked by the
data-parallel rank (`engine.topology.axis("data")`), not the global one.

`out.loss` is the whole model's loss (the same on every rank); `out.logits` holds only this rank's
slice of the vocabulary. At the end the shards are gathered into one file with
`save_16bit_model` (the weights in their training dtype: fp32 with this config), which rank 0
reloads into a fresh, unsharded transformers model to check it gives the same validation loss.

Written against DeepSpeed's API (`import shardspeed as deepspeed`). One line is shardspeed's own:
`engine.topology.axis("data")`, the data-parallel rank and size; under DeepSpeed take them from
its data-parallel group instead.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from collections.abc import Iterator

import torch
import transformers
from torch.utils.data import Dataset
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import shardspeed as deepspeed  # noqa: E402
from stdlib_corpus import train_val_split  # noqa: E402

VOCAB = 256  # bytes


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--local_rank", type=int, default=-1, help="Set by the launcher.")
    parser.add_argument("--model", choices=("gpt2", "llama"), default="gpt2")
    parser.add_argument("--steps", type=int, default=50, help="Optimizer steps to run.")
    parser.add_argument("--seq_len", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--corpus_bytes", type=int, default=2_000_000, help="Bytes of stdlib source to train on.")
    parser.add_argument("--save_dir", default="checkpoints/hf_autotp", help="Where the gathered model.bin goes.")
    parser.add_argument("--seed", type=int, default=1234)
    deepspeed.add_config_arguments(parser)
    return parser.parse_args()


def build_model(args: argparse.Namespace) -> transformers.PreTrainedModel:
    """A small causal LM with random weights; the same on every rank for the same seed."""
    torch.manual_seed(args.seed)
    if args.model == "gpt2":
        config = transformers.GPT2Config(vocab_size=VOCAB, n_positions=args.seq_len, n_embd=args.hidden,
                                         n_layer=args.layers, n_head=args.heads, bos_token_id=0, eos_token_id=0)
        return transformers.GPT2LMHeadModel(config)  # LM head tied to the token embedding
    config = transformers.LlamaConfig(vocab_size=VOCAB, max_position_embeddings=args.seq_len, hidden_size=args.hidden,
                                      intermediate_size=4 * args.hidden, num_hidden_layers=args.layers,
                                      num_attention_heads=args.heads, num_key_value_heads=max(args.heads // 2, 1),
                                      bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return transformers.LlamaForCausalLM(config)  # untied LM head, grouped-query attention


def batches(dataset: Dataset, micro: int, dp_rank: int, dp_size: int, seed: int) -> Iterator[torch.Tensor]:
    """Micro batches of input ids for this data-parallel rank: each global batch is `dp_size`
    consecutive slices of a shuffled order that every rank computes alike, so tensor-parallel peers
    (same data-parallel rank) get the same batch and data-parallel ranks get different ones."""
    per_global = micro * dp_size
    epoch = 0
    while True:
        order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed + epoch))
        for start in range(0, len(order) - per_global + 1, per_global):
            picked = order[start + dp_rank * micro: start + (dp_rank + 1) * micro]
            yield torch.stack([dataset[int(i)]["input_ids"] for i in picked])
        epoch += 1


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    deepspeed.init_distributed()
    rank = torch.distributed.get_rank()
    train_set, val_set = train_val_split(args.seq_len, args.corpus_bytes)

    model = build_model(args)
    full_params = sum(p.numel() for p in model.parameters())  # before sharding (tied weights counted once)
    engine, _, _, _ = deepspeed.initialize(args=args, model=model)

    data = engine.topology.axis("data")
    tp_size = engine.world_size // data.size
    micro = engine.train_micro_batch_size_per_gpu()
    tokens_per_step = engine.train_batch_size() * args.seq_len
    gas = engine.gradient_accumulation_steps()
    if rank == 0:
        print(f"{args.model}: world {engine.world_size} = data parallel {data.size} x tensor parallel {tp_size}, "
              f"ZeRO stage {engine.zero_optimization_stage()}, global batch {engine.train_batch_size()} x {args.seq_len} tokens")

    bar = tqdm(total=args.steps, disable=rank != 0, desc="train", unit="step", dynamic_ncols=True)
    stream = batches(train_set, micro, data.rank, data.size, args.seed)
    t0, loss_sum, first_loss, last_loss = time.perf_counter(), torch.zeros((), device=engine.device), None, float("nan")
    while engine.global_steps < args.steps:
        ids = next(stream).to(engine.device)
        out = engine(input_ids=ids, labels=ids)  # the model shifts the labels itself
        engine.backward(out.loss)
        loss_sum += out.loss.detach() / gas
        boundary = engine.is_gradient_accumulation_boundary()
        engine.step()
        if boundary:
            # Mean over the global batch: tensor peers hold the same loss, so the world mean is the data-parallel mean.
            torch.distributed.all_reduce(loss_sum)
            step_loss = loss_sum.item() / engine.world_size
            first_loss = step_loss if first_loss is None else first_loss
            elapsed = time.perf_counter() - t0
            bar.set_postfix(loss=f"{step_loss:.3f}", tok_s=f"{engine.global_steps * tokens_per_step / elapsed:,.0f}")
            bar.update(1)
            last_loss, loss_sum = step_loss, torch.zeros((), device=engine.device)
    bar.close()
    elapsed = time.perf_counter() - t0

    # The same validation batch on every rank: tensor-parallel ranks each compute part of one forward.
    val_ids = torch.stack([val_set[i]["input_ids"] for i in range(micro)]).to(engine.device)
    engine.eval()
    with torch.no_grad():
        val_out = engine(input_ids=val_ids, labels=val_ids)
    sharded_val, logits_shape = val_out.loss.item(), tuple(val_out.logits.shape)
    engine.train()

    local_params = sum(p.numel() for p in engine.module.parameters())
    engine.save_16bit_model(args.save_dir, "model.bin")  # collective: gathers the shards, rank 0 writes
    path = os.path.join(args.save_dir, "model.bin")
    if rank == 0:
        print(f"summary: {args.model}, steps {engine.global_steps}, train loss {first_loss:.4f} -> {last_loss:.4f}, "
              f"{args.steps * tokens_per_step / elapsed:,.0f} tokens/s, "
              f"params per rank {local_params / 1e6:.3f}M of {full_params / 1e6:.3f}M "
              f"({local_params / full_params:.0%}), rank 0 logits {logits_shape} of vocab {VOCAB}")
        whole = build_model(args)  # fresh and unsharded
        whole.loss_type = "ForCausalLM"  # the stock loss; GPT2LMHeadModel leaves it unnamed and transformers warns
        state = torch.load(path, map_location="cpu", weights_only=True)
        whole.load_state_dict(state)
        whole.eval()
        with torch.no_grad():
            whole_val = whole(input_ids=val_ids.cpu(), labels=val_ids.cpu()).loss.item()
        print(f"gathered {path} ({os.path.getsize(path) / 1e6:.1f} MB, {len(state)} tensors) reloaded unsharded: "
              f"val loss {whole_val:.6f} vs sharded engine {sharded_val:.6f} (diff {abs(whole_val - sharded_val):.2e})")
    engine.destroy()


if __name__ == "__main__":
    main()
