"""DeepSpeed's import path for activation checkpointing, `deepspeed.runtime.activation_checkpointing.checkpointing`.

The same objects as `shardspeed.checkpointing`, plus two DeepSpeed-private names that Megatron
forks import directly.
"""
from ...checkpointing import *  # noqa: F401,F403 - a re-export under DeepSpeed's module path
from ...checkpointing import __all__  # noqa: F401
from ...checkpointing.rng import _TRACKER as _CUDA_RNG_STATE_TRACKER  # noqa: F401 - DeepSpeed-private, imported in the wild
from ...checkpointing.rng import MODEL_PARALLEL_RNG_TRACKER_NAME as _MODEL_PARALLEL_RNG_TRACKER_NAME  # noqa: F401
