"""The toy fix model's training pairs: every corruption's target only deletes, and the shipped
model repairs held-out pairs (its recorded eval is what it does now)."""

from __future__ import annotations

import json

import pytest

from mmalign.data import toyworld as tw
from mmalign.toy.fix_model import KINDS, corrupt, fix_pair, fix_turns

FIX = __import__("mmalign.toy.curate", fromlist=["FIX_MODEL"]).FIX_MODEL


def test_every_kind_is_made_and_targets_are_deletions_of_the_clean_text():
    seen = set()
    for seed in range(300):
        kind, text, target = fix_pair(seed)
        seen.add(kind)
        assert set(tw.sentences(target)) <= set(tw.sentences(tw.description(tw.make_scene(seed))))
        if kind == "clean":
            assert text == target
        else:
            assert text != target, (kind, text)
    assert seen == set(KINDS)


def test_a_broken_sentence_is_removed_not_completed():
    import random

    parts = tw.sentences(tw.description(tw.make_scene(4)))
    text, target = corrupt(parts, "broken", random.Random(0), parts)
    assert len(tw.sentences(target)) == len(parts) - 1
    assert fix_pair(7) == fix_pair(7)  # pairs are reproducible


def test_the_fix_message_is_the_papers_instruction_then_the_paragraph():
    from mmalign.curate.config import FIX_INSTRUCTION, CurateConfig
    from mmalign.curate.steps import fix_message

    (turn,) = fix_turns("A paragraph.")
    assert turn["content"] == fix_message(CurateConfig(), "A paragraph.") == f"{FIX_INSTRUCTION}\n\nA paragraph."


@pytest.mark.skipif(not (FIX / "fix_eval.json").exists(), reason="the toy fix model is not trained yet")
def test_shipped_fix_model_repairs_held_out_pairs_as_recorded():
    from mmalign.model import LoadedModel
    from mmalign.toy.fix_model import exact_repair_rate

    recorded = json.loads((FIX / "fix_eval.json").read_text())["exact_repair_rate"]
    rates = exact_repair_rate(LoadedModel.load(FIX), tw.split_seeds("val", 40))
    assert rates["all"] >= 0.5 and recorded["all"] >= 0.5
