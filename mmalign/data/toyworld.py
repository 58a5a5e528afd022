"""The toy "shapes world": a seeded, procedural stand-in for web image-text data.

Every scene knows its exact object list, so captions, detailed descriptions and question /
answer pairs are generated from ground truth, and hallucination can be measured exactly.
Images are small (48 px) and the layout is a 3 x 3 grid of cells, one object at most per
cell, so a ViT with 8 px patches and 2 x 2 patch merging gives one token per cell.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from PIL import Image, ImageDraw

IMAGE_SIZE = 48
GRID = 3
CELL = IMAGE_SIZE // GRID
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 45, 40),
    "green": (40, 165, 70),
    "blue": (45, 85, 220),
    "yellow": (235, 200, 35),
    "purple": (145, 60, 185),
}
SHAPES = ("circle", "square", "triangle", "diamond")
SIZES = ("small", "large")
POSITIONS = (
    "top left",
    "top middle",
    "top right",
    "middle left",
    "center",
    "middle right",
    "bottom left",
    "bottom middle",
    "bottom right",
)
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five")
MAX_OBJECTS = 4
BACKGROUND = (200, 200, 195)


@dataclass(frozen=True)
class ToyObject:
    shape: str
    colour: str
    size: str
    cell: int  # 0..8, raster order

    @property
    def position(self) -> str:
        return POSITIONS[self.cell]

    @property
    def row(self) -> int:
        return self.cell // GRID

    @property
    def col(self) -> int:
        return self.cell % GRID

    @property
    def name(self) -> str:
        return f"{self.colour} {self.shape}"


@dataclass(frozen=True)
class Scene:
    objects: tuple[ToyObject, ...]
    seed: int

    def count(self, shape: str | None = None, colour: str | None = None) -> int:
        return sum((shape is None or o.shape == shape) and (colour is None or o.colour == colour) for o in self.objects)

    def has(self, colour: str, shape: str) -> bool:
        return self.count(shape, colour) > 0

    def to_dict(self) -> dict:
        return {"seed": self.seed, "objects": [o.__dict__ for o in self.objects]}

    @staticmethod
    def from_dict(d: dict) -> Scene:
        return Scene(tuple(ToyObject(**o) for o in d["objects"]), d["seed"])


def make_scene(seed: int) -> Scene:
    """A random scene of 1-4 objects in distinct cells; objects sorted in raster order."""
    rng = random.Random(seed)
    n = rng.randint(1, MAX_OBJECTS)
    cells = sorted(rng.sample(range(GRID * GRID), n))
    objects = tuple(ToyObject(rng.choice(SHAPES), rng.choice(list(COLOURS)), rng.choice(SIZES), c) for c in cells)
    return Scene(objects, seed)


def render(scene: Scene) -> Image.Image:
    """Draw the scene; position jitter and background noise are seeded by the scene."""
    rng = random.Random(scene.seed * 7919 + 1)
    base = tuple(min(255, max(0, c + rng.randint(-12, 12))) for c in BACKGROUND)
    img = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), base)
    draw = ImageDraw.Draw(img)
    for o in scene.objects:
        half = rng.choice((6, 6.5, 7)) if o.size == "large" else rng.choice((3.5, 4))
        cx = o.col * CELL + CELL / 2 + rng.uniform(-1, 1)
        cy = o.row * CELL + CELL / 2 + rng.uniform(-1, 1)
        colour = tuple(min(255, max(0, c + rng.randint(-20, 20))) for c in COLOURS[o.colour])
        box = (cx - half, cy - half, cx + half, cy + half)
        if o.shape == "circle":
            draw.ellipse(box, fill=colour)
        elif o.shape == "square":
            draw.rectangle(box, fill=colour)
        elif o.shape == "triangle":
            draw.polygon([(cx, cy - half), (cx - half, cy + half), (cx + half, cy + half)], fill=colour)
        else:  # diamond
            draw.polygon([(cx, cy - half), (cx + half, cy), (cx, cy + half), (cx - half, cy)], fill=colour)
    return img


# ---------------------------------------------------------------- text about a scene


def listing(scene: Scene, rng: random.Random | None = None) -> str:
    """The scene written in words, as the text-only LLM reads it in place of an image."""
    objects = list(scene.objects)
    if rng is not None:
        rng.shuffle(objects)
    return " , ".join(f"{o.size} {o.colour} {o.shape} {o.position}" for o in objects)


def _plural(shape: str, n: int) -> str:
    return shape if n == 1 else shape + "s"


def _count_phrase(n: int, noun: str = "object") -> str:
    return f"{NUMBER_WORDS[n]} {_plural(noun, n)}"


def caption(scene: Scene, rng: random.Random) -> str:
    """A short alt-text style caption (stage-1 data), like CC / SBU captions: terse, varied."""
    names = [f"{o.colour} {o.shape}" if rng.random() < 0.85 else o.shape for o in scene.objects]
    rng.shuffle(names)
    joined = names[0] if len(names) == 1 else " , ".join(names[:-1]) + " and " + names[-1]
    style = rng.randrange(4)
    if style == 0:
        return f"a {joined}" if len(names) == 1 else joined
    if style == 1:
        return f"{_count_phrase(len(names), 'shape')} : {joined}"
    if style == 2:
        return f"{joined} on a gray background"
    return f"simple shapes , {joined}"


def description(scene: Scene) -> str:
    """A detailed, multi-sentence description (stage-2 data): every object, where it is, a relation."""
    objs = scene.objects
    parts = [f"The image shows {_count_phrase(len(objs))} on a gray background."]
    for o in objs:
        parts.append(f"There is a {o.size} {o.colour} {o.shape} in the {o.position}.")
    unique = [o for o in objs if scene.count(o.shape, o.colour) == 1]
    if len(unique) >= 2:
        a, b = unique[0], unique[-1]
        if a.col != b.col:
            left, right = (a, b) if a.col < b.col else (b, a)
            parts.append(f"The {left.name} is to the left of the {right.name}.")
        else:
            parts.append(f"The {a.name} is above the {b.name}.")
    return " ".join(parts)


@dataclass(frozen=True)
class QA:
    kind: str  # colour | shape | count | presence | position | relation
    question: str
    answer: str


def questions(scene: Scene, rng: random.Random) -> list[QA]:
    """Unambiguous questions with their exact answers; presence questions are balanced yes / no."""
    objs = scene.objects
    out: list[QA] = []
    for o in objs:
        if scene.count(shape=o.shape) == 1:
            out.append(QA("colour", f"What colour is the {o.shape}?", o.colour))
        if scene.count(colour=o.colour) == 1:
            out.append(QA("shape", f"What shape is the {o.colour} object?", o.shape))
        if scene.count(o.shape, o.colour) == 1:
            out.append(QA("position", f"Where is the {o.name}?", o.position))
    out.append(QA("count", "How many objects are there?", NUMBER_WORDS[len(objs)]))
    shape = rng.choice(SHAPES)
    out.append(QA("count", f"How many {shape}s are there?", NUMBER_WORDS[scene.count(shape=shape)]))
    present = rng.choice(objs)
    out.append(QA("presence", f"Is there a {present.name}?", "yes"))
    absent = [(c, s) for c in COLOURS for s in SHAPES if not scene.has(c, s)]
    near_miss = [(c, s) for c, s in absent if scene.count(shape=s) or scene.count(colour=c)]
    c, s = rng.choice(near_miss if near_miss and rng.random() < 0.5 else absent)
    out.append(QA("presence", f"Is there a {c} {s}?", "no"))
    unique = [o for o in objs if scene.count(o.shape, o.colour) == 1]
    if len(unique) >= 2:
        a, b = rng.sample(unique, 2)
        if a.col != b.col:
            out.append(
                QA("relation", f"Is the {a.name} to the left of the {b.name}?", "yes" if a.col < b.col else "no")
            )
        if a.row != b.row:
            out.append(QA("relation", f"Is the {a.name} above the {b.name}?", "yes" if a.row < b.row else "no"))
    return out


_C, _S, _P = "|".join(COLOURS), "|".join(SHAPES), "|".join(POSITIONS)
SENTENCE_FORMS = {  # the sentences `description` writes, as patterns (their inverse)
    "count": re.compile(rf"^The image shows ({'|'.join(NUMBER_WORDS)}) objects? on a gray background\.$"),
    "object": re.compile(rf"^There is an? (small|large) ({_C}) ({_S}) in the ({_P})\.$"),
    "relation": re.compile(rf"^The ({_C}) ({_S}) is (to the left of|above) the ({_C}) ({_S})\.$"),
}


def sentences(text: str) -> list[str]:
    """Sentences split after . ! ? (punctuation kept); a trailing fragment is one too."""
    return [s.strip() for s in re.split(r"(?<=[.!?])\s+", text.strip()) if s.strip()]


def parse_sentence(sentence: str) -> tuple[str, re.Match] | None:
    """(form, match) for a sentence `description` could have written, else None (a fragment,
    a broken sentence, anything else)."""
    for form, pattern in SENTENCE_FORMS.items():
        if m := pattern.match(sentence.strip()):
            return form, m
    return None


def mentioned_objects(text: str) -> list[tuple[str | None, str]]:
    """Objects a text mentions, as (colour or None, shape), for CHAIR-style hallucination checks."""
    words = text.lower().replace(".", " ").replace(",", " ").replace("?", " ").split()
    found = []
    for i, w in enumerate(words):
        shape = w[:-1] if w.endswith("s") and w[:-1] in SHAPES else w
        if shape in SHAPES:
            colour = next((p for p in words[max(0, i - 2) : i] if p in COLOURS), None)
            found.append((colour, shape))
    return found


def split_seeds(split: str, n: int) -> range:
    """Disjoint seed ranges so held-out scenes are never trained on."""
    offsets = {"pretrain": 0, "train": 10_000_000, "curated": 15_000_000, "val": 20_000_000, "test": 30_000_000}
    if split not in offsets:
        raise ValueError(f"unknown toy split {split!r}; known: {sorted(offsets)}")
    return range(offsets[split], offsets[split] + n)
