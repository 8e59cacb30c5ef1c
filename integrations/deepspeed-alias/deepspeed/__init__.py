"""`deepspeed`, as a name for shardspeed: `deepspeed.X` is the very module `shardspeed.X`.

A pure mapping, so that libraries that import DeepSpeed by name (transformers, accelerate, peft)
run on shardspeed. It adds nothing of its own but the version: every name lives in shardspeed, so
`import shardspeed as deepspeed` code sees the same API.
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
from types import ModuleType
from typing import Any

import shardspeed

__version__ = "0.19.8+shardspeed." + shardspeed.__version__
_PREFIX = __name__ + "."


class _Alias(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds `deepspeed.X` as the already-importable `shardspeed.X` and hands out that module object."""

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if not fullname.startswith(_PREFIX):
            return None
        real = "shardspeed." + fullname[len(_PREFIX):]
        try:
            module = importlib.import_module(real)
        except ModuleNotFoundError as err:
            if err.name == real:
                return None  # deepspeed.X has no shardspeed.X: the usual ModuleNotFoundError follows
            raise
        return importlib.util.spec_from_loader(fullname, self, is_package=hasattr(module, "__path__"))

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        return importlib.import_module("shardspeed." + spec.name[len(_PREFIX):])

    def exec_module(self, module: ModuleType) -> None:
        """Nothing to run: the module is shardspeed's, imported already."""


if not any(isinstance(finder, _Alias) for finder in sys.meta_path):
    sys.meta_path.insert(0, _Alias())


def __getattr__(name: str) -> Any:
    return getattr(shardspeed, name)


def __dir__() -> list[str]:
    return sorted({*shardspeed.__dir__(), "__version__"})
