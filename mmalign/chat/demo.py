"""The web demo (`mmalign demo`): MiniGPT-4's Gradio page on any model mmalign loads.

Upload an image, chat about it, tune beams and temperature. One model is shared by every
browser; each browser session has its own `ChatSession` (its image, its turns), and a lock lets
one answer be generated at a time. Defaults and slider ranges are MiniGPT-4's demo: sampling
with top_p 0.9, temperature 1.0, 1 beam, 300 new tokens, beams 1-10, temperature 0.1-2.0.
"""

from __future__ import annotations

import logging
import queue
import tempfile
import threading
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image, ImageOps

try:
    import gradio as gr
except ModuleNotFoundError as e:  # an extra: say which
    if e.name != "gradio":
        raise
    raise ModuleNotFoundError("the web demo needs gradio: pip install 'mmalign[demo]'") from e

from mmalign.chat.session import ChatSession
from mmalign.model.bundle import LoadedModel

log = logging.getLogger(__name__)

TOY_EXPORT = Path("runs/toy/model-stage2")  # where `mmalign toy run` exports its stage-2 model
TOY_QUESTIONS = ("Describe this image in detail.", "How many objects are there?", "What color is the circle?")
MAX_NEW_TOKENS, TOP_P = 300, 0.9
# small images (the toy world's are 48 px) fill the upload box, pixels kept sharp
CSS = "#image img {width: 100%; height: 100%; object-fit: contain; image-rendering: pixelated;}"
MAX_VISITORS = 32  # conversations kept, each with its KV cache; the least recently active one goes first
_DONE = object()


@dataclass
class DemoModel:
    """What the page serves: a loaded model, and what to offer as examples."""

    loaded: LoadedModel
    note: str = ""  # shown on the page, e.g. "the projection is untrained"
    examples: list[str] = field(default_factory=list)  # image files offered under the upload box


def load_demo_model(
    path: str | None,
    *,
    template: str | None = None,
    dtype: str = "float32",
    device: str = "cpu",
    example_dir: Path | None = None,
) -> DemoModel:
    """The model behind `--model` (a folder or hub id). Without one, the toy default: the stage-2
    model `mmalign toy run` exported, else `toy-minigpt4` built from the shipped backbones with
    an untrained projection (it runs, but its answers do not reflect the image). The toy default comes
    with a few rendered toy scenes as examples."""
    from mmalign.model import LoadedModel
    from mmalign.model.bundle import torch_dtype

    torch_dtype(dtype)  # a bad --dtype fails before anything loads
    if path is None and not TOY_EXPORT.is_dir():
        loaded, note = _untrained_toy(template, dtype, device), UNTRAINED_NOTE
        log.warning(note)
    else:
        loaded, note = LoadedModel.load(path or TOY_EXPORT, template=template, dtype=dtype, device=device), ""
    examples = []
    if path is None:
        examples = toy_examples(example_dir or Path(tempfile.gettempdir()) / "mmalign_demo_examples")
    return DemoModel(loaded, note, examples)


UNTRAINED_NOTE = (
    f"No --model given and no {TOY_EXPORT}: serving `toy-minigpt4` built from the shipped toy "
    "backbones with an UNTRAINED projection, so its answers do not reflect the image. "
    "Run `mmalign toy run` (about 10 min on 2 CPU cores) to train one."
)


def _untrained_toy(template: str | None, dtype: str, device: str) -> LoadedModel:
    from mmalign.model import build_model
    from mmalign.model.bundle import torch_dtype
    from mmalign.recipes import get_recipe

    recipe = get_recipe("toy-minigpt4")
    model, tokenizer = build_model(recipe.spec, dtype=torch_dtype(dtype), device=device)
    transform = recipe.images_for("stage2").eval  # what the toy stage-2 export records
    return LoadedModel.of(model, tokenizer, template or recipe.template, name=recipe.name, image_transform=transform)


def toy_examples(folder: Path, seeds: tuple[int, ...] = (0, 1, 2, 3)) -> list[str]:
    """Held-out toy scenes rendered as PNG files (Gradio's examples are files)."""
    from mmalign.data import toyworld as tw

    folder.mkdir(parents=True, exist_ok=True)
    start = tw.split_seeds("test", 1).start
    paths = []
    for s in seeds:
        path = folder / f"toy_scene_{start + s}.png"
        if not path.exists():
            tw.render(tw.make_scene(start + s)).save(path)
        paths.append(str(path))
    return paths


class _Answers:
    """Streams answers from sessions that share one model, one answer at a time.

    Generation runs in its own thread holding the lock, so the lock is released when the answer
    is finished even if the browser that asked for it has gone away."""

    def __init__(self) -> None:
        self.lock = threading.Lock()

    def stream(self, session: ChatSession, text: str, gen: dict[str, Any]) -> Iterator[str]:
        pieces: queue.Queue = queue.Queue()

        def work() -> None:
            try:
                with self.lock:
                    for piece in session.ask(text, **gen):
                        pieces.put(piece)
            except BaseException as e:  # noqa: BLE001 - handed to the page below
                pieces.put(e)
            finally:
                pieces.put(_DONE)

        threading.Thread(target=work, daemon=True).start()
        while (item := pieces.get()) is not _DONE:
            if isinstance(item, BaseException):
                raise item
            yield item


@dataclass
class _Visitor:
    """One browser session: its conversation, the uploaded file it is about, and the chat the
    page shows (kept here, so the page always shows the conversation the model has)."""

    chat: ChatSession
    image_path: str | None = None
    history: list[dict[str, str]] = field(default_factory=list)


class _Handlers:
    """The page's event handlers; one shared model, one `_Visitor` per browser session.

    Visitors are kept here by Gradio's session hash, not in a `gr.State`: a State deep-copies its
    value (the model must stay shared) and two events that both find it empty would each create a
    conversation, the later output silently replacing the other. Each question carries the page's
    image, because it can reach the server before the image's own event does."""

    def __init__(self, dm: DemoModel, max_new_tokens: int):
        self.dm, self.max_new_tokens, self.answers = dm, max_new_tokens, _Answers()
        self.visitors: OrderedDict[str, _Visitor] = OrderedDict()
        self._visitors_lock = threading.Lock()

    def visitor(self, request: gr.Request) -> _Visitor:
        if request.session_hash is None:  # a direct API call, outside any browser session
            return _Visitor(ChatSession(self.dm.loaded))
        with self._visitors_lock:
            if request.session_hash not in self.visitors:
                self.visitors[request.session_hash] = _Visitor(ChatSession(self.dm.loaded))
                while len(self.visitors) > MAX_VISITORS:
                    self.visitors.popitem(last=False)
            self.visitors.move_to_end(request.session_hash)
            return self.visitors[request.session_hash]

    def on_leave(self, request: gr.Request) -> None:
        with self._visitors_lock:
            self.visitors.pop(request.session_hash, None)

    def show(self, visitor: _Visitor, image_path: str | None) -> bool:
        """Make the conversation about the page's image; False if it already was."""
        if image_path == visitor.image_path:  # the usual case: no wait for another visitor's answer
            return False
        with self.answers.lock:  # not in the middle of an answer (maybe this visitor's)
            if image_path == visitor.image_path:
                return False
            if image_path is None:
                visitor.chat.reset()
            else:
                with Image.open(image_path) as image:  # as uploaded: upright by its EXIF orientation
                    visitor.chat.set_image(ImageOps.exif_transpose(image))  # starts a new conversation
            visitor.image_path, visitor.history = image_path, []
            return True

    def on_image(self, image_path: str | None, request: gr.Request):
        # a question sent right after the upload may have got here first and shown the image already
        return [] if self.show(self.visitor(request), image_path) else gr.skip()

    def on_ask(
        self, text: str, image_path: str | None, beams: float, temperature: float, sample: bool, request: gr.Request
    ):
        visitor = self.visitor(request)
        if not text.strip():
            yield text, visitor.history
            return
        self.show(visitor, image_path)
        history = [*visitor.history, {"role": "user", "content": text}, {"role": "assistant", "content": ""}]
        visitor.history = history
        yield "", history
        gen = {
            "num_beams": int(beams),
            "do_sample": bool(sample),
            "temperature": float(temperature),
            "top_p": TOP_P,
            "max_new_tokens": self.max_new_tokens,
        }
        try:
            for piece in self.answers.stream(visitor.chat, text, gen):
                history[-1]["content"] += piece
                yield "", history
        except ValueError as e:  # e.g. the conversation outgrew the context: say so on the page
            raise gr.Error(f"{e}. Press 'Clear / restart'.") from None

    def on_clear(self, request: gr.Request):
        visitor = self.visitor(request)
        with self.answers.lock:
            visitor.chat.reset()
            visitor.image_path, visitor.history = None, []
        return None, [], ""

    def on_clear_chat(self, request: gr.Request) -> None:  # the chat's own bin: a new conversation, same image
        visitor = self.visitor(request)
        with self.answers.lock:
            if visitor.chat.image is None:
                visitor.chat.reset()
            else:
                visitor.chat.set_image(visitor.chat.image)
            visitor.history = []


def build_demo(dm: DemoModel, *, max_new_tokens: int = MAX_NEW_TOKENS) -> Any:
    """The Gradio page for `dm` (call `.launch()` on it, see `launch`)."""
    on = _Handlers(dm, max_new_tokens)
    with gr.Blocks(title="mmalign demo", analytics_enabled=False) as demo:
        ui = _layout(dm)
        ui["image"].change(on.on_image, [ui["image"]], [ui["chatbot"]], queue=False)
        ask = {
            "fn": on.on_ask,
            "inputs": [ui["text"], ui["image"], ui["beams"], ui["temperature"], ui["sample"]],
            "outputs": [ui["text"], ui["chatbot"]],
            "concurrency_id": "answer",
        }
        ui["text"].submit(**ask)
        ui["send"].click(**ask)
        ui["clear"].click(on.on_clear, None, [ui["image"], ui["chatbot"], ui["text"]], queue=False)
        ui["chatbot"].clear(on.on_clear_chat, None, None, queue=False)
        demo.unload(on.on_leave)
    return demo


def _layout(dm: DemoModel) -> dict[str, Any]:
    """MiniGPT-4's page: image, examples and sliders on the left, the chat on the right."""
    loaded = dm.loaded
    gr.Markdown(
        f"## mmalign chat demo\nModel: `{loaded.name}` (template `{loaded.template}`). Upload an image, then ask "
        "about it."
    )
    if dm.note:
        gr.Markdown(f"**Warning:** {dm.note}", elem_id="model-note")
    ui: dict[str, Any] = {}
    with gr.Row():
        with gr.Column(scale=1, min_width=260):
            ui["image"] = gr.Image(type="filepath", image_mode=None, label="Image", height=260, elem_id="image")
            if dm.examples:
                gr.Examples(dm.examples, inputs=ui["image"], label="Toy-world examples")
            ui["clear"] = gr.Button("Clear / restart", elem_id="clear")
            ui["beams"] = gr.Slider(1, 10, value=1, step=1, label="Beam search numbers", elem_id="beams")
            ui["temperature"] = gr.Slider(0.1, 2.0, value=1.0, step=0.1, label="Temperature", elem_id="temperature")
            ui["sample"] = gr.Checkbox(value=True, label="Sampling (off: greedy, deterministic)", elem_id="sample")
        with gr.Column(scale=2):
            ui["chatbot"] = gr.Chatbot(
                label="Chat", height=420, elem_id="chatbot", feedback_options=None, buttons=["copy", "copy_all"]
            )
            with gr.Row():
                ui["text"] = gr.Textbox(
                    show_label=False, placeholder="Ask about the image and press Enter", scale=4, elem_id="question"
                )
                ui["send"] = gr.Button("Send", variant="primary", scale=1, min_width=80, elem_id="send")
            if dm.examples:
                gr.Examples([[q] for q in TOY_QUESTIONS], inputs=ui["text"], label="Questions")
    return ui


def launch(
    dm: DemoModel, *, host: str = "127.0.0.1", port: int | None = None, share: bool = False, block: bool = True
) -> Any:
    """Serve the page; `block=False` returns at once (tests)."""
    demo = build_demo(dm)
    demo.queue(default_concurrency_limit=None)  # the lock serialises generation; the queue need not
    # system fonts only: the page must render without reaching a font CDN (offline machines, CI)
    theme = gr.themes.Default(
        font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"]
    )
    demo.launch(
        server_name=host,
        server_port=port,
        share=share,
        prevent_thread_lock=not block,
        theme=theme,
        css=CSS,
        quiet=not block,
        ssr_mode=False,
    )
    return demo
