"""Each filter rule drops a record it should and keeps one it should; rules are data."""

from __future__ import annotations

from collections import Counter

import pytest

from mmalign.curate.filters import DEFAULT_RULES, apply_rules, parse_rules, rule_table

GOOD = (
    "The image shows two objects on a gray background. There is a large red circle in the top left. "
    "There is a small blue square in the center. The red circle is to the left of the blue square."
)

CASES = {  # rule -> (a text it drops, a text it keeps)
    "failure_phrase": ("I'm sorry, I made a mistake. " + GOOD, GOOD),
    "too_short": ("There is a red circle.", GOOD),
    "too_long": (" ".join([GOOD.replace(".", ",")] * 15) + ".", GOOD),
    "repeated_sentences": (GOOD + " There is a large red circle in the top left.", GOOD),
    "repeated_ngrams": ("there is a red circle and " * 12 + "that is all.", GOOD),
    "not_english": ("Das Bild zeigt zwei Objekte auf grauem Hintergrund, einen roten Kreis und ein Quadrat.", GOOD),
    "unfinished": (GOOD + " There is a small green", GOOD),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_each_rule_drops_one_and_keeps_one(name):
    (rule,) = [r for r in parse_rules(DEFAULT_RULES) if r.name == name]
    dropped, kept = CASES[name]
    assert rule.check(dropped) is not None
    assert rule.check(kept) is None


def test_non_ascii_text_is_not_english():
    (rule,) = [r for r in parse_rules(DEFAULT_RULES) if r.name == "not_english"]
    assert "non-ASCII" in rule.check("图像显示灰色背景上的两个物体，左上角有一个大红圆圈。")


def test_curly_apostrophes_match_a_failure_phrase():
    (rule,) = parse_rules([{"name": "apology", "kind": "phrases", "phrases": ["I'm sorry"]}])
    assert rule.check("I\u2019m sorry, there is a circle.") == 'contains "I\'m sorry"'


def test_ignores_image_drops_the_same_text_for_many_images_only():
    (rule,) = parse_rules([{"name": "ignores_image", "max_images": 3}])
    generic = "This is a picture of some shapes on a background."
    rule.prepare([generic, generic.upper(), generic + " ", GOOD, GOOD.replace("red", "green")])
    assert rule.check(generic) == "the same text for 3 images"
    assert rule.check(GOOD) is None


def test_first_matching_rule_names_the_drop_and_all_matches_are_kept():
    rules = parse_rules(DEFAULT_RULES)
    first, matched = apply_rules(rules, "I apologize. There is a")
    assert first == "failure_phrase"
    assert {"failure_phrase", "too_short", "unfinished"} <= set(matched)
    assert apply_rules(rules, GOOD) == (None, {})


@pytest.mark.parametrize(
    "items, message",
    [
        ([{"kind": "phrases"}], "a mapping with a 'name'"),
        ([{"name": "x", "kind": "sentiment"}], "unknown kind 'sentiment'"),
        ([{"name": "too_short", "min_word": 3}], "unknown parameter(s) ['min_word']"),
        ([{"name": "too_short"}, {"name": "too_short"}], "unique"),
        ([{"name": "sorry", "kind": "phrases", "phrases": "I apologize"}], "phrases is a list of strings"),
    ],
)
def test_bad_rules_are_named(items, message):
    with pytest.raises(ValueError, match=r"rules") as e:
        parse_rules(items, "filter.rules")
    assert message in str(e.value)


def test_rule_table_counts_each_rule_and_the_kept():
    rules = parse_rules(DEFAULT_RULES)
    table = rule_table(Counter({"too_short": 2, "unfinished": 1, "gone": 4}), rules, 10)
    assert "| too_short | too_short | 2 |" in table and "| unfinished | unfinished | 1 |" in table
    assert "| gone | (not in the config now) | 4 |" in table
    assert "| **kept** | | **3** of 10 |" in table
