"""The per-step record: JSONL every `log_every` steps and at the last, and a resumed run's file
without the steps a killed run logged after its checkpoint."""

from __future__ import annotations

import json

import torch

from mmalign.config import RunConfig, TrainConfig
from mmalign.train.engines import make_engine
from mmalign.train.metrics import MetricsWriter, StepTotals


def test_a_resumed_writer_drops_later_records_and_logs_every_n_steps_and_the_last(tmp_path):
    cfg = RunConfig(train=TrainConfig(output_dir=str(tmp_path), log_every=2, max_steps=7, plot=False))
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in range(1, 7)))  # killed after 6
    accelerator = make_engine(cfg.train, tmp_path).accelerator

    with MetricsWriter(accelerator, cfg, resumed_step=4) as writer:  # its checkpoint: step 4
        assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2, 3, 4]
        for step in (5, 6, 7):
            totals = StepTotals(accum=2)
            for loss, tokens in ((2.0, 3), (4.0, 5)):
                batch = {"labels": torch.tensor([[-100] + [1] * tokens]), "input_ids": torch.zeros(1, tokens + 1)}
                totals.add(torch.tensor(loss), batch)
            record = writer.log_step(step, totals, lr=1e-3, grad_norm=torch.tensor(0.5))

    assert record["loss"] == 3.0 and record["answer_tokens"] == 8 and record["grad_norm"] == 0.5
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2, 3, 4, 6, 7]
    assert writer.file.closed
