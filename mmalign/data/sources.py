"""Caption / conversation datasets read from files.

A bad record (missing or corrupt image, empty caption, conversation without an answer) is
logged with its file and index / id, counted in a ``SkipCounter`` (shared by DataLoader
workers through a small JSONL file) and skipped: one broken file out of a million must never
kill a run, and nothing is dropped silently.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import random
import tempfile
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import torch
from PIL import Image
from torch.utils.data import Dataset

from mmalign import prompts
from mmalign.prompts import IMAGE_TOKEN, Template, get_template, user_with_image

log = logging.getLogger(__name__)

ImageRef = str | Path | Image.Image


@dataclass
class CaptionRecord:
    image: ImageRef
    caption: str
    key: str = ""  # id / "file#index" for messages


@dataclass
class ConversationRecord:
    image: ImageRef | None  # None: text-only sample
    turns: list[dict[str, str]]  # [{"role": "user"|"assistant", "content": str}, ...]
    key: str = ""


Record = CaptionRecord | ConversationRecord


class DataError(ValueError):
    """Data that cannot be trained on at all (a JSON file that does not parse, a top level of
    the wrong kind, no usable record, no shard): named by file (and line and column), so it is
    reported before the model loads instead of as a traceback after it."""


class SampleProblem(Exception):
    """One sample that cannot be used (a corrupt or missing image, a missing caption): counted under
    ``reason`` and skipped. A feature cache records it too, so a cached sample is skipped where
    and as its source sample is."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(reason, detail)
        self.reason, self.detail = reason, detail


class SkipCounter:
    """Counts of skipped records per reason, the first few names per reason, and truncations,
    shared by every process that holds a copy.

    Each event is one JSON line appended to ``path`` (one ``write`` of a short line with
    O_APPEND, so DataLoader workers and threads never interleave), and ``summary`` reads the
    file: counts made in workers are not lost. Without ``path`` a temporary file is used and
    removed when the counter that created it is garbage collected; pass ``path`` to keep the
    full list of skipped names (e.g. ``runs/x/skips.jsonl``).
    """

    def __init__(self, max_examples: int = 5, path: str | Path | None = None, *, quiet: bool = False) -> None:
        self.max_examples = max_examples
        self.quiet = quiet  # count without a log line per event (a dry read, e.g. ``check_data``)
        self.truncations_logged = 0  # per process: the first ``max_examples`` get a warning each
        if path is None:
            fd, name = tempfile.mkstemp(prefix="mmalign-skips-", suffix=".jsonl")
            os.close(fd)
            self.path, self.keep = Path(name), False
            weakref.finalize(self, _remove_if_owner, name, os.getpid())
        else:
            self.path, self.keep = Path(path), True
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.touch()

    def _append(self, event: dict[str, str]) -> None:
        line = (json.dumps(event) + "\n").encode("utf-8")
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line)
        finally:
            os.close(fd)

    def add(self, reason: str, where: str, detail: str = "") -> None:
        if not self.quiet:
            log.warning("skipped %s: %s%s", where, reason, f" ({detail})" if detail else "")
        self._append({"reason": reason, "where": where, "detail": detail})

    def add_truncated(self, where: str, detail: str = "") -> None:
        """A kept sample that lost answer tokens to max_length (not a skip, but named and reported).

        The first ``max_examples`` of each process get a warning each, then one line says the
        rest are only counted: a run with many long samples is not drowned in warnings."""
        self._append({"truncated": where, "detail": detail})
        if self.quiet or self.truncations_logged > self.max_examples:
            return
        self.truncations_logged += 1
        if self.truncations_logged <= self.max_examples:
            log.warning("truncated %s: %s", where, detail or "answer tokens cut at max_length")
        else:
            log.warning("more samples truncated at max_length: counted and named in %s, not logged", self.path)

    def events(self) -> list[dict[str, str]]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text(encoding="utf-8").splitlines() if line.strip()]

    def summary(self) -> dict[str, Any]:
        counts: dict[str, int] = {}
        examples: dict[str, list[str]] = {}
        truncated: list[str] = []
        for e in self.events():
            if "truncated" in e:
                truncated.append(e["truncated"])
                continue
            counts[e["reason"]] = counts.get(e["reason"], 0) + 1
            ex = examples.setdefault(e["reason"], [])
            if len(ex) < self.max_examples:
                ex.append(e["where"])
        out = {
            "total": sum(counts.values()),
            "counts": counts,
            "examples": examples,
            "truncated": len(truncated),
            "truncated_examples": truncated[: self.max_examples],
        }
        if self.keep:
            out["log"] = str(self.path)
        return out

    @property
    def counts(self) -> dict[str, int]:
        return self.summary()["counts"]

    @property
    def examples(self) -> dict[str, list[str]]:
        return self.summary()["examples"]

    @property
    def total(self) -> int:
        return self.summary()["total"]

    def __repr__(self) -> str:
        s = self.summary()
        return f"SkipCounter(total={s['total']}, counts={s['counts']})"


def _remove_if_owner(name: str, owner_pid: int) -> None:
    # forked DataLoader workers inherit this finalizer; only the creating process removes the file
    if os.getpid() == owner_pid:
        Path(name).unlink(missing_ok=True)


def load_json(path: str | Path) -> Any:
    """The parsed file. Every failure is a ``DataError`` naming the file, and for bad syntax or
    bad UTF-8 also the line and column (``json`` itself names neither the file nor, for
    encoding errors, the place)."""
    try:
        raw = Path(path).read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read it ({e.strerror or e})") from None
    try:
        text = raw.decode("utf-8-sig")  # a BOM is tolerated, as by most editors
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        col = e.start - (raw.rfind(b"\n", 0, e.start) + 1) + 1
        raise DataError(f"{path}:{line}:{col}: not UTF-8 text (byte {raw[e.start]:#04x})") from None
    del raw
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}:{e.colno}: invalid JSON: {e.msg}") from None


def read_caption_json(
    path: str | Path,
    image_root: str | Path | None = None,
    *,
    skips: SkipCounter | None = None,
    check_images: bool = False,
) -> list[CaptionRecord]:
    """Image-caption pairs from JSON.

    Layouts: a list of ``{"image": relpath, "caption": str}`` (images under ``image_root``), or
    MiniGPT-4's ``cc_sbu_align/filter_cap.json`` = ``{"annotations": [{"image_id", "caption"}]}``
    with images at ``image_root/image/{image_id}.jpg`` (``image_root`` defaults to the JSON's
    folder). ``check_images`` stats every file now instead of failing lazily at load time.
    """
    path = Path(path)
    root = Path(image_root) if image_root is not None else path.parent
    skips = skips if skips is not None else SkipCounter()
    data = load_json(path)
    if isinstance(data, dict) and "annotations" in data:
        items, img_dir = data["annotations"], (root / "image" if (root / "image").is_dir() else root)
        get_image = lambda a: img_dir / f"{a['image_id']}.jpg"  # noqa: E731
        get_key = lambda a, i: f"{path}#{i} (image_id={a.get('image_id')})"  # noqa: E731
    elif isinstance(data, list):
        items = data
        get_image = lambda a: root / a["image"]  # noqa: E731
        get_key = lambda a, i: f"{path}#{i}"  # noqa: E731
    else:
        raise DataError(f"{path}: expected a JSON list or {{'annotations': [...]}}, got {_kind(data)}")
    if not isinstance(items, list):
        raise DataError(f"{path}: 'annotations' is {_kind(items)}, expected a list of records")
    out: list[CaptionRecord] = []
    for i, a in enumerate(items):
        where = f"{path}#{i}"
        try:
            key = get_key(a, i)
            image = get_image(a)
            caption = a.get("caption")
        except (KeyError, TypeError, AttributeError) as e:
            skips.add("malformed record", where, repr(e))
            continue
        if "caption" not in a:
            skips.add("missing caption", key, f"no 'caption' key in {sorted(a)}")
            continue
        if not isinstance(caption, str):
            skips.add("malformed record", key, f"'caption' is {_kind(caption)}, not a string")
            continue
        if not caption.strip():
            skips.add("empty caption", key)
            continue
        if check_images and not image.is_file():
            skips.add("missing image", key, str(image))
            continue
        out.append(CaptionRecord(image=image, caption=caption.strip(), key=key))
    return out


_JSON_KINDS = {
    dict: "an object",
    list: "a list",
    str: "a string",
    int: "a number",
    float: "a number",
    bool: "a boolean",
}


def _kind(value: Any) -> str:
    """What a JSON value is, in the words of an error message."""
    return "null" if value is None else _JSON_KINDS.get(type(value), type(value).__name__)


_REASONS = {"no answer", "empty answer", "image marker but no image"}
_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


def llava_turns(
    conversations: Sequence[dict[str, Any]], template: str | Template, has_image: bool
) -> list[dict[str, str]]:
    """LLaVA ``conversations`` -> our turns, with the ``<image>`` marker re-placed per template.

    As LLaVA does, the marker is removed from the text and put back in front of its message
    (``<image>\\n...`` for vicuna_v1, ``<Img><ImageHere></Img> ...`` for MiniGPT-4). A leading
    assistant message is dropped and a trailing user one too; ValueError on anything else odd.
    """
    t = get_template(template)
    turns = []
    for c in conversations:
        role = _ROLES.get(str(c.get("from", "")).lower())
        if role is None:
            raise ValueError(f"unknown speaker {c.get('from')!r}")
        value = c.get("value")
        if not isinstance(value, str):
            raise ValueError("message without a string 'value'")
        turns.append({"role": role, "content": value})
    while turns and turns[0]["role"] != "user":
        turns.pop(0)
    if turns and turns[-1]["role"] == "user":
        turns.pop()
    for i, turn in enumerate(turns):
        if turn["role"] != ("user" if i % 2 == 0 else "assistant"):
            raise ValueError("messages do not alternate human / gpt")
        if turn["role"] == "assistant" and IMAGE_TOKEN in turn["content"]:
            raise ValueError("an answer contains the image marker")
    if any(tr["role"] == "assistant" and not tr["content"].strip() for tr in turns):
        raise ValueError("empty answer")
    if not any(tr["role"] == "assistant" for tr in turns):
        raise ValueError("no answer")
    n_markers = sum(tr["content"].count(IMAGE_TOKEN) for tr in turns)
    if not has_image:
        if n_markers:
            raise ValueError("image marker but no image")
        return turns
    if n_markers > 1:
        raise ValueError(f"{n_markers} image markers for one image")
    idx = next((i for i, tr in enumerate(turns) if IMAGE_TOKEN in tr["content"]), 0)
    text = turns[idx]["content"].replace(IMAGE_TOKEN, "")
    turns[idx] = {"role": "user", "content": user_with_image(t, text)}
    return turns


def read_llava_json(
    path: str | Path,
    image_root: str | Path | None = None,
    *,
    template: str | Template = "vicuna_v1",
    skips: SkipCounter | None = None,
    check_images: bool = False,
) -> list[ConversationRecord]:
    """LLaVA / ShareGPT4V conversation JSON: ``[{"id", "image"?, "conversations": [...]}]``.

    Samples without ``image`` are text-only. The template decides where the image marker goes.
    """
    path = Path(path)
    root = Path(image_root) if image_root is not None else path.parent
    skips = skips if skips is not None else SkipCounter()
    data = load_json(path)
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of conversations, got {_kind(data)}")
    out: list[ConversationRecord] = []
    for i, s in enumerate(data):
        where = f"{path}#{i}" + (f" (id={s.get('id')})" if isinstance(s, dict) and "id" in s else "")
        try:
            image = root / s["image"] if s.get("image") else None
            turns = llava_turns(s["conversations"], template, image is not None)
        except ValueError as e:
            known = str(e) in _REASONS
            skips.add(str(e) if known else "bad conversation", where, "" if known else str(e))
            continue
        except (KeyError, TypeError, AttributeError) as e:
            skips.add("malformed record", where, repr(e))
            continue
        if check_images and image is not None and not image.is_file():
            skips.add("missing image", where, str(image))
            continue
        out.append(ConversationRecord(image=image, turns=turns, key=where))
    return out


# ---------------------------------------------------------------------------------------------
# encode functions (record -> ids)


def make_caption_encoder(
    tokenizer: Any,
    num_image_tokens: int,
    *,
    fmt: str = "minigpt4_caption",
    clean: bool | None = None,
    max_length: int | None = None,
) -> Callable[[CaptionRecord], dict[str, Any]]:
    """Stage-1 encode_fn; ``clean`` defaults to True for MiniGPT-4's format."""
    do_clean = (fmt == "minigpt4_caption") if clean is None else clean

    def encode(rec: CaptionRecord) -> dict[str, Any]:
        cap = prompts.clean_caption(rec.caption) if do_clean else rec.caption
        return prompts.encode_caption(tokenizer, cap, num_image_tokens, fmt=fmt, max_length=max_length)

    return encode


def make_conversation_encoder(
    tokenizer: Any,
    template: str | Template,
    num_image_tokens: int,
    *,
    system: str | None | object = prompts._DEFAULT,
    max_length: int | None = None,
    rng: random.Random | None = None,
) -> Callable[[Record], dict[str, Any]]:
    """Chat encode_fn. A CaptionRecord becomes one MiniGPT-4 stage-2 turn: a sampled
    instruction (with the image marker) answered by its caption. ``system`` defaults to the
    recipe's (``prompts.training_system``: LLaVA's for vicuna_v1, none for MiniGPT-4 stage 2)."""
    t = get_template(template)
    if system is prompts._DEFAULT:
        system = prompts.training_system(t)

    def encode(rec: Record) -> dict[str, Any]:
        if isinstance(rec, CaptionRecord):
            turns = [
                {"role": "user", "content": prompts.sample_instruction(rng, t)},
                {"role": "assistant", "content": rec.caption},
            ]
        else:
            turns = rec.turns
        return prompts.encode_conversation(tokenizer, t, turns, num_image_tokens, system=system, max_length=max_length)

    return encode


# ---------------------------------------------------------------------------------------------
# dataset


def load_image(ref: ImageRef | IO[bytes]) -> Image.Image:
    """Open and fully decode an image as RGB (decoding now is what catches truncated files)."""
    if isinstance(ref, Image.Image):
        return ref.convert("RGB")
    with Image.open(ref) as im:
        im.load()
        return im.convert("RGB")


@contextlib.contextmanager
def sample_randomness(seed: int, epoch: int, key: str):
    """Python's and torch's CPU generators seeded from (seed, epoch, sample) while one sample
    is encoded (the drawn instruction, the random crop), then put back as they were.

    A sample's draws then depend on nothing but which sample it is in which epoch: not on the
    DataLoader worker that makes it, their number, or a resume in the middle of an epoch (the
    process-wide state a worker inherits is reseeded by torch per worker and per iterator)."""
    digest = hashlib.sha256(f"{seed}:{epoch}:{key}".encode()).digest()
    sample_seed = int.from_bytes(digest[:8], "little")
    python_state, torch_state = random.getstate(), torch.random.default_generator.get_state()
    random.seed(sample_seed)
    torch.random.default_generator.manual_seed(sample_seed)  # CPU only: manual_seed would seed CUDA too
    try:
        yield
    finally:
        random.setstate(python_state)
        torch.random.default_generator.set_state(torch_state)


def encode_sample(
    rec: Record,
    image: Any,
    encode_fn: Callable[[Any], dict[str, Any]],
    image_transform: Callable[[Image.Image], Any] | None,
    skips: SkipCounter,
    where: str,
    image_key: str = "pixel_values",
    draws: tuple[int, int, str] | None = None,
) -> dict[str, Any] | None:
    """One record with its decoded image (or None) -> a training sample, or None (counted).

    Shared by the map-style dataset and the streams, so both give identical samples. From a
    feature cache ``image`` is the cached features (``image_key="image_features"``, no transform).
    ``draws`` = (seed, epoch, sample key): the random draws come from ``sample_randomness``."""
    if draws is not None:
        with sample_randomness(*draws):
            return encode_sample(rec, image, encode_fn, image_transform, skips, where, image_key)
    try:
        enc = encode_fn(rec)
    except ValueError as e:
        skips.add("encode error", where, str(e))
        return None
    n_images = enc.get("num_images")
    if n_images is not None and n_images != (1 if image is not None else 0):
        skips.add("image / placeholder mismatch", where, f"{n_images} placeholders, image={image is not None}")
        return None
    if enc.get("answer_tokens_cut"):
        skips.add_truncated(where, f"{enc['answer_tokens_cut']} answer token(s) past max_length cut")
    if image is not None and image_transform is not None:
        image = image_transform(image)
    return {"input_ids": enc["input_ids"], "labels": enc["labels"], image_key: image}


def record_length(rec: Record) -> int:
    """Words of text, negative for a text-only record: LLaVA's ``modality_lengths``, cheap enough
    to compute for a million records without tokenising (used by the length-grouped sampler)."""
    if isinstance(rec, CaptionRecord):
        n = len(rec.caption.split())
    else:
        n = sum(len(t["content"].split()) for t in rec.turns)
    n = max(n, 1)
    return n if rec.image is not None else -n


def read_record_image(rec: Record) -> Image.Image | None:
    """The record's decoded image (None for a text-only record); SampleProblem if it cannot be read."""
    if rec.image is None:
        return None
    if not isinstance(rec.image, Image.Image) and not Path(rec.image).is_file():
        raise SampleProblem("missing image", str(rec.image))
    try:
        return load_image(rec.image)
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, struct.error...
        raise SampleProblem("corrupt image", f"{rec.image}: {e!r}") from None


class MultimodalDataset(Dataset):
    """Records -> ``{"input_ids", "labels", "pixel_values"}``; a bad sample gives None.

    ``encode_fn(record) -> dict(input_ids, labels, ...)``; ``image_transform(PIL) -> [3,H,W]``.
    Failures to read an image (missing, corrupt) or to encode (ValueError: no answer, image
    does not fit, ...) are counted in ``skips`` and logged; ``collate`` drops the Nones. Other
    exceptions are bugs and propagate.

    With ``features`` (a ``mmalign.data.features.FeatureLookup``) record i's image is its cached
    frozen features instead (``image_features``; the view of the epoch set by ``set_epoch``).
    """

    def __init__(
        self,
        records: Sequence[Record],
        encode_fn: Callable[[Any], dict[str, Any]],
        image_transform: Callable[[Image.Image], Any],
        *,
        skips: SkipCounter | None = None,
        features: Any = None,
        seed: int = 0,
    ) -> None:
        self.records = records
        self.encode_fn = encode_fn
        self.image_transform = image_transform
        self.skips = skips if skips is not None else SkipCounter()
        self.features = features
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """The epoch whose random draws (instruction, crop; the cached view with ``features``)
        each record gets."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.records)

    @property
    def skipped(self) -> dict[str, Any]:
        """Skips and truncations of every process (DataLoader workers included)."""
        return self.skips.summary()

    @property
    def lengths(self) -> list[int]:
        return [record_length(r) for r in self.records]

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        rec = self.records[index]
        where = rec.key or f"record #{index}"
        try:
            if self.features is None:
                image = read_record_image(rec)
            else:
                image = None if rec.image is None else self.features.get(index, self.epoch)
        except SampleProblem as problem:
            self.skips.add(problem.reason, where, problem.detail)
            return None
        draws = (self.seed, self.epoch, f"#{index}")
        if self.features is None:
            return encode_sample(rec, image, self.encode_fn, self.image_transform, self.skips, where, draws=draws)
        return encode_sample(rec, image, self.encode_fn, None, self.skips, where, "image_features", draws)
