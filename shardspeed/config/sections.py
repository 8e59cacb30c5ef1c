"""Typed models of the ds_config sections, with DeepSpeed 0.19's defaults.

Each field's description is the user-facing documentation of that key. Where DeepSpeed's docs and
source disagree on a default, the source wins (that is what DeepSpeed users actually get).
"""
from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field, PrivateAttr, field_validator, model_validator

from .base import Int, StrictModel


# DeepSpeed's default stage-3 leaf modules: MoE blocks whose experts run data-dependently.
DEFAULT_LEAF_CLASSES = (
    "transformers.models.mixtral.modeling_mixtral.MixtralSparseMoeBlock",
    "transformers.models.qwen2_moe.modeling_qwen2_moe.Qwen2MoeSparseMoeBlock",
    "transformers.models.qwen3_moe.modeling_qwen3_moe.Qwen3MoeSparseMoeBlock",
)


class FP16Config(StrictModel):
    enabled: bool = Field(default=False, description="Train with fp16 parameters and dynamic/static loss scaling.")
    auto_cast: bool = Field(default=False, description="Cast floating-point inputs of forward to fp16.")
    loss_scale: float = Field(default=0.0, ge=0, description="0 selects dynamic loss scaling; any other value is a static scale.")
    initial_scale_power: Int = Field(default=16, ge=0, description="The dynamic scale starts at 2**initial_scale_power.")
    loss_scale_window: Int = Field(default=1000, ge=1, description="Overflow-free steps before the dynamic scale doubles.")
    hysteresis: Int = Field(default=2, ge=1, description="Overflows tolerated before the dynamic scale is lowered.")
    consecutive_hysteresis: bool = Field(default=False, description="Refill hysteresis after every overflow-free step.")
    min_loss_scale: float = Field(default=1.0, gt=0, description="The dynamic scale never drops below this.")
    fp16_master_weights_and_grads: bool = Field(default=False, description="Keep master weights in fp16 (ZeRO offload only).")


class BF16Config(StrictModel):
    enabled: bool = Field(default=False, description="Train with bf16 parameters and fp32 master weights.")
    immediate_grad_update: bool = Field(default=False, description="Accumulate gradients into fp32 as soon as they are produced.")
    check_grad_overflow: bool = Field(default=True, description="Check bf16 gradients for inf/nan and skip such steps.")
    bf16_master_weights_and_grads: bool = Field(default=False, description="Keep master weights and gradients in bf16.")
    bf16_optimizer_states: bool = Field(default=False, description="Keep optimizer states in bf16.")


class OffloadOptimizerConfig(StrictModel):
    device: Literal["none", "cpu", "nvme"] = Field(default="none", description="Where the optimizer states live.")
    nvme_path: str | None = Field(default=None, description="Folder for optimizer swap files when device is nvme.")
    buffer_count: Int = Field(default=4, description="Swap buffers for optimizer states.")
    pin_memory: bool = Field(default=True, description="Use page-locked host memory (needs a memlock budget).")
    pipeline_read: bool = Field(default=False, description="Overlap swap-in reads with the optimizer step.")
    pipeline_write: bool = Field(default=False, description="Overlap swap-out writes with the optimizer step.")
    fast_init: bool = Field(default=False, description="Skip the swap-file pre-write at start-up.")
    ratio: float = Field(default=1.0, description="Fraction of optimizer states offloaded (stage 3 only below 1).")
    super_offload: bool = Field(default=False, description="DeepSpeed's SuperOffload mode.")
    cpuadam_cores_perc: float = Field(default=0.8, description="Fraction of host cores the CPU optimizer may use.")


class OffloadParamConfig(StrictModel):
    device: Literal["none", "cpu", "nvme"] = Field(default="none", description="Where stage-3 parameter partitions live.")
    nvme_path: str | None = Field(default=None, description="Folder for parameter swap files when device is nvme.")
    buffer_count: Int = Field(default=5, description="Swap buffers for parameters.")
    buffer_size: Int = Field(default=100_000_000, description="Elements per parameter swap buffer.")
    max_in_cpu: Int = Field(default=1_000_000_000, description="Elements kept in host memory when swapping to nvme.")
    pin_memory: bool = Field(default=True, description="Use page-locked host memory (needs a memlock budget).")


class ZeroConfig(StrictModel):
    stage: Literal[0, 1, 2, 3] = Field(default=0, description="0: data parallel; 1: optimizer states; 2: + gradients; 3: + parameters partitioned.")
    contiguous_gradients: bool = Field(default=True, description="Copy reduced gradients into one contiguous buffer.")
    reduce_scatter: bool = Field(default=True, description="Reduce gradients with reduce-scatter (false: all-reduce).")
    reduce_bucket_size: Int = Field(default=500_000_000, description="Elements reduced at once; also the stage-0 all-reduce bucket.")
    use_multi_rank_bucket_allreduce: bool = Field(default=True, description="DeepSpeed knob, accepted for compatibility.")
    allgather_partitions: bool = Field(default=True, description="All-gather updated partitions (false: broadcast).")
    allgather_bucket_size: Int = Field(default=500_000_000, description="Elements all-gathered at once.")
    overlap_comm: bool | None = Field(default=None, description="Overlap gradient reduction with backward; default true for stage 3, else false.")
    load_from_fp32_weights: bool = Field(default=True, description="Restore master weights from the fp32 copy in checkpoints.")
    elastic_checkpoint: bool = Field(default=False, description="Deprecated DeepSpeed key, accepted.")
    offload_param: OffloadParamConfig | None = Field(default=None, description="Stage-3 parameter offload.")
    offload_optimizer: OffloadOptimizerConfig | None = Field(default=None, description="Optimizer state offload.")
    zenflow: dict[str, Any] | None = Field(default=None, description="DeepSpeed ZenFlow; not supported.")
    sub_group_size: Int = Field(default=1_000_000_000, description="Elements per optimizer sub-group (offload pipelining).")
    cpu_offload: bool | None = Field(default=None, description="Deprecated: use offload_optimizer.device=cpu.")
    cpu_offload_param: bool | None = Field(default=None, description="Deprecated: use offload_param.device=cpu.")
    cpu_offload_use_pin_memory: bool | None = Field(default=None, description="Deprecated: use offload_*.pin_memory.")
    prefetch_bucket_size: Int = Field(default=50_000_000, alias="stage3_prefetch_bucket_size", description="Stage 3: elements prefetched ahead of use.")
    param_persistence_threshold: Int = Field(default=100_000, alias="stage3_param_persistence_threshold", description="Stage 3: parameters of at most this many elements stay whole.")
    model_persistence_threshold: Int = Field(default=2**63 - 1, alias="stage3_model_persistence_threshold", description="Stage 3: cap on elements kept whole.")
    max_live_parameters: Int = Field(default=1_000_000_000, alias="stage3_max_live_parameters", description="Stage 3: most elements gathered at once.")
    max_reuse_distance: Int = Field(default=1_000_000_000, alias="stage3_max_reuse_distance", description="Stage 3: keep a parameter gathered if reused within this many elements.")
    gather_16bit_weights_on_model_save: bool = Field(default=False, alias="stage3_gather_16bit_weights_on_model_save", description="Stage 3: consolidate 16-bit weights in save_16bit_model.")
    stage3_gather_fp16_weights_on_model_save: bool | None = Field(default=None, description="Deprecated spelling of stage3_gather_16bit_weights_on_model_save.")
    module_granularity_threshold: Int = Field(default=0, alias="stage3_module_granularity_threshold", description="Stage 3: fuse small modules into one fetch unit.")
    use_all_reduce_for_fetch_params: bool = Field(default=False, alias="stage3_use_all_reduce_for_fetch_params", description="Stage 3: fetch with all-reduce.")
    allgather_sequential: bool = Field(default=False, alias="stage3_allgather_sequential", description="Stage 3: gather parameters one by one.")
    ignore_unused_parameters: bool = Field(default=True, description="Parameters without gradients are allowed.")
    compute_grad_norm: bool = Field(default=True, description="Compute the global gradient norm each step (false only with stages 1-2 and no clipping).")
    parameter_alignment: bool = Field(default=False, description="Align parameter partitions to the communication granularity.")
    legacy_stage1: bool = Field(default=False, description="DeepSpeed knob, accepted for compatibility.")
    round_robin_gradients: bool = Field(default=False, description="Stage 1/2: round-robin gradient copies.")
    zero_hpz_partition_size: Int = Field(default=1, description="ZeRO++ hierarchical partitioning.")
    zero_quantized_weights: bool = Field(default=False, description="ZeRO++ quantized weights.")
    zero_quantized_nontrainable_weights: bool = Field(default=False, description="ZeRO++ quantized frozen weights.")
    zero_quantized_gradients: bool = Field(default=False, description="ZeRO++ quantized gradients.")
    zeropp_loco_param: dict[str, Any] | None = Field(default=None, description="ZeRO++ LoCo error feedback.")
    mics_shard_size: Int = Field(default=-1, description="MiCS shard size.")
    mics_hierarchical_params_gather: bool = Field(default=False, description="MiCS hierarchical gather.")
    memory_efficient_linear: bool = Field(default=True, description="Stage 3 memory-efficient linear.")
    pipeline_loading_checkpoint: bool = Field(default=False, description="Pipeline checkpoint loading.")
    override_module_apply: bool = Field(default=True, description="Stage 3: gather parameters inside module.apply.")
    log_trace_cache_warnings: bool = Field(default=False, description="Stage 3: warn when the prefetch trace is invalidated.")
    enable_sanity_checks: bool = Field(default=False, description="Stage 3 sanity checks.")
    save_muon_momentum_buffer_in_memory: bool = Field(default=False, description="Muon optimizer knob.")
    auto_memory_budget: Int | None = Field(default=None, description='shardspeed: bytes per rank that `stage` / `offload_optimizer` "auto" must fit (default: the accelerator\'s memory; on a CPU machine the available host memory / ranks per node).')
    leaf_module: dict[str, Any] = Field(
        default_factory=lambda: {"classes": list(DEFAULT_LEAF_CLASSES), "names": [], "name_suffixes": []},
        description="Stage 3: modules fetched whole instead of per submodule (classes, names, name_suffixes).",
    )

    @model_validator(mode="after")
    def _map_deprecated(self) -> "ZeroConfig":
        # DeepSpeed maps its old boolean offload keys onto the offload sections; so do we.
        if self.cpu_offload and self.offload_optimizer is None:
            self.offload_optimizer = OffloadOptimizerConfig(device="cpu", pin_memory=bool(self.cpu_offload_use_pin_memory))
        if self.cpu_offload_param and self.offload_param is None:
            self.offload_param = OffloadParamConfig(device="cpu", pin_memory=bool(self.cpu_offload_use_pin_memory))
        if self.stage3_gather_fp16_weights_on_model_save is not None:
            self.gather_16bit_weights_on_model_save = self.stage3_gather_fp16_weights_on_model_save
        return self

    @property
    def overlap_comm_resolved(self) -> bool:
        """DeepSpeed's rule: unset means on for stage 3 and off otherwise."""
        return self.overlap_comm if self.overlap_comm is not None else self.stage == 3


class AioConfig(StrictModel):
    block_size: Int = Field(default=1_048_576, description="Bytes per asynchronous I/O request.")
    queue_depth: Int = Field(default=8, description="Outstanding I/O requests.")
    intra_op_parallelism: Int = Field(default=1, alias="thread_count", description="I/O threads (DeepSpeed's docs call it thread_count).")
    single_submit: bool = Field(default=False, description="Submit requests one at a time.")
    overlap_events: bool = Field(default=True, description="Overlap submission and completion.")
    use_gds: bool = Field(default=False, description="GPUDirect Storage.")


class OptimizerConfig(StrictModel):
    type: str = Field(..., description="Adam, AdamW, SGD, Adagrad, Lamb, Lion, or any torch.optim class name.")
    params: dict[str, Any] = Field(default_factory=dict, description="Keyword arguments of the optimizer.")
    legacy_fusion: bool = Field(default=False, description="DeepSpeed knob, accepted for compatibility.")


class SchedulerConfig(StrictModel):
    type: str = Field(..., description="LRRangeTest, OneCycle, WarmupLR, WarmupDecayLR or WarmupCosineLR.")
    params: dict[str, Any] = Field(default_factory=dict, description="Keyword arguments of the schedule.")


class ActivationCheckpointingConfig(StrictModel):
    partition_activations: bool = Field(default=False, description="Split saved inputs across the tensor-parallel group.")
    contiguous_memory_optimization: bool = Field(default=False, description="Copy checkpoints into one contiguous buffer.")
    cpu_checkpointing: bool = Field(default=False, description="Move saved inputs to host memory.")
    number_checkpoints: Int | None = Field(default=None, description="Checkpoints per forward (for contiguous buffers).")
    synchronize_checkpoint_boundary: bool = Field(default=False, description="Synchronize the device at each checkpoint.")
    profile: bool = Field(default=False, description="Time the checkpointed forward and recompute.")


class PipelineConfig(StrictModel):
    stages: Int | Literal["auto"] = Field(default="auto", description="Pipeline stages.")
    partition: str = Field(default="best", description="Layer partition method.")
    seed_layers: bool = Field(default=False, description="Seed each layer's initialisation by its index.")
    activation_checkpoint_interval: Int = Field(default=0, description="Checkpoint every N layers (0: off).")
    pipe_partitioned: bool = Field(default=True, description="Partition activations sent between stages.")
    grad_partitioned: bool = Field(default=True, description="Partition gradients sent between stages.")
    use_reentrant: bool = Field(default=True, description="Reentrant activation checkpointing in the pipeline.")
    schedule: Literal["1f1b", "gpipe"] = Field(default="1f1b", description="shardspeed: the pipeline schedule, 1F1B or GPipe (all forwards, then all backwards).")


class TensorParallelConfig(StrictModel):
    autotp_size: Int = Field(default=0, alias="tp_size", description="Tensor-parallel degree for automatic sharding (0 or 1: off).")
    mpu: Any = Field(default=None, description="A Megatron-style model-parallel unit.")
    tp_grain_size: Int = Field(default=64, description="Shard sizes are multiples of this.")
    tp_overlap_comm: bool = Field(default=False, description="Overlap tensor-parallel communication.")
    preset_model: str | None = Field(default=None, description="Sharding preset for a known model family.")
    partition_config: dict[str, Any] | None = Field(default=None, description="Custom layer sharding specs.")
    _size_key: str = PrivateAttr(default="autotp_size")

    @model_validator(mode="wrap")
    @classmethod
    def _remember_spelling(cls, data: Any, handler: Any) -> "TensorParallelConfig":
        # Errors about the size name the key the user wrote (DeepSpeed accepts both).
        model = handler(data)
        if isinstance(data, dict) and "tp_size" in data and "autotp_size" not in data:
            model._size_key = "tp_size"
        return model

    @property
    def size_key(self) -> str:
        """`tensor_parallel.autotp_size` or `tensor_parallel.tp_size`, as written."""
        return f"tensor_parallel.{self._size_key}"


class ExpertParallelConfig(StrictModel):
    """DeepSpeed's `expert_parallel` (AutoEP) section: Hugging Face MoE blocks with fused 3-D experts split
    over `autoep_size` ranks. shardspeed keeps the model's own router (its routing, weights and aux loss
    are unchanged); keys that would change routing or kernels are accepted at their defaults only."""

    enabled: bool = Field(default=False, description="Split the experts of Hugging Face MoE blocks over ranks.")
    autoep_size: Int = Field(default=1, ge=1, description="Expert-parallel degree (ranks sharing one set of experts).")
    expert_tensor_parallel_size: Int = Field(default=1, ge=1, description="Tensor parallelism inside experts (1 only).")
    validate_folding_routing: bool = Field(default=False, description="DeepSpeed consistency check; nothing to check here.")
    async_split_plan: bool = Field(default=False, description="DeepSpeed kernel option; no effect.")
    preset_model: str | None = Field(default=None, description="mixtral, qwen3_moe, qwen2_moe, olmoe: checked against the model.")
    moe_layer_pattern: str | None = Field(default=None, description="Regex of MoE block names (default: every fused-expert block).")
    expert_pattern: str | None = Field(default=None, description="Child name of the experts (default: experts).")
    router_pattern: str | None = Field(default=None, description="Child name of the router (default: gate).")
    use_grouped_mm: bool = Field(default=True, description="torch._grouped_mm where available; a per-expert loop otherwise.")
    disable_triton_grouped_mm: bool = Field(default=False, description="DeepSpeed kernel option; no effect.")
    route_norm: bool | None = Field(default=None, description="Routing override: the model's own only (null).")
    route_scale: float = Field(default=1.0, description="Routing override: 1.0 only.")
    score_apply: str = Field(default="auto", description="Routing override: auto only.")
    combine_impl: str = Field(default="auto", description="auto or weighted_sum (the same sum).")
    row_weighting_impl: str = Field(default="auto", description="DeepSpeed kernel option; no effect.")
    gate_up_impl: str = Field(default="separate", description="DeepSpeed kernel option; no effect.")
    comm_backend: str = Field(default="comm", description="torch.distributed all-to-all-v (comm) only.")
    comm_num_sm: Int = Field(default=12, description="DeepSpeed kernel option; no effect.")
    comm_qp_margin: Int = Field(default=4, description="DeepSpeed kernel option; no effect.")
    comm_max_tokens_per_rank: Int = Field(default=0, description="DeepSpeed kernel option; no effect.")
    num_expert_groups: Int | None = Field(default=None, description="Routing override: null only.")
    num_limited_groups: Int | None = Field(default=None, description="Routing override: null only.")
    score_func: str = Field(default="auto", description="Routing override: auto only.")
    top_k: Int | str = Field(default="auto", description="Routing override: auto or the model's own top-k.")
    load_balance_coeff: float | None = Field(default=None, description="null only (as DeepSpeed).")
    routed_scaling_factor: float | str = Field(default="auto", description="Routing override: auto only.")
    expert_w1: str | None = Field(default=None, description="Expert weight names: the fused gate_up_proj/down_proj only.")
    expert_w2: str | None = Field(default=None, description="Expert weight names: the fused gate_up_proj/down_proj only.")
    expert_w3: str | None = Field(default=None, description="Expert weight names: the fused gate_up_proj/down_proj only.")
    num_experts_attr: str | None = Field(default=None, description="Attribute holding the expert count (default: num_experts).")
    top_k_attr: str | None = Field(default=None, description="Attribute holding top-k (default: the router's top_k).")
    has_shared_experts: bool | None = Field(default=None, description="Shared experts stay dense (replicated).")
    shared_experts_pattern: str | None = Field(default=None, description="Shared experts stay dense (replicated).")
    shared_experts_gate_pattern: str | None = Field(default=None, description="Shared experts stay dense (replicated).")
    expert_activation: str | None = Field(default=None, description="Default: the model's own activation.")

    # Keys that would change the model's routing or experts, and the values that leave them alone.
    NEUTRAL: ClassVar[dict[str, tuple[Any, ...]]] = {
        "expert_tensor_parallel_size": (1,), "route_norm": (None,), "route_scale": (1.0,), "score_apply": ("auto",),
        "combine_impl": ("auto", "weighted_sum"), "comm_backend": ("comm",), "num_expert_groups": (None,),
        "num_limited_groups": (None,), "score_func": ("auto",), "load_balance_coeff": (None,),
        "routed_scaling_factor": ("auto",), "expert_w1": (None,), "expert_w2": (None,), "expert_w3": (None,),
        "expert_activation": (None,),
    }


class HybridEngineConfig(StrictModel):
    """DeepSpeed's `hybrid_engine` section (RLHF: one engine that trains and generates)."""

    enabled: bool = Field(default=False, description="initialize returns a DeepSpeedHybridEngine whose generate is fast under ZeRO-3.")
    max_out_tokens: Int = Field(default=512, ge=1, description="Longest sequence (prompt + new tokens) generate may produce.")
    inference_tp_size: Int = Field(default=1, ge=1, description="Tensor parallelism while generating (1 only, for now).")
    release_inference_cache: bool = Field(default=False, description="Free generation buffers after each generate (nothing is kept here).")
    pin_parameters: bool = Field(default=True, description="ZeRO-3: gather every parameter once per generate call, no collective while decoding.")
    tp_gather_partition_size: Int = Field(default=8, ge=1, description="DeepSpeed's gather granularity for inference_tp_size > 1 (unused).")


class MoEConfig(StrictModel):
    enabled: bool = Field(default=False, description="Mixture-of-experts training.")
    ep_size: Int = Field(default=1, description="Expert-parallel degree.")
    moe_param_group: bool = Field(default=False, description="Split expert parameters into their own groups.")


class TensorBoardConfig(StrictModel):
    enabled: bool = Field(default=False, description="Write TensorBoard events on rank 0.")
    output_path: str = Field(default="", description="Folder for event files; they go to <output_path>/<job_name> (default: ./<job_name>).")
    job_name: str = Field(default="DeepSpeedJobName", description="Sub-folder named for this job.")


class CSVMonitorConfig(StrictModel):
    enabled: bool = Field(default=False, description="Write one CSV per metric on rank 0.")
    output_path: str = Field(default="", description="Folder for CSV files.")
    job_name: str = Field(default="DeepSpeedJobName", description="Sub-folder named for this job.")


class WandbConfig(StrictModel):
    enabled: bool = Field(default=False, description="Log to Weights & Biases on rank 0 (WANDB_MODE=offline works).")
    group: str | None = Field(default=None, description="W&B run group.")
    team: str | None = Field(default=None, description="W&B entity.")
    project: str = Field(default="deepspeed", description="W&B project.")


class CometConfig(StrictModel):
    enabled: bool = Field(default=False, description="Log to Comet; not supported.")
    samples_log_interval: Int = 100
    project: str | None = None
    workspace: str | None = None
    api_key: str | None = None
    experiment_name: str | None = None
    experiment_key: str | None = None
    online: bool | None = None
    mode: str | None = None


class FlopsProfilerConfig(StrictModel):
    enabled: bool = Field(default=False, description="Profile one optimizer step on rank 0 and print it (docs/observability.md).")
    recompute_fwd_factor: float = Field(default=0.0, description="Share of the forward recomputed in backward (activation checkpointing: 1.0), for the step's FLOPs.")
    profile_step: Int = Field(default=1, description="Profile the step taken when this many optimizer steps are done (1: the second step).")
    module_depth: Int = Field(default=-1, description="Deepest module level in the aggregated profile (-1: all).")
    top_modules: Int = Field(default=1, description="Module classes listed per level in the aggregated profile.")
    detailed: bool = Field(default=True, description="Print the per-module tree.")
    output_file: str | None = Field(default=None, description="Write the profile to this file instead of stdout.")


class CommsLoggerConfig(StrictModel):
    enabled: bool = Field(default=False, description="Time every collective from initialize on; `shardspeed.comm.log_summary()` prints them.")
    prof_all: bool = Field(default=True, description="Log every kind of collective (off: only those in prof_ops).")
    prof_ops: list[str] = Field(default_factory=list, description='Collectives to log when prof_all is off (e.g. ["all_reduce"]).')
    verbose: bool = Field(default=False, description="Also print each collective as it completes (rank 0).")
    debug: bool = Field(default=False, description="Log each collective under its name and the function that called it.")


class CheckpointConfig(StrictModel):
    tag_validation: Literal["WARN", "IGNORE", "FAIL"] = Field(default="WARN", description="Check that all ranks save under the same tag (any case).")
    _upper = field_validator("tag_validation", mode="before")(lambda v: v.upper() if isinstance(v, str) else v)
    load_universal: bool = False
    use_node_local_storage: bool = False
    parallel_write: dict[str, Any] = Field(default_factory=lambda: {"pipeline_stage": False})


class DataTypesConfig(StrictModel):
    grad_accum_dtype: Literal["fp32", "fp16", "bf16"] | None = Field(default=None, description="Dtype of accumulated gradients.")
    keep_in_fp32_modules: Literal["auto"] | list[str] = Field(default="auto", description='Module name patterns kept in fp32 ("auto": the model\'s own list).')
    param_dtype: str | None = None
    buffer_dtype: str | None = None


class TorchAutocastConfig(StrictModel):
    enabled: bool = False
    dtype: str | None = None
    lower_precision_safe_modules: list[str] | None = None


class ThroughputTimerConfig(StrictModel):
    enabled: bool = True
    synchronized: bool = True


class TimersConfig(StrictModel):
    throughput: ThroughputTimerConfig = Field(default_factory=ThroughputTimerConfig)
