import random
import re

import pytest

from mmalign.data import toyworld as tw

SEEDS = range(400)

# positions recomputed here from (row, col), independent of tw.POSITIONS
_ROWS = ("top", "middle", "bottom")
_COLS = ("left", "middle", "right")
_NUMBERS = {0: "zero", 1: "one", 2: "two", 3: "three", 4: "four", 5: "five"}


def position_of(cell: int) -> str:
    row, col = divmod(cell, 3)
    return "center" if (row, col) == (1, 1) else f"{_ROWS[row]} {_COLS[col]}"


def obj(shape, colour, cell, size="large"):
    return tw.ToyObject(shape=shape, colour=colour, size=size, cell=cell)


# ---------------------------------------------------------------- scenes


def test_scene_is_deterministic_per_seed():
    for s in (0, 1, 17, 10_000_123):
        assert tw.make_scene(s) == tw.make_scene(s)
        assert tw.render(tw.make_scene(s)).tobytes() == tw.render(tw.make_scene(s)).tobytes()
    # and the seed matters
    assert len({tw.make_scene(s).objects for s in range(50)}) > 40


def test_scene_layout_invariants():
    counts = set()
    for s in SEEDS:
        scene = tw.make_scene(s)
        assert scene.seed == s
        cells = [o.cell for o in scene.objects]
        assert 1 <= len(cells) <= 4
        assert all(0 <= c <= 8 for c in cells)
        assert cells == sorted(set(cells)), f"seed {s}: cells {cells} not distinct / raster-sorted"
        for o in scene.objects:
            assert o.shape in tw.SHAPES and o.colour in tw.COLOURS and o.size in tw.SIZES
            assert (o.row, o.col) == divmod(o.cell, 3)
            assert o.position == position_of(o.cell)
        counts.add(len(cells))
    assert counts == {1, 2, 3, 4}


def test_scene_count_has_and_roundtrip():
    scene = tw.Scene((obj("circle", "red", 0), obj("circle", "blue", 4), obj("square", "red", 8)), seed=5)
    assert scene.count() == 3
    assert scene.count(shape="circle") == 2
    assert scene.count(colour="red") == 2
    assert scene.count("circle", "red") == 1
    assert scene.count("triangle") == 0
    assert scene.has("blue", "circle") and not scene.has("blue", "square")
    assert tw.Scene.from_dict(scene.to_dict()) == scene
    made = tw.make_scene(123)
    assert tw.Scene.from_dict(made.to_dict()) == made


def test_split_seed_ranges_are_disjoint():
    n = 1_000_000
    splits = ["pretrain", "train", "curated", "val", "test"]
    ranges = {s: tw.split_seeds(s, n) for s in splits}
    assert all(len(r) == n for r in ranges.values())
    for i, a in enumerate(splits):
        for b in splits[i + 1 :]:
            ra, rb = ranges[a], ranges[b]
            assert ra.stop <= rb.start or rb.stop <= ra.start, (a, b)
    assert list(tw.split_seeds("test", 3)) == [30_000_000, 30_000_001, 30_000_002]
    assert tw.split_seeds("val", 0) == range(20_000_000, 20_000_000)


def test_unknown_split_raises():
    with pytest.raises(ValueError, match="holdout"):
        tw.split_seeds("holdout", 10)


# ---------------------------------------------------------------- rendering


def test_render_pixels_match_objects_and_background():
    for s in range(150):
        scene = tw.make_scene(s)
        img = tw.render(scene)
        assert img.size == (48, 48) and img.mode == "RGB"
        occupied = {o.cell for o in scene.objects}
        for o in scene.objects:
            px = img.getpixel((o.col * 16 + 8, o.row * 16 + 8))
            target = tw.COLOURS[o.colour]
            assert max(abs(a - b) for a, b in zip(px, target)) <= 20, (s, o, px)
        empty = [img.getpixel((c % 3 * 16 + 8, c // 3 * 16 + 8)) for c in range(9) if c not in occupied]
        assert empty, "at most four of nine cells are occupied"
        assert len(set(empty)) == 1, f"seed {s}: background not uniform {empty}"
        assert max(abs(a - b) for a, b in zip(empty[0], tw.BACKGROUND)) <= 12


def test_render_object_colour_distinguishable_from_background():
    scene = tw.Scene((obj("square", "blue", 4),), seed=3)
    img = tw.render(scene)
    centre = img.getpixel((24, 24))
    corner = img.getpixel((0, 0))
    assert centre[2] > centre[0] + 100  # blue
    assert max(abs(a - b) for a, b in zip(corner, tw.BACKGROUND)) <= 12


def test_small_objects_are_smaller_than_large():
    def coloured_pixels(size):
        img = tw.render(tw.Scene((obj("square", "red", 4, size=size),), seed=9))
        return sum(1 for px in img.get_flattened_data() if px[0] > 150 and px[1] < 110)

    small, large = coloured_pixels("small"), coloured_pixels("large")
    assert 25 <= small <= 100  # side 7-9 px
    assert 144 <= large <= 256  # side 12-16 px


# ---------------------------------------------------------------- questions


def check_answer(scene: tw.Scene, qa: tw.QA) -> None:
    objs = scene.objects
    q = qa.question
    if m := re.fullmatch(r"What colour is the (\w+)\?", q):
        matches = [o for o in objs if o.shape == m[1]]
        assert qa.kind == "colour" and len(matches) == 1 and qa.answer == matches[0].colour
    elif m := re.fullmatch(r"What shape is the (\w+) object\?", q):
        matches = [o for o in objs if o.colour == m[1]]
        assert qa.kind == "shape" and len(matches) == 1 and qa.answer == matches[0].shape
    elif m := re.fullmatch(r"Where is the (\w+) (\w+)\?", q):
        matches = [o for o in objs if (o.colour, o.shape) == (m[1], m[2])]
        assert qa.kind == "position" and len(matches) == 1 and qa.answer == position_of(matches[0].cell)
    elif q == "How many objects are there?":
        assert qa.kind == "count" and qa.answer == _NUMBERS[len(objs)]
    elif m := re.fullmatch(r"How many (\w+)s are there\?", q):
        assert m[1] in tw.SHAPES
        assert qa.kind == "count" and qa.answer == _NUMBERS[sum(o.shape == m[1] for o in objs)]
    elif m := re.fullmatch(r"Is there a (\w+) (\w+)\?", q):
        present = any((o.colour, o.shape) == (m[1], m[2]) for o in objs)
        assert qa.kind == "presence" and qa.answer == ("yes" if present else "no")
    elif m := re.fullmatch(r"Is the (\w+) (\w+) (to the left of|above) the (\w+) (\w+)\?", q):
        (a,) = [o for o in objs if (o.colour, o.shape) == (m[1], m[2])]
        (b,) = [o for o in objs if (o.colour, o.shape) == (m[4], m[5])]
        assert qa.kind == "relation" and a != b
        if m[3] == "above":
            assert a.row != b.row and qa.answer == ("yes" if a.row < b.row else "no")
        else:
            assert a.col != b.col and qa.answer == ("yes" if a.col < b.col else "no")
    else:
        pytest.fail(f"unexpected question {q!r}")


def test_every_answer_is_correct_against_the_scene():
    rng = random.Random(0)
    kinds = set()
    for s in SEEDS:
        scene = tw.make_scene(s)
        qas = tw.questions(scene, rng)
        for qa in qas:
            check_answer(scene, qa)
            kinds.add(qa.kind)
        presence = [qa.answer for qa in qas if qa.kind == "presence"]
        assert sorted(presence) == ["no", "yes"], f"seed {s}: {presence}"
        assert sum(qa.question == "How many objects are there?" for qa in qas) == 1
    assert kinds == {"colour", "shape", "count", "presence", "position", "relation"}


def test_relation_answers_both_ways_occur():
    rng = random.Random(1)
    answers = {qa.answer for s in SEEDS for qa in tw.questions(tw.make_scene(s), rng) if qa.kind == "relation"}
    assert answers == {"yes", "no"}


def test_questions_on_constructed_scene():
    # two circles (red top-left, blue bottom-right) and a red square in the center
    scene = tw.Scene((obj("circle", "red", 0), obj("square", "red", 4), obj("circle", "blue", 8)), seed=0)
    qas = tw.questions(scene, random.Random(3))
    by_q = {qa.question: qa.answer for qa in qas}
    # circles are not unique: no colour question about them; the square is
    assert "What colour is the circle?" not in by_q
    assert by_q["What colour is the square?"] == "red"
    # red is not unique, blue is
    assert "What shape is the red object?" not in by_q
    assert by_q["What shape is the blue object?"] == "circle"
    assert by_q["Where is the red circle?"] == "top left"
    assert by_q["Where is the red square?"] == "center"
    assert by_q["Where is the blue circle?"] == "bottom right"
    assert by_q["How many objects are there?"] == "three"
    for qa in qas:
        check_answer(scene, qa)


def test_questions_are_deterministic_given_rng():
    scene = tw.make_scene(42)
    assert tw.questions(scene, random.Random(7)) == tw.questions(scene, random.Random(7))


# ---------------------------------------------------------------- descriptions


def test_description_mentions_every_object_with_position():
    for s in SEEDS:
        scene = tw.make_scene(s)
        text = tw.description(scene)
        n = len(scene.objects)
        assert text.startswith(f"The image shows {_NUMBERS[n]} object{'s' if n > 1 else ''} on a gray background.")
        for o in scene.objects:
            assert f"There is a {o.size} {o.colour} {o.shape} in the {position_of(o.cell)}." in text
        # nothing hallucinated: every mentioned (colour, shape) is in the scene
        for colour, shape in tw.mentioned_objects(text):
            assert colour is not None and scene.has(colour, shape), (s, colour, shape)
        if m := re.search(r"The (\w+) (\w+) is to the left of the (\w+) (\w+)\.", text):
            (a,) = [o for o in scene.objects if (o.colour, o.shape) == (m[1], m[2])]
            (b,) = [o for o in scene.objects if (o.colour, o.shape) == (m[3], m[4])]
            assert a.col < b.col
        if m := re.search(r"The (\w+) (\w+) is above the (\w+) (\w+)\.", text):
            (a,) = [o for o in scene.objects if (o.colour, o.shape) == (m[1], m[2])]
            (b,) = [o for o in scene.objects if (o.colour, o.shape) == (m[3], m[4])]
            assert a.row < b.row


def test_description_of_constructed_scene():
    scene = tw.Scene((obj("triangle", "green", 1, "small"), obj("diamond", "purple", 7)), seed=0)
    assert tw.description(scene) == (
        "The image shows two objects on a gray background. "
        "There is a small green triangle in the top middle. "
        "There is a large purple diamond in the bottom middle. "
        "The green triangle is above the purple diamond."
    )
    one = tw.Scene((obj("circle", "yellow", 5, "small"),), seed=0)
    assert tw.description(one) == (
        "The image shows one object on a gray background. There is a small yellow circle in the middle right."
    )


# ---------------------------------------------------------------- mentioned_objects


def test_mentioned_objects_plural_and_bare():
    assert tw.mentioned_objects("There are two circles.") == [(None, "circle")]
    assert tw.mentioned_objects("three squares, one diamond") == [(None, "square"), (None, "diamond")]


def test_mentioned_objects_colour_within_two_words():
    assert tw.mentioned_objects("A red circle.") == [("red", "circle")]
    assert tw.mentioned_objects("a Blue small Triangle") == [("blue", "triangle")]
    assert tw.mentioned_objects("red squares") == [("red", "square")]
    # three words away: not attached
    assert tw.mentioned_objects("a red very small circle") == [(None, "circle")]
    # a colour after the shape is not attached to it
    assert tw.mentioned_objects("the circle is green") == [(None, "circle")]
    assert tw.mentioned_objects("Is there a purple diamond?") == [("purple", "diamond")]


def test_mentioned_objects_ignores_non_shapes():
    assert tw.mentioned_objects("a green object on a gray background , simple class") == []
    assert tw.mentioned_objects("circus squared triangular") == []
    assert tw.mentioned_objects("") == []


def test_mentioned_objects_order_and_multiple():
    text = "The red circle is to the left of the blue square. There is a triangle."
    assert tw.mentioned_objects(text) == [("red", "circle"), ("blue", "square"), (None, "triangle")]
