"""The loss / learning-rate PNG written at the end of a run."""

import json

from PIL import Image

from mmalign.train.plot import plot_metrics


def test_plot_writes_a_png_of_loss_and_lr(tmp_path):
    recs = [{"step": s, "loss": 5.0 / s, "lr": 1e-3 * min(1, s / 5)} for s in range(1, 41)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    png = plot_metrics(tmp_path / "metrics.jsonl", tmp_path / "loss.png", title="stage1")
    assert png == tmp_path / "loss.png"
    with Image.open(png) as im:
        assert im.format == "PNG" and im.size[0] > 400 and im.size[1] > 300
    (tmp_path / "empty.jsonl").write_text("")
    assert plot_metrics(tmp_path / "empty.jsonl", tmp_path / "none.png") is None
    assert not (tmp_path / "none.png").exists()
