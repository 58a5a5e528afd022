import pytest

from mmalign.data import toyworld as tw
from mmalign.evaluate.toy import chair, describe_metrics, presence_f1, repeated_ngram_rate


def obj(shape, colour, cell, size="large"):
    return tw.ToyObject(shape=shape, colour=colour, size=size, cell=cell)


# red circle top left, blue square center
SCENE = tw.Scene((obj("circle", "red", 0), obj("square", "blue", 4)), seed=0)
# one yellow diamond bottom right
SCENE2 = tw.Scene((obj("diamond", "yellow", 8, "small"),), seed=1)


# ---------------------------------------------------------------- repeated n-grams


def test_repeated_ngram_rate_hand_computed():
    # grams: abc, bca, cab, abc -> 3 distinct of 4
    assert repeated_ngram_rate("a b c a b c", 3) == pytest.approx(0.25)
    assert repeated_ngram_rate("a b c a b c") == pytest.approx(0.25)  # n defaults to 3
    # bigrams aa, aa, aa -> 1 distinct of 3
    assert repeated_ngram_rate("a a a a", 2) == pytest.approx(2 / 3)
    # unigrams x, y, x -> 2 distinct of 3
    assert repeated_ngram_rate("x y x", 1) == pytest.approx(1 / 3)


def test_repeated_ngram_rate_edge_cases():
    assert repeated_ngram_rate("the red circle is above the blue square") == 0.0
    assert repeated_ngram_rate("A B C a b c") == pytest.approx(0.25)  # case-insensitive
    assert repeated_ngram_rate("a b") == 0.0  # fewer words than n: no grams
    assert repeated_ngram_rate("") == 0.0


# ---------------------------------------------------------------- CHAIR


def test_chair_counts_hallucinated_and_covered():
    # mentions: red circle (ok), green square (absent), bare circle (present), bare triangle (absent)
    text = "A red circle and a green square. There is a circle and a triangle."
    assert chair(text, SCENE) == (2, 4, 1)


def test_chair_single_cases():
    assert chair("a red circle", SCENE) == (0, 1, 1)
    assert chair("a green square", SCENE) == (1, 1, 0)  # wrong colour for a present shape
    assert chair("a blue circle", SCENE) == (1, 1, 0)  # colour and shape present, but not together
    assert chair("two squares", SCENE) == (0, 1, 0)  # bare shape present; no colour -> not coverage
    assert chair("a diamond", SCENE) == (1, 1, 0)  # bare shape absent
    assert chair("red circle, blue square", SCENE) == (0, 2, 2)
    assert chair("nothing to see", SCENE) == (0, 0, 0)
    # mentioning one object twice covers it once
    assert chair("a red circle and another red circle", SCENE) == (0, 2, 1)


# ---------------------------------------------------------------- presence F1


def test_presence_f1_hand_computed():
    pairs = [("yes", "yes"), ("yes", "no"), ("no", "yes"), ("no", "no"), ("yes", "yes")]
    # tp 2, fp 1, fn 1
    m = presence_f1(pairs)
    assert m["precision"] == pytest.approx(2 / 3)
    assert m["recall"] == pytest.approx(2 / 3)
    assert m["f1"] == pytest.approx(2 / 3)
    assert m["yes_ratio"] == pytest.approx(3 / 5)


def test_presence_f1_unequal_precision_recall():
    # tp 1, fp 2, fn 1 (a non-yes answer such as "maybe" counts as a negative prediction)
    m = presence_f1([("yes", "yes"), ("yes", "no"), ("yes", "no"), ("maybe", "yes")])
    assert m["precision"] == pytest.approx(1 / 3)
    assert m["recall"] == pytest.approx(1 / 2)
    assert m["f1"] == pytest.approx(2 * (1 / 3) * (1 / 2) / (1 / 3 + 1 / 2))  # 0.4
    assert m["f1"] == pytest.approx(0.4)
    assert m["yes_ratio"] == pytest.approx(3 / 4)


def test_presence_f1_no_positive_edge_cases():
    # no positive truths and no positive predictions: nothing divides by zero
    assert presence_f1([("no", "no"), ("no", "no")]) == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "yes_ratio": 0.0}
    # always "yes" on negatives only
    m = presence_f1([("yes", "no"), ("yes", "no")])
    assert (m["precision"], m["recall"], m["f1"]) == (0.0, 0.0, 0.0)
    assert m["yes_ratio"] == 1.0
    # always "no" on positives only
    m = presence_f1([("no", "yes")])
    assert (m["precision"], m["recall"], m["f1"], m["yes_ratio"]) == (0.0, 0.0, 0.0, 0.0)
    # empty input
    assert presence_f1([]) == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "yes_ratio": 0.0}
    # perfect
    assert presence_f1([("yes", "yes"), ("no", "no")]) == {"precision": 1.0, "recall": 1.0, "f1": 1.0, "yes_ratio": 0.5}


# ---------------------------------------------------------------- aggregation


def test_describe_metrics_aggregates_over_texts():
    text1 = "A red circle and a green square. There is a circle and a triangle."  # 14 words; bad 2 of 4
    text2 = "a yellow diamond a yellow diamond"  # 6 words; bad 0 of 2
    m = describe_metrics([text1, text2], [SCENE, SCENE2])
    # CHAIRi pools mentions over all texts: (2 + 0) / (4 + 2), not the mean of per-text ratios (0.25)
    assert m["chair_i"] == pytest.approx(1 / 3)
    # CHAIRs: one of two texts has a hallucination
    assert m["chair_s"] == pytest.approx(1 / 2)
    # recall: (1 of 2) + (1 of 1) scene objects
    assert m["object_recall"] == pytest.approx(2 / 3)
    assert m["mean_words"] == pytest.approx(10.0)
    # text1: 12 trigrams, "circle and a" twice -> 1/12; text2: 1/4
    assert m["repeated_trigram_rate"] == pytest.approx((1 / 12 + 1 / 4) / 2)


def test_describe_metrics_text_without_mentions_counts_for_chair_s():
    m = describe_metrics(["a green square", "nothing here", "a red circle"], [SCENE, SCENE, SCENE])
    assert m["chair_i"] == pytest.approx(1 / 2)
    assert m["chair_s"] == pytest.approx(1 / 3)
    assert m["object_recall"] == pytest.approx(1 / 6)


def test_describe_metrics_perfect_description_and_empty():
    scenes = [tw.make_scene(s) for s in range(20)]
    m = describe_metrics([tw.description(s) for s in scenes], scenes)
    assert m["chair_i"] == 0.0 and m["chair_s"] == 0.0 and m["object_recall"] == 1.0
    assert m["unfinished_rate"] == 0.0 and m["malformed_sentence_rate"] == 0.0  # the generator's grammar
    assert describe_metrics([], []) == {
        "chair_i": 0.0,
        "chair_s": 0.0,
        "object_recall": 0.0,
        "mean_words": 0.0,
        "repeated_trigram_rate": 0.0,
        "repeated_sentence_rate": 0.0,
        "unfinished_rate": 0.0,
        "malformed_sentence_rate": 0.0,
    }


def test_fragments_show_as_unfinished_and_malformed():
    from mmalign.evaluate.toy import malformed_sentence_rate, unfinished

    whole = tw.description(tw.make_scene(3))
    assert not unfinished(whole) and unfinished(whole + " There is a small") and unfinished("")
    n = len(tw.sentences(whole))
    assert malformed_sentence_rate(whole + " zero") == pytest.approx(1 / (n + 1))  # the toy's "Continue" answer
    assert malformed_sentence_rate("There is a red in the center.") == 1.0  # a word missing


def test_repeated_sentence_rate_counts_verbatim_repeats():
    from mmalign.evaluate.toy import repeated_sentence_rate

    assert repeated_sentence_rate("A red circle. A red circle. A blue square.") == 1 - 2 / 3
    assert repeated_sentence_rate("There is a red circle. There is a blue square.") == 0.0
    assert repeated_sentence_rate("") == 0.0


def test_toy_task_reads_the_requested_split():
    from mmalign.data import toyworld as tw
    from mmalign.evaluate.toy import load_toy

    for split in ("test", "val"):
        scenes = {int(s.id.split("/")[1]) for s in load_toy(None, None, {"split": split, "n_scenes": 3})}
        assert scenes == set(tw.split_seeds(split, 3))
