"""One training stage, start to finish: `StageRun.run()` is its outline.

A stage is data (a YAML `RunConfig`): which model, which freezing policy (+ LoRA), which data,
which schedule. The run sets up the model, the data, the optimizer and its schedule, hands
model and optimizer to the engine (one process / DDP, FSDP2, DeepSpeed: `engines.py`), resumes
from the newest checkpoint if there is one, steps, and reports. Checkpoints every `save_every`
steps hold the trainable tensors, optimizer, schedule, and each rank's data position + RNG
(`state.py`), so a resumed run gives the same per-step losses as one never stopped.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from mmalign.config import RunConfig, recipe_departures, to_dict, with_recipe_defaults
from mmalign.data.build import check_data, dataset_from_config, pack_tokens_of, sampler_from_config
from mmalign.data.stream import merge_summaries
from mmalign.model import check_image_tokens, load_trainable, model_from_config, num_image_tokens, train_image_transform
from mmalign.model.checkpoint import save_tensors
from mmalign.model.features import cached_part_trains, feature_fingerprint
from mmalign.model.inputs import training_inputs
from mmalign.train.batches import BatchSource
from mmalign.train.engines import make_engine
from mmalign.train.lora import prepare_quantized
from mmalign.train.metrics import MetricsWriter, StepTotals
from mmalign.train.optim import make_optimizer, make_schedule
from mmalign.train.state import (
    RANK_FILE,
    STATE_FILE,
    CheckpointFolders,
    TrainingState,
    rank_state_to_resume,
    seed_everything,
    trainer_state,
)
from mmalign.train.trainable import (
    check_compile,
    check_trainable_precision,
    compile_language_model,
    enable_gradient_checkpointing,
    freeze_for_stage,
    set_train_modes,
)

log = logging.getLogger(__name__)


def train(cfg: RunConfig) -> Path:
    """Run one stage; returns the folder of its final checkpoint (trainable tensors)."""
    return StageRun(cfg).run()


class StageRun:
    """One stage on the engine the launcher chose. Subclasses may override `build_dataset` (what
    data) and `on_batch` (a hook before each batch's forward)."""

    def __init__(self, cfg: RunConfig) -> None:
        for line in recipe_departures(cfg):
            log.info("%s", line)
        cfg = with_recipe_defaults(cfg)  # the template, caption format and policy the config leaves to its recipe
        self.cfg, self.train_cfg = cfg, cfg.train
        self.output_dir = Path(cfg.train.output_dir)
        self.engine = make_engine(cfg.train, self.output_dir)  # chosen once, from the launcher
        self.accelerator = self.engine.accelerator
        self.is_main = self.accelerator.is_main_process
        self.state = TrainingState(
            seed=cfg.train.seed, rank=self.accelerator.process_index, world=self.accelerator.num_processes
        )
        self.checkpoints = CheckpointFolders(
            self.output_dir, cfg.train.keep_checkpoints, self.is_main, self.accelerator.wait_for_everyone
        )

    def run(self) -> Path:
        """The stage's outline; the order of the calls is the order the steps depend on."""
        self.write_run_config()
        check_data(self.cfg.data)  # a broken data file stops the run now, not after minutes of model loading
        self.setup_model()  # the same seed on every rank: identical initial weights (and LoRA)
        self.setup_data()
        self.setup_optimizer()
        checkpoint = self.checkpoints.latest() if self.train_cfg.resume else None
        if checkpoint is not None:
            load_trainable(self.model, checkpoint)  # full tensors, before the engine shards them
        self.model, self.optimizer = self.engine.prepare(self.model, self.optimizer)
        self.start_position(checkpoint)  # last: it sets the RNG streams the steps draw from
        with MetricsWriter(self.accelerator, self.cfg, resumed_step=self.state.step) as self.metrics:
            self.train_steps()
        return self.finish()

    def write_run_config(self) -> None:
        if self.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            (self.output_dir / "config.json").write_text(json.dumps(to_dict(self.cfg), indent=1))

    def setup_model(self) -> None:
        """Placement, stage-1 tensors, freezing + LoRA, checkpointing, precision, compile."""
        seed_everything(self.train_cfg.seed)
        model, self.tokenizer = model_from_config(self.engine.place(self.cfg.model))
        if self.cfg.model.quantization:
            prepare_quantized(model, self.train_cfg)
        if self.cfg.model.init_trainable:
            load_trainable(model, self.cfg.model.init_trainable, strict=False)
            log.info("initialised from %s", self.cfg.model.init_trainable)
        self.frozen = freeze_for_stage(model, self.cfg, self.is_main).frozen_modules(model)
        trains = cached_part_trains(model) if self.cfg.data.features else []
        if trains:
            raise ValueError(
                f"data.features={self.cfg.data.features}: train.trainable={self.train_cfg.trainable} trains "
                f"{trains[0]} (and {len(trains) - 1} more) of the frozen part the cache replaces; "
                "train from images (data.features=null)"
            )
        if self.train_cfg.gradient_checkpointing:
            enable_gradient_checkpointing(model)
        check_trainable_precision(model, self.cfg)
        self.engine.prepare_precision(model)
        if self.train_cfg.compile:
            check_compile(self.engine.name, self.cfg.model.quantization)
            compile_language_model(model)
        self.trainable_names = [n for n, p in model.named_parameters() if p.requires_grad]
        self.model, self.model_config = model, model.config

    def build_dataset(self) -> Dataset:
        """This rank's dataset (map-style, or a stream that splits by rank itself); with
        ``data.features`` the cached features of exactly this model's frozen part and transform."""
        transform = train_image_transform(self.model, self.cfg)  # the feature cache's too
        fingerprint = None
        if self.cfg.data.features:
            fingerprint = feature_fingerprint(self.model, transform, self.train_cfg.mixed_precision)
        return dataset_from_config(
            self.cfg.data,
            self.tokenizer,
            num_image_tokens(self.model_config),
            transform,
            seed=self.train_cfg.seed,
            batch_size=self.train_cfg.batch_size,
            rank=self.state.rank,
            world=self.state.world,
            fingerprint=fingerprint,
        )

    def setup_data(self) -> None:
        dataset = self.build_dataset()
        batch_size = self.train_cfg.batch_size
        grouped = sampler_from_config(
            self.cfg.data, dataset, batch_size, world_size=self.state.world, seed=self.state.seed
        )
        self.batches = BatchSource(
            dataset,
            self.state,
            batch_size,
            pad_id=self.tokenizer.pad_token_id,
            num_workers=self.cfg.data.num_workers,
            order=grouped.epoch_order if grouped else None,
            pack_tokens=pack_tokens_of(self.cfg.data),
        )

    def setup_optimizer(self) -> None:
        self.optimizer = make_optimizer(self.model, self.train_cfg)
        self.scheduler = make_schedule(self.optimizer, self.train_cfg)

    def start_position(self, checkpoint: Path | None) -> None:
        """Optimizer, schedule, data position and RNG streams: from `checkpoint`, or fresh. Nothing
        after it may draw random numbers before the first batch (a resumed run would diverge)."""
        if checkpoint is None:
            self.state.start_fresh_streams()
            return
        shared = torch.load(checkpoint / STATE_FILE, weights_only=False)
        self.engine.load_optimizer(self.optimizer, checkpoint, shared.get("optimizer"))
        self.scheduler.load_state_dict(shared["scheduler"])
        mine = rank_state_to_resume(checkpoint, shared, self.state, self.train_cfg.batch_size, self.batches.streamed)
        self.state.load_state_dict(mine)
        log.info("resumed from %s at step %d", checkpoint, self.state.step)

    def train_steps(self) -> None:
        set_train_modes(self.model, self.frozen, self.train_cfg.gradient_checkpointing)
        params = [p for p in self.model.parameters() if p.requires_grad]
        while self.state.step < self.train_cfg.max_steps:
            totals = StepTotals(self.engine.accum)
            for _ in range(self.engine.accum):
                batch = self.batches.next()
                self.on_batch(batch)
                totals.add(self.forward_backward(batch), batch)
            grad_norm, applied = self.engine.optimizer_step(self.optimizer, params)
            if applied:
                self.scheduler.step()
            self.state.step += 1
            self.metrics.log_step(self.state.step, totals, self.scheduler.get_last_lr()[0], grad_norm)
            if self.state.step % self.train_cfg.save_every == 0 or self.state.step == self.train_cfg.max_steps:
                self.save_checkpoint()

    def on_batch(self, batch: dict[str, Any]) -> None:
        """Called with each usable batch before its forward (tests stop a run here at a chosen batch)."""

    def forward_backward(self, batch: dict[str, Any]) -> torch.Tensor:
        images = batch.get("image_features", batch["pixel_values"])
        check_image_tokens(batch["input_ids"], 0 if images is None else len(images), self.model_config)
        inputs = training_inputs(self.engine.module, batch, self.accelerator.device)
        with self.engine.accumulate(self.model):
            loss = self.model(**inputs).loss
            self.engine.backward(loss)
        return loss

    def save_checkpoint(self) -> None:
        """A collective: every rank gathers / writes its part; the folder appears whole or not at all."""
        step = self.state.step
        folder = self.checkpoints.begin(step)
        tensors = self.engine.gather_trainable(self.trainable_names)
        optimizer_state = self.engine.save_optimizer(self.optimizer, folder)
        torch.save(self.state.state_dict(), folder / RANK_FILE.format(self.state.rank))
        if self.is_main:
            model_type = getattr(self.model_config, "model_type", None)
            save_tensors(tensors, folder, model_type, extra={"step": step, "config": to_dict(self.cfg)})
            shared = trainer_state(self.state, self.scheduler, optimizer_state, self.train_cfg.batch_size)
            torch.save(shared, folder / STATE_FILE)
        self.checkpoints.commit(step)

    def finish(self) -> Path:
        """The data report (skipped / truncated samples over all ranks) and the loss plot."""
        skipped = [self.batches.skipped]
        if self.state.world > 1:
            from accelerate.utils import gather_object

            skipped = gather_object(skipped)
        if self.is_main:
            report = merge_summaries(skipped)
            if report.get("total") or report.get("truncated"):
                log.warning("skipped or truncated samples: %s", report)
            (self.output_dir / "data_report.json").write_text(json.dumps(report, indent=1, default=str))
            if self.train_cfg.plot:
                from mmalign.train.plot import plot_metrics

                title = f"{self.train_cfg.stage}: {self.output_dir}"
                plot_metrics(self.metrics.path, self.output_dir / "loss.png", title=title)
        self.accelerator.wait_for_everyone()
        return self.output_dir / f"checkpoint-{self.state.step}"
