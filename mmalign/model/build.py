"""Compose a vision-language model from a vision tower x any HF causal LM, or load a saved one.

Every architecture is a stock transformers class (``Blip2ForConditionalGeneration`` for
MiniGPT-4, ``LlavaForConditionalGeneration`` for LLaVA / ShareGPT4V) or our small registered
``MiniGPT4PatchForConditionalGeneration``, so checkpoints load with plain ``from_pretrained``.
Pretrained parts are loaded separately and dropped into a skeleton built on the meta device:
no 7B model is randomly initialised only to be overwritten.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors import safe_open
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
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
from transformers.utils import is_torchvision_available

from mmalign.model.patch_model import (
    MiniGPT4PatchConfig,
    MiniGPT4PatchForConditionalGeneration,
    MiniGPT4PatchProjector,
    _grid_side,
    vision_tower_from_config,
)
from mmalign.prompts import IMAGE_TOKEN

ARCHS = ("minigpt4", "minigpt4_patch", "llava")
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

Source = str | dict | PreTrainedConfig  # hub id / local folder, or a config (dict with model_type)


@dataclass
class ModelSpec:
    """What to build. Strings are hub ids or local folders (weights loaded); dicts / configs
    give randomly initialised parts (tests, toy backbones trained from scratch)."""

    arch: Literal["minigpt4", "minigpt4_patch", "llava"]
    llm: Source
    vision: Source | None = None  # minigpt4: may be None when `qformer` is a Blip2 checkpoint
    tokenizer: str | PreTrainedTokenizerBase | None = None  # default: the `llm` folder / id
    qformer: Source | None = None  # minigpt4: a Blip2 checkpoint (vision + Q-Former) or a config
    num_query_tokens: int = 32
    # "auto": llava -2 (LLaVA-1.5 / ShareGPT4V), minigpt4_patch "last" (last_hidden_state, i.e.
    # after the tower's final norm = MiniGPT-4's ln_vision); ignored by minigpt4 (Q-Former reads
    # the last layer, as BLIP-2 does)
    vision_feature_layer: int | Literal["auto", "last"] = "auto"
    vision_feature_select_strategy: Literal["default", "full"] = "default"
    projector_hidden_act: str = "gelu"
    merge_tokens: int = 4
    patch_merge: Literal["sequential", "grid"] = "sequential"

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            raise ValueError(f"unknown arch {self.arch!r}; expected one of {ARCHS}")
        if self.vision is None and not (self.arch == "minigpt4" and isinstance(self.qformer, str)):
            raise ValueError("`vision` is required (minigpt4 may take it from a Blip2 `qformer` checkpoint)")


# --------------------------------------------------------------------------- helpers: configs


def _config(src: Source, **defaults: Any) -> PreTrainedConfig:
    """A config from a dict (``model_type`` + fields), a config object, or a folder / hub id."""
    if isinstance(src, PreTrainedConfig):
        return src
    if isinstance(src, dict):
        d = {**defaults, **src}
        if "model_type" not in d:
            raise ValueError(f"config dict needs a 'model_type': {sorted(d)}")
        return AutoConfig.for_model(d.pop("model_type"), **d)
    return AutoConfig.from_pretrained(src)


def _vision_config(src: Source) -> PreTrainedConfig:
    """The vision sub-config of a CLIP / SigLIP / BLIP-2 / LLaVA checkpoint, or the config itself."""
    cfg = _config(src)
    return getattr(cfg, "vision_config", None) or cfg


# --------------------------------------------------------------------------- helpers: weights


class _Checkpoint:
    """Tensor names -> shard files of a folder or hub id; reads only the tensors asked for.

    Only the shards holding wanted tensors are downloaded (a Blip2 checkpoint's ViT + Q-Former
    sit beside an LLM we do not want). safetensors preferred; ``pytorch_model.bin`` as fallback
    (older CLIP repos)."""

    def __init__(self, src: str):
        self.src, self.folder = src, Path(src)
        for index, single in (
            ("model.safetensors.index.json", "model.safetensors"),
            ("pytorch_model.bin.index.json", "pytorch_model.bin"),
        ):
            if path := self._fetch(index):
                self.weight_map: dict[str, str] = json.loads(Path(path).read_text())["weight_map"]
                return
            if path := self._fetch(single):
                self.weight_map = dict.fromkeys(self._read_file(path, None), single)
                return
        raise FileNotFoundError(f"{src}: no model.safetensors / pytorch_model.bin (or their index) found")

    def _fetch(self, name: str) -> str | None:
        if self.folder.is_dir():
            return str(self.folder / name) if (self.folder / name).exists() else None
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError

        try:
            return hf_hub_download(self.src, name)
        except EntryNotFoundError:
            return None

    @staticmethod
    def _read_file(path: str, names: list[str] | None) -> dict[str, torch.Tensor]:
        """Tensors ``names`` of one file (all names, as a dict of None, when ``names`` is None)."""
        if path.endswith(".safetensors"):
            with safe_open(path, "pt") as f:
                return {n: f.get_tensor(n) for n in names} if names is not None else dict.fromkeys(f.keys())
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        return {n: state[n] for n in names} if names is not None else dict.fromkeys(state)

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        by_file: dict[str, list[str]] = {}
        for n in names:
            by_file.setdefault(self.weight_map[n], []).append(n)
        out: dict[str, torch.Tensor] = {}
        for file, keys in by_file.items():
            out.update(self._read_file(self._fetch(file), keys))
        return out


def _load_part(module: nn.Module, src: str, prefixes: tuple[str, ...]) -> None:
    """Fill ``module`` (strictly) from the tensors of ``src`` under the first prefix that has them all."""
    ckpt = _Checkpoint(src)
    want = list(module.state_dict())
    prefix = next((p for p in prefixes if all(p + k in ckpt.weight_map for k in want)), None)
    if prefix is None:
        p = prefixes[0]
        missing = [p + k for k in want if p + k not in ckpt.weight_map][:5]
        raise ValueError(f"{src}: no tensors for {type(module).__name__} under {prefixes}; e.g. missing {missing}")
    state = ckpt.read([prefix + k for k in want])
    module.load_state_dict({k: state[prefix + k] for k in want}, strict=True)


def _vision_tower(spec: ModelSpec, cfg: PreTrainedConfig) -> nn.Module:
    tower = vision_tower_from_config(cfg)
    src = spec.vision if isinstance(spec.vision, str) else (spec.qformer if spec.vision is None else None)
    if src is not None:
        _load_part(tower, src, ("", "vision_model.", "model.vision_tower.", "vision_tower."))
    return tower


def _language_model(spec: ModelSpec, dtype: torch.dtype | None, attn: str | None) -> PreTrainedModel:
    if isinstance(spec.llm, str):
        return AutoModelForCausalLM.from_pretrained(spec.llm, dtype=dtype or "auto", attn_implementation=attn)
    kwargs = {"attn_implementation": attn} if attn else {}
    return AutoModelForCausalLM.from_config(_config(spec.llm), **kwargs)


def _tokenizer(spec: ModelSpec) -> PreTrainedTokenizerBase:
    src = spec.tokenizer if spec.tokenizer is not None else spec.llm
    if isinstance(src, PreTrainedTokenizerBase):
        return src
    if not isinstance(src, str):
        raise ValueError("the LLM is a config, so ModelSpec.tokenizer (folder / id / object) is required")
    return AutoTokenizer.from_pretrained(src)


def _prepare_tokenizer(tok: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """Register IMAGE_TOKEN as a special token and make sure there is a pad token."""
    if IMAGE_TOKEN not in tok.all_special_tokens:
        tok.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]}, replace_extra_special_tokens=False)
    if tok.pad_token is None:
        tok.pad_token = tok.unk_token if tok.unk_token is not None else tok.eos_token
    return tok


# --------------------------------------------------------------------------- build / load


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
    tok = _prepare_tokenizer(_tokenizer(spec))
    lm = _language_model(spec, dtype, attn_implementation)
    if len(tok) > lm.config.vocab_size:
        lm.resize_token_embeddings(len(tok))
    for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
        if (value := getattr(tok, name)) is not None:
            setattr(lm.config, name, value)
            setattr(lm.generation_config, name, value)
    image_id = tok.convert_tokens_to_ids(IMAGE_TOKEN)
    target_dtype = dtype or next(lm.parameters()).dtype

    if spec.arch == "minigpt4":
        model = _build_blip2(spec, lm, image_id)
    else:
        model = _build_llava_like(spec, lm, image_id)

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
    vcfg = _vision_config(vsrc)
    if not isinstance(vcfg, Blip2VisionConfig):
        raise ValueError(f"minigpt4 needs a Blip2 vision tower (EVA ViT-g); got {vcfg.model_type!r}")
    vision = _vision_tower(spec, vcfg)
    qsrc = spec.qformer
    if qsrc is None and isinstance(vsrc, str) and _config(vsrc).model_type == "blip-2":
        qsrc = vsrc  # MiniGPT-4 reuses BLIP-2's ViT *and* Q-Former; a dict `qformer` means from scratch
    if isinstance(qsrc, str):
        src_cfg = AutoConfig.from_pretrained(qsrc)
        qcfg, n_query = src_cfg.qformer_config, src_cfg.num_query_tokens
        if n_query != spec.num_query_tokens:
            raise ValueError(f"{qsrc} has {n_query} query tokens, spec asks {spec.num_query_tokens}")
    else:
        qcfg = _config(qsrc or {}, model_type="blip_2_qformer")
        if not isinstance(qcfg, Blip2QFormerConfig):
            raise ValueError(f"qformer config must be blip_2_qformer, got {qcfg.model_type!r}")
        n_query = spec.num_query_tokens
    qcfg.encoder_hidden_size = vcfg.hidden_size
    qformer = Blip2QFormerModel._from_config(qcfg)
    query_tokens = nn.Parameter(torch.empty(1, n_query, qcfg.hidden_size))
    if isinstance(qsrc, str):
        _load_part(qformer, qsrc, ("qformer.",))
        query_tokens.data.copy_(_read_tensor(qsrc, "query_tokens"))
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


def _read_tensor(src: str, name: str) -> torch.Tensor:
    ckpt = _Checkpoint(src)
    if name not in ckpt.weight_map:
        raise ValueError(f"{src}: no tensor {name!r}")
    return ckpt.read([name])[name]


def _build_llava_like(spec: ModelSpec, lm: PreTrainedModel, image_id: int) -> LlavaForConditionalGeneration:
    vcfg = _vision_config(spec.vision)
    layer = spec.vision_feature_layer
    common = dict(
        vision_config=vcfg,
        text_config=lm.config,
        image_token_index=image_id,
        vision_feature_select_strategy=spec.vision_feature_select_strategy,
    )
    if spec.arch == "llava":
        if isinstance(vcfg, Blip2VisionConfig):
            raise ValueError("llava needs a tower AutoModel knows (CLIP, SigLIP, ...); Blip2's ViT-g is minigpt4*")
        if layer == "last":
            raise ValueError("llava selects hidden_states[layer]; give an int (LLaVA-1.5 uses -2)")
        config = LlavaConfig(
            **common,
            vision_feature_layer=-2 if layer == "auto" else layer,
            projector_hidden_act=spec.projector_hidden_act,
        )
        cls, projector = LlavaForConditionalGeneration, LlavaMultiModalProjector
    else:
        config = MiniGPT4PatchConfig(
            **common,
            vision_feature_layer=None if layer in ("auto", "last") else layer,
            merge_tokens=spec.merge_tokens,
            patch_merge=spec.patch_merge,
        )
        cls, projector = MiniGPT4PatchForConditionalGeneration, MiniGPT4PatchProjector
    config.image_seq_length = num_image_tokens(config)
    vision = _vision_tower(spec, vcfg)
    with torch.device("meta"):
        model = cls(config)
    model.model.vision_tower = vision
    model.model.multi_modal_projector = projector(config)  # PyTorch default init, like the originals
    model.model.language_model = getattr(lm, lm.base_model_prefix)
    model.lm_head = lm.get_output_embeddings()
    return model


# Kept in full precision when the LLM is quantized, as MiniGPT-4's low-resource demo keeps its
# vision encoder: the vision tower, the Q-Former / projector and the LM head (patterns match a
# module name from its start, or as a suffix).
FULL_PRECISION_MODULES = {
    "blip-2": ["vision_model", "qformer", "language_projection", "language_model.lm_head"],
    "llava": ["model.vision_tower", "model.multi_modal_projector", "lm_head"],
    "minigpt4_patch": ["model.vision_tower", "model.multi_modal_projector", "lm_head"],
}
LOAD_IN = ("8bit", "4bit")


def quantization_config(config: PreTrainedConfig, load_in: str, device: str | torch.device, dtype: Any = None) -> Any:
    """The transformers quantization config for ``--load-in 8bit|4bit`` on ``device``.

    CUDA: bitsandbytes (LLM.int8() / NF4), as MiniGPT-4's low-resource demo. CPU: torchao's
    int8 weight-only quantization for 8bit (bitsandbytes' CPU 8-bit path casts to float16 and
    is slow), bitsandbytes' CPU backend for NF4 4bit (its CPU kernels need every LLM layer
    width to be a multiple of its block size, 64).
    """
    if load_in not in LOAD_IN:
        raise ValueError(f"load_in must be one of {LOAD_IN}, got {load_in!r}")
    skip = FULL_PRECISION_MODULES[config.model_type]
    cpu = torch.device(device).type == "cpu"
    if cpu and load_in == "4bit":
        text = config.get_text_config()
        widths = {"hidden_size": text.hidden_size, "intermediate_size": getattr(text, "intermediate_size", 0)}
        if bad := {k: v for k, v in widths.items() if v % 64}:
            raise ValueError(
                f"4bit on CPU (bitsandbytes NF4) needs LLM widths divisible by 64, got {bad}; "
                "use load_in='8bit' (torchao int8) or a CUDA device"
            )
    if cpu and load_in == "8bit":
        from torchao.quantization import Int8WeightOnlyConfig
        from transformers import TorchAoConfig

        return TorchAoConfig(Int8WeightOnlyConfig(), modules_to_not_convert=skip)
    from transformers import BitsAndBytesConfig

    if load_in == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        llm_int8_skip_modules=skip,
        bnb_4bit_compute_dtype=dtype or torch.float16,
    )


def load_model(
    path_or_id: str,
    *,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    attn_implementation: str | None = None,
    load_in: str | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load an exported folder / hub id (any of the three archs) and its tokenizer.

    ``load_in="8bit"|"4bit"`` quantizes the LLM's linear layers on load (see
    ``quantization_config``); the vision side and the LM head keep ``dtype``."""
    kwargs: dict[str, Any] = {"dtype": dtype or "auto"}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if load_in:
        config = AutoConfig.from_pretrained(path_or_id)
        kwargs["quantization_config"] = quantization_config(config, load_in, device, dtype)
        model = AutoModelForImageTextToText.from_pretrained(path_or_id, device_map={"": str(device)}, **kwargs)
    else:
        model = AutoModelForImageTextToText.from_pretrained(path_or_id, **kwargs).to(device)
    tok = AutoTokenizer.from_pretrained(path_or_id)
    image_id = tok.convert_tokens_to_ids(IMAGE_TOKEN)
    if IMAGE_TOKEN not in tok.all_special_tokens or image_id != model.config.image_token_index:
        raise ValueError(
            f"{path_or_id}: tokenizer's {IMAGE_TOKEN!r} (id {image_id}) does not match "
            f"config.image_token_index={model.config.image_token_index}"
        )
    return model, tok


def weight_bytes(model: nn.Module) -> int:
    """Bytes held by the model's parameters and buffers, counting a quantized tensor subclass
    (torchao) by its inner tensors and a bitsandbytes weight by its packed storage."""

    def nbytes(t: torch.Tensor) -> int:
        if hasattr(t, "__tensor_flatten__"):
            names, _ = t.__tensor_flatten__()
            return sum(nbytes(getattr(t, n)) for n in names)
        return t.numel() * t.element_size()

    seen: set[int] = set()
    total = 0
    for t in [*model.parameters(), *model.buffers()]:
        if id(t) not in seen:
            seen.add(id(t))
            total += nbytes(t) + sum(nbytes(s) for s in _bnb_state_tensors(t))
    return total


def _bnb_state_tensors(t: torch.Tensor) -> list[torch.Tensor]:
    """The scales bitsandbytes keeps beside a quantized weight (absmax, SCB)."""
    out = [getattr(t, "SCB", None)]
    qs = getattr(t, "quant_state", None)
    if qs is not None:
        out += [getattr(qs, "absmax", None), getattr(getattr(qs, "state2", None), "absmax", None)]
    return [x for x in out if isinstance(x, torch.Tensor)]


def model_from_config(cfg: Any) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Build or load from a ``mmalign.config.ModelConfig``: ``path`` (a folder / hub id to
    continue from) wins over ``recipe`` (backbones composed fresh); ``dtype`` is a torch name."""
    dtype = getattr(torch, cfg.dtype) if isinstance(cfg.dtype, str) else cfg.dtype
    kwargs = dict(dtype=dtype, device=cfg.device, attn_implementation=cfg.attn_implementation)
    quantization = getattr(cfg, "quantization", None)
    if cfg.path:
        return load_model(cfg.path, **kwargs, load_in=quantization)
    if quantization:
        raise ValueError("model.quantization loads a finished folder: set model.path (export the stage-1 model first)")
    if not cfg.recipe:
        raise ValueError("model config needs `recipe` or `path`")
    from mmalign.recipes import get_recipe, with_backbones  # recipes import this module

    recipe = with_backbones(get_recipe(cfg.recipe), getattr(cfg, "vision", None), getattr(cfg, "llm", None))
    return build_model(recipe.spec, **kwargs)


MMALIGN_META = "mmalign.json"  # written by ``export``: the chat template a folder was trained with
DEFAULT_TEMPLATES = {"blip-2": "minigpt4_v0", "minigpt4_patch": "llama2", "llava": "vicuna_v1"}


def template_of(path_or_id: str | Path) -> str:
    """The chat template recorded by ``export``, else the published default for the architecture."""
    meta = Path(path_or_id) / MMALIGN_META
    if meta.is_file():
        template = json.loads(meta.read_text()).get("template")
        if template:
            return template
    return DEFAULT_TEMPLATES[AutoConfig.from_pretrained(str(path_or_id)).model_type]


# --------------------------------------------------------------------------- image tokens


def num_image_tokens(config: PreTrainedConfig) -> int:
    """How many ``IMAGE_TOKEN`` copies one image takes in the prompt."""
    if config.model_type == "blip-2":
        return config.num_query_tokens
    side = _grid_side(config.vision_config)
    n = side * side + (1 if config.vision_feature_select_strategy == "full" else 0)
    if config.model_type == "minigpt4_patch":
        return n // config.merge_tokens
    if config.model_type == "llava":
        return n
    raise ValueError(f"unsupported model_type {config.model_type!r}")


def check_image_tokens(input_ids: torch.Tensor, num_images: int, config: PreTrainedConfig) -> None:
    """Raise if the prompt's image tokens disagree with the images. Blip2 needs this: its
    ``masked_scatter`` silently uses a prefix of the features when the counts differ."""
    found = int((input_ids == config.image_token_index).sum())
    per_image = num_image_tokens(config)
    if found != num_images * per_image:
        raise ValueError(
            f"input_ids hold {found} image tokens but {num_images} image(s) x {per_image} tokens "
            f"= {num_images * per_image} were expected"
        )


# --------------------------------------------------------------------------- image processor


def image_processor_for(model_or_config: PreTrainedModel | PreTrainedConfig):
    """The eval-time transform for the vision tower at its configured size.

    MiniGPT-4 lineage (blip-2, minigpt4_patch): bicubic resize to a square + CLIP mean/std
    (BlipImageProcessor); LLaVA: CLIP's shortest-edge resize + center crop. Without torchvision
    (it does not import beside the local torch) the PIL-backed classes are used directly.
    """
    config = getattr(model_or_config, "config", model_or_config)
    vcfg = config.vision_config
    size = vcfg.image_size[0] if isinstance(vcfg.image_size, (list, tuple)) else vcfg.image_size
    siglip = "siglip" in vcfg.model_type
    mean, std = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)) if siglip else (CLIP_MEAN, CLIP_STD)
    tv = is_torchvision_available()
    if config.model_type == "llava" and not siglip:
        from transformers import CLIPImageProcessor, CLIPImageProcessorPil

        cls = CLIPImageProcessor if tv else CLIPImageProcessorPil
        return cls(
            size={"shortest_edge": size},
            crop_size={"height": size, "width": size},
            image_mean=list(mean),
            image_std=list(std),
        )
    from transformers import BlipImageProcessor, BlipImageProcessorPil

    cls = BlipImageProcessor if tv else BlipImageProcessorPil
    return cls(
        size={"height": size, "width": size},
        resample=3,  # PIL bicubic
        image_mean=list(mean),
        image_std=list(std),
        do_convert_rgb=True,
    )


class ImageTransform:
    """PIL image -> normalised ``[3, H, W]`` float tensor for the model's tower (picklable, so
    DataLoader workers can use it). ``pad_to_square`` pads with the mean colour first, as
    LLaVA-1.5 / ShareGPT4V stage 2 do, instead of cropping the image's sides away."""

    def __init__(self, processor: Any, pad_to_square: bool = False):
        self.processor, self.pad_to_square = processor, pad_to_square

    def __call__(self, image: Any) -> torch.Tensor:
        image = image.convert("RGB")
        if self.pad_to_square and image.width != image.height:
            from PIL import Image

            side = max(image.size)
            fill = tuple(int(255 * m) for m in self.processor.image_mean)  # CLIP: (122, 116, 104)
            canvas = Image.new("RGB", (side, side), fill)
            canvas.paste(image, ((side - image.width) // 2, (side - image.height) // 2))
            image = canvas
        return self.processor(images=image, return_tensors="pt")["pixel_values"][0]


def image_transform_for(
    model_or_config: PreTrainedModel | PreTrainedConfig, pad_to_square: bool = False
) -> ImageTransform:
    """The eval transform of ``image_processor_for`` as a callable on one PIL image."""
    return ImageTransform(image_processor_for(model_or_config), pad_to_square)


__all__ = [
    "ImageTransform",
    "ModelSpec",
    "image_transform_for",
    "model_from_config",
    "template_of",
    "build_model",
    "load_model",
    "quantization_config",
    "weight_bytes",
    "num_image_tokens",
    "check_image_tokens",
    "image_processor_for",
]
