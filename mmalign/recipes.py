"""Named recipes: which backbones, which architecture, which template, which stage policies.

A recipe is data. `get_recipe(name)` raises a clear error for an unknown name; nothing in the
code branches on a recipe's name. Backbones are hub ids or local folders (any of them can be
overridden on the command line, e.g. `model.llm=/data/vicuna-7b`), or config dicts for tests.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from mmalign.model.build import ModelSpec

TOY_ASSETS = Path(__file__).resolve().parent / "assets" / "toy"


@dataclass(frozen=True)
class Recipe:
    name: str
    spec: ModelSpec
    template: str  # stage-2 / chat template
    caption_format: str  # stage-1 format (no chat template)
    stage_policies: dict[str, str] = field(default_factory=dict)  # stage -> freezing policy
    note: str = ""


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
        ),
        Recipe(
            "minigpt4-vicuna13b",
            ModelSpec(arch="minigpt4", vision="Salesforce/blip2-flan-t5-xxl", llm="vicuna-13b-v0", num_query_tokens=32),
            "minigpt4_v0",
            "minigpt4_caption",
            {"stage1": "projector", "stage2": "projector"},
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
