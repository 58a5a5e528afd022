"""Step 1, describe: a model describes each image with the paper's prompt; an answer under
``min_tokens`` tokens is asked ``Continue`` in the same conversation and the two parts are joined.

Backends: ``LocalDescriber`` (in-process, batched; the Continue turn runs on the first turn's KV
cache, so image and prompt are not encoded again) and ``EndpointDescriber`` (any
OpenAI-compatible chat endpoint that takes image parts, e.g. vLLM serving a LLaVA captioner).
Images are keyed by the sha256 of their bytes: the same picture under two names is described once.
"""

from __future__ import annotations

import hashlib
import io
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from mmalign.curate.config import CurateConfig, DescribeConfig
from mmalign.curate.endpoint import ChatEndpoint, image_part
from mmalign.model.bundle import LoadedModel

log = logging.getLogger(__name__)
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


@dataclass
class Description:
    answer: str  # the first answer
    tokens: int  # its length in tokens (the describing model's, or the endpoint's usage)
    continued: bool = False
    continuation: str = ""  # the answer to "Continue"

    @property
    def text(self) -> str:
        return " ".join(p.strip() for p in (self.answer, self.continuation) if p.strip())

    def fields(self) -> dict[str, Any]:
        return {
            "answer": self.answer,
            "tokens": self.tokens,
            "continued": self.continued,
            "continuation": self.continuation,
            "text": self.text,
        }


# --------------------------------------------------------------------------- the images


def list_images(spec: str | Path) -> list[Path]:
    """A folder (searched recursively), a ``.txt`` file of paths (one a line) or a glob; sorted."""
    spec = Path(spec)
    if spec.is_dir():
        found = [p for p in spec.rglob("*") if p.suffix.lower() in IMAGE_EXTS and p.is_file()]
    elif spec.suffix == ".txt" and spec.is_file():
        lines = [x.strip() for x in spec.read_text().splitlines() if x.strip()]
        found = [Path(x) if Path(x).is_absolute() else spec.parent / x for x in lines]
    else:
        found = [p for p in Path(spec.anchor or ".").glob(str(spec.relative_to(spec.anchor or "."))) if p.is_file()]
    if not found:
        raise ValueError(f"images: nothing found at {str(spec)!r} (a folder, a .txt list of paths or a glob)")
    return sorted(found)


UNREADABLE_IMAGE = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)
"""What PIL raises for a broken, truncated or oversized file: the record is counted and skipped."""


@dataclass
class ImageItem:
    path: Path
    id: str  # sha256 of the file's bytes

    def open(self) -> Image.Image:
        """The decoded image; OSError / ValueError for a corrupt or unreadable file."""
        with Image.open(io.BytesIO(self.path.read_bytes())) as im:
            return im.convert("RGB")


def image_items(paths: Sequence[Path]) -> list[ImageItem]:
    """One item per distinct content (a byte-identical copy is logged and left out); a file that
    cannot be read keeps its path as id, so it is recorded as failed rather than lost."""
    items, seen, copies = [], set(), 0
    for path in paths:
        try:
            key = hashlib.sha256(path.read_bytes()).hexdigest()
        except OSError as e:
            log.warning("%s: cannot read it (%s)", path, e.strerror or e)
            key = f"unreadable:{path}"
        if key in seen:
            copies += 1
            continue
        seen.add(key)
        items.append(ImageItem(path, key))
    if copies:
        log.info("%d byte-identical image copies described once each", copies)
    return items


# --------------------------------------------------------------------------- backends


class LocalDescriber:
    """Batched description with a local model (``generate``'s batching, greedy by default)."""

    def __init__(self, loaded: LoadedModel, cfg: DescribeConfig) -> None:
        from mmalign.prompts import get_template

        self.loaded, self.cfg = loaded, cfg
        self.template = get_template(loaded.template)
        self.gen = {
            "max_new_tokens": cfg.max_new_tokens,
            "num_beams": cfg.num_beams,
            "do_sample": cfg.do_sample,
            "temperature": cfg.temperature,
            "top_p": cfg.top_p,
            "repetition_penalty": cfg.repetition_penalty,
        }

    @property
    def name(self) -> str:
        return self.loaded.name

    def tokens(self, text: str) -> int:
        return len(self.loaded.tokenizer.encode(text.strip(), add_special_tokens=False))

    def describe(self, images: Sequence[Image.Image]) -> list[Description]:
        from mmalign.curate.generation import continue_batch, first_batch

        first = first_batch(self.loaded, images, self.cfg.prompt, self.cfg.system, self.gen)
        out = [Description(row.text, self.tokens(row.text)) for row in first.rows]
        todo = [i for i, d in enumerate(out) if d.tokens < self.cfg.min_tokens]
        if todo:
            texts = continue_batch(self.loaded, first, todo, self.cfg.continue_prompt, self.gen)
            for i, text in zip(todo, texts):
                out[i].continued, out[i].continuation = True, text
        return out


class EndpointDescriber:
    """One conversation per image with an OpenAI-compatible endpoint; ``chat`` retries."""

    def __init__(self, endpoint: ChatEndpoint, cfg: DescribeConfig) -> None:
        self.endpoint, self.cfg = endpoint, cfg

    @property
    def name(self) -> str:
        return self.endpoint.where

    def describe_one(self, image: Image.Image) -> tuple[Description, dict[str, str]]:
        """The description and the raw replies (kept in the record)."""
        system = [{"role": "system", "content": self.cfg.system}] if self.cfg.system else []
        ask = {"role": "user", "content": [{"type": "text", "text": self.cfg.prompt}, image_part(image)]}
        messages = [*system, ask]
        first = self.endpoint.chat(messages, self.cfg.max_new_tokens)
        tokens = first.completion_tokens if first.completion_tokens is not None else len(first.text.split())
        desc, raw = Description(first.text, tokens), {"answer": first.raw}
        if tokens < self.cfg.min_tokens:
            messages += [
                {"role": "assistant", "content": first.text},
                {"role": "user", "content": self.cfg.continue_prompt},
            ]
            more = self.endpoint.chat(messages, self.cfg.max_new_tokens)
            desc.continued, desc.continuation, raw["continuation"] = True, more.text, more.raw
        return desc, raw


def describer_for(cfg: CurateConfig, api_key: str | None = None) -> LocalDescriber | EndpointDescriber:
    d = cfg.describe
    if d.backend == "openai":
        return EndpointDescriber(ChatEndpoint(d.endpoint, api_key), d)
    if not d.model:
        raise ValueError("describe.model: the local backend needs a model folder (e.g. the exported stage-1 model)")
    return LocalDescriber(LoadedModel.load(d.model, template=d.template, dtype=d.dtype, device=d.device), d)


__all__ = [
    "Description",
    "EndpointDescriber",
    "ImageItem",
    "LocalDescriber",
    "describer_for",
    "image_items",
    "list_images",
]
