"""This rank's batches, one after another across epochs, from the position a run resumes at.

Map-style data goes through `ResumableSampler` (a seeded order per epoch, split by rank, started
mid-epoch); streamed sources split by rank themselves and are told the epoch and the batches
already consumed (`set_epoch`, `set_resume`). Either way the loader is built here, not by
accelerate, which would re-shard it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from functools import partial
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler

from mmalign.data.collate import collate
from mmalign.train.state import TrainingState

_END = object()


class ResumableSampler(Sampler[int]):
    """Seeded shuffle per epoch that can start mid-epoch, so resume never re-reads samples.

    With several processes every rank draws the same permutation, cuts it into per-device
    batches and takes every `world`-th one (rank r: batches r, r + world, ...), so one step of
    `world` ranks sees exactly the batches one process would see with `world` x accumulation;
    a trailing remainder of fewer than `world` batches is dropped so ranks stay in step.
    `start` counts this rank's batches already consumed in the epoch."""

    def __init__(
        self,
        n: int,
        seed: int,
        batch_size: int = 1,
        rank: int = 0,
        world: int = 1,
        order: Callable[[int], list[int]] | None = None,
    ) -> None:
        """``order``: epoch -> a permutation of all indices (e.g. length-grouped); default a seeded shuffle."""
        self.n, self.seed, self.batch_size, self.rank, self.world = n, seed, batch_size, rank, world
        self.order = order
        self.epoch, self.start = 0, 0

    def _batches(self) -> list[list[int]]:
        if self.order is not None:
            order = self.order(self.epoch)
        else:
            order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + self.epoch)).tolist()
        b = self.batch_size
        batches = [order[i : i + b] for i in range(0, self.n, b)]
        if self.world > 1:
            batches = batches[: len(batches) - len(batches) % self.world]
        return batches[self.rank :: self.world]

    def __len__(self) -> int:
        return sum(len(b) for b in self._batches()[self.start :])

    def __iter__(self) -> Iterator[int]:
        for batch in self._batches()[self.start :]:
            yield from batch


class BatchSource:
    """The next usable batch of this rank, forever: an epoch that ends starts the next one
    (reshuffled with its seed), a batch whose samples were all skipped (and counted by the
    dataset) is passed over. The position lives in `state` (`epoch`, `consumed`), so a
    checkpoint of the state is a checkpoint of the data position."""

    def __init__(
        self,
        dataset: Dataset,
        state: TrainingState,
        batch_size: int,
        pad_id: int,
        num_workers: int = 0,
        order: Callable[[int], list[int]] | None = None,
        pack_tokens: int | None = None,
    ) -> None:
        """``pack_tokens``: pack each batch into rows of that many tokens (``mmalign.data.collate.pack``)."""
        self.dataset, self.state, self.batch_size, self.pad_id = dataset, state, batch_size, pad_id
        self.num_workers, self.pack_tokens = num_workers, pack_tokens
        self.streamed = isinstance(dataset, IterableDataset)
        self.sampler = (
            None
            if self.streamed
            else ResumableSampler(len(dataset), state.seed, batch_size, state.rank, state.world, order=order)
        )
        self._batches: Iterator | None = None
        self._epoch_had_batch = False

    def next(self) -> dict[str, Any]:
        if self._batches is None:  # first draw: from the (possibly resumed) position
            self._batches = iter(self._loader())
            self._epoch_had_batch = self.state.consumed > 0  # a resumed epoch gave a batch already
        batch = next(self._batches, _END)
        while batch is _END or batch is None:
            if batch is _END:
                self._next_epoch()
            else:  # every sample of this batch was skipped (and counted)
                self.state.consumed += 1
            batch = next(self._batches, _END)
        self.state.consumed += 1
        self._epoch_had_batch = True
        return batch

    @property
    def skipped(self) -> dict[str, Any]:
        """The dataset's report of skipped / truncated samples on this rank."""
        return getattr(self.dataset, "skipped", None) or {}

    def _next_epoch(self) -> None:
        if not self._epoch_had_batch:
            raise RuntimeError(
                f"rank {self.state.rank}: epoch {self.state.epoch} gave no usable batch (no data for this rank, "
                "or every sample skipped: see the log) - stopping instead of spinning while other ranks wait"
            )
        self.state.epoch, self.state.consumed, self._epoch_had_batch = self.state.epoch + 1, 0, False
        self._batches = iter(self._loader())

    def _loader(self) -> DataLoader:
        """A loader that starts at the state's position. Its own generator: a loader draws its
        base seed at iter(), and a draw from the global torch RNG (checkpointed) would change a
        resumed run's dropout."""
        epoch, consumed = self.state.epoch, self.state.consumed
        if hasattr(self.dataset, "set_epoch"):  # streams; a map-style dataset's cached views per epoch
            self.dataset.set_epoch(epoch)
        if self.streamed:
            if hasattr(self.dataset, "set_resume"):
                self.dataset.set_resume(consumed, self.batch_size)
        else:
            self.sampler.epoch, self.sampler.start = epoch, consumed
        return DataLoader(
            self.dataset,
            batch_size=self.batch_size,
            sampler=self.sampler,
            num_workers=self.num_workers,
            collate_fn=partial(collate, pad_token_id=self.pad_id, pack_tokens=self.pack_tokens),
            drop_last=False,
            generator=torch.Generator().manual_seed(self.state.seed + epoch + 1000 * self.state.rank),
        )
