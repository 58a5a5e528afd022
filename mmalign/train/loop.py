"""The training loop shared by every stage, on any engine accelerate launches, resumable.

A stage is data (a YAML `RunConfig`): which model, which freezing policy (+ LoRA), which data,
which schedule. The loop: AdamW with decay only on matrices and optional per-part learning
rates, warmup + cosine to a floor (transformers' `cosine_with_min_lr`), gradient accumulation
that keeps the global batch, clipping, mixed precision, a progress bar, metrics as JSONL (+
optional trackers) and a loss / lr plot, checkpoints of the trainable tensors + optimizer +
scheduler + per-rank RNG + data position every `save_every` steps, and exact resume from the
newest one. One process, DDP, FSDP and DeepSpeed all run this same code: `Accelerator` comes
from the launcher's environment (see `mmalign.train.distributed` and docs/train_multi_gpu.md).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import random
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, Sampler
from tqdm import tqdm
from transformers import get_scheduler

from mmalign.config import RunConfig, TrainConfig, recipe_departures, to_dict, with_recipe_defaults
from mmalign.data.build import check_data, dataset_from_config, sampler_from_config
from mmalign.data.collate import collate
from mmalign.data.stream import merge_summaries
from mmalign.model import (
    apply_freeze,
    check_image_tokens,
    load_trainable,
    model_from_config,
    num_image_tokens,
    train_image_transform,
)
from mmalign.model.checkpoint import save_tensors
from mmalign.model.freeze import role_of
from mmalign.train import distributed as dist_utils
from mmalign.train.lora import apply_lora, prepare_quantized

log = logging.getLogger(__name__)
STATE_FILE = "trainer_state.pt"
RANK_FILE = "rank-{}.pt"  # per-rank RNG states + data position
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


def param_groups(
    model: torch.nn.Module, weight_decay: float, role_lr: dict[str, float] | None = None
) -> list[dict[str, Any]]:
    """Weight decay on matrices only: biases, norms and 1-d tensors are not decayed (MiniGPT-4).

    `role_lr` ({"projector": 2e-5, ...}) gives a part its own learning rate (LLaVA's
    `mm_projector_lr`); parts not named use the optimizer's default lr."""
    role_lr = role_lr or {}
    groups: dict[tuple[float | None, bool], list[torch.nn.Parameter]] = {(None, True): [], (None, False): []}
    for name, p in model.named_parameters():
        if p.requires_grad:
            lr = role_lr.get(role_of(model, name)) if role_lr else None
            decay = not (p.ndim < 2 or name.endswith(".bias"))
            groups.setdefault((lr, decay), []).append(p)
    out = []
    for (lr, decay), params in groups.items():
        if params or lr is None:  # the two default groups always exist (stable optimizer layout)
            out.append(
                {
                    "params": params,
                    "weight_decay": weight_decay if decay else 0.0,
                    **({"lr": lr} if lr is not None else {}),
                }
            )
    return out


def _role_lrs(tc: TrainConfig) -> dict[str, float]:
    return {role: lr for role, lr in (("projector", tc.projector_lr), ("vision", tc.vision_lr)) if lr is not None}


def _rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def latest_checkpoint(output_dir: Path) -> Path | None:
    ckpts = sorted(output_dir.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    return next((c for c in reversed(ckpts) if (c / STATE_FILE).is_file()), None)


def _modes(model: torch.nn.Module, frozen: list[torch.nn.Module], checkpointing: bool) -> None:
    """Train mode, with frozen towers in eval mode (no dropout), as the originals do. HF only
    checkpoints modules in train mode, so with gradient checkpointing a frozen tower stays in
    train mode (gradients still flow through a frozen LLM to the projector) with its dropout off."""
    model.train()
    for module in frozen:
        if not checkpointing:
            module.eval()
        else:
            for sub in module.modules():
                if isinstance(sub, torch.nn.Dropout):
                    sub.eval()


def train(cfg: RunConfig) -> Path:
    """Run one stage; returns the folder of its final checkpoint (trainable tensors)."""
    for line in recipe_departures(cfg):
        log.info("%s", line)
    cfg = with_recipe_defaults(cfg)
    tc = cfg.train
    out = Path(tc.output_dir)
    accelerator, accum = dist_utils.make_accelerator(tc, out)
    try:
        return _train(cfg, accelerator, accum)
    finally:
        for tracker in accelerator.trackers:
            tracker.finish()


def _train(cfg: RunConfig, accelerator, accum: int) -> Path:
    tc = cfg.train
    out = Path(tc.output_dir)
    rank, world, main = accelerator.process_index, accelerator.num_processes, accelerator.is_main_process
    engine = dist_utils.engine_of(accelerator)
    if main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(to_dict(cfg), indent=1))
    _seed(tc.seed)  # the same on every rank: identical model (and LoRA) initialisation

    model_cfg = cfg.model
    if engine == "replicated" and accelerator.device.type != "cpu":
        model_cfg = dataclasses.replace(cfg.model, device=str(accelerator.device))  # this rank's GPU
    elif engine != "replicated":
        model_cfg = dataclasses.replace(cfg.model, device="cpu")  # FSDP / DeepSpeed place the shards
    check_data(cfg.data)  # a broken data file stops the run now, not after minutes of model loading
    model, tokenizer = model_from_config(model_cfg)
    if cfg.model.quantization:
        prepare_quantized(model, tc)
    if cfg.model.init_trainable:
        load_trainable(model, cfg.model.init_trainable, strict=False)
        log.info("initialised from %s", cfg.model.init_trainable)
    report = apply_freeze(model, tc.trainable)
    if tc.lora_r:
        apply_lora(model, tc)  # LoRA weights join the trainable set (LLM role)
        report = dataclasses.replace(
            report, trainable_names=[n for n, p in model.named_parameters() if p.requires_grad]
        )
    if main:
        log.info("%s", report)
        if tc.lora_r:
            n = sum(p.numel() for p in model.parameters() if p.requires_grad)
            log.info("with LoRA (r=%d): %s trainable parameters", tc.lora_r, f"{n:,}")
    frozen = report.frozen_modules(model)
    if tc.gradient_checkpointing:
        enable = getattr(model, "activation_checkpointing_enable", None)  # transformers >= 5.2x name
        if enable is not None:
            enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if model.get_input_embeddings().weight.requires_grad is False:
            model.enable_input_require_grads()  # LLM frozen / LoRA: keep the graph from the embeddings
    half = [n for n, p in model.named_parameters() if p.requires_grad and p.dtype in (torch.float16, torch.bfloat16)]
    if half and tc.mixed_precision == "no":
        raise ValueError(
            f"model.dtype={cfg.model.dtype} trains {half[0]} (and {len(half) - 1} more) in half precision, "
            "where AdamW's updates vanish or turn NaN: set train.mixed_precision=fp16|bf16 "
            "(trainable weights are then kept in float32)"
        )
    if tc.mixed_precision != "no" and engine == "replicated":
        for p in model.parameters():  # autocast computes in half; the weights AdamW updates stay float32
            if p.requires_grad and p.dtype != torch.float32:
                p.data = p.data.float()
    names = [n for n, p in model.named_parameters() if p.requires_grad]

    n_img = num_image_tokens(model.config)
    dataset = dataset_from_config(
        cfg.data,
        tokenizer,
        n_img,
        train_image_transform(model, cfg),  # data.train_transform (the recipe's), else the eval transform
        seed=tc.seed,
        batch_size=tc.batch_size,
        rank=rank,
        world=world,
    )
    streamed = isinstance(dataset, IterableDataset)
    grouped = sampler_from_config(cfg.data, dataset, tc.batch_size, world_size=world, seed=tc.seed)
    sampler = (
        None
        if streamed
        else ResumableSampler(len(dataset), tc.seed, tc.batch_size, rank, world, order=grouped and grouped.epoch_order)
    )
    pad_id = tokenizer.pad_token_id
    position = {"epoch": 0, "consumed": 0}  # this rank's batches consumed in the current epoch

    def loader() -> DataLoader:
        # built here, not by accelerate: the sampler already splits by rank and resumes mid-epoch,
        # streams split themselves. Its own generator: a loader draws its base seed at iter(), and
        # a draw from the global torch RNG (checkpointed) would change a resumed run's dropout
        if streamed:
            if hasattr(dataset, "set_epoch"):
                dataset.set_epoch(position["epoch"])
            if hasattr(dataset, "set_resume"):
                dataset.set_resume(position["consumed"], tc.batch_size)
        else:
            sampler.epoch, sampler.start = position["epoch"], position["consumed"]
        return DataLoader(
            dataset,
            batch_size=tc.batch_size,
            sampler=sampler,
            num_workers=cfg.data.num_workers,
            collate_fn=lambda b: collate(b, pad_id),
            drop_last=False,
            generator=torch.Generator().manual_seed(tc.seed + position["epoch"] + 1000 * rank),
        )

    optimizer = torch.optim.AdamW(param_groups(model, tc.weight_decay, _role_lrs(tc)), lr=tc.lr, betas=tuple(tc.betas))
    warmup = tc.warmup_steps or int(tc.warmup_ratio * tc.max_steps)
    scheduler = get_scheduler(
        "cosine_with_min_lr",
        optimizer,
        num_warmup_steps=warmup,
        num_training_steps=tc.max_steps,
        scheduler_specific_kwargs={"min_lr": tc.min_lr},
    )

    step, rng = 0, None
    ckpt = latest_checkpoint(out) if tc.resume else None
    state: dict[str, Any] = {}
    if ckpt is not None:
        load_trainable(model, ckpt)
        state = torch.load(ckpt / STATE_FILE, weights_only=False)
        scheduler.load_state_dict(state["scheduler"])
        step = state["step"]
        rng = _resume_position(ckpt, state, position, rank, world, tc, streamed)
    if world > 1 and rng is None:
        _seed(tc.seed + rank)  # ranks draw different dropout / augmentation streams

    if engine == "fsdp" and accelerator.state.fsdp_plugin.transformer_cls_names_to_wrap is None:
        accelerator.state.fsdp_plugin.transformer_cls_names_to_wrap = dist_utils.fsdp_wrap_classes(model)
    raw = model
    model, optimizer = accelerator.prepare(model, optimizer)
    if ckpt is not None:
        dist_utils.load_optimizer(accelerator, model, optimizer, ckpt, state.get("optimizer"))
        log.info("resumed from %s at step %d", ckpt, step)
    if rng is not None:
        _set_rng_state(rng)  # last: nothing above may draw from the restored streams
    params = [p for p in model.parameters() if p.requires_grad]
    model_config = raw.config

    metrics_path = out / "metrics.jsonl"
    metrics = None
    if main:
        if metrics_path.exists():  # drop records a killed run logged after its last checkpoint
            kept = [line for line in metrics_path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
            metrics_path.write_text("".join(line + "\n" for line in kept))
        metrics = open(metrics_path, "a")
        if accelerator.log_with:
            accelerator.init_trackers(tc.stage, config=_flat_config(cfg))
    bar = tqdm(
        total=tc.max_steps, initial=step, desc=f"train {tc.stage}", unit="step", dynamic_ncols=True, disable=not main
    )
    _modes(model, frozen, tc.gradient_checkpointing)
    batches = iter(loader())
    had_batch = position["consumed"] > 0  # this epoch gave a usable batch (a resumed epoch did)
    t_start, samples = time.time(), 0
    while step < tc.max_steps:
        sums = torch.zeros(3, dtype=torch.float64)  # loss / accum, answer tokens, samples (this rank)
        for _ in range(accum):
            batch = next(batches, _END)
            while batch is _END or batch is None:
                if batch is _END:  # end of an epoch: reshuffle with the next epoch's seed
                    if not had_batch:
                        raise RuntimeError(
                            f"rank {rank}: epoch {position['epoch']} gave no usable batch (no data for "
                            "this rank, or every sample skipped: see the log) - stopping instead of "
                            "spinning while other ranks wait"
                        )
                    position["epoch"], position["consumed"], had_batch = position["epoch"] + 1, 0, False
                    batches = iter(loader())
                else:  # every sample of this batch was skipped (and counted)
                    position["consumed"] += 1
                batch = next(batches, _END)
            position["consumed"] += 1
            had_batch = True
            n_images = 0 if batch["pixel_values"] is None else len(batch["pixel_values"])
            check_image_tokens(batch["input_ids"], n_images, model_config)
            inputs = {k: v.to(accelerator.device) for k, v in batch.items() if v is not None}
            with accelerator.accumulate(model):
                loss = model(**inputs).loss
                accelerator.backward(loss)  # divides by the accumulation steps
            sums += torch.tensor(
                [loss.item() / accum, int((batch["labels"] != -100).sum()), len(batch["input_ids"])],
                dtype=torch.float64,
            )
        grad_norm = accelerator.clip_grad_norm_(params, tc.max_grad_norm)
        optimizer.step()
        if not accelerator.optimizer_step_was_skipped:  # fp16 overflow: the schedule waits too
            scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        total = accelerator.reduce(sums.to(accelerator.device), "sum").cpu() if world > 1 else sums
        samples += int(total[2])
        elapsed = time.time() - t_start
        loss_mean = float(total[0]) / world
        lr = scheduler.get_last_lr()[0]
        rec = {
            "step": step,
            "loss": round(loss_mean, 5),
            "lr": lr,
            "grad_norm": round(_to_float(grad_norm), 4),
            "answer_tokens": int(total[1]),
            "samples_per_s": round(samples / max(elapsed, 1e-9), 2),
        }
        bar.update(1)
        bar.set_postfix(loss=f"{loss_mean:.3f}", lr=f"{lr:.2e}", sps=rec["samples_per_s"])
        if main and (step % tc.log_every == 0 or step == tc.max_steps):
            metrics.write(json.dumps(rec) + "\n")
            metrics.flush()
            if accelerator.log_with:
                accelerator.log({k: v for k, v in rec.items() if k != "step"}, step=step)
        if step % tc.save_every == 0 or step == tc.max_steps:
            _save(accelerator, out, model, raw, names, optimizer, scheduler, step, position, cfg)
    bar.close()
    skipped = [getattr(dataset, "skipped", None) or {}]
    if world > 1:
        from accelerate.utils import gather_object

        skipped = gather_object(skipped)
    if main:
        metrics.close()
        report_data = merge_summaries(skipped)
        if report_data.get("total") or report_data.get("truncated"):
            log.warning("skipped or truncated samples: %s", report_data)
        (out / "data_report.json").write_text(json.dumps(report_data, indent=1, default=str))
        if tc.plot:
            from mmalign.train.plot import plot_metrics

            plot_metrics(metrics_path, out / "loss.png", title=f"{tc.stage}: {out}")
    accelerator.wait_for_everyone()
    return out / f"checkpoint-{step}"


def _to_float(x: Any) -> float:
    if x is None:
        return float("nan")
    return float(x.item() if hasattr(x, "item") else x)


def _flat_config(cfg: RunConfig) -> dict[str, Any]:
    """Trackers (TensorBoard hparams) take flat scalars."""
    flat = {}
    for section, values in to_dict(cfg).items():
        for k, v in values.items():
            flat[f"{section}.{k}"] = v if isinstance(v, (int, float, str, bool)) else str(v)
    return flat


def _resume_position(ckpt: Path, state: dict, position: dict, rank: int, world: int, tc: TrainConfig, streamed: bool):
    """This rank's data position (and RNG states, if it saved them) from a checkpoint.

    The same process count resumes exactly. A different one continues at the same number of
    samples of the same epoch (map-style data), with fresh RNG streams."""
    rank_file = ckpt / RANK_FILE.format(rank)
    saved_world = state.get("world_size", 1)
    if saved_world == world and rank_file.is_file():
        mine = torch.load(rank_file, weights_only=False)
        position["epoch"], position["consumed"] = mine["epoch"], mine["consumed"]
        return mine["rng"]
    if saved_world == world and world == 1 and "rng" in state:  # written before per-rank files existed
        position["epoch"], position["consumed"] = state["epoch"], state["consumed"]
        return state["rng"]
    if streamed:
        raise ValueError(
            f"{ckpt}: written by {saved_world} process(es); a streamed dataset resumes only with the same count"
        )
    seen = state["consumed"] * state.get("batch_size", tc.batch_size) * saved_world
    if seen % (tc.batch_size * world):
        raise ValueError(
            f"{ckpt}: {seen} samples of epoch {state['epoch']} were consumed by {saved_world} process(es), not a "
            f"multiple of batch_size {tc.batch_size} x {world} processes; resume with the old layout"
        )
    position["epoch"], position["consumed"] = state["epoch"], seen // (tc.batch_size * world)
    log.warning(
        "%s: %d -> %d processes; continuing at sample %d of epoch %d with fresh RNG streams",
        ckpt,
        saved_world,
        world,
        seen,
        state["epoch"],
    )
    return None


def _save(
    accelerator,
    out: Path,
    model,
    raw,
    names: list[str],
    optimizer,
    scheduler,
    step: int,
    position: dict,
    cfg: RunConfig,
) -> None:
    """A collective: every rank gathers / writes its part; the folder appears whole or not at all."""
    main, rank = accelerator.is_main_process, accelerator.process_index
    ckpt = out / f"checkpoint-{step}"
    tmp = out / f".tmp-checkpoint-{step}"
    if main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    tensors = dist_utils.gather_trainable(accelerator, model, raw, names)
    optim_state = dist_utils.save_optimizer(accelerator, model, optimizer, tmp)
    torch.save({"rng": _rng_state(), **position}, tmp / RANK_FILE.format(rank))
    if main:
        model_type = getattr(raw.config, "model_type", None)
        save_tensors(tensors, tmp, model_type, extra={"step": step, "config": to_dict(cfg)})
        torch.save(
            {
                "optimizer": optim_state,
                "scheduler": scheduler.state_dict(),
                "step": step,
                **position,
                "world_size": accelerator.num_processes,
                "batch_size": cfg.train.batch_size,
            },
            tmp / STATE_FILE,
        )
    accelerator.wait_for_everyone()
    if main:
        shutil.rmtree(ckpt, ignore_errors=True)
        tmp.rename(ckpt)
        old = sorted(out.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))[: -cfg.train.keep_checkpoints]
        for p in old:
            shutil.rmtree(p, ignore_errors=True)
    accelerator.wait_for_everyone()
