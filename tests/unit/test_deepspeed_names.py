"""DeepSpeed's public names that the guide and the Hugging Face integrations (transformers, accelerate,
peft) use: every one resolves under `shardspeed`, and those whose feature is not built yet raise a
NotImplementedError naming the feature when used (never an ImportError or AttributeError).

The lists come from the guide's examples (../shared/seed/deepspeed-guide.txt) and from reading every
`deepspeed` import and attribute in transformers 5.25 / accelerate 1.16 (notes/hf-integration.md).
Catches a DeepSpeed path that a refactor drops or a stub that starts failing differently.
"""
from __future__ import annotations

import importlib
from typing import Any

import pytest

import shardspeed
from shardspeed.config.unbuilt import NotBuiltError

BUILT: list[tuple[str, str]] = [
    # top level (guide §3-§13, REFERENCE §2.3)
    *[("", n) for n in ("initialize", "init_distributed", "add_config_arguments", "tp_model_init", "DeepSpeedEngine",
                        "DeepSpeedConfig", "PipelineEngine", "PipelineModule", "OnDevice", "zero", "checkpointing", "comm",
                        "pipe", "ops", "utils", "accelerator", "runtime", "__version__")],
    # ZeRO-3 (guide §5, §13.1; transformers modeling_utils, integrations/deepspeed)
    *[("zero", n) for n in ("Init", "GatheredParameters", "register_external_parameter", "unregister_external_parameter",
                            "OnDevice")],
    *[("runtime.zero", n) for n in ("Init", "GatheredParameters", "register_external_parameter")],
    *[("runtime.zero.partition_parameters", n) for n in ("Init", "GatheredParameters", "zero_wrapper_for_fp_tensor_constructor",
                                                         "_orig_torch_arange", "get_accelerator")],
    # activation checkpointing (guide §7)
    *[("runtime.activation_checkpointing.checkpointing", n) for n in ("configure", "checkpoint", "non_reentrant_checkpoint",
                                                                      "get_cuda_rng_tracker", "model_parallel_cuda_manual_seed",
                                                                      "is_configured", "reset")],
    *[("checkpointing", n) for n in ("configure", "checkpoint", "get_cuda_rng_tracker")],
    # pipeline (guide §6)
    *[("pipe", n) for n in ("PipelineModule", "LayerSpec", "TiedLayerSpec", "PipeDataParallelTopology", "ProcessTopology")],
    # deepspeed.comm (accelerate state.py, transformers integrations/deepspeed)
    *[("comm", n) for n in ("init_distributed", "is_initialized", "get_rank", "get_world_size", "get_local_rank", "barrier",
                            "all_reduce", "broadcast", "all_gather", "all_gather_into_tensor", "reduce_scatter_tensor",
                            "all_to_all_single", "new_group", "ReduceOp", "send", "recv", "isend", "irecv")],
    # optimizers (accelerate utils/deepspeed.map_pytorch_optim_to_deepspeed)
    ("ops.adam", "DeepSpeedCPUAdam"), ("ops.adam", "FusedAdam"), ("ops.adagrad", "DeepSpeedCPUAdagrad"),
    ("ops.lion", "DeepSpeedCPULion"),
    # schedules (accelerate Accelerator._prepare_deepspeed)
    *[("runtime.lr_schedules", n) for n in ("VALID_LR_SCHEDULES", "WarmupLR", "WarmupDecayLR", "WarmupCosineLR", "OneCycle",
                                            "LRRangeTest")],
    ("runtime.engine", "DeepSpeedEngine"),
    ("runtime.fp16.loss_scaler", "LossScaler"), ("runtime.fp16.loss_scaler", "DynamicLossScaler"),
    # checkpoints (accelerate get_state_dict; DeepSpeed's zero_to_fp32 under its old home)
    ("checkpoint.utils", "clone_tensors_for_torch_save"),
    *[("utils.zero_to_fp32", n) for n in ("get_fp32_state_dict_from_zero_checkpoint", "convert_zero_checkpoint_to_fp32_state_dict",
                                          "load_state_dict_from_zero_checkpoint")],
    # deepspeed.utils (transformers deepspeed_init, accelerate DeepSpeedPlugin.set_moe_leaf_modules)
    *[("utils", n) for n in ("logger", "is_initialized", "log_dist", "set_z3_leaf_modules", "unset_z3_leaf_modules", "get_z3_leaf_modules",
                             "z3_leaf_module", "groups")],
    # mixture of experts (guide §9; DeepSpeed's MoE tutorial)
    ("moe.layer", "MoE"),
    *[("moe.sharded_moe", n) for n in ("TopKGate", "MOELayer", "top1gating", "top2gating", "topkgating")],
    *[("moe.utils", n) for n in ("is_moe_param", "split_params_into_different_moe_groups_for_optimizer")],
    ("accelerator", "get_accelerator"),
    # the RLHF hybrid engine (guide §11)
    ("", "DeepSpeedHybridEngine"),
    ("runtime.hybrid_engine", "DeepSpeedHybridEngine"),
    # the inference engine (guide §10)
    *[("", n) for n in ("init_inference", "default_inference_config", "InferenceEngine")],
    ("inference.engine", "InferenceEngine"),
    ("inference.config", "DeepSpeedInferenceConfig"),
    # deepspeed.utils.groups (expert parallelism)
    *[("utils.groups", n) for n in ("_create_expert_and_data_parallel", "_get_expert_parallel_group",
                                     "_get_expert_data_parallel_group", "_get_expert_parallel_world_size",
                                     "_get_expert_parallel_rank", "_get_expert_data_parallel_world_size",
                                     "_get_expert_data_parallel_rank", "_get_expert_parallel_group_dict",
                                     "_get_expert_data_parallel_group_dict", "_get_max_expert_size",
                                     "_get_expert_broadcast_src_rank", "_get_data_parallel_group")],
    # the launcher (accelerate commands/launch.py, in the launcher process)
    ("launcher.runner", "DEEPSPEED_ENVIRONMENT_NAME"), ("launcher.runner", "main"),
    # observability (guide §13): FLOPs profiler, comms logger, ZeRO memory estimators
    *[("profiling.flops_profiler", n) for n in ("get_model_profile", "FlopsProfiler", "number_to_string", "macs_to_string",
                                                "flops_to_string", "params_to_string", "duration_to_string")],
    *[("comm", n) for n in ("log_summary", "configure", "reset_log", "has_comm_data", "get_comm_operation_count",
                            "get_logged_comm_ops", "comms_logger")],
    *[("runtime.zero.stage_1_and_2", n) for n in ("estimate_zero2_model_states_mem_needs_all_live",
                                                  "estimate_zero2_model_states_mem_needs_all_cold",
                                                  "estimate_zero2_model_states_mem_needs", "model_to_params")],
    *[("runtime.zero.stage3", n) for n in ("estimate_zero3_model_states_mem_needs_all_live",
                                           "estimate_zero3_model_states_mem_needs_all_cold",
                                           "estimate_zero3_model_states_mem_needs", "model_to_params")],
]

# (module, name, words the NotImplementedError must contain)
UNBUILT: list[tuple[str, str, str]] = [
    ("utils.groups", "_get_sequence_parallel_group", "sequence parallelism"),
    ("runtime.sequence_parallel.ulysses_sp", "UlyssesSPAttentionHF", "sequence parallelism"),
    ("runtime.sequence_parallel.ulysses_sp", "UlyssesSPDataLoaderAdapter", "sequence parallelism"),
]


def _resolve(module: str, name: str) -> Any:
    owner = importlib.import_module(f"shardspeed.{module}") if module else shardspeed
    return getattr(owner, name)


@pytest.mark.parametrize("module,name", BUILT, ids=[f"{m}:{n}" for m, n in BUILT])
def test_built_name_resolves(module: str, name: str) -> None:
    value = _resolve(module, name)
    assert value is not None
    assert not getattr(value, "__doc__", "") or "not supported yet" not in (value.__doc__ or ""), "a stub among the built names"


@pytest.mark.parametrize("module,name,feature", UNBUILT, ids=[f"{m}:{n}" for m, n, _ in UNBUILT])
def test_unbuilt_name_resolves_and_refuses_naming_the_feature(module: str, name: str, feature: str) -> None:
    value = _resolve(module, name)
    with pytest.raises(NotImplementedError, match="not supported yet") as err:
        value(None)
    assert isinstance(err.value, NotBuiltError)
    assert feature in str(err.value) and name in str(err.value)


def test_accelerator_answers_the_device_questions_libraries_ask() -> None:
    acc = shardspeed.accelerator.get_accelerator()
    assert acc.current_device_name() in ("cpu", "cuda:0") and acc.communication_backend_name() in ("gloo", "nccl")
    assert acc.device_name(0) in ("cpu", "cuda:0")


def test_on_device_builds_on_the_meta_device_with_the_dtype() -> None:
    import torch

    with shardspeed.OnDevice(dtype=torch.bfloat16, device="meta"):
        layer = torch.nn.Linear(4, 4)
    assert layer.weight.device.type == "meta" and layer.weight.dtype == torch.bfloat16
    assert torch.get_default_dtype() == torch.float32 and torch.empty(1).device.type == "cpu"


def test_set_z3_leaf_modules_marks_and_unmarks() -> None:
    import torch

    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Sequential(torch.nn.Linear(2, 2)))
    marked = shardspeed.utils.set_z3_leaf_modules(model, [torch.nn.Sequential])
    assert marked == [model, model[1]] and shardspeed.utils.get_z3_leaf_modules(model) == marked
    shardspeed.utils.unset_z3_leaf_modules(model, ["Sequential"])
    assert shardspeed.utils.get_z3_leaf_modules(model) == []
    with pytest.raises(ValueError, match="Embedding"):
        shardspeed.utils.set_z3_leaf_modules(model, [torch.nn.Embedding])
