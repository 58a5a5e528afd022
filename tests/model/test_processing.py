"""Image transforms as data: each named transform, the recipe's choice for training and evaluation,
and random crops that follow the (checkpointed) torch RNG."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import CLIPImageProcessorPil

from mmalign.config import load_config, with_recipe_defaults
from mmalign.model import TRANSFORMS, image_transform_for, train_image_transform
from mmalign.model.processing import CLIP_MEAN, CLIP_STD, random_crop_box


def _noise(width: int, height: int, seed: int = 0) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 255, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def _expand2square(image: Image.Image, fill: tuple[int, int, int]) -> Image.Image:
    """LLaVA's mm_utils.expand2square, restated: the image centred on a square of ``fill``."""
    side = max(image.size)
    canvas = Image.new("RGB", (side, side), fill)
    canvas.paste(image, ((side - image.width) // 2, (side - image.height) // 2))
    return canvas


def test_pad_to_square_is_llava_s_expand2square_then_clip(build):
    model, _ = build("llava")  # CLIP tower at 32 px
    image = _noise(64, 32)
    clip = CLIPImageProcessorPil(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}, image_mean=CLIP_MEAN, image_std=CLIP_STD
    )
    fill = tuple(int(255 * m) for m in CLIP_MEAN)
    assert fill == (122, 116, 104)
    want = clip(images=_expand2square(image, fill), return_tensors="pt")["pixel_values"][0]
    torch.testing.assert_close(image_transform_for(model, "pad_to_square")(image), want)
    cropped = image_transform_for(model)(image)  # llava's default: the center 32 x 32, no padding
    torch.testing.assert_close(cropped, clip(images=image, return_tensors="pt")["pixel_values"][0])
    assert not torch.allclose(cropped, want)


@pytest.mark.parametrize("arch", ["minigpt4", "minigpt4_patch", "llava"])
def test_every_transform_gives_the_tower_s_size(build, arch):
    model, _ = build(arch)
    for name in TRANSFORMS:
        assert image_transform_for(model, name)(_noise(50, 30)).shape == (3, 32, 32), name
    with pytest.raises(ValueError, match="unknown train image transform 'flip'"):
        image_transform_for(model, "flip")


def test_random_crop_boxes_follow_the_torch_rng_within_minigpt4_s_scale():
    torch.manual_seed(3)
    boxes = [random_crop_box((120, 80)) for _ in range(200)]
    torch.manual_seed(3)
    assert [random_crop_box((120, 80)) for _ in range(200)] == boxes  # the seeded stream decides
    assert len(set(boxes)) > 150
    for left, top, right, bottom in boxes:
        assert 0 <= left < right <= 120 and 0 <= top < bottom <= 80
        assert 0.5 * 120 * 80 * 0.97 <= (right - left) * (bottom - top) <= 120 * 80  # scale 0.5-1 (rounding)
        assert 3 / 4 * 0.95 <= (right - left) / (bottom - top) <= 4 / 3 * 1.05
    assert random_crop_box((200, 10)) == (93, 0, 106, 10)  # no allowed crop: the centre, 13 x 10 (4/3)


def _caption_data(root, n: int = 3):
    (root / "images").mkdir(parents=True)
    for i in range(n):
        _noise(48, 40, seed=i).save(root / "images" / f"{i}.png")
    records = [{"image": f"images/{i}.png", "caption": "a red circle"} for i in range(n)]
    (root / "caps.json").write_text(json.dumps(records))
    return root / "caps.json"


def _stage(recipe: str, stage: str, data):
    overrides = [f"model.recipe={recipe}", f"train.stage={stage}", f"data.path={data}", "data.source=captions"]
    return with_recipe_defaults(load_config(None, overrides))


def test_minigpt4_recipe_crops_differ_across_epochs_and_repeat_on_resume(tmp_path, build):
    from mmalign.data.build import dataset_from_config
    from mmalign.model import num_image_tokens

    model, tok = build("minigpt4")
    cfg = _stage("minigpt4-vicuna7b", "stage1", _caption_data(tmp_path))
    assert (cfg.data.train_transform, cfg.data.eval_transform) == ("random_resized_crop", "resize")
    dataset = dataset_from_config(cfg.data, tok, num_image_tokens(model.config), train_image_transform(model, cfg))

    def epoch(e):
        dataset.set_epoch(e)  # what the batch source does at every epoch, and on resume
        return [dataset[i]["pixel_values"] for i in range(len(dataset))]

    first, second = epoch(0), epoch(1)
    assert all(not torch.equal(a, b) for a, b in zip(first, second))  # a new crop of each image
    torch.manual_seed(123)  # a resumed process: other generator states, the same crops
    assert all(torch.equal(a, b) for a, b in zip(epoch(1), second))
    evaluate = image_transform_for(model, cfg.data.eval_transform)  # chat / eval: the same pixels every time
    image = _noise(48, 40)
    assert torch.equal(evaluate(image), evaluate(image))


def test_the_stage_decides_the_transform_and_an_override_wins(tmp_path, build):
    model, _ = build("llava")
    data = _caption_data(tmp_path)
    stage1, stage2 = _stage("sharegpt4v-7b", "stage1", data), _stage("sharegpt4v-7b", "stage2", data)
    assert (stage1.data.train_transform, stage2.data.train_transform) == ("center_crop", "pad_to_square")
    assert stage2.data.eval_transform == "pad_to_square"
    assert train_image_transform(model, stage2).name == "pad_to_square"
    plain = load_config(None, [f"data.path={data}"])  # no recipe, no folder: the architecture's eval transform
    assert train_image_transform(model, plain).name == "center_crop"
    plain.data.eval_transform = "pad_to_square"  # the train transform falls back to the eval one
    assert train_image_transform(model, plain).name == "pad_to_square"
