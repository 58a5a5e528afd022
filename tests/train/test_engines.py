"""The engines, each run for real where it can run here: DDP and FSDP2 on 2 CPU processes (gloo,
torchrun on the real CLI), DeepSpeed ZeRO-2 / ZeRO-3 where it is installed (opt-in); each reaches
one process's per-step losses and weights with the same global batch, and resumes from its own
checkpoint. (One process: every test of test_stage.py.)"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from train_helpers import caption_data, config, losses_by_step, metrics

from mmalign.config import TrainConfig
from mmalign.model.checkpoint import WEIGHTS
from mmalign.train.engines import (
    ENGINE_DIR,
    DeepSpeedEngine,
    FSDPEngine,
    ReplicatedEngine,
    grad_accum_for,
    make_engine,
)
from mmalign.train.stage import train
from mmalign.train.state import RANK_FILE, STATE_FILE

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


def _env(engine: str) -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    for switch in ("ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED", "ACCELERATE_DEEPSPEED_CONFIG_FILE"):
        env.pop(switch, None)
    return {**env, **LAUNCHER_ENV[engine]}


# what `accelerate launch --config_file configs/accelerate/<engine>.yaml` sets for the engine choice
LAUNCHER_ENV = {
    "ddp": {},
    "fsdp": {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"},
    "zero2": {
        "ACCELERATE_USE_DEEPSPEED": "true",
        "ACCELERATE_DEEPSPEED_CONFIG_FILE": str(REPO / "configs/accelerate/zero2.json"),
    },
    "zero3": {
        "ACCELERATE_USE_DEEPSPEED": "true",
        "ACCELERATE_DEEPSPEED_CONFIG_FILE": str(REPO / "configs/accelerate/zero3.json"),
    },
}
ENGINE_NAME = {"ddp": "DDP", "fsdp": "FSDP2", "zero2": "DeepSpeed ZeRO-2", "zero3": "DeepSpeed ZeRO-3"}
needs_deepspeed = pytest.mark.skipif(
    importlib.util.find_spec("deepspeed") is None,
    reason="DeepSpeed is not installed (opt-in: pip install -e '.[deepspeed]'; its CPU path runs ZeRO-2/3 over gloo)",
)


def _torchrun(engine: str, cfg: Path, out: Path, *overrides: str) -> subprocess.CompletedProcess:
    """`mmalign train` on 2 CPU processes (gloo), launched as users of plain torch would."""
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
        f"train.output_dir={out}",
        "train.log_every=1",
        "train.min_lr=1e-3",
        *overrides,
    ]
    proc = subprocess.run(cmd, env=_env(engine), cwd=out.parent, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.mark.parametrize(
    "engine",
    ["ddp", "fsdp", pytest.param("zero2", marks=needs_deepspeed), pytest.param("zero3", marks=needs_deepspeed)],
)
def test_two_cpu_processes_match_one_process_with_the_same_global_batch_and_resume(tmp_path, model_dir, engine):
    # 8 records, 2 per device, global batch 4: one process accumulates 2 batches per step, two
    # processes take one each; 4 steps cross an epoch boundary (2 steps per epoch)
    data = caption_data(tmp_path / "data", n=8)
    common = [
        "train.trainable=projector+llm",
        "train.batch_size=2",
        "train.global_batch_size=4",
        "train.max_steps=4",
        "train.save_every=2",
        "train.keep_checkpoints=3",
        "train.warmup_steps=1",
        "train.lr=3e-3",
        "train.plot=false",
    ]
    one = tmp_path / "one"
    train(config(model_dir, data, one, *common))

    cfg = tmp_path / "two.yaml"
    cfg.write_text(yaml.safe_dump({"model": {"path": str(model_dir)}, "data": {"path": str(data)}}))
    two = tmp_path / "two"
    proc = _torchrun(engine, cfg, two, *common)
    line = f"engine {ENGINE_NAME[engine]} on MULTI_CPU, 2 process(es): global batch 4 = 2 per device x 1 accumulation"
    assert line + " x 2 process(es)" in proc.stderr
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
    assert (ckpt / ENGINE_DIR).is_dir() == (engine != "ddp")  # sharded optimizer state
    state = torch.load(ckpt / STATE_FILE, weights_only=False)
    assert (state["world_size"], state["epoch"], state["consumed"]) == (2, 1, 2)
    assert (two / "checkpoint-2" / STATE_FILE).is_file() and not list(two.glob(".tmp-*"))

    # resume: without checkpoint-4 the same command continues from checkpoint-2 (its optimizer
    # state as this engine saved it) and ends where the uninterrupted run ended
    shutil.rmtree(ckpt)
    again = _torchrun(engine, cfg, two, *common)
    assert f"resumed from {two / 'checkpoint-2'} at step 2" in again.stderr
    assert [m["step"] for m in metrics(two)] == [1, 2, 3, 4]  # steps 3-4 dropped, then logged again
    lr = losses_by_step(two)
    for step in la:
        assert lr[step] == pytest.approx(lb[step], abs=1e-6), (step, lb, lr)
    resumed = load_file(str(ckpt / WEIGHTS))
    for name in wb:
        torch.testing.assert_close(resumed[name], wb[name], rtol=0, atol=1e-6)


def test_a_tracker_that_is_not_installed_is_an_error_not_silence(tmp_path, monkeypatch):
    import accelerate.tracking

    monkeypatch.setattr(accelerate.tracking, "get_available_trackers", lambda: [])
    with pytest.raises(ValueError, match=r"report_to: \['tensorboard'\] not installed"):
        make_engine(TrainConfig(report_to="tensorboard"), tmp_path)
    engine = make_engine(TrainConfig(report_to="none", grad_accum=3), tmp_path)
    assert engine.accum == 3 and engine.accelerator.num_processes == 1 and not engine.accelerator.log_with


@pytest.mark.parametrize(
    "engine",
    ["ddp", "fsdp", pytest.param("zero2", marks=needs_deepspeed), pytest.param("zero3", marks=needs_deepspeed)],
)
def test_accumulation_on_two_processes_matches_one_process(tmp_path, model_dir, engine):
    # batch 1: one process accumulates 4 batches per step, each of 2 ranks 2 (the same 4 batches);
    # DDP skips the sync but at the last, FSDP reduces every micro-batch, DeepSpeed counts them itself
    data = caption_data(tmp_path / "data", n=8)
    common = ["train.trainable=projector+llm", "train.batch_size=1", "train.global_batch_size=4"]
    common += ["train.max_steps=3", "train.save_every=3", "train.warmup_steps=1", "train.lr=3e-3", "train.plot=false"]
    one = tmp_path / "one"
    train(config(model_dir, data, one, *common))
    cfg = tmp_path / "two.yaml"
    cfg.write_text(yaml.safe_dump({"model": {"path": str(model_dir)}, "data": {"path": str(data)}}))
    proc = _torchrun(engine, cfg, tmp_path / "two", *common)
    assert "global batch 4 = 1 per device x 2 accumulation x 2 process(es)" in proc.stderr
    la, lb = losses_by_step(one), losses_by_step(tmp_path / "two")
    assert sorted(la) == sorted(lb) == [1, 2, 3]
    for step in la:
        assert lb[step] == pytest.approx(la[step], abs=1e-4), (step, la, lb)


def _clear_launcher(monkeypatch) -> None:
    for name in ("ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED", "ACCELERATE_DEEPSPEED_CONFIG_FILE"):
        monkeypatch.delenv(name, raising=False)


def test_the_launcher_chooses_the_engine_and_accelerate_stays_in_its_plain_mode(tmp_path, monkeypatch):
    _clear_launcher(monkeypatch)
    assert isinstance(make_engine(TrainConfig(), tmp_path), ReplicatedEngine)
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    engine = make_engine(TrainConfig(), tmp_path)
    assert isinstance(engine, FSDPEngine) and engine.accelerator.distributed_type.value == "NO"
    assert os.environ["ACCELERATE_USE_FSDP"] == "true"  # hidden from accelerate only while it starts
    monkeypatch.setenv("FSDP_OFFLOAD_PARAMS", "true")
    with pytest.raises(ValueError, match=r"\['FSDP_OFFLOAD_PARAMS=true'\] not supported"):
        make_engine(TrainConfig(), tmp_path)
    monkeypatch.delenv("FSDP_OFFLOAD_PARAMS")
    with pytest.raises(ValueError, match="fp16 needs a sharded grad scaler; use bf16"):
        make_engine(TrainConfig(mixed_precision="fp16"), tmp_path)


def test_deepspeed_gets_the_batch_clipping_and_precision_of_the_run(tmp_path, monkeypatch):
    _clear_launcher(monkeypatch)
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", str(REPO / "configs/accelerate/zero3.json"))
    train_cfg = TrainConfig(batch_size=4, global_batch_size=32, max_grad_norm=0.5, mixed_precision="bf16")
    engine = make_engine(train_cfg, tmp_path)  # deepspeed itself is imported only by prepare
    assert isinstance(engine, DeepSpeedEngine) and engine.name == "DeepSpeed ZeRO-3"
    config = engine.config
    assert (config["train_micro_batch_size_per_gpu"], config["gradient_accumulation_steps"]) == (4, 8)
    assert (config["train_batch_size"], config["gradient_clipping"]) == (32, 0.5)
    assert config["bf16"]["enabled"] is True and config["fp16"]["enabled"] is False
    left = tmp_path / "auto.json"
    left.write_text(json.dumps({"zero_optimization": {"stage": 2, "reduce_bucket_size": "auto"}}))
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", str(left))
    with pytest.raises(ValueError, match=r"left 'auto' that mmalign cannot fill: \['zero_optimization.reduce_bucket"):
        make_engine(train_cfg, tmp_path)
