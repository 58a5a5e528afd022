"""The training state (position + RNG streams) and the checkpoint folders that keep it."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from mmalign.train.state import (
    RANK_FILE,
    STATE_FILE,
    CheckpointFolders,
    TrainingState,
    latest_checkpoint,
    rank_state_to_resume,
)


def _draws() -> tuple:
    return random.random(), float(np.random.rand()), float(torch.rand(1))


def test_state_dict_round_trip_restores_the_position_and_every_rng_stream():
    state = TrainingState(seed=1, step=7, epoch=2, consumed=3)
    saved = state.state_dict()
    expected = _draws()  # what an uninterrupted run draws next
    torch.manual_seed(123), random.seed(123), np.random.seed(123)

    resumed = TrainingState(seed=1)
    resumed.load_state_dict(saved)

    assert (resumed.step, resumed.epoch, resumed.consumed) == (7, 2, 3)
    assert _draws() == expected


def test_a_state_without_rng_gives_each_rank_its_own_fresh_stream():
    draws = []
    for rank in (0, 1):
        TrainingState(seed=5, rank=rank, world=2).load_state_dict({"step": 1, "epoch": 0, "consumed": 1})
        draws.append(_draws())
    assert draws[0] != draws[1]
    TrainingState(seed=5, rank=1, world=2).start_fresh_streams()
    assert _draws() == draws[1]  # seeded with seed + rank


def _checkpoint(tmp_path, world: int, consumed: int, batch_size: int = 2):
    shared = {"step": 4, "epoch": 1, "consumed": consumed, "world_size": world, "batch_size": batch_size}
    for rank in range(world):
        torch.save(
            {"step": 4, "epoch": 1, "consumed": consumed, "rng": {"rank": rank}}, tmp_path / RANK_FILE.format(rank)
        )
    return shared


def test_resume_reads_this_ranks_file_with_the_same_process_count(tmp_path):
    shared = _checkpoint(tmp_path, world=2, consumed=3)
    mine = rank_state_to_resume(tmp_path, shared, TrainingState(seed=0, rank=1, world=2), 2, streamed=False)
    assert mine == {"step": 4, "epoch": 1, "consumed": 3, "rng": {"rank": 1}}
    old = {"step": 4, "epoch": 1, "consumed": 3, "rng": "old"}  # before per-rank files: one process, rng shared
    assert rank_state_to_resume(tmp_path / "none", old, TrainingState(seed=0), 2, streamed=False) == old


def test_resume_with_another_process_count_continues_at_the_same_sample(tmp_path, caplog):
    shared = _checkpoint(tmp_path, world=2, consumed=3)  # 3 batches x 2 samples x 2 ranks = sample 12
    mine = rank_state_to_resume(tmp_path, shared, TrainingState(seed=0, rank=0, world=1), 4, streamed=False)
    assert mine == {"step": 4, "epoch": 1, "consumed": 3}  # 3 batches of 4: no "rng", fresh streams
    assert "2 -> 1 processes; continuing at sample 12 of epoch 1" in caplog.text
    with pytest.raises(ValueError, match="12 samples of epoch 1 .* not a multiple of batch_size 8"):
        rank_state_to_resume(tmp_path, shared, TrainingState(seed=0, world=1), 8, streamed=False)
    with pytest.raises(ValueError, match="a streamed dataset resumes only with the same count"):
        rank_state_to_resume(tmp_path, shared, TrainingState(seed=0, world=1), 4, streamed=True)


def test_latest_checkpoint_ignores_partial_and_temp_folders(tmp_path):
    assert latest_checkpoint(tmp_path) is None
    for step in (4, 9, 10):
        (tmp_path / f"checkpoint-{step}").mkdir()
        (tmp_path / f"checkpoint-{step}" / STATE_FILE).write_bytes(b"x")
    (tmp_path / ".tmp-checkpoint-12").mkdir()  # killed while saving: a state file but no rename
    (tmp_path / ".tmp-checkpoint-12" / STATE_FILE).write_bytes(b"x")
    (tmp_path / "checkpoint-11").mkdir()  # no state file: not a complete checkpoint
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoint-10"  # numeric, not lexical order


def test_checkpoint_folders_appear_whole_and_keep_the_newest(tmp_path):
    barriers = []
    folders = CheckpointFolders(tmp_path, keep=2, is_main=True, wait_for_everyone=lambda: barriers.append(1))
    for step in (2, 4, 10):
        temp = folders.begin(step)
        assert temp.name == f".tmp-checkpoint-{step}" and not (tmp_path / f"checkpoint-{step}").exists()
        (temp / STATE_FILE).write_bytes(b"x")
        assert folders.commit(step) == tmp_path / f"checkpoint-{step}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-10", "checkpoint-4"]
    assert folders.latest() == tmp_path / "checkpoint-10"
    assert len(barriers) == 3 * 3  # every rank waits: after the temp folder, before and after the rename
