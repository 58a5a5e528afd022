"""lmms-eval adapter: `lmms-eval --model mmalign --model_args pretrained=DIR --tasks mme,pope,...`.

lmms-eval finds external models through the `lmms_eval.models` entry-point group (declared in
our pyproject.toml; `model_manifest` below returns the `ModelManifest`), and older releases
through `@register_model`, applied here when lmms-eval is importable. The class is an lmms-eval
"simple" model: each request carries the task's prompt text (with `<image>` placeholders) and a
`doc_to_visual` callable. Answers come from `mmalign.evaluate.runner.generate`, the same batched
greedy path as `mmalign eval`.

lmms-eval needs torchvision and other heavy packages that do not install beside every torch, so
it is an optional extra, installed with the user's torch pinned (docs/eval.md); without it this
module still imports (the base class falls back to a plain one) so the request logic is testable.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch

try:  # pragma: no cover - depends on the optional extra
    from lmms_eval.api.model import lmms as _LMMSBase
except ImportError:  # the adapter's logic works without it; lmms-eval itself is what needs it

    class _LMMSBase:  # type: ignore[no-redef]
        is_simple = True

        def __init__(self) -> None:
            self.task_dict: dict = {}
            self._rank, self._world_size = 0, 1


log = logging.getLogger(__name__)
MODEL_ID = "mmalign"
CLASS_PATH = "mmalign.evaluate.lmms_adapter.MMAlignLMMS"


def model_manifest():
    """Entry point `lmms_eval.models: mmalign` (lmms-eval's model registry v2)."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_ID, simple_class_path=CLASS_PATH)


def _as_bool(value: Any) -> bool:
    return value if isinstance(value, bool) else str(value).lower() in ("1", "true", "yes")


class MMAlignLMMS(_LMMSBase):
    """An mmalign checkpoint (exported folder or hub id) as an lmms-eval model."""

    is_simple = True

    def __init__(
        self,
        pretrained: str | None = None,
        device: str = "cpu",
        dtype: str | None = None,
        batch_size: int | str = 16,
        template: str | None = None,
        attn_implementation: str | None = None,
        model: Any = None,
        tokenizer: Any = None,
        max_batch_size: Any = None,  # lmms-eval's --max_batch_size (for batch_size=auto), unused here
        **kwargs: Any,
    ) -> None:
        """`model_args` arrive as strings (`pretrained=DIR,device=cuda,dtype=bfloat16`); a built
        `model` + `tokenizer` (+ `template`) may be passed instead of `pretrained`."""
        super().__init__()
        if kwargs:
            log.warning("mmalign lmms-eval model: ignoring unknown model_args %s", sorted(kwargs))
        try:
            self.batch_size = int(batch_size)
        except ValueError:
            raise ValueError(f"mmalign lmms-eval model needs a number for batch_size, got {batch_size!r}") from None
        from mmalign.model import LoadedModel

        if model is None:
            if pretrained is None:
                raise ValueError("mmalign lmms-eval model needs pretrained=FOLDER_OR_HUB_ID")
            loaded = LoadedModel.load(
                pretrained, template=template, dtype=dtype, device=device, attn_implementation=attn_implementation
            )  # the folder's recorded template and eval transform
            model, tokenizer, template = loaded.model, loaded.tokenizer, loaded.template
        elif template is None:
            raise ValueError("pass template=... with a built model")
        else:
            loaded = LoadedModel.of(model, tokenizer, template, name=pretrained or "")
        self.loaded = loaded
        self.model, self.tokenizer, self.template = model, tokenizer, template
        self.image_transform = self.loaded.image_transform
        self.pretrained = pretrained

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> MMAlignLMMS:
        """How lmms-eval builds the model. It always adds its own `--batch_size` (and `--device`,
        `--max_batch_size` when set) to the `--model_args`; the base class passes both and fails
        with "got multiple values for keyword argument" when a key is in both. Here a key given
        in `--model_args` wins."""
        from lmms_eval.utils import simple_parse_args_string

        args = simple_parse_args_string(arg_string)
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None and k not in args}
        return cls(**args, **extra)

    # ------------------------------------------------------------------ requests

    def _doc(self, task: str, split: str, doc_id: int) -> Any:
        return self.task_dict[task][split][doc_id]

    def _visual(self, doc_to_visual: Callable | None, task: str, split: str, doc_id: int):
        """The first image of the request (our models take one), or None for text-only."""
        if doc_to_visual is None:
            return None
        visuals = doc_to_visual(self._doc(task, split, doc_id)) or []
        images = [v for v in visuals if hasattr(v, "convert")]
        return images[0].convert("RGB") if images else None

    @staticmethod
    def _question(context: str) -> str:
        """lmms-eval's prompt text without its image placeholders (our template places the image)."""
        return context.replace("<image>", " ").strip()

    def generate_until(self, requests: list) -> list[str]:
        """Greedy answers, batched over requests that share generation settings, cut at `until`."""
        from mmalign.evaluate.runner import generate

        out: list[str | None] = [None] * len(requests)
        groups: dict[tuple, list[int]] = {}
        for i, req in enumerate(requests):
            context, gen_kwargs, doc_to_visual, doc_id, task, split = req.args
            if _as_bool(gen_kwargs.get("do_sample", False)) and float(gen_kwargs.get("temperature", 0) or 0) > 0:
                raise ValueError(f"request {i} ({task}) asks for sampling; mmalign's lmms-eval model is greedy only")
            until = gen_kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            key = (int(gen_kwargs.get("max_new_tokens", 128)), tuple(until))
            groups.setdefault(key, []).append(i)
        for (max_new, until), idx in groups.items():
            items = []
            for i in idx:
                context, _, doc_to_visual, doc_id, task, split = requests[i].args
                items.append((self._visual(doc_to_visual, task, split, doc_id), self._question(context)))
            answers = generate(self.loaded, items, batch_size=self.batch_size, max_new_tokens=max_new)
            for i, text in zip(idx, answers):
                for stop in until:
                    if stop and stop in text:
                        text = text.split(stop)[0]
                out[i] = text.strip()
        return [t if t is not None else "" for t in out]

    @torch.no_grad()
    def loglikelihood(self, requests: list) -> list[tuple[float, bool]]:
        """(loss, is_greedy) per request: the mean negative log-probability of the continuation's
        tokens after the chat prompt, and whether greedy decoding gives exactly them.

        A loss, not a log-probability: lmms-eval's multiple choice picks the *lowest* value
        (`np.argmin` in `ConfigurableTask.process_results`), as its own models (llava, llava_hf)
        return the mean token loss. lmms-eval puts its `target_delimiter` (" ") before each
        choice; in a chat prompt the template's own answer prefix is that delimiter, so the
        continuation is scored as an answer is trained: answer prefix + continuation without
        its leading whitespace (vicuna_v1: " A", not "  A")."""
        return [self._score(req) for req in requests]

    def _score(self, req: Any) -> tuple[float, bool]:
        from mmalign.model import num_image_tokens
        from mmalign.prompts import build_generation_prompt, get_template, training_system, user_with_image

        if len(req.args) == 2:  # lmms-eval's unconditional requests (acc_mutual_info): ("", choice)
            (context, continuation), image = req.args, None
        else:
            context, target, doc_to_visual, doc_id, task, split = req.args
            continuation = target(self._doc(task, split, doc_id)) if callable(target) else target
            image = self._visual(doc_to_visual, task, split, doc_id)
        if isinstance(continuation, list):
            continuation = continuation[0]
        q = self._question(context)
        turns = [{"role": "user", "content": user_with_image(self.template, q) if image is not None else q}]
        n_img = num_image_tokens(self.model.config)
        prompt = build_generation_prompt(
            self.tokenizer, self.template, turns, n_img, system=training_system(self.template)
        )
        answer = get_template(self.template).answer_prefix + str(continuation).lstrip()
        cont = self.tokenizer.encode(answer, add_special_tokens=False)
        if not cont:
            return 0.0, True
        param = next(self.model.parameters())
        ids = torch.tensor([prompt + cont], device=param.device)  # [1, T]
        inputs: dict[str, Any] = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        if image is not None:
            inputs["pixel_values"] = self.image_transform(image).unsqueeze(0).to(param.device, param.dtype)
        logits = self.model(**inputs).logits[0, len(prompt) - 1 : -1].float()  # [len(cont), V]
        target_ids = torch.tensor(cont, device=param.device)
        loss = torch.nn.functional.cross_entropy(logits, target_ids)  # mean over the continuation's tokens
        return loss.item(), bool((logits.argmax(-1) == target_ids).all())

    def generate_until_multi_round(self, requests: list) -> list[str]:
        raise NotImplementedError("multi-round generation is not supported by the mmalign lmms-eval model")


try:  # pragma: no cover - older lmms-eval releases register through the decorator
    from lmms_eval.api.registry import register_model

    MMAlignLMMS = register_model(MODEL_ID)(MMAlignLMMS)
except ImportError:  # not installed
    pass
