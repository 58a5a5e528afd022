"""POPE: the official answer parsing and hand-computed metrics per split."""

import json

import pytest
from PIL import Image

from mmalign.evaluate.pope import TASK, pope_answer, yes_no_metrics


@pytest.mark.parametrize(
    "text, parsed",
    [
        ("Yes", "yes"),
        ("Yes, there is a dog in the image.", "yes"),
        ("No", "no"),
        ("No.", "no"),
        ("There is no dog.", "no"),
        ("The dog is not visible. Yes there is a cat.", "no"),  # first sentence only
        ("Yes. There is no cat though.", "yes"),  # the "no" is in the second sentence
        ("no, there is not", "no"),
        ("I see a dog", "yes"),  # anything without no / not counts as yes (POPE's rule)
        ("NO", "yes"),  # ... and the rule is case-sensitive, as POPE's script is
        ("Nothing", "yes"),
        ("", "yes"),
    ],
)
def test_pope_answer_parsing(text, parsed):
    assert pope_answer(text) == parsed


def test_yes_no_metrics_hand_computed():
    # tp 2 (1,5), fp 1 (2), fn 1 (3), tn 2 (4,6)
    pairs = [("yes", "yes"), ("yes", "no"), ("no", "yes"), ("no", "no"), ("yes", "yes"), ("no", "no")]
    m = yes_no_metrics(pairs)
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["precision"] == pytest.approx(2 / 3)
    assert m["recall"] == pytest.approx(2 / 3)
    assert m["f1"] == pytest.approx(2 / 3)
    assert m["yes_ratio"] == pytest.approx(3 / 6)
    assert yes_no_metrics([]) == {"accuracy": 0.0, "precision": 0.0, "recall": 0.0, "f1": 0.0, "yes_ratio": 0.0}
    m = yes_no_metrics([("no", "yes"), ("no", "no")])  # never says yes: no division by zero
    assert (m["precision"], m["recall"], m["f1"], m["accuracy"]) == (0.0, 0.0, 0.0, 0.5)


def write_pope(root):
    (root / "val2014").mkdir(parents=True)
    Image.new("RGB", (16, 16)).save(root / "val2014" / "COCO_val2014_000000000001.jpg")
    rows = {
        "random": [(1, "dog", "yes"), (2, "cat", "no"), (3, "car", "no")],
        "popular": [(1, "dog", "yes"), (2, "person", "no")],
        "adversarial": [(1, "dog", "yes"), (2, "leash", "no")],
    }
    for split, qs in rows.items():
        lines = [
            json.dumps(
                {
                    "question_id": q,
                    "image": "COCO_val2014_000000000001.jpg",
                    "text": f"Is there a {o} in the image?",
                    "label": label,
                }
            )
            for q, o, label in qs
        ]
        if split == "random":
            lines.append('{"question_id": 9, "image": "x.jpg"}')  # no text / label: counted and skipped
        (root / f"coco_pope_{split}.json").write_text("\n".join(lines) + "\n")


def test_pope_task_reads_three_splits_and_scores_each(tmp_path):
    write_pope(tmp_path)
    samples = TASK.load(tmp_path, None, {})
    assert [s.id for s in samples] == [
        "random/1",
        "random/2",
        "random/3",
        "popular/1",
        "popular/2",
        "adversarial/1",
        "adversarial/2",
    ]
    assert samples[0].prompt == "Is there a dog in the image?\nAnswer the question using a single word or phrase."
    assert samples[0].image().size == (16, 16)
    answers = {
        "random/1": "Yes",
        "random/2": "No, there is no cat.",
        "random/3": "Yes, a car.",
        "popular/1": "There is not.",
        "popular/2": "No",
        "adversarial/1": "yes",
        "adversarial/2": "no",
    }
    records = [{"id": s.id, "prediction": answers[s.id], "truth": s.truth} for s in samples]
    m = TASK.score(records)
    assert m["random"] == pytest.approx(
        {"n": 3, "accuracy": 2 / 3, "precision": 1 / 2, "recall": 1.0, "f1": 2 / 3, "yes_ratio": 2 / 3}
    )
    assert m["popular"]["accuracy"] == 0.5 and m["popular"]["yes_ratio"] == 0.0 and m["popular"]["f1"] == 0.0
    assert m["adversarial"]["accuracy"] == 1.0
    assert m["average"]["accuracy"] == pytest.approx((2 / 3 + 0.5 + 1.0) / 3)
    assert len(TASK.load(tmp_path / "coco_pope_popular.json", None, {})) == 2  # one file works too
    assert len(TASK.load(tmp_path, None, {"limit": 1})) == 3  # per split


def test_pope_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="no POPE files"):
        TASK.load(tmp_path, None, {})
