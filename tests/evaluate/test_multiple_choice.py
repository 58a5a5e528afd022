"""MMBench-style multiple choice: prompt, answer parsing, circular evaluation over rotations."""

import base64
import csv
import io

import pytest
from PIL import Image

from mmalign.evaluate.multiple_choice import TASK, build_prompt, parse_choice

OPTS = {"A": "a cat", "B": "a dog", "C": "a bird", "D": "a fish"}


# what VLMEvalKit's `can_infer` (vlmeval/utils/matching_util.py) returns for each answer, run
# on these options by hand; its "Z" (a refusal) and False (no match) are None here
@pytest.mark.parametrize(
    "text, letter",
    [
        ("B", "B"),
        ("B.", "B"),
        ("(C) a bird", "C"),
        ("D: a fish", "D"),
        ("The answer is A.", "A"),
        ("a dog", "B"),
        ("It is a bird", "C"),
        ("E", None),
        ("a cat or a dog", None),
        ("no idea", None),
        ("A dog", "A"),
        ("B is right", "B"),
        ("I think C", "C"),
        ("I think the answer is C because it is small and so on", "C"),
        ("C. But it could also be D", None),
        ("Z", None),
        ("Cannot determine the answer", None),
        ("The correct answer is **D**.", "D"),
        ("the answer is a cat", "A"),
        ("A, B", None),
        ("I choose option B here", "B"),
        ("B C D", None),
        ("", None),
        ("  c", None),
        ("fish", None),
        ("A fish", "A"),
        ("The image shows a fish swimming in a large tank with plants and rocks around it", None),
        ("Option (B) is the one that matches the picture best", None),
        ("[D]", "D"),
        ("answer: b", None),
        ("{A}", "A"),
        ("A\nB", None),
    ],
)
def test_parse_choice_as_vlmevalkit(text, letter):
    assert parse_choice(text, OPTS) == letter


def test_a_leading_article_is_option_a():
    """VLMEvalKit and MMBench read "A dog" as option A (the old matcher read the article as
    English and picked B, the dog)."""
    assert parse_choice("A dog", OPTS) == "A"
    assert parse_choice("a dog", OPTS) == "B"  # lower case: no letter, so the option's text


def test_prompt_layout():
    assert build_prompt("What is it?", "Look closely.", ["x", "y"]) == (
        "Look closely.\nWhat is it?\nA. x\nB. y\nAnswer with the option's letter from the given choices directly."
    )
    assert build_prompt("Q?", "nan", ["x", "y"]).startswith("Q?\nA. x")


def _b64():
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (1, 2, 3)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _row(index, question, options, answer, category="x", image=None):
    opts = dict(zip("ABCD", [*options, "", "", "", ""][:4]))
    return {
        "index": str(index),
        "question": question,
        "hint": "",
        **opts,
        "answer": answer,
        "category": category,
        "image": image if image is not None else _b64(),
    }


def write_tsv(path):
    """Released layout: question 0 and its two rotated copies (1000000, 2000000), question 1 and
    one copy whose image refers to row 1, question 2 without copies, question 3 unanswerable."""
    rows = [
        _row(0, "Which animal?", ["cat", "dog", "bird"], "B"),
        _row(1, "Which colour?", ["red", "green"], "A", "y"),
        _row(2, "Which shape?", ["circle", "square"], "B", "y"),
        _row(3, "", ["p", "q"], "A", "y"),  # no question: skipped
        _row(1000000, "Which animal?", ["dog", "bird", "cat"], "A", image="0"),
        _row(1000001, "Which colour?", ["green", "red"], "B", "y", image="1"),
        _row(2000000, "Which animal?", ["bird", "cat", "dog"], "C", image="0"),
    ]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]), delimiter="\t")
        w.writeheader()
        w.writerows(rows)


def test_released_rows_are_asked_once_and_grouped_by_index_mod_1e6(tmp_path):
    write_tsv(tmp_path / "mmbench_dev.tsv")
    samples = TASK.load(tmp_path / "mmbench_dev.tsv", None, {})
    assert [s.id for s in samples] == ["0", "1", "2", "1000000", "1000001", "2000000"]  # no rotation of our own
    assert [s.truth["group"] for s in samples] == [0, 1, 2, 0, 1, 0]
    assert samples[3].prompt.splitlines()[1:4] == ["A. dog", "B. bird", "C. cat"]  # the released copy's order
    assert samples[4].image().getpixel((0, 0)) == (1, 2, 3)  # referenced image decoded
    # question 0 right in all three rows; question 1 right only in its main row; question 2 wrong
    answers = {"0": "B", "1000000": "A", "2000000": "C", "1": "A", "1000001": "A", "2": "A"}
    m = TASK.score([{"prediction": answers[s.id], "truth": s.truth} for s in samples])
    assert (m["n_questions"], m["n_rows"]) == (3, 6)
    assert m["circular_accuracy"] == pytest.approx(1 / 3)
    assert m["single_pass_accuracy"] == pytest.approx(2 / 3)
    assert m["by_category"] == {"x": 1.0, "y": 0.0}
    answers["2000000"] = "A"  # one wrong copy is enough to lose question 0
    assert TASK.score([{"prediction": answers[s.id], "truth": s.truth} for s in samples])["circular_accuracy"] == 0.0


def test_limit_and_main_rows_only(tmp_path):
    write_tsv(tmp_path / "mmbench_dev.tsv")
    assert [s.id for s in TASK.load(tmp_path / "mmbench_dev.tsv", None, {"limit": 1})] == ["0", "1000000", "2000000"]
    assert [s.id for s in TASK.load(tmp_path / "mmbench_dev.tsv", None, {"circular": False})] == ["0", "1", "2"]
    # a copy whose main row is missing is asked but not scored (VLMEvalKit scores main rows' groups)
    samples = TASK.load(tmp_path / "mmbench_dev.tsv", None, {})
    recs = [{"prediction": "A", "truth": s.truth} for s in samples if s.id != "1"]
    assert TASK.score(recs)["n_questions"] == 2


def test_not_a_tsv(tmp_path):
    (tmp_path / "x.tsv").write_text("a\tb\n1\t2\n")
    with pytest.raises(ValueError, match="not an MMBench TSV"):
        TASK.load(tmp_path / "x.tsv", None, {})
