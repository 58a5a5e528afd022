"""Reports people look at: a Markdown table and a PNG chart of the toy evaluation."""

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
    ("CHAIRi, short prompt", ("describe_short", "chair_i"), "{:.1%}"),
    ("mean words, short prompt", ("describe_short", "mean_words"), "{:.1f}"),
]


def _get(metrics: dict[str, Any], path: tuple[str, ...]) -> float | None:
    for key in path:
        if not isinstance(metrics, dict) or key not in metrics:
            return None
        metrics = metrics[key]
    return metrics


def toy_table(by_stage: dict[str, dict[str, Any]]) -> str:
    stages = list(by_stage)
    lines = ["| metric | " + " | ".join(stages) + " |", "|---|" + "---|" * len(stages)]
    for label, path, fmt in ROWS:
        vals = [_get(by_stage[s], path) for s in stages]
        if all(v is None for v in vals):
            continue
        lines.append(f"| {label} | " + " | ".join("-" if v is None else fmt.format(v) for v in vals) + " |")
    return "\n".join(lines)


def write_toy_report(by_stage: dict[str, dict[str, Any]], out: str | Path, minutes: float | None = None) -> str:
    """Write `report.md` + `report.png` (accuracy-type metrics per stage) under `out`; return the Markdown."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out)
    n = next(iter(by_stage.values())).get("n_scenes")
    md = [f"# Toy-world evaluation ({n} held-out scenes, greedy decoding)", ""]
    if minutes is not None:
        md += [f"Main job wall time: {minutes:.1f} min.", ""]
    md += [toy_table(by_stage), "", "![report](report.png)", ""]
    text = "\n".join(md)
    (out / "report.md").write_text(text)

    bars = [(label, path) for label, path, fmt in ROWS if "%" in fmt or "f1" in path]
    fig, ax = plt.subplots(figsize=(9, 4))
    width = 0.8 / max(len(by_stage), 1)
    for i, (stage, m) in enumerate(by_stage.items()):
        ys = [_get(m, p) or 0.0 for _, p in bars]
        ax.bar([j + i * width for j in range(len(bars))], ys, width, label=stage)
    ax.set_xticks([j + width * (len(by_stage) - 1) / 2 for j in range(len(bars))])
    ax.set_xticklabels([b[0].replace(", ", "\n") for b in bars], rotation=60, ha="right", fontsize=7)
    ax.set_ylim(0, 1)
    ax.legend()
    ax.set_title("toy world: stage 1 vs stage 2")
    fig.tight_layout()
    fig.savefig(out / "report.png", dpi=110)
    plt.close(fig)
    return text
