"""DeepSpeed names whose feature shardspeed has not built yet.

They resolve (a DeepSpeed script imports them without an ImportError or AttributeError), and using
one raises `NotBuiltError`, a NotImplementedError that names the feature. Each is replaced by the
real thing when its feature lands.
"""
from __future__ import annotations

from typing import Any, NoReturn


class NotBuiltError(NotImplementedError):
    """A DeepSpeed feature shardspeed does not have yet."""


def _refuse(feature: str, name: str) -> NoReturn:
    raise NotBuiltError(f"{name}: {feature} is not supported yet by shardspeed")


def unbuilt_function(feature: str, name: str) -> Any:
    """A function named `name` that raises NotBuiltError naming `feature` when called."""

    def refuse(*args: Any, **kwargs: Any) -> NoReturn:
        _refuse(feature, name)

    refuse.__name__ = refuse.__qualname__ = name.rsplit(".", 1)[-1]
    refuse.__doc__ = f"DeepSpeed's `{name}`: {feature} is not supported yet by shardspeed."
    return refuse


def unbuilt_class(feature: str, name: str) -> type:
    """A class named `name` whose construction raises NotBuiltError naming `feature` (isinstance works)."""

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        _refuse(feature, name)

    short = name.rsplit(".", 1)[-1]
    return type(short, (), {"__init__": __init__, "__doc__": f"DeepSpeed's `{name}`: {feature} is not supported yet by shardspeed."})
