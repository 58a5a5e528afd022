"""The engines a stage runs on: one process / DDP, FSDP2, DeepSpeed ZeRO-2/3; chosen once.

The launcher chooses, not the run config: `accelerate launch --config_file
configs/accelerate/<engine>.yaml` sets `ACCELERATE_USE_FSDP` / `ACCELERATE_USE_DEEPSPEED` (plain
`torchrun` with one of them set does the same; without, DDP). Each engine owns where the model
is built, how its precision is prepared, wrapping / sharding it with its optimizer, the step
mechanics, gathering trainable tensors and saving / loading optimizer state; the stage run only
calls these.

FSDP2 and DeepSpeed shard the model themselves (torch `fully_shard`, `deepspeed.initialize`)
and keep accelerate in its plain multi-process mode (process group, accumulation, trackers):
accelerate turns both down without a GPU, and this way the code GPUs run is the code the CPU
tests run (docs/train_multi_gpu.md).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator

from mmalign.config import ModelConfig, TrainConfig

log = logging.getLogger(__name__)
ENGINE_DIR = "engine"  # FSDP / DeepSpeed optimizer shards inside a checkpoint folder
_LAUNCHER_SWITCHES = {"ACCELERATE_USE_DEEPSPEED": "deepspeed", "ACCELERATE_USE_FSDP": "fsdp"}


def grad_accum_for(train_cfg: TrainConfig, num_processes: int) -> int:
    """Accumulation steps so that per-device batch x accumulation x processes = global batch.

    Without `global_batch_size` the config's `grad_accum` is used as is (the global batch then
    grows with the process count)."""
    if train_cfg.global_batch_size is None:
        return train_cfg.grad_accum
    per_step = train_cfg.batch_size * num_processes
    if train_cfg.global_batch_size % per_step:
        raise ValueError(
            f"train.global_batch_size={train_cfg.global_batch_size} is not a multiple of "
            f"train.batch_size={train_cfg.batch_size} x {num_processes} processes = {per_step}; "
            "change the per-device batch or the process count"
        )
    return train_cfg.global_batch_size // per_step


def requested_engine() -> str:
    """ "deepspeed", "fsdp" or "replicated" (one process / DDP), from the launcher's environment."""
    for variable, kind in _LAUNCHER_SWITCHES.items():
        if os.environ.get(variable, "false").lower() == "true":
            return kind
    return "replicated"


@contextlib.contextmanager
def _accelerate_in_plain_mode() -> Iterator[None]:
    """Hide the launcher's FSDP / DeepSpeed switches while accelerate starts: our engines shard."""
    saved = {name: os.environ.pop(name) for name in _LAUNCHER_SWITCHES if name in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def _make_accelerator(train_cfg: TrainConfig, output_dir: Path) -> tuple[Accelerator, int]:
    """The Accelerator for this run (process group from the launcher) + its accumulation."""
    from accelerate.state import AcceleratorState, GradientState, PartialState

    # one run, one configuration: an earlier run in this process (stage 1 before stage 2, tests)
    # may have used other precision / accumulation settings; the process group (PartialState) stays
    AcceleratorState._reset_state()
    GradientState._reset_state()
    # torchrun on a machine without an accelerator: accelerate runs multi-process CPU (gloo)
    # only when told it is on CPU
    device_api = getattr(torch, "accelerator", None)
    cpu = not (device_api.is_available() if device_api is not None else torch.cuda.is_available())
    trackers = [t.strip() for t in train_cfg.report_to.split(",") if t.strip() and t.strip() != "none"]
    with _accelerate_in_plain_mode():
        accum = grad_accum_for(train_cfg, PartialState(cpu=cpu).num_processes)
        accelerator = Accelerator(
            cpu=cpu,
            gradient_accumulation_steps=accum,
            mixed_precision=train_cfg.mixed_precision,
            log_with=trackers or None,
            project_dir=str(output_dir),
        )
    active = {str(t.value if hasattr(t, "value") else t) for t in accelerator.log_with}
    missing = [t for t in trackers if t not in active]
    if missing:  # accelerate drops a tracker whose package is missing with only a debug message
        raise ValueError(
            f"train.report_to: {missing} not installed here; pip install -e '.[track]' (tensorboard, wandb)"
        )
    return accelerator, accum


def make_engine(train_cfg: TrainConfig, output_dir: Path) -> Engine:
    """The engine the launcher asked for, on a fresh Accelerator; logs how the global batch is made."""
    kind = requested_engine()
    accelerator, accum = _make_accelerator(train_cfg, output_dir)
    engine = {"replicated": ReplicatedEngine, "fsdp": FSDPEngine, "deepspeed": DeepSpeedEngine}[kind](
        accelerator, train_cfg, accum
    )
    world = accelerator.num_processes
    note = (
        ""
        if train_cfg.global_batch_size is None
        else f" (train.global_batch_size; train.grad_accum={train_cfg.grad_accum} ignored)"
    )
    if accelerator.is_main_process:
        log.info(
            "engine %s on %s, %d process(es): global batch %d = %d per device x %d accumulation x %d process(es)%s",
            engine.name,
            accelerator.distributed_type.value,
            world,
            train_cfg.batch_size * accum * world,
            train_cfg.batch_size,
            accum,
            world,
            note,
        )
    return engine


class Engine:
    """What a stage run asks of the engine it runs on. The defaults are accelerate's plain mode:
    its accumulation, backward (loss scaling), clipping and (fp16-skippable) optimizer step."""

    name = "engine"

    def __init__(self, accelerator: Accelerator, train_cfg: TrainConfig, accum: int) -> None:
        self.accelerator, self.train_cfg, self.accum = accelerator, train_cfg, accum
        self.module: torch.nn.Module | None = None  # the model as given to `prepare`, for gathering

    def place(self, model_cfg: ModelConfig) -> ModelConfig:
        """Where the model is built: on CPU, and `prepare` moves its shards to the device."""
        return dataclasses.replace(model_cfg, device="cpu")

    def prepare_precision(self, model: torch.nn.Module) -> None:
        """Make the weights fit the engine's mixed precision (before the optimizer is built)."""

    def prepare(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[Any, Any]:
        raise NotImplementedError

    def accumulate(self, model: torch.nn.Module) -> contextlib.AbstractContextManager:
        """The context of one micro-batch's forward and backward (DDP skips the sync but at the last)."""
        return self.accelerator.accumulate(model)

    def backward(self, loss: torch.Tensor) -> None:
        self.accelerator.backward(loss)  # divides by the accumulation steps

    def optimizer_step(self, optimizer: Any, params: list[torch.nn.Parameter]) -> tuple[Any, bool]:
        """Clip, step and zero the gradients; (grad norm, whether the step was applied)."""
        grad_norm = self.accelerator.clip_grad_norm_(params, self.train_cfg.max_grad_norm)
        optimizer.step()
        applied = not self.accelerator.optimizer_step_was_skipped  # fp16 overflow: the schedule waits too
        optimizer.zero_grad(set_to_none=True)
        return grad_norm, applied

    def gather_trainable(self, names: list[str]) -> dict[str, torch.Tensor]:
        """Full CPU copies of the trainable tensors `names`. A collective: every rank calls it;
        the result is meaningful on the main process."""
        params = dict(self.module.named_parameters())
        return {n: params[n].detach().cpu().contiguous() for n in names}

    def save_optimizer(self, optimizer: Any, folder: Path) -> dict | None:
        """The optimizer state for trainer_state.pt, or None where each rank wrote its shard under
        `folder/engine` (a collective)."""
        raise NotImplementedError

    def load_optimizer(self, optimizer: Any, folder: Path, state: dict | None) -> None:
        """The counterpart of `save_optimizer`, called after `prepare`."""
        raise NotImplementedError

    def _engine_dir(self, folder: Path, must_exist: bool = False) -> Path:
        engine_dir = folder / ENGINE_DIR
        if must_exist and not engine_dir.is_dir():
            raise ValueError(
                f"{folder}: no {ENGINE_DIR}/ folder; a checkpoint of a replicated run cannot resume under {self.name}"
            )
        return engine_dir


class ReplicatedEngine(Engine):
    """One process, or DDP: every rank holds the whole model; accelerate wraps it (DDP) and
    autocasts its forward under mixed precision. The trainable tensors stay float32 masters."""

    def __init__(self, accelerator: Accelerator, train_cfg: TrainConfig, accum: int) -> None:
        super().__init__(accelerator, train_cfg, accum)
        self.name = "DDP" if accelerator.num_processes > 1 else "single process"

    def place(self, model_cfg: ModelConfig) -> ModelConfig:
        if self.accelerator.device.type != "cpu":
            return dataclasses.replace(model_cfg, device=str(self.accelerator.device))  # this rank's GPU
        return model_cfg

    def prepare_precision(self, model: torch.nn.Module) -> None:
        if self.train_cfg.mixed_precision != "no":
            for p in model.parameters():  # autocast computes in half; the weights AdamW updates stay float32
                if p.requires_grad and p.dtype != torch.float32:
                    p.data = p.data.float()

    def prepare(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[Any, Any]:
        self.module = model
        return self.accelerator.prepare(model, optimizer)

    def save_optimizer(self, optimizer: Any, folder: Path) -> dict | None:
        return optimizer.state_dict()

    def load_optimizer(self, optimizer: Any, folder: Path, state: dict | None) -> None:
        if state is None:
            raise ValueError(f"{folder}: no optimizer state (was it written by a sharded engine?)")
        optimizer.load_state_dict(state)


def fsdp_wrap_classes(model: torch.nn.Module) -> list[str]:
    """The transformer-block classes to wrap one FSDP unit each (vision layers, Q-Former layers,
    LLM decoder layers): frozen towers then sit in units of their own, apart from the trainable
    projector, so no gradient memory is spent on them (HF's `_no_split_modules` names them)."""
    names: set[str] = set()
    for module in model.modules():
        names.update(getattr(module, "_no_split_modules", None) or [])
    present = {type(m).__name__ for m in model.modules()}
    return sorted(names & present)


def outermost_blocks(model: torch.nn.Module, classes: set[str]) -> list[torch.nn.Module]:
    """Modules of `classes` not inside another one (`_no_split_modules` also names the attention
    inside a layer): one FSDP unit per block."""
    chosen: list[str] = []
    for name, module in model.named_modules():
        if type(module).__name__ in classes and not any(name.startswith(f"{outer}.") for outer in chosen):
            chosen.append(name)
    return [model.get_submodule(name) for name in chosen]


def _projector_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The projector, a unit of its own: from a feature cache the stage projects the cached features
    before the root's forward (``mmalign.model.inputs``), where only a unit's own hooks unshard it."""
    from mmalign.model.architectures import architecture_of

    names = [p.rstrip(".") for p in architecture_of(model).roles["projector"]]
    return [model.get_submodule(name) for name in names]


def _fsdp_settings() -> dict[str, Any]:
    """The launcher's FSDP settings (accelerate's FSDP_* variables) this engine implements; the
    ones it does not are refused by name rather than ignored."""
    env = os.environ
    refused = {
        "FSDP_VERSION": env.get("FSDP_VERSION", "2") != "2",
        "FSDP_OFFLOAD_PARAMS": env.get("FSDP_OFFLOAD_PARAMS", "false").lower() == "true",
        "FSDP_ACTIVATION_CHECKPOINTING": env.get("FSDP_ACTIVATION_CHECKPOINTING", "false").lower() == "true",
        # transformers would load the weights on rank 0 only, for a sync this engine does not do
        "FSDP_CPU_RAM_EFFICIENT_LOADING": env.get("FSDP_CPU_RAM_EFFICIENT_LOADING", "false").lower() == "true",
        "FSDP_AUTO_WRAP_POLICY": env.get("FSDP_AUTO_WRAP_POLICY", "TRANSFORMER_BASED_WRAP") != "TRANSFORMER_BASED_WRAP",
    }
    if any(refused.values()):
        raise ValueError(
            f"FSDP engine: {[f'{k}={env[k]}' for k, bad in refused.items() if bad]} not supported; it implements "
            "fsdp_version 2, TRANSFORMER_BASED_WRAP, no offload, and train.gradient_checkpointing for activations"
        )
    wrap = [c.strip() for c in env.get("FSDP_TRANSFORMER_CLS_TO_WRAP", "").split(",") if c.strip()]
    return {"wrap": wrap or None, "reshard": env.get("FSDP_RESHARD_AFTER_FORWARD", "true").lower() == "true"}


class FSDPEngine(Engine):
    """FSDP2 (torch `fully_shard`): each transformer block one unit, then the root; parameters,
    gradients and optimizer state sharded across ranks; optimizer state saved with torch's
    distributed checkpoint (one shard per rank, readable by another process count)."""

    name = "FSDP2"

    def __init__(self, accelerator: Accelerator, train_cfg: TrainConfig, accum: int) -> None:
        super().__init__(accelerator, train_cfg, accum)
        if train_cfg.mixed_precision == "fp16":
            raise ValueError("FSDP engine: train.mixed_precision=fp16 needs a sharded grad scaler; use bf16")
        self.settings = _fsdp_settings()

    def prepare_precision(self, model: torch.nn.Module) -> None:
        half = [n for n, p in model.named_parameters() if p.requires_grad and p.dtype != torch.float32]
        if half:  # FSDP updates the sharded parameters themselves: they are the masters
            raise ValueError(
                f"FSDP engine: {half[0]} is {dict(model.named_parameters())[half[0]].dtype}; load the model with "
                "model.dtype=float32 (train.mixed_precision=bf16 then computes in bf16)"
            )

    def prepare(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[Any, Any]:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        name_of = {id(p): n for n, p in model.named_parameters()}
        mesh = init_device_mesh(self.accelerator.device.type, (self.accelerator.num_processes,))
        compute = {"bf16": torch.bfloat16}.get(self.train_cfg.mixed_precision)
        options = {
            "mesh": mesh,
            "reshard_after_forward": self.settings["reshard"],
            "mp_policy": MixedPrecisionPolicy(param_dtype=compute, reduce_dtype=torch.float32 if compute else None),
        }
        for block in outermost_blocks(model, set(self.settings["wrap"] or fsdp_wrap_classes(model))):
            fully_shard(block, **options)
        for projector in _projector_modules(model):
            fully_shard(projector, **options)
        fully_shard(model, **options)
        sharded = dict(model.named_parameters())  # new Parameter objects (DTensors): point the optimizer at them
        for group in optimizer.param_groups:
            group["params"] = [sharded[name_of[id(p)]] for p in group["params"]]
        self.module = model
        return model, optimizer

    def gather_trainable(self, names: list[str]) -> dict[str, torch.Tensor]:
        params = dict(self.module.named_parameters())
        full = {n: params[n].full_tensor() if hasattr(params[n], "full_tensor") else params[n] for n in names}
        return {n: t.detach().cpu().contiguous() for n, t in full.items()}

    def save_optimizer(self, optimizer: Any, folder: Path) -> dict | None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        dcp.save(
            {"optimizer": get_optimizer_state_dict(self.module, optimizer)}, checkpoint_id=self._engine_dir(folder)
        )
        return None

    def load_optimizer(self, optimizer: Any, folder: Path, state: dict | None) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

        engine_dir = self._engine_dir(folder, must_exist=True)
        loaded = {"optimizer": get_optimizer_state_dict(self.module, optimizer)}  # the layout to read into
        dcp.load(loaded, checkpoint_id=engine_dir)
        set_optimizer_state_dict(self.module, optimizer, loaded["optimizer"])


def _deepspeed_config(train_cfg: TrainConfig, accum: int, world: int) -> dict[str, Any]:
    """The launcher's DeepSpeed JSON (accelerate's `deepspeed_config_file`, else its zero stage),
    with the fields the run decides filled in. We build our own DataLoader (resumable, rank-split),
    so "auto" batch fields cannot come from a prepared one."""
    path = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
    if path:
        config = json.loads(Path(path).read_text())
    else:
        config = {"zero_optimization": {"stage": int(os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2"))}}
    config["train_micro_batch_size_per_gpu"] = train_cfg.batch_size
    config["gradient_accumulation_steps"] = accum
    config["train_batch_size"] = train_cfg.batch_size * accum * world
    if config.get("gradient_clipping", "auto") == "auto":
        config["gradient_clipping"] = train_cfg.max_grad_norm
    for precision in ("bf16", "fp16"):
        config.setdefault(precision, {})["enabled"] = train_cfg.mixed_precision == precision
    left = [key for key, value in _flat(config) if value == "auto"]
    if left:
        raise ValueError(f"DeepSpeed config {path}: fields left 'auto' that mmalign cannot fill: {left}")
    return config


def _flat(config: dict, prefix: str = "") -> Iterator[tuple[str, Any]]:
    for key, value in config.items():
        if isinstance(value, dict):
            yield from _flat(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


class DeepSpeedEngine(Engine):
    """DeepSpeed ZeRO-2 / ZeRO-3 (`deepspeed.initialize`): optimizer state and gradients (ZeRO-3:
    parameters too) partitioned; DeepSpeed counts micro-batches, clips and steps itself, keeps
    fp32 masters under bf16 / fp16, and saves its partitions in its own format."""

    def __init__(self, accelerator: Accelerator, train_cfg: TrainConfig, accum: int) -> None:
        super().__init__(accelerator, train_cfg, accum)
        self.config = _deepspeed_config(train_cfg, accum, accelerator.num_processes)
        self.zero_stage = int(self.config.get("zero_optimization", {}).get("stage", 0))
        self.name = f"DeepSpeed ZeRO-{self.zero_stage}"
        self.deepspeed_engine = None

    def prepare(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[Any, Any]:
        import deepspeed

        self.module = model
        self.deepspeed_engine, deepspeed_optimizer, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, config=self.config
        )
        return self.deepspeed_engine, deepspeed_optimizer

    def accumulate(self, model: torch.nn.Module) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()  # DeepSpeed knows the accumulation boundary itself

    def backward(self, loss: torch.Tensor) -> None:
        self.deepspeed_engine.backward(loss)  # scales by the accumulation steps
        self.deepspeed_engine.step()  # an optimizer step only at the accumulation boundary

    def optimizer_step(self, optimizer: Any, params: list[torch.nn.Parameter]) -> tuple[Any, bool]:
        return self.deepspeed_engine.get_global_grad_norm(), self.deepspeed_engine.was_step_applied()

    def gather_trainable(self, names: list[str]) -> dict[str, torch.Tensor]:
        """The fp32 masters (under bf16 / fp16 the module holds half copies), gathered from their
        partitions."""
        from deepspeed.utils import safe_get_full_fp32_param

        params = dict(self.module.named_parameters())
        gathered = {}
        for name in names:
            master = safe_get_full_fp32_param(params[name])  # None: no master apart from the parameter
            gathered[name] = (master if master is not None else params[name]).detach().cpu().clone()
        return gathered

    def save_optimizer(self, optimizer: Any, folder: Path) -> dict | None:
        engine_dir = str(self._engine_dir(folder))
        self.deepspeed_engine.save_checkpoint(engine_dir, tag="state", exclude_frozen_parameters=True)
        return None

    def load_optimizer(self, optimizer: Any, folder: Path, state: dict | None) -> None:
        self.deepspeed_engine.load_checkpoint(
            str(self._engine_dir(folder, must_exist=True)),
            tag="state",
            load_module_strict=False,
            load_optimizer_states=True,
            load_lr_scheduler_states=False,
        )
