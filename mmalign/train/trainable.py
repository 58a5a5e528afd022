"""What a stage trains, and how the rest behaves meanwhile: the freezing policy (+ LoRA),
gradient checkpointing, the precision check, and train / eval modes of the frozen towers."""

from __future__ import annotations

import dataclasses
import logging
from typing import TYPE_CHECKING

import torch

from mmalign.config import RunConfig
from mmalign.model import apply_freeze
from mmalign.train.lora import apply_lora

if TYPE_CHECKING:
    from mmalign.model import FreezeReport

log = logging.getLogger(__name__)


def freeze_for_stage(model: torch.nn.Module, cfg: RunConfig, is_main: bool) -> FreezeReport:
    """The stage's freezing policy, then LoRA adapters (which join the trainable set, LLM role)."""
    train_cfg = cfg.train
    report = apply_freeze(model, train_cfg.trainable)
    if train_cfg.lora_r:
        apply_lora(model, train_cfg)
        trainable = [n for n, p in model.named_parameters() if p.requires_grad]
        report = dataclasses.replace(report, trainable_names=trainable)
    if is_main:
        log.info("%s", report)
        if train_cfg.lora_r:
            count = sum(p.numel() for p in model.parameters() if p.requires_grad)
            log.info("with LoRA (r=%d): %s trainable parameters", train_cfg.lora_r, f"{count:,}")
    return report


def enable_gradient_checkpointing(model: torch.nn.Module) -> None:
    """Non-reentrant activation checkpointing of the LLM and vision tower."""
    enable = getattr(model, "activation_checkpointing_enable", None)  # transformers >= 5.2x name
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if model.get_input_embeddings().weight.requires_grad is False:
        model.enable_input_require_grads()  # LLM frozen / LoRA: keep the graph from the embeddings


def check_compile(engine: str, quantization: str | None) -> None:
    """``train.compile`` where it is tested: one process or DDP, full-precision weights. FSDP2 and
    DeepSpeed wrap the layers with hooks of their own after the compile, and bitsandbytes layers
    were never traced here."""
    if engine not in ("single process", "DDP") or quantization:
        raise ValueError(
            f"train.compile=true is tested with one process and DDP on unquantized weights, not with the "
            f"{engine} engine and model.quantization={quantization}: set train.compile=false"
        )


def compile_language_model(model: torch.nn.Module) -> None:
    """torch.compile the LLM of a vision-language model, layer by layer (`compile_layers`)."""
    from mmalign.model.architectures import architecture_of

    compile_layers(model.get_submodule(architecture_of(model).roles["llm"][0].rstrip(".")))


def compile_layers(llm: torch.nn.Module) -> None:
    """torch.compile each decoder layer of ``llm`` in place (state-dict keys stay): the LLM does
    most of a step's work, and fusing its elementwise ops (norms, rotary, activations, the casts
    of mixed precision) matters as much as its matmuls. Per layer, because the layers share one
    compiled graph: the first step compiles in about half the time of the whole LLM, for ~5 %
    slower steps (measured on the toy, docs/performance.md). Dynamic shapes from the start: padded
    lengths and packed row counts change every step, and one symbolic graph serves them (sizes 0
    and 1 are still specialised: a one-row batch compiles once more)."""
    from mmalign.train.engines import outermost_blocks

    layers = outermost_blocks(llm, set(getattr(llm, "_no_split_modules", None) or ()))  # the decoder layers
    if not layers:
        log.warning("torch.compile: %s names no decoder-layer class; compiling it whole", type(llm).__name__)
        layers = [llm]
    for layer in layers:
        layer.compile(dynamic=True)
    log.info("torch.compile: %d x %s, compiled on the first step", len(layers), type(layers[0]).__name__)


def check_trainable_precision(model: torch.nn.Module, cfg: RunConfig) -> None:
    """Half-precision weights that train need mixed precision (float32 masters)."""
    half = [n for n, p in model.named_parameters() if p.requires_grad and p.dtype in (torch.float16, torch.bfloat16)]
    if half and cfg.train.mixed_precision == "no":
        raise ValueError(
            f"model.dtype={cfg.model.dtype} trains {half[0]} (and {len(half) - 1} more) in half precision, "
            "where AdamW's updates vanish or turn NaN: set train.mixed_precision=fp16|bf16 "
            "(trainable weights are then kept in float32)"
        )


def set_train_modes(model: torch.nn.Module, frozen: list[torch.nn.Module], checkpointing: bool) -> None:
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
