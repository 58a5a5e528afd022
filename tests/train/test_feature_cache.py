"""`mmalign cache-features`: a stage trained on cached features gives the losses it gives on
images (every architecture; JSON and shard sources), and a cache is refused where it would be wrong."""

import json

import pytest
import torch
from train_helpers import caption_data, caption_shards, config, losses_by_step

from mmalign.data import DataError
from mmalign.data.build import check_data
from mmalign.data.features import FeatureLookup
from mmalign.model import build_model, export, image_processor_for
from mmalign.train.feature_cache import cache_features
from mmalign.train.stage import train

STEPS = ("train.max_steps=4", "train.save_every=4", "train.plot=false")


def _same_losses(a, b, tol=1e-5):
    la, lb = losses_by_step(a), losses_by_step(b)
    assert sorted(la) == sorted(lb) == [1, 2, 3, 4]
    for step in la:
        assert lb[step] == pytest.approx(la[step], abs=tol), (step, la, lb)


@pytest.mark.parametrize("arch", ["minigpt4", "minigpt4_patch", "llava"])
def test_stage1_on_cached_features_gives_the_losses_of_images(tmp_path, model_dirs, arch, capsys):
    model_dir, data = model_dirs(arch), caption_data(tmp_path / "data", n=5)
    cache = cache_features(config(model_dir, data, tmp_path / "unused"), tmp_path / "cache", dtype="float32")
    assert "5 images x 1 view(s)" in capsys.readouterr().out  # the storage cost, before caching

    train(config(model_dir, data, tmp_path / "images", *STEPS))
    train(config(model_dir, data, tmp_path / "features", *STEPS, f"data.features={cache.folder}"))
    _same_losses(tmp_path / "images", tmp_path / "features")


def test_float16_features_and_shard_sources_keep_order_skips_and_losses(tmp_path, model_dir):
    shards = caption_shards(tmp_path / "laion", shards=2, per_shard=3, corrupt=frozenset({"000010001"}))
    common = (*STEPS, "data.shuffle_buffer=4")
    cache = cache_features(config(model_dir, shards, tmp_path / "unused"), tmp_path / "cache")  # float16
    assert sorted(p.name for p in (cache.folder / "source-0").iterdir()) == ["00000.tar", "00001.tar"]

    train(config(model_dir, shards, tmp_path / "images", *common))
    train(config(model_dir, shards, tmp_path / "features", *common, f"data.features={cache.folder}"))
    _same_losses(tmp_path / "images", tmp_path / "features", tol=2e-3)
    reports = [json.loads((tmp_path / run / "data_report.json").read_text()) for run in ("images", "features")]
    assert reports[0]["counts"] == reports[1]["counts"] == {"corrupt image": 1}  # skipped where and as it was


def test_a_cache_of_another_model_or_other_data_is_refused(tmp_path, model_dir, tiny_spec):
    data = caption_data(tmp_path / "data", n=3)
    cache = cache_features(config(model_dir, data, tmp_path / "unused"), tmp_path / "cache")
    torch.manual_seed(1)  # the same architecture, other frozen weights
    other, tok = build_model(tiny_spec("minigpt4_patch"))
    export(other, tok, tmp_path / "other", image_processor=image_processor_for(other), template="minigpt4_v0")
    with pytest.raises(ValueError, match="frozen_weights: cache"):
        train(config(tmp_path / "other", data, tmp_path / "run", *STEPS, f"data.features={cache.folder}"))

    records = json.loads(data.read_text())
    data.write_text(json.dumps(records + records[:1]))  # other data under the same name
    with pytest.raises(DataError, match="is not the data it cached"):
        check_data(config(model_dir, data, tmp_path / "run", f"data.features={cache.folder}").data)
    with pytest.raises(DataError, match="no cache.json"):
        check_data(config(model_dir, data, tmp_path / "run", f"data.features={tmp_path / 'none'}").data)


def test_a_cache_of_a_part_that_trains_is_refused(tmp_path, model_dirs):
    llava, data = model_dirs("llava"), caption_data(tmp_path / "data", n=3)
    late_half = "train.trainable=projector+llm+vision_late_half"  # ShareGPT4V stage 1
    with pytest.raises(ValueError, match=r"trains model\.vision_tower\..* of the frozen part"):
        cache_features(config(llava, data, tmp_path / "unused", late_half), tmp_path / "cache")
    assert not (tmp_path / "cache").exists()
    cache = cache_features(config(llava, data, tmp_path / "unused"), tmp_path / "cache")
    with pytest.raises(ValueError, match="trains model.vision_tower"):
        train(config(llava, data, tmp_path / "run", late_half, *STEPS, f"data.features={cache.folder}"))


def test_views_of_a_deterministic_transform_are_refused(tmp_path, model_dir):
    data = caption_data(tmp_path / "data", n=2)
    with pytest.raises(ValueError, match="2 identical views"):
        cache_features(config(model_dir, data, tmp_path / "unused"), tmp_path / "cache", views=2)


def test_random_crops_are_cached_as_views_and_one_is_drawn_per_epoch(tmp_path, model_dir):
    data = caption_data(tmp_path / "data", n=3)
    crops = "data.train_transform=random_resized_crop"  # MiniGPT-4's train transform
    cache = cache_features(config(model_dir, data, tmp_path / "unused", crops), tmp_path / "cache", views=3)
    lookup = FeatureLookup(cache.shards(0), seed=42, views=3)
    draws = [lookup.get(1, epoch) for epoch in range(8)]
    assert len({round(d.sum().item(), 3) for d in draws}) > 1  # different crops in different epochs
    assert torch.equal(lookup.get(1, 3), draws[3])  # the same epoch draws the same view (resume)
    again = cache_features(config(model_dir, data, tmp_path / "unused", crops), tmp_path / "again", views=3)
    assert torch.equal(FeatureLookup(again.shards(0), seed=42, views=3).get(1, 3), draws[3])  # seeded per sample

    train(config(model_dir, data, tmp_path / "run", crops, *STEPS, f"data.features={cache.folder}"))
    with pytest.raises(ValueError, match="transform.name: cache"):  # crops cached, the run resizes
        train(config(model_dir, data, tmp_path / "resized", *STEPS, f"data.features={cache.folder}"))
