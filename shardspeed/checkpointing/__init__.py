"""Activation checkpointing: DeepSpeed's `deepspeed.checkpointing` API.

    import shardspeed as deepspeed
    deepspeed.checkpointing.configure(mpu, deepspeed_config=args.deepspeed_config, num_checkpoints=n)
    hidden = deepspeed.checkpointing.checkpoint(block, hidden, attention_mask)

`activations.py` holds the checkpointer and the module-level API, `saved_inputs.py` where saved
inputs wait (tensor-parallel slices, host memory), `rng.py` the Megatron RNG tracker.
"""
from __future__ import annotations

from .activations import (
    ActivationCheckpointer,
    CheckpointSettings,
    CheckpointTiming,
    checkpoint,
    configure,
    get_timings,
    is_configured,
    model_parallel_cuda_manual_seed,
    model_parallel_reconfigure_tp_seed,
    non_reentrant_checkpoint,
    partition_activations_in_checkpoint,
    reset,
    saved_input_stats,
    set_num_layers,
    settings,
    unconfigure,
)
from .rng import CudaRNGStatesTracker, RNGStatesTracker, get_cuda_rng_tracker
from .saved_inputs import SavedInputStats, TensorParallelGroup

__all__ = [
    "ActivationCheckpointer",
    "CheckpointSettings",
    "CheckpointTiming",
    "CudaRNGStatesTracker",
    "RNGStatesTracker",
    "SavedInputStats",
    "TensorParallelGroup",
    "checkpoint",
    "configure",
    "get_cuda_rng_tracker",
    "get_timings",
    "is_configured",
    "model_parallel_cuda_manual_seed",
    "model_parallel_reconfigure_tp_seed",
    "non_reentrant_checkpoint",
    "partition_activations_in_checkpoint",
    "reset",
    "saved_input_stats",
    "set_num_layers",
    "settings",
    "unconfigure",
]
