"""Where a run stands (step, data position, RNG streams) and the checkpoint folders that keep it.

A checkpoint folder `checkpoint-N/` holds:

    trainable.safetensors   the trainable tensors (`mmalign.model.checkpoint.save_tensors`)
    trainer_state.pt        scheduler, step, rank 0's data position, process count, per-device batch,
                            and the optimizer state of replicated engines (one process / DDP)
    rank-R.pt               rank R's `TrainingState.state_dict()`: data position + RNG states
    engine/                 sharded optimizer state (FSDP, DeepSpeed), written by the engine

It is written as `.tmp-checkpoint-N` and renamed, so it appears whole or not at all.
"""

from __future__ import annotations

import logging
import random
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)
STATE_FILE = "trainer_state.pt"
RANK_FILE = "rank-{}.pt"  # per-rank RNG states + data position


def rng_state() -> dict[str, Any]:
    """Every RNG stream the steps draw from (dropout, augmentation, sampled instructions)."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@dataclass
class TrainingState:
    """One rank's place in the run: what a checkpoint must restore for it to continue as if never
    stopped. The batch source advances `epoch` / `consumed`; the step loop advances `step`."""

    seed: int
    rank: int = 0
    world: int = 1
    step: int = 0  # optimizer steps taken
    epoch: int = 0
    consumed: int = 0  # this rank's batches consumed in `epoch` (skipped ones included)

    def start_fresh_streams(self) -> None:
        """With several processes each rank draws its own dropout / augmentation stream."""
        if self.world > 1:
            seed_everything(self.seed + self.rank)

    def state_dict(self) -> dict[str, Any]:
        """The position and this process's RNG states, as of now (what `rank-R.pt` holds)."""
        return {"step": self.step, "epoch": self.epoch, "consumed": self.consumed, "rng": rng_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Position, and the RNG states if `state` has them (else fresh streams). It sets the RNG:
        call it after everything that may draw random numbers, right before the first batch."""
        self.step, self.epoch, self.consumed = state["step"], state["epoch"], state["consumed"]
        if state.get("rng") is not None:
            set_rng_state(state["rng"])
        else:
            self.start_fresh_streams()


def trainer_state(
    state: TrainingState, scheduler: Any, optimizer_state: dict | None, batch_size: int
) -> dict[str, Any]:
    """What `trainer_state.pt` holds (written by the main process)."""
    return {
        "optimizer": optimizer_state,
        "scheduler": scheduler.state_dict(),
        "step": state.step,
        "epoch": state.epoch,
        "consumed": state.consumed,
        "world_size": state.world,
        "batch_size": batch_size,
    }


def rank_state_to_resume(
    checkpoint: Path, shared: dict[str, Any], state: TrainingState, batch_size: int, streamed: bool
) -> dict[str, Any]:
    """This rank's `TrainingState` dict from a checkpoint (`shared`: its trainer_state.pt).

    The same process count resumes exactly. A different one continues at the same number of
    samples of the same epoch (map-style data), with fresh RNG streams (no "rng")."""
    saved_world = shared.get("world_size", 1)
    rank_file = checkpoint / RANK_FILE.format(state.rank)
    if saved_world == state.world and rank_file.is_file():
        return {"step": shared["step"], **torch.load(rank_file, weights_only=False)}
    if saved_world == state.world == 1 and "rng" in shared:  # written before per-rank files existed
        return {key: shared[key] for key in ("step", "epoch", "consumed", "rng")}
    if streamed:
        raise ValueError(
            f"{checkpoint}: written by {saved_world} process(es); a streamed dataset resumes only with the same count"
        )
    seen = shared["consumed"] * shared.get("batch_size", batch_size) * saved_world
    if seen % (batch_size * state.world):
        raise ValueError(
            f"{checkpoint}: {seen} samples of epoch {shared['epoch']} were consumed by {saved_world} process(es), "
            f"not a multiple of batch_size {batch_size} x {state.world} processes; resume with the old layout"
        )
    log.warning(
        "%s: %d -> %d processes; continuing at sample %d of epoch %d with fresh RNG streams",
        checkpoint,
        saved_world,
        state.world,
        seen,
        shared["epoch"],
    )
    return {"step": shared["step"], "epoch": shared["epoch"], "consumed": seen // (batch_size * state.world)}


def _step_of(folder: Path) -> int:
    return int(folder.name.split("-")[1])


def latest_checkpoint(output_dir: Path) -> Path | None:
    """The newest complete checkpoint (numeric order; temp folders and ones without a state file ignored)."""
    folders = sorted(output_dir.glob("checkpoint-*"), key=_step_of)
    return next((c for c in reversed(folders) if (c / STATE_FILE).is_file()), None)


class CheckpointFolders:
    """The checkpoint folders of one output folder: each written whole to a temp folder, renamed,
    and only the newest `keep` kept. `begin` and `commit` are collectives (every rank calls them)."""

    def __init__(self, output_dir: Path, keep: int, is_main: bool, wait_for_everyone: Callable[[], None]) -> None:
        self.output_dir, self.keep, self.is_main = output_dir, keep, is_main
        self.wait_for_everyone = wait_for_everyone

    def latest(self) -> Path | None:
        return latest_checkpoint(self.output_dir)

    def begin(self, step: int) -> Path:
        """An empty temp folder every rank may write its part into."""
        temp = self.output_dir / f".tmp-checkpoint-{step}"
        if self.is_main:
            shutil.rmtree(temp, ignore_errors=True)
            temp.mkdir(parents=True)
        self.wait_for_everyone()
        return temp

    def commit(self, step: int) -> Path:
        """Rename the temp folder once every rank has written, then drop the oldest folders."""
        final = self.output_dir / f"checkpoint-{step}"
        self.wait_for_everyone()
        if self.is_main:
            shutil.rmtree(final, ignore_errors=True)
            (self.output_dir / f".tmp-checkpoint-{step}").rename(final)
            for old in sorted(self.output_dir.glob("checkpoint-*"), key=_step_of)[: -self.keep]:
                shutil.rmtree(old, ignore_errors=True)
        self.wait_for_everyone()
        return final
