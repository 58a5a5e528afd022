"""The curation config: one YAML for a whole pipeline (``configs/curate_minigpt4.yaml``,
``configs/recaption_sharegpt4v.yaml``), sections per step, dotted overrides on the command line
(``describe.model=runs/stage1/model``, ``fix.endpoint.base_url=http://...``).

The published prompts are the defaults, so a config that says nothing does what the papers did.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

from mmalign.config import apply_values

DESCRIBE_PROMPT = "Describe this image in detail. Give as many details as possible. Say everything you see."
"""MiniGPT-4's curation prompt to the stage-1 model."""
CONTINUE_PROMPT = "Continue"
FIX_INSTRUCTION = (
    "Fix the error in the given paragraph. Remove any repeating sentences, meaningless characters, not English "
    "sentences, and so on. Remove unnecessary repetition. Rewrite any incomplete sentences. Return directly the "
    "results without explanation. Return directly the input paragraph if it is already correct without explanation."
)
"""MiniGPT-4's instruction to ChatGPT, verbatim."""
SHARECAPTIONER_PROMPT = "Analyze the image in a comprehensive and detailed manner."
"""ShareCaptioner's prompt (ShareGPT4V ``tools/share-cap_batch_infer.py``)."""


@dataclass
class EndpointConfig:
    """An OpenAI-compatible chat endpoint (ChatGPT, a vLLM server, ``mmalign serve``)."""

    base_url: str | None = None  # ".../v1"; None: $OPENAI_BASE_URL, else OpenAI's
    model: str | None = None  # None: $OPENAI_MODEL
    api_key_env: str = "OPENAI_API_KEY"  # the key is read from here (or --api-key) and never written down
    timeout_s: float = 60.0  # per request
    max_attempts: int = 6  # per record and run, for timeouts, 429, 5xx and lost connections
    backoff_s: float = 1.0  # the first retry waits up to this (full jitter), doubling each time
    max_backoff_s: float = 30.0
    concurrency: int = 8  # requests in flight
    budget: int | None = None  # requests this run may send, retries included; None: no limit
    max_tokens: int = 512
    temperature: float = 0.0  # 0: greedy (vLLM, mmalign serve); ChatGPT is near-deterministic

    def resolved(self) -> EndpointConfig:
        """With the environment's base URL and model filled in where the config left them unset."""
        out = EndpointConfig(**{f.name: getattr(self, f.name) for f in fields(self)})
        out.base_url = out.base_url or os.environ.get("OPENAI_BASE_URL")
        out.model = out.model or os.environ.get("OPENAI_MODEL")
        return out


@dataclass
class DescribeConfig:
    backend: Literal["local", "openai"] = "local"  # in-process batched generation | an endpoint with image parts
    model: str | None = None  # local: an exported folder / hub id (the stage-1 model); openai: endpoint.model
    template: str | None = None  # local: override the folder's recorded template
    system: str | None = None  # None: no system message (MiniGPT-4's curation prompt starts at ###Human:)
    prompt: str = DESCRIBE_PROMPT
    continue_prompt: str = CONTINUE_PROMPT
    min_tokens: int = 80  # an answer with fewer tokens is asked to continue (the paper: 80)
    max_new_tokens: int = 300
    batch_size: int = 16
    num_beams: int = 1
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 0.9
    repetition_penalty: float = 1.0
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    device: str = "cpu"
    endpoint: EndpointConfig = field(default_factory=EndpointConfig)


@dataclass
class FixConfig:
    backend: Literal["openai", "local"] = "openai"  # an OpenAI-compatible endpoint | a local HF causal LM
    model: str | None = None  # local: a folder (text-only LLM); openai: endpoint.model
    instruction: str = FIX_INSTRUCTION
    message: str = "{instruction}\n\n{paragraph}"  # the user message sent per record
    batch_size: int = 16  # local backend
    max_new_tokens: int = 512  # local backend
    device: str = "cpu"
    endpoint: EndpointConfig = field(default_factory=EndpointConfig)


@dataclass
class FilterConfig:
    rules: list[dict] = field(default_factory=list)  # mmalign.curate.filters: {name, kind?, parameters}
    redo: bool = False  # filter every record again (after a rule changed): the old file is moved aside


@dataclass
class ReviewConfig:
    db: str | None = None  # SQLite file of decisions; None: <workdir>/review.sqlite
    host: str = "127.0.0.1"
    port: int = 7861
    reviewer: str | None = None  # recorded with each decision; None: $USER


@dataclass
class ExportConfig:
    out: str | None = None  # None: <workdir>/export
    jpeg_quality: int = 95  # images that are not JPEG already are re-encoded (cc_sbu_align holds .jpg)


@dataclass
class RecaptionConfig:
    shards: str | None = None  # input webdataset shards: a brace pattern, a glob or a folder of .tar
    out: str | None = None  # output folder: same shard names, plus <name>.done.json markers
    key: str = "recap.txt"  # the member the new caption is written as (key.recap.txt); old members kept
    backend: Literal["local", "openai"] = "local"
    model: str | None = None
    template: str | None = None
    system: str | None = None
    prompt: str = SHARECAPTIONER_PROMPT
    max_new_tokens: int = 300
    batch_size: int = 4  # ShareGPT4V's script: batch 4, beam 3, repetition penalty 1.5
    num_beams: int = 1
    repetition_penalty: float = 1.0
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    device: str = "cpu"
    rules: list[dict] = field(default_factory=list)  # a caption a rule drops is not written (counted per rule)
    endpoint: EndpointConfig = field(default_factory=EndpointConfig)
    base_urls: list[str] = field(default_factory=list)  # openai: rank r uses base_urls[r % n] (many vLLM servers)


@dataclass
class CurateConfig:
    workdir: str = "runs/curate"  # one folder per pipeline: step files, review.sqlite, export/
    images: str | None = None  # a folder (searched recursively), a glob, or a text file of paths, one a line
    describe: DescribeConfig = field(default_factory=DescribeConfig)
    fix: FixConfig = field(default_factory=FixConfig)
    filter: FilterConfig = field(default_factory=FilterConfig)
    review: ReviewConfig = field(default_factory=ReviewConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    recaption: RecaptionConfig = field(default_factory=RecaptionConfig)

    @property
    def db_path(self) -> Path:
        return Path(self.review.db) if self.review.db else Path(self.workdir) / "review.sqlite"

    @property
    def export_dir(self) -> Path:
        return Path(self.export.out) if self.export.out else Path(self.workdir) / "export"


def _fill(obj: Any, values: dict, prefix: str) -> None:
    """Fields of ``obj`` from ``values``; nested sections (``endpoint``) recursively."""
    if not isinstance(values, dict):
        raise ValueError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {values!r}")
    flat = {}
    for key, value in values.items():
        sub = getattr(obj, key, None)
        if is_dataclass(sub):
            _fill(sub, value or {}, f"{prefix}{key}.")
        else:
            flat[key] = value
    apply_values(obj, flat, prefix)


def load_curate_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> CurateConfig:
    """A YAML file and ``a.b.c=value`` overrides; unknown keys and bad values are errors naming
    the dotted key. Filter rules are parsed here, so a bad rule fails before any step runs."""
    from mmalign.curate.filters import parse_rules

    cfg = CurateConfig()
    raw = yaml.safe_load(Path(path).read_text()) if path else {}
    try:
        _fill(cfg, raw or {}, "")
        for item in overrides:
            key, sep, value = item.partition("=")
            if not sep or not key:
                raise ValueError(f"override {item!r} must look like section.key=value")
            *parents, name = key.split(".")
            target = cfg
            for p in parents:
                target = getattr(target, p, None)
                if not is_dataclass(target):
                    raise KeyError(f"unknown config section {key.rsplit('.', 1)[0]!r}")
            if isinstance(getattr(target, name, None), list):  # a YAML list, or comma-separated strings
                value = yaml.safe_load(value) if value.startswith("[") else [v for v in value.split(",") if v]
            apply_values(target, {name: value}, "".join(f"{p}." for p in parents))
        parse_rules(cfg.filter.rules, "filter.rules")
        parse_rules(cfg.recaption.rules, "recaption.rules")
    except (KeyError, ValueError) as e:
        where = f"{path}: " if path else ""
        raise ValueError(f"{where}{e.args[0] if e.args else e}") from None
    return cfg


__all__ = [
    "CONTINUE_PROMPT",
    "DESCRIBE_PROMPT",
    "FIX_INSTRUCTION",
    "SHARECAPTIONER_PROMPT",
    "CurateConfig",
    "DescribeConfig",
    "EndpointConfig",
    "ExportConfig",
    "FilterConfig",
    "FixConfig",
    "RecaptionConfig",
    "ReviewConfig",
    "load_curate_config",
]
