"""MME: answer parsing, both released folder layouts, accuracy+ needs both questions of an image."""

import pytest
from PIL import Image

from mmalign.evaluate.mme import TASK, mme_answer


@pytest.mark.parametrize(
    "text, parsed",
    [
        ("Yes", "yes"),
        ("no.", "no"),
        ("Yes, it is.", "yes"),
        ("No, there is none", "no"),
        ("I think so", "other"),
        ("Not sure", "no"),
        ("", "other"),
    ],
)
def test_mme_answer(text, parsed):
    assert mme_answer(text) == parsed


def write_mme(root):
    # "existence": images and txt side by side; "artwork": images/ + questions_answers_YN/
    ex = root / "existence"
    ex.mkdir(parents=True)
    for stem in ("a", "b"):
        Image.new("RGB", (8, 8)).save(ex / f"{stem}.jpg")
        (ex / f"{stem}.txt").write_text(
            f"Is there a dog in {stem}? Please answer yes or no.\tYes\n"
            f"Is there a cat in {stem}? Please answer yes or no.\tNo\n"
        )
    art = root / "artwork"
    (art / "images").mkdir(parents=True)
    (art / "questions_answers_YN").mkdir()
    Image.new("RGB", (8, 8)).save(art / "images" / "p1.png")
    (art / "questions_answers_YN" / "p1.txt").write_text("Is this by Monet?\tYes\nIs this by Dali?\tNo\nbroken line\n")
    (art / "questions_answers_YN" / "orphan.txt").write_text("No image for this?\tYes\n")
    cr = root / "code_reasoning"
    cr.mkdir()
    Image.new("RGB", (8, 8)).save(cr / "c.png")
    (cr / "c.txt").write_text(
        "Does it print 3? Please answer yes or no.\tYes\nDoes it print 4? Please answer yes or no.\tNo\n"
    )


def test_mme_layouts_and_scores_hand_computed(tmp_path):
    write_mme(tmp_path)
    samples = TASK.load(tmp_path, None, {})
    ids = [s.id for s in samples]
    assert ids == [
        "existence/a/0",
        "existence/a/1",
        "existence/b/0",
        "existence/b/1",
        "artwork/p1/0",
        "artwork/p1/1",
        "code_reasoning/c/0",
        "code_reasoning/c/1",
    ]
    assert samples[0].prompt == "Is there a dog in a? Please answer yes or no."  # suffix not doubled
    assert samples[4].prompt == "Is this by Monet?\nPlease answer yes or no."  # added when missing
    answers = {
        "existence/a/0": "Yes",
        "existence/a/1": "No",  # image a: both right
        "existence/b/0": "Yes",
        "existence/b/1": "Yes",  # image b: one right
        "artwork/p1/0": "No",
        "artwork/p1/1": "No",  # one right
        "code_reasoning/c/0": "Yes.",
        "code_reasoning/c/1": "no",  # both right
    }
    m = TASK.score([{"prediction": answers[s.id], "truth": s.truth} for s in samples])
    ex = m["subtasks"]["existence"]
    assert ex["accuracy"] == pytest.approx(75.0)  # 3 of 4 questions
    assert ex["accuracy_plus"] == pytest.approx(50.0)  # 1 of 2 images has both right
    assert ex["score"] == pytest.approx(125.0)
    art = m["subtasks"]["artwork"]
    assert (art["accuracy"], art["accuracy_plus"]) == (50.0, 0.0)  # half the questions, no image fully right
    assert m["perception"] == pytest.approx(125.0 + 50.0)
    assert m["cognition"] == pytest.approx(200.0)


def test_mme_needs_its_folders(tmp_path):
    with pytest.raises(FileNotFoundError, match="sub-task"):
        TASK.load(tmp_path, None, {})
    with pytest.raises(ValueError, match="folder"):
        TASK.load(None, None, {})


@pytest.mark.parametrize("text", ["  yes", "   no", "   No, there is none"])
def test_tool_parsing_does_not_strip(text):
    """MME's tool parses the answer as written: two leading spaces push "yes" out of the first
    4 characters. Our own generations are stripped first."""
    assert mme_answer(text, strip=False) == "other"
    assert mme_answer(text) in ("yes", "no")


# what MME's eval_tool/calculation.py prints for these files (run on them by hand):
# existence score 75.0 (acc 50 + acc+ 25), code_reasoning score 125.0 (acc 75 + acc+ 50)
TOOL_RESULTS = {
    "existence.txt": [
        "a.jpg\tIs there a dog?\tYes\tYes",
        "a.jpg\tIs there a cat?\tNo\t   no",  # "other" for the tool: "no" is not in its first 4 characters
        "b.jpg\tIs there a dog?\tYes\tyes, there is",
        "b.jpg\tIs there a cat?\tNo\tNo.",
        "c.jpg\tIs there a dog?\tYes\tNo",
        "c.jpg\tIs there a cat?\tNo\tYes",
        "d.jpg\tIs there a dog?\tYes\t yes",  # " yes" still has "yes" in its first 4 characters
        "d.jpg\tIs there a cat?\tNo\t",  # empty: other
    ],
    "code_reasoning.txt": [
        "c.png\tDoes it print 3?\tYes\tYes",
        "c.png\tDoes it print 4?\tNo\tno",
        "d.png\tDoes it print 5?\tYes\t  yes",  # other
        "d.png\tDoes it print 6?\tNo\tnothing",  # "no" in its first 4 characters
    ],
}


def test_results_dir_is_scored_as_mme_tool(tmp_path):
    from mmalign.evaluate.mme import read_results_dir

    for name, lines in TOOL_RESULTS.items():
        (tmp_path / name).write_text("\n".join(lines) + "\n")
    m = TASK.score(read_results_dir(tmp_path))
    ex, cr = m["subtasks"]["existence"], m["subtasks"]["code_reasoning"]
    assert (ex["accuracy"], ex["accuracy_plus"], ex["score"]) == (50.0, 25.0, 75.0)
    assert (cr["accuracy"], cr["accuracy_plus"], cr["score"]) == (75.0, 50.0, 125.0)
    assert (m["perception"], m["cognition"]) == (75.0, 125.0)
    (tmp_path / "count.txt").write_text("x.jpg\tq\tYes\tyes\n")
    with pytest.raises(ValueError, match="two per image"):
        read_results_dir(tmp_path)
