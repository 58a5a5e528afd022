"""Length-grouped sampling for map-style conversation data (LLaVA's group_by_modality_length).

Conversations differ in length by 10x or more; random batches pad every sample to the longest
one. Grouping samples of similar length into the same batch cuts the padding, and keeping
image and text-only samples apart lets a step run one modality at a time.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import Sampler


class LengthGroupedSampler(Sampler[int]):
    """Indices in batches of similar length, one modality per step, deterministic per epoch.

    ``lengths[i]`` > 0 for a sample with an image, < 0 for a text-only one (LLaVA's
    ``modality_lengths``; ``MultimodalDataset.lengths`` gives word counts). Per modality: a
    seeded shuffle, cut into megabatches of ``megabatch_size`` steps, each sorted by length,
    cut into steps of ``world_size x batch_size`` indices; within a step rank r gets every
    world_size-th index (so ranks get similar lengths too); the steps of both modalities are
    shuffled together, and the incomplete remainders of both go last.

    The order is global: rank r takes batches r, r + world, ... of it (the training loop does
    this with ``epoch_order`` and its ``ResumableSampler``; a DataLoader sharded by accelerate's
    ``prepare`` does the same). As a sampler on its own, resume with
    ``set_resume(batches_consumed, batch_size)`` (batches of one rank) or set ``start`` (indices).
    """

    def __init__(
        self,
        lengths: Sequence[int],
        batch_size: int,
        *,
        world_size: int = 1,
        seed: int = 0,
        megabatch_size: int = 50,
    ) -> None:
        if batch_size < 1 or world_size < 1 or megabatch_size < 1:
            raise ValueError("batch_size, world_size and megabatch_size must be >= 1")
        if any(n == 0 for n in lengths):
            raise ValueError("lengths must be non-zero (> 0 with an image, < 0 text-only)")
        self.lengths = list(lengths)
        self.batch_size, self.world_size, self.megabatch_size = batch_size, world_size, megabatch_size
        self.seed, self.epoch, self.start = seed, 0, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.start = epoch, 0

    def set_resume(self, batches_consumed: int, batch_size: int) -> None:
        self.start = batches_consumed * batch_size * self.world_size

    def __len__(self) -> int:
        return len(self.lengths) - self.start

    def order(self) -> list[int]:
        """This epoch's full order."""
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        step = self.batch_size * self.world_size
        steps: list[list[int]] = []
        rest: list[int] = []
        for image in (True, False):
            idx = [i for i, n in enumerate(self.lengths) if (n > 0) == image]
            idx = [idx[j] for j in torch.randperm(len(idx), generator=g).tolist()]
            full = len(idx) - len(idx) % step
            rest += idx[full:]
            mega = step * self.megabatch_size
            for m in range(0, full, mega):
                chunk = sorted(idx[m : min(m + mega, full)], key=lambda i: -abs(self.lengths[i]))
                steps += [self._spread(chunk[s : s + step]) for s in range(0, len(chunk), step)]
        order = [i for j in torch.randperm(len(steps), generator=g).tolist() for i in steps[j]]
        rest.sort(key=lambda i: -abs(self.lengths[i]))
        return order + rest

    def epoch_order(self, epoch: int) -> list[int]:
        """The full order of ``epoch`` (for a loop that splits batches across ranks itself)."""
        self.set_epoch(epoch)
        return self.order()

    def _spread(self, step: list[int]) -> list[int]:
        """Sorted step -> rank-major order: rank r's batch is step[r::world_size]."""
        return [i for r in range(self.world_size) for i in step[r :: self.world_size]]

    def __iter__(self) -> Iterator[int]:
        yield from self.order()[self.start :]
