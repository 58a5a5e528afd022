"""The chat engine behind every front end (terminal chat, web demo): one conversation about
one or more images, with the model's KV cache kept between turns.

The session keeps every token id of the conversation exactly as the model saw or produced it,
and the cache of those ids. Turn N encodes only the new user message (appended after the ids
the model produced for the previous answer) and generates from the cache: the images and the
earlier turns are not recomputed, and answers are the same greedy tokens as re-encoding the
whole id sequence (`kv_reuse=False`, the baseline) gives.

Beam search cannot continue a batch-1 cache in transformers' generate: it re-encodes the whole
conversation (images included) and drops the cache, which the next turn builds again.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import torch
from PIL import Image
from transformers import DynamicCache, StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

from mmalign.chat.generate import (
    CACHE_KWARG,
    answer_ids,
    cut_at_stop,
    generation_kwargs,
    model_generate,
    stop_prefix_len,
)
from mmalign.model.architectures import check_image_tokens
from mmalign.model.bundle import LoadedModel
from mmalign.prompts import encode_user_turn, get_template, user_with_image

_DEFAULT: Any = object()


class _UntilSet(StoppingCriteria):
    """Stops every row once `event` is set (the streamed answer was abandoned)."""

    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids: torch.LongTensor, scores: Any, **kwargs: Any) -> torch.BoolTensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


class ChatSession:
    def __init__(
        self,
        loaded: LoadedModel,
        *,
        system: str | None = _DEFAULT,
        max_context: int = 2000,
        kv_reuse: bool = True,
    ) -> None:
        self.loaded = loaded
        self.model, self.tokenizer, self.template = loaded.model, loaded.tokenizer, get_template(loaded.template)
        self.image_transform = loaded.image_transform
        self.system = self.template.system if system is _DEFAULT else system
        self.max_context = max_context  # MiniGPT-4's demo keeps the last 2000 tokens of context
        self.kv_reuse = kv_reuse
        self.reset()

    def reset(self) -> None:
        self.turns: list[dict[str, str]] = []
        self.image: Image.Image | None = None  # the latest image
        self.images: list[Image.Image] = []  # every image of the conversation, in prompt order
        self.ids: list[int] = []  # the conversation's token ids, as the model saw / produced them
        self._marked = 0  # images whose marker is already in a user turn
        self._cache: DynamicCache | None = None
        self._cached_images = 0  # images whose features are in the cache

    def set_image(self, image: Image.Image) -> None:
        """A new image starts a new conversation about it."""
        self.reset()
        self.add_image(image)

    def add_image(self, image: Image.Image) -> None:
        """Show another image in the same conversation: the next user message carries it."""
        self.image = image.convert("RGB")
        self.images.append(self.image)

    def ask(self, text: str, **gen: Any) -> Iterator[str]:
        """Stream the answer to `text` piece by piece; the full answer joins the history."""
        if not text.strip():
            raise ValueError("empty message")
        content = text
        for _ in self.images[self._marked :]:
            content = user_with_image(self.template, content)
        n_img = self.loaded.num_image_tokens
        new = encode_user_turn(self.tokenizer, self.template, content, n_img, first=not self.ids, system=self.system)
        ids = self.ids + new
        kwargs = generation_kwargs(self.tokenizer, self.template, **gen)
        if len(ids) + kwargs["max_new_tokens"] > self.max_context:  # room for the answer too, as MiniGPT-4's demo
            raise ValueError(
                f"conversation is {len(ids)} tokens + max_new_tokens={kwargs['max_new_tokens']}, over "
                f"max_context={self.max_context}: /reset"
            )
        check_image_tokens(torch.tensor(ids), len(self.images), self.model.config)
        self.turns.append({"role": "user", "content": content})
        answer, shown, out = "", 0, []
        pieces = self._generate(ids, kwargs, out)
        try:
            for piece in pieces:
                answer += piece
                visible, stopped = cut_at_stop(answer, self.template.stop)
                hold = 0 if stopped else stop_prefix_len(visible, self.template.stop)
                if len(visible) - hold > shown:
                    yield visible[shown : len(visible) - hold]
                    shown = len(visible) - hold
                if stopped:
                    break
        except BaseException:
            self.turns.pop()  # no answer: the conversation stays as it was
            self._cache, self._cached_images = None, 0  # it may hold half a turn
            raise
        finally:
            pieces.close()  # waits for the generating thread
        visible, _ = cut_at_stop(answer, self.template.stop)
        if len(visible) > shown:
            yield visible[shown:]
        self._settle(ids, out[0][len(ids) :] if out else [], visible)
        self._marked = len(self.images)
        self._cached_images = len(self.images) if self._cache is not None else 0
        self.turns.append({"role": "assistant", "content": visible.strip()})

    def _generate(self, ids: list[int], kwargs: dict[str, Any], out: list[list[int]]) -> Iterator[str]:
        """Decoded text as it is generated; the output ids land in `out`. An error in the
        generating thread is raised here (else the streamer would wait for text forever)."""
        device = self.loaded.device
        input_ids = torch.tensor([ids], device=device)
        inputs: dict[str, Any] = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
        beams = kwargs.get("num_beams", 1) > 1
        if beams or not self.kv_reuse:
            self._cache, self._cached_images = None, 0  # re-encode everything (see module doc)
        else:
            self._cache = (
                self._cache if self._cache is not None else DynamicCache(config=self.model.config.get_text_config())
            )
            inputs[CACHE_KWARG] = self._cache
        new_images = self.images[self._cached_images :]
        if new_images:
            inputs["pixel_values"] = self.loaded.pixel_values(new_images)
        if beams:  # transformers cannot stream beam search: the answer comes as one piece
            seq = model_generate(self.model, **inputs, **kwargs)[0].tolist()
            out.append(seq)
            yield self.tokenizer.decode(seq[len(ids) :], skip_special_tokens=True)
            return
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        errors: list[BaseException] = []
        abandoned = threading.Event()  # set when the consumer stops reading: generate ends at the next step
        criteria = StoppingCriteriaList([*kwargs.pop("stopping_criteria", []), _UntilSet(abandoned)])

        def run() -> None:
            try:
                seq = model_generate(self.model, **inputs, **kwargs, streamer=streamer, stopping_criteria=criteria)
                if seq is not None:
                    out.append(seq[0].tolist())
            except BaseException as e:
                errors.append(e)
                streamer.end()

        worker = threading.Thread(target=run, daemon=True)
        worker.start()
        try:
            yield from streamer
        finally:
            abandoned.set()  # a no-op once generate has returned
            worker.join()
        if errors:
            raise errors[0]

    def _settle(self, prompt: list[int], generated: list[int], visible: str) -> None:
        """Keep the generated ids up to the end of the answer's turn end and crop the cache to
        match: the longest prefix of `generated` whose text starts `visible + turn_end` is kept
        as produced; whatever the model did not say (the turn end after EOS or the token budget,
        or the rest of a token that ran past a stop string) is encoded and appended."""
        kept, tail = answer_ids(self.tokenizer, generated, visible + self.template.turn_end)
        self.ids = prompt + kept + tail
        keep = len(kept)
        if self._cache is not None:  # it holds every id fed to the model: all but the last generated
            extra = self._cache.get_seq_length() - (len(prompt) + min(keep, max(len(generated) - 1, 0)))
            if extra > 0:
                self._cache.crop(-extra)
