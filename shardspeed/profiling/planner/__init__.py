"""The ZeRO planner: which stage, offload and checkpointing fit a model on a machine, and which is fastest.

`plan(model, seq_len, micro_batch, precision, hardware)` predicts, for every option, the peak
memory per rank on the device, in host memory (pinned buffers included) and on NVMe, broken into
the components shardspeed allocates, and a step time; `shardspeed plan` prints it, and
`"zero_optimization": {"stage": "auto"}` / `"offload_optimizer": "auto"` in a ds_config are
resolved with it at `initialize` (`auto.resolve_zero_autos`). See docs/observability.md.
"""
from .hardware import Hardware, format_bytes, parse_bytes
from .model import PlannerError, hf_config, meta_model
from .parts import Option, Part, options
from .predict import Plan, Prediction, StepTime, plan

__all__ = ["Hardware", "Option", "Part", "Plan", "PlannerError", "Prediction", "StepTime", "format_bytes", "hf_config",
           "meta_model", "options", "parse_bytes", "plan"]
