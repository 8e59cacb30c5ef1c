"""DeepSpeed's ZeRO-2 and ZeRO-3 model-state memory estimators: the same names, arguments, numbers and
printed tables as DeepSpeed 0.19.8 (under `shardspeed.runtime.zero.stage_1_and_2` and `.stage3`).

They count model states only: 16-bit parameters (2 bytes each) and what ZeRO partitions, DeepSpeed's
"18" bytes per parameter (16-bit and fp32 gradients 2 + 4, fp32 master weights 4, Adam's two moments 8),
with `additional_buffer_factor` on the host. No activations, no communication buckets, no pinned swap
buffers: see docs/observability.md for what they leave out.

Where shardspeed's counting differs from DeepSpeed's for the same model (not for the same numbers):
- a parameter partitioned by shardspeed's ZeRO-3 (or built under `zero.Init`) counts its whole size
  (`ds_numel`), where DeepSpeed's `p.numel()` sees the empty local tensor;
- parameters on the meta device are told apart by identity, where DeepSpeed's `data_ptr()` is 0 for
  all of them and counts only one.
Shared parameters count once, as DeepSpeed's do.
"""
from __future__ import annotations

import torch

GiB = 2 ** 30


def _numel(p: torch.Tensor) -> int:
    return int(getattr(p, "ds_numel", p.numel()))


def _total_params(model: torch.nn.Module) -> int:
    """Parameters counted once each: the same Parameter (tied weights) or the same storage start."""
    seen: dict[object, int] = {}
    for p in model.parameters():
        key = id(p) if p.device.type == "meta" or p.data_ptr() == 0 else p.data_ptr()
        seen[key] = _numel(p)
    return sum(seen.values())


def _largest_layer_params(model: torch.nn.Module) -> int:
    """The most parameters any one module owns directly (not counting its children's)."""
    return max((sum(_numel(p) for p in m.parameters(recurse=False)) for m in model.modules()), default=0)


def _setup_lines(total_params: int, num_gpus_per_node: int, num_nodes: int, largest: int | None) -> None:
    nodes = "nodes" if num_nodes > 1 else "node"
    gpus = "GPUs" if num_gpus_per_node > 1 else "GPU"
    model = f"{int(total_params / 1e6)}M total params"
    if largest is not None:
        model += f", {int(largest / 1e6)}M largest layer params"
    print("Estimated memory needed for params, optim states and gradients for a:\n"
          f"HW: Setup with {num_nodes} {nodes}, {num_gpus_per_node} {gpus} per node.\n"
          f"SW: Model with {model}.")
    print("  per CPU  |  per GPU |   Options")


def _row(cpu_bytes: int, gpu_bytes: int, options: str) -> None:
    print(f" {cpu_bytes / GiB:7.2f}GB | {gpu_bytes / GiB:6.2f}GB | {options}")


def _device(on_cpu: bool) -> str:
    return "cpu " if on_cpu else "none"  # DeepSpeed pads the enum's "cpu" to four characters


# ---- ZeRO-2 (deepspeed.runtime.zero.stage_1_and_2) ------------------------------------------------------
def estimate_zero2_model_states_mem_needs(total_params: int, num_gpus_per_node: int = 1, num_nodes: int = 1,
                                          cpu_offload: bool = True, additional_buffer_factor: float = 1.5) -> tuple[int, int]:
    """(host bytes, GPU bytes) per rank for ZeRO-2 with or without the optimizer offloaded to the CPU.

    Without offload each GPU holds the 16-bit parameters (2 bytes each) and 1/N of 18 bytes per
    parameter; the host holds one fp32 copy per GPU of the node while loading. With offload the GPU
    holds the 16-bit parameters and the host max(4 x GPUs, 16) bytes per parameter.
    """
    gpus = num_nodes * num_gpus_per_node
    if cpu_offload:
        gpu = 2 * total_params
        cpu = total_params * max(4 * gpus, 16) * additional_buffer_factor
    else:
        gpu = 2 * total_params + int(18 * total_params / gpus)
        cpu = total_params * 4 * num_gpus_per_node * additional_buffer_factor
    return int(cpu), int(gpu)


def zero2_model_to_params(model: torch.nn.Module) -> int:
    """DeepSpeed's stage_1_and_2 `model_to_params`: the model's parameter count, shared ones once."""
    return _total_params(model)


def estimate_zero2_model_states_mem_needs_all_live(model: torch.nn.Module, num_gpus_per_node: int = 1, num_nodes: int = 1,
                                                   additional_buffer_factor: float = 1.5) -> None:
    """Print the ZeRO-2 table for a model you have (its parameters counted for you)."""
    estimate_zero2_model_states_mem_needs_all_cold(zero2_model_to_params(model), num_gpus_per_node, num_nodes,
                                                   additional_buffer_factor)


def estimate_zero2_model_states_mem_needs_all_cold(total_params: int, num_gpus_per_node: int = 1, num_nodes: int = 1,
                                                   additional_buffer_factor: float = 1.5) -> None:
    """Print the ZeRO-2 table for a model of `total_params` parameters: host and GPU bytes per rank,
    with and without `offload_optimizer`."""
    _setup_lines(total_params, num_gpus_per_node, num_nodes, None)
    for cpu_offload in (True, False):
        cpu, gpu = estimate_zero2_model_states_mem_needs(total_params, num_gpus_per_node, num_nodes, cpu_offload,
                                                         additional_buffer_factor)
        _row(cpu, gpu, f"offload_optimizer={_device(cpu_offload)}")


# ---- ZeRO-3 (deepspeed.runtime.zero.stage3) ---------------------------------------------------------------
def estimate_zero3_model_states_mem_needs(total_params: int, largest_layer_params: int, num_gpus_per_node: int = 1,
                                          num_nodes: int = 1, cpu_offload: bool = True, cpu_offload_params: bool = True,
                                          zero_init: bool = True, additional_buffer_factor: float = 1.5) -> tuple[int, int, int]:
    """(host bytes, GPU bytes, largest layer's bytes) per rank for ZeRO-3 with the given offloads.

    The GPU always holds 4 bytes per parameter of the largest layer (gathered 16-bit parameters and
    gradients); besides, without offload 1/N of 18 bytes per parameter, with only the optimizer
    offloaded 1/N of the 16-bit parameters. The host holds 18 (parameters offloaded) or 16 bytes per parameter per node,
    and, without `zero.Init` (`zero_init=False`), at least an fp32 copy per GPU of the node while loading.
    """
    gpus = num_nodes * num_gpus_per_node
    per_node = 1 / num_nodes
    largest = 4 * largest_layer_params
    loading = 4 * num_gpus_per_node  # bytes per parameter: each GPU's process loads the whole fp32 model
    if cpu_offload and cpu_offload_params:
        gpu = largest
        cpu = total_params * (18 * per_node if zero_init else max(loading, 18 * per_node)) * additional_buffer_factor
    elif cpu_offload:
        gpu = largest + int(2 * total_params / gpus)
        cpu = total_params * (16 * per_node if zero_init else max(loading, 16 * per_node)) * additional_buffer_factor
    else:
        gpu = largest + int(18 * total_params / gpus)
        cpu = (largest_layer_params if zero_init else total_params) * loading * additional_buffer_factor
    return int(cpu), int(gpu), largest


def zero3_model_to_params(model: torch.nn.Module) -> tuple[int, int]:
    """DeepSpeed's stage3 `model_to_params`: (parameter count with shared ones once, largest layer's count)."""
    return _total_params(model), _largest_layer_params(model)


def estimate_zero3_model_states_mem_needs_all_live(model: torch.nn.Module, num_gpus_per_node: int = 1, num_nodes: int = 1,
                                                   additional_buffer_factor: float = 1.5) -> None:
    """Print the ZeRO-3 table for a model you have (its parameters and largest layer counted for you)."""
    total, largest = zero3_model_to_params(model)
    estimate_zero3_model_states_mem_needs_all_cold(total, largest, num_gpus_per_node, num_nodes, additional_buffer_factor)


def estimate_zero3_model_states_mem_needs_all_cold(total_params: int, largest_layer_params: int, num_gpus_per_node: int = 1,
                                                   num_nodes: int = 1, additional_buffer_factor: float = 1.5) -> None:
    """Print the ZeRO-3 table for a model of `total_params` parameters whose largest layer has
    `largest_layer_params`: host and GPU bytes per rank for each offload choice, with and without zero.Init."""
    _setup_lines(total_params, num_gpus_per_node, num_nodes, largest_layer_params)
    for cpu_offload, cpu_offload_params in ((True, True), (True, False), (False, False)):
        for zero_init in (True, False):
            cpu, gpu, _ = estimate_zero3_model_states_mem_needs(total_params, largest_layer_params, num_gpus_per_node,
                                                                num_nodes, cpu_offload, cpu_offload_params, zero_init,
                                                                additional_buffer_factor)
            _row(cpu, gpu, f"offload_param={_device(cpu_offload_params)}, offload_optimizer={_device(cpu_offload)}, "
                           f"zero_init={int(zero_init)}")
