"""AdamW over the trainable parameters and its schedule: warmup, then cosine down to a floor.

MiniGPT-4's choices: no weight decay on biases, norms and 1-d tensors; LLaVA's: a part may have
its own learning rate (`train.projector_lr`, `train.vision_lr`); the floor `min_lr` scales with
each part (transformers' `cosine_with_min_lr`).
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import get_scheduler

from mmalign.config import TrainConfig
from mmalign.model.freeze import role_of


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


def role_learning_rates(train_cfg: TrainConfig) -> dict[str, float]:
    """The parts that have a learning rate of their own (the LLM and LoRA use `train.lr`)."""
    parts = (("projector", train_cfg.projector_lr), ("vision", train_cfg.vision_lr))
    return {role: lr for role, lr in parts if lr is not None}


def make_optimizer(model: torch.nn.Module, train_cfg: TrainConfig) -> torch.optim.Optimizer:
    groups = param_groups(model, train_cfg.weight_decay, role_learning_rates(train_cfg))
    return torch.optim.AdamW(groups, lr=train_cfg.lr, betas=tuple(train_cfg.betas))


def make_schedule(optimizer: torch.optim.Optimizer, train_cfg: TrainConfig) -> torch.optim.lr_scheduler.LRScheduler:
    warmup = train_cfg.warmup_steps or int(train_cfg.warmup_ratio * train_cfg.max_steps)
    return get_scheduler(
        "cosine_with_min_lr",
        optimizer,
        num_warmup_steps=warmup,
        num_training_steps=train_cfg.max_steps,
        scheduler_specific_kwargs={"min_lr": train_cfg.min_lr},
    )
