"""One Hugging Face Trainer run on a tiny random Llama, with or without DeepSpeed (shardspeed behind the
`deepspeed` name), printing what the tests compare as one JSON line on rank 0.

    torchrun --nproc_per_node 2 trainer_run.py --out DIR [--ds CONFIG.json] [--gas 2] [--steps 3] [--lora]
        [--resume] [--save_steps N] [--save_model] [--eval_first [--then_train]] [--from_pretrained DIR] [--wd 0.01]
        [--sched linear|constant]

Without --ds it is plain DDP on the CPU (use_cpu=True, gloo); with --ds the Trainer runs DeepSpeed. Data
is fixed and read in order (train_sampling_strategy sequential), so every run sees the same batches.
"""
from __future__ import annotations

import argparse
import json
import os

import torch

import transformers
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

VOCAB, SEQ = 128, 16
LR = 1e-2


def probe_ids() -> torch.Tensor:
    """The fixed input whose logits the tests compare after training."""
    return Tokens(2, 3).ids


def model_config() -> LlamaConfig:
    return LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, max_position_embeddings=SEQ, bos_token_id=0, eos_token_id=1, pad_token_id=1,
                       tie_word_embeddings=False)


class Tokens(torch.utils.data.Dataset):
    """Fixed random token sequences, labels = inputs (causal LM)."""

    def __init__(self, n: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(2, VOCAB, (n, SEQ), generator=g)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--ds", default=None)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--gas", type=int, default=2)
    p.add_argument("--mb", type=int, default=2)
    p.add_argument("--lora", action="store_true")
    p.add_argument("--resume", action="store_true", help="resume_from_checkpoint=True (the latest in --out)")
    p.add_argument("--save_steps", type=int, default=0)
    p.add_argument("--save_model", action="store_true")
    p.add_argument("--eval_first", action="store_true", help="evaluate() before anything else (and stop there)")
    p.add_argument("--then_train", action="store_true",
                   help="after --eval_first, train() on the same Trainer (transformers 5.25 + DeepSpeed: fails)")
    p.add_argument("--from_pretrained", default=None)
    p.add_argument("--wd", type=float, default=0.01)
    p.add_argument("--sched", default="linear", help="the Trainer's lr_scheduler_type (when the config has none)")
    p.add_argument("--local_rank", type=int, default=-1)
    a = p.parse_args()
    transformers.logging.set_verbosity_error()
    args = TrainingArguments(
        output_dir=a.out, max_steps=a.steps, per_device_train_batch_size=a.mb, per_device_eval_batch_size=a.mb,
        gradient_accumulation_steps=a.gas, learning_rate=LR, weight_decay=a.wd, warmup_steps=0,
        lr_scheduler_type=a.sched, max_grad_norm=1.0, logging_steps=1, save_strategy="steps" if a.save_steps else "no",
        save_steps=a.save_steps or 500, report_to="none", seed=0, data_seed=0, train_sampling_strategy="sequential",
        deepspeed=a.ds, use_cpu=a.ds is None, ddp_backend="gloo" if a.ds is None else None, disable_tqdm=True,
        dataloader_num_workers=0, save_only_model=False)
    torch.manual_seed(0)
    if a.from_pretrained:
        model = LlamaForCausalLM.from_pretrained(a.from_pretrained)
    else:
        model = LlamaForCausalLM(model_config())
    partitioned_at_load = any(hasattr(p, "ds_numel") for p in model.parameters())
    if a.lora:
        from peft import LoraConfig, TaskType, get_peft_model

        model = get_peft_model(model, LoraConfig(task_type=TaskType.CAUSAL_LM, r=4, lora_alpha=8, lora_dropout=0.0,
                                                 target_modules=["q_proj", "v_proj", "k_proj", "o_proj"], bias="none"))
    out: dict = {"partitioned_at_load": partitioned_at_load}
    trainer = Trainer(model=model, args=args, train_dataset=Tokens(64, 1), eval_dataset=Tokens(8, 2))
    if a.eval_first:
        out["eval_before"] = trainer.evaluate()["eval_loss"]
        if not a.then_train:  # evaluate() then train() on one Trainer: see --then_train
            if trainer.args.process_index == 0:
                print("RESULT " + json.dumps(out), flush=True)
            return
    trainer.train(resume_from_checkpoint=True if a.resume else None)
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    out.update(losses=[e["loss"] for e in logs], grad_norms=[e.get("grad_norm") for e in logs], steps=trainer.state.global_step)
    if a.save_model:
        trainer.save_model(os.path.join(a.out, "final"))
        trainer.model.eval()
        with torch.no_grad():  # every rank: under ZeRO-3 the forward gathers
            logits = trainer.model(input_ids=probe_ids()).logits
        if trainer.args.process_index == 0:
            torch.save(logits, os.path.join(a.out, "logits.pt"))
    engine = getattr(trainer, "model_wrapped", None)
    out["trainable"] = sum(p.numel() for p in model.parameters() if p.requires_grad and not hasattr(p, "ds_numel")) + \
        sum(p.ds_numel for p in model.parameters() if p.requires_grad and hasattr(p, "ds_numel"))
    if a.ds and hasattr(engine, "memory_breakdown"):
        out["memory"] = engine.memory_breakdown()
        out["world"] = engine.world_size
    if trainer.args.process_index == 0:
        print("RESULT " + json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
    # The plain-DDP reference runs make their gloo group through transformers/accelerate, not shardspeed
    # (whose init_distributed releases it at exit): a gloo group alive at teardown can abort a finished
    # process under torch 2.13 (pytorch/pytorch#190489).
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
