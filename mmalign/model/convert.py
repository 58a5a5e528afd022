"""Convert the published MiniGPT-4, LLaVA-1.5 and ShareGPT4V checkpoints into mmalign folders.

The originals are not Hugging Face models: MiniGPT-4 ships a ``.pth`` holding only
``llama_proj`` and runs it on LAVIS's EVA ViT-g + BLIP-2 Q-Former and a Vicuna folder; LLaVA-1.5
and ShareGPT4V ship LLaVA's own layout (``model.mm_projector.0``, ``mm_vision_tower`` in
config.json). The result is the folder ``mmalign.model.checkpoint.export`` writes (Blip2 /
Llava / ``minigpt4_patch``, tokenizer with ``<image>``, processor, chat template, mmalign.json).

Every original tensor name goes through ONE table (``MINIGPT4_RENAMES``, ``LLAVA_RENAMES``)
of two-way name patterns, so an error can name the original tensor that is missing. Tensors
no rule or ``*_IGNORED`` entry knows, tensors the model lacks, and wrong shapes all raise a
``ConversionError`` naming them, before anything is written. The model is built on the meta
device and filled by assignment: nothing is randomly initialised, nothing copied twice.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm
from transformers import (
    AutoConfig,
    AutoTokenizer,
    Blip2Config,
    Blip2ForConditionalGeneration,
    Blip2QFormerConfig,
    Blip2VisionConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    PreTrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from mmalign.model.architectures import architecture_of, num_image_tokens
from mmalign.model.checkpoint import MMALIGN_META, export
from mmalign.model.compose import prepare_tokenizer, vision_config_of
from mmalign.model.patch_model import MiniGPT4PatchConfig, MiniGPT4PatchForConditionalGeneration
from mmalign.model.weights import WeightReader
from mmalign.prompts import IMAGE_TOKEN

log = logging.getLogger(__name__)
Tensors = dict[str, torch.Tensor]


class ConversionError(ValueError):
    """An original checkpoint does not match what the conversion expects (names, shapes, config)."""


# --------------------------------------------------------------------------- the rename tables


@dataclass(frozen=True)
class Rename:
    """``original`` <-> ``target`` name pattern. ``{i}`` matches digits, ``{rest}`` anything,
    other ``{field}`` one dotted component. ``{vision}``, ``{projector}``, ``{text}``,
    ``{lm_head}`` are the target model's prefixes (``Architecture.conversion_prefixes``). ``part`` "q" / "v": the tensor
    is that slice of a fused bias (EVA's ``q_bias`` / ``v_bias`` -> Blip2's ``qkv.bias``)."""

    original: str
    target: str
    part: str | None = None


# LAVIS / MiniGPT-4 names (eva_vit.py, Qformer.py, minigpt4.py) -> HF Blip2 / minigpt4_patch.
_QF, _HF_QF = "Qformer.bert.encoder.layer.{i}.", "qformer.encoder.layer.{i}."
MINIGPT4_RENAMES: tuple[Rename, ...] = (
    Rename("visual_encoder.cls_token", "{vision}embeddings.class_embedding"),
    Rename("visual_encoder.pos_embed", "{vision}embeddings.position_embedding"),
    Rename("visual_encoder.patch_embed.proj.{p}", "{vision}embeddings.patch_embedding.{p}"),
    Rename("visual_encoder.blocks.{i}.norm1.{p}", "{vision}encoder.layers.{i}.layer_norm1.{p}"),
    Rename("visual_encoder.blocks.{i}.norm2.{p}", "{vision}encoder.layers.{i}.layer_norm2.{p}"),
    Rename("visual_encoder.blocks.{i}.attn.qkv.weight", "{vision}encoder.layers.{i}.self_attn.qkv.weight"),
    # EVA adds q and v biases, none on k; HF keeps one qkv bias = cat(q_bias, 0, v_bias)
    Rename("visual_encoder.blocks.{i}.attn.q_bias", "{vision}encoder.layers.{i}.self_attn.qkv.bias", "q"),
    Rename("visual_encoder.blocks.{i}.attn.v_bias", "{vision}encoder.layers.{i}.self_attn.qkv.bias", "v"),
    Rename("visual_encoder.blocks.{i}.attn.proj.{p}", "{vision}encoder.layers.{i}.self_attn.projection.{p}"),
    Rename("visual_encoder.blocks.{i}.mlp.{fc}.{p}", "{vision}encoder.layers.{i}.mlp.{fc}.{p}"),
    Rename("ln_vision.{p}", "{vision}post_layernorm.{p}"),  # applied to the ViT output, as HF's post_layernorm
    Rename("query_tokens", "query_tokens"),
    Rename("Qformer.bert.embeddings.LayerNorm.{p}", "qformer.layernorm.{p}"),
    Rename(_QF + "{attn}.self.{qkv}.{p}", _HF_QF + "{attn}.attention.{qkv}.{p}"),  # attention / crossattention
    Rename(_QF + "{attn}.output.{m}.{p}", _HF_QF + "{attn}.output.{m}.{p}"),
    Rename(_QF + "intermediate_query.dense.{p}", _HF_QF + "intermediate_query.dense.{p}"),
    Rename(_QF + "output_query.{m}.{p}", _HF_QF + "output_query.{m}.{p}"),
    Rename("llama_proj.{p}", "{projector}{p}"),
    Rename("model.{rest}", "{text}{rest}"),  # the Vicuna / Llama-2 folder (HF LlamaForCausalLM names)
    Rename("lm_head.weight", "{lm_head}"),
)

# Present in the original files, deliberately unused (as the originals leave them unused).
MINIGPT4_IGNORED: dict[str, str] = {
    r"Qformer\.cls\..+": "the Q-Former's BERT LM head (MiniGPT-4 deletes it)",
    r"Qformer\.bert\.embeddings\.(word_embeddings\..+|position_embeddings\..+|position_ids)": "Q-Former text "
    "embeddings (MiniGPT-4 feeds queries only)",
    r"Qformer\.bert\.encoder\.layer\.\d+\.(intermediate|output)\..+": "the Q-Former's text feed-forward "
    "(queries use *_query; MiniGPT-4 deletes it)",
    r"(t5_proj|opt_proj|vision_proj|text_proj|itm_head)\..+|temp": "BLIP-2's own heads",
    r"(t5_model|opt_model)\..+": "BLIP-2's own language model (MiniGPT-4 runs its LLM instead)",
    r".+\.rotary_emb\.inv_freq": "recomputed from the config",
}

# LLaVA / ShareGPT4V names (llava_arch.py, clip_encoder.py, LlavaLlamaForCausalLM) -> HF Llava.
LLAVA_RENAMES: tuple[Rename, ...] = (
    Rename("model.mm_projector.0.{p}", "model.multi_modal_projector.linear_1.{p}"),
    Rename("model.mm_projector.2.{p}", "model.multi_modal_projector.linear_2.{p}"),
    Rename("model.vision_tower.vision_tower.vision_model.{rest}", "model.vision_tower.{rest}"),
    Rename("model.{rest}", "model.language_model.{rest}"),
    Rename("lm_head.weight", "lm_head.weight"),
)
LLAVA_IGNORED: dict[str, str] = {r".+\.rotary_emb\.inv_freq": "recomputed from the config"}
LLAVA_TEXT_TYPES = {  # config.json `architectures` -> the text model inside
    "LlavaLlamaForCausalLM": "llama",
    "Share4VLlamaForCausalLM": "llama",
}
LLAVA_SELECT_FEATURE = {"patch": "default", "cls_patch": "full"}  # mm_vision_select_feature -> HF strategy
# image_aspect_ratio -> the eval transform: LLaVA's process_images pads for "pad" (expand2square with the
# mean colour), else runs CLIP's processor as is (shortest edge + center crop)
LLAVA_ASPECT = {"pad": "pad_to_square", "square": "center_crop", None: "center_crop"}

EVA_HEADS = {1408: 16}  # EVA ViT-g: 1408 // 88 heads; head counts are not visible in tensor shapes
QFORMER_HEADS = {768: 12}  # BERT-base


def _pattern(template: str, prefixes: Mapping[str, str]) -> re.Pattern:
    for k, v in prefixes.items():
        template = template.replace("{" + k + "}", v)
    parts = re.split(r"\{(\w+)\}", template)
    regex = ""
    for j, piece in enumerate(parts):
        if j % 2 == 0:
            regex += re.escape(piece)
        else:
            sub = {"i": r"\d+", "rest": r".+"}.get(piece, r"[^.]+")
            regex += f"(?P<{piece}>{sub})" if f"(?P<{piece}>" not in regex else f"(?P={piece})"
    return re.compile(regex)


def _fill(template: str, prefixes: Mapping[str, str], fields: Mapping[str, str]) -> str:
    return template.format(**{**prefixes, **fields})


def rename(
    tensors: Mapping[str, torch.Tensor],
    rules: tuple[Rename, ...],
    ignored: Mapping[str, str],
    prefixes: Mapping[str, str],
) -> tuple[Tensors, dict[str, str]]:
    """Original names -> target names. Returns (target tensors, target -> original name).

    Raises ``ConversionError`` naming every tensor that no rule and no ignore entry knows, and
    every fused bias that has one part without the other.
    """
    compiled = [(r, _pattern(r.original, {})) for r in rules]
    skip = [(re.compile(p), why) for p, why in ignored.items()]
    out: Tensors = {}
    origin: dict[str, str] = {}
    parts: dict[str, dict[str, tuple[str, torch.Tensor]]] = {}
    unknown, skipped = [], {}
    for name, tensor in tensors.items():
        why = next((why for p, why in skip if p.fullmatch(name)), None)
        if why is not None:
            skipped.setdefault(why, []).append(name)
            continue
        rule = next(((r, m) for r, p in compiled if (m := p.fullmatch(name))), None)
        if rule is None:
            unknown.append(name)
            continue
        r, m = rule
        target = _fill(r.target, prefixes, m.groupdict())
        if r.part:
            parts.setdefault(target, {})[r.part] = (name, tensor)
        else:
            out[target], origin[target] = tensor, name
    if unknown:
        raise ConversionError(f"{len(unknown)} tensor(s) of unknown name (no rename rule): {_names(unknown)}")
    for why, names in skipped.items():
        log.info("not converted, %s: %d tensors, e.g. %s", why, len(names), names[0])
    for target, got in parts.items():
        if set(got) != {"q", "v"}:
            have = next(iter(got.values()))[0]
            other = have.replace("q_bias", "v_bias") if "q" in got else have.replace("v_bias", "q_bias")
            raise ConversionError(f"missing tensor: {other} (the other half of {have})")
        (qn, q), (_, v) = got["q"], got["v"]
        out[target], origin[target] = torch.cat([q, torch.zeros_like(q), v]), qn.replace("q_bias", "{q,v}_bias")
    return out, origin


def original_name(target: str, rules: tuple[Rename, ...], prefixes: Mapping[str, str]) -> str:
    """The original name a target tensor comes from (for "missing" errors); the target itself if none."""
    for r in rules:
        if m := _pattern(r.target, prefixes).fullmatch(target):
            name = _fill(r.original, prefixes, m.groupdict())
            return name.replace("q_bias", "{q,v}_bias") if r.part else name
    return target


def _names(names: list[str], limit: int = 12) -> str:
    names = sorted(names)
    return ", ".join(names[:limit]) + (f" ... (+{len(names) - limit} more)" if len(names) > limit else "")


# --------------------------------------------------------------------------- reading originals


def load_original(path: str | Path, *, allow_pickle: bool = False) -> Tensors:
    """Tensors of one original file: ``.safetensors``, or a ``torch.save`` file holding a state
    dict or ``{"model": state dict, ...}`` (LAVIS / MiniGPT-4 checkpoints).

    ``allow_pickle=False`` reads with ``weights_only=True``: plain tensors and containers only,
    so a file cannot run code while being read. Set it only for files you trust."""
    path = Path(path)
    if not path.is_file():
        raise ConversionError(f"{path}: no such file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        obj = torch.load(path, map_location="cpu", weights_only=not allow_pickle, mmap=True)
    except RuntimeError as e:
        if "mmap" not in str(e):  # legacy (non-zip) files cannot be memory-mapped
            raise
        obj = torch.load(path, map_location="cpu", weights_only=not allow_pickle)
    except Exception as e:  # noqa: BLE001 - any unpickling refusal
        if allow_pickle:
            raise
        lines = [ln.strip() for ln in str(e).splitlines() if "Unsupported global" in ln] or [type(e).__name__]
        raise ConversionError(
            f"{path}: torch.load(weights_only=True) refused it ({lines[0]}): it holds more than tensors. "
            "If you trust the file, pass allow_pickle=True (CLI: --trust-pickle)"
        ) from e
    state = obj["model"] if isinstance(obj, dict) and isinstance(obj.get("model"), dict) else obj
    if not isinstance(state, dict):
        raise ConversionError(f"{path}: expected a state dict (or {{'model': state dict}}), got {type(state).__name__}")
    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise ConversionError(f"{path}: entries that are not tensors: {_names(bad)}")
    return dict(state)


def _merge(sources: dict[str, Tensors]) -> tuple[Tensors, dict[str, str]]:
    """One name space from several files given in the order MiniGPT-4 loads them, and the file
    each tensor is taken from. A tensor in two files comes from the later one, as MiniGPT-4's
    ``load_state_dict(strict=False)`` calls overwrite (logged); the shapes must agree, as they
    must there."""
    out: Tensors = {}
    seen: dict[str, str] = {}
    for src, tensors in sources.items():
        overridden: dict[str, list[str]] = {}
        for name, t in tensors.items():
            if name in out:
                if out[name].shape != t.shape:
                    raise ConversionError(
                        f"tensor {name} is given twice with different shapes: "
                        f"{list(out[name].shape)} by {seen[name]}, {list(t.shape)} by {src}"
                    )
                overridden.setdefault(seen[name], []).append(name)
            out[name], seen[name] = t, src
        for earlier, names in overridden.items():
            log.info(
                "%d tensors are in both %s and %s: taken from the latter, as MiniGPT-4 loads it later (e.g. %s)",
                *(len(names), earlier, src, names[0]),
            )
    return out, seen


def _read_folder(src: str, names: list[str] | None = None, what: str = "") -> Tensors:
    """Tensors of an HF-style folder / hub id (all, or ``names``), one shard file at a time."""
    ckpt = WeightReader(src)
    names = list(ckpt.weight_map) if names is None else names
    by_file: dict[str, list[str]] = {}
    for n in names:
        by_file.setdefault(ckpt.weight_map[n], []).append(n)
    out: Tensors = {}
    for _file, keys in tqdm(sorted(by_file.items()), desc=f"reading {what or src}", disable=len(by_file) < 2):
        out.update(ckpt.read(keys))
    return out


# --------------------------------------------------------------------------- configs from shapes


def _eva_config(t: Mapping[str, torch.Tensor], prefix: str, layers: int, heads: int | None) -> Blip2VisionConfig:
    """Blip2VisionConfig of an EVA ViT from its tensors (``prefix``: HF names, e.g. vision_model.)."""
    width = t[prefix + "embeddings.class_embedding"].shape[-1]
    patch = t[prefix + "embeddings.patch_embedding.weight"].shape[-1]
    n_pos = t[prefix + "embeddings.position_embedding"].shape[-2]
    grid = math.isqrt(n_pos - 1)
    if grid * grid != n_pos - 1:
        raise ConversionError(f"visual_encoder.pos_embed: {n_pos} positions is not 1 + a square grid")
    heads = heads or EVA_HEADS.get(width)
    if heads is None:
        raise ConversionError(f"EVA ViT of width {width}: give its number of attention heads (--vit-heads)")
    fc1 = t.get(prefix + "encoder.layers.0.mlp.fc1.weight")
    if fc1 is None:
        raise ConversionError("missing tensor: visual_encoder.blocks.0.mlp.fc1.weight")
    return Blip2VisionConfig(
        hidden_size=width,
        intermediate_size=fc1.shape[0],
        num_hidden_layers=layers,
        num_attention_heads=heads,
        image_size=grid * patch,
        patch_size=patch,
        hidden_act="gelu",
        layer_norm_eps=1e-6,
        qkv_bias=True,
    )


def _qformer_config(t: Mapping[str, torch.Tensor], encoder_width: int, heads: int | None) -> Blip2QFormerConfig:
    """Blip2QFormerConfig from the Q-Former's tensors: width, depth, FFN size, cross-attention layers."""
    layer = re.compile(r"qformer\.encoder\.layer\.(\d+)\.(crossattention\.)?")
    found = [(int(m[1]), bool(m[2])) for n in t if (m := layer.match(n))]
    layers, cross = sorted({i for i, _ in found}), sorted({i for i, c in found if c})
    if not layers or not cross or cross[0] != 0:
        raise ConversionError("the Q-Former has no layers, or layer 0 has no cross-attention: not a BLIP-2 Q-Former")
    freq = cross[1] if len(cross) > 1 else len(layers)
    if cross != list(range(0, len(layers), freq)):
        raise ConversionError(f"Q-Former cross-attention in layers {cross}: not every {freq}-th layer")
    width = t["qformer.layernorm.weight"].shape[0]
    heads = heads or QFORMER_HEADS.get(width)
    if heads is None:
        raise ConversionError(f"Q-Former of width {width}: give its number of attention heads (--qformer-heads)")
    return Blip2QFormerConfig(
        hidden_size=width,
        num_hidden_layers=len(layers),
        num_attention_heads=heads,
        intermediate_size=t["qformer.encoder.layer.0.intermediate_query.dense.weight"].shape[0],
        cross_attention_frequency=freq,
        encoder_hidden_size=encoder_width,
        layer_norm_eps=1e-12,
    )


_LLAVA_FIELDS = {
    "model_type",
    "architectures",
    "_name_or_path",
    "transformers_version",
    "use_mm_proj",
    "image_aspect_ratio",
    "image_grid_pinpoints",
    "tokenizer_padding_side",
    "tokenizer_model_max_length",
}
_LLAVA_FIELD = re.compile(r"mm_|tune_mm|freeze_mm|unfreeze_mm")


def _text_config_from_llava(raw: dict[str, Any]) -> PreTrainedConfig:
    """The LLM's config from an original LLaVA config.json (LLaVA's own fields dropped)."""
    archs = raw.get("architectures") or []
    kinds = {LLAVA_TEXT_TYPES[a] for a in archs if a in LLAVA_TEXT_TYPES}
    if len(kinds) != 1:
        raise ConversionError(f"config.json architectures {archs}: expected one of {sorted(LLAVA_TEXT_TYPES)}")
    fields = {k: v for k, v in raw.items() if k not in _LLAVA_FIELDS and not _LLAVA_FIELD.match(k)}
    if fields.get("rope_scaling", 0) is None:  # the legacy "no scaling" spelling
        del fields["rope_scaling"]
    return AutoConfig.for_model(kinds.pop(), **fields)


# --------------------------------------------------------------------------- assembling


def _check(
    model: PreTrainedModel,
    tensors: Tensors,
    origin: Mapping[str, str],
    where: str,
    parts: tuple[str, ...] = ("",),
    back: Callable[[str], str] = str,
) -> None:
    """The tensors are exactly the model's ``parts`` (name prefixes), with the model's shapes.

    Errors name original tensors: ``origin`` maps target -> original name, ``back`` gives the
    original name a missing target would have come from."""
    expected = {n: t.shape for n, t in model.state_dict().items() if n.startswith(parts)}
    unexpected = [f"{origin.get(n, n)} (as {n})" for n in tensors if n not in expected]
    if unexpected:
        raise ConversionError(f"{where}: tensor(s) the model has no place for: {_names(unexpected)}")
    wrong = [
        f"{origin.get(n, n)}: {list(t.shape)}, the model needs {list(expected[n])} (as {n})"
        for n, t in tensors.items()
        if t.shape != expected[n]
    ]
    if wrong:
        raise ConversionError(f"{where}: wrong shape(s): {'; '.join(wrong[:8])}")
    missing = [back(n) for n in expected if n not in tensors]
    if missing:
        raise ConversionError(f"{where}: missing tensor(s): {_names(missing)}")


def _skeleton(cls: type[PreTrainedModel], config: PreTrainedConfig) -> PreTrainedModel:
    with torch.device("meta"):
        return cls(config)


def _finish(
    model: PreTrainedModel,
    tensors: Tensors,
    tok: PreTrainedTokenizerBase,
    dtype: torch.dtype | None,
) -> PreTrainedModel:
    """Assign the tensors (strict), grow the embeddings for ``<image>``, copy special ids."""
    text_cfg = model.config.text_config
    _check(model, tensors, {}, "assembled model")
    target = dtype or tensors[next(n for n in tensors if n.endswith("embed_tokens.weight"))].dtype
    model.load_state_dict({n: t.to(target) for n, t in tensors.items()}, strict=True, assign=True)
    model.tie_weights()
    if len(tok) > text_cfg.vocab_size:
        model.resize_token_embeddings(len(tok))  # new rows: mean of the others (HF default)
    for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
        value = getattr(tok, name)
        setattr(text_cfg, name, value)
        setattr(model.generation_config, name, value)
    model.config.dtype = text_cfg.dtype = target
    return model.eval()


def _tokenizer(src: str | PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    tok = src if isinstance(src, PreTrainedTokenizerBase) else AutoTokenizer.from_pretrained(src)
    return prepare_tokenizer(tok)


def _write(
    model: PreTrainedModel,
    tok: PreTrainedTokenizerBase,
    out: str | Path,
    template: str,
    max_shard_size: int | str | None,
    sources: dict[str, Any],
    image_transform: str | None = None,
) -> Path:
    out = export(model, tok, out, template=template, max_shard_size=max_shard_size, image_transform=image_transform)
    meta = json.loads((out / MMALIGN_META).read_text())
    meta["converted_from"] = {k: str(v) for k, v in sources.items() if v is not None}
    (out / MMALIGN_META).write_text(json.dumps(meta, indent=1))
    log.info("wrote %s (%s, template %s)", out, type(model).__name__, template)
    return out


# --------------------------------------------------------------------------- MiniGPT-4


def convert_minigpt4(
    projection: str | Path,
    llm: str,
    out: str | Path,
    *,
    blip2: str | Path | None = None,
    vit: str | Path | None = None,
    vit_layers: int = 39,
    vit_heads: int | None = None,
    qformer_heads: int | None = None,
    tokenizer: str | PreTrainedTokenizerBase | None = None,
    template: str | None = None,
    dtype: torch.dtype | None = None,
    max_shard_size: int | str | None = "5GB",
    allow_pickle: bool = False,
) -> Path:
    """MiniGPT-4 stage-2 checkpoint (``llama_proj``) + its vision side + LLM folder -> mmalign folder.

    - Vicuna (Q-Former) variant: ``blip2`` = LAVIS ``blip2_pretrained_flant5xxl.pth`` (Q-Former,
      query tokens, ``ln_vision``) with ``vit`` = LAVIS ``eva_vit_g.pth``, or ``blip2`` = a HF
      Blip2 folder / hub id (ViT + Q-Former). Gives ``Blip2ForConditionalGeneration``.
    - Llama-2 variant (no Q-Former): ``vit`` only. Gives ``minigpt4_patch``: CLS dropped, 4
      consecutive tokens joined, the projection on ``ln_vision``'s output. That LayerNorm is
      never loaded from BLIP-2 in this variant (MiniGPT-4 leaves it at weight 1, bias 0), so it
      is identity-initialised unless the projection checkpoint holds ``ln_vision.*``.

    ``vit_layers``: EVA blocks kept (MiniGPT-4 and BLIP-2 build 39 of eva_vit_g's 40).
    Template default: ``minigpt4_v0`` (Vicuna) / ``llama2``.
    """
    hf_blip2 = _check_minigpt4_sources(projection, blip2, vit)
    arch = "blip-2" if blip2 is not None else "minigpt4_patch"
    prefixes = architecture_of(arch).conversion_prefixes
    files = [vit, None if hf_blip2 else blip2, projection]  # MiniGPT-4's load order: a later file wins
    tensors, origin = _minigpt4_originals([f for f in files if f is not None], vit, vit_layers, prefixes, allow_pickle)
    if hf_blip2:
        tensors.update(_read_hf_blip2(str(blip2), origin))
    tok = _tokenizer(tokenizer if tokenizer is not None else llm)
    config = _minigpt4_config(
        arch,
        tensors,
        str(blip2) if hf_blip2 else None,
        AutoConfig.from_pretrained(llm),
        tok.convert_tokens_to_ids(IMAGE_TOKEN),
        vit_layers,
        vit_heads,
        qformer_heads,
    )
    cls = Blip2ForConditionalGeneration if arch == "blip-2" else MiniGPT4PatchForConditionalGeneration
    model = _skeleton(cls, config)
    back = lambda n: original_name(n, MINIGPT4_RENAMES, prefixes)  # noqa: E731
    vision_side = (prefixes["vision"], "qformer.", "query_tokens", prefixes["projector"])
    _check(model, tensors, origin, "MiniGPT-4 vision side + projection", vision_side, back)  # before the LLM is read
    llm_tensors = _minigpt4_llm(model, llm, prefixes)
    model = _finish(model, {**tensors, **llm_tensors}, tok, dtype)
    template = template or architecture_of(arch).default_template
    given = {"projection": projection, "blip2": blip2, "vit": vit, "llm": llm}
    return _write(model, tok, out, template, max_shard_size, given)


def _check_minigpt4_sources(projection: str | Path, blip2: str | Path | None, vit: str | Path | None) -> bool:
    """Refuse impossible combinations before anything is read; True when ``blip2`` is a HF folder."""
    for path in (projection, blip2, vit):  # a mistyped checkpoint file is not a hub id
        if (
            path is not None
            and str(path).endswith((".pth", ".pt", ".bin", ".safetensors"))
            and not Path(path).is_file()
        ):
            raise ConversionError(f"{path}: no such file")
    hf_blip2 = blip2 is not None and not Path(blip2).is_file()
    if blip2 is None and vit is None:
        raise ConversionError("give the vision side: blip2 (Vicuna variant) or vit (Llama-2 variant)")
    if hf_blip2 and vit is not None:
        raise ConversionError(f"{blip2} is a HF Blip2 folder holding its own ViT: drop vit")
    return hf_blip2


def _minigpt4_llm(model: PreTrainedModel, llm: str, prefixes: Mapping[str, str]) -> Tensors:
    """The Vicuna / Llama-2 folder's tensors under the model's names, checked against it."""
    llm_tensors, llm_origin = rename(_read_folder(llm, what=f"LLM {llm}"), MINIGPT4_RENAMES, MINIGPT4_IGNORED, prefixes)
    _tie_lm_head(llm_tensors, model.config.text_config, prefixes)
    back = lambda n: original_name(n, MINIGPT4_RENAMES, prefixes)  # noqa: E731
    _check(model, llm_tensors, llm_origin, f"LLM {llm}", (prefixes["text"], prefixes["lm_head"]), back)
    return llm_tensors


def _minigpt4_originals(
    files: list[str | Path], vit: str | Path | None, vit_layers: int, prefixes: Mapping[str, str], allow_pickle: bool
) -> tuple[Tensors, dict[str, str]]:
    """The MiniGPT-4 / LAVIS files as one renamed set (EVA blocks past ``vit_layers`` dropped)."""
    sources: dict[str, Tensors] = {}
    for f in files:
        tensors = load_original(f, allow_pickle=allow_pickle)
        if f == vit:  # eva_vit_g.pth holds bare EVA names; inside LAVIS models they sit under visual_encoder.
            tensors = {k if k.startswith("visual_encoder.") else "visual_encoder." + k: t for k, t in tensors.items()}
        sources[str(f)] = tensors
    original, taken_from = _merge(sources)
    deep = re.compile(r"visual_encoder\.blocks\.(\d+)\.")
    too_deep = [n for n in original if (m := deep.match(n)) and int(m[1]) >= vit_layers]
    if too_deep:
        log.info("EVA blocks >= %d unused (MiniGPT-4 builds %d): %d tensors", vit_layers, vit_layers, len(too_deep))
    kept = {k: t for k, t in original.items() if k not in too_deep}
    tensors, origin = rename(kept, MINIGPT4_RENAMES, MINIGPT4_IGNORED, prefixes)
    files_of = [taken_from[name.replace("{q,v}_bias", "q_bias")] for name in origin.values()]
    log.info("converted tensors per file: %s", ", ".join(f"{files_of.count(f)} from {f}" for f in sources))
    return tensors, origin


def _read_hf_blip2(src: str, origin: dict[str, str]) -> Tensors:
    """ViT + Q-Former + query tokens of a HF Blip2 folder / hub id (already the target names)."""
    wanted = ("vision_model.", "qformer.", "query_tokens")
    names = [n for n in WeightReader(src).weight_map if n.startswith(wanted)]
    tensors = _read_folder(src, names, "Blip2 ViT + Q-Former")
    origin.update({n: f"{src}:{n}" for n in tensors})
    return tensors


def _minigpt4_config(
    arch: str,
    t: Tensors,
    hf_blip2: str | None,
    text_cfg: PreTrainedConfig,
    image_id: int,
    vit_layers: int,
    vit_heads: int | None,
    qformer_heads: int | None,
) -> PreTrainedConfig:
    """The target config: vision / Q-Former sub-configs from a Blip2 folder or from tensor shapes."""
    v = architecture_of(arch).conversion_prefixes["vision"]
    if hf_blip2 is not None:
        src = AutoConfig.from_pretrained(hf_blip2)
        if not isinstance(src, Blip2Config):
            raise ConversionError(f"{hf_blip2}: not a Blip2 checkpoint (model_type {src.model_type!r})")
        vcfg, qcfg, n_query = src.vision_config, src.qformer_config, src.num_query_tokens
    else:
        if v + "embeddings.class_embedding" not in t:
            raise ConversionError("no EVA ViT tensors (visual_encoder.*) given: give vit (eva_vit_g.pth)")
        vcfg = _eva_config(t, v, vit_layers, vit_heads)
    if arch == "minigpt4_patch":
        if v + "post_layernorm.weight" not in t:  # MiniGPT-4 Llama-2 leaves ln_vision at its init
            t[v + "post_layernorm.weight"] = torch.ones(vcfg.hidden_size)
            t[v + "post_layernorm.bias"] = torch.zeros(vcfg.hidden_size)
        config = MiniGPT4PatchConfig(
            vision_config=vcfg,
            text_config=text_cfg,
            image_token_index=image_id,
            vision_feature_layer=None,
            merge_tokens=4,
            patch_merge="sequential",
        )
        config.image_seq_length = num_image_tokens(config)
        return config
    if hf_blip2 is None:
        if "query_tokens" not in t:
            raise ConversionError("missing tensor: query_tokens (not in the blip2 file)")
        qcfg, n_query = _qformer_config(t, vcfg.hidden_size, qformer_heads), t["query_tokens"].shape[1]
    qcfg.encoder_hidden_size = vcfg.hidden_size
    config = Blip2Config(
        vision_config=vcfg,
        qformer_config=qcfg,
        text_config=text_cfg,
        num_query_tokens=n_query,
        image_token_index=image_id,
    )
    config.use_decoder_only_language_model = True
    return config


# --------------------------------------------------------------------------- LLaVA-1.5 / ShareGPT4V


def convert_llava(
    checkpoint: str,
    out: str | Path,
    *,
    vision: str | None = None,
    tokenizer: str | PreTrainedTokenizerBase | None = None,
    template: str = "vicuna_v1",
    dtype: torch.dtype | None = None,
    max_shard_size: int | str | None = "5GB",
) -> Path:
    """An original LLaVA-1.5 / ShareGPT4V folder (or hub id) -> ``LlavaForConditionalGeneration`` folder.

    The vision tower is what LLaVA itself runs: the CLIP named by ``mm_vision_tower`` (a hub id
    or folder; ShareGPT4V's points to its tuned CLIP, Lin-Chen/ShareGPT4V-7B_Pretrained_vit-
    large336-l12), or ``vision`` when given. Tower tensors saved inside the checkpoint are used
    only with ``unfreeze_mm_vision_tower: true`` (as LLaVA does) and no ``vision`` override.
    """
    raw = _config_json(checkpoint)
    text_cfg = _text_config_from_llava(raw)
    strategy = _check_llava_config(raw)
    tower_src = vision or raw.get("mm_vision_tower")
    if not tower_src:
        raise ConversionError("config.json has no mm_vision_tower: give vision (--vision)")
    if tower_src.startswith((".", "/")) and not Path(tower_src).exists():
        raise ConversionError(f"mm_vision_tower {tower_src!r} is a path that does not exist here: give --vision")
    vcfg = vision_config_of(tower_src)
    if raw.get("mm_hidden_size") not in (None, vcfg.hidden_size):
        raise ConversionError(f"mm_hidden_size {raw['mm_hidden_size']} != {tower_src}'s hidden size {vcfg.hidden_size}")

    tok = _tokenizer(tokenizer if tokenizer is not None else checkpoint)
    config = LlavaConfig(
        vision_config=vcfg,
        text_config=text_cfg,
        image_token_index=tok.convert_tokens_to_ids(IMAGE_TOKEN),
        vision_feature_layer=raw["mm_vision_select_layer"],
        vision_feature_select_strategy=strategy,
        projector_hidden_act="gelu",
    )
    config.image_seq_length = num_image_tokens(config)
    model = _skeleton(LlavaForConditionalGeneration, config)

    tower_inside = raw.get("unfreeze_mm_vision_tower", False) and vision is None
    ignored = dict(LLAVA_IGNORED)
    if not tower_inside:
        ignored[r"model\.vision_tower\.vision_tower\..+"] = f"a tower copy LLaVA does not load (it runs {tower_src})"
    original = _read_folder(checkpoint, what=f"LLaVA {checkpoint}")
    tensors, origin = rename(original, LLAVA_RENAMES, ignored, architecture_of("llava").conversion_prefixes)
    if not tower_inside:
        tower = "model.vision_tower."
        tensors.update(_read_tower(tower_src, [n for n in model.state_dict() if n.startswith(tower)], tower))
    _tie_lm_head(tensors, text_cfg, architecture_of("llava").conversion_prefixes)
    _check(model, tensors, origin, f"LLaVA {checkpoint}", back=lambda n: original_name(n, LLAVA_RENAMES, {}))
    model = _finish(model, tensors, tok, dtype)
    sources = {"checkpoint": checkpoint, "vision": tower_src}
    return _write(model, tok, out, template, max_shard_size, sources, LLAVA_ASPECT[raw.get("image_aspect_ratio")])


def _check_llava_config(raw: Mapping[str, Any]) -> str:
    """Refuse what HF Llava cannot express; return the feature-select strategy."""
    ptype = raw.get("mm_projector_type", "linear")  # LLaVA's own default
    if ptype != "mlp2x_gelu":
        raise ConversionError(f"mm_projector_type {ptype!r}: only mlp2x_gelu (LLaVA-1.5 / ShareGPT4V) maps to HF Llava")
    if raw.get("mm_use_im_start_end"):
        raise ConversionError("mm_use_im_start_end: true is not supported (<im_start>/<im_end> around the image)")
    if raw.get("mm_patch_merge_type", "flat") != "flat":
        raise ConversionError(f"mm_patch_merge_type {raw['mm_patch_merge_type']!r}: LLaVA-1.6 (anyres) is Llava-Next")
    if not isinstance(raw.get("mm_vision_select_layer"), int):
        raise ConversionError("config.json: mm_vision_select_layer (an int, -2 for LLaVA-1.5) is missing")
    if raw.get("image_aspect_ratio") not in LLAVA_ASPECT:
        raise ConversionError(f"image_aspect_ratio {raw['image_aspect_ratio']!r}: expected pad or square (LLaVA-1.5)")
    feature = raw.get("mm_vision_select_feature", "patch")
    if feature not in LLAVA_SELECT_FEATURE:
        raise ConversionError(f"mm_vision_select_feature {feature!r}: expected one of {sorted(LLAVA_SELECT_FEATURE)}")
    return LLAVA_SELECT_FEATURE[feature]


def _tie_lm_head(tensors: Tensors, text_cfg: PreTrainedConfig, prefixes: Mapping[str, str]) -> None:
    """An LLM with tied embeddings saves no lm_head: use the input embeddings, as HF does."""
    embed = prefixes["text"] + "embed_tokens.weight"
    if prefixes["lm_head"] not in tensors and embed in tensors and getattr(text_cfg, "tie_word_embeddings", False):
        tensors[prefixes["lm_head"]] = tensors[embed]


def _config_json(src: str) -> dict[str, Any]:
    """The raw config.json of a folder or hub id (LLaVA's model_type is not a transformers one)."""
    if Path(src).is_dir():
        path = Path(src) / "config.json"
        if not path.is_file():
            raise ConversionError(f"{src}: no config.json")
    else:
        from huggingface_hub import hf_hub_download

        path = Path(hf_hub_download(src, "config.json"))
    return json.loads(path.read_text())


def _read_tower(src: str, targets: list[str], prefix: str) -> Tensors:
    """The CLIP tower's tensors from a HF CLIP / CLIPVision folder or hub id, as ``prefix + name``."""
    ckpt = WeightReader(src)
    names: dict[str, str] = {}
    for target in targets:
        short = target[len(prefix) :]
        found = next((p + short for p in ("vision_model.", "") if p + short in ckpt.weight_map), None)
        if found is None:
            raise ConversionError(f"{src}: missing tensor vision_model.{short} of the vision tower")
        names[found] = target
    read = _read_folder(src, list(names), f"vision tower {src}")
    return {names[n]: t for n, t in read.items()}


__all__ = [
    "ConversionError",
    "LLAVA_RENAMES",
    "MINIGPT4_RENAMES",
    "Rename",
    "convert_llava",
    "convert_minigpt4",
    "load_original",
    "original_name",
    "rename",
]
