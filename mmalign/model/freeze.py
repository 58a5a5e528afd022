"""Which parameters train, as data: a policy is a list of role specs resolved per architecture.

Role specs:
  ``vision`` ``qformer`` ``projector`` ``llm``   whole parts (``Architecture.roles``)
  ``vision_blocks[A:B]``                         encoder layers A..B-1 of the vision tower
                                                 (Python slice; ``half`` = num_hidden_layers // 2,
                                                 so ``vision_blocks[half:]`` is the later half)
  ``re:<regex>``                                 any parameter whose name matches (re.search)
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from torch import nn

from mmalign.model.architectures import ROLES, architecture_of

POLICIES: dict[str, list[str]] = {
    "projector": ["projector"],
    "projector+llm": ["projector", "llm"],
    "projector+llm+vision_late_half": ["vision_blocks[half:]", "projector", "llm"],
    "all": ["vision", "qformer", "projector", "llm"],
    # published stages
    "minigpt4_stage1": ["projector"],
    "minigpt4_stage2": ["projector"],
    "llava_stage1": ["projector"],
    "llava_stage2": ["projector", "llm"],
    "sharegpt4v_stage1": ["vision_blocks[half:]", "projector", "llm"],
    "sharegpt4v_stage2": ["projector", "llm"],
}

_BLOCKS = re.compile(r"^vision_blocks\[\s*(-?\w*)\s*:\s*(-?\w*)\s*\]$")
_LAYER_INDEX = re.compile(r"\.(?:layers|layer|blocks)\.(\d+)\.")


def _layout(model: nn.Module) -> Mapping[str, tuple[str, ...]]:
    return architecture_of(model).roles


def role_of(model: nn.Module, name: str) -> str:
    """The role a parameter belongs to ("other" if none: a layout bug worth seeing)."""
    for role, prefixes in _layout(model).items():
        if prefixes and name.startswith(prefixes):
            return role
    return "other"


def _block_range(spec: str, num_layers: int) -> range:
    m = _BLOCKS.match(spec)
    if not m:
        raise ValueError(f"bad block spec {spec!r}; e.g. 'vision_blocks[12:24]' or 'vision_blocks[half:]'")

    def bound(s: str) -> int | None:
        if s == "":
            return None
        if s == "half":
            return num_layers // 2
        return int(s)

    return range(num_layers)[slice(bound(m[1]), bound(m[2]))]


def _matcher(model: nn.Module, spec: str):
    """A predicate over parameter names for one role spec."""
    layout = _layout(model)
    if spec in layout:
        prefixes = layout[spec]
        return lambda name: bool(prefixes) and name.startswith(prefixes)
    if spec.startswith("re:"):
        pattern = re.compile(spec[3:])
        return lambda name: pattern.search(name) is not None
    if spec.startswith("vision_blocks"):
        blocks = set(_block_range(spec, model.config.vision_config.num_hidden_layers))
        vision = layout["vision"]

        def in_blocks(name: str) -> bool:
            if not name.startswith(vision):
                return False
            m = _LAYER_INDEX.search(name)
            return m is not None and int(m[1]) in blocks

        return in_blocks
    raise ValueError(f"unknown role spec {spec!r}; roles: {sorted(layout)}, vision_blocks[A:B], re:<regex>")


@dataclass
class FreezeReport:
    """What trains: per-role trainable / frozen parameter counts and the trainable tensor names."""

    policy: list[str]
    counts: dict[str, tuple[int, int]]  # role -> (trainable, frozen)
    trainable_names: list[str] = field(default_factory=list)
    vision_blocks: list[int] = field(default_factory=list)  # vision layers with trainable tensors

    @property
    def trainable(self) -> int:
        return sum(t for t, _ in self.counts.values())

    @property
    def total(self) -> int:
        return sum(t + f for t, f in self.counts.values())

    def __str__(self) -> str:
        lines = [f"freeze policy {self.policy}", f"{'role':<10}{'trainable':>15}{'frozen':>15}"]
        for role, (t, f) in self.counts.items():
            note = ""
            if role == "vision" and self.vision_blocks and t:
                note = f"  (blocks {self.vision_blocks[0]}-{self.vision_blocks[-1]})"
            lines.append(f"{role:<10}{t:>15,}{f:>15,}{note}")
        pct = 100.0 * self.trainable / max(self.total, 1)
        lines.append(f"{'total':<10}{self.trainable:>15,}{self.total - self.trainable:>15,}  ({pct:.2f}% trains)")
        lines.append(f"{len(self.trainable_names)} trainable tensors")
        return "\n".join(lines)

    def frozen_modules(self, model: nn.Module) -> list[nn.Module]:
        """The role modules with nothing trainable (to keep in eval mode after ``model.train()``)."""
        return [m for _, m in _frozen_modules(model)]

    def log(self, logger: logging.Logger | None = None) -> None:
        (logger or logging.getLogger("mmalign")).info("%s", self)


def apply_freeze(model: nn.Module, trainable: str | list[str]) -> FreezeReport:
    """Set ``requires_grad`` so exactly the parameters named by the policy train.

    ``trainable`` is a ``POLICIES`` name or a list of role specs. Every spec must select at
    least one tensor: a policy that silently trains nothing (e.g. ``qformer`` on LLaVA) is a bug.
    """
    if isinstance(trainable, str) and trainable not in POLICIES:
        raise ValueError(f"unknown policy {trainable!r}; known: {sorted(POLICIES)}")
    specs = POLICIES[trainable] if isinstance(trainable, str) else list(trainable)
    matchers = {s: _matcher(model, s) for s in specs}
    hits = dict.fromkeys(specs, 0)
    counts = {role: [0, 0] for role in (*_layout(model), "other")}
    names: list[str] = []
    blocks: set[int] = set()
    vision = _layout(model)["vision"]
    for name, param in model.named_parameters():
        on = False
        for s, match in matchers.items():
            if match(name):
                hits[s] += 1
                on = True
        param.requires_grad_(on)
        counts[role_of(model, name)][0 if on else 1] += param.numel()
        if on:
            names.append(name)
            if name.startswith(vision) and (m := _LAYER_INDEX.search(name)):
                blocks.add(int(m[1]))
    empty = [s for s, n in hits.items() if n == 0]
    if empty:
        raise ValueError(f"policy entries select no parameters on {model.config.model_type}: {empty}")
    return FreezeReport(
        policy=specs,
        counts={r: (t, f) for r, (t, f) in counts.items() if t + f},  # roles the arch has
        trainable_names=names,
        vision_blocks=sorted(blocks),
    )


def _frozen_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    out = []
    for prefixes in _layout(model).values():
        for prefix in prefixes:
            try:
                module = model.get_submodule(prefix.rstrip("."))
            except AttributeError:
                continue  # e.g. query_tokens is a Parameter, not a module
            if not any(p.requires_grad for p in module.parameters()):
                out.append((prefix.rstrip("."), module))
    return out


def eval_frozen(model: nn.Module) -> list[str]:
    """Put every role's module with no trainable parameter in eval mode (dropout off, as the
    originals do for the frozen ViT / Q-Former / LLM). Call it after each ``model.train()``."""
    done = []
    for name, module in _frozen_modules(model):
        module.eval()
        done.append(name)
    return done


__all__ = ["POLICIES", "ROLES", "FreezeReport", "apply_freeze", "eval_frozen", "role_of"]
