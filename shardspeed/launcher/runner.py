"""DeepSpeed's `deepspeed.launcher.runner` path: the launcher's entry point and the name of its env file."""
from __future__ import annotations

from .cli import main
from .multinode import ENV_FILE_NAMES

# accelerate's launcher reads this name; shardspeed's launcher exports the variables of such a file.
DEEPSPEED_ENVIRONMENT_NAME = ENV_FILE_NAMES[0]

__all__ = ["DEEPSPEED_ENVIRONMENT_NAME", "main"]
