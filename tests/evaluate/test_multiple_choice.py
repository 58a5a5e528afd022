"""MMBench-style multiple choice: prompt, answer parsing, circular evaluation over rotations."""

import base64
import csv
import io

import pytest
from PIL import Image

from mmalign.evaluate.multiple_choice import TASK, build_prompt, parse_choice

OPTS = {"A": "a cat", "B": "a dog", "C": "a bird", "D": "a fish"}


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
        ("A dog", "B"),
        ("B is right", "B"),
        ("I think C", "C"),
    ],
)
def test_parse_choice(text, letter):
    assert parse_choice(text, OPTS) == letter


def test_prompt_layout():
    assert build_prompt("What is it?", "Look closely.", ["x", "y"]) == (
        "Look closely.\nWhat is it?\nA. x\nB. y\nAnswer with the option's letter from the given choices directly."
    )
    assert build_prompt("Q?", "nan", ["x", "y"]).startswith("Q?\nA. x")


def _b64():
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (1, 2, 3)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def write_tsv(path):
    rows = [
        {
            "index": "0",
            "question": "Which animal?",
            "hint": "",
            "A": "cat",
            "B": "dog",
            "C": "bird",
            "D": "",
            "answer": "B",
            "category": "x",
            "image": _b64(),
        },
        {
            "index": "1",
            "question": "Which colour?",
            "hint": "nan",
            "A": "red",
            "B": "green",
            "C": "",
            "D": "",
            "answer": "A",
            "category": "y",
            "image": "0",
        },  # image of row 0
        {
            "index": "2",
            "question": "",
            "hint": "",
            "A": "p",
            "B": "q",
            "C": "",
            "D": "",
            "answer": "A",
            "category": "y",
            "image": _b64(),
        },  # no question: skipped
    ]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]), delimiter="\t")
        w.writeheader()
        w.writerows(rows)


def test_rotations_and_circular_scoring_hand_computed(tmp_path):
    write_tsv(tmp_path / "mmbench_dev.tsv")
    samples = TASK.load(tmp_path / "mmbench_dev.tsv", None, {})
    assert [s.id for s in samples] == ["0/0", "0/1", "0/2", "1/0", "1/1"]
    # question 0: options rotate, the right letter follows "dog"
    assert [s.truth["answer"] for s in samples[:3]] == ["B", "A", "C"]
    assert samples[1].prompt.splitlines()[1:4] == ["A. dog", "B. bird", "C. cat"]
    assert samples[3].image().getpixel((0, 0)) == (1, 2, 3)  # referenced image decoded
    # question 0 right in every rotation; question 1 right only in rotation 0
    answers = {"0/0": "B", "0/1": "A", "0/2": "C", "1/0": "A", "1/1": "A"}
    m = TASK.score([{"prediction": answers[s.id], "truth": s.truth} for s in samples])
    assert m["circular_accuracy"] == 0.5
    assert m["single_pass_accuracy"] == 1.0
    assert m["by_category"] == {"x": 1.0, "y": 0.0}
    # one wrong rotation is enough to lose question 0
    answers["0/2"] = "A"
    assert TASK.score([{"prediction": answers[s.id], "truth": s.truth} for s in samples])["circular_accuracy"] == 0.0


def test_not_a_tsv(tmp_path):
    (tmp_path / "x.tsv").write_text("a\tb\n1\t2\n")
    with pytest.raises(ValueError, match="not an MMBench TSV"):
        TASK.load(tmp_path / "x.tsv", None, {})
