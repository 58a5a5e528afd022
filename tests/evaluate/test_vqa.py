"""VQA: official answer normalisation and soft accuracy, GQA exact match, VizWiz, loaders."""

import importlib
import json
import os

import pytest
from PIL import Image

from mmalign.evaluate.vqa import (
    CONTRACTIONS,
    GQA,
    TEXTVQA,
    VIZWIZ,
    VQAV2,
    exact_match,
    normalize_answer,
    says_unanswerable,
    vqa_accuracy,
)

NORMALIZE_CASES = [
    ("Two", "2"),
    ("two dogs", "2 dogs"),
    ("none", "0"),
    ("ten.", "10"),
    ("eleven", "eleven"),  # only zero..ten (and none) become digits
    ("A dog", "dog"),
    ("the red one", "red 1"),
    ("an apple", "apple"),
    ("Yes.", "yes"),
    ("3.5", "3.5"),  # a decimal point stays
    ("1,000", "1000"),
    ("dont", "don't"),
    ("isnt it", "isn't it"),
    ("couldnt've", "couldn't've"),
    ("its", "its"),  # a word of its own, not a contraction
    ("black-and-white", "black and white"),  # a joined punctuation mark becomes a space
    ("black - white", "black white"),  # a spaced one is dropped
    ("(left)", "left"),
    ("what?!", "what"),
    ("man's hat", "man 's hat"),
    ("  Red\n", "red"),
]


@pytest.mark.parametrize("raw, norm", NORMALIZE_CASES)
def test_normalize_answer(raw, norm):
    assert normalize_answer(raw) == norm


def test_contraction_table_is_derived_from_canonical_forms():
    assert CONTRACTIONS["hed've"] == CONTRACTIONS["he'dve"] == "he'd've"
    assert CONTRACTIONS["yall'd've"] == CONTRACTIONS["y'alld've"] == CONTRACTIONS["y'all'dve"] == "y'all'd've"
    assert CONTRACTIONS["oclock"] == "o'clock" and CONTRACTIONS["twas"] == "'twas"
    assert not {"its", "well", "ill", "wed", "shed", "lets", "shell", "were", "hell"} & set(CONTRACTIONS)


def test_vqa_accuracy_hand_computed():
    ten = lambda k, a="two": [a] * k + ["other"] * (10 - k)  # noqa: E731
    assert vqa_accuracy("2", ten(0)) == 0.0
    assert vqa_accuracy("2", ten(1)) == pytest.approx(0.3)  # 9 subsets with 1 match (1/3), 1 with 0
    assert vqa_accuracy("2", ten(2)) == pytest.approx(0.6)  # 8 x 2/3 + 2 x 1/3
    assert vqa_accuracy("2", ten(3)) == pytest.approx(0.9)  # 7 x 1 + 3 x 2/3
    assert vqa_accuracy("2", ten(4)) == 1.0
    assert vqa_accuracy("The two.", ten(10)) == 1.0  # normalised both sides
    assert vqa_accuracy("yes", ["yes", "yes", "no"]) == pytest.approx((1 / 3 + 1 / 3 + 2 / 3) / 3)
    with pytest.raises(ValueError):
        vqa_accuracy("x", [])


def test_exact_match_and_says_unanswerable():
    assert exact_match("Yes.", "yes") == 1.0 and exact_match("a table", "table") == 0.0
    assert says_unanswerable("Unanswerable.") and says_unanswerable("  unanswerable")
    assert not says_unanswerable("The question is unanswerable") and not says_unanswerable("")


VIZWIZ_ANSWERS = ["unanswerable"] * 6 + ["soup"] * 3 + ["tomato soup"]
VIZWIZ_PREDICTIONS = ["Unanswerable", "The question is unanswerable", "", "unanswerable.", "Soup", "soup, unanswerable"]


def test_vizwiz_scores_the_answer_as_it_stands():
    """An empty answer or a sentence containing "unanswerable" is not the answer "unanswerable"
    (the old scorer turned both into it and inflated accuracy)."""
    recs = [{"prediction": p, "truth": {"answers": VIZWIZ_ANSWERS, "answerable": 0}} for p in VIZWIZ_PREDICTIONS]
    per = [VIZWIZ.score([r])["accuracy"] for r in recs]
    assert per == [1.0, 0.0, 0.0, 1.0, pytest.approx(0.9), 0.0]
    assert VIZWIZ.score(recs)["unanswerable"] == {
        "said_unanswerable_rate": pytest.approx(2 / 6),
        "recall": pytest.approx(2 / 6),
    }


def test_vizwiz_equals_lmms_eval_process_results():
    """lmms-eval's own `vizwiz_vqa_process_results` (EvalAI normalisation, leave-one-out) on the
    same answers gives the same accuracy per prediction (CI installs lmms-eval)."""
    if os.environ.get("CI"):
        from lmms_eval.tasks.vizwiz_vqa.utils import vizwiz_vqa_process_results
    else:
        vizwiz_vqa_process_results = pytest.importorskip("lmms_eval.tasks.vizwiz_vqa.utils").vizwiz_vqa_process_results
    answers_sets = [VIZWIZ_ANSWERS, ["blue"] * 2 + ["dark blue"] * 8, ["2"] * 5 + ["two"] * 5]
    preds = [*VIZWIZ_PREDICTIONS, "Dark-blue", "blue.", "Two", "the 2", "none"]
    for answers in answers_sets:
        for p in preds:
            ref = vizwiz_vqa_process_results({"answers": list(answers), "question_id": "q"}, [p])["exact_match"]
            ours = VIZWIZ.score([{"prediction": p, "truth": {"answers": answers, "answerable": 1}}])["accuracy"]
            assert ours == pytest.approx(ref), (p, answers)


def _img(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8)).save(path)


def test_vqav2_loader_and_score_by_answer_type(tmp_path):
    qs = {
        "questions": [
            {"question_id": 10, "image_id": 5, "question": "How many dogs?"},
            {"question_id": 11, "image_id": 5, "question": "Is it sunny?"},
            {"question_id": 12, "image_id": 5},
        ]
    }  # no question: skipped
    anns = {
        "annotations": [
            {"question_id": 10, "answer_type": "number", "answers": [{"answer": "2"}] * 3 + [{"answer": "3"}] * 7},
            {"question_id": 11, "answer_type": "yes/no", "answers": [{"answer": "yes"}] * 10},
            {"question_id": 12, "answer_type": "other", "answers": [{"answer": "x"}] * 10},
        ]
    }
    (tmp_path / "v2_OpenEnded_mscoco_val2014_questions.json").write_text(json.dumps(qs))
    (tmp_path / "v2_mscoco_val2014_annotations.json").write_text(json.dumps(anns))
    _img(tmp_path / "val2014" / "COCO_val2014_000000000005.jpg")
    samples = VQAV2.load(tmp_path / "v2_OpenEnded_mscoco_val2014_questions.json", None, {})
    assert [s.id for s in samples] == ["10", "11"]
    assert samples[0].prompt == "How many dogs?\nAnswer the question using a single word or phrase."
    assert samples[0].image().size == (8, 8)
    recs = [{"prediction": "Two", "truth": samples[0].truth}, {"prediction": "Yes", "truth": samples[1].truth}]
    m = VQAV2.score(recs)
    assert m["by_answer_type"] == {"number": pytest.approx(0.9), "yes/no": 1.0}
    assert m["accuracy"] == pytest.approx(0.95)
    with pytest.raises(FileNotFoundError, match="v2_mscoco_test2015_annotations.json"):
        (tmp_path / "v2_OpenEnded_mscoco_test2015_questions.json").write_text(json.dumps(qs))
        VQAV2.load(tmp_path / "v2_OpenEnded_mscoco_test2015_questions.json", None, {})


def test_gqa_textvqa_vizwiz_loaders(tmp_path):
    (tmp_path / "gqa.json").write_text(
        json.dumps({"q1": {"imageId": "n1", "question": "What color?", "answer": "red"}})
    )
    _img(tmp_path / "images" / "n1.jpg")
    (s,) = GQA.load(tmp_path / "gqa.json", None, {})
    assert GQA.score([{"prediction": "Red.", "truth": s.truth}])["accuracy"] == 1.0

    data = {"data": [{"question_id": 7, "image_id": "abc", "question": "What brand?", "answers": ["coca cola"] * 10}]}
    (tmp_path / "TextVQA_0.5.1_val.json").write_text(json.dumps(data))
    (s,) = TEXTVQA.load(tmp_path / "TextVQA_0.5.1_val.json", None, {})
    assert str(s.image.__closure__[0].cell_contents).endswith("train_images/abc.jpg")
    assert TEXTVQA.score([{"prediction": "Coca-Cola", "truth": s.truth}])["accuracy"] == 1.0  # hyphen -> space
    assert TEXTVQA.score([{"prediction": "pepsi", "truth": s.truth}])["accuracy"] == 0.0

    viz = [
        {
            "image": "VizWiz_val_1.jpg",
            "question": "What is this?",
            "answerable": 0,
            "answer_type": "unanswerable",
            "answers": [{"answer": "unanswerable"}] * 8 + [{"answer": "soup"}] * 2,
        },
        {
            "image": "VizWiz_val_2.jpg",
            "question": "Color?",
            "answerable": 1,
            "answer_type": "other",
            "answers": [{"answer": "blue"}] * 10,
        },
    ]
    (tmp_path / "val.json").write_text(json.dumps(viz))
    samples = VIZWIZ.load(tmp_path / "val.json", None, {})
    assert samples[0].prompt.startswith(
        "What is this?\nWhen the provided information is insufficient, respond with 'Unanswerable'."
    )
    m = VIZWIZ.score(
        [
            {"prediction": "Unanswerable", "truth": samples[0].truth},
            {"prediction": "unanswerable", "truth": samples[1].truth},
        ]
    )
    assert m["accuracy"] == 0.5
    assert m["unanswerable"] == {"said_unanswerable_rate": 1.0, "recall": 1.0}


def test_normalize_answer_equals_lmms_eval_evalai_processor():
    """lmms-eval's copy of the EvalAI answer processor (the official VQA normalisation) gives the
    same string for every answer of the table above and a few harder ones."""
    module = "lmms_eval.tasks._task_utils.vqa_eval_metric"
    processor = importlib.import_module(module) if os.environ.get("CI") else pytest.importorskip(module)
    evalai = processor.EvalAIAnswerProcessor()
    raws = [raw for raw, _ in NORMALIZE_CASES] + [
        "It's 3.5 o'clock, isnt it?",
        "a man's dog.",
        "1,000,000 -ish",
        "twas",
    ]
    for raw in raws:
        assert normalize_answer(raw) == evalai(raw), raw
