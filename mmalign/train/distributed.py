"""What the loop needs from the engine it runs on (one process, DDP, FSDP, DeepSpeed ZeRO).

The engine is chosen by the launcher, not by our config: `accelerate launch --config_file
configs/accelerate/<engine>.yaml` (or `torchrun`, which gives DDP) sets the environment that
`Accelerator()` reads. Everything engine-specific the loop does goes through this module:
the accumulation that keeps the global batch, gathering sharded trainable tensors before a
save, and saving / loading the (possibly sharded) optimizer state.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType

from mmalign.config import TrainConfig

log = logging.getLogger(__name__)
ENGINE_DIR = "engine"  # FSDP / DeepSpeed optimizer shards inside a checkpoint folder


def grad_accum_for(tc: TrainConfig, num_processes: int) -> int:
    """Accumulation steps so that per-device batch x accumulation x processes = global batch.

    Without `global_batch_size` the config's `grad_accum` is used as is (the global batch then
    grows with the process count)."""
    if tc.global_batch_size is None:
        return tc.grad_accum
    per_step = tc.batch_size * num_processes
    if tc.global_batch_size % per_step:
        raise ValueError(
            f"train.global_batch_size={tc.global_batch_size} is not a multiple of train.batch_size={tc.batch_size} "
            f"x {num_processes} processes = {per_step}; change the per-device batch or the process count"
        )
    return tc.global_batch_size // per_step


def make_accelerator(tc: TrainConfig, out: Path) -> tuple[Accelerator, int]:
    """The Accelerator for this run (engine from the launcher's environment) + its accumulation."""
    from accelerate.state import AcceleratorState, GradientState, PartialState

    # one run, one configuration: an earlier run in this process (stage 1 before stage 2, tests)
    # may have used other precision / accumulation settings; the process group (PartialState) stays
    AcceleratorState._reset_state()
    GradientState._reset_state()

    # torchrun on a machine without an accelerator: accelerate runs multi-process CPU (gloo)
    # only when told it is on CPU
    accel = getattr(torch, "accelerator", None)
    cpu = not (accel.is_available() if accel is not None else torch.cuda.is_available())
    world = PartialState(cpu=cpu).num_processes
    accum = grad_accum_for(tc, world)
    trackers = [t.strip() for t in tc.report_to.split(",") if t.strip() and t.strip() != "none"]
    accelerator = Accelerator(
        cpu=cpu,
        gradient_accumulation_steps=accum,
        mixed_precision=tc.mixed_precision,
        log_with=trackers or None,
        project_dir=str(out),
    )
    active = {str(t.value if hasattr(t, "value") else t) for t in accelerator.log_with}
    missing = [t for t in trackers if t not in active]
    if missing:  # accelerate drops a tracker whose package is missing with only a debug message
        raise ValueError(
            f"train.report_to: {missing} not installed here; pip install -e '.[track]' (tensorboard, wandb)"
        )
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        # we build our own DataLoader (resumable, rank-split), so DeepSpeed's "auto" batch
        # fields cannot be filled from a prepared one: fill them from the config
        ds = accelerator.state.deepspeed_plugin.deepspeed_config
        ds["train_micro_batch_size_per_gpu"] = tc.batch_size
        ds["gradient_accumulation_steps"] = accum
        ds["train_batch_size"] = tc.batch_size * accum * world
        if ds.get("gradient_clipping", "auto") == "auto":
            ds["gradient_clipping"] = tc.max_grad_norm
    global_batch = tc.batch_size * accum * world
    note = (
        "" if tc.global_batch_size is None else f" (train.global_batch_size; train.grad_accum={tc.grad_accum} ignored)"
    )
    if accelerator.is_main_process:
        log.info(
            "engine %s, %d process(es): global batch %d = %d per device x %d accumulation x %d process(es)%s",
            accelerator.distributed_type.value,
            world,
            global_batch,
            tc.batch_size,
            accum,
            world,
            note,
        )
    return accelerator, accum


def engine_of(accelerator: Accelerator) -> str:
    """One of "fsdp", "deepspeed", "replicated" (one process or DDP: every rank holds everything)."""
    if accelerator.distributed_type == DistributedType.FSDP:
        return "fsdp"
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        return "deepspeed"
    return "replicated"


def fsdp_wrap_classes(model: torch.nn.Module) -> list[str]:
    """The transformer-block classes to wrap one FSDP unit each (vision layers, Q-Former layers,
    LLM decoder layers): frozen towers then sit in units of their own, apart from the trainable
    projector, so no gradient memory is spent on them (HF's `_no_split_modules` names them)."""
    names: set[str] = set()
    for module in model.modules():
        names.update(getattr(module, "_no_split_modules", None) or [])
    present = {type(m).__name__ for m in model.modules()}
    return sorted(names & present)


def gather_trainable(
    accelerator: Accelerator, model: torch.nn.Module, inner: torch.nn.Module, names: list[str]
) -> dict[str, torch.Tensor]:
    """Full CPU copies of the trainable tensors `names`, gathered from their shards (`model`:
    as prepared; `inner`: the module given to `prepare`, which DDP / DeepSpeed wrap and FSDP2
    shards in place).

    A collective: every rank calls it; the result is meaningful on the main process."""
    kind = engine_of(accelerator)
    wanted = set(names)
    if kind == "deepspeed" and accelerator.state.deepspeed_plugin.zero_stage == 3:
        import deepspeed

        params = dict(inner.named_parameters())
        with deepspeed.zero.GatheredParameters([params[n] for n in names], modifier_rank=None):
            return {n: params[n].detach().cpu().clone() for n in names}
    if kind == "fsdp":
        params = dict(inner.named_parameters())
        if all(n in params for n in names) and any(hasattr(params[n], "full_tensor") for n in names):
            # FSDP2: parameters are DTensors with their original names
            return {
                n: (params[n].full_tensor() if hasattr(params[n], "full_tensor") else params[n]).detach().cpu()
                for n in names
            }
        state = accelerator.get_state_dict(model)  # FSDP1: full state dict on rank 0
        return {n: t.detach().cpu() for n, t in state.items() if n in wanted}
    params = dict(inner.named_parameters())
    return {n: params[n].detach().cpu().contiguous() for n in names}


def save_optimizer(accelerator: Accelerator, model, optimizer, folder: Path) -> dict | None:
    """Replicated engines: the optimizer state dict (saved by the caller on the main process).
    FSDP / DeepSpeed: every rank writes its shard under `folder/engine` (collective)."""
    kind = engine_of(accelerator)
    if kind == "replicated":
        return optimizer.state_dict()
    engine_dir = folder / ENGINE_DIR
    if kind == "fsdp":
        from accelerate.utils import save_fsdp_optimizer

        save_fsdp_optimizer(accelerator.state.fsdp_plugin, accelerator, optimizer, model, str(engine_dir))
    else:  # DeepSpeed keeps fp32 master weights and moments partitioned in its own format
        model.save_checkpoint(str(engine_dir), tag="state", exclude_frozen_parameters=True)
    return None


def load_optimizer(accelerator: Accelerator, model, optimizer, folder: Path, state: dict | None) -> None:
    """The counterpart of `save_optimizer`, called after `accelerator.prepare`."""
    kind = engine_of(accelerator)
    if kind == "replicated":
        if state is None:
            raise ValueError(f"{folder}: no optimizer state (was it written by a sharded engine?)")
        optimizer.load_state_dict(state)
        return
    engine_dir = folder / ENGINE_DIR
    if not engine_dir.is_dir():
        raise ValueError(
            f"{folder}: no {ENGINE_DIR}/ folder; a checkpoint of a replicated run cannot resume under {kind}"
        )
    if kind == "fsdp":
        from accelerate.utils import load_fsdp_optimizer

        load_fsdp_optimizer(accelerator.state.fsdp_plugin, accelerator, optimizer, model, str(engine_dir))
    else:
        model.load_checkpoint(
            str(engine_dir),
            tag="state",
            load_module_strict=False,
            load_optimizer_states=True,
            load_lr_scheduler_states=False,
        )
