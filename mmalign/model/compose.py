"""Compose a vision-language model from a vision tower x any HF causal LM.

Every architecture is a stock transformers class (``Blip2ForConditionalGeneration`` for
MiniGPT-4, ``LlavaForConditionalGeneration`` for LLaVA / ShareGPT4V) or our small registered
``MiniGPT4PatchForConditionalGeneration``, so checkpoints load with plain ``from_pretrained``.
Pretrained parts are loaded separately and dropped into a skeleton built on the meta device:
no 7B model is randomly initialised only to be overwritten.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    Blip2Config,
    Blip2ForConditionalGeneration,
    Blip2QFormerConfig,
    Blip2QFormerModel,
    Blip2VisionConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    PreTrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

from mmalign.model.architectures import architecture_named, num_image_tokens
from mmalign.model.patch_model import (
    MiniGPT4PatchConfig,
    MiniGPT4PatchForConditionalGeneration,
    MiniGPT4PatchProjector,
    vision_tower_from_config,
)
from mmalign.model.weights import WeightReader, load_module_weights
from mmalign.prompts import IMAGE_TOKEN
from mmalign.recipes import ModelSpec

Source = str | dict | PreTrainedConfig  # hub id / local folder, or a config (dict with model_type)


def config_from(src: Source, **defaults: Any) -> PreTrainedConfig:
    """A config from a dict (``model_type`` + fields), a config object, or a folder / hub id."""
    if isinstance(src, PreTrainedConfig):
        return src
    if isinstance(src, dict):
        d = {**defaults, **src}
        if "model_type" not in d:
            raise ValueError(f"config dict needs a 'model_type': {sorted(d)}")
        return AutoConfig.for_model(d.pop("model_type"), **d)
    return AutoConfig.from_pretrained(src)


def vision_config_of(src: Source) -> PreTrainedConfig:
    """The vision sub-config of a CLIP / SigLIP / BLIP-2 / LLaVA checkpoint, or the config itself."""
    cfg = config_from(src)
    return getattr(cfg, "vision_config", None) or cfg


def _vision_tower(spec: ModelSpec, cfg: PreTrainedConfig) -> nn.Module:
    tower = vision_tower_from_config(cfg)
    src = spec.vision if isinstance(spec.vision, str) else (spec.qformer if spec.vision is None else None)
    if src is not None:
        load_module_weights(
            tower, src, ("", "vision_model.", "model.vision_tower.", "vision_tower.vision_model.", "vision_tower.")
        )
    return tower


def _language_model(spec: ModelSpec, dtype: torch.dtype | None, attn: str | None) -> PreTrainedModel:
    if isinstance(spec.llm, str):
        return AutoModelForCausalLM.from_pretrained(spec.llm, dtype=dtype or "auto", attn_implementation=attn)
    kwargs = {"attn_implementation": attn} if attn else {}
    return AutoModelForCausalLM.from_config(config_from(spec.llm), **kwargs)


def _tokenizer(spec: ModelSpec) -> PreTrainedTokenizerBase:
    src = spec.tokenizer if spec.tokenizer is not None else spec.llm
    if isinstance(src, PreTrainedTokenizerBase):
        return src
    if not isinstance(src, str):
        raise ValueError("the LLM is a config, so ModelSpec.tokenizer (folder / id / object) is required")
    return AutoTokenizer.from_pretrained(src)


def prepare_tokenizer(tok: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """Register IMAGE_TOKEN as a special token and make sure there is a pad token."""
    if IMAGE_TOKEN not in tok.all_special_tokens:
        tok.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]}, replace_extra_special_tokens=False)
    if tok.pad_token is None:
        tok.pad_token = tok.unk_token if tok.unk_token is not None else tok.eos_token
    return tok


def build_model(
    spec: ModelSpec,
    *,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    attn_implementation: str | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Compose the HF model for ``spec`` and its tokenizer (with ``IMAGE_TOKEN`` registered).

    Returned in eval mode, as ``from_pretrained`` does. ``dtype=None`` keeps the LLM's dtype
    (its checkpoint's, or float32 for a random one) for the whole model. New projector weights
    use PyTorch's default Linear init, as the originals do.
    """
    builder = _BUILDERS[architecture_named(spec.arch).model_type]  # an unknown arch fails before any load
    tok = prepare_tokenizer(_tokenizer(spec))
    lm = _language_model(spec, dtype, attn_implementation)
    if len(tok) > lm.config.vocab_size:
        lm.resize_token_embeddings(len(tok))
    for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
        if (value := getattr(tok, name)) is not None:
            setattr(lm.config, name, value)
            setattr(lm.generation_config, name, value)
    image_id = tok.convert_tokens_to_ids(IMAGE_TOKEN)
    target_dtype = dtype or next(lm.parameters()).dtype

    model = builder(spec, lm, image_id)
    leftover = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if leftover:
        raise RuntimeError(f"parts left uninitialised (meta): {leftover[:5]}")
    model.tie_weights()
    model.to(device=device, dtype=target_dtype)
    model.config.dtype = target_dtype
    for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
        setattr(model.generation_config, name, getattr(tok, name))
    if attn_implementation:
        model.set_attn_implementation(attn_implementation)
    return model.eval(), tok  # like from_pretrained: eval mode (Q-Former dropout off) until training


def _build_blip2(spec: ModelSpec, lm: PreTrainedModel, image_id: int) -> Blip2ForConditionalGeneration:
    vsrc = spec.vision if spec.vision is not None else spec.qformer
    vcfg = vision_config_of(vsrc)
    if not isinstance(vcfg, Blip2VisionConfig):
        raise ValueError(f"minigpt4 needs a Blip2 vision tower (EVA ViT-g); got {vcfg.model_type!r}")
    vision = _vision_tower(spec, vcfg)
    qsrc = spec.qformer
    if qsrc is None and isinstance(vsrc, str) and config_from(vsrc).model_type == "blip-2":
        qsrc = vsrc  # MiniGPT-4 reuses BLIP-2's ViT *and* Q-Former; a dict `qformer` means from scratch
    if isinstance(qsrc, str):
        src_cfg = AutoConfig.from_pretrained(qsrc)
        qcfg, n_query = src_cfg.qformer_config, src_cfg.num_query_tokens
        if n_query != spec.num_query_tokens:
            raise ValueError(f"{qsrc} has {n_query} query tokens, spec asks {spec.num_query_tokens}")
    else:
        qcfg = config_from(qsrc or {}, model_type="blip_2_qformer")
        if not isinstance(qcfg, Blip2QFormerConfig):
            raise ValueError(f"qformer config must be blip_2_qformer, got {qcfg.model_type!r}")
        n_query = spec.num_query_tokens
    qcfg.encoder_hidden_size = vcfg.hidden_size
    qformer = Blip2QFormerModel._from_config(qcfg)
    query_tokens = nn.Parameter(torch.empty(1, n_query, qcfg.hidden_size))
    if isinstance(qsrc, str):
        load_module_weights(qformer, qsrc, ("qformer.",))
        query_tokens.data.copy_(WeightReader(qsrc).read_one("query_tokens"))
    else:  # HF zero-inits query tokens (fine when loading); from scratch equal queries never diverge
        nn.init.normal_(query_tokens, std=qcfg.initializer_range)

    config = Blip2Config(
        vision_config=vcfg,
        qformer_config=qcfg,
        text_config=lm.config,
        num_query_tokens=n_query,
        image_token_index=image_id,
    )
    config.use_decoder_only_language_model = True
    with torch.device("meta"):
        model = Blip2ForConditionalGeneration(config)
    model.vision_model = vision
    model.qformer = qformer
    model.query_tokens = query_tokens
    model.language_projection = nn.Linear(qcfg.hidden_size, lm.config.hidden_size)
    model.language_model = lm
    return model


def _llava_common(spec: ModelSpec, lm: PreTrainedModel, image_id: int) -> dict[str, Any]:
    return dict(
        vision_config=vision_config_of(spec.vision),
        text_config=lm.config,
        image_token_index=image_id,
        vision_feature_select_strategy=spec.vision_feature_select_strategy,
    )


def _build_llava(spec: ModelSpec, lm: PreTrainedModel, image_id: int) -> LlavaForConditionalGeneration:
    common = _llava_common(spec, lm, image_id)
    if isinstance(common["vision_config"], Blip2VisionConfig):
        raise ValueError("llava needs a tower AutoModel knows (CLIP, SigLIP, ...); Blip2's ViT-g is minigpt4*")
    if spec.vision_feature_layer == "last":
        raise ValueError("llava selects hidden_states[layer]; give an int (LLaVA-1.5 uses -2)")
    config = LlavaConfig(
        **common,
        vision_feature_layer=-2 if spec.vision_feature_layer == "auto" else spec.vision_feature_layer,
        projector_hidden_act=spec.projector_hidden_act,
    )
    return _fill_llava_skeleton(spec, lm, config, LlavaForConditionalGeneration, LlavaMultiModalProjector)


def _build_patch(spec: ModelSpec, lm: PreTrainedModel, image_id: int) -> MiniGPT4PatchForConditionalGeneration:
    layer = spec.vision_feature_layer
    config = MiniGPT4PatchConfig(
        **_llava_common(spec, lm, image_id),
        vision_feature_layer=None if layer in ("auto", "last") else layer,
        merge_tokens=spec.merge_tokens,
        patch_merge=spec.patch_merge,
    )
    return _fill_llava_skeleton(spec, lm, config, MiniGPT4PatchForConditionalGeneration, MiniGPT4PatchProjector)


def _fill_llava_skeleton(spec: ModelSpec, lm: PreTrainedModel, config: Any, cls: type, projector: type) -> Any:
    """A meta-device Llava-like skeleton filled with the loaded tower, a new projector and the LLM."""
    config.image_seq_length = num_image_tokens(config)
    vision = _vision_tower(spec, config.vision_config)
    with torch.device("meta"):
        model = cls(config)
    model.model.vision_tower = vision
    model.model.multi_modal_projector = projector(config)  # PyTorch default init, like the originals
    model.model.language_model = getattr(lm, lm.base_model_prefix)
    model.lm_head = lm.get_output_embeddings()
    return model


_BUILDERS = {"blip-2": _build_blip2, "llava": _build_llava, "minigpt4_patch": _build_patch}

__all__ = ["ModelSpec", "build_model", "config_from", "prepare_tokenizer", "vision_config_of"]
