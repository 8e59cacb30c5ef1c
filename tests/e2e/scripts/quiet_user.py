"""A training script that sets up no logging at all, as most do: shardspeed's step lines must still
show, on rank 0 only."""
import torch

import shardspeed

model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
config = {"train_micro_batch_size_per_gpu": 2, "steps_per_print": 1, "wall_clock_breakdown": True,
          "memory_breakdown": True, "optimizer": {"type": "SGD", "params": {"lr": 0.1}},
          "zero_optimization": {"stage": 2}}
engine, *_ = shardspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
for _ in range(2):
    loss = engine(torch.randn(2, 8)).pow(2).mean()
    engine.backward(loss)
    engine.step()
print(f"done rank {engine.global_rank}", flush=True)
