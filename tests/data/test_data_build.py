"""dataset_from_config: one JSON (map-style, as before), shards, and `data.sources` mixes."""

import io
import json
import logging
import os
from collections import Counter

import pytest
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader

from mmalign.config import load_config
from mmalign.data import DataError, MixedStream, MultimodalDataset, ShardStream, collate
from mmalign.data.build import check_data, dataset_from_config

N = 4


def to_tensor(im):
    return torch.zeros(3, 4, 4)


def jpeg_bytes():
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (10, 200, 30)).save(buf, "JPEG")
    return buf.getvalue()


@pytest.fixture
def data_dir(tmp_path):
    """shards/{00000,00001}.tar (4 pairs each), cc_sbu_align/ (3 pairs), llava.json (2 with an
    image, 2 text-only)."""
    (tmp_path / "shards").mkdir()
    for s in range(2):
        with wds.TarWriter(str(tmp_path / f"shards/{s:05d}.tar")) as sink:
            for j in range(4):
                sink.write({"__key__": f"{s:05d}{j:04d}", "jpg": jpeg_bytes(), "txt": f"web {s} {j}", "json": {}})
    (tmp_path / "cc_sbu_align/image").mkdir(parents=True)
    for i in range(3):
        (tmp_path / f"cc_sbu_align/image/{i}.jpg").write_bytes(jpeg_bytes())
    ann = {"annotations": [{"image_id": i, "caption": f"align {i}"} for i in range(3)]}
    (tmp_path / "cc_sbu_align/filter_cap.json").write_text(json.dumps(ann))
    (tmp_path / "coco").mkdir()
    (tmp_path / "coco/1.jpg").write_bytes(jpeg_bytes())

    def conv(q, a):
        return [{"from": "human", "value": q}, {"from": "gpt", "value": a}]

    llava = [
        {"id": "i1", "image": "coco/1.jpg", "conversations": conv("<image>\nWhat is it?", "A green square.")},
        {"id": "t1", "conversations": conv("Hi", "Hello.")},
        {"id": "i2", "image": "coco/1.jpg", "conversations": conv("Colour?\n<image>", "Green.")},
        {"id": "t2", "conversations": conv("How many shapes?", "There are three shapes.")},
    ]
    (tmp_path / "llava.json").write_text(json.dumps(llava))
    return tmp_path


def write_yaml(path, data_lines):
    path.write_text("data:\n" + "".join(f"  {line}\n" for line in data_lines))
    return path


def answers(samples, tok):
    return [tok.decode([t for t, lab in zip(s["input_ids"], s["labels"]) if lab >= 0]).strip() for s in samples]


def test_single_json_stays_map_style(data_dir, tiny_tokenizer):
    cfg = load_config(write_yaml(data_dir / "c.yaml", [f"path: {data_dir}/cc_sbu_align/filter_cap.json"]))
    ds = dataset_from_config(cfg.data, tiny_tokenizer, N, to_tensor)
    assert isinstance(ds, MultimodalDataset) and len(ds) == 3


def test_shard_pattern_streams(data_dir, tiny_tokenizer):
    cfg = load_config(write_yaml(data_dir / "c.yaml", [f"path: '{data_dir}/shards/{{00000..00001}}.tar'"]))
    ds = dataset_from_config(cfg.data, tiny_tokenizer, N, to_tensor, seed=5, rank=0, world=1)
    assert isinstance(ds, ShardStream) and len(ds.urls) == 2
    assert sorted(answers(ds, tiny_tokenizer)) == sorted(f"web {s} {j}" for s in range(2) for j in range(4))


def test_sources_mix_from_yaml(data_dir, tiny_tokenizer):
    cfg = load_config(
        write_yaml(
            data_dir / "mix.yaml",
            [
                "source: captions",
                "sources:",
                f"  - {{path: {data_dir}/shards, ratio: 115}}",
                f"  - {{path: {data_dir}/cc_sbu_align/filter_cap.json, ratio: 14, type: captions}}",
                "mix: batch",
            ],
        )
    )
    assert cfg.data.sources[0].ratio == 115 and cfg.data.sources[1].type == "captions"
    with pytest.raises(ValueError, match="batch size"):
        dataset_from_config(cfg.data, tiny_tokenizer, N, to_tensor)
    ds = dataset_from_config(cfg.data, tiny_tokenizer, N, to_tensor, batch_size=2, rank=0, world=1)
    assert isinstance(ds, MixedStream)
    got = [
        answers([s for s in b if s is not None], tiny_tokenizer) for b in DataLoader(ds, batch_size=2, collate_fn=list)
    ]
    assert got and all(len({a.split()[0] for a in b}) == 1 for b in got)  # each batch from one source
    ds.set_epoch(0)
    assert ds.skipped["total"] == 0


def test_unknown_source_key_is_named(tmp_path):
    path = write_yaml(tmp_path / "bad.yaml", ["sources:", "  - {path: x.json, ratoi: 2}"])
    with pytest.raises(ValueError, match=r"data\.sources.*ratoi"):
        load_config(path)


def test_llava_text_only_end_to_end(data_dir, tiny_spec):
    """Text-only and image samples from one LLaVA JSON in one batch, through the model."""
    from mmalign.model import build_model, image_transform_for, num_image_tokens

    model, tok = build_model(tiny_spec("llava"))
    cfg = load_config(
        write_yaml(
            data_dir / "c.yaml", ["source: conversations", "template: vicuna_v1", f"path: {data_dir}/llava.json"]
        )
    )
    ds = dataset_from_config(cfg.data, tok, num_image_tokens(model.config), image_transform_for(model))
    assert [ds[i]["pixel_values"] is None for i in range(4)] == [False, True, False, True]
    batch = next(iter(DataLoader(ds, batch_size=4, collate_fn=lambda b: collate(b, tok.pad_token_id))))
    assert batch["pixel_values"].shape[0] == 2 and batch["input_ids"].shape[0] == 4
    loss = model(**batch).loss
    loss.backward()
    assert torch.isfinite(loss) and model.model.multi_modal_projector.linear_1.weight.grad.abs().sum() > 0
    text_only = collate([ds[1], ds[3]], tok.pad_token_id)
    assert text_only["pixel_values"] is None
    assert torch.isfinite(model(**{k: v for k, v in text_only.items() if v is not None}).loss)


def test_llava_form_pretraining_json_as_captions(data_dir, tiny_tokenizer):
    """ShareGPT4V-PT is LLaVA JSON: with source: captions, the answer is the caption."""
    cfg = load_config(write_yaml(data_dir / "c.yaml", ["caption_format: plain", f"path: {data_dir}/llava.json"]))
    ds = dataset_from_config(cfg.data, tiny_tokenizer, N, to_tensor)
    assert len(ds) == 2 and Counter(ds.skipped["counts"]) == {"text-only record in caption data": 2}
    assert [r.caption for r in ds.records] == ["A green square.", "Green."]


def test_group_by_length_sampler(data_dir, tiny_tokenizer):
    from mmalign.data.build import sampler_from_config

    cfg = load_config(
        write_yaml(
            data_dir / "c.yaml", ["source: conversations", "group_by_length: true", f"path: {data_dir}/llava.json"]
        )
    )
    ds = dataset_from_config(cfg.data, tiny_tokenizer, N, to_tensor)
    s = sampler_from_config(cfg.data, ds, 2, seed=0)
    assert ds.lengths[:2] == [7, -2] and sorted(s) == [0, 1, 2, 3]
    assert [{ds.lengths[i] > 0 for i in list(s)[k : k + 2]} for k in (0, 2)] in ([{True}, {False}], [{False}, {True}])
    cfg.data.group_by_length = False
    assert sampler_from_config(cfg.data, ds, 2) is None


def test_check_data_names_bad_json_in_every_source(data_dir):
    """check_data reads what training reads, with no tokenizer: bad JSON anywhere in data.sources
    is a DataError naming file, line and column; dataset_from_config raises the same."""
    bad = data_dir / "broken.json"
    bad.write_text('[\n  {"image": "coco/1.jpg", "caption": "one"}\n  {"image": "coco/1.jpg", "caption": "two"}\n]')
    lines = ["sources:", f"  - {{path: {data_dir}/shards}}", f"  - {{path: {bad}}}"]
    cfg = load_config(write_yaml(data_dir / "mix.yaml", lines))
    with pytest.raises(DataError, match=rf"^{bad}:3:3: invalid JSON: Expecting ',' delimiter"):
        check_data(cfg.data)
    with pytest.raises(DataError, match=rf"^{bad}:3:3: invalid JSON"):
        dataset_from_config(cfg.data, None, N, to_tensor, batch_size=2, rank=0, world=1)


def test_check_data_reads_records_as_the_loader_does(data_dir, caplog):
    cfg = load_config(write_yaml(data_dir / "c.yaml", ["caption_format: plain", f"path: {data_dir}/llava.json"]))
    with caplog.at_level(logging.INFO, logger="mmalign.data"):
        check_data(cfg.data)  # ShareGPT4V-PT form read as captions: 2 text-only records dropped
    log = "\n".join(r.getMessage() for r in caplog.records)
    assert "llava.json: 2 records, 2 to be skipped {'text-only record in caption data': 2}" in log
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]  # each skip is the loader's to name
    (data_dir / "text.json").write_text(json.dumps([json.loads((data_dir / "llava.json").read_text())[1]]))
    cfg.data.path = str(data_dir / "text.json")
    with pytest.raises(DataError, match=r"text\.json: no usable records \(\{'text-only record in caption data': 1\}\)"):
        check_data(cfg.data)


def test_check_data_finds_the_shards(data_dir, caplog):
    cfg = load_config(write_yaml(data_dir / "c.yaml", [f"path: '{data_dir}/shards/{{00000..00002}}.tar'"]))
    with caplog.at_level(logging.WARNING):
        check_data(cfg.data)  # 00002.tar is missing: warned about, counted by the stream
    assert "1 of 3 shards do not exist, e.g. " + str(data_dir / "shards/00002.tar") in caplog.text
    cfg.data.path = f"{data_dir}/shards/{{00005..00009}}.tar"
    with pytest.raises(DataError, match=r"none of its 5 shard\(s\) exists"):
        check_data(cfg.data)
    cfg.data.path = str(data_dir / "nowhere")
    with pytest.raises(DataError, match="nowhere: no such file"):
        check_data(cfg.data)


def test_train_names_bad_json_before_any_model_loads(data_dir, tmp_path):
    """`mmalign train` checks the data first: the model path does not even exist, and the error
    is the data file's, as one CLI line, not a traceback after minutes of model loading."""
    from mmalign.cli import main

    bad = data_dir / "caps.json"
    bad.write_text('[\n  {"image": "coco/1.jpg", "caption": "one",}\n]')
    config = tmp_path / "stage1.yaml"
    config.write_text(
        f"model: {{path: {tmp_path}/no-such-model}}\ndata: {{path: {bad}}}\ntrain: {{output_dir: {tmp_path}/run}}\n"
    )
    with pytest.raises(SystemExit) as err:
        main(["train", str(config)])
    assert (
        err.value.code
        == f"mmalign train: error: {bad}:2:44: invalid JSON: Expecting property name enclosed in double quotes"
    )


def test_a_checked_file_is_read_once(data_dir, tiny_tokenizer, caplog):
    """dataset_from_config takes check_data's records when the file is unchanged (a large JSON
    is read once per run), names the skips once, and reads a changed file again."""
    path = data_dir / "caps.json"

    def write(caption):  # same size every time; the modification time is kept
        path.write_text(json.dumps([{"image": "coco/1.jpg", "caption": caption}, {"image": "coco/1.jpg"}]))
        os.utime(path, ns=(0, 0))

    write("one")
    cfg = load_config(write_yaml(data_dir / "c.yaml", [f"path: {path}"]))
    check_data(cfg.data)
    write("two")  # unchanged to os.stat: check_data's read is used
    with caplog.at_level(logging.WARNING):
        ds = dataset_from_config(cfg.data, tiny_tokenizer, N, to_tensor)
    assert [r.caption for r in ds.records] == ["one"] and ds.skipped["counts"] == {"missing caption": 1}
    assert caplog.text.count("missing caption") == 1
    ds = dataset_from_config(cfg.data, tiny_tokenizer, N, to_tensor)  # taken once: read again
    assert [r.caption for r in ds.records] == ["two"] and ds.skipped["counts"] == {"missing caption": 1}
    check_data(cfg.data)
    write("six")
    os.utime(path, ns=(1, 1))  # changed to os.stat: read again
    assert [r.caption for r in dataset_from_config(cfg.data, tiny_tokenizer, N, to_tensor).records] == ["six"]
