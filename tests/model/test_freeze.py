import pytest
import torch
from mm_helpers import ARCHS, make_inputs

from mmalign.model import POLICIES, apply_freeze, eval_frozen
from mmalign.model.architectures import architecture_of
from mmalign.model.freeze import _block_range


def numel(model, prefixes):
    return sum(p.numel() for n, p in model.named_parameters() if n.startswith(tuple(prefixes)))


@pytest.mark.parametrize("arch", ARCHS)
def test_report_counts(build, arch):
    model, _ = build(arch)
    report = apply_freeze(model, "projector")
    layout = architecture_of(model).roles
    assert report.counts["projector"] == (numel(model, layout["projector"]), 0)
    for role in ("vision", "llm") + (("qformer",) if arch == "minigpt4" else ()):
        assert report.counts[role] == (0, numel(model, layout[role])), role
    assert "other" not in report.counts  # every parameter has a role
    assert report.total == sum(p.numel() for p in model.parameters())
    assert report.trainable == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert set(report.trainable_names) == {n for n, p in model.named_parameters() if p.requires_grad}
    text = str(report)
    assert "projector" in text and f"{report.trainable:,}" in text


@pytest.mark.parametrize("arch", ARCHS)
def test_projector_step_leaves_frozen_tensors_bit_identical(build, arch):
    model, tok = build(arch)
    apply_freeze(model, "projector")
    model.train()
    assert eval_frozen(model)  # frozen towers: dropout off
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model(**make_inputs(model, tok)).loss.backward()
    opt.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert changed and changed <= trainable
    assert all(p.grad is None for n, p in model.named_parameters() if n not in trainable)


def test_sharegpt4v_stage1_trains_later_half_of_vision(build):
    model, _ = build("llava")  # 4 vision layers -> blocks 2, 3
    report = apply_freeze(model, "sharegpt4v_stage1")
    assert report.vision_blocks == [2, 3]
    for name, p in model.named_parameters():
        in_late = any(f"encoder.layers.{i}." in name for i in (2, 3))
        expect = name.startswith(("model.multi_modal_projector.", "model.language_model.", "lm_head.")) or (
            name.startswith("model.vision_tower.") and in_late
        )
        assert p.requires_grad == expect, name
    vision_train, vision_frozen = report.counts["vision"]
    assert vision_train > 0 and vision_frozen > 0
    assert "blocks 2-3" in str(report)


def test_block_ranges():
    assert _block_range("vision_blocks[half:]", 24) == range(12, 24)
    assert _block_range("vision_blocks[12:24]", 24) == range(12, 24)
    assert _block_range("vision_blocks[-4:]", 39) == range(35, 39)
    with pytest.raises(ValueError, match="bad block spec"):
        _block_range("vision_blocks[1-2]", 24)


def test_bad_policies_raise(build):
    model, _ = build("llava")
    with pytest.raises(ValueError, match="unknown policy"):
        apply_freeze(model, "nope")
    with pytest.raises(ValueError, match="select no parameters"):
        apply_freeze(model, ["qformer"])
    with pytest.raises(ValueError, match="unknown role spec"):
        apply_freeze(model, ["visoin"])


def test_regex_specs_and_all_policies_resolve(build):
    model, _ = build("minigpt4")
    report = apply_freeze(model, ["projector", r"re:^qformer\.layernorm\."])
    assert report.counts["qformer"][0] > 0
    for policy in POLICIES.values():
        apply_freeze(model, policy)  # none of the named policies is empty on blip-2


def test_report_lists_frozen_modules(build):
    model, _ = build("minigpt4")
    report = apply_freeze(model, "projector")
    frozen = set(map(id, report.frozen_modules(model)))
    assert frozen == {id(model.vision_model), id(model.qformer), id(model.language_model)}
    report = apply_freeze(model, ["projector", "llm"])
    assert id(model.language_model) not in set(map(id, report.frozen_modules(model)))
