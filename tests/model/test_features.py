"""The frozen part as a function of its own: cached features give the image path's loss and
gradients for every architecture, and the fingerprint names what produced them."""

import pytest
import torch
from mm_helpers import ARCHS, make_inputs

from mmalign.model import apply_freeze, image_transform_for
from mmalign.model.features import (
    cached_part_trains,
    encoder_outputs,
    feature_fingerprint,
    fingerprint_differences,
    frozen_features,
)


@pytest.mark.parametrize("arch", ARCHS)
def test_cached_features_give_the_image_paths_loss_and_projector_gradients(build, arch):
    model, tok = build(arch)
    apply_freeze(model, "projector")
    inputs = make_inputs(model, tok)
    image_loss = model(**inputs).loss
    image_loss.backward()
    image_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()

    with torch.no_grad():
        features = frozen_features(model, inputs["pixel_values"])  # computed once, e.g. stored in a cache
    text = {k: inputs[k] for k in ("input_ids", "attention_mask", "labels")}
    cached_loss = model(**text, pixel_values=None, mm_encoder_outputs=encoder_outputs(model, features)).loss
    cached_loss.backward()

    assert features.shape[0] == 2 and features.dim() == 3
    torch.testing.assert_close(cached_loss, image_loss, rtol=0, atol=1e-6)
    for name, grad in image_grads.items():
        torch.testing.assert_close(dict(model.named_parameters())[name].grad, grad, rtol=1e-5, atol=1e-7)


def test_fingerprint_names_weights_transform_and_selection(build):
    model, _ = build("llava")
    transform = image_transform_for(model)
    base = feature_fingerprint(model, transform)
    assert fingerprint_differences(base, feature_fingerprint(model, transform)) == []

    def differing(fingerprint):
        return [d.split(":")[0] for d in fingerprint_differences(base, fingerprint)]

    padded = differing(feature_fingerprint(model, image_transform_for(model, "pad_to_square")))
    assert "transform.name" in padded and all(d.startswith("transform.") for d in padded)
    model.config.vision_feature_layer = -1
    assert differing(feature_fingerprint(model, transform)) == ["features.vision_feature_layer"]
    model.config.vision_feature_layer = -2
    with torch.no_grad():
        model.model.vision_tower.post_layernorm.weight.add_(1e-3)
    assert differing(feature_fingerprint(model, transform, autocast="bf16")) == ["autocast", "frozen_weights"]
    with torch.no_grad():  # the projector is not part of what a cache stores
        model.model.multi_modal_projector.linear_1.weight.add_(1.0)
    assert fingerprint_differences(base, feature_fingerprint(model, transform))[0].startswith("frozen_weights")


def test_the_cached_part_trains_in_sharegpt4v_stage1_not_in_minigpt4(build):
    llava, _ = build("llava")
    apply_freeze(llava, "sharegpt4v_stage1")
    trains = cached_part_trains(llava)
    assert trains and all(n.startswith("model.vision_tower.") for n in trains)
    minigpt4, _ = build("minigpt4")
    apply_freeze(minigpt4, "minigpt4_stage1")
    assert cached_part_trains(minigpt4) == []
