"""Named recipes: which backbones, which architecture, which template, which stage policies.

A recipe is data, and every field is read: ``spec`` builds the model, ``template`` and
``caption_format`` are the defaults of a stage config's ``data.template`` / ``data.caption_format``,
``stage_policies[train.stage]`` the default of ``train.trainable``, ``stage_images[train.stage]``
those of ``data.train_transform`` / ``data.eval_transform`` (``mmalign.config`` fills them in;
``tests/test_recipes.py`` checks that each shipped YAML agrees with its recipe). Nothing in the code
branches on a recipe's name. Backbones are hub ids or local folders (any of them can be overridden
on the command line, e.g. ``model.llm=/data/vicuna-7b``), or config dicts for tests.

This module imports nothing from ``mmalign.model`` (which imports it): the architecture names in
``ModelSpec.arch`` are checked against ``mmalign.model.architectures`` when a model is built.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

TOY_ASSETS = Path(__file__).resolve().parent / "assets" / "toy"


@dataclass
class ModelSpec:
    """What to build. Strings are hub ids or local folders (weights loaded); dicts / configs
    give randomly initialised parts (tests, toy backbones trained from scratch)."""

    arch: Literal["minigpt4", "minigpt4_patch", "llava"]  # an Architecture.name
    llm: Any  # hub id / local folder, or a config (dict with model_type, or a PreTrainedConfig)
    vision: Any = None  # minigpt4: may be None when `qformer` is a Blip2 checkpoint
    tokenizer: Any = None  # folder / id / tokenizer object; default: the `llm` folder / id
    qformer: Any = None  # minigpt4: a Blip2 checkpoint (vision + Q-Former) or a config
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
        if self.vision is None and not (self.arch == "minigpt4" and isinstance(self.qformer, str)):
            raise ValueError("`vision` is required (minigpt4 may take it from a Blip2 `qformer` checkpoint)")


@dataclass(frozen=True)
class StageImages:
    """The image transforms of a stage (names in ``mmalign.model.processing.TRANSFORMS``)."""

    train: str  # data.train_transform: what the training data goes through
    eval: str  # data.eval_transform: evaluation, chat, the server, the exported processor


# MiniGPT-4 trains both stages with blip2_image_train and evaluates / chats with blip2_image_eval
MINIGPT4_IMAGES = StageImages(train="random_resized_crop", eval="resize")


@dataclass(frozen=True)
class Recipe:
    name: str
    spec: ModelSpec
    template: str  # stage-2 / chat template (data.template)
    caption_format: str  # stage-1 format, no chat template (data.caption_format)
    stage_policies: dict[str, str] = field(default_factory=dict)  # train.stage -> freezing policy
    stage_images: dict[str, StageImages] = field(default_factory=dict)  # train.stage -> image transforms

    def policy_for(self, stage: str) -> str:
        return self._for_stage(self.stage_policies, stage, "policy")

    def images_for(self, stage: str) -> StageImages:
        return self._for_stage(self.stage_images, stage, "image transforms")

    def _for_stage(self, table: dict[str, Any], stage: str, what: str) -> Any:
        try:
            return table[stage]
        except KeyError:
            raise KeyError(f"recipe {self.name!r} has no {what} for stage {stage!r}; known: {sorted(table)}") from None


RECIPES: dict[str, Recipe] = {
    r.name: r
    for r in (
        Recipe(
            "minigpt4-vicuna7b",
            # EVA-CLIP ViT-g + Q-Former from BLIP-2 (FlanT5-XXL), Vicuna v0 7B. Vicuna v0 is published as a
            # delta on LLaMA: merge it (FastChat apply_delta) and point model.llm at the folder.
            ModelSpec(arch="minigpt4", vision="Salesforce/blip2-flan-t5-xxl", llm="vicuna-7b-v0", num_query_tokens=32),
            "minigpt4_v0",
            "minigpt4_caption",
            {"stage1": "projector", "stage2": "projector"},
            {"stage1": MINIGPT4_IMAGES, "stage2": MINIGPT4_IMAGES},
        ),
        Recipe(
            "minigpt4-vicuna13b",
            ModelSpec(arch="minigpt4", vision="Salesforce/blip2-flan-t5-xxl", llm="vicuna-13b-v0", num_query_tokens=32),
            "minigpt4_v0",
            "minigpt4_caption",
            {"stage1": "projector", "stage2": "projector"},
            {"stage1": MINIGPT4_IMAGES, "stage2": MINIGPT4_IMAGES},
        ),
        Recipe(
            "minigpt4-llama2-7b",
            # No Q-Former: ViT-g patch tokens (CLS dropped), 4 consecutive tokens concatenated, Linear 5632 -> 4096.
            ModelSpec(
                arch="minigpt4_patch",
                vision="Salesforce/blip2-flan-t5-xxl",
                llm="meta-llama/Llama-2-7b-chat-hf",
                merge_tokens=4,
                patch_merge="sequential",
                vision_feature_layer="auto",  # ln_vision output
            ),
            "llama2",
            "minigpt4_caption",
            {"stage1": "projector", "stage2": "projector"},
            {"stage1": MINIGPT4_IMAGES, "stage2": MINIGPT4_IMAGES},
        ),
        Recipe(
            "sharegpt4v-7b",
            # LLaVA-1.5 architecture: CLIP ViT-L/14-336 (layer -2, CLS dropped), mlp2x_gelu, Vicuna-7B v1.5.
            ModelSpec(
                arch="llava",
                vision="openai/clip-vit-large-patch14-336",
                llm="lmsys/vicuna-7b-v1.5",
                vision_feature_layer=-2,
                projector_hidden_act="gelu",
            ),
            "vicuna_v1",
            "plain",
            {"stage1": "projector+llm+vision_late_half", "stage2": "projector+llm"},
            # ShareGPT4V's pretrain script keeps LLaVA's default (image_aspect_ratio "square": CLIP's
            # center crop); its finetune script pads (`--image_aspect_ratio pad`), and the final model
            # is evaluated and served padded
            {
                "stage1": StageImages(train="center_crop", eval="center_crop"),
                "stage2": StageImages(train="pad_to_square", eval="pad_to_square"),
            },
        ),
        Recipe(
            "toy-minigpt4",
            # The embedded default: the MiniGPT-4 (Llama-2 variant) method on the shipped toy backbones,
            # 2 x 2 neighbouring patch tokens joined (one token per grid cell of the toy world).
            ModelSpec(
                arch="minigpt4_patch",
                vision=str(TOY_ASSETS / "vision"),
                llm=str(TOY_ASSETS / "llm"),
                merge_tokens=4,
                patch_merge="grid",
                vision_feature_layer="auto",
            ),
            "minigpt4_v0",
            "minigpt4_caption",
            {"stage1": "projector", "stage2": "projector"},
            # not MiniGPT-4's random crops: a toy caption names every shape and where it is, and a
            # crop would cut shapes (and the grid cells the positions refer to) away
            {"stage1": StageImages("resize", "resize"), "stage2": StageImages("resize", "resize")},
        ),
        Recipe(
            "toy-llava",
            ModelSpec(
                arch="llava",
                vision=str(TOY_ASSETS / "vision"),
                llm=str(TOY_ASSETS / "llm"),
                vision_feature_layer=-2,
                projector_hidden_act="gelu",
            ),
            "minigpt4_v0",
            "plain",
            {"stage1": "projector", "stage2": "projector+llm"},
            {"stage1": StageImages("center_crop", "center_crop"), "stage2": StageImages("center_crop", "center_crop")},
        ),
    )
}


def get_recipe(name: str) -> Recipe:
    try:
        return RECIPES[name]
    except KeyError:
        raise KeyError(f"unknown recipe {name!r}; known: {sorted(RECIPES)}") from None


def with_backbones(recipe: Recipe, vision: str | None = None, llm: str | None = None) -> Recipe:
    """The same recipe on other backbone folders / hub ids (e.g. a local Vicuna copy)."""
    spec = dataclasses.replace(recipe.spec, **{k: v for k, v in {"vision": vision, "llm": llm}.items() if v})
    return dataclasses.replace(recipe, spec=spec)
