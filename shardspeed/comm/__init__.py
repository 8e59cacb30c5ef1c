"""Process-group set-up, topology (data/pipe/tensor/expert axes) and collectives."""
from .init import DEFAULT_TIMEOUT, LaunchEnv, detect_launch_env, init_distributed
from .topology import PipeDataParallelTopology, PipeModelDataParallelTopology, ProcessTopology, Topology

__all__ = [
    "DEFAULT_TIMEOUT", "LaunchEnv", "PipeDataParallelTopology", "PipeModelDataParallelTopology",
    "ProcessTopology", "Topology", "detect_launch_env", "init_distributed",
]
