"""Write a tiny starting model for the three steps: a GPT-2 (or Llama) from config, random weights, and a
word-level tokenizer built from the data (nothing is downloaded), saved together as a Hugging Face folder.

    python examples/chat/init_model.py --data examples/chat/data/sorted_numbers --out /tmp/chat/init [--arch gpt2]
"""
from __future__ import annotations

import argparse
import json
import os

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

SPECIALS = ["<unk>", "<|endoftext|>"]


def build_tokenizer(data: str) -> PreTrainedTokenizerFast:
    """Whitespace-split words of every prompt/chosen/rejected in the folder's JSON files; pad = eos."""
    words: set[str] = set()
    for name in sorted(os.listdir(data)):
        with open(os.path.join(data, name), encoding="utf-8") as f:
            for line in f:
                row = json.loads(line)
                words.update((row["prompt"] + row["chosen"] + row["rejected"]).split())
    vocab = {w: i for i, w in enumerate(SPECIALS + sorted(words))}
    word_level = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    word_level.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=word_level, unk_token="<unk>", eos_token="<|endoftext|>",
                                        bos_token="<|endoftext|>")
    tokenizer.pad_token = tokenizer.eos_token  # as DeepSpeed-Chat does for non-LLaMA models
    return tokenizer


def tiny_model(arch: str, tokenizer: PreTrainedTokenizerFast, hidden: int, layers: int) -> torch.nn.Module:
    ids = {"bos_token_id": tokenizer.eos_token_id, "eos_token_id": tokenizer.eos_token_id,
           "pad_token_id": tokenizer.pad_token_id}
    if arch == "llama":
        return LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                                            num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=4,
                                            max_position_embeddings=64, **ids))
    return GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=hidden, n_layer=layers, n_head=4, n_positions=64,
                                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **ids))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=os.path.join(os.path.dirname(__file__), "data", "sorted_numbers"))
    parser.add_argument("--out", required=True)
    parser.add_argument("--arch", choices=["gpt2", "llama"], default="gpt2")
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    tokenizer = build_tokenizer(args.data)
    model = tiny_model(args.arch, tokenizer, args.hidden, args.layers)
    model.save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    print(f"wrote a {args.arch} of {sum(p.numel() for p in model.parameters())} parameters and a {len(tokenizer)}-word "
          f"tokenizer to {args.out}")


if __name__ == "__main__":
    main()
