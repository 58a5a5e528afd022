"""CHAIR: COCO vocabulary (synonyms, plurals, multi-word phrases) and hand-computed scores."""

import json

import pytest
from PIL import Image

from mmalign.evaluate.chair import (
    TASK,
    PhraseVocabulary,
    chair_counts,
    chair_scores,
    coco_objects,
    coco_vocabulary,
    plural_forms,
)


def names(text):
    return coco_vocabulary().names(text)


def test_table_has_the_80_coco_categories():
    data = json.loads(
        open(
            __import__("mmalign.evaluate.chair", fromlist=["x"]).__file__.replace("chair.py", "data/coco_objects.json")
        ).read()
    )
    cats = data["categories"]
    assert len(cats) == 80
    assert {"person", "hot dog", "teddy bear", "dining table", "hair drier", "skis", "tv"} <= set(cats)
    # every synonym names exactly one category
    syns = [s for v in cats.values() for s in v]
    assert len(syns) == len(set(syns))
    assert not set(syns) & set(cats)


def test_plural_forms():
    assert plural_forms("dog") == {"dogs"}
    assert plural_forms("bus") == {"buses"}
    assert plural_forms("couch") == {"couches"}
    assert plural_forms("puppy") == {"puppies"}
    assert plural_forms("cowboy") == {"cowboys"}
    assert plural_forms("knife") == {"knives"} and plural_forms("pocketknife") == {"pocketknives"}
    assert plural_forms("woman") == {"women"} and plural_forms("policeman") == {"policemen"}
    assert plural_forms("person") == {"people"} and plural_forms("mouse") == {"mice"}
    assert plural_forms("sheep") == {"sheep"} and plural_forms("calf") == {"calves"}
    assert plural_forms("bronco") == {"broncos", "broncoes"}


def test_synonyms_and_plurals_map_to_categories():
    assert names("A woman and two men with their puppies.") == ["person", "person", "dog"]
    assert names("Kittens on the sofa, a TV and remotes") == ["cat", "couch", "tv", "remote"]
    assert names("knives, forks and spoons") == ["knife", "fork", "spoon"]
    assert names("Two buses and a taxi") == ["bus", "car"]
    assert names("mice near a laptop computer") == ["mouse", "laptop"]
    assert names("nothing here but sky and grass") == []


def test_multi_word_phrases_win_over_their_words():
    assert names("two hot dogs") == ["hot dog"]  # not a dog
    assert names("a teddy bear and a real bear") == ["teddy bear", "bear"]
    assert names("a motor bike, motorbikes and a motor cycle") == ["motorcycle"] * 3
    assert names("wine glasses by the stop sign") == ["wine glass", "stop sign"]
    assert names("a stove top oven") == ["oven"]  # three words
    assert names("hot-dog stand") == ["hot dog"]  # a hyphen separates words


def test_qualifiers_fixed_phrases_and_suppression():
    assert names("a baby elephant") == ["elephant"]  # not a person ("baby")
    assert names("adult birds") == ["bird"]
    assert names("a baby animal") == []  # names no category at all
    assert names("a passenger jet") == ["airplane"]  # the passenger is not a person
    assert names("a passenger on the train") == ["person", "train"]
    assert names("train tracks") == []  # not a train
    assert names("a toilet seat") == ["toilet"]
    assert names("the seat of the toilet") == ["toilet"]  # seat is not a chair when a toilet is named
    assert names("a seat by the window") == ["chair"]


def test_phrase_vocabulary_generic():
    v = PhraseVocabulary({"red circle": "red circle", "circle": "circle", "big top": None})
    assert v.names("two red circles and a circle under the big top") == ["red circle", "circle"]
    with pytest.raises(ValueError, match="empty"):
        PhraseVocabulary({"--": "x"})


def test_chair_counts_and_pooled_scores_hand_computed():
    # mentions: dog (ok), cat (bad), cat (bad again: every mention counts), person (ok)
    assert chair_counts(["dog", "cat", "cat", "person"], {"dog", "person", "couch"}, ["dog", "person", "couch"]) == (
        2,
        4,
        2,
    )
    per = [(2, 4, 2), (0, 1, 1), (0, 0, 0)]
    s = chair_scores(per, n_targets=5)
    assert s["chair_i"] == pytest.approx(2 / 5)  # pooled: (2+0+0) / (4+1+0), not a mean of ratios
    assert s["chair_s"] == pytest.approx(1 / 3)
    assert s["recall"] == pytest.approx(3 / 5)
    assert chair_scores([], 0) == {"chair_i": 0.0, "chair_s": 0.0, "recall": 0.0, "mentions": 0, "hallucinated": 0}


def write_coco(root):
    (root / "annotations").mkdir(parents=True)
    (root / "val2014").mkdir()
    images = [
        {"id": 1, "file_name": "COCO_val2014_000000000001.jpg"},
        {"id": 2, "file_name": "COCO_val2014_000000000002.jpg"},
    ]
    for im in images:
        Image.new("RGB", (32, 32), (90, 90, 90)).save(root / "val2014" / im["file_name"])
    cats = [{"id": 1, "name": "person"}, {"id": 18, "name": "dog"}, {"id": 58, "name": "hot dog"}]
    anns = [{"image_id": 1, "category_id": 1}, {"image_id": 1, "category_id": 18}, {"image_id": 2, "category_id": 58}]
    (root / "annotations" / "instances_val2014.json").write_text(
        json.dumps({"images": images, "annotations": anns, "categories": cats})
    )
    caps = [
        {"image_id": 1, "caption": "A man and his puppy on a couch."},
        {"image_id": 2, "caption": "Two hot dogs on a plate next to a cup"},
    ]
    (root / "annotations" / "captions_val2014.json").write_text(json.dumps({"annotations": caps}))


def test_ground_truth_from_instances_and_captions(tmp_path):
    write_coco(tmp_path)
    inst = json.loads((tmp_path / "annotations" / "instances_val2014.json").read_text())
    caps = json.loads((tmp_path / "annotations" / "captions_val2014.json").read_text())
    assert coco_objects(inst, caps) == {1: {"person", "dog", "couch"}, 2: {"hot dog", "cup"}}
    assert coco_objects(inst, None) == {1: {"person", "dog"}, 2: {"hot dog"}}


def test_coco_task_end_to_end_hand_computed(tmp_path):
    write_coco(tmp_path)
    samples = TASK.load(tmp_path, None, {})
    assert [s.id for s in samples] == ["long/1", "long/2", "short/1", "short/2"]
    assert samples[0].prompt == "Please describe this image as detailed as possible."
    assert samples[2].prompt == "Please describe the image shortly and precisely, in less than 20 words."
    assert samples[0].image().size == (32, 32)
    answers = {
        # woman(person) ok, sofa(couch) ok, dogs ok, cat BAD, cats BAD, dog ok -> 2 of 6; recall 3/3
        "long/1": "A woman sits on a sofa with two dogs and a cat. The cats look at the dog.",
        # hot dogs ok (not dog), teddy bear BAD, cup ok -> 1 of 3; recall 2/2
        "long/2": "Hot dogs and a teddy bear next to a cup.",
        "short/1": "A person with a dog.",  # 0 of 2; recall 2/3
        "short/2": "A bear.",  # 1 of 1; recall 0/2
    }
    records = [{"id": s.id, "prompt": s.prompt, "prediction": answers[s.id], "truth": s.truth} for s in samples]
    m = TASK.score(records)
    assert m["long"]["chair_i"] == pytest.approx(3 / 9)
    assert m["long"]["chair_s"] == 1.0
    assert m["long"]["recall"] == 1.0
    assert m["long"]["mean_words"] == pytest.approx((18 + 10) / 2)
    assert m["short"]["chair_i"] == pytest.approx(1 / 3)
    assert m["short"]["chair_s"] == 0.5
    assert m["short"]["recall"] == pytest.approx(2 / 5)
    assert "CHAIRi short prompt 33.3%" in TASK.notes({"m": m})[0]


def test_coco_limit_and_missing_files(tmp_path):
    write_coco(tmp_path)
    assert len(TASK.load(tmp_path, None, {"limit": 1, "seed": 3})) == 2  # one image, two prompts
    with pytest.raises(FileNotFoundError, match="instances_train2014.json"):
        TASK.load(tmp_path, None, {"split": "train2014"})
