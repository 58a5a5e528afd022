"""This rank's batches: the resumable, rank-split sampler and the batch source (epoch rollover,
all-skipped batches passed over and counted, resume at the same batch)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from torch.utils.data import Dataset

from mmalign.data.sampling import LengthGroupedSampler
from mmalign.train.batches import BatchSource, ResumableSampler
from mmalign.train.state import TrainingState


def test_ranks_take_interleaved_batches_of_one_permutation():
    n, b, world = 23, 3, 2  # 8 batches (the last partial) -> 4 per rank
    single = ResumableSampler(n, seed=5, batch_size=b)
    order = list(single)
    assert sorted(order) == list(range(n))
    ranks = [ResumableSampler(n, seed=5, batch_size=b, rank=r, world=world) for r in range(world)]
    per_rank = [list(s) for s in ranks]
    assert [len(p) for p in per_rank] == [12, 11]  # rank 1 holds the partial last batch
    assert sorted(per_rank[0] + per_rank[1]) == sorted(order)  # disjoint, nothing lost
    # step k of 2 ranks (accumulation 1) = step k of 1 process with accumulation 2
    batches = [order[i : i + b] for i in range(0, n, b)]
    for k in range(4):
        assert per_rank[0][k * b : (k + 1) * b] == batches[2 * k]
        assert per_rank[1][k * b : (k + 1) * b] == batches[2 * k + 1]
    ranks[1].start = 2  # resume: this rank's first 2 batches are consumed
    assert list(ranks[1]) == batches[5] + batches[7]
    # a remainder of fewer batches than ranks is dropped so every rank has as many
    uneven = [list(ResumableSampler(7, seed=1, batch_size=2, rank=r, world=3)) for r in range(3)]
    assert [len(u) for u in uneven] == [2, 2, 2]


def test_length_grouped_batches_split_across_ranks_once_each():
    lengths = [int(x) for x in np.random.default_rng(0).integers(5, 300, 64)]
    grouped = LengthGroupedSampler(lengths, batch_size=4, world_size=2, seed=3, megabatch_size=4)
    ranks = [ResumableSampler(64, 3, batch_size=4, rank=r, world=2, order=grouped.epoch_order) for r in (0, 1)]
    seen = [list(s) for s in ranks]
    assert sorted(seen[0] + seen[1]) == list(range(64))  # 64 = 8 steps of 2 ranks x 4: nothing dropped
    for r in (0, 1):  # same step on both ranks: batches of similar length (one sorted megabatch)
        batches = [seen[r][i : i + 4] for i in range(0, 64 // 2, 4)]
        spread = np.mean([np.ptp([lengths[i] for i in b]) for b in batches])
        assert spread < np.ptp(lengths) / 2
    ranks[0].epoch = 1
    assert list(ranks[0]) != seen[0]  # a new order per epoch


class _Numbers(Dataset):
    """Sample i is the token i; the indices in `skipped` are samples the dataset drops (None)."""

    def __init__(self, n: int, skipped: set[int] = frozenset()) -> None:
        self.n, self.skipped_indices = n, skipped

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        return None if i in self.skipped_indices else {"input_ids": [i], "labels": [i], "pixel_values": None}


def _ids(batch) -> list[int]:
    return batch["input_ids"][:, 0].tolist()


def test_epochs_roll_over_and_all_skipped_batches_are_passed_over_and_counted():
    sampler = ResumableSampler(5, seed=3, batch_size=2)
    epoch0 = list(sampler)
    skipped = set(epoch0[:2])  # the whole first batch of epoch 0 is dropped by the dataset
    state = TrainingState(seed=3)
    source = BatchSource(_Numbers(5, skipped), state, batch_size=2, pad_id=0)

    assert _ids(source.next()) == epoch0[2:4]
    assert (state.epoch, state.consumed) == (0, 2)  # the skipped batch counts as consumed
    assert _ids(source.next()) == epoch0[4:]
    sampler.epoch = 1
    seen = []
    while (batch := source.next()) is not None and state.epoch == 1:
        seen += _ids(batch)
    assert seen == [i for i in sampler if i not in skipped]  # epoch 1: a new order, the same samples
    assert (state.epoch, state.consumed) == (2, 1)


def test_a_source_built_from_a_saved_position_continues_with_the_same_batches():
    state = TrainingState(seed=0)
    source = BatchSource(_Numbers(7), state, batch_size=2, pad_id=0)
    for _ in range(5):  # into epoch 1 (4 batches per epoch)
        source.next()
    saved = dataclasses.replace(state)
    expected = [_ids(source.next()) for _ in range(4)]

    resumed = BatchSource(_Numbers(7), saved, batch_size=2, pad_id=0)
    assert [_ids(resumed.next()) for _ in range(4)] == expected


def test_an_epoch_without_a_usable_batch_is_an_error_not_a_spin():
    source = BatchSource(_Numbers(4, {0, 1, 2, 3}), TrainingState(seed=0, rank=1, world=2), batch_size=1, pad_id=0)
    with pytest.raises(RuntimeError, match="rank 1: epoch 0 gave no usable batch"):
        source.next()
