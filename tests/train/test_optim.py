"""AdamW's parameter groups (no decay on biases and 1-d tensors, a part's own learning rate) and
the warmup + cosine schedule down to a floor that scales with each part."""

from __future__ import annotations

import pytest
import torch

from mmalign.config import TrainConfig
from mmalign.model import apply_freeze, build_model
from mmalign.train.optim import make_optimizer, make_schedule


def test_groups_decay_only_matrices_and_give_the_projector_its_own_rate(tiny_spec):
    torch.manual_seed(0)
    model, _ = build_model(tiny_spec("llava"))
    apply_freeze(model, "projector+llm")
    train_cfg = TrainConfig(lr=1e-3, projector_lr=5e-3, weight_decay=0.05, max_steps=10, warmup_steps=2, min_lr=1e-4)
    optimizer = make_optimizer(model, train_cfg)

    name_of = {id(p): n for n, p in model.named_parameters()}
    groups = {(g.get("lr"), g["weight_decay"]): [name_of[id(p)] for p in g["params"]] for g in optimizer.param_groups}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert sorted(n for names in groups.values() for n in names) == sorted(trainable)  # each once
    for (_, decay), names in groups.items():
        for name in names:
            tensor = dict(model.named_parameters())[name]
            assert (decay > 0) == (tensor.ndim >= 2 and not name.endswith(".bias")), name
    projector = {n for n in trainable if n.startswith("model.multi_modal_projector.")}
    assert {n for (lr, _), names in groups.items() if lr == 5e-3 for n in names} == projector

    schedule = make_schedule(optimizer, train_cfg)
    lrs = []
    for _ in range(10):
        optimizer.step()
        schedule.step()
        lrs.append([g["lr"] for g in optimizer.param_groups])
    last = {g.get("initial_lr"): g["lr"] for g in optimizer.param_groups}
    assert lrs[0] == pytest.approx([g["initial_lr"] / 2 for g in optimizer.param_groups])  # warmup step 1 of 2
    assert lrs[1] == pytest.approx([g["initial_lr"] for g in optimizer.param_groups])  # then the cosine
    assert last == pytest.approx({1e-3: 1e-4, 5e-3: 5e-4})  # the floor scales with each part
