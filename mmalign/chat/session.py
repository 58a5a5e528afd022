"""A multi-turn chat with one image: the engine behind the terminal chat.

The session owns the turns and the image; each answer is generated from the template's prompt
for the whole conversation and streamed token by token, stopping at the template's turn end.
"""

from __future__ import annotations

import threading
from typing import Any, Callable, Iterator

import torch
from PIL import Image
from transformers import TextIteratorStreamer

from mmalign.chat.generate import generation_kwargs
from mmalign.model import check_image_tokens, num_image_tokens
from mmalign.prompts import build_generation_prompt, get_template, user_with_image

_DEFAULT: Any = object()


class ChatSession:
    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        template: str,
        image_transform: Callable[[Image.Image], torch.Tensor],
        *,
        system: str | None = _DEFAULT,
        max_context: int = 2000,
    ) -> None:
        self.model, self.tokenizer, self.template = model, tokenizer, get_template(template)
        self.image_transform = image_transform
        self.system = self.template.system if system is _DEFAULT else system
        self.max_context = max_context  # MiniGPT-4's demo keeps the last 2000 tokens of context
        self.reset()

    def reset(self) -> None:
        self.turns: list[dict[str, str]] = []
        self.image: Image.Image | None = None

    def set_image(self, image: Image.Image) -> None:
        """A new image starts a new conversation about it."""
        self.reset()
        self.image = image.convert("RGB")

    def _inputs(self) -> dict[str, torch.Tensor]:
        n_img = num_image_tokens(self.model.config)
        ids = build_generation_prompt(self.tokenizer, self.template, self.turns, n_img, system=self.system)
        if len(ids) > self.max_context:
            raise ValueError(f"conversation is {len(ids)} tokens, over max_context={self.max_context}: /reset")
        device = next(self.model.parameters()).device
        input_ids = torch.tensor([ids], device=device)
        inputs = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
        n_images = 0
        if self.image is not None:
            dtype = next(self.model.parameters()).dtype
            inputs["pixel_values"] = self.image_transform(self.image)[None].to(device, dtype)
            n_images = 1
        check_image_tokens(input_ids, n_images, self.model.config)
        return inputs

    def ask(self, text: str, **gen: Any) -> Iterator[str]:
        """Stream the answer to `text` piece by piece; the full answer joins the history."""
        if not text.strip():
            raise ValueError("empty message")
        content = user_with_image(self.template, text) if self.image is not None and not self.turns else text
        self.turns.append({"role": "user", "content": content})
        try:
            inputs = self._inputs()
        except ValueError:
            self.turns.pop()
            raise
        kwargs = generation_kwargs(self.tokenizer, self.template, **gen)
        answer, shown = "", 0
        pieces = self._generate(inputs, kwargs)
        try:
            for piece in pieces:
                answer += piece
                visible, stopped = _cut_at_stop(answer, self.template.stop)
                hold = 0 if stopped else _stop_prefix_len(visible, self.template.stop)
                if len(visible) - hold > shown:
                    yield visible[shown : len(visible) - hold]
                    shown = len(visible) - hold
                if stopped:
                    break
        except Exception:
            self.turns.pop()  # no answer: the conversation stays as it was
            raise
        finally:
            pieces.close()  # waits for the generating thread
        visible, _ = _cut_at_stop(answer, self.template.stop)
        if len(visible) > shown:
            yield visible[shown:]
        self.turns.append({"role": "assistant", "content": visible.strip()})

    def _generate(self, inputs: dict[str, torch.Tensor], kwargs: dict[str, Any]) -> Iterator[str]:
        """Decoded text as it is generated. An error in the generating thread is raised here
        (else the streamer would wait for text forever); beam search, which transformers cannot
        stream, comes as one piece."""
        if kwargs.get("num_beams", 1) > 1:
            out = self.model.generate(**inputs, **kwargs)
            yield self.tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
            return
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        errors: list[BaseException] = []

        def run() -> None:
            try:
                self.model.generate(**inputs, **kwargs, streamer=streamer)
            except BaseException as e:
                errors.append(e)
                streamer.end()

        worker = threading.Thread(target=run, daemon=True)
        worker.start()
        try:
            yield from streamer
        finally:
            worker.join()
        if errors:
            raise errors[0]


def _cut_at_stop(text: str, stops: tuple[str, ...]) -> tuple[str, bool]:
    cuts = [text.find(s) for s in stops if s in text]
    return (text[: min(cuts)], True) if cuts else (text, False)


def _stop_prefix_len(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest tail of `text` that could still grow into a stop string."""
    return max((k for s in stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
