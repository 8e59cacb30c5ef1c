"""The packages form layers: each imports only from packages below it (docs/architecture.md).

Catches, for one, `zero/` or `offload/` importing from `runtime/` (the engine sits on top of them), or
a cycle between the engine and the pipeline engine.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2] / "shardspeed"

# Lower numbers are lower layers; a package may import from its own layer's packages only if it is itself.
LAYER = {
    "config": 0,
    "accelerator": 1, "monitor": 1,
    "comm": 2,
    "optim": 3,
    "offload": 4,
    "zero": 5, "tensor_parallel": 5, "checkpointing": 5, "moe": 5,
    "profiling": 5.5,  # above zero/ (its planner reads ZeRO's layouts), below runtime/ (the engine runs the FLOPs profiler)
    "runtime": 6,
    "pipe": 7, "inference": 7,
    "checkpoint": 8, "ops": 8, "launcher": 8,
    "utils": 9,  # DeepSpeed's `deepspeed.utils` namespace: re-exports from anywhere, imported by nothing inside
    "(root)": 10,
    "chat": 11,  # DeepSpeed-Chat's library: builds engines with `initialize`, so it sits above the root api
}


def _imports(path: Path) -> set[str]:
    """The shardspeed packages `path` imports from (relative and absolute imports, at any depth)."""
    rel = path.relative_to(ROOT)
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = list(rel.parent.parts)[:len(rel.parent.parts) - (node.level - 1)]
            parts = base + (node.module.split(".") if node.module else [])
            # a module beside the packages (api.py, inference_api.py) belongs to the root layer
            found.add(parts[0] if parts and not (ROOT / f"{parts[0]}.py").exists() else "(root)")
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("shardspeed."):
            found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("shardspeed.")}
    return found


def _package(path: Path) -> str:
    parts = path.relative_to(ROOT).parts
    return parts[0] if len(parts) > 1 else "(root)"


@pytest.mark.parametrize("path", sorted(ROOT.rglob("*.py")), ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_go_down_the_layers(path: Path) -> None:
    pkg = _package(path)
    assert pkg in LAYER, f"new package {pkg}: give it a layer here and in docs/architecture.md"
    for target in _imports(path) - {pkg}:
        assert target in LAYER, f"{path.relative_to(ROOT)} imports unknown package {target}"
        assert LAYER[target] < LAYER[pkg], f"{path.relative_to(ROOT)} ({pkg}) imports {target}, which is not below it"
