"""The loss / learning-rate curves of a run, as a PNG next to its metrics.jsonl."""

from __future__ import annotations

import json
from pathlib import Path


def plot_metrics(metrics_jsonl: str | Path, png: str | Path, title: str = "") -> Path | None:
    """Loss (and its running mean) and learning rate per step; None if nothing was logged."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in Path(metrics_jsonl).read_text().splitlines() if line.strip()]
    if not records:
        return None
    steps = [r["step"] for r in records]
    loss = [r["loss"] for r in records]
    window = max(1, len(loss) // 20)
    smooth = [
        sum(loss[max(0, i - window + 1) : i + 1]) / len(loss[max(0, i - window + 1) : i + 1]) for i in range(len(loss))
    ]
    fig, (ax_loss, ax_lr) = plt.subplots(2, 1, figsize=(7, 5.5), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    ax_loss.plot(steps, loss, color="tab:blue", alpha=0.35, linewidth=1, label="loss")
    if window > 1:
        ax_loss.plot(steps, smooth, color="tab:blue", linewidth=2, label=f"running mean ({window} logs)")
    ax_loss.set_ylabel("loss (answer tokens)")
    ax_loss.legend(loc="upper right")
    ax_loss.grid(alpha=0.3)
    ax_lr.plot(steps, [r["lr"] for r in records], color="tab:orange")
    ax_lr.set_ylabel("learning rate")
    ax_lr.set_xlabel("optimizer step")
    ax_lr.grid(alpha=0.3)
    ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
    if title:
        ax_loss.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return Path(png)
