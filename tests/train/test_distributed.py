"""Multi-process training: global batch kept, rank-split data, and DDP (2 CPU processes, gloo,
launched with torchrun on the real CLI) reaching the same weights as one process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from train_helpers import caption_data, config, losses_by_step

from mmalign.config import TrainConfig
from mmalign.model.checkpoint import WEIGHTS
from mmalign.train.distributed import grad_accum_for
from mmalign.train.loop import RANK_FILE, STATE_FILE, ResumableSampler, train

REPO = Path(__file__).resolve().parents[2]


def test_global_batch_is_kept_when_the_process_count_changes():
    tc = TrainConfig(batch_size=16, global_batch_size=256, grad_accum=3)
    assert [grad_accum_for(tc, n) for n in (1, 2, 4, 8, 16)] == [16, 8, 4, 2, 1]
    with pytest.raises(
        ValueError, match=r"global_batch_size=256 is not a multiple of train.batch_size=16 x 3 processes"
    ):
        grad_accum_for(tc, 3)
    with pytest.raises(ValueError, match="x 32 processes = 512"):
        grad_accum_for(tc, 32)
    assert grad_accum_for(TrainConfig(batch_size=16, grad_accum=3), 4) == 3  # no global batch: as configured


def test_ranks_take_interleaved_batches_of_one_permutation():
    n, b, world = 23, 3, 2  # 8 batches (the last partial) -> 4 per rank
    single = ResumableSampler(n, seed=5, batch_size=b)
    order = list(single)
    assert sorted(order) == list(range(n))
    ranks = [ResumableSampler(n, seed=5, batch_size=b, rank=r, world=world) for r in range(world)]
    per_rank = [list(s) for s in ranks]
    assert [len(p) for p in per_rank] == [12, 11]  # rank 1 holds the partial last batch
    assert sorted(per_rank[0] + per_rank[1]) == sorted(order)  # disjoint, nothing lost
    # step k of 2 ranks (accumulation 1) = step k of 1 process with accumulation 2
    batches = [order[i : i + b] for i in range(0, n, b)]
    for k in range(4):
        assert per_rank[0][k * b : (k + 1) * b] == batches[2 * k]
        assert per_rank[1][k * b : (k + 1) * b] == batches[2 * k + 1]
    ranks[1].start = 2  # resume: this rank's first 2 batches are consumed
    assert list(ranks[1]) == batches[5] + batches[7]
    # a remainder of fewer batches than ranks is dropped so every rank has as many
    uneven = [list(ResumableSampler(7, seed=1, batch_size=2, rank=r, world=3)) for r in range(3)]
    assert [len(u) for u in uneven] == [2, 2, 2]


def _env() -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    return env


def test_ddp_two_cpu_processes_match_one_process_with_the_same_global_batch(tmp_path, model_dir):
    # 8 records, 2 per device, global batch 4: one process accumulates 2 batches per step, two
    # DDP processes take one each; 4 steps cross an epoch boundary (2 steps per epoch)
    data = caption_data(tmp_path / "data", n=8)
    common = [
        "train.trainable=projector+llm",
        "train.batch_size=2",
        "train.global_batch_size=4",
        "train.max_steps=4",
        "train.save_every=2",
        "train.warmup_steps=1",
        "train.lr=3e-3",
        "train.plot=false",
    ]
    one = tmp_path / "one"
    train(config(model_dir, data, one, *common))

    cfg = tmp_path / "ddp.yaml"
    cfg.write_text(yaml.safe_dump({"model": {"path": str(model_dir)}, "data": {"path": str(data)}}))
    two = tmp_path / "two"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "mmalign.cli",
        "train",
        str(cfg),
        f"train.output_dir={two}",
        "train.log_every=1",
        "train.min_lr=1e-3",
        *common,
    ]
    proc = subprocess.run(cmd, env=_env(), cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "MULTI_CPU, 2 process(es): global batch 4 = 2 per device x 1 accumulation x 2 process(es)" in proc.stderr
    assert proc.stderr.count("global batch 4") == 1  # logged by the main process only

    la, lb = losses_by_step(one), losses_by_step(two)
    assert sorted(la) == sorted(lb) == [1, 2, 3, 4]
    for step in la:
        assert lb[step] == pytest.approx(la[step], abs=1e-4), (step, la, lb)
    wa, wb = load_file(str(one / "checkpoint-4" / WEIGHTS)), load_file(str(two / "checkpoint-4" / WEIGHTS))
    assert set(wa) == set(wb) and any(n.startswith("model.language_model.") for n in wa)
    initial = load_file(str(model_dir / "model.safetensors"))
    for name in wa:
        torch.testing.assert_close(wb[name], wa[name], rtol=1e-4, atol=1e-5)
    assert any(not torch.equal(wa[n], initial[n]) for n in wa if n in initial)  # they did train
    ckpt = two / "checkpoint-4"
    assert (ckpt / RANK_FILE.format(0)).is_file() and (ckpt / RANK_FILE.format(1)).is_file()
    state = torch.load(ckpt / STATE_FILE, weights_only=False)
    assert (state["world_size"], state["epoch"], state["consumed"]) == (2, 1, 2)
    assert (two / "checkpoint-2" / STATE_FILE).is_file() and not list(two.glob(".tmp-*"))


def test_a_tracker_that_is_not_installed_is_an_error_not_silence(tmp_path, monkeypatch):
    import accelerate.tracking

    from mmalign.train.distributed import make_accelerator

    monkeypatch.setattr(accelerate.tracking, "get_available_trackers", lambda: [])
    with pytest.raises(ValueError, match=r"report_to: \['tensorboard'\] not installed"):
        make_accelerator(TrainConfig(report_to="tensorboard"), tmp_path)
    accelerator, accum = make_accelerator(TrainConfig(report_to="none", grad_accum=3), tmp_path)
    assert accum == 3 and accelerator.num_processes == 1 and not accelerator.log_with
