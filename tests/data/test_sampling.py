import random
from collections import Counter

import pytest
import torch
from torch.utils.data import DataLoader, RandomSampler

from mmalign.data import LengthGroupedSampler


def conversation_lengths(n=2000, seed=0):
    """LLaVA-like: long-tailed lengths, 1/4 text-only (negative)."""
    rng = random.Random(seed)
    return [(1 if rng.random() < 0.75 else -1) * (int(rng.lognormvariate(4, 0.8)) + 1) for _ in range(n)]


def padding(order, lengths, batch_size):
    pad = 0
    for b in range(0, len(order), batch_size):
        ls = [abs(lengths[i]) for i in order[b : b + batch_size]]
        pad += max(ls) * len(ls) - sum(ls)
    return pad


def test_every_index_once_and_far_less_padding():
    lengths = conversation_lengths()
    s = LengthGroupedSampler(lengths, batch_size=8, world_size=2, seed=0)
    order = list(s)
    assert sorted(order) == list(range(len(lengths)))
    g = torch.Generator().manual_seed(0)
    random_order = list(RandomSampler(range(len(lengths)), generator=g))
    grouped, rand = padding(order, lengths, 8), padding(random_order, lengths, 8)
    assert grouped < 0.2 * rand, (grouped, rand)
    # one modality per step of world x batch indices, except the remainder at the end
    step = 16  # the remainders (< one step per modality) come last
    mixed = [k for k in range(0, len(order) - 2 * step, step) if len({lengths[i] > 0 for i in order[k : k + step]}) > 1]
    assert mixed == []


def test_deterministic_per_epoch_and_resumable():
    lengths = conversation_lengths(300)
    a, b = LengthGroupedSampler(lengths, 4, seed=1), LengthGroupedSampler(lengths, 4, seed=1)
    assert list(a) == list(b)
    first = list(a)
    a.set_epoch(1)
    assert list(a) != first and sorted(a) == sorted(first)
    b.set_epoch(1)
    b.set_resume(7, 4)
    assert list(b) == list(a)[28:] and len(b) == len(lengths) - 28


def test_ranks_get_similar_lengths_through_a_sharded_loader():
    """Batches r, r + world, ... go to rank r (accelerate's sharding): each step's batches are
    similar in length across ranks, and the ranks together see every index once."""
    lengths = [abs(x) for x in conversation_lengths(640)]
    s = LengthGroupedSampler(lengths, batch_size=4, world_size=2, seed=0)
    batches = list(DataLoader(range(len(lengths)), batch_size=4, sampler=s))
    per_rank = [batches[r::2] for r in range(2)]
    assert Counter(int(i) for b in batches for i in b) == Counter(range(len(lengths)))
    ratio = [max(lengths[int(i)] for i in b0) / max(lengths[int(i)] for i in b1) for b0, b1 in zip(*per_rank)]
    assert 0.5 < sorted(ratio)[len(ratio) // 2] < 2


def test_bad_lengths_rejected():
    with pytest.raises(ValueError, match="non-zero"):
        LengthGroupedSampler([3, 0, 2], 2)
