"""Run configuration: dataclasses, read from YAML, with dotted command-line overrides.

One YAML file describes one training stage (`configs/*.yaml`); `train.lr=1e-4` style overrides
change any field without new flags, and unknown keys fail loudly with their dotted name.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml


@dataclass
class ModelConfig:
    recipe: str | None = None  # a named recipe (mmalign.recipes) to build from backbones
    path: str | None = None  # or an existing mmalign / HF folder or hub id to continue from
    vision: str | None = None  # replace the recipe's vision backbone (hub id / local folder)
    llm: str | None = None  # replace the recipe's LLM (hub id / local folder)
    init_trainable: str | None = None  # a training checkpoint whose trainable tensors are loaded (stage 1 -> 2)
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    device: str = "cpu"
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] | None = None
    quantization: Literal["4bit", "8bit"] | None = None  # 4bit: QLoRA base (bitsandbytes NF4, CUDA only)


@dataclass
class SourceConfig:
    """One source of a mix (``data.sources``); the encoding (captions / conversations, template,
    max_length) is the data section's."""

    path: str | None = None  # shards (pattern / folder of .tar) or a caption / cc_sbu_align / LLaVA JSON
    type: Literal["webdataset", "captions", "llava"] | None = None  # None: from the path
    ratio: float = 1.0  # sampling weight (MiniGPT-4 stage 1: LAION 115, CC+SBU 14)
    image_root: str | None = None


@dataclass
class DataConfig:
    source: Literal["captions", "conversations"] = "captions"  # stage-1 pairs | chat turns
    path: str | None = None  # caption JSON / cc_sbu_align filter_cap.json / LLaVA JSON
    image_root: str | None = None
    template: str | None = None  # chat template (conversations); None: the recipe's (else minigpt4_v0)
    caption_format: str | None = None  # stage-1 format (captions); None: the recipe's (else minigpt4_caption)
    instructions: str = "minigpt4"  # instruction list drawn for caption-only stage-2 records
    max_length: int = 160
    clean_captions: bool = True  # MiniGPT-4 stage 1: lower-case, no punctuation, 50 words
    num_workers: int = 0
    sources: list[SourceConfig] | None = None  # several sources mixed by ratio, instead of `path`
    mix: Literal["sample", "batch"] = "sample"  # a source drawn per sample | per batch (MiniGPT-4)
    shuffle_buffer: int = 1000  # samples shuffled in memory per DataLoader worker (webdataset shards)
    group_by_length: bool = False  # map-style conversations: batches of similar length, one modality each
    # image transforms (mmalign.model.processing); None: the recipe's for the stage, else the model's own
    # (recorded in model.path's folder, else its architecture's); the train transform falls back to the eval one
    train_transform: Literal["resize", "center_crop", "pad_to_square", "random_resized_crop"] | None = None
    eval_transform: Literal["resize", "center_crop", "pad_to_square"] | None = None  # recorded by the export
    features: str | None = None  # a frozen-feature cache (mmalign cache-features) read instead of the images
    packing: bool = False  # place each batch's samples whole into rows of pack_tokens (no padding to the longest)
    pack_tokens: int | None = None  # the token budget of a packed row; None: max_length


@dataclass
class TrainConfig:
    stage: str = "stage1"
    trainable: str | None = None  # a freezing policy name (mmalign.model.freeze); None: the recipe's for `stage`
    output_dir: str = "runs/stage1"
    max_steps: int = 1000
    batch_size: int = 8  # per device (per process)
    grad_accum: int = 1  # used when global_batch_size is not set
    global_batch_size: int | None = None  # kept when the process count changes: accumulation is derived
    lr: float = 1e-4
    min_lr: float = 8e-5  # the floor of the cosine, as a fraction of lr for every group
    projector_lr: float | None = None  # per-part learning rates (None: lr), LLaVA's mm_projector_lr
    vision_lr: float | None = None
    warmup_steps: int = 0
    warmup_ratio: float = 0.0
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.999)
    max_grad_norm: float = 1.0
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"  # (accelerate autocast; trainable tensors stay float32)
    gradient_checkpointing: bool = False  # LLM + vision tower, non-reentrant
    compile: bool = False  # torch.compile the LLM (dynamic shapes; the first steps pay the compile)
    lora_r: int = 0  # > 0: LoRA (peft) on the LLM's linear layers; its base weights stay frozen
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    lora_target: str = "all-linear"  # all-linear (every LLM Linear but lm_head) or names, e.g. q_proj,v_proj
    report_to: str = "none"  # accelerate trackers, comma-separated: tensorboard, wandb
    plot: bool = True  # loss / learning-rate PNG at the end of a run
    log_every: int = 10
    save_every: int = 500
    keep_checkpoints: int = 2
    seed: int = 42
    resume: bool = True  # continue from the newest checkpoint in output_dir if there is one


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


def _coerce(value, annotation):
    """Convert YAML / CLI values to the annotated field type (only the types used above)."""
    is_union = typing.get_origin(annotation) in (typing.Union, types.UnionType)
    hint = typing.get_args(annotation) if is_union else (annotation,)
    if value is None or isinstance(value, str) and value.lower() in ("none", "null") and type(None) in hint:
        return None
    target = next(h for h in hint if h is not type(None))
    if typing.get_origin(target) is Literal:
        choices = typing.get_args(target)
        if value not in choices:
            raise ValueError(f"expected one of {', '.join(map(str, choices))}; got {value!r}")
        return value
    if target is bool and isinstance(value, str):
        if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
            raise ValueError(f"expected a boolean, got {value!r}")
        return value.lower() in ("true", "1", "yes")
    if typing.get_origin(target) is list and dataclasses.is_dataclass(typing.get_args(target)[0]):
        if not isinstance(value, list):
            raise ValueError(f"expected a YAML list of mappings, got {value!r}")
        cls = typing.get_args(target)[0]
        items = []
        for i, item in enumerate(value):
            if not isinstance(item, dict):
                raise ValueError(f"item {i}: expected a mapping, got {item!r}")
            obj = cls()
            try:
                _apply(obj, item, f"[{i}].")
            except KeyError as e:
                raise ValueError(e.args[0]) from None
            items.append(obj)
        return items
    if typing.get_origin(target) is tuple:
        items = value.split(",") if isinstance(value, str) else value
        args = typing.get_args(target)
        if args and Ellipsis not in args and len(items) != len(args):
            raise ValueError(f"expected {len(args)} comma-separated values, got {value!r}")
        return tuple(float(v) for v in items)
    return target(value)


def _apply(section, values: dict, prefix: str) -> None:
    hints = typing.get_type_hints(type(section))
    names = {f.name for f in dataclasses.fields(section)}
    for key, value in values.items():
        if key not in names:
            raise KeyError(f"unknown config key {prefix}{key!r}; known: {sorted(names)}")
        try:
            setattr(section, key, _coerce(value, hints[key]))
        except (TypeError, ValueError) as e:
            raise ValueError(f"config key {prefix}{key}: {e}") from None


def apply_values(section, values: dict, prefix: str = "") -> None:
    """Set a config dataclass's fields from a mapping, typed as above; an unknown key is a
    KeyError and a bad value a ValueError, both naming the dotted key (other configs use it)."""
    _apply(section, values, prefix)


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Read a YAML file (sections model / data / train) and apply `section.key=value` overrides."""
    cfg = RunConfig()
    raw = yaml.safe_load(Path(path).read_text()) if path else {}
    for section, values in (raw or {}).items():
        if section not in ("model", "data", "train"):
            raise KeyError(f"{path}: unknown config section {section!r}; known: model, data, train")
        _apply(getattr(cfg, section), values or {}, f"{section}.")
    for item in overrides:
        key, sep, value = item.partition("=")
        section, _, name = key.partition(".")
        if not sep or section not in ("model", "data", "train") or not name:
            raise ValueError(f"override {item!r} must look like section.key=value (sections: model, data, train)")
        _apply(getattr(cfg, section), {name: value}, f"{section}.")
    return cfg


def to_dict(cfg: RunConfig) -> dict:
    return dataclasses.asdict(cfg)


# What the fields left unset (None) default to when the model is not built from a recipe.
FALLBACKS = {"data.template": "minigpt4_v0", "data.caption_format": "minigpt4_caption", "train.trainable": "projector"}


def _recipe_values(cfg: RunConfig) -> dict[str, str]:
    """The recipe's value for each field of ``FALLBACKS`` and the image transforms (the fallbacks
    without a recipe; the transforms then stay unset: the model's own)."""
    if not cfg.model.recipe:
        return dict(FALLBACKS)
    from mmalign.recipes import get_recipe

    recipe = get_recipe(cfg.model.recipe)
    policy, images = recipe.policy_for(cfg.train.stage), recipe.images_for(cfg.train.stage)
    return {
        "data.template": recipe.template,
        "data.caption_format": recipe.caption_format,
        "data.train_transform": images.train,
        "data.eval_transform": images.eval,
        "train.trainable": policy,
    }


def with_fallbacks(section: DataConfig | TrainConfig) -> DataConfig | TrainConfig:
    """A copy of one section with its unset recipe fields at ``FALLBACKS`` (for code that gets a
    section without the run config, e.g. a dataset built directly from a ``DataConfig``)."""
    prefix = "data." if isinstance(section, DataConfig) else "train."
    values = {k[len(prefix) :]: v for k, v in FALLBACKS.items() if k.startswith(prefix)}
    return dataclasses.replace(section, **{k: v for k, v in values.items() if getattr(section, k) is None})


def with_recipe_defaults(cfg: RunConfig) -> RunConfig:
    """A copy of ``cfg`` whose unset template, caption format, image transforms and freezing
    policy are the recipe's, so a stage config need not repeat its recipe (and cannot silently disagree with it:
    see ``recipe_departures``)."""
    out = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data), train=dataclasses.replace(cfg.train))
    for key, value in _recipe_values(cfg).items():
        section, name = key.split(".")
        if getattr(getattr(out, section), name) is None:
            setattr(getattr(out, section), name, value)
    return out


def recipe_departures(cfg: RunConfig) -> list[str]:
    """The set fields that differ from the recipe's value (e.g. a LoRA run that trains only the
    projector), one line each: logged at the start of a run, and empty for every shipped YAML."""
    if not cfg.model.recipe:
        return []
    out = []
    for key, value in _recipe_values(cfg).items():
        section, name = key.split(".")
        mine = getattr(getattr(cfg, section), name)
        if mine is not None and mine != value:
            out.append(f"{key}={mine} departs from recipe {cfg.model.recipe!r} ({value})")
    return out
