"""Reports people look at: a Markdown table (one column per model) and a PNG chart."""

from __future__ import annotations

from pathlib import Path
from typing import Any

ROWS = [
    ("colour accuracy", ("vqa_accuracy", "colour"), "{:.1%}"),
    ("shape accuracy", ("vqa_accuracy", "shape"), "{:.1%}"),
    ("count accuracy", ("vqa_accuracy", "count"), "{:.1%}"),
    ("position accuracy", ("vqa_accuracy", "position"), "{:.1%}"),
    ("relation accuracy", ("vqa_accuracy", "relation"), "{:.1%}"),
    ("presence F1", ("presence", "f1"), "{:.3f}"),
    ("presence yes-ratio", ("presence", "yes_ratio"), "{:.2f}"),
    ("CHAIRi, detailed prompt", ("describe_long", "chair_i"), "{:.1%}"),
    ("CHAIRs, detailed prompt", ("describe_long", "chair_s"), "{:.1%}"),
    ("object recall, detailed prompt", ("describe_long", "object_recall"), "{:.1%}"),
    ("mean words, detailed prompt", ("describe_long", "mean_words"), "{:.1f}"),
    ("repeated-trigram rate, detailed prompt", ("describe_long", "repeated_trigram_rate"), "{:.1%}"),
    ("repeated-sentence rate, detailed prompt", ("describe_long", "repeated_sentence_rate"), "{:.1%}"),
    ("unfinished rate, detailed prompt", ("describe_long", "unfinished_rate"), "{:.1%}"),
    ("malformed-sentence rate, detailed prompt", ("describe_long", "malformed_sentence_rate"), "{:.1%}"),
    ("CHAIRi, short prompt", ("describe_short", "chair_i"), "{:.1%}"),
    ("mean words, short prompt", ("describe_short", "mean_words"), "{:.1f}"),
]


Row = tuple[str, tuple[str, ...], str]  # (label, path into the metrics dict, format)


def _get(metrics: dict[str, Any], path: tuple[str, ...]) -> float | None:
    for key in path:
        if not isinstance(metrics, dict) or key not in metrics:
            return None
        metrics = metrics[key]
    return metrics


def table(by_model: dict[str, dict[str, Any]], rows: list[Row]) -> str:
    """Markdown table, one column per model; rows no model has are left out."""
    names = list(by_model)
    lines = ["| metric | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for label, path, fmt in rows:
        vals = [_get(by_model[s], path) for s in names]
        if all(v is None for v in vals):
            continue
        lines.append(f"| {label} | " + " | ".join("-" if v is None else fmt.format(v) for v in vals) + " |")
    return "\n".join(lines)


def _chart(by_model: dict[str, dict[str, Any]], rows: list[Row], path: Path, title: str) -> None:
    """Grouped bars, one group per row: rates (shown as % or 0.xxx) on a 0-1 axis; tables of
    other numbers (e.g. MME scores) on their own axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    present = [(label, p) for label, p, fmt in rows if any(_get(m, p) is not None for m in by_model.values())]
    rates = [(label, p) for label, p, fmt in rows if ("%" in fmt or "3f" in fmt) and (label, p) in present]
    bars = rates or present
    fig, ax = plt.subplots(figsize=(max(6, 0.45 * len(bars) * max(len(by_model), 1) + 2), 4))
    width = 0.8 / max(len(by_model), 1)
    for i, (name, m) in enumerate(by_model.items()):
        ys = [_get(m, p) or 0.0 for _, p in bars]
        ax.bar([j + i * width for j in range(len(bars))], ys, width, label=name)
    ax.set_xticks([j + width * (len(by_model) - 1) / 2 for j in range(len(bars))])
    ax.set_xticklabels([b[0].replace(", ", "\n") for b in bars], rotation=60, ha="right", fontsize=7)
    if rates:
        ax.set_ylim(0, 1)
    ax.legend()
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(
    title: str,
    by_model: dict[str, dict[str, Any]],
    rows: list[Row],
    out: str | Path,
    *,
    intro: list[str] = (),
    notes: list[str] = (),
    chart_title: str | None = None,
) -> str:
    """Write `report.md` (title, intro lines, table, notes) + `report.png` under `out`; return the Markdown."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    md = [f"# {title}", ""]
    md += [*intro, ""] if intro else []
    md += [table(by_model, rows), "", "![report](report.png)", ""]
    md += [*notes, ""] if notes else []
    text = "\n".join(md)
    (out / "report.md").write_text(text)
    _chart(by_model, rows, out / "report.png", chart_title or title)
    return text


def write_toy_report(
    by_stage: dict[str, dict[str, Any]], out: str | Path, minutes: float | None = None, notes: list[str] = ()
) -> str:
    """Write `report.md` + `report.png` (accuracy-type metrics per stage) under `out`; return the Markdown."""
    n = next(iter(by_stage.values())).get("n_scenes")
    intro = [f"Main job wall time: {minutes:.1f} min."] if minutes is not None else []
    return write_report(
        f"Toy-world evaluation ({n} held-out scenes, greedy decoding)",
        by_stage,
        ROWS,
        out,
        intro=intro,
        notes=list(notes),
        chart_title="toy world, " + " vs ".join(by_stage),
    )
