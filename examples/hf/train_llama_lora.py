"""The guide's §12.1 fine-tuning example (Trainer + LoRA + ZeRO-2 with CPU optimizer offload), runnable
offline on a CPU machine: `import deepspeed` is shardspeed (install the alias once with
`shardspeed install-deepspeed-alias`), the Llama-2-7b checkpoint is a tiny random `LlamaConfig` model, the
Alpaca dataset is `data/pydoc_alpaca.jsonl` (shipped) and the tokenizer is a small BPE trained on it.
Everything else is the guide's: the ds_zero2_config.json as written ("auto" values filled by the
Trainer), LoRA on q/k/v/o, `trainer.train()`, `trainer.save_model()`.

    shardspeed --num_gpus 2 examples/hf/train_llama_lora.py --deepspeed examples/hf/ds_zero2_config.json

(`deepspeed --num_gpus 2 ...` and `torchrun --nproc_per_node 2 ...` run it the same way.)
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import deepspeed  # noqa: F401  (the guide imports it; with the alias it is shardspeed)
from peft import LoraConfig, TaskType, get_peft_model
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import (DataCollatorForSeq2Seq, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, Trainer,
                          TrainingArguments)

HERE = Path(__file__).resolve().parent
DATA = HERE / "data" / "pydoc_alpaca.jsonl"


def prompt_of(example: dict) -> str:
    return f"### Instruction:\n{example['instruction']}\n\n### Response:\n{example['output']}"


def build_tokenizer(texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on the dataset (the guide downloads Llama-2's; nothing is downloaded here)."""
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"],
                                                       show_progress=False,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    tokenizer.pad_token = tokenizer.eos_token  # as the guide does
    return tokenizer


def tiny_llama(tokenizer: PreTrainedTokenizerFast, max_length: int) -> LlamaForCausalLM:
    """Llama-2's architecture at toy size, random weights (the guide loads meta-llama/Llama-2-7b-hf)."""
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=344, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=max_length,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    return LlamaForCausalLM(config)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--deepspeed", default=str(HERE / "ds_zero2_config.json"), help="DeepSpeed config file")
    parser.add_argument("--output_dir", default="runs/llama-lora")
    parser.add_argument("--max_length", type=int, default=128, help="the guide uses 512; 128 keeps a CPU run short")
    parser.add_argument("--num_train_epochs", type=float, default=1.0)
    parser.add_argument("--max_steps", type=int, default=-1, help="stop after this many optimizer steps (-1: epochs)")
    parser.add_argument("--examples", type=int, default=0, help="use only the first N examples (0: all)")
    parser.add_argument("--local_rank", type=int, default=-1)  # passed by the deepspeed/shardspeed launcher
    args = parser.parse_args()

    rows = [json.loads(line) for line in DATA.read_text().splitlines()]
    rows = rows[:args.examples] if args.examples else rows
    tokenizer = build_tokenizer([prompt_of(r) for r in rows], vocab_size=2048)
    model = tiny_llama(tokenizer, args.max_length)

    lora_config = LoraConfig(task_type=TaskType.CAUSAL_LM, r=16, lora_alpha=32,
                             target_modules=["q_proj", "v_proj", "k_proj", "o_proj"], lora_dropout=0.1, bias="none")
    model = get_peft_model(model, lora_config)

    def preprocess(example: dict) -> dict:
        tokens = tokenizer(prompt_of(example), truncation=True, max_length=args.max_length, padding="max_length")
        tokens["labels"] = tokens["input_ids"].copy()
        return tokens

    dataset = [preprocess(r) for r in rows]

    bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()  # the guide's bf16=True, where there is bf16
    training_args = TrainingArguments(
        output_dir=args.output_dir, num_train_epochs=args.num_train_epochs, max_steps=args.max_steps,
        per_device_train_batch_size=4, gradient_accumulation_steps=8, learning_rate=2e-4, warmup_steps=100,
        logging_steps=10, save_steps=500, bf16=bf16, deepspeed=args.deepspeed, remove_unused_columns=False,
        report_to="none", run_name="llama-pydoc-shardspeed", use_cpu=not torch.cuda.is_available() and not args.deepspeed)
    trainer = Trainer(model=model, args=training_args, train_dataset=dataset,
                      data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True))
    if training_args.process_index == 0:
        model.print_trainable_parameters()

    start = time.perf_counter()
    result = trainer.train()
    elapsed = time.perf_counter() - start
    trainer.save_model(str(Path(args.output_dir) / "final"))
    if training_args.process_index == 0:
        tokens = result.global_step * training_args.world_size * 4 * 8 * args.max_length
        print(f"trained {result.global_step} steps in {elapsed:.1f} s ({tokens / elapsed:.0f} tokens/s), "
              f"final loss {result.training_loss:.4f}; adapter saved to {Path(args.output_dir) / 'final'}")


if __name__ == "__main__":
    main()
