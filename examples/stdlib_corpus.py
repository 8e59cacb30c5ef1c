"""A byte-level text corpus made of the Python standard library's own source files.

They ship with every Python, so the example trains on real text with nothing downloaded. Files
are read in sorted order, so the corpus is the same on every rank and every run of one Python.
"""
from __future__ import annotations

import sysconfig
from pathlib import Path

import torch
from torch.utils.data import Dataset


def stdlib_bytes(limit: int) -> bytes:
    """Up to `limit` bytes of concatenated standard-library `.py` files (tests and site-packages skipped)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    chunks, total = [], 0
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).parts
        if rel[0] in ("site-packages", "test", "idlelib") or "tests" in rel:
            continue
        try:
            data = path.read_bytes()
        except OSError:
            continue
        chunks.append(data)
        total += len(data)
        if total >= limit:
            break
    corpus = b"\n".join(chunks)[:limit]
    if len(corpus) < 1024:
        raise RuntimeError(f"found only {len(corpus)} bytes of Python source under {root}")
    return corpus


class ByteBlocks(Dataset):
    """Non-overlapping blocks of `seq_len + 1` bytes: inputs are the first seq_len, labels the next."""

    def __init__(self, data: bytes, seq_len: int) -> None:
        self.tokens = torch.frombuffer(bytearray(data), dtype=torch.uint8).long()
        self.seq_len = seq_len

    def __len__(self) -> int:
        return (len(self.tokens) - 1) // self.seq_len

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        block = self.tokens[i * self.seq_len: (i + 1) * self.seq_len + 1]
        return {"input_ids": block[:-1], "labels": block[1:]}


def train_val_split(seq_len: int, limit: int, val_fraction: float = 0.02) -> tuple[ByteBlocks, ByteBlocks]:
    data = stdlib_bytes(limit)
    cut = int(len(data) * (1 - val_fraction))
    return ByteBlocks(data[:cut], seq_len), ByteBlocks(data[cut:], seq_len)
