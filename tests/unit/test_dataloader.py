"""The engine's dataloader: disjoint shards per rank, reshuffled epochs, and an exact resume position."""
from __future__ import annotations

import torch
from torch.utils.data import TensorDataset

from shardspeed.runtime.dataloader import ShardspeedDataLoader

DATA = TensorDataset(torch.arange(40))


def _firsts(loader, n=None):
    out = []
    for i, (batch,) in enumerate(loader):
        out.append(batch.tolist())
        if n is not None and i + 1 == n:
            break
    return out


def test_ranks_get_disjoint_shards_and_epochs_reshuffle():
    """Catches overlapping shards or an epoch order that never changes."""
    r0 = ShardspeedDataLoader(DATA, 4, dp_rank=0, dp_size=2)
    r1 = ShardspeedDataLoader(DATA, 4, dp_rank=1, dp_size=2)
    e0, e1 = sum(_firsts(r0), []), sum(_firsts(r1), [])
    assert sorted(e0 + e1) == list(range(40)) and len(r0) == 5
    assert sum(_firsts(r0), []) != e0, "the second epoch must be reshuffled"


def test_resume_continues_mid_epoch_with_the_same_batches():
    """Catches a resumed run that replays or skips batches (the checkpoint stores epoch and position)."""
    straight = ShardspeedDataLoader(DATA, 4, dp_rank=0, dp_size=2)
    expected = _firsts(straight) + _firsts(straight)  # two full epochs
    first = ShardspeedDataLoader(DATA, 4, dp_rank=0, dp_size=2)
    seen = _firsts(first)  # epoch 0
    seen += _firsts(first, n=2)  # two batches into epoch 1, then "crash"
    state = first.state_dict()
    assert state == {"epoch": 1, "position": 2}
    resumed = ShardspeedDataLoader(DATA, 4, dp_rank=0, dp_size=2)
    resumed.load_state_dict(state)
    seen += _firsts(resumed)
    assert seen == expected
