"""The distributed dataloader `initialize(training_data=...)` hands back."""
from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from torch.utils.data import DataLoader, Dataset, DistributedSampler


class ShardspeedDataLoader:
    """Micro batches of this rank's share of `dataset`, reshuffled each epoch (DeepSpeed's loader).

    Iterating yields one epoch; the epoch counter advances at the end of each so the next pass
    reshuffles, as with a `DistributedSampler` whose `set_epoch` is called every epoch.
    """

    def __init__(
        self,
        dataset: Dataset,
        micro_batch_size: int,
        dp_rank: int,
        dp_size: int,
        collate_fn: Callable[[list[Any]], Any] | None = None,
        drop_last: bool = False,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        self.sampler = DistributedSampler(dataset, num_replicas=dp_size, rank=dp_rank, shuffle=True, seed=seed, drop_last=drop_last)
        self.loader = DataLoader(
            dataset, batch_size=micro_batch_size, sampler=self.sampler, collate_fn=collate_fn,
            drop_last=drop_last, num_workers=num_workers,
        )
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[Any]:
        self.sampler.set_epoch(self.epoch)
        yield from self.loader
        self.epoch += 1

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch


def repeating(loader: ShardspeedDataLoader) -> Iterator[Any]:
    """Endless micro batches, epoch after epoch."""
    while True:
        yield from loader


__all__ = ["ShardspeedDataLoader", "repeating"]
