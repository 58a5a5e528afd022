import pytest
import torch

from mmalign.model import MiniGPT4PatchConfig, merge_patches


def raster(b=1, side=4, c=2):
    """x[b, i, k] = 100 * b + 10 * i + k for raster-order token i (row-major over the grid)."""
    n = side * side
    i = torch.arange(n).view(1, n, 1)
    k = torch.arange(c).view(1, 1, c)
    return (100 * torch.arange(b).view(b, 1, 1) + 10 * i + k).float()


def test_sequential_is_the_originals_view():
    x = raster(b=2)
    bs, n, c = x.shape
    assert torch.equal(merge_patches(x, 4, "sequential"), x.view(bs, n // 4, 4 * c))
    # group g = tokens 4g .. 4g+3, features concatenated token after token
    assert merge_patches(x, 4)[0, 1].tolist() == [40, 41, 50, 51, 60, 61, 70, 71]


def test_grid_groups_2x2_neighbours():
    x = raster(b=2)
    out = merge_patches(x, 4, "grid")
    assert out.shape == (2, 4, 8)
    tokens = out[0].view(4, 4, 2)[:, :, 0] / 10  # which raster token sits in each slot
    # 4x4 grid: group (row 0, col 0) = tokens 0, 1, 4, 5 (TL, TR, BL, BR); then 2, 3, 6, 7; ...
    assert tokens.tolist() == [[0, 1, 4, 5], [2, 3, 6, 7], [8, 9, 12, 13], [10, 11, 14, 15]]
    assert torch.equal(out[1] - out[0], torch.full_like(out[0], 100))  # batch rows stay apart


def test_merge_rejects_bad_shapes():
    with pytest.raises(ValueError, match="groups of 4"):
        merge_patches(torch.zeros(1, 15, 2), 4)
    with pytest.raises(ValueError, match="square grid"):
        merge_patches(torch.zeros(1, 8, 2), 4, "grid")


def test_config_validates_merge():
    def vision(size):  # patch 8: 24 px -> 3x3 grid, 48 px -> 6x6 grid
        return dict(
            model_type="clip_vision_model",
            image_size=size,
            patch_size=8,
            hidden_size=8,
            intermediate_size=8,
            num_hidden_layers=1,
            num_attention_heads=2,
        )

    with pytest.raises(ValueError, match="groups of 4"):
        MiniGPT4PatchConfig(vision_config=vision(24), merge_tokens=4)
    assert MiniGPT4PatchConfig(vision_config=vision(48), merge_tokens=12).merge_tokens == 12
    with pytest.raises(ValueError, match="grid"):  # 12 is not s*s
        MiniGPT4PatchConfig(vision_config=vision(48), merge_tokens=12, patch_merge="grid")
    assert MiniGPT4PatchConfig(vision_config=vision(48), merge_tokens=9, patch_merge="grid").merge_tokens == 9
    with pytest.raises(ValueError, match="patch_merge"):
        MiniGPT4PatchConfig(vision_config=vision(48), patch_merge="diagonal")


@pytest.mark.parametrize("mode", ["sequential", "grid"])
def test_image_features_are_merge_then_linear(build, mode):
    model, _ = build("minigpt4_patch", patch_merge=mode)
    assert model.config.vision_feature_layer is None  # last_hidden_state: after ln_vision
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        feats = torch.stack(model.model.get_image_features(pixels).pooler_output)
        tower = model.model.vision_tower(pixels).last_hidden_state[:, 1:]  # post_layernorm, CLS dropped
        expected = model.model.multi_modal_projector.linear(merge_patches(tower, 4, mode))
    assert feats.shape == (2, 4, model.config.text_config.hidden_size)
    torch.testing.assert_close(feats, expected)


def test_int_feature_layer_selects_hidden_state(build):
    model, _ = build("minigpt4_patch", vision_feature_layer=-2)
    assert model.config.vision_feature_layer == -2
    pixels = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        feats = torch.stack(model.model.get_image_features(pixels).pooler_output)
        hs = model.model.vision_tower(pixels, output_hidden_states=True).hidden_states[-2][:, 1:]
        expected = model.model.multi_modal_projector(merge_patches(hs, 4))
    torch.testing.assert_close(feats, expected)
