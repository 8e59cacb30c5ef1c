"""DeepSpeed's `DeepSpeedHybridEngine`: one engine that trains and generates (RLHF's actor).

`initialize` returns it when the config's `hybrid_engine.enabled` is true. Training is the ordinary
engine's. `generate(...)` (or `engine.module.generate` through the engine) runs the model's own
Hugging Face `generate`, so any causal LM works, not a list of architectures:

- ZeRO 0-2: the model is whole on every rank; generate runs as it is, each rank on its own prompts.
- ZeRO-3 with `pin_parameters` (the default): every partitioned parameter is gathered once, in batched
  collectives, the per-module fetch hooks are suspended, and the partitions come back after the call.
  No collective runs while decoding, so ranks generate independently and need no synchronised stop.
- ZeRO-3 without `pin_parameters`: each layer is gathered when it runs (memory stays at a few
  layers); every forward is then collective, so ranks keep stepping until all have finished
  (`synced_gpus`, over the gathering group, which is the data-parallel group).

Trained weights are never modified to generate: a LoRA adapter (peft's) runs as the model defines it
(DeepSpeed fuses LoRA into the trained weights and subtracts it afterwards, which drifts them).
"""
from __future__ import annotations

import time
from typing import Any

import torch
import torch.distributed as dist

from ..config.errors import ConfigError
from .engine import ShardspeedEngine


class DeepSpeedHybridEngine(ShardspeedEngine):
    """The training engine plus fast generation (see the module docstring)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        section = self._config.hybrid_engine
        if section.inference_tp_size > 1:
            raise ConfigError(f"`hybrid_engine.inference_tp_size` {section.inference_tp_size}: tensor-parallel generation "
                              "inside the hybrid engine is not supported yet by shardspeed; set it to 1")
        self._hybrid = section
        self.generate_time = 0.0
        self.gather_time = 0.0
        # DeepSpeed's per-iteration report: from one eval() to the next, how much went to gathering,
        # generating and training (an RLHF iteration is eval -> generate -> train -> step -> eval).
        self._cycle_start: float | None = None
        self._training_since: float | None = None
        self.training_time = 0.0
        self._cycles = 0
        self._total_latency = 0.0

    def eval(self) -> "DeepSpeedHybridEngine":
        """Generation mode; prints the last iteration's timing line on rank 0, as DeepSpeed's hybrid engine."""
        now = time.perf_counter()
        if self._cycle_start is not None:
            latency = now - self._cycle_start
            self._cycles += 1
            self._total_latency += latency
            if not dist.is_initialized() or dist.get_rank() == 0:
                print(self.latency_line(latency), flush=True)
        self._cycle_start = now
        self.training_time = 0.0
        self._training_since = None
        super().eval()
        return self

    def train(self, mode: bool = True) -> "DeepSpeedHybridEngine":
        super().train(mode)
        if mode:
            self._training_since = time.perf_counter()
        return self

    def step(self, lr_kwargs: dict[str, Any] | None = None) -> None:
        super().step(lr_kwargs)
        if self._training_since is not None:
            now = time.perf_counter()
            self.training_time += now - self._training_since
            self._training_since = now

    def latency_line(self, latency: float) -> str:
        """`|E2E latency=..s |Gather latency=..s (..%) |Generate time=.. |Training time=.. |Others=..`."""
        generate = max(self.generate_time - self.gather_time, 0.0)
        others = latency - (generate + self.gather_time + self.training_time)

        def part(value: float) -> str:
            return f"{value:.2f}s ({value / latency * 100:.2f}%)" if latency > 0 else f"{value:.2f}s"

        return (f"|E2E latency={latency:.2f}s |Gather latency={part(self.gather_time)} |Generate time={part(generate)} "
                f"|Training time={part(self.training_time)} |Others={part(others)}")

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        """The module's `generate`, with ZeRO-3's parameters gathered once (pinned) or per layer."""
        self._require_alive("generate")
        self._check_length(args, kwargs)
        module: Any = self.module
        generate = type(module).generate.__get__(module)  # the class's own, not a wrapper set on the instance
        was_training = module.training
        module.eval()
        self.gather_time = 0.0
        start = time.perf_counter()
        try:
            with torch.no_grad():
                manager = getattr(self.strategy, "manager", None)
                if manager is None:
                    return generate(*args, **kwargs)
                if self._hybrid.pin_parameters:
                    with manager.gathered_all():
                        self.gather_time = time.perf_counter() - start
                        kwargs.setdefault("synced_gpus", False)  # nothing collective while decoding
                        return generate(*args, **kwargs)
                kwargs.setdefault("synced_gpus", dist.is_initialized() and self.dp_world_size > 1)
                return generate(*args, **kwargs)
        finally:
            self.generate_time = time.perf_counter() - start
            if was_training:
                module.train()

    def _check_length(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        ids = kwargs.get("input_ids", args[0] if args and torch.is_tensor(args[0]) else None)
        if not torch.is_tensor(ids):
            return
        prompt = int(ids.shape[-1])
        limit = self._hybrid.max_out_tokens
        config = kwargs.get("generation_config")
        new = kwargs.get("max_new_tokens", getattr(config, "max_new_tokens", None))
        total = kwargs.get("max_length", prompt + new if new is not None else None)
        if prompt >= limit or (total is not None and total > limit):
            wanted = f"{prompt} prompt tokens" + (f" + {new} new" if new is not None else "") + \
                (f" = {total}" if total is not None else "")
            raise ValueError(f"generate would produce {wanted}, more than `hybrid_engine.max_out_tokens` {limit}; raise "
                             "max_out_tokens or shorten the prompt / max_new_tokens")


__all__ = ["DeepSpeedHybridEngine"]
