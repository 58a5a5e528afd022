"""The toy LLM's text-only pretraining data: scenes in words and as one slot per grid cell."""

import random

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from mmalign.data import toyworld as tw
from mmalign.toy import pretrain


def test_slots_are_the_words_of_each_cell_in_raster_order():
    tok = pretrain.load_tokenizer()
    scene = tw.make_scene(7)
    slots = pretrain.scene_slots(tok, scene, random.Random(0))
    assert len(slots) == tw.GRID * tw.GRID
    by_cell = {o.cell: o for o in scene.objects}
    for cell, ids in enumerate(slots):
        words = tok.decode(ids).split()
        if cell in by_cell:
            o = by_cell[cell]
            assert words[:3] == [o.size, o.colour, o.shape]
        else:  # an empty cell is its position only
            assert words == tw.POSITIONS[cell].split()


def test_slot_examples_put_one_placeholder_per_cell_and_learn_only_answers():
    tok = pretrain.load_tokenizer()
    image_id = tok.convert_tokens_to_ids("<image>")
    rng = random.Random(3)
    seen_slots = seen_words = 0
    for seed in range(40):
        ex = pretrain.encode_text_example(tok, tw.make_scene(seed), rng)
        n_placeholders = ex["input_ids"].count(image_id)
        if ex.get("slots"):
            seen_slots += 1
            assert n_placeholders == len(ex["slots"]) == 9
        else:
            seen_words += 1
            assert n_placeholders == 0
        learned = [i for i, label in zip(ex["input_ids"], ex["labels"]) if label != -100]
        assert image_id not in learned and learned
    assert seen_slots and seen_words  # both forms are in the mix


def test_embed_with_slots_replaces_exactly_the_placeholders_with_summed_word_embeddings():
    tok = pretrain.load_tokenizer()
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2
        )
    )
    image_id = tok.convert_tokens_to_ids("<image>")
    ids = torch.tensor([[5, image_id, image_id, 6], [5, 6, 7, 8]])
    slots = [[[10, 11], [12]], None]
    x = pretrain.embed_with_slots(model, ids, slots, image_id)
    table = model.get_input_embeddings().weight
    torch.testing.assert_close(x[0, 1], table[10] + table[11])
    torch.testing.assert_close(x[0, 2], table[12])
    torch.testing.assert_close(x[0, [0, 3]], table[[5, 6]])
    torch.testing.assert_close(x[1], table[[5, 6, 7, 8]])
