"""The stage run end to end on a tiny exported model and a tiny on-disk dataset (CPU, seconds)."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file
from train_helpers import (
    CAPTIONS,
    COLORS,
    PROJECTOR,
    _image,
    caption_data,
    cc_sbu_align,
    config,
    losses_by_step,
    metrics,
)

from mmalign.config import to_dict
from mmalign.data import DataError
from mmalign.data.sampling import LengthGroupedSampler
from mmalign.model.checkpoint import WEIGHTS
from mmalign.train.batches import ResumableSampler
from mmalign.train.stage import StageRun, train
from mmalign.train.state import STATE_FILE, latest_checkpoint


class Killed(Exception):
    pass


class RecordingRun(StageRun):
    """A stage run that keeps the model it set up and a copy of its state before the first step,
    and dies (an exception out of the loop) as it reaches batch number `kill_at`."""

    kill_at: int | None = None

    def setup_model(self) -> None:
        super().setup_model()
        self.built = self.model
        self.initial = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        self.batches_seen = 0

    def on_batch(self, batch) -> None:
        self.batches_seen += 1
        if self.batches_seen == self.kill_at:
            raise Killed


def train_killed_at_batch(n: int, cfg, run_class: type[RecordingRun] = RecordingRun) -> None:
    """Run `cfg` and kill it as it reaches its n-th batch."""
    run = run_class(cfg)
    run.kill_at = n
    with pytest.raises(Killed):
        run.run()


def test_stage1_lowers_loss_saves_and_keeps_frozen_tensors(tmp_path, model_dir):
    data = caption_data(tmp_path / "data", n=2)  # one batch of 2, seen at every step
    out = tmp_path / "run"
    cfg = config(
        model_dir,
        data,
        out,
        "data.source=captions",
        "train.trainable=projector",
        "train.max_steps=30",
        "train.save_every=10",
        "train.keep_checkpoints=2",
    )
    run = RecordingRun(cfg)
    final = run.run()

    assert final == out / "checkpoint-30"
    logged = metrics(out)
    assert [m["step"] for m in logged] == list(range(1, 31))
    assert all(np.isfinite(m["loss"]) and m["answer_tokens"] > 0 for m in logged)
    first, last = np.mean([m["loss"] for m in logged[:5]]), np.mean([m["loss"] for m in logged[-5:]])
    assert last < first - 0.05 and logged[-1]["loss"] < logged[0]["loss"] - 0.2, (first, last)
    assert logged[0]["lr"] > logged[-1]["lr"] >= 1e-3 - 1e-12  # cosine down to the floor

    # keep_checkpoints=2: the oldest (10) is gone; no half-written folder left behind
    names = sorted(p.name for p in out.iterdir())
    assert names == ["checkpoint-20", "checkpoint-30", "config.json", "data_report.json", "loss.png", "metrics.jsonl"]
    assert (final / STATE_FILE).is_file()
    report = json.loads((out / "data_report.json").read_text())
    assert report["total"] == 0 and report["truncated"] == 0
    assert json.loads((out / "config.json").read_text())["train"]["max_steps"] == 30

    model, initial = run.built, run.initial
    saved = load_file(str(final / WEIGHTS))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(PROJECTOR) for n in trainable)
    assert set(saved) == trainable
    for name, tensor in model.state_dict().items():
        if name in trainable:
            assert torch.equal(saved[name], tensor.detach()), name  # checkpoint = the trained tensors
            assert not torch.equal(tensor, initial[name]), f"{name} did not train"
        else:
            assert torch.equal(tensor, initial[name]), f"frozen {name} changed"


@pytest.mark.parametrize(
    "arch, trainable, source, extra",
    [
        ("minigpt4_patch", "projector", "captions", ()),
        # conversations draw a random instruction per sample: the RNG state must resume too
        ("minigpt4_patch", "projector", "conversations", ()),
        # the Q-Former trains with dropout: the torch RNG stream must be the same after resume
        ("minigpt4", "all", "captions", ()),
        # MiniGPT-4's random crops draw from the torch RNG: a resumed run must crop as the first one did
        ("minigpt4", "projector", "captions", ("data.train_transform=random_resized_crop",)),
    ],
)
def test_resume_reproduces_the_uninterrupted_run(tmp_path, model_dirs, arch, trainable, source, extra):
    # 5 records, batch 2: 3 batches per epoch (last one partial), so step 4 is mid-epoch 2
    model_dir = model_dirs(arch)
    data = caption_data(tmp_path / "data", n=5)
    common = (
        f"data.source={source}",
        f"train.trainable={trainable}",
        "train.max_steps=8",
        "train.save_every=4",
        "train.keep_checkpoints=5",
        "train.warmup_steps=2",
        "train.lr=1e-3",
        *extra,
    )
    a_out, b_out = tmp_path / "a", tmp_path / "b"
    train(config(model_dir, data, a_out, *common))

    # run B is killed in the middle of step 6: after checkpoint-4, with step 5 already logged
    train_killed_at_batch(6, config(model_dir, data, b_out, *common))
    assert latest_checkpoint(b_out) == b_out / "checkpoint-4"
    assert not (b_out / "checkpoint-8").exists()
    assert [m["step"] for m in metrics(b_out)] == [1, 2, 3, 4, 5]

    final = train(config(model_dir, data, b_out, *common))  # resumes from checkpoint-4

    assert final == b_out / "checkpoint-8"
    assert [m["step"] for m in metrics(b_out)] == [1, 2, 3, 4, 5, 6, 7, 8]  # step 5 of the killed run dropped
    la, lb = losses_by_step(a_out), losses_by_step(b_out)
    assert sorted(la) == sorted(lb) == list(range(1, 9))
    for step in range(1, 9):
        assert lb[step] == pytest.approx(la[step], abs=1e-5), (step, la, lb)
    assert len({la[s] for s in range(5, 9)}) > 1  # the losses differ per batch: the order is tested
    lr_a = {m["step"]: m["lr"] for m in metrics(a_out)}
    lr_b = {m["step"]: m["lr"] for m in metrics(b_out)}
    assert lr_b == pytest.approx(lr_a)
    wa, wb = load_file(str(a_out / "checkpoint-8" / WEIGHTS)), load_file(str(b_out / "checkpoint-8" / WEIGHTS))
    assert set(wa) == set(wb) and wa
    for name in wa:
        torch.testing.assert_close(wb[name], wa[name], rtol=0, atol=1e-6)
    sa = torch.load(a_out / "checkpoint-8" / STATE_FILE, weights_only=False)
    sb = torch.load(b_out / "checkpoint-8" / STATE_FILE, weights_only=False)
    assert (sa["step"], sa["epoch"], sa["consumed"]) == (sb["step"], sb["epoch"], sb["consumed"])


def _bad_first_layout(n: int, bad: int, seed: int) -> list[bool]:
    """Which record indices to make bad so that the seeded sampler visits them first."""
    order = list(ResumableSampler(n, seed))
    is_bad = [False] * n
    for i in order[:bad]:
        is_bad[i] = True
    return is_bad


def test_bad_records_are_counted_logged_and_skipped(tmp_path, model_dir, caplog):
    root = tmp_path / "data"
    # the dataset holds 5 records (the empty caption is dropped when reading): missing + corrupt
    # images come first in the seeded order, so batch_size=1 x 3 steps is exactly one epoch and
    # the loop has to pass over two all-bad (None) batches
    is_bad = _bad_first_layout(5, 2, seed=42)
    bad_kinds = iter(["missing", "corrupt"])
    recs, expect = [], {}
    good = 0
    for i in range(5):
        name = f"images/{i}.jpg"
        if is_bad[i]:
            kind = next(bad_kinds)
            expect[kind] = (i, root / name)
            if kind == "corrupt":
                _image(root / name, (10, 200, 90), seed=99)
                blob = (root / name).read_bytes()
                (root / name).write_bytes(blob[: len(blob) // 2])  # truncated JPEG
        else:
            _image(root / name, COLORS[good], seed=good)
            good += 1
        recs.append({"image": name, "caption": CAPTIONS[i]})
    recs.insert(5, {"image": "images/0.jpg", "caption": "   "})  # empty caption: record #5
    data = root / "caps.json"
    data.write_text(json.dumps(recs))
    out = tmp_path / "run"
    cfg = config(model_dir, data, out, "train.batch_size=1", "train.max_steps=3", "train.save_every=100")

    with caplog.at_level(logging.WARNING):
        final = train(cfg)

    assert final == out / "checkpoint-3" and (final / WEIGHTS).is_file()
    assert [m["answer_tokens"] > 0 for m in metrics(out)] == [True] * 3
    report = json.loads((out / "data_report.json").read_text())
    assert report["counts"] == {"empty caption": 1, "missing image": 1, "corrupt image": 1}
    assert report["total"] == 3
    log_text = caplog.text
    missing_i, missing_path = expect["missing"]
    corrupt_i, corrupt_path = expect["corrupt"]
    assert f"{data}#{missing_i}" in log_text and str(missing_path) in log_text
    assert f"{data}#{corrupt_i}" in log_text and str(corrupt_path) in log_text
    assert f"{data}#5" in log_text and "empty caption" in log_text
    assert "missing image" in log_text and "corrupt image" in log_text
    assert any(r.name == "mmalign.train.stage" and "skipped" in r.getMessage() for r in caplog.records)


def test_stage2_conversations_start_from_stage1_projector(tmp_path, model_dir):
    stage1 = train(
        config(model_dir, caption_data(tmp_path / "caps"), tmp_path / "s1", "train.max_steps=3", "train.save_every=3")
    )
    s1 = load_file(str(stage1 / WEIGHTS))

    data = cc_sbu_align(tmp_path / "cc_sbu_align")
    out = tmp_path / "s2"
    cfg = config(
        model_dir,
        data,
        out,
        "data.source=conversations",
        "data.template=minigpt4_v0",
        f"model.init_trainable={stage1}",
        "train.stage=stage2",
        "train.max_steps=2",
        "train.save_every=2",
        "train.lr=1e-3",
    )
    run = RecordingRun(cfg)
    final = run.run()

    at_setup = {n: t for n, t in run.initial.items() if n.startswith(PROJECTOR)}  # before the first step
    assert set(at_setup) == set(s1)
    for name, tensor in s1.items():
        assert torch.equal(at_setup[name], tensor), name  # started from stage 1...
    pristine = load_file(str(model_dir / "model.safetensors"))
    assert any(not torch.equal(pristine[n], s1[n]) for n in s1 if n in pristine)  # ...which had trained
    s2 = load_file(str(final / WEIGHTS))
    assert set(s2) == set(s1) and any(not torch.equal(s2[n], s1[n]) for n in s1)  # and stage 2 trains on
    report = json.loads((out / "data_report.json").read_text())
    assert report["total"] == 0
    assert all(m["answer_tokens"] > 0 for m in metrics(out))
    assert json.loads((out / "config.json").read_text())["model"]["init_trainable"] == str(stage1)


def test_resume_skips_a_half_written_checkpoint(tmp_path, model_dir):
    data = caption_data(tmp_path / "data", n=4)
    out = tmp_path / "run"
    common = ("train.max_steps=4", "train.save_every=2")
    train(config(model_dir, data, out, *common))
    junk = out / ".tmp-checkpoint-6"
    junk.mkdir()
    (junk / STATE_FILE).write_bytes(b"not a torch file")
    (junk / WEIGHTS).write_bytes(b"")

    final = train(config(model_dir, data, out, "train.max_steps=6", "train.save_every=2"))  # resumes at 4

    assert final == out / "checkpoint-6"
    assert [m["step"] for m in metrics(out)] == [1, 2, 3, 4, 5, 6]
    assert not junk.exists()  # the save of step 6 replaced the stale temp folder
    assert torch.load(final / STATE_FILE, weights_only=False)["step"] == 6


def test_cli_run_killed_with_sigkill_continues_the_same_loss_curve(tmp_path, model_dir):
    """The real thing: `mmalign train` in a subprocess, SIGKILLed after a checkpoint (with steps
    logged past it), restarted with the same command; its per-step losses match a run that was
    never interrupted."""
    data = caption_data(tmp_path / "data", n=5)
    common = (
        "data.source=conversations",
        "train.max_steps=40",
        "train.save_every=5",
        "train.keep_checkpoints=20",
        "train.warmup_steps=2",
        "train.lr=1e-3",
        "train.plot=false",
    )
    ref = tmp_path / "ref"
    train(config(model_dir, data, ref, *common))

    out = tmp_path / "run"
    cfg_file = tmp_path / "run.yaml"
    cfg_file.write_text(yaml.safe_dump(json.loads(json.dumps(to_dict(config(model_dir, data, out, *common))))))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[2]), env.get("PYTHONPATH", "")])
    cmd = [sys.executable, "-m", "mmalign.cli", "train", str(cfg_file)]

    proc = subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        ckpt = latest_checkpoint(out)
        if ckpt is not None and (out / "metrics.jsonl").exists():
            logged = [
                json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines() if x.endswith("}")
            ]
            if logged and max(logged) > int(ckpt.name.split("-")[1]):
                os.kill(proc.pid, signal.SIGKILL)
                break
        time.sleep(0.005)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read()[-3000:]
    killed_at = latest_checkpoint(out)
    assert killed_at is not None and killed_at.name != "checkpoint-40"  # really cut short
    steps_before = [m["step"] for m in metrics(out)]
    assert max(steps_before) > int(killed_at.name.split("-")[1])  # work past the checkpoint is lost

    done = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"resumed from {killed_at}" in done.stderr
    assert done.stdout.strip().endswith("checkpoint-40")

    assert [m["step"] for m in metrics(out)] == list(range(1, 41))  # each step once: stale records dropped
    la, lb = losses_by_step(ref), losses_by_step(out)
    for step in range(1, 41):
        assert lb[step] == pytest.approx(la[step], abs=1e-5), (step, killed_at, la[step], lb[step])
    wa, wb = load_file(str(ref / "checkpoint-40" / WEIGHTS)), load_file(str(out / "checkpoint-40" / WEIGHTS))
    for name in wa:
        torch.testing.assert_close(wb[name], wa[name], rtol=0, atol=1e-6)


def test_gradient_checkpointing_recomputes_without_changing_the_losses(tmp_path, model_dir, monkeypatch):
    import transformers.modeling_utils as mu

    data = caption_data(tmp_path / "data", n=4)
    common = ("train.trainable=projector", "train.max_steps=3", "train.save_every=3", "train.plot=false")
    plain = tmp_path / "plain"
    train(config(model_dir, data, plain, *common))
    calls = {"n": 0}
    real = mu.checkpoint

    def counting(*args, **kwargs):
        calls["n"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(mu, "checkpoint", counting)  # what activation_checkpointing_enable binds
    ckpt = tmp_path / "ckpt"
    train(config(model_dir, data, ckpt, *common, "train.gradient_checkpointing=true"))

    # the frozen LLM (2 layers) sits on the gradient path to the projector: it is checkpointed
    assert calls["n"] >= 3 * 2 * 2, calls
    la, lb = losses_by_step(plain), losses_by_step(ckpt)
    assert lb == pytest.approx(la, abs=1e-6)


def test_bf16_autocast_keeps_trainable_weights_float32(tmp_path, model_dir):
    data = caption_data(tmp_path / "data", n=4)
    common = ("train.trainable=projector", "train.max_steps=6", "train.save_every=6", "train.plot=false")
    fp32, bf16 = tmp_path / "fp32", tmp_path / "bf16"
    train(config(model_dir, data, fp32, *common))
    final = train(config(model_dir, data, bf16, *common, "model.dtype=bfloat16", "train.mixed_precision=bf16"))

    saved = load_file(str(final / WEIGHTS))
    assert saved and all(t.dtype == torch.float32 for t in saved.values())  # masters stay float32
    la, lb = losses_by_step(fp32), losses_by_step(bf16)
    assert all(np.isfinite(v) for v in lb.values())
    assert lb != la and lb == pytest.approx(la, abs=0.1)  # computed in bf16: close, not equal
    assert lb[6] < lb[1]


class _Stream(torch.utils.data.IterableDataset):
    """A stand-in for the streamed sources: an IterableDataset with set_epoch / set_resume that
    yields a seeded order of the records, starting after the batches already consumed."""

    def __init__(self, base) -> None:
        self.base, self.epoch, self.skip, self.calls, self.read = base, 0, 0, [], 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.calls.append(("epoch", epoch))

    def set_resume(self, batches_consumed: int, batch_size: int) -> None:
        self.skip = batches_consumed * batch_size
        self.calls.append(("resume", batches_consumed, batch_size))

    def __iter__(self):
        order = torch.randperm(len(self.base), generator=torch.Generator().manual_seed(7 + self.epoch)).tolist()
        for i in order[self.skip :]:
            self.read += 1
            yield self.base[i]


def test_streamed_dataset_resumes_exactly_without_rereading(tmp_path, model_dir):
    streams: list[_Stream] = []

    class StreamedRun(RecordingRun):
        def build_dataset(self):
            streams.append(_Stream(super().build_dataset()))
            return streams[-1]

    data = caption_data(tmp_path / "data", n=5)  # batch 2: 3 batches per epoch
    common = ("train.max_steps=8", "train.save_every=4", "train.plot=false", "train.warmup_steps=2", "train.lr=1e-3")
    a_out, b_out = tmp_path / "a", tmp_path / "b"
    StreamedRun(config(model_dir, data, a_out, *common)).run()
    assert streams[0].calls[:2] == [("epoch", 0), ("resume", 0, 2)] and ("epoch", 2) in streams[0].calls

    train_killed_at_batch(6, config(model_dir, data, b_out, *common), StreamedRun)
    StreamedRun(config(model_dir, data, b_out, *common)).run()

    resumed = streams[-1]
    # checkpoint-4 = epoch 1 (batches of 2, 2, 1), 1 batch consumed: the stream is told to skip it
    assert resumed.calls[:2] == [("epoch", 1), ("resume", 1, 2)]
    assert resumed.read == 2 + 1 + 2 + 2  # steps 5-8 read exactly their own samples, none again
    la, lb = losses_by_step(a_out), losses_by_step(b_out)
    assert sorted(lb) == list(range(1, 9))
    for step in la:
        assert lb[step] == pytest.approx(la[step], abs=1e-5), (step, la, lb)


def test_group_by_length_trains(tmp_path, model_dir):
    data = caption_data(tmp_path / "data", n=4)
    cfg = config(
        model_dir,
        data,
        tmp_path / "run",
        "data.source=captions",
        "data.group_by_length=true",
        "train.max_steps=3",
        "train.save_every=3",
        "train.plot=false",
    )
    run = StageRun(cfg)
    assert run.run() == tmp_path / "run" / "checkpoint-3"
    sampler = run.batches.sampler
    assert isinstance(sampler.order.__self__, LengthGroupedSampler)  # without grouping: None
    order = sampler.order(0)
    sampler.epoch, sampler.start = 0, 0
    assert sampler._batches() == [order[0:2], order[2:4]]  # the epoch's batches follow the grouped order


def test_half_precision_trainable_weights_need_mixed_precision(tmp_path, model_dir):
    data = caption_data(tmp_path / "data", n=2)
    cfg = config(model_dir, data, tmp_path / "run", "data.source=captions", "model.dtype=bfloat16", "train.max_steps=1")
    with pytest.raises(ValueError, match="train.mixed_precision"):
        train(cfg)


def test_an_epoch_without_any_usable_batch_stops_with_an_error(tmp_path, model_dir):
    data = tmp_path / "caps.json"  # every record points at a missing image: skipped, counted
    data.write_text(json.dumps([{"image": "missing.jpg", "caption": "a red circle"}] * 2))
    cfg = config(model_dir, data, tmp_path / "run", "data.source=captions", "train.max_steps=2")
    with pytest.raises(RuntimeError, match="no usable batch"):
        train(cfg)


def _resume_matches(model_dir, data, tmp_path, *common):
    """Run A uninterrupted; run B killed mid-epoch after checkpoint-4, then resumed: same losses."""
    a_out, b_out = tmp_path / "a", tmp_path / "b"
    train(config(model_dir, data, a_out, *common))
    train_killed_at_batch(6, config(model_dir, data, b_out, *common))
    assert latest_checkpoint(b_out) == b_out / "checkpoint-4"
    train(config(model_dir, data, b_out, *common))
    la, lb = losses_by_step(a_out), losses_by_step(b_out)
    assert sorted(lb) == list(range(1, 9))
    for step in la:
        assert lb[step] == pytest.approx(la[step], abs=1e-5), (step, la, lb)


@pytest.mark.parametrize("variant", ["json features", "shard features", "packing"])
def test_resume_mid_epoch_with_cached_features_or_packing(tmp_path, model_dir, variant):
    from train_helpers import caption_shards

    from mmalign.train.feature_cache import cache_features

    common = ["train.max_steps=8", "train.save_every=4", "train.plot=false", "train.warmup_steps=2", "train.lr=1e-3"]
    if variant == "shard features":
        data = caption_shards(tmp_path / "shards", shards=2, per_shard=3)
    else:
        data = caption_data(tmp_path / "data", n=5)  # batch 2: 3 batches per epoch, step 4 is mid-epoch 2
    if variant == "packing":  # conversations draw an instruction per sample: the RNG resumes too
        common += ["data.source=conversations", "data.packing=true", "data.pack_tokens=160"]
    else:
        cache = cache_features(config(model_dir, data, tmp_path / "unused"), tmp_path / "cache")
        common.append(f"data.features={cache.folder}")
    _resume_matches(model_dir, data, tmp_path, *common)


def test_packed_batches_train_as_padded_ones(tmp_path, model_dir):
    data = caption_data(tmp_path / "data", n=5)
    common = ("data.source=conversations", "train.max_steps=4", "train.batch_size=3", "train.plot=false")
    train(config(model_dir, data, tmp_path / "padded", *common))
    train(config(model_dir, data, tmp_path / "packed", *common, "data.packing=true", "data.pack_tokens=200"))
    padded, packed = metrics(tmp_path / "padded"), metrics(tmp_path / "packed")
    for a, b in zip(padded, packed):
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-5) and b["answer_tokens"] == a["answer_tokens"]
    with pytest.raises(DataError, match="data.pack_tokens=100 is below data.max_length=160"):
        train(config(model_dir, data, tmp_path / "bad", *common, "data.packing=true", "data.pack_tokens=100"))


def test_compiled_llm_trains_packed_rows_as_eager_padded_ones(tmp_path, model_dir):
    """train.compile=true compiles the LLM's layers once for every row count and length (dynamic shapes:
    batches of 3 and 2 samples in rows of 64 tokens here) and learns what eager padded batches learn:
    the block mask transformers derives from packed position ids survives tracing. Padded batches
    then train through the same compiled graph."""
    data = caption_data(tmp_path / "data", n=5)
    common = ("data.source=conversations", "train.max_steps=4", "train.batch_size=3", "train.plot=false")
    train(config(model_dir, data, tmp_path / "eager", *common))
    packed = ("data.packing=true", "data.pack_tokens=64", "data.max_length=64", "train.compile=true")
    run = RecordingRun(config(model_dir, data, tmp_path / "compiled", *common, *packed))
    run.run()

    layers = run.built.get_submodule("model.language_model").layers
    assert all(layer._compiled_call_impl is not None for layer in layers)
    eager, compiled = metrics(tmp_path / "eager"), metrics(tmp_path / "compiled")
    assert len(compiled) == len(eager) == 4
    for a, b in zip(eager, compiled):
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-5) and b["answer_tokens"] == a["answer_tokens"]

    # padded rows (stage 2) get per-row position ids as packed ones (stage 1) do: the layers'
    # graph is reused, not recompiled (duck sizing once tied the rotary batch to the rows')
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    train(config(model_dir, data, tmp_path / "compiled-padded", *common, "train.compile=true"))
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs
    assert len(metrics(tmp_path / "compiled-padded")) == 4
    for a, b in zip(eager, metrics(tmp_path / "compiled-padded")):
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-5)


@pytest.mark.parametrize(("engine", "quantization"), [("FSDP2", None), ("DeepSpeed ZeRO-3", None), ("DDP", "4bit")])
def test_compile_is_refused_where_it_is_not_tested(engine, quantization):
    from mmalign.train.trainable import check_compile

    check_compile("DDP", None)
    check_compile("single process", None)
    with pytest.raises(ValueError, match="train.compile=false"):
        check_compile(engine, quantization)
