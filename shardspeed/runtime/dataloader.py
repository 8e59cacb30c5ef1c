"""The distributed dataloader `initialize(training_data=...)` hands back."""
from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from torch.utils.data import DataLoader, Dataset, DistributedSampler


class _ResumableSampler(DistributedSampler):
    """A DistributedSampler that can start an epoch part-way through (after a resume)."""

    skip = 0

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())
        skip, self.skip = self.skip, 0
        return iter(indices[skip:])


class ShardspeedDataLoader:
    """Micro batches of this rank's share of `dataset`, reshuffled each epoch (DeepSpeed's loader).

    Iterating yields one epoch; the epoch counter advances at the end of each so the next pass
    reshuffles, as with a `DistributedSampler` whose `set_epoch` is called every epoch. Its
    position (epoch and batches already yielded) is saved in checkpoints, so a resumed run sees
    exactly the batches it would have seen.
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
        self.batch_size = micro_batch_size
        self.sampler = _ResumableSampler(dataset, num_replicas=dp_size, rank=dp_rank, shuffle=True, seed=seed, drop_last=drop_last)
        self.loader = DataLoader(
            dataset, batch_size=micro_batch_size, sampler=self.sampler, collate_fn=collate_fn,
            drop_last=drop_last, num_workers=num_workers,
        )
        self.epoch = 0
        self.position = 0  # batches yielded so far in the current epoch

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[Any]:
        self.sampler.set_epoch(self.epoch)
        self.sampler.skip = self.position * self.batch_size
        for batch in self.loader:
            self.position += 1
            yield batch
        self.epoch += 1
        self.position = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])

