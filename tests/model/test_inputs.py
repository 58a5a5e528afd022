"""Packed rows give the padded batch's per-sample losses and gradients for every architecture and
attention backend; the traps transformers 5.x sets for packing stay pinned down."""

import pytest
import torch
from mm_helpers import ARCHS, mixed_length_samples

from mmalign.data.collate import collate
from mmalign.model.inputs import block_mask, per_sample_losses, training_inputs


def _built(build, arch, attn):
    model, tok = build(arch)  # eval mode: no dropout draws to differ
    model.set_attn_implementation(attn)
    return model, tok


def _run(model, batch):
    """Loss, per-sample losses and every parameter's gradient for one batch."""
    model.zero_grad()
    inputs = training_inputs(model, batch, "cpu")
    out = model(**inputs)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.loss.detach(), per_sample_losses(out.logits.detach(), batch["labels"], batch.get("sample_ids")), grads


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("arch", ARCHS)
def test_packed_rows_give_the_padded_per_sample_losses_and_gradients(build, arch, attn):
    model, tok = _built(build, arch, attn)
    samples = mixed_length_samples(model, tok, n=5)
    padded = collate(samples, tok.pad_token_id)
    packed = collate(samples, tok.pad_token_id, pack_tokens=64)
    assert packed["input_ids"].shape[0] < padded["input_ids"].shape[0]

    loss, per_sample, grads = _run(model, padded)
    packed_loss, packed_per_sample, packed_grads = _run(model, packed)

    torch.testing.assert_close(packed_loss, loss, rtol=0, atol=1e-6)
    assert packed_per_sample.keys() == per_sample.keys() == set(range(5))
    for s, value in per_sample.items():
        assert abs(packed_per_sample[s] - value) < 1e-5, (s, packed_per_sample[s], value)
    assert grads.keys() == packed_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(packed_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def _packed_loss_per_sample(model, batch, **inputs):
    logits = model(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"], **inputs).logits
    return per_sample_losses(logits.detach(), batch["labels"], batch["sample_ids"])


def _differs(a, b):
    return max(abs(a[s] - b[s]) for s in a) > 1e-3


@pytest.mark.parametrize("arch", ["llava", "minigpt4_patch"])
def test_llava_rows_are_exact_with_positions_only_without_a_cache(build, arch):
    """transformers derives the block mask from restarting positions only when attention_mask is
    None *and* no cache is built; its default builds one even in training."""
    model, tok = _built(build, arch, "sdpa")
    samples = mixed_length_samples(model, tok, n=4)
    padded = collate(samples, tok.pad_token_id)
    expected = per_sample_losses(model(**training_inputs(model, padded, "cpu")).logits.detach(), padded["labels"])
    packed = collate(samples, tok.pad_token_id, pack_tokens=64)
    positions = packed["position_ids"]
    exact = _packed_loss_per_sample(model, packed, position_ids=positions, attention_mask=None, use_cache=False)
    assert not _differs(exact, expected)
    mixed = _packed_loss_per_sample(model, packed, position_ids=positions, attention_mask=None)
    assert _differs(mixed, expected), "transformers now keeps packed samples apart with a cache: simplify"


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_blip2_rows_need_an_additive_block_mask(build, attn):
    model, tok = _built(build, "minigpt4", attn)
    samples = mixed_length_samples(model, tok, n=4)
    padded = collate(samples, tok.pad_token_id)
    expected = per_sample_losses(model(**training_inputs(model, padded, "cpu")).logits.detach(), padded["labels"])
    packed = collate(samples, tok.pad_token_id, pack_tokens=64)
    common = dict(position_ids=packed["position_ids"], use_cache=False)
    additive = block_mask(packed["sample_ids"], torch.float32)
    assert not _differs(_packed_loss_per_sample(model, packed, attention_mask=additive, **common), expected)
    # Blip2's forward replaces a missing mask by ones: the positions alone do not keep samples apart
    assert _differs(_packed_loss_per_sample(model, packed, attention_mask=None, **common), expected)
    if attn == "eager":  # eager adds a boolean mask instead of masking with it
        boolean = additive == 0
        assert _differs(_packed_loss_per_sample(model, packed, attention_mask=boolean, **common), expected)


def test_block_mask_keeps_samples_and_padding_apart():
    mask = block_mask(torch.tensor([[0, 0, 1, -1]]), torch.float32)[0, 0]
    allowed = (mask == 0).int().tolist()
    assert allowed == [[1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]
