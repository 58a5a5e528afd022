import json
import logging
import pickle
import re

import pytest
import torch
from PIL import Image

from mmalign.data import (
    CaptionRecord,
    ConversationRecord,
    DataError,
    MultimodalDataset,
    SkipCounter,
    collate,
    make_caption_encoder,
    make_conversation_encoder,
    merge_summaries,
    read_caption_json,
    read_llava_json,
)
from mmalign.prompts import IGNORE_INDEX, image_token_id

N = 4


def to_tensor(im: Image.Image) -> torch.Tensor:
    im = im.resize((8, 8))
    return torch.tensor(list(im.get_flattened_data()), dtype=torch.float32).T.reshape(3, 8, 8) / 255


def save_jpeg(path, color=(200, 30, 30)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (32, 32), color).save(path, "JPEG")


def save_truncated_jpeg(path):
    save_jpeg(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def warnings_text(caplog):
    return "\n".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)


def test_bad_records_are_skipped_counted_and_named(tmp_path, tiny_tokenizer, caplog):
    save_jpeg(tmp_path / "imgs/good1.jpg")
    save_jpeg(tmp_path / "imgs/good2.png")
    save_truncated_jpeg(tmp_path / "imgs/corrupt.jpg")
    (tmp_path / "imgs/garbage.jpg").write_bytes(b"not an image at all")
    records = [
        {"image": "imgs/good1.jpg", "caption": "A red square."},
        {"image": "imgs/missing.jpg", "caption": "never seen"},
        {"image": "imgs/corrupt.jpg", "caption": "half a file"},
        {"image": "imgs/good1.jpg", "caption": "   "},
        {"image": "imgs/garbage.jpg", "caption": "garbage bytes"},
        {"image": "imgs/good2.png", "caption": "Another one."},
        {"caption": "no image key"},
    ]
    path = tmp_path / "caps.json"
    path.write_text(json.dumps(records))
    skips = SkipCounter()
    with caplog.at_level(logging.WARNING):
        recs = read_caption_json(path, tmp_path, skips=skips)
        assert len(recs) == 5  # empty caption and malformed record dropped at read time
        ds = MultimodalDataset(recs, make_caption_encoder(tiny_tokenizer, N), to_tensor, skips=skips)
        items = [ds[i] for i in range(len(ds))]
    good = [x for x in items if x is not None]
    assert len(good) == 2
    assert all(x["pixel_values"].shape == (3, 8, 8) for x in good)
    assert ds.skipped["counts"] == {
        "empty caption": 1,
        "malformed record": 1,
        "missing image": 1,
        "corrupt image": 2,
    }
    assert ds.skipped["total"] == 5
    log = warnings_text(caplog)
    for i in (1, 2, 3, 4, 6):
        assert f"caps.json#{i}" in log
    assert "missing.jpg" in log and "corrupt.jpg" in log and "garbage.jpg" in log
    batch = collate(items, tiny_tokenizer.pad_token_id)
    assert batch["input_ids"].shape[0] == 2 and batch["pixel_values"].shape == (2, 3, 8, 8)
    # MiniGPT-4 stage 1: caption cleaned, [BOS][image][caption\n]
    learned = [t for t, lab in zip(good[0]["input_ids"], good[0]["labels"]) if lab != IGNORE_INDEX]
    assert tiny_tokenizer.decode(learned) == "a red square\n"


def test_check_images_at_read_time(tmp_path, caplog):
    save_jpeg(tmp_path / "a.jpg")
    path = tmp_path / "caps.json"
    path.write_text(json.dumps([{"image": "a.jpg", "caption": "x"}, {"image": "b.jpg", "caption": "y"}]))
    skips = SkipCounter()
    with caplog.at_level(logging.WARNING):
        recs = read_caption_json(path, skips=skips, check_images=True)
    assert [r.caption for r in recs] == ["x"] and skips.counts == {"missing image": 1}
    assert "caps.json#1" in warnings_text(caplog)


def test_cc_sbu_align_layout(tmp_path):
    root = tmp_path / "cc_sbu_align"
    save_jpeg(root / "image/2.jpg")
    save_jpeg(root / "image/7.jpg")
    ann = {"annotations": [{"image_id": 2, "caption": "A dog."}, {"image_id": "7", "caption": "A cat."}]}
    (root / "filter_cap.json").write_text(json.dumps(ann))
    recs = read_caption_json(root / "filter_cap.json")
    assert [r.caption for r in recs] == ["A dog.", "A cat."]
    assert recs[0].image == root / "image/2.jpg" and "image_id=2" in recs[0].key
    assert recs == read_caption_json(root / "filter_cap.json", root)


def test_caption_records_as_minigpt4_stage2(tmp_path, tiny_tokenizer):
    save_jpeg(tmp_path / "image/2.jpg")
    enc = make_conversation_encoder(tiny_tokenizer, "minigpt4_v0", N)
    ds = MultimodalDataset([CaptionRecord(tmp_path / "image/2.jpg", "A dog.")], enc, to_tensor)
    item = ds[0]
    text = tiny_tokenizer.decode(item["input_ids"])
    assert text.startswith("<s>###Human: <Img>" + "<image>" * N + "</Img> ")
    assert text.endswith(" ###Assistant: A dog.###")


def qa(*pairs):
    return [{"from": f, "value": v} for f, v in pairs]


LLAVA = [
    {
        "id": "img-1",
        "image": "coco/1.jpg",
        "conversations": qa(
            ("human", "What is this?\n<image>"), ("gpt", "A red square."), ("human", "Sure?"), ("gpt", "Yes.")
        ),
    },
    {"id": "text-only", "conversations": qa(("human", "Hi"), ("gpt", "Hello."))},
    {"id": "no-answer", "image": "coco/1.jpg", "conversations": qa(("human", "<image>\nHm?"))},
    {"id": "empty-answer", "conversations": qa(("human", "Hi"), ("gpt", ""))},
    {"id": "marker-no-image", "conversations": qa(("human", "<image>\nHi"), ("gpt", "x"))},
    {"id": "missing-img", "image": "coco/404.jpg", "conversations": qa(("human", "<image>\nQ"), ("gpt", "A"))},
    {"id": "no-marker", "image": "coco/1.jpg", "conversations": qa(("gpt", "junk"), ("human", "Q"), ("gpt", "A"))},
]


@pytest.fixture
def llava_file(tmp_path):
    save_jpeg(tmp_path / "coco/1.jpg")
    path = tmp_path / "llava.json"
    path.write_text(json.dumps(LLAVA))
    return path


def test_llava_json_vicuna(llava_file, tiny_tokenizer, caplog):
    skips = SkipCounter()
    with caplog.at_level(logging.WARNING):
        recs = read_llava_json(llava_file, skips=skips)
    ids = [r.key.split("id=")[1].rstrip(")") for r in recs]
    assert ids == ["img-1", "text-only", "missing-img", "no-marker"]
    assert recs[0].turns[0] == {"role": "user", "content": "<image>\nWhat is this?"}
    assert [t["role"] for t in recs[0].turns] == ["user", "assistant", "user", "assistant"]
    assert recs[1].image is None and recs[1].turns[0]["content"] == "Hi"
    assert recs[3].turns == [  # leading gpt message dropped, marker added for the image
        {"role": "user", "content": "<image>\nQ"},
        {"role": "assistant", "content": "A"},
    ]
    assert skips.counts == {"no answer": 1, "empty answer": 1, "image marker but no image": 1}
    log = warnings_text(caplog)
    for key in ("no-answer", "empty-answer", "marker-no-image"):
        assert f"id={key}" in log
    assert "llava.json#2" in log

    enc = make_conversation_encoder(tiny_tokenizer, "vicuna_v1", N, system="S")
    ds = MultimodalDataset(recs, enc, to_tensor, skips=skips)
    with caplog.at_level(logging.WARNING):
        items = [ds[i] for i in range(len(ds))]
    assert items[2] is None and ds.skipped["counts"]["missing image"] == 1
    assert "id=missing-img" in warnings_text(caplog) and "404.jpg" in warnings_text(caplog)
    assert items[1]["pixel_values"] is None
    img = image_token_id(tiny_tokenizer)
    assert items[0]["input_ids"].count(img) == N and img not in items[1]["input_ids"]
    batch = collate(items, tiny_tokenizer.pad_token_id)
    assert batch["input_ids"].shape[0] == 3
    assert batch["pixel_values"].shape == (2, 3, 8, 8)  # only samples with an image
    assert (batch["input_ids"] == img).sum() == 2 * N


def test_llava_json_minigpt4_marker(llava_file, tiny_tokenizer):
    recs = read_llava_json(llava_file, template="minigpt4_v0")
    assert recs[0].turns[0]["content"] == "<Img><ImageHere></Img> What is this?"
    enc = make_conversation_encoder(tiny_tokenizer, "minigpt4_v0", N)
    ds = MultimodalDataset(recs[:2], enc, to_tensor)
    text = tiny_tokenizer.decode(ds[0]["input_ids"])
    assert "<Img>" + "<image>" * N + "</Img> What is this?" in text


def test_encode_failures_are_counted(tmp_path, tiny_tokenizer, caplog):
    save_jpeg(tmp_path / "a.jpg")
    q, q_img, a = (
        {"role": "user", "content": "Q"},
        {"role": "user", "content": "<image>\nQ"},
        {"role": "assistant", "content": "A"},
    )
    recs = [
        ConversationRecord(tmp_path / "a.jpg", [q_img], key="k-noanswer"),
        ConversationRecord(tmp_path / "a.jpg", [q, a], key="k-nomarker"),
        ConversationRecord(Image.new("RGB", (4, 4)), [q_img, a]),  # in-memory PIL image
    ]
    ds = MultimodalDataset(recs, make_conversation_encoder(tiny_tokenizer, "vicuna_v1", N), to_tensor)
    with caplog.at_level(logging.WARNING):
        items = [ds[i] for i in range(3)]
    assert items[0] is None and items[1] is None and items[2] is not None
    assert ds.skipped["counts"] == {"encode error": 1, "image / placeholder mismatch": 1}
    log = warnings_text(caplog)
    assert "k-noanswer" in log and "k-nomarker" in log


def test_truncation_counted(tmp_path, tiny_tokenizer):
    save_jpeg(tmp_path / "a.jpg")
    rec = CaptionRecord(tmp_path / "a.jpg", "a long caption with many words in it " * 3)
    ds = MultimodalDataset([rec], make_caption_encoder(tiny_tokenizer, N, max_length=N + 4), to_tensor)
    assert len(ds[0]["input_ids"]) == N + 4 and ds.skipped["truncated"] == 1
    ds = MultimodalDataset([rec], make_caption_encoder(tiny_tokenizer, N, max_length=N), to_tensor)
    assert ds[0] is None and ds.skipped["counts"] == {"encode error": 1}


def test_skip_counter_pickles_and_caps_examples():
    c = SkipCounter(max_examples=2)
    for i in range(5):
        c.add("r", f"w{i}")
    c2 = pickle.loads(pickle.dumps(c))  # what a DataLoader worker holds: the same file
    c2.add("r", "w5")
    assert c2.counts == {"r": 6} and c2.examples == {"r": ["w0", "w1"]} and c.total == 6


def test_skip_counter_counts_from_dataloader_workers(tmp_path, tiny_tokenizer):
    save_jpeg(tmp_path / "a.jpg")
    recs = [CaptionRecord(tmp_path / ("a.jpg" if i % 3 else "missing.jpg"), "A dog.", key=f"k{i}") for i in range(12)]
    ds = MultimodalDataset(recs, make_caption_encoder(tiny_tokenizer, N), to_tensor)
    loader = torch.utils.data.DataLoader(ds, batch_size=3, num_workers=2, collate_fn=lambda b: b)
    items = [x for batch in loader for x in batch]
    assert sum(x is None for x in items) == 4
    assert ds.skipped["counts"] == {"missing image": 4} and ds.skipped["total"] == 4
    assert sorted(ds.skipped["examples"]["missing image"]) == ["k0", "k3", "k6", "k9"]


def test_skip_counter_keeps_a_named_log(tmp_path):
    c = SkipCounter(path=tmp_path / "run/skips.jsonl")
    c.add("corrupt image", "shard-3.tar:000030007", "OSError")
    c.add_truncated("x")
    s = c.summary()
    assert s["counts"] == {"corrupt image": 1} and s["truncated"] == 1 and s["log"].endswith("skips.jsonl")
    assert "000030007" in (tmp_path / "run/skips.jsonl").read_text()


# (layout, text, where json stops): a caption list, cc_sbu_align's filter_cap.json, LLaVA JSON
BROKEN_JSON = {
    "caption list": ('[\n  {"image": "a.jpg", "caption": "one"},\n  {"image": "b.jpg" "caption": "two"}\n]\n', "3:21"),
    "cc_sbu_align": (
        '{"annotations": [\n  {"image_id": "2", "caption": "The image shows a dog."},\n'
        '  {"image_id": "3", "caption": "A cat.\n  }\n]}\n',
        "3:39",
    ),
    "llava": (
        '[\n  {"id": "1", "image": "a.jpg", "conversations": [\n    {"from": "human", "value": "<image>\\nHi"},\n'
        '    {"from": "gpt", "value": "Hello."},\n  ]}\n]\n',
        "5:3",
    ),
}


@pytest.mark.parametrize("layout", list(BROKEN_JSON))
def test_malformed_json_names_file_line_and_column(tmp_path, layout):
    text, place = BROKEN_JSON[layout]
    path = tmp_path / "data.json"
    path.write_text(text)
    read = read_llava_json if layout == "llava" else read_caption_json
    with pytest.raises(DataError, match=rf"^{path}:{place}: invalid JSON: "):
        read(path)


def test_non_utf8_json_names_file_line_and_column(tmp_path):
    path = tmp_path / "caps.json"
    path.write_bytes(b'[\n{"image": "a.jpg", "caption": "caf\xe9"}]')
    with pytest.raises(DataError, match=rf"^{path}:2:35: not UTF-8 text \(byte 0xe9\)"):
        read_caption_json(path)


def test_wrong_top_level_is_named(tmp_path):
    path = tmp_path / "caps.json"
    path.write_text(json.dumps({"annotations": {"image_id": "1", "caption": "x"}}))
    with pytest.raises(DataError, match=rf"^{path}: 'annotations' is an object, expected a list"):
        read_caption_json(path)
    path.write_text(json.dumps({"id": "1"}))
    with pytest.raises(DataError, match=rf"^{path}: expected a JSON list of conversations, got an object"):
        read_llava_json(path)


def test_a_record_without_caption_is_missing_not_empty(tmp_path):
    path = tmp_path / "filter_cap.json"
    ann = [{"image_id": "1", "caption": "A dog."}, {"image_id": "2"}, {"image_id": "3", "caption": ""}]
    ann.append({"image_id": "4", "caption": ["not", "text"]})
    path.write_text(json.dumps({"annotations": ann}))
    skips = SkipCounter()
    assert [r.caption for r in read_caption_json(path, skips=skips)] == ["A dog."]
    assert skips.counts == {"missing caption": 1, "empty caption": 1, "malformed record": 1}
    assert skips.examples["missing caption"] == [f"{path}#1 (image_id=2)"]
    assert "'caption' is a list" in skips.events()[-1]["detail"]


def test_truncated_samples_are_named_and_logged(tmp_path, tiny_tokenizer, caplog):
    """Truncation keeps the sample (as the originals do) but is never silent: a warning with the
    record's name for the first few, one line saying the rest are only counted, names in the summary."""
    save_jpeg(tmp_path / "a.jpg")
    long = "a long caption with many words in it " * 3
    recs = [CaptionRecord(tmp_path / "a.jpg", long, key=f"caps.json#{i}") for i in range(4)]
    recs.append(CaptionRecord(tmp_path / "a.jpg", "a dog", key="caps.json#4"))
    skips = SkipCounter(max_examples=2)
    ds = MultimodalDataset(recs, make_caption_encoder(tiny_tokenizer, N, max_length=N + 20), to_tensor, skips=skips)
    with caplog.at_level(logging.WARNING):
        assert all(ds[i] is not None for i in range(5))
    lines = warnings_text(caplog).splitlines()
    assert len(lines) == 3, lines
    assert all(
        re.fullmatch(rf"truncated caps\.json#{i}: \d+ answer token\(s\) past max_length cut", lines[i]) for i in (0, 1)
    )
    assert "more samples truncated" in lines[2] and str(skips.path) in lines[2]
    s = ds.skipped
    assert s["truncated"] == 4 and s["truncated_examples"] == ["caps.json#0", "caps.json#1"] and s["total"] == 0
    assert merge_summaries([s, s])["truncated_examples"] == ["caps.json#0", "caps.json#1"] * 2


def test_random_draws_depend_on_the_sample_and_epoch_only(tmp_path, tiny_tokenizer):
    """The drawn instruction and random crop of a sample are the same whichever DataLoader
    worker makes it and however many there are (so a resume with workers is exact), change
    with the epoch, and leave the process-wide generators as they were."""
    from mmalign.model.processing import random_crop_box

    for i in range(8):
        Image.effect_noise((32, 32), 60 + i).convert("RGB").save(tmp_path / f"{i}.jpg")
    enc = make_conversation_encoder(tiny_tokenizer, "minigpt4_v0", N)
    recs = [CaptionRecord(tmp_path / f"{i}.jpg", "A dog.") for i in range(8)]
    ds = MultimodalDataset(recs, enc, lambda im: to_tensor(im.crop(random_crop_box(im.size))), seed=3)

    def epoch(e, workers):
        ds.set_epoch(e)
        loader = torch.utils.data.DataLoader(ds, batch_size=2, num_workers=workers, collate_fn=lambda b: b)
        return [(x["input_ids"], x["pixel_values"]) for batch in loader for x in batch]

    state = torch.random.get_rng_state()
    ds[0]
    assert torch.equal(torch.random.get_rng_state(), state)  # dropout's generator is not touched
    alone = epoch(0, 0)
    for (ids_a, px_a), (ids_b, px_b) in zip(alone, epoch(0, 2)):
        assert ids_a == ids_b and torch.equal(px_a, px_b)
    assert len({tuple(ids) for ids, _ in alone}) > 1  # instructions are drawn, not fixed
    later = epoch(1, 0)
    assert any(not torch.equal(a[1], b[1]) for a, b in zip(alone, later))  # a new crop each epoch
