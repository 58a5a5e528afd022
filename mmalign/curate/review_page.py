"""The review page (``mmalign curate review``): Gradio, as the chat demo.

Each browser tab keeps only the id it shows (a ``gr.State``); everything else is read from the
SQLite file at each event, so tabs and reviewers never disagree for longer than the timer's
period. Keys: ``a`` accept, ``r`` reject, ``e`` edit (focus the text), ``Ctrl+Enter`` save the
edit, ``j`` / ``→`` next, ``k`` / ``←`` previous, ``Esc`` leave the text box.
"""

from __future__ import annotations

from typing import Any

from PIL import Image

from mmalign.curate.review import ReviewDB, progress

SHOW = ("pending", "accepted", "edited", "rejected", "all")
CSS = "#review-image img {width: 100%; height: 100%; object-fit: contain; image-rendering: pixelated;}"
KEYS_JS = """
<script>
document.addEventListener('keydown', (e) => {
  const t = e.target;
  const typing = t && (t.tagName === 'TEXTAREA' || t.tagName === 'INPUT' || t.isContentEditable);
  const click = (id) => { const b = document.getElementById(id); if (b) { e.preventDefault(); b.click(); } };
  if ((e.ctrlKey || e.metaKey) && e.key === 'Enter') { click('save-edit'); return; }
  if (typing) { if (e.key === 'Escape') t.blur(); return; }
  if (e.ctrlKey || e.metaKey || e.altKey) return;
  if (e.key === 'e') {
    const box = document.querySelector('#review-text textarea');
    if (box) { e.preventDefault(); box.focus(); }
    return;
  }
  const keys = {a: 'accept', r: 'reject', j: 'next', ArrowRight: 'next', k: 'prev', ArrowLeft: 'prev'};
  if (keys[e.key]) click(keys[e.key]);
});
</script>
"""


class ReviewState:
    """The page's logic, apart from Gradio: which record a view shows and what a decision does."""

    def __init__(self, items: list[dict[str, Any]], db: ReviewDB, reviewer: str | None = None) -> None:
        self.items, self.db, self.reviewer = items, db, reviewer
        self.by_id = {it["id"]: it for it in items}
        self.order = {it["id"]: i for i, it in enumerate(items)}

    def view(self, show: str) -> list[str]:
        decisions = self.db.decisions()
        if show == "all":
            return [it["id"] for it in self.items]
        if show == "pending":
            return [it["id"] for it in self.items if it["id"] not in decisions]
        return [it["id"] for it in self.items if decisions.get(it["id"], {}).get("decision") == show]

    def pick(self, show: str, current: str | None, step: int = 0) -> str | None:
        """The record to show: ``current`` if it is in the view (``step`` moves from it); a
        record that left the view is replaced by the next one after its place."""
        ids = self.view(show)
        if not ids:
            return None
        if current in ids:
            return ids[(ids.index(current) + step) % len(ids)]
        place = self.order.get(current, -1)
        after = [i for i in ids if self.order[i] > place]
        return after[0] if after else ids[0]

    def decide(self, current: str | None, decision: str, text: str) -> None:
        if current is None:
            return
        original = self.by_id[current]["text"]
        if decision in ("accepted", "edited"):  # what is accepted is the text box as it stands
            decision = "accepted" if text.strip() == original.strip() else "edited"
        self.db.decide(current, decision, text.strip() if decision == "edited" else original, self.reviewer)

    def progress_line(self) -> str:
        p = progress(self.items, self.db.decisions())
        return (
            f"**Reviewed {p['reviewed']} / {p['total']}, left {p['left']}** (accepted {p['accepted']}, "
            f"edited {p['edited']}, rejected {p['rejected']})"
        )

    def shown(self, current: str | None) -> tuple[Any, str, str, str]:
        """(image, text, record line, audit) of a record."""
        if current is None:
            return None, "", "Nothing to review in this view.", ""
        it = self.by_id[current]
        d = self.db.decisions().get(current)
        status = f"**{d['decision']}** by {d['reviewer']}" if d else "**pending**"
        line = f"`{current[:16]}` · {it['image']} · {status}"
        text = d["text"] if d else it["text"]
        audit = (
            f"**Prompt:** {it['prompt']}\n\n**Model's description:** {it['answer']}\n\n"
            f"**Continuation:** {it['continuation'] or '(not asked)'}\n\n**Fixed by:** {it['fix_model']}"
        )
        try:
            with Image.open(it["image"]) as im:
                image = im.convert("RGB")
        except OSError:
            image = None
        return image, text, line, audit


def build_review_page(state: ReviewState, refresh_s: float = 2.0) -> Any:
    import gradio as gr

    with gr.Blocks(title="mmalign review", analytics_enabled=False) as page:
        gr.Markdown(
            "## mmalign curate: review\nKeys: **a** accept · **r** reject · **e** edit · **Ctrl+Enter** save "
            "the edit · **j / →** next · **k / ←** previous"
        )
        ui = _layout(gr)
        current = gr.State(None)
        shown = [current, ui["image"], ui["text"], ui["record"], ui["audit"], ui["progress"]]

        def show(view: str, cur: str | None, step: int = 0):
            cur = state.pick(view, cur, step)
            return (cur, *state.shown(cur), state.progress_line())

        def decide(decision: str):
            def handler(view: str, cur: str | None, text: str):
                state.decide(cur, decision, text)
                return show(view, cur, 1 if view != "pending" and cur in state.view(view) else 0)

            return handler

        page.load(show, [ui["show"], current], shown)
        ui["show"].change(show, [ui["show"], current], shown)
        ui["next"].click(lambda v, c: show(v, c, 1), [ui["show"], current], shown)
        ui["prev"].click(lambda v, c: show(v, c, -1), [ui["show"], current], shown)
        for key, decision in (("accept", "accepted"), ("reject", "rejected"), ("save", "edited")):
            ui[key].click(decide(decision), [ui["show"], current, ui["text"]], shown)
        timer = gr.Timer(refresh_s)
        timer.tick(lambda c: (state.progress_line(), state.shown(c)[2]), [current], [ui["progress"], ui["record"]])
    return page


def _layout(gr: Any) -> dict[str, Any]:
    ui: dict[str, Any] = {}
    with gr.Row():
        ui["progress"] = gr.Markdown(elem_id="progress")
        ui["show"] = gr.Dropdown(list(SHOW), value="pending", label="Show", elem_id="show", scale=0, min_width=160)
    with gr.Row():
        with gr.Column(scale=1, min_width=260):
            ui["image"] = gr.Image(type="pil", label="Image", height=300, elem_id="review-image", interactive=False)
        with gr.Column(scale=2):
            ui["record"] = gr.Markdown(elem_id="record")
            ui["text"] = gr.Textbox(label="Description (edit, then Ctrl+Enter)", lines=8, elem_id="review-text")
            with gr.Row():
                ui["accept"] = gr.Button("Accept (a)", variant="primary", elem_id="accept")
                ui["reject"] = gr.Button("Reject (r)", variant="stop", elem_id="reject")
                ui["save"] = gr.Button("Save edit (Ctrl+Enter)", elem_id="save-edit")
            with gr.Row():
                ui["prev"] = gr.Button("← Previous (k)", elem_id="prev")
                ui["next"] = gr.Button("Next (j) →", elem_id="next")
            with gr.Accordion("Audit: prompt, the model's own text, the fixer", open=False):
                ui["audit"] = gr.Markdown(elem_id="audit")
    return ui


def launch_review(
    state: ReviewState, *, host: str = "127.0.0.1", port: int | None = 7861, block: bool = True, refresh_s: float = 2.0
) -> Any:
    """Serve the page; ``block=False`` returns at once (tests)."""
    import gradio as gr

    page = build_review_page(state, refresh_s)
    page.queue(default_concurrency_limit=None)
    theme = gr.themes.Default(
        font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"]
    )
    page.launch(
        server_name=host,
        server_port=port,
        prevent_thread_lock=not block,
        theme=theme,
        css=CSS,
        head=KEYS_JS,
        quiet=not block,
        ssr_mode=False,
    )
    return page


__all__ = ["SHOW", "ReviewState", "build_review_page", "launch_review"]
