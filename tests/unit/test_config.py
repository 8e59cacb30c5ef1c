"""The ds_config schema: every DeepSpeed config a user is likely to paste in loads, typos fail loudly,
defaults match DeepSpeed 0.19.8, "auto" and the batch-size triangle resolve as documented, and the
accepted key set and docs/config.md change only on purpose.

The DeepSpeed facts below (DS_DEFAULTS, DS_KEYS) were read from DeepSpeed 0.19.8's source with
`ds_defaults_ref.py` (kept at the bottom of this docstring); the tests never import deepspeed.
DS_DEFAULTS is its output less three zero keys with tests of their own (overlap_comm, leaf_module,
the deprecated stage3_gather_fp16_weights_on_model_save), plus the `checkpoint`, `data_types` and
`torch_autocast` defaults copied from runtime/constants.py. DS_KEYS' section lists are its last
lines; the top-level list is the keys runtime/config.py reads, less those 0.19.8 raises on.

Regenerate the frozen files after a deliberate schema change:

    python -m tests.unit.test_config --write-keys   # tests/unit/accepted_config_keys.txt
    python -m tools.gen_config_docs                 # docs/config.md

ds_defaults_ref.py (run in a venv with deepspeed==0.19.8, `python ds_defaults_ref.py 2>/dev/null | grep -v '^\\[20'`):

    import warnings, pprint; warnings.filterwarnings("ignore")
    import deepspeed.runtime.constants as C
    from deepspeed.runtime.config import get_pipeline_config
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig
    from deepspeed.runtime.zero.offload_config import DeepSpeedZeroOffloadOptimizerConfig, DeepSpeedZeroOffloadParamConfig
    from deepspeed.runtime.precision_config import DeepSpeedFP16Config, DeepSpeedBF16Config
    from deepspeed.runtime.swap_tensor.aio_config import get_aio_config
    from deepspeed.runtime.activation_checkpointing.config import DeepSpeedActivationCheckpointingConfig
    from deepspeed.profiling.config import DeepSpeedFlopsProfilerConfig
    from deepspeed.monitor.config import TensorBoardConfig, CSVConfig, WandbConfig, CometConfig
    from deepspeed.comm.config import CommsLoggerConfig
    from deepspeed.utils.config import get_timers_config
    def model(cls): return {k: getattr(cls(), k) for k in cls.model_fields}
    def keys(cls): return sorted({k for k, f in cls.model_fields.items()} | {f.alias for f in cls.model_fields.values() if f.alias})
    top = ["train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
           "managed_gradient_accumulation", "steps_per_print", "wall_clock_breakdown", "memory_breakdown",
           "dump_state", "log_level", "gradient_clipping", "prescale_gradients", "gradient_predivide_factor",
           "gradient_allreduce_op", "communication_data_type", "seq_parallel_communication_data_type",
           "disable_allgather", "zero_allow_untested_optimizer", "zero_force_ds_cpu_optimizer",
           "dataloader_drop_last", "vocabulary_size"]
    pprint.pprint({
        "": {**{k: getattr(C, k.upper() + "_DEFAULT") for k in top},
             "use_data_before_expert_parallelism": C.USE_DATA_BEFORE_EXPERT_PARALLEL_DEFAULT},
        "fp16": model(DeepSpeedFP16Config), "bf16": model(DeepSpeedBF16Config),
        "zero_optimization": model(DeepSpeedZeroConfig),
        "zero_optimization.offload_optimizer": model(DeepSpeedZeroOffloadOptimizerConfig),
        "zero_optimization.offload_param": model(DeepSpeedZeroOffloadParamConfig),
        "aio": get_aio_config({}), "pipeline": get_pipeline_config({}),
        "activation_checkpointing": DeepSpeedActivationCheckpointingConfig({}).__dict__,
        "flops_profiler": DeepSpeedFlopsProfilerConfig({}).__dict__,
        "tensorboard": model(TensorBoardConfig), "csv_monitor": model(CSVConfig), "wandb": model(WandbConfig),
        "comet": model(CometConfig), "comms_logger": model(CommsLoggerConfig),
        "timers.throughput": get_timers_config({}).model_dump(),
    }, width=110, sort_dicts=False)
    for name, cls in [("zero_optimization", DeepSpeedZeroConfig), ("fp16", DeepSpeedFP16Config), ("bf16", DeepSpeedBF16Config),
                      ("zero_optimization.offload_optimizer", DeepSpeedZeroOffloadOptimizerConfig),
                      ("zero_optimization.offload_param", DeepSpeedZeroOffloadParamConfig)]:
        print(name, keys(cls))
"""
from __future__ import annotations

import difflib
import itertools
import json
import sys
import types
import typing
from pathlib import Path
from typing import Any

import pytest
import torch
from pydantic import BaseModel

from shardspeed.config import ConfigError, ResolveContext, ShardspeedConfig, lift_autos, load_config, parse_config, read_config
from shardspeed.config.schema import UNIMPLEMENTED_SECTIONS

KEYS_FILE = Path(__file__).with_name("accepted_config_keys.txt")
REPO_ROOT = Path(__file__).resolve().parents[2]
DOCS_FILE = REPO_ROOT / "docs" / "config.md"


def _parse(config: Any) -> tuple[ShardspeedConfig, set[str]]:
    """The first three stages of `load_config`: read, lift out "auto"s, validate strictly."""
    raw = read_config(config)
    autos = lift_autos(raw)
    return parse_config(raw), autos


def _lookup(cfg: BaseModel, dotted: str) -> Any:
    """The parsed value at a user's dotted key, following field names or aliases, then dict keys."""
    node: Any = cfg
    for part in dotted.split("."):
        if isinstance(node, BaseModel):
            name = next(n for n, f in type(node).model_fields.items() if part in (n, f.alias))
            node = getattr(node, name)
        else:
            node = node[part]
    return node


def _leaves(raw: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    out = []
    for key, value in raw.items():
        if isinstance(value, dict) and value:
            out += _leaves(value, f"{prefix}{key}.")
        else:
            out.append((f"{prefix}{key}", value))
    return out


def _model_in(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return next((m for m in map(_model_in, typing.get_args(annotation)) if m is not None), None)
    return None


# ---------------------------------------------------------------------------------------------
# Every ds_config of /work/shared/seed/deepspeed-guide.txt, copied verbatim (JSON blocks as JSON
# text, so `2e8` and `null` reach the parser as DeepSpeed would read them; the guide's Python
# dicts as dicts). Left out on purpose: the Megatron launcher dict of 7.1 and the init_inference
# config of 10.3, which are not ds_configs.
# ---------------------------------------------------------------------------------------------

GUIDE_JSON = {
    "2.1 zero-1": """
{
  "zero_optimization": {
    "stage": 1
  }
}""",
    "2.2 zero-2": """
{
  "zero_optimization": {
    "stage": 2,
    "allgather_partitions": true,
    "allgather_bucket_size": 2e8,
    "reduce_scatter": true,
    "reduce_bucket_size": 2e8,
    "overlap_comm": true,
    "contiguous_gradients": true
  }
}""",
    "2.3 zero-3": """
{
  "zero_optimization": {
    "stage": 3,
    "overlap_comm": true,
    "contiguous_gradients": true,
    "sub_group_size": 1e9,
    "reduce_bucket_size": "auto",
    "stage3_prefetch_bucket_size": "auto",
    "stage3_param_persistence_threshold": "auto",
    "stage3_max_live_parameters": 1e9,
    "stage3_max_reuse_distance": 1e9,
    "stage3_gather_16bit_weights_on_model_save": true
  }
}""",
    "3.1 zero-offload": """
{
  "zero_optimization": {
    "stage": 2,
    "offload_optimizer": {
      "device": "cpu",
      "pin_memory": true
    },
    "allgather_partitions": true,
    "allgather_bucket_size": 2e8,
    "overlap_comm": true,
    "reduce_scatter": true,
    "reduce_bucket_size": 2e8,
    "contiguous_gradients": true
  }
}""",
    "3.1 zero-3 param offload": """
{
  "zero_optimization": {
    "stage": 3,
    "offload_optimizer": {
      "device": "cpu",
      "pin_memory": true
    },
    "offload_param": {
      "device": "cpu",
      "pin_memory": true
    }
  }
}""",
    # The guide nests "aio" inside "zero_optimization"; DeepSpeed (and shardspeed) reject that, see
    # test_guide_nvme_block_with_aio_nested_in_zero_is_rejected. Here "aio" is moved to the top level.
    "3.2 zero-infinity nvme (aio at top level)": """
{
  "zero_optimization": {
    "stage": 3,
    "offload_optimizer": {
      "device": "nvme",
      "nvme_path": "/local_nvme",
      "pin_memory": true,
      "buffer_count": 4,
      "fast_init": false
    },
    "offload_param": {
      "device": "nvme",
      "nvme_path": "/local_nvme",
      "pin_memory": true,
      "buffer_count": 5,
      "buffer_size": 1e8
    }
  },
  "aio": {
    "block_size": 1048576,
    "queue_depth": 8,
    "thread_count": 1,
    "single_submit": false,
    "overlap_events": true
  }
}""",
    "4.1 basic structure": """
{
  "train_batch_size": "auto",
  "train_micro_batch_size_per_gpu": "auto",
  "gradient_accumulation_steps": "auto",
  "gradient_clipping": 1.0,

  "fp16": {
    "enabled": "auto",
    "loss_scale": 0,
    "loss_scale_window": 1000,
    "initial_scale_power": 16,
    "hysteresis": 2,
    "min_loss_scale": 1
  },

  "bf16": {
    "enabled": "auto"
  },

  "zero_optimization": {
    "stage": 2,
    "allgather_partitions": true,
    "allgather_bucket_size": 2e8,
    "reduce_scatter": true,
    "reduce_bucket_size": 2e8,
    "overlap_comm": true,
    "contiguous_gradients": true
  },

  "optimizer": {
    "type": "AdamW",
    "params": {
      "lr": "auto",
      "betas": "auto",
      "eps": 1e-8,
      "weight_decay": "auto"
    }
  },

  "scheduler": {
    "type": "WarmupLR",
    "params": {
      "warmup_min_lr": "auto",
      "warmup_max_lr": "auto",
      "warmup_num_steps": "auto"
    }
  },

  "activation_checkpointing": {
    "partition_activations": false,
    "cpu_checkpointing": false,
    "contiguous_memory_optimization": false,
    "number_checkpoints": null,
    "synchronize_checkpoint_boundary": false,
    "profile": false
  },

  "wall_clock_breakdown": false,
  "steps_per_print": 100
}""",
    "4.2 fp16": """
{
  "fp16": {
    "enabled": true,
    "auto_cast": false,
    "loss_scale": 0,
    "initial_scale_power": 16,
    "loss_scale_window": 1000,
    "hysteresis": 2,
    "consecutive_hysteresis": false,
    "min_loss_scale": 1
  }
}""",
    "4.2 bf16": """
{
  "bf16": {
    "enabled": true
  }
}""",
    "4.3 batch sizes": """
{
  "train_batch_size": 2048,
  "train_micro_batch_size_per_gpu": 4,
  "gradient_accumulation_steps": 64
}""",
    "4.4 scheduler": """
{
  "scheduler": {
    "type": "WarmupDecayLR",
    "params": {
      "last_batch_iteration": -1,
      "total_num_steps": 100000,
      "warmup_min_lr": 0,
      "warmup_max_lr": 3e-4,
      "warmup_num_steps": 2000,
      "warmup_type": "linear"
    }
  }
}""",
    # DeepSpeed 0.19.8 rejects this block (its `tensor_parallel` section has `autotp_size`, and
    # `tp_size`/`tp_grain_size`/`mpu` only under `tensor_parallel.tp`); shardspeed accepts it as written.
    "7.1 tensor parallel": """
{
  "tensor_parallel": {
    "tp_size": 4,
    "mpu": null,
    "tp_grain_size": 64
  }
}""",
    "8 activation checkpointing": """
{
  "activation_checkpointing": {
    "partition_activations": true,
    "cpu_checkpointing": true,
    "contiguous_memory_optimization": true,
    "number_checkpoints": 4,
    "synchronize_checkpoint_boundary": false,
    "profile": false
  }
}""",
    "9.2 moe": """
{
  "zero_optimization": {
    "stage": 2
  },
  "moe_expert_parallel_size": 4,
  "moe": {
    "enabled": true,
    "ep_size": 4,
    "moe_param_group": true
  }
}""",
    "12.1 ds_zero2_config.json": """
{
  "bf16": {
    "enabled": "auto"
  },
  "optimizer": {
    "type": "AdamW",
    "params": {
      "lr": "auto",
      "betas": "auto",
      "eps": 1e-8,
      "weight_decay": "auto"
    }
  },
  "scheduler": {
    "type": "WarmupDecayLR",
    "params": {
      "warmup_min_lr": "auto",
      "warmup_max_lr": "auto",
      "warmup_num_steps": "auto",
      "total_num_steps": "auto"
    }
  },
  "zero_optimization": {
    "stage": 2,
    "offload_optimizer": {
      "device": "cpu",
      "pin_memory": true
    },
    "allgather_partitions": true,
    "allgather_bucket_size": 2e8,
    "overlap_comm": true,
    "reduce_scatter": true,
    "reduce_bucket_size": 2e8,
    "contiguous_gradients": true
  },
  "gradient_accumulation_steps": "auto",
  "gradient_clipping": "auto",
  "steps_per_print": 100,
  "train_batch_size": "auto",
  "train_micro_batch_size_per_gpu": "auto",
  "wall_clock_breakdown": false
}""",
    # min_loss_scale 1e-8: DeepSpeed 0.19.8 types it `int` and rejects this block; shardspeed takes a float.
    "13.1 fp16 overflow": """
{
  "fp16": {
    "enabled": true,
    "loss_scale": 0,
    "loss_scale_window": 500,
    "initial_scale_power": 12,
    "hysteresis": 2,
    "min_loss_scale": 1e-8
  }
}""",
}

_zero_tuning: dict[str, Any] = {  # 13.2, built by assignment in the guide
    "overlap_comm": True,
    "contiguous_gradients": True,
}
_zero_tuning["allgather_bucket_size"] = 5e8
_zero_tuning["reduce_bucket_size"] = 5e8
_zero_tuning["stage3_prefetch_bucket_size"] = 5e7
_zero_tuning["stage3_param_persistence_threshold"] = 1e6

GUIDE_DICTS: dict[str, dict[str, Any]] = {
    "6.2 pipeline_config": {
        "train_batch_size": 64,
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 8,
        "pipeline": {
            "seed_layers": True,
            "activation_checkpoint_interval": 1,
        },
    },
    "6.3 pipeline + zero-1": {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 8,
        "zero_optimization": {"stage": 1},
        "fp16": {"enabled": True},
    },
    "13.1 memory profiling": {
        "memory_breakdown": True,
        "wall_clock_breakdown": True,
    },
    "13.2 zero tuning": {"zero_optimization": _zero_tuning},
}

GUIDE_CONFIGS: dict[str, dict[str, Any]] = {**{k: json.loads(v) for k, v in GUIDE_JSON.items()}, **GUIDE_DICTS}


@pytest.mark.parametrize("name", list(GUIDE_CONFIGS))
def test_guide_config_parses_and_every_value_lands(name: str) -> None:
    """A ds_config from a popular DeepSpeed guide must load as written, each value where it belongs.

    Catches: a key the schema forgot, an alias that is not wired to its field, a `2e8` rejected.
    """
    cfg, autos = _parse(GUIDE_CONFIGS[name])
    for dotted, value in _leaves(GUIDE_CONFIGS[name]):
        if value == "auto":
            assert dotted in autos
            continue
        parsed = _lookup(cfg, dotted)
        assert parsed == value, f"{dotted}: wrote {value!r}, parsed {parsed!r}"
        if isinstance(value, float) and value.is_integer() and value >= 1e3:
            assert type(parsed) is int, dotted  # the guide's `2e8`-style sizes are all integer fields


@pytest.mark.parametrize("name", list(GUIDE_JSON))
def test_guide_json_block_parses_from_a_file(name: str, tmp_path: Path) -> None:
    """The same blocks as a user's ds_config.json on disk (path input), text exactly as in the guide."""
    path = tmp_path / "ds_config.json"
    path.write_text(GUIDE_JSON[name])
    cfg, _ = _parse(path)
    assert cfg == _parse(GUIDE_CONFIGS[name])[0]


def test_guide_nvme_block_with_aio_nested_in_zero_is_rejected() -> None:
    """The guide's ZeRO-Infinity block puts `aio` inside `zero_optimization`; DeepSpeed 0.19.8 rejects
    it too (extra_forbidden). The error must name the dotted key so the user can move it."""
    raw = json.loads(GUIDE_JSON["3.2 zero-infinity nvme (aio at top level)"])
    raw["zero_optimization"]["aio"] = raw.pop("aio")
    with pytest.raises(ConfigError, match=r"`zero_optimization\.aio`"):
        _parse(raw)


def test_guide_batch_sizes_load_at_their_world_sizes() -> None:
    """4.3 is stated for 8 GPUs (4 x 64 x 8 = 2048); 6.2 works out to 4 data-parallel ranks."""
    cfg = load_config(GUIDE_CONFIGS["4.3 batch sizes"], ResolveContext(dp_world_size=8))
    assert (cfg.train_batch_size, cfg.train_micro_batch_size_per_gpu, cfg.gradient_accumulation_steps) == (2048, 4, 64)
    cfg = load_config(GUIDE_CONFIGS["6.2 pipeline_config"], ResolveContext(dp_world_size=4))
    assert cfg.pipeline.seed_layers is True and cfg.pipeline.activation_checkpoint_interval == 1
    cfg = load_config(GUIDE_CONFIGS["6.3 pipeline + zero-1"], ResolveContext(dp_world_size=2))
    assert cfg.train_batch_size == 32 and cfg.zero_stage == 1 and cfg.precision == "fp16"


def test_guide_zero3_autos_resolve_from_hidden_size() -> None:
    """2.3's three "auto" bucket sizes are filled by the Hugging Face rule from the model's hidden size."""
    raw = {**GUIDE_CONFIGS["2.3 zero-3"], "train_micro_batch_size_per_gpu": 1}
    cfg = load_config(raw, ResolveContext(hidden_size=1024))
    zero = cfg.zero_optimization
    assert (zero.reduce_bucket_size, zero.prefetch_bucket_size, zero.param_persistence_threshold) == (1024 * 1024, int(0.9 * 1024 * 1024), 10 * 1024)
    assert cfg.auto_keys == {
        "zero_optimization.reduce_bucket_size",
        "zero_optimization.stage3_prefetch_bucket_size",
        "zero_optimization.stage3_param_persistence_threshold",
    }


# ---------------------------------------------------------------------------------------------
# One config using every key of the appendix, each with a non-default value.
# ---------------------------------------------------------------------------------------------

APPENDIX_CONFIG: dict[str, Any] = {
    "train_batch_size": 48,
    "train_micro_batch_size_per_gpu": 3,
    "gradient_accumulation_steps": 4,
    "gradient_clipping": 0.5,
    "fp16": {
        "enabled": True,
        "auto_cast": True,
        "loss_scale": 1024,
        "loss_scale_window": 500,
        "initial_scale_power": 12,
        "hysteresis": 3,
        "consecutive_hysteresis": True,
        "min_loss_scale": 2,
    },
    "bf16": {"enabled": False},
    "zero_optimization": {
        "stage": 3,
        "allgather_partitions": False,
        "allgather_bucket_size": 2e8,
        "reduce_scatter": False,
        "reduce_bucket_size": 3e8,
        "overlap_comm": False,
        "contiguous_gradients": False,
        "sub_group_size": 1e12,
        "stage3_prefetch_bucket_size": 4e7,
        "stage3_param_persistence_threshold": 1e6,
        "stage3_max_live_parameters": 2e9,
        "stage3_max_reuse_distance": 3e9,
        "stage3_gather_16bit_weights_on_model_save": True,
        "offload_optimizer": {"device": "nvme", "nvme_path": "/local_nvme/opt", "pin_memory": False, "buffer_count": 6, "fast_init": True},
        "offload_param": {"device": "nvme", "nvme_path": "/local_nvme/param", "pin_memory": False, "buffer_count": 7, "buffer_size": 2e8},
    },
    "aio": {"block_size": 262144, "queue_depth": 16, "thread_count": 4, "single_submit": True, "overlap_events": False},
    "optimizer": {"type": "AdamW", "params": {"lr": 3e-4, "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 0.1}},
    "scheduler": {"type": "WarmupCosineLR", "params": {"total_num_steps": 1000, "warmup_num_steps": 50}},
    "activation_checkpointing": {
        "partition_activations": True,
        "cpu_checkpointing": True,
        "contiguous_memory_optimization": True,
        "number_checkpoints": 4,
        "synchronize_checkpoint_boundary": True,
        "profile": True,
    },
    "pipeline": {"seed_layers": True, "activation_checkpoint_interval": 2},
    "tensor_parallel": {"tp_size": 2, "mpu": None, "tp_grain_size": 32},
    "moe": {"enabled": True, "ep_size": 2, "moe_param_group": True},
    "moe_expert_parallel_size": 2,
    "wall_clock_breakdown": True,
    "memory_breakdown": True,
    "steps_per_print": 10,
    "tensorboard": {"enabled": True, "output_path": "runs/tb", "job_name": "appendix"},
    "csv_monitor": {"enabled": True, "output_path": "runs/csv", "job_name": "appendix"},
    "wandb": {"enabled": True, "group": "g", "team": "t", "project": "p"},
    "flops_profiler": {"enabled": True, "profile_step": 3, "module_depth": 2, "top_modules": 5, "detailed": False, "output_file": "flops.txt"},
    "communication_data_type": "fp32",
    "prescale_gradients": True,
    "gradient_predivide_factor": 2.0,
    "zero_allow_untested_optimizer": True,
}

# (attribute path on the typed config, by field name, expected value, expected type)
APPENDIX_EXPECTED: list[tuple[str, Any, type]] = [
    ("train_batch_size", 48, int),
    ("train_micro_batch_size_per_gpu", 3, int),
    ("gradient_accumulation_steps", 4, int),
    ("gradient_clipping", 0.5, float),
    ("fp16.enabled", True, bool),
    ("fp16.auto_cast", True, bool),
    ("fp16.loss_scale", 1024.0, float),
    ("fp16.loss_scale_window", 500, int),
    ("fp16.initial_scale_power", 12, int),
    ("fp16.hysteresis", 3, int),
    ("fp16.consecutive_hysteresis", True, bool),
    ("fp16.min_loss_scale", 2.0, float),
    ("bf16.enabled", False, bool),
    ("zero_optimization.stage", 3, int),
    ("zero_optimization.allgather_partitions", False, bool),
    ("zero_optimization.allgather_bucket_size", 200_000_000, int),
    ("zero_optimization.reduce_scatter", False, bool),
    ("zero_optimization.reduce_bucket_size", 300_000_000, int),
    ("zero_optimization.overlap_comm", False, bool),
    ("zero_optimization.overlap_comm_resolved", False, bool),
    ("zero_optimization.contiguous_gradients", False, bool),
    ("zero_optimization.sub_group_size", 10**12, int),
    ("zero_optimization.prefetch_bucket_size", 40_000_000, int),
    ("zero_optimization.param_persistence_threshold", 1_000_000, int),
    ("zero_optimization.max_live_parameters", 2_000_000_000, int),
    ("zero_optimization.max_reuse_distance", 3_000_000_000, int),
    ("zero_optimization.gather_16bit_weights_on_model_save", True, bool),
    ("zero_optimization.offload_optimizer.device", "nvme", str),
    ("zero_optimization.offload_optimizer.nvme_path", "/local_nvme/opt", str),
    ("zero_optimization.offload_optimizer.pin_memory", False, bool),
    ("zero_optimization.offload_optimizer.buffer_count", 6, int),
    ("zero_optimization.offload_optimizer.fast_init", True, bool),
    ("zero_optimization.offload_param.device", "nvme", str),
    ("zero_optimization.offload_param.nvme_path", "/local_nvme/param", str),
    ("zero_optimization.offload_param.pin_memory", False, bool),
    ("zero_optimization.offload_param.buffer_count", 7, int),
    ("zero_optimization.offload_param.buffer_size", 200_000_000, int),
    ("aio.block_size", 262144, int),
    ("aio.queue_depth", 16, int),
    ("aio.intra_op_parallelism", 4, int),
    ("aio.single_submit", True, bool),
    ("aio.overlap_events", False, bool),
    ("optimizer.type", "AdamW", str),
    ("optimizer.params", {"lr": 3e-4, "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 0.1}, dict),
    ("scheduler.type", "WarmupCosineLR", str),
    ("scheduler.params", {"total_num_steps": 1000, "warmup_num_steps": 50}, dict),
    ("activation_checkpointing.partition_activations", True, bool),
    ("activation_checkpointing.cpu_checkpointing", True, bool),
    ("activation_checkpointing.contiguous_memory_optimization", True, bool),
    ("activation_checkpointing.number_checkpoints", 4, int),
    ("activation_checkpointing.synchronize_checkpoint_boundary", True, bool),
    ("activation_checkpointing.profile", True, bool),
    ("pipeline.seed_layers", True, bool),
    ("pipeline.activation_checkpoint_interval", 2, int),
    ("tensor_parallel.autotp_size", 2, int),
    ("tensor_parallel.mpu", None, type(None)),
    ("tensor_parallel.tp_grain_size", 32, int),
    ("moe.enabled", True, bool),
    ("moe.ep_size", 2, int),
    ("moe.moe_param_group", True, bool),
    ("moe_expert_parallel_size", 2, int),
    ("wall_clock_breakdown", True, bool),
    ("memory_breakdown", True, bool),
    ("steps_per_print", 10, int),
    ("tensorboard.enabled", True, bool),
    ("tensorboard.output_path", "runs/tb", str),
    ("tensorboard.job_name", "appendix", str),
    ("csv_monitor.enabled", True, bool),
    ("csv_monitor.output_path", "runs/csv", str),
    ("csv_monitor.job_name", "appendix", str),
    ("wandb.enabled", True, bool),
    ("wandb.group", "g", str),
    ("wandb.team", "t", str),
    ("wandb.project", "p", str),
    ("flops_profiler.enabled", True, bool),
    ("flops_profiler.profile_step", 3, int),
    ("flops_profiler.module_depth", 2, int),
    ("flops_profiler.top_modules", 5, int),
    ("flops_profiler.detailed", False, bool),
    ("flops_profiler.output_file", "flops.txt", str),
    ("communication_data_type", "fp32", str),
    ("prescale_gradients", True, bool),
    ("gradient_predivide_factor", 2.0, float),
    ("zero_allow_untested_optimizer", True, bool),
]


def test_appendix_config_loads_every_value_into_its_typed_field() -> None:
    """Every key of the issue's appendix in one config: each value must reach the named field with
    the field's type (aliases such as `thread_count` and `stage3_*` included)."""
    cfg = load_config(APPENDIX_CONFIG, ResolveContext(dp_world_size=4))
    for path, expected, kind in APPENDIX_EXPECTED:
        value = cfg
        for part in path.split("."):
            value = getattr(value, part)
        assert value == expected, f"{path}: expected {expected!r}, got {value!r}"
        assert type(value) is kind, f"{path}: expected {kind.__name__}, got {type(value).__name__}"


def test_appendix_expectations_cover_every_key_written() -> None:
    """Guards the test above: every leaf of APPENDIX_CONFIG is checked, by the generic lookup too."""
    cfg = load_config(APPENDIX_CONFIG, ResolveContext(dp_world_size=4))
    for dotted, value in _leaves(APPENDIX_CONFIG):
        assert _lookup(cfg, dotted) == value, dotted
    checked = {path.split(".")[0] for path, _, _ in APPENDIX_EXPECTED}
    assert set(APPENDIX_CONFIG) <= checked


def test_bf16_spellings_land_in_the_same_field() -> None:
    """DeepSpeed reads `bf16` and the older `bfloat16`; both must turn bf16 on."""
    for spelling in ("bf16", "bfloat16"):
        cfg = load_config({"train_batch_size": 8, spelling: {"enabled": True}})
        assert cfg.bf16.enabled is True and cfg.precision == "bf16"


# ---------------------------------------------------------------------------------------------
# Defaults equal DeepSpeed 0.19.8's source defaults, for the keys we share.
# ---------------------------------------------------------------------------------------------

DS_DEFAULTS: dict[str, dict[str, Any]] = {
    "": {
        "train_batch_size": None,
        "train_micro_batch_size_per_gpu": None,
        "gradient_accumulation_steps": None,
        "managed_gradient_accumulation": True,
        "steps_per_print": None,
        "wall_clock_breakdown": False,
        "memory_breakdown": False,
        "dump_state": False,
        "log_level": None,
        "gradient_clipping": 1.0,
        "prescale_gradients": False,
        "gradient_predivide_factor": 1.0,
        "gradient_allreduce_op": "mean",
        "communication_data_type": None,
        "seq_parallel_communication_data_type": "fp32",
        "disable_allgather": False,
        "zero_allow_untested_optimizer": False,
        "zero_force_ds_cpu_optimizer": True,
        "dataloader_drop_last": False,
        "vocabulary_size": None,
        "use_data_before_expert_parallelism": False,
    },
    "fp16": {
        "enabled": False,
        "auto_cast": False,
        "loss_scale": 0.0,
        "initial_scale_power": 16,
        "loss_scale_window": 1000,
        "hysteresis": 2,
        "consecutive_hysteresis": False,
        "min_loss_scale": 1,
        "fp16_master_weights_and_grads": False,
    },
    "bf16": {
        "enabled": False,
        "immediate_grad_update": False,
        "check_grad_overflow": True,
        "bf16_master_weights_and_grads": False,
        "bf16_optimizer_states": False,
    },
    # overlap_comm (None, resolved by stage) and the deprecated stage3_gather_fp16_weights_on_model_save
    # are tested separately; leaf_module has its own test.
    "zero_optimization": {
        "stage": 0,
        "contiguous_gradients": True,
        "reduce_scatter": True,
        "reduce_bucket_size": 500000000,
        "use_multi_rank_bucket_allreduce": True,
        "allgather_partitions": True,
        "allgather_bucket_size": 500000000,
        "compute_grad_norm": True,
        "load_from_fp32_weights": True,
        "elastic_checkpoint": False,
        "offload_param": None,
        "offload_optimizer": None,
        "zenflow": None,
        "sub_group_size": 1000000000,
        "cpu_offload_param": None,
        "cpu_offload_use_pin_memory": None,
        "cpu_offload": None,
        "prefetch_bucket_size": 50000000,
        "param_persistence_threshold": 100000,
        "model_persistence_threshold": 9223372036854775807,
        "max_live_parameters": 1000000000,
        "max_reuse_distance": 1000000000,
        "gather_16bit_weights_on_model_save": False,
        "module_granularity_threshold": 0,
        "use_all_reduce_for_fetch_params": False,
        "allgather_sequential": False,
        "ignore_unused_parameters": True,
        "legacy_stage1": False,
        "round_robin_gradients": False,
        "parameter_alignment": False,
        "zero_hpz_partition_size": 1,
        "zero_quantized_weights": False,
        "zero_quantized_nontrainable_weights": False,
        "zero_quantized_gradients": False,
        "memory_efficient_linear": True,
        "pipeline_loading_checkpoint": False,
        "override_module_apply": True,
        "log_trace_cache_warnings": False,
        "enable_sanity_checks": False,
        "save_muon_momentum_buffer_in_memory": False,
    },
    "zero_optimization.offload_optimizer": {
        "device": "none",
        "nvme_path": None,
        "buffer_count": 4,
        "pin_memory": True,
        "pipeline_read": False,
        "pipeline_write": False,
        "fast_init": False,
        "ratio": 1.0,
        "super_offload": False,
        "cpuadam_cores_perc": 0.8,
    },
    "zero_optimization.offload_param": {
        "device": "none",
        "nvme_path": None,
        "buffer_count": 5,
        "buffer_size": 100000000,
        "max_in_cpu": 1000000000,
        "pin_memory": True,
    },
    "aio": {
        "block_size": 1048576,
        "queue_depth": 8,
        "intra_op_parallelism": 1,
        "single_submit": False,
        "overlap_events": True,
        "use_gds": False,
    },
    "activation_checkpointing": {
        "partition_activations": False,
        "contiguous_memory_optimization": False,
        "cpu_checkpointing": False,
        "number_checkpoints": None,
        "synchronize_checkpoint_boundary": False,
        "profile": False,
    },
    "pipeline": {
        "stages": "auto",
        "partition": "best",
        "seed_layers": False,
        "activation_checkpoint_interval": 0,
        "pipe_partitioned": True,
        "grad_partitioned": True,
    },
    "flops_profiler": {
        "enabled": False,
        "recompute_fwd_factor": 0.0,
        "profile_step": 1,
        "module_depth": -1,
        "top_modules": 1,
        "detailed": True,
        "output_file": None,
    },
    "tensorboard": {"enabled": False, "output_path": "", "job_name": "DeepSpeedJobName"},
    "csv_monitor": {"enabled": False, "output_path": "", "job_name": "DeepSpeedJobName"},
    "wandb": {"enabled": False, "group": None, "team": None, "project": "deepspeed"},
    "comet": {
        "enabled": False,
        "samples_log_interval": 100,
        "project": None,
        "workspace": None,
        "api_key": None,
        "experiment_name": None,
        "experiment_key": None,
        "online": None,
        "mode": None,
    },
    "comms_logger": {"enabled": False, "prof_all": True, "prof_ops": [], "verbose": False, "debug": False},
    "timers.throughput": {"enabled": True, "synchronized": True},
    # runtime/constants.py and runtime/config.py (plain dict readers, not pydantic models).
    "checkpoint": {"load_universal": False, "use_node_local_storage": False, "parallel_write": {"pipeline_stage": False}},
    "data_types": {"grad_accum_dtype": None, "param_dtype": None, "buffer_dtype": None},
    "torch_autocast": {"enabled": False, "dtype": None, "lower_precision_safe_modules": None},
}


def _section_defaults(path: str) -> BaseModel:
    """A default section instance; optional sections (offload) are built from their own defaults."""
    node: Any = ShardspeedConfig()
    for part in filter(None, path.split(".")):
        child = getattr(node, part)
        if child is None:
            child = _model_in(type(node).model_fields[part].annotation)()
        node = child
    return node


_SHARED_DEFAULTS = [
    (section, key, value)
    for section, values in DS_DEFAULTS.items()
    for key, value in values.items()
    if key in type(_section_defaults(section)).model_fields
]


@pytest.mark.parametrize(("section", "key", "ds_default"), _SHARED_DEFAULTS, ids=[f"{s}.{k}".lstrip(".") for s, k, _ in _SHARED_DEFAULTS])
def test_default_matches_deepspeed(section: str, key: str, ds_default: Any) -> None:
    """A key left out must behave as it does under DeepSpeed 0.19.8 (source defaults, not its docs)."""
    ours = getattr(_section_defaults(section), key)
    assert ours == ds_default, f"{section}.{key}: shardspeed default {ours!r}, DeepSpeed 0.19.8 {ds_default!r}"


def test_every_deepspeed_default_section_is_compared() -> None:
    """Guards the parametrization: a DeepSpeed default is skipped only for a key we do not have yet."""
    skipped = {f"{s}.{k}".lstrip(".") for s, values in DS_DEFAULTS.items() for k in values} - {
        f"{s}.{k}".lstrip(".") for s, k, _ in _SHARED_DEFAULTS
    }
    assert skipped <= set(DS_KEYS_MISSING)


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_overlap_comm_default_follows_deepspeeds_stage_rule(stage: int) -> None:
    """DeepSpeed resolves an unset overlap_comm to True for stage 3 and False otherwise; an explicit
    value always wins."""
    zero = parse_config({"zero_optimization": {"stage": stage}}).zero_optimization
    assert zero.overlap_comm_resolved is (stage == 3)
    for explicit in (True, False):
        zero = parse_config({"zero_optimization": {"stage": stage, "overlap_comm": explicit}}).zero_optimization
        assert zero.overlap_comm_resolved is explicit


def test_checkpoint_tag_validation_default_is_warn() -> None:
    """DeepSpeed's default is "WARN" (it upper-cases what the user writes)."""
    assert ShardspeedConfig().checkpoint.tag_validation.upper() == "WARN"


def test_deprecated_zero_spellings_map_onto_their_replacements() -> None:
    """DeepSpeed maps cpu_offload / cpu_offload_param / stage3_gather_fp16_weights_on_model_save onto
    the current keys; a config using them must mean the same thing here."""
    zero = parse_config(
        {"zero_optimization": {"stage": 3, "cpu_offload": True, "cpu_offload_param": True, "stage3_gather_fp16_weights_on_model_save": True}}
    ).zero_optimization
    assert zero.offload_optimizer is not None and zero.offload_optimizer.device == "cpu"
    assert zero.offload_param is not None and zero.offload_param.device == "cpu"
    assert zero.gather_16bit_weights_on_model_save is True


def test_zero_leaf_module_default_matches_deepspeed() -> None:
    leaf = ShardspeedConfig().zero_optimization.leaf_module
    assert leaf is not None and leaf.get("classes") == [
        "transformers.models.mixtral.modeling_mixtral.MixtralSparseMoeBlock",
        "transformers.models.qwen2_moe.modeling_qwen2_moe.Qwen2MoeSparseMoeBlock",
        "transformers.models.qwen3_moe.modeling_qwen3_moe.Qwen3MoeSparseMoeBlock",
    ]


# Every spelling DeepSpeed 0.19.8's pydantic sections accept (field names and aliases), and the
# top-level keys its config reader looks up. A DeepSpeed config using any of them must load.
DS_KEYS: dict[str, list[str]] = {
    "": [
        "activation_checkpointing", "aio", "autotuning", "bf16", "bfloat16", "checkpoint", "comet", "comms_logger",
        "communication_data_type", "compile", "csv_monitor", "data_efficiency", "data_types", "dataloader_drop_last",
        "disable_allgather", "disable_python_gc", "dump_state", "expert_parallel", "flops_profiler", "fp16",
        "gradient_accumulation_steps", "gradient_allreduce_op", "gradient_clipping", "gradient_predivide_factor",
        "hybrid_engine", "log_level", "managed_gradient_accumulation", "memory_breakdown", "optimizer", "pipeline",
        "prescale_gradients", "scheduler", "seq_parallel_communication_data_type", "steps_per_print", "tensor_parallel",
        "tensorboard", "timers", "torch_autocast", "train_batch_size", "train_micro_batch_size_per_gpu",
        "use_data_before_expert_parallelism", "vocabulary_size", "wall_clock_breakdown", "wandb",
        "weight_quantization", "zero_allow_untested_optimizer", "zero_force_ds_cpu_optimizer", "zero_optimization",
    ],
    "zero_optimization": [
        "allgather_bucket_size", "allgather_partitions", "allgather_sequential", "compute_grad_norm", "contiguous_gradients",
        "cpu_offload", "cpu_offload_param", "cpu_offload_use_pin_memory", "elastic_checkpoint", "enable_sanity_checks",
        "gather_16bit_weights_on_model_save", "ignore_unused_parameters", "leaf_module", "legacy_stage1",
        "load_from_fp32_weights", "log_trace_cache_warnings", "max_live_parameters", "max_reuse_distance",
        "memory_efficient_linear", "model_persistence_threshold", "module_granularity_threshold", "offload_optimizer",
        "offload_param", "overlap_comm", "override_module_apply", "param_persistence_threshold", "parameter_alignment",
        "pipeline_loading_checkpoint", "prefetch_bucket_size", "reduce_bucket_size", "reduce_scatter",
        "round_robin_gradients", "save_muon_momentum_buffer_in_memory", "stage", "stage3_allgather_sequential",
        "stage3_gather_16bit_weights_on_model_save", "stage3_gather_fp16_weights_on_model_save",
        "stage3_max_live_parameters", "stage3_max_reuse_distance", "stage3_model_persistence_threshold",
        "stage3_module_granularity_threshold", "stage3_param_persistence_threshold", "stage3_prefetch_bucket_size",
        "stage3_use_all_reduce_for_fetch_params", "sub_group_size", "use_all_reduce_for_fetch_params",
        "use_multi_rank_bucket_allreduce", "zenflow", "zero_hpz_partition_size", "zero_quantized_gradients",
        "zero_quantized_nontrainable_weights", "zero_quantized_weights",
    ],
    "zero_optimization.offload_optimizer": [
        "buffer_count", "cpuadam_cores_perc", "device", "fast_init", "nvme_path", "pin_memory", "pipeline_read",
        "pipeline_write", "ratio", "super_offload",
    ],
    "zero_optimization.offload_param": ["buffer_count", "buffer_size", "device", "max_in_cpu", "nvme_path", "pin_memory"],
    "fp16": [
        "auto_cast", "consecutive_hysteresis", "enabled", "fp16_master_weights_and_grads", "hysteresis",
        "initial_scale_power", "loss_scale", "loss_scale_window", "min_loss_scale",
    ],
    "bf16": ["bf16_master_weights_and_grads", "bf16_optimizer_states", "check_grad_overflow", "enabled", "immediate_grad_update"],
    "aio": ["block_size", "intra_op_parallelism", "overlap_events", "queue_depth", "single_submit", "use_gds"],
    "checkpoint": ["load_universal", "parallel_write", "tag_validation", "use_node_local_storage"],
    "data_types": ["buffer_dtype", "grad_accum_dtype", "keep_in_fp32_modules", "param_dtype"],
}
DS_KEYS_MISSING: dict[str, str] = {}  # keys DeepSpeed 0.19.8 accepts that shardspeed rejects (none today)
_DS_KEY_PARAMS = [
    pytest.param(
        f"{section}.{key}".lstrip("."),
        marks=[pytest.mark.xfail(strict=True, reason=DS_KEYS_MISSING[f"{section}.{key}".lstrip(".")])]
        if f"{section}.{key}".lstrip(".") in DS_KEYS_MISSING else [],
    )
    for section, keys in DS_KEYS.items()
    for key in keys
]


@pytest.mark.parametrize("dotted", _DS_KEY_PARAMS)
def test_deepspeed_key_is_accepted(dotted: str) -> None:
    """A key DeepSpeed 0.19.8 accepts must not be an 'unknown key' here (DeepSpeed configs load as they are)."""
    if dotted not in set(accepted_config_keys()):
        pytest.fail(f"DeepSpeed 0.19.8 accepts `{dotted}`; shardspeed's schema rejects it as unknown")


# ---------------------------------------------------------------------------------------------
# Integer fields, input forms, file and JSON errors.
# ---------------------------------------------------------------------------------------------

_INT_KEYS = [
    "train_batch_size",
    "zero_optimization.reduce_bucket_size",
    "zero_optimization.stage3_prefetch_bucket_size",
    "zero_optimization.offload_param.buffer_size",
    "fp16.loss_scale_window",
    "aio.block_size",
]


def _nest(dotted: str, value: Any) -> dict[str, Any]:
    raw: dict[str, Any] = {}
    node = raw
    *parents, last = dotted.split(".")
    for part in parents:
        node = node.setdefault(part, {})
    node[last] = value
    return raw


@pytest.mark.parametrize("dotted", _INT_KEYS)
def test_integral_float_is_accepted_for_integer_fields(dotted: str) -> None:
    """DeepSpeed configs write sizes as `2e8`; they must become the int 200000000, not a float."""
    value = _lookup(parse_config(_nest(dotted, 2e8)), dotted)
    assert value == 200_000_000 and type(value) is int


@pytest.mark.parametrize("dotted", _INT_KEYS)
@pytest.mark.parametrize("bad", [2.5, float("inf"), float("nan")])
def test_fractional_float_is_rejected_naming_the_key(dotted: str, bad: float) -> None:
    """2.5 elements is a typo, not something to truncate silently; the error names the dotted key."""
    with pytest.raises(ConfigError, match=rf"`{dotted.replace('.', '[.]')}`"):
        parse_config(_nest(dotted, bad))


def test_config_from_dict_path_and_json_string_agree(tmp_path: Path) -> None:
    """initialize(config=...) takes a dict, a path (str or Path) or a JSON string; all mean the same."""
    raw = GUIDE_CONFIGS["2.2 zero-2"]
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(raw))
    text = json.dumps(raw)
    for form in (raw, str(path), path, text, "\n  " + text):
        assert read_config(form) == raw


def test_read_config_copies_a_dict_input() -> None:
    """lift_autos edits the dict in place; the user's own dict must not lose its "auto" values."""
    raw = {"train_batch_size": "auto", "zero_optimization": {"reduce_bucket_size": "auto"}}
    copy = read_config(raw)
    assert lift_autos(copy) == {"train_batch_size", "zero_optimization.reduce_bucket_size"}
    assert raw == {"train_batch_size": "auto", "zero_optimization": {"reduce_bucket_size": "auto"}}


def test_missing_file_error_names_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope" / "ds_config.json"
    for form in (str(missing), missing):
        with pytest.raises(ConfigError, match="does not exist") as err:
            read_config(form)
        assert str(missing) in str(err.value)


def test_bad_json_file_error_names_the_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "ds_config.json"
    path.write_text('{\n  "train_batch_size": 8,\n  "fp16": {"enabled": true,}\n}\n')
    with pytest.raises(ConfigError) as err:
        read_config(path)
    assert str(path) in str(err.value) and "line 3" in str(err.value)


def test_bad_json_string_error_names_the_line() -> None:
    with pytest.raises(ConfigError, match=r"JSON string.*line 2"):
        read_config('{"train_batch_size": 8,\n "fp16": }')


def test_json_that_is_not_an_object_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "ds.json"
    path.write_text("[1, 2]")
    with pytest.raises(ConfigError, match="JSON object"):
        read_config(path)


def test_config_of_another_type_is_rejected() -> None:
    with pytest.raises(ConfigError, match="dict, a path or a JSON string"):
        read_config(42)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------
# The batch-size triangle.
# ---------------------------------------------------------------------------------------------

_BATCH_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")
_MICRO, _GAS = 2, 3


def _triangle_expectation(given: frozenset[str], world: int) -> tuple[int, int, int] | None:
    """DeepSpeed's rule for (tbs, micro, gas) from the keys given; None where it is an error."""
    if len(given) >= 2:
        return (_MICRO * _GAS * world, _MICRO, _GAS)
    if given == {"train_batch_size"}:
        return (_MICRO * _GAS * world, _MICRO * _GAS, 1)  # one accumulation step: the micro batch takes it all
    if given == {"train_micro_batch_size_per_gpu"}:
        return (_MICRO * world, _MICRO, 1)
    return None


_SUBSETS = [frozenset(c) for r in range(4) for c in itertools.combinations(_BATCH_KEYS, r)]


@pytest.mark.parametrize("world", [1, 2, 4])
@pytest.mark.parametrize("given", _SUBSETS, ids=lambda s: "+".join(sorted(k.split("_")[1] for k in s)) or "none")
@pytest.mark.parametrize("missing_as", ["absent", "auto"])
def test_batch_triangle(world: int, given: frozenset[str], missing_as: str) -> None:
    """Any two of the three batch keys determine the third; either batch size alone means one
    accumulation step; neither batch size is an error. A key written as "auto" counts as missing."""
    truth = {"train_batch_size": _MICRO * _GAS * world, "train_micro_batch_size_per_gpu": _MICRO, "gradient_accumulation_steps": _GAS}
    raw: dict[str, Any] = {k: truth[k] for k in given}
    if missing_as == "auto":
        raw.update({k: "auto" for k in _BATCH_KEYS if k not in given})
    expected = _triangle_expectation(given, world)
    if expected is None:
        with pytest.raises(ConfigError, match="train_batch_size.*train_micro_batch_size_per_gpu"):
            load_config(raw, ResolveContext(dp_world_size=world))
        return
    cfg = load_config(raw, ResolveContext(dp_world_size=world))
    assert (cfg.train_batch_size, cfg.train_micro_batch_size_per_gpu, cfg.gradient_accumulation_steps) == expected
    assert cfg.train_batch_size == cfg.train_micro_batch_size_per_gpu * cfg.gradient_accumulation_steps * world


@pytest.mark.parametrize(("tbs", "micro", "gas", "world"), [(32, 4, 2, 2), (16, 2, 2, 2), (48, 3, 4, 2), (8, 1, 1, 1)])
def test_batch_mismatch_error_prints_every_factor(tbs: int, micro: int, gas: int, world: int) -> None:
    """DeepSpeed's message is the model to imitate: `32 != 4 * 2 * 2`, so the user sees which factor is off."""
    with pytest.raises(ConfigError) as err:
        load_config({"train_batch_size": tbs, "train_micro_batch_size_per_gpu": micro, "gradient_accumulation_steps": gas}, ResolveContext(dp_world_size=world))
    assert f"{tbs} != {micro} * {gas} * {world}" in str(err.value)


@pytest.mark.parametrize(
    ("raw", "world", "missing", "numbers"),
    [
        ({"train_batch_size": 10, "train_micro_batch_size_per_gpu": 4}, 1, "gradient_accumulation_steps", ["10", "4"]),
        ({"train_batch_size": 12, "train_micro_batch_size_per_gpu": 2}, 4, "gradient_accumulation_steps", ["12", "2", "4", "8"]),
        ({"train_batch_size": 10, "gradient_accumulation_steps": 4}, 1, "train_micro_batch_size_per_gpu", ["10", "4"]),
        ({"train_batch_size": 12, "gradient_accumulation_steps": 2}, 4, "train_micro_batch_size_per_gpu", ["12", "2", "4", "8"]),
        ({"train_batch_size": 6}, 4, "train_micro_batch_size_per_gpu", ["6", "4"]),
    ],
)
def test_non_divisible_batch_sizes_are_rejected(raw: dict[str, int], world: int, missing: str, numbers: list[str]) -> None:
    """A third value that would have to be fractional is an error naming it and the numbers involved."""
    with pytest.raises(ConfigError, match=f"`{missing}`") as err:
        load_config(raw, ResolveContext(dp_world_size=world))
    for number in numbers:
        assert number in str(err.value)


@pytest.mark.parametrize("key", _BATCH_KEYS)
@pytest.mark.parametrize("value", [0, -2])
def test_non_positive_batch_size_is_rejected(key: str, value: int) -> None:
    raw = {"train_batch_size": 4, "train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1, key: value}
    with pytest.raises(ConfigError, match=f"`{key}`"):
        load_config(raw)


def test_non_positive_world_size_is_rejected() -> None:
    with pytest.raises(ConfigError, match="world size"):
        load_config({"train_batch_size": 4}, ResolveContext(dp_world_size=0))


# ---------------------------------------------------------------------------------------------
# "auto".
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("dtype", "fp16", "bf16"), [(torch.float16, True, False), (torch.bfloat16, False, True), (torch.float32, False, False)])
@pytest.mark.parametrize("bf16_key", ["bf16", "bfloat16"])
def test_auto_precision_follows_model_dtype(dtype: torch.dtype, fp16: bool, bf16: bool, bf16_key: str) -> None:
    """The Hugging Face configs write `"enabled": "auto"` in both fp16 and bf16; the model's dtype decides."""
    raw = {"train_batch_size": 8, "fp16": {"enabled": "auto"}, bf16_key: {"enabled": "auto"}}
    cfg = load_config(raw, ResolveContext(model_dtype=dtype))
    assert (cfg.fp16.enabled, cfg.bf16.enabled) == (fp16, bf16)
    assert cfg.auto_keys == {"fp16.enabled", f"{bf16_key}.enabled"}


def test_auto_precision_without_a_model_dtype_is_an_error() -> None:
    with pytest.raises(ConfigError, match=r"`bf16\.enabled`.*`fp16\.enabled`"):
        load_config({"train_batch_size": 8, "fp16": {"enabled": "auto"}, "bf16": {"enabled": "auto"}})


@pytest.mark.parametrize("hidden", [64, 1024, 4096])
def test_auto_zero_bucket_sizes_follow_hidden_size(hidden: int) -> None:
    """reduce_bucket_size h², stage3_prefetch_bucket_size 0.9·h², stage3_param_persistence_threshold 10·h,
    under either spelling of the stage-3 keys."""
    for prefetch, persistence in (("stage3_prefetch_bucket_size", "stage3_param_persistence_threshold"), ("prefetch_bucket_size", "param_persistence_threshold")):
        raw = {"train_batch_size": 8, "zero_optimization": {"stage": 3, "reduce_bucket_size": "auto", prefetch: "auto", persistence: "auto"}}
        zero = load_config(raw, ResolveContext(hidden_size=hidden)).zero_optimization
        assert zero.reduce_bucket_size == hidden * hidden
        assert zero.prefetch_bucket_size == int(0.9 * hidden * hidden)
        assert zero.param_persistence_threshold == 10 * hidden


def test_auto_zero_bucket_sizes_without_hidden_size_name_every_key() -> None:
    raw = GUIDE_CONFIGS["2.3 zero-3"] | {"train_batch_size": 8}
    with pytest.raises(ConfigError) as err:
        load_config(raw)
    for key in ("reduce_bucket_size", "stage3_prefetch_bucket_size", "stage3_param_persistence_threshold"):
        assert f"`zero_optimization.{key}`" in str(err.value)


def test_auto_warmup_max_lr_comes_from_optimizer_lr() -> None:
    raw = {
        "train_batch_size": 8,
        "optimizer": {"type": "AdamW", "params": {"lr": 3e-4}},
        "scheduler": {"type": "WarmupLR", "params": {"warmup_max_lr": "auto", "warmup_num_steps": 10}},
    }
    cfg = load_config(raw)
    assert cfg.scheduler is not None and cfg.scheduler.params == {"warmup_max_lr": 3e-4, "warmup_num_steps": 10}
    assert cfg.auto_keys == {"scheduler.params.warmup_max_lr"}


def test_auto_warmup_max_lr_without_optimizer_lr_is_an_error() -> None:
    raw = {"train_batch_size": 8, "scheduler": {"type": "WarmupLR", "params": {"warmup_max_lr": "auto"}}}
    with pytest.raises(ConfigError, match=r"`scheduler\.params\.warmup_max_lr`"):
        load_config(raw)


@pytest.mark.parametrize("name", ["4.1 basic structure", "12.1 ds_zero2_config.json"])
def test_unresolvable_autos_are_all_named_in_one_error(name: str) -> None:
    """The Hugging Face Trainer fills optimizer/scheduler/clipping "auto"s from its arguments; shardspeed
    cannot, and must list every such key at once (not one per run), while resolving the ones it can."""
    raw = GUIDE_CONFIGS[name]
    _, autos = _parse(raw)
    resolvable = {"train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "fp16.enabled", "bf16.enabled"}
    unresolvable = autos - resolvable
    assert "optimizer.params.lr" in unresolvable
    with pytest.raises(ConfigError) as err:
        load_config(raw, ResolveContext(model_dtype=torch.bfloat16, hidden_size=64))
    message = str(err.value)
    for key in unresolvable:
        assert f"`{key}`" in message, key
    for key in resolvable:
        assert f"`{key}`" not in message, key


def test_auto_gradient_clipping_is_an_error_naming_the_key() -> None:
    with pytest.raises(ConfigError, match=r"`gradient_clipping`.*\"auto\""):
        load_config({"train_batch_size": 8, "gradient_clipping": "auto"})


def test_auto_is_matched_case_insensitively_and_recorded() -> None:
    raw = {"train_batch_size": 8, "train_micro_batch_size_per_gpu": "AUTO"}
    cfg = load_config(raw, ResolveContext(dp_world_size=2))
    assert cfg.train_micro_batch_size_per_gpu == 4 and cfg.auto_keys == {"train_micro_batch_size_per_gpu"}


def test_pipeline_stages_auto_is_accepted() -> None:
    cfg = load_config({"train_batch_size": 8, "pipeline": {"stages": "auto"}})
    assert cfg.pipeline.stages == "auto"


def test_checkpoint_tag_validation_accepts_deepspeeds_spelling() -> None:
    for value in ("WARN", "IGNORE", "FAIL"):
        parse_config({"checkpoint": {"tag_validation": value}})


# ---------------------------------------------------------------------------------------------
# Unknown and misspelt keys.
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("raw", "dotted", "suggestion"),
    [
        ({"zero_optimisation": {"stage": 2}}, "zero_optimisation", "zero_optimization"),
        ({"train_batch_sise": 8}, "train_batch_sise", "train_batch_size"),
        ({"gradient_acumulation_steps": 2}, "gradient_acumulation_steps", "gradient_accumulation_steps"),
        ({"zero_optimization": {"stage3_prefetch_bucket_sizee": 5e7}}, "zero_optimization.stage3_prefetch_bucket_sizee", "zero_optimization.stage3_prefetch_bucket_size"),
        ({"zero_optimization": {"stage3_max_live_parameter": 1e9}}, "zero_optimization.stage3_max_live_parameter", "zero_optimization.stage3_max_live_parameters"),
        ({"fp16": {"loss_scale_windw": 1000}}, "fp16.loss_scale_windw", "fp16.loss_scale_window"),
        ({"bfloat16": {"enabeld": True}}, "bfloat16.enabeld", "bfloat16.enabled"),
        ({"zero_optimization": {"offload_optimizer": {"devcie": "cpu"}}}, "zero_optimization.offload_optimizer.devcie", "zero_optimization.offload_optimizer.device"),
        ({"zero_optimization": {"offload_param": {"pin_memroy": True}}}, "zero_optimization.offload_param.pin_memroy", "zero_optimization.offload_param.pin_memory"),
        ({"aio": {"thread_cout": 2}}, "aio.thread_cout", "aio.thread_count"),
        ({"optimizer": {"type": "Adam", "parmas": {}}}, "optimizer.parmas", "optimizer.params"),
        ({"timers": {"throughput": {"enabeld": False}}}, "timers.throughput.enabeld", "timers.throughput.enabled"),
    ],
)
def test_unknown_key_names_dotted_path_and_closest_key(raw: dict[str, Any], dotted: str, suggestion: str) -> None:
    """DeepSpeed silently ignores a misspelt top-level key (issues #653, #774, #1809); here it fails,
    naming where it is and what was meant."""
    with pytest.raises(ConfigError) as err:
        parse_config(raw)
    assert f"`{dotted}` — did you mean `{suggestion}`?" in str(err.value)


def test_unknown_key_without_a_close_match_has_no_guess() -> None:
    with pytest.raises(ConfigError) as err:
        parse_config({"fp16": {"xyzzy": 1}})
    assert "`fp16.xyzzy`" in str(err.value) and "did you mean" not in str(err.value)


def test_every_unknown_key_is_reported_at_once() -> None:
    with pytest.raises(ConfigError) as err:
        parse_config({"zero_optimisation": {}, "fp16": {"enabledd": True}, "aio": {"queue_dept": 4}})
    for key in ("zero_optimisation", "fp16.enabledd", "aio.queue_dept"):
        assert f"`{key}`" in str(err.value)


def test_wrong_value_type_names_the_key() -> None:
    with pytest.raises(ConfigError, match=r"`zero_optimization\.offload_optimizer\.device`"):
        parse_config({"zero_optimization": {"offload_optimizer": {"device": "gpu"}}})
    with pytest.raises(ConfigError, match=r"`zero_optimization\.stage`"):
        parse_config({"zero_optimization": {"stage": 4}})


# ---------------------------------------------------------------------------------------------
# Sections recognised but not implemented; impossible combinations.
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("section", UNIMPLEMENTED_SECTIONS)
def test_unimplemented_section_parses_but_is_refused_when_enabled(section: str) -> None:
    """A DeepSpeed config carrying e.g. `elasticity` must parse (so its other errors are reported), and
    loading must refuse it when switched on rather than silently train without it."""
    raw = {"train_batch_size": 8, section: {"enabled": True, "some_option": 1}}
    assert getattr(parse_config(raw), section) == {"enabled": True, "some_option": 1}
    with pytest.raises(ConfigError, match=f"`{section}`"):
        load_config(raw)
    assert getattr(load_config({"train_batch_size": 8, section: {"enabled": False}}), section) == {"enabled": False}


def test_fp16_and_bf16_together_are_refused() -> None:
    with pytest.raises(ConfigError, match=r"`fp16\.enabled`.*`bf16\.enabled`"):
        load_config({"train_batch_size": 8, "fp16": {"enabled": True}, "bf16": {"enabled": True}})


# ---------------------------------------------------------------------------------------------
# The frozen key set and the generated docs.
# ---------------------------------------------------------------------------------------------

def accepted_config_keys(model: type[BaseModel] = ShardspeedConfig, prefix: str = "") -> list[str]:
    """Every dotted key the schema accepts: field names and aliases, recursively through sections."""
    keys: set[str] = set()
    for name, field in model.model_fields.items():
        spellings = {name} | {a for a in (field.alias, field.validation_alias) if isinstance(a, str)}
        section = _model_in(field.annotation)
        for spelling in spellings:
            keys.add(prefix + spelling)
            if section is not None:
                keys.update(accepted_config_keys(section, f"{prefix}{spelling}."))
    return sorted(keys)


def _write_keys() -> None:
    KEYS_FILE.write_text("\n".join(accepted_config_keys()) + "\n")
    print(f"wrote {len(accepted_config_keys())} keys to {KEYS_FILE}")


def test_accepted_key_set_is_frozen() -> None:
    """Adding, renaming or dropping a config key must be a deliberate, reviewed diff."""
    frozen = set(KEYS_FILE.read_text().split())
    current = set(accepted_config_keys())
    added, removed = sorted(current - frozen), sorted(frozen - current)
    assert not added and not removed, (
        "the accepted ds_config keys changed.\n"
        f"  added ({len(added)}): {', '.join(added) or '-'}\n"
        f"  removed ({len(removed)}): {', '.join(removed) or '-'}\n"
        "If that is intended, regenerate the frozen list and the docs and commit both:\n"
        "  python -m tests.unit.test_config --write-keys\n"
        "  python -m tools.gen_config_docs"
    )


def test_accepted_keys_file_is_sorted_one_per_line() -> None:
    lines = KEYS_FILE.read_text().splitlines()
    assert lines == sorted(set(lines)) and all(line and line == line.strip() for line in lines)


def test_validator_accepts_every_walked_key() -> None:
    """The walk agrees with the validator: no key it lists is reported as unknown (a probe value may
    well be rejected for its type; that is not what is checked)."""
    for dotted in accepted_config_keys():
        try:
            parse_config(_nest(dotted, "__probe__"))
        except ConfigError as err:
            assert f"unknown config key `{dotted}`" not in str(err), dotted


def test_docs_match_the_schema() -> None:
    """docs/config.md is generated from the Field descriptions; a schema edit without regenerating fails."""
    from tools.gen_config_docs import render

    expected = render()
    current = DOCS_FILE.read_text() if DOCS_FILE.is_file() else ""
    if current != expected:
        diff = "".join(itertools.islice(difflib.unified_diff(current.splitlines(True), expected.splitlines(True), "docs/config.md", "generated"), 40))
        pytest.fail(f"docs/config.md is stale; run `python -m tools.gen_config_docs` and commit it.\n{diff}")


def test_docs_mention_every_accepted_key() -> None:
    """Every field (by name) of every section appears in the generated reference."""
    text = DOCS_FILE.read_text()
    for dotted in accepted_config_keys():
        assert f"`{dotted.rsplit('.', 1)[-1]}`" in text, dotted


if __name__ == "__main__":
    if sys.argv[1:] == ["--write-keys"]:
        _write_keys()
    else:
        sys.exit("usage: python -m tests.unit.test_config --write-keys   (run the tests with pytest)")
