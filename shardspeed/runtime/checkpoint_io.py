"""Crash-safe file writes and checksummed reads for checkpoints.

A file is written under a temporary name, fsynced, then renamed over the final name, so a reader
never sees half a file. Each checkpoint folder carries a manifest of SHA-256 digests; loading
verifies every file against it and names the file that is missing, truncated or corrupt.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path
from typing import Any

import torch

MANIFEST = "manifest.json"


class CheckpointError(RuntimeError):
    """A checkpoint cannot be read as written; the message names the file."""


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def save_torch(obj: Any, path: Path) -> str:
    """torch.save `obj` to `path` atomically; returns the SHA-256 of the bytes written."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    data = buffer.getvalue()
    atomic_write_bytes(path, data)
    return hashlib.sha256(data).hexdigest()


def write_manifest(folder: Path, digests: dict[str, str], meta: dict[str, Any]) -> None:
    atomic_write_bytes(folder / MANIFEST, json.dumps({"files": digests, **meta}, indent=1, sort_keys=True).encode())


def read_manifest(folder: Path) -> dict[str, Any]:
    path = folder / MANIFEST
    if not path.is_file():
        raise CheckpointError(f"checkpoint `{folder}` has no {MANIFEST}: it is incomplete or was not written by shardspeed")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"checkpoint manifest `{path}` is corrupt: {err}") from None


def load_verified(folder: Path, name: str, manifest: dict[str, Any]) -> Any:
    """torch.load `folder/name` after checking it against the manifest's digest."""
    path = folder / name
    expected = manifest["files"].get(name)
    if expected is None:
        raise CheckpointError(f"checkpoint file `{path}` is not listed in {folder / MANIFEST}")
    if not path.is_file():
        raise CheckpointError(f"checkpoint file `{path}` is missing")
    data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() != expected:
        raise CheckpointError(f"checkpoint file `{path}` is corrupt or truncated (SHA-256 does not match {MANIFEST})")
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=False)
