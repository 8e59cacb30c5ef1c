"""ZeRO-Inference's generation side: a stage-3 model's `generate` kept in step across ranks.

Under ZeRO-3 every forward gathers parameters with a collective, so a rank that finished generating
(an early end-of-sequence) must keep running forwards until every rank is done. Hugging Face's
`generate` does that with `synced_gpus=True`, but turns it on by itself only when its DeepSpeed
integration object is registered; plain `deepspeed.initialize` registers none, and DeepSpeed's
ranks then hang or crash. shardspeed makes `synced_gpus=True` the default of the model's `generate`.
"""
from __future__ import annotations

import functools
from typing import Any

from torch import nn


def sync_generate_across_ranks(module: nn.Module) -> None:
    """Make `synced_gpus=True` the default of `module.generate` (an explicit argument still wins)."""
    original = getattr(module, "generate", None)
    if original is None or getattr(original, "_shardspeed_synced", False):
        return

    @functools.wraps(original)
    def generate(*args: Any, **kwargs: Any) -> Any:
        kwargs.setdefault("synced_gpus", True)
        return original(*args, **kwargs)

    setattr(generate, "_shardspeed_synced", True)
    setattr(module, "generate", generate)  # an instance attribute: the class's generate is untouched


__all__ = ["sync_generate_across_ranks"]
