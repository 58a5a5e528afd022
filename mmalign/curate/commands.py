"""What ``mmalign curate <step>`` runs: one function per step, from a loaded config."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from mmalign.curate.config import CurateConfig

log = logging.getLogger(__name__)
STEPS = ("describe", "fix", "filter", "review", "export", "recaption", "status")


@dataclass
class Options:
    """Command-line settings that are not config fields (the key is never written anywhere)."""

    api_key: str | None = None
    redo: bool = False
    block: bool = True  # review: serve until interrupted


def apply_flags(cfg: CurateConfig, step: str, base_url: str | None, model: str | None) -> None:
    """``--base-url`` / ``--model`` go to the step's endpoint (``--model`` names the local
    folder instead when the step's backend is local)."""
    section = {"describe": cfg.describe, "fix": cfg.fix, "recaption": cfg.recaption}.get(step)
    if section is None:
        if base_url or model:
            raise ValueError(f"--base-url / --model do not apply to the {step} step")
        return
    if base_url:
        section.endpoint.base_url = base_url
    if model:
        if section.backend == "openai":
            section.endpoint.model = model
        else:
            section.model = model


def run_step(step: str, cfg: CurateConfig, options: Options | None = None) -> Any:
    options = options or Options()
    if step not in STEPS:
        raise ValueError(f"unknown step {step!r}; steps: {', '.join(STEPS)}")
    return globals()[f"_{step}"](cfg, options)


def _describe(cfg: CurateConfig, options: Options) -> Any:
    from mmalign.curate.describe import describer_for, list_images
    from mmalign.curate.steps import run_describe

    if not cfg.images:
        raise ValueError("images: the config names no images to describe")
    list_images(cfg.images)  # nothing there: said before a model is loaded
    return run_describe(cfg, describer_for(cfg, options.api_key))


def _fix(cfg: CurateConfig, options: Options) -> Any:
    from mmalign.curate.steps import run_fix

    if cfg.fix.backend == "openai":
        from mmalign.curate.endpoint import ChatEndpoint

        fixer: Any = ChatEndpoint(cfg.fix.endpoint, options.api_key)
    else:
        from mmalign.model.bundle import LoadedModel

        if not cfg.fix.model:
            raise ValueError("fix.model: the local backend needs a text-only model folder")
        fixer = LoadedModel.load(cfg.fix.model, device=cfg.fix.device)
    return run_fix(cfg, fixer)


def _filter(cfg: CurateConfig, options: Options) -> Any:
    from mmalign.curate.steps import run_filter

    return run_filter(cfg, redo=options.redo)


def _review(cfg: CurateConfig, options: Options) -> Any:
    from mmalign.curate.review import ReviewDB, review_items
    from mmalign.curate.review_page import ReviewState, launch_review

    items = review_items(cfg)
    if not items:
        raise ValueError(f"review: nothing passed the filters in {cfg.workdir} (run describe, fix, filter first)")
    state = ReviewState(items, ReviewDB(cfg.db_path), cfg.review.reviewer)
    print(f"review: {len(items)} records, decisions in {cfg.db_path}; http://{cfg.review.host}:{cfg.review.port}")
    return launch_review(state, host=cfg.review.host, port=cfg.review.port, block=options.block)


def _export(cfg: CurateConfig, options: Options) -> Any:
    from mmalign.curate.export import run_export

    out = run_export(cfg)
    print(f"export: {out}")
    return out


def _recaption(cfg: CurateConfig, options: Options) -> Any:
    from mmalign.curate.recaption import run_recaption

    return run_recaption(cfg, api_key=options.api_key)


def _status(cfg: CurateConfig, options: Options) -> Any:
    from mmalign.curate.export import funnel, funnel_table

    f = funnel(cfg)
    print(funnel_table(f))
    return f


__all__ = ["STEPS", "Options", "apply_flags", "run_step"]
