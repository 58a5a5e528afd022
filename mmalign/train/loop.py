"""The training loop shared by every stage: one process, plain PyTorch, resumable.

A stage is data (a YAML `RunConfig`): which model, which freezing policy, which data, which
schedule. The loop: AdamW with decay only on matrices, warmup + cosine to a floor
(transformers' `cosine_with_min_lr`), gradient accumulation and clipping, a progress bar,
metrics as JSONL, checkpoints of the trainable tensors + optimizer + scheduler + RNG + data
position every `save_every` steps, and exact resume from the newest one.
"""

from __future__ import annotations

import json
import logging
import random
import shutil
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler
from tqdm import tqdm
from transformers import get_scheduler

from mmalign.config import RunConfig, to_dict
from mmalign.data.build import dataset_from_config
from mmalign.data.collate import collate
from mmalign.model import (
    apply_freeze,
    check_image_tokens,
    image_transform_for,
    load_trainable,
    num_image_tokens,
    save_trainable,
)
from mmalign.model.build import model_from_config

log = logging.getLogger(__name__)
STATE_FILE = "trainer_state.pt"
_END = object()


class ResumableSampler(Sampler[int]):
    """Seeded shuffle per epoch that can start mid-epoch, so resume never re-reads samples."""

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed, self.epoch, self.start = n, seed, 0, 0

    def __len__(self) -> int:
        return self.n - self.start

    def __iter__(self) -> Iterator[int]:
        order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + self.epoch)).tolist()
        yield from order[self.start :]


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on matrices only: biases, norms and 1-d tensors are not decayed (MiniGPT-4)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 or name.endswith(".bias") else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _rng_state() -> dict[str, Any]:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


def latest_checkpoint(output_dir: Path) -> Path | None:
    ckpts = sorted(output_dir.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    return next((c for c in reversed(ckpts) if (c / STATE_FILE).is_file()), None)


def train(cfg: RunConfig) -> Path:
    """Run one stage; returns the folder of its final checkpoint (trainable tensors)."""
    tc = cfg.train
    out = Path(tc.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(to_dict(cfg), indent=1))
    random.seed(tc.seed)
    np.random.seed(tc.seed)
    torch.manual_seed(tc.seed)

    model, tokenizer = model_from_config(cfg.model)
    if cfg.model.init_trainable:
        load_trainable(model, cfg.model.init_trainable, strict=False)
        log.info("initialised from %s", cfg.model.init_trainable)
    report = apply_freeze(model, tc.trainable)
    log.info("%s", report)
    n_img = num_image_tokens(model.config)
    dataset = dataset_from_config(cfg.data, tokenizer, n_img, image_transform_for(model))
    sampler = ResumableSampler(len(dataset), tc.seed)
    pad_id = tokenizer.pad_token_id

    def loader() -> DataLoader:
        # its own generator: a loader draws its base seed at iter(), and a draw from the global
        # torch RNG (checkpointed) would make a resumed run's dropout differ from the original's
        return DataLoader(
            dataset, batch_size=tc.batch_size, sampler=sampler, num_workers=cfg.data.num_workers,
            collate_fn=lambda b: collate(b, pad_id), drop_last=False,
            generator=torch.Generator().manual_seed(tc.seed + sampler.epoch),
        )  # fmt: skip

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(param_groups(model, tc.weight_decay), lr=tc.lr, betas=tuple(tc.betas))
    warmup = tc.warmup_steps or int(tc.warmup_ratio * tc.max_steps)
    scheduler = get_scheduler(
        "cosine_with_min_lr", optimizer, num_warmup_steps=warmup, num_training_steps=tc.max_steps,
        scheduler_specific_kwargs={"min_lr": tc.min_lr},
    )  # fmt: skip

    step, consumed = 0, 0  # optimizer steps done; batches consumed in the current epoch
    ckpt = latest_checkpoint(out) if tc.resume else None
    if ckpt is not None:
        load_trainable(model, ckpt)
        state = torch.load(ckpt / STATE_FILE, weights_only=False)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        step, sampler.epoch, consumed = state["step"], state["epoch"], state["consumed"]
        _set_rng_state(state["rng"])
        log.info("resumed from %s at step %d", ckpt, step)
    sampler.start = consumed * tc.batch_size

    metrics_path = out / "metrics.jsonl"
    if metrics_path.exists():  # drop records a killed run logged after its last checkpoint
        kept = [line for line in metrics_path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
        metrics_path.write_text("".join(line + "\n" for line in kept))
    metrics = open(metrics_path, "a")
    bar = tqdm(total=tc.max_steps, initial=step, desc=f"train {tc.stage}", unit="step", dynamic_ncols=True)
    model.train()
    for module in report.frozen_modules(model):  # frozen towers stay in eval mode (no dropout)
        module.eval()
    batches = iter(loader())
    t_start, samples = time.time(), 0
    while step < tc.max_steps:
        loss_sum, tokens = 0.0, 0
        for _ in range(tc.grad_accum):
            batch = next(batches, _END)
            while batch is _END or batch is None:
                if batch is _END:  # end of an epoch: reshuffle with the next epoch's seed
                    sampler.epoch, sampler.start, consumed = sampler.epoch + 1, 0, 0
                    batches = iter(loader())
                else:  # every sample of this batch was skipped (and counted)
                    consumed += 1
                batch = next(batches, _END)
            consumed += 1
            n_images = 0 if batch["pixel_values"] is None else len(batch["pixel_values"])
            check_image_tokens(batch["input_ids"], n_images, model.config)
            n_tok = int((batch["labels"] != -100).sum())
            loss = model(**{k: v for k, v in batch.items() if v is not None}).loss
            (loss / tc.grad_accum).backward()
            loss_sum, tokens, samples = loss_sum + loss.item() / tc.grad_accum, tokens + n_tok, samples + len(batch["input_ids"])
        grad_norm = torch.nn.utils.clip_grad_norm_(params, tc.max_grad_norm).item()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        elapsed = time.time() - t_start
        rec = {"step": step, "loss": round(loss_sum, 5), "lr": scheduler.get_last_lr()[0], "grad_norm": round(grad_norm, 4),
               "answer_tokens": tokens, "samples_per_s": round(samples / max(elapsed, 1e-9), 2)}  # fmt: skip
        bar.update(1)
        bar.set_postfix(loss=f"{loss_sum:.3f}", lr=f"{rec['lr']:.2e}", sps=rec["samples_per_s"])
        if step % tc.log_every == 0 or step == tc.max_steps:
            metrics.write(json.dumps(rec) + "\n")
            metrics.flush()
        if step % tc.save_every == 0 or step == tc.max_steps:
            _save(out, model, optimizer, scheduler, step, sampler.epoch, consumed, tc.keep_checkpoints, cfg)
    bar.close()
    metrics.close()
    skipped = dataset.skipped
    if skipped.get("total") or skipped.get("truncated"):
        log.warning("skipped or truncated samples: %s", skipped)
    (out / "data_report.json").write_text(json.dumps(skipped, indent=1, default=str))
    return out / f"checkpoint-{step}"


def _save(out: Path, model, optimizer, scheduler, step: int, epoch: int, consumed: int, keep: int, cfg: RunConfig) -> None:
    ckpt = out / f"checkpoint-{step}"
    tmp = out / f".tmp-checkpoint-{step}"
    shutil.rmtree(tmp, ignore_errors=True)
    save_trainable(model, tmp, extra={"step": step, "config": to_dict(cfg)})
    torch.save(
        {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "step": step, "epoch": epoch,
         "consumed": consumed, "rng": _rng_state()},
        tmp / STATE_FILE,
    )  # fmt: skip
    shutil.rmtree(ckpt, ignore_errors=True)
    tmp.rename(ckpt)  # a checkpoint appears whole or not at all
    old = sorted(out.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))[:-keep]
    for p in old:
        shutil.rmtree(p, ignore_errors=True)
