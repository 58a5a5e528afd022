"""Recipes are data that the code reads: each shipped stage YAML agrees with its recipe, the fields
a YAML leaves out come from the recipe, and a YAML that departs from it says so."""

from pathlib import Path

import pytest

from mmalign.config import load_config, recipe_departures, with_recipe_defaults
from mmalign.recipes import RECIPES, get_recipe

PIPELINES = ("curate_", "recaption_")  # curation / recaption pipeline YAMLs, not stage configs
CONFIGS = sorted(
    p for p in (Path(__file__).resolve().parents[1] / "configs").glob("*.yaml") if not p.name.startswith(PIPELINES)
)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_each_shipped_config_agrees_with_its_recipe(path):
    cfg = load_config(path)
    assert recipe_departures(cfg) == []
    full = with_recipe_defaults(cfg)
    recipe = get_recipe(cfg.model.recipe)
    assert full.train.trainable == recipe.policy_for(cfg.train.stage)
    assert full.data.caption_format == recipe.caption_format
    assert full.data.template == recipe.template
    images = recipe.images_for(cfg.train.stage)
    assert (full.data.train_transform, full.data.eval_transform) == (images.train, images.eval)


def test_unset_fields_come_from_the_recipe_and_a_departure_is_named():
    cfg = load_config(None, ["model.recipe=sharegpt4v-7b", "train.stage=stage1"])
    assert (cfg.data.template, cfg.data.caption_format, cfg.train.trainable) == (None, None, None)
    full = with_recipe_defaults(cfg)
    assert (full.data.template, full.data.caption_format) == ("vicuna_v1", "plain")
    assert full.train.trainable == "projector+llm+vision_late_half"
    assert cfg.train.trainable is None  # the copy is filled in, not the config it came from
    lora = load_config(None, ["model.recipe=sharegpt4v-7b", "train.stage=stage2", "train.trainable=projector"])
    (line,) = recipe_departures(lora)
    assert "train.trainable=projector" in line and "projector+llm" in line
    assert with_recipe_defaults(lora).train.trainable == "projector"  # a departure is kept, only reported


def test_without_a_recipe_the_fallbacks_apply():
    full = with_recipe_defaults(load_config(None, ["model.path=some/folder"]))
    assert (full.data.template, full.data.caption_format, full.train.trainable) == (
        "minigpt4_v0",
        "minigpt4_caption",
        "projector",
    )


def test_a_recipe_without_a_policy_for_the_stage_is_an_error():
    with pytest.raises(KeyError, match="no policy for stage 'stage3'"):
        with_recipe_defaults(load_config(None, ["model.recipe=toy-minigpt4", "train.stage=stage3"]))


def test_every_recipe_names_a_known_architecture_and_template():
    from mmalign.model.architectures import architecture_named
    from mmalign.prompts import get_template

    for recipe in RECIPES.values():
        architecture_named(recipe.spec.arch)
        get_template(recipe.template)
        get_template(recipe.caption_format)
        assert set(recipe.stage_policies) == {"stage1", "stage2"}


def test_recipe_transforms_are_known_and_typed_as_the_config_s_choices():
    import typing

    from mmalign.config import DataConfig
    from mmalign.model.processing import EVAL_TRANSFORMS, TRANSFORMS

    hints = typing.get_type_hints(DataConfig)
    assert typing.get_args(typing.get_args(hints["train_transform"])[0]) == TRANSFORMS
    assert typing.get_args(typing.get_args(hints["eval_transform"])[0]) == EVAL_TRANSFORMS
    for recipe in RECIPES.values():
        assert set(recipe.stage_images) == set(recipe.stage_policies), recipe.name
        for images in recipe.stage_images.values():
            assert images.train in TRANSFORMS and images.eval in EVAL_TRANSFORMS, recipe.name
    minigpt4 = get_recipe("minigpt4-vicuna7b").images_for("stage2")
    assert (minigpt4.train, minigpt4.eval) == ("random_resized_crop", "resize")  # blip2_image_train / _eval
    assert get_recipe("sharegpt4v-7b").images_for("stage2").eval == "pad_to_square"  # image_aspect_ratio pad


def test_a_transform_that_departs_from_the_recipe_is_named():
    cfg = load_config(None, ["model.recipe=minigpt4-vicuna7b", "data.train_transform=resize"])
    (line,) = recipe_departures(cfg)
    assert "data.train_transform=resize" in line and "random_resized_crop" in line
    with pytest.raises(ValueError, match="data.eval_transform"):
        load_config(None, ["data.eval_transform=random_resized_crop"])  # training only
