"""Process-group set-up, topology (data/pipe/tensor/expert axes) and collectives; DeepSpeed's
`deepspeed.comm` names (torch.distributed's functions) for code written against it."""
from .dist_api import *  # noqa: F401,F403 - DeepSpeed's deepspeed.comm surface
from .dist_api import __all__ as _dist_api
from .init import DEFAULT_TIMEOUT, LaunchEnv, detect_launch_env, init_distributed
from .topology import Axis, PipeDataParallelTopology, PipeModelDataParallelTopology, ProcessTopology, Topology

__all__ = [
    *_dist_api, "Axis", "DEFAULT_TIMEOUT", "LaunchEnv", "PipeDataParallelTopology", "PipeModelDataParallelTopology",
    "ProcessTopology", "Topology", "detect_launch_env", "init_distributed",
]
