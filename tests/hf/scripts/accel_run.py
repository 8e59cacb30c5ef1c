"""An Accelerate training loop on a tiny random Llama, under DeepSpeed (shardspeed behind the `deepspeed`
name) or plain, printing what the tests compare as one JSON line on the main process.

    python accel_run.py --out DIR --plain --gas 4            # the reference: one process, plain PyTorch
    torchrun --nproc_per_node 2 accel_run.py --out DIR --ds CONFIG.json [--dummy]
    accelerate launch --config_file ACCEL.yaml accel_run.py --out DIR [--dummy]   # DeepSpeed from the launcher

The loop is Accelerate's documented one: prepare, accumulate, backward, clip_grad_norm_, step. After step 2
it save_state()s, trains to the end, load_state()s the step-2 state and trains the last steps again, so the
test can check the replay is bit-identical. get_state_dict() gives the final weights, saved on the main process.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from trainer_run import Tokens, model_config  # noqa: E402  (the same tiny model and data as the Trainer tests)

from accelerate import Accelerator  # noqa: E402
from accelerate.utils import DeepSpeedPlugin, DummyOptim, DummyScheduler, set_seed  # noqa: E402
from transformers import LlamaForCausalLM  # noqa: E402

LR, WD, CLIP = 1e-2, 0.0, 1.0


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--ds", default=None, help="DeepSpeed config for a DeepSpeedPlugin (not needed under accelerate launch)")
    p.add_argument("--plain", action="store_true", help="no DeepSpeed: the single-process reference")
    p.add_argument("--dummy", action="store_true", help="optimizer and scheduler from the config (DummyOptim/DummyScheduler)")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--gas", type=int, default=2)
    p.add_argument("--mb", type=int, default=2)
    a = p.parse_args()

    if a.plain:
        accelerator = Accelerator(cpu=True, gradient_accumulation_steps=a.gas)
    elif a.ds is not None:
        plugin = DeepSpeedPlugin(hf_ds_config=json.loads(Path(a.ds).read_text()), gradient_accumulation_steps=a.gas,
                                 gradient_clipping=CLIP)
        accelerator = Accelerator(deepspeed_plugin=plugin, gradient_accumulation_steps=a.gas)
    else:  # accelerate launch with a DEEPSPEED config: the plugin comes from the launcher's environment
        accelerator = Accelerator(gradient_accumulation_steps=a.gas)
    set_seed(0)
    model = LlamaForCausalLM(model_config())
    data = Tokens(a.mb * a.gas * a.steps * accelerator.num_processes, 1)
    loader = torch.utils.data.DataLoader(data, batch_size=a.mb, shuffle=False)
    if a.dummy:
        optimizer = DummyOptim(model.parameters(), lr=LR, weight_decay=WD)
        scheduler = DummyScheduler(optimizer, total_num_steps=a.steps, warmup_num_steps=1)
    else:
        optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WD)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    batches = list(loader)  # this process's share, in order
    per_step = len(batches) // a.steps

    def train(first: int, last: int) -> tuple[list[float], list[float]]:
        losses, norms = [], []
        for step in range(first, last):
            total = torch.zeros(())
            for batch in batches[step * per_step:(step + 1) * per_step]:
                with accelerator.accumulate(model):
                    loss = model(**batch).loss
                    accelerator.backward(loss)
                    if accelerator.sync_gradients:
                        norm = accelerator.clip_grad_norm_(model.parameters(), CLIP)
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad()
                total += loss.detach() / per_step
            losses.append(accelerator.reduce(total, reduction="mean").item())
            norms.append(float(norm))
        return losses, norms

    half = a.steps // 2
    losses, norms = train(0, half)
    state_dir = os.path.join(a.out, "state")
    accelerator.save_state(state_dir)
    later_losses, later_norms = train(half, a.steps)
    final = accelerator.get_state_dict(model)
    accelerator.load_state(state_dir)
    replay_losses, replay_norms = train(half, a.steps)
    replay_final = accelerator.get_state_dict(model)
    if accelerator.is_main_process:
        torch.save({k: v.clone() for k, v in final.items()}, os.path.join(a.out, "final.pt"))
        same = all(torch.equal(final[k], replay_final[k]) for k in final)
        engine = getattr(accelerator, "deepspeed_engine_wrapped", None)
        print("RESULT " + json.dumps({
            "losses": losses + later_losses, "norms": norms + later_norms, "replay_losses": replay_losses,
            "replay_norms": replay_norms, "replay_final_identical": same, "world": accelerator.num_processes,
            "deepspeed": engine is not None, "lr": scheduler.get_last_lr()[0]}), flush=True)


if __name__ == "__main__":
    main()
    # The plain-DDP reference runs make their gloo group through transformers/accelerate, not shardspeed
    # (whose init_distributed releases it at exit): a gloo group alive at teardown can abort a finished
    # process under torch 2.13 (pytorch/pytorch#190489).
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
