"""The whole ds_config as one typed model, and the DeepSpeed-named accessors read from it."""
from __future__ import annotations

import math
from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, Field, PrivateAttr

from .base import Int, StrictModel
from .sections import (
    ActivationCheckpointingConfig,
    AioConfig,
    BF16Config,
    CheckpointConfig,
    CometConfig,
    CommsLoggerConfig,
    CSVMonitorConfig,
    DataTypesConfig,
    FlopsProfilerConfig,
    FP16Config,
    ExpertParallelConfig,
    HybridEngineConfig,
    MoEConfig,
    OptimizerConfig,
    PipelineConfig,
    SchedulerConfig,
    TensorBoardConfig,
    TensorParallelConfig,
    TimersConfig,
    TorchAutocastConfig,
    WandbConfig,
    ZeroConfig,
)

# DeepSpeed sections that shardspeed recognises but does not implement. They are accepted as
# written so a DeepSpeed config loads, and `initialize` refuses them once they are switched on.
UNIMPLEMENTED_SECTIONS: tuple[str, ...] = (
    "amp",
    "autotuning",
    "compile",
    "compression_training",
    "curriculum_learning",
    "data_efficiency",
    "datastates_ckpt",
    "eigenvalue",
    "elasticity",
    "nebula",
    "progressive_layer_drop",
    "quantize_training",
    "sparse_attention",
    "weight_quantization",
)

def _never_if_infinite(value: Any) -> Any:
    """accelerate's DeepSpeedPlugin writes `steps_per_print: inf` to mean "never"."""
    return None if isinstance(value, float) and math.isinf(value) and value > 0 else value


CommDType = Literal["fp32", "fp16", "bf16", "float32", "float16", "bfloat16"]


class ShardspeedConfig(StrictModel):
    """A parsed ds_config. Build it with `shardspeed.config.load_config`, not directly."""

    train_batch_size: Int | None = Field(default=None, description="Global batch: micro batch x accumulation steps x data-parallel size.")
    train_micro_batch_size_per_gpu: Int | None = Field(default=None, description="Samples per rank per forward.")
    gradient_accumulation_steps: Int | None = Field(default=None, description="Micro steps per optimizer step.")
    managed_gradient_accumulation: bool = Field(default=True, description="False: every step() is a boundary.")
    steps_per_print: Annotated[Int | None, BeforeValidator(_never_if_infinite)] = Field(
        default=None, description="Log loss and lr every N optimizer steps (None, or inf as accelerate writes it: never).")
    wall_clock_breakdown: bool = Field(default=False, description="Time forward, backward, reduction and step.")
    memory_breakdown: bool = Field(default=False, description="Report bytes held for parameters, gradients and optimizer states.")
    dump_state: bool = Field(default=False, description="Print the parsed config at start-up.")
    log_level: str | None = Field(default=None, description="Logging level of the `shardspeed` logger.")
    gradient_clipping: float = Field(default=1.0, description="Clip the global gradient norm to this (0: off). DeepSpeed's default is 1.0.")
    prescale_gradients: bool = Field(default=False, description="Divide gradients by gradient_predivide_factor before reduction.")
    gradient_predivide_factor: float = Field(default=1.0, description="Pre-division factor when prescale_gradients is on.")
    gradient_allreduce_op: Literal["mean", "sum"] = Field(default="mean", description="How data-parallel gradients combine.")
    communication_data_type: CommDType | None = Field(default=None, description="Dtype gradients are reduced in (default: the gradients' dtype).")
    seq_parallel_communication_data_type: CommDType = Field(default="fp32", description="Sequence-parallel communication dtype.")
    sparse_gradients: bool = Field(default=False, description="Sparse embedding gradients.")
    disable_allgather: bool = Field(default=False, description="DeepSpeed knob, accepted for compatibility.")
    zero_allow_untested_optimizer: bool = Field(default=False, description="Allow a client optimizer that ZeRO has not been tested with.")
    zero_force_ds_cpu_optimizer: bool = Field(default=True, description="Require the fast CPU optimizer with offload.")
    dataloader_drop_last: bool = Field(default=False, description="Drop the last incomplete batch of training_data.")
    vocabulary_size: Int | None = None
    graph_harvesting: bool = Field(default=False, description="CUDA-graph harvesting; not supported.")
    disable_python_gc: bool = Field(default=False, description="Turn off Python's cyclic garbage collector during training.")
    use_data_before_expert_parallelism: bool = False
    moe_expert_parallel_size: Int = Field(default=1, description="Expert-parallel degree.")

    fp16: FP16Config = Field(default_factory=FP16Config)
    bf16: BF16Config = Field(default_factory=BF16Config, alias="bfloat16")
    zero_optimization: ZeroConfig = Field(default_factory=ZeroConfig)
    aio: AioConfig = Field(default_factory=AioConfig)
    optimizer: OptimizerConfig | None = None
    scheduler: SchedulerConfig | None = None
    activation_checkpointing: ActivationCheckpointingConfig = Field(default_factory=ActivationCheckpointingConfig)
    pipeline: PipelineConfig = Field(default_factory=PipelineConfig)
    tensor_parallel: TensorParallelConfig = Field(default_factory=TensorParallelConfig)
    moe: MoEConfig = Field(default_factory=MoEConfig)
    tensorboard: TensorBoardConfig = Field(default_factory=TensorBoardConfig)
    csv_monitor: CSVMonitorConfig = Field(default_factory=CSVMonitorConfig)
    wandb: WandbConfig = Field(default_factory=WandbConfig)
    comet: CometConfig = Field(default_factory=CometConfig)
    flops_profiler: FlopsProfilerConfig = Field(default_factory=FlopsProfilerConfig)
    comms_logger: CommsLoggerConfig = Field(default_factory=CommsLoggerConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    data_types: DataTypesConfig = Field(default_factory=DataTypesConfig)
    torch_autocast: TorchAutocastConfig = Field(default_factory=TorchAutocastConfig)
    timers: TimersConfig = Field(default_factory=TimersConfig)

    amp: dict[str, Any] | None = None
    autotuning: dict[str, Any] | None = None
    compile: dict[str, Any] | None = None
    compression_training: dict[str, Any] | None = None
    curriculum_learning: dict[str, Any] | None = None
    data_efficiency: dict[str, Any] | None = None
    datastates_ckpt: dict[str, Any] | None = None
    eigenvalue: dict[str, Any] | None = None
    elasticity: dict[str, Any] | None = None
    expert_parallel: ExpertParallelConfig = Field(default_factory=ExpertParallelConfig)
    hybrid_engine: HybridEngineConfig = Field(default_factory=HybridEngineConfig)
    nebula: dict[str, Any] | None = None
    progressive_layer_drop: dict[str, Any] | None = None
    quantize_training: dict[str, Any] | None = None
    sparse_attention: dict[str, Any] | None = None
    weight_quantization: dict[str, Any] | None = None

    # Filled by the loader, not by the user: dotted keys that were written as "auto".
    _auto_keys: frozenset[str] = PrivateAttr(default_factory=frozenset)

    @property
    def auto_keys(self) -> frozenset[str]:
        """Dotted keys the user wrote as "auto" (resolved or rejected by the loader)."""
        return self._auto_keys

    @property
    def precision(self) -> Literal["fp32", "fp16", "bf16"]:
        if self.fp16.enabled:
            return "fp16"
        if self.bf16.enabled:
            return "bf16"
        return "fp32"

    @property
    def zero_stage(self) -> int:
        return self.zero_optimization.stage
