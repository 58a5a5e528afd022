"""What a run reports per step: `metrics.jsonl`, accelerate's trackers and the progress bar.

Every rank sums its micro-batches into a `StepTotals`; the writer averages them over ranks into
one record per step (loss, lr, grad norm, answer tokens, samples/s). A resumed run first drops
the records a killed run logged after its last checkpoint, so each step appears once.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from tqdm import tqdm

from mmalign.config import RunConfig, to_dict


class StepTotals:
    """This rank's sums over the micro-batches of one optimizer step."""

    def __init__(self, accum: int) -> None:
        self.accum = accum
        self.sums = torch.zeros(3, dtype=torch.float64)  # loss / accum, answer tokens, samples

    def add(self, loss: torch.Tensor, batch: dict[str, Any]) -> None:
        answer_tokens = int((batch["labels"] != -100).sum())
        self.sums += torch.tensor(
            [loss.item() / self.accum, answer_tokens, batch.get("num_samples", len(batch["input_ids"]))],
            dtype=torch.float64,
        )


def flat_config(cfg: RunConfig) -> dict[str, Any]:
    """Trackers (TensorBoard hparams) take flat scalars."""
    flat = {}
    for section, values in to_dict(cfg).items():
        for key, value in values.items():
            flat[f"{section}.{key}"] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return flat


def _to_float(x: Any) -> float:
    if x is None:
        return float("nan")
    return float(x.item() if hasattr(x, "item") else x)


class MetricsWriter:
    """Records steps to `metrics.jsonl` and the trackers (main process) and the bar; a context
    manager that closes the file and finishes the trackers however the run ends."""

    def __init__(self, accelerator: Accelerator, cfg: RunConfig, resumed_step: int) -> None:
        self.accelerator, self.train_cfg = accelerator, cfg.train
        self.path = Path(cfg.train.output_dir) / "metrics.jsonl"
        self.is_main = accelerator.is_main_process
        self.file = None
        if self.is_main:
            self._drop_records_after(resumed_step)
            self.file = open(self.path, "a")
            if accelerator.log_with:
                accelerator.init_trackers(cfg.train.stage, config=flat_config(cfg))
        self.bar = tqdm(
            total=cfg.train.max_steps,
            initial=resumed_step,
            desc=f"train {cfg.train.stage}",
            unit="step",
            dynamic_ncols=True,
            disable=not self.is_main,
        )
        self.started, self.samples = time.time(), 0

    def _drop_records_after(self, step: int) -> None:
        """A killed run logged steps after its last checkpoint: the resumed run logs them again."""
        if self.path.exists():
            lines = self.path.read_text().splitlines()
            kept = [line for line in lines if line and json.loads(line)["step"] <= step]
            self.path.write_text("".join(line + "\n" for line in kept))

    def log_step(self, step: int, totals: StepTotals, lr: float, grad_norm: Any) -> dict[str, Any]:
        """The step's record, averaged over ranks (a collective: every rank calls it)."""
        world = self.accelerator.num_processes
        sums = totals.sums
        if world > 1:
            sums = self.accelerator.reduce(sums.to(self.accelerator.device), "sum").cpu()
        self.samples += int(sums[2])
        loss = float(sums[0]) / world
        record = {
            "step": step,
            "loss": round(loss, 5),
            "lr": lr,
            "grad_norm": round(_to_float(grad_norm), 4),
            "answer_tokens": int(sums[1]),
            "samples_per_s": round(self.samples / max(time.time() - self.started, 1e-9), 2),
        }
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2e}", sps=record["samples_per_s"])
        if self.is_main and (step % self.train_cfg.log_every == 0 or step == self.train_cfg.max_steps):
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()
            if self.accelerator.log_with:
                self.accelerator.log({k: v for k, v in record.items() if k != "step"}, step=step)
        return record

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.bar.close()
        if self.file is not None:
            self.file.close()
        for tracker in self.accelerator.trackers:
            tracker.finish()
