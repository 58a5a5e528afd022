import pytest
import torch

from mmalign.data import collate, left_pad


def item(n, image=True, start=1):
    ids = list(range(start, start + n))
    return {
        "input_ids": ids,
        "labels": [-100] * (n // 2) + ids[n // 2 :],
        "pixel_values": torch.ones(3, 2, 2) * n if image else None,
    }


def test_right_padding_and_masks():
    b = collate([item(3), None, item(5)], pad_token_id=0)
    assert b["input_ids"].tolist() == [[1, 2, 3, 0, 0], [1, 2, 3, 4, 5]]
    assert b["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    assert b["labels"].tolist() == [[-100, 2, 3, -100, -100], [-100, -100, 3, 4, 5]]
    assert b["pixel_values"].shape == (2, 3, 2, 2) and b["pixel_values"][1, 0, 0, 0] == 5
    assert b["input_ids"].dtype == torch.long and b["labels"].dtype == torch.long


def test_images_optional_and_all_none():
    b = collate([item(2, image=False), item(3, image=False)], pad_token_id=9)
    assert b["pixel_values"] is None and b["input_ids"][0, -1] == 9
    mixed = collate([item(2, image=False), item(3)], pad_token_id=9)
    assert mixed["pixel_values"].shape == (1, 3, 2, 2)
    assert collate([None, None], pad_token_id=0) is None
    assert collate([], pad_token_id=0) is None


def test_tensor_inputs_accepted():
    x = item(3)
    x["input_ids"], x["labels"] = torch.tensor(x["input_ids"]), torch.tensor(x["labels"])
    assert collate([x, item(4)], pad_token_id=0)["input_ids"].shape == (2, 4)


def test_left_pad():
    out = left_pad([[5, 6, 7], [8]], pad_id=0)
    assert out["input_ids"].tolist() == [[5, 6, 7], [0, 0, 8]]
    assert out["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]


def test_works_as_dataloader_collate():
    from functools import partial

    data = [item(2), None, item(4)]
    loader = torch.utils.data.DataLoader(data, batch_size=3, collate_fn=partial(collate, pad_token_id=0))
    (b,) = list(loader)
    assert b["input_ids"].shape == (2, 4)


def test_pack_rows_first_fit_decreasing_keeps_samples_whole():
    from mmalign.data.collate import pack_rows

    # longest first, each into the first row with room: 8 | 6 | 5, then 3 -> the 6 row, 2 -> the 8 row
    assert pack_rows([3, 8, 5, 2, 6], budget=10) == [[1, 3], [4, 0], [2]]
    with pytest.raises(ValueError, match="a sample of 11 tokens does not fit a packed row of 10"):
        pack_rows([4, 11], budget=10)


def test_packed_batch_restarts_positions_and_masks_each_first_label():
    b = collate([item(3), None, item(5), item(2, image=False)], pad_token_id=0, pack_tokens=8)
    # longest first: [5-token sample, 3-token sample] in row 0, the 2-token one in row 1
    assert b["input_ids"].tolist() == [[1, 2, 3, 4, 5, 1, 2, 3], [1, 2, 0, 0, 0, 0, 0, 0]]
    assert b["position_ids"].tolist() == [[0, 1, 2, 3, 4, 0, 1, 2], [0, 1, 0, 1, 2, 3, 4, 5]]
    assert b["sample_ids"].tolist() == [[1, 1, 1, 1, 1, 0, 0, 0], [2, 2, -1, -1, -1, -1, -1, -1]]
    assert b["labels"].tolist() == [[-100, -100, 3, 4, 5, -100, 2, 3], [-100, 2] + [-100] * 6]
    assert b["pixel_values"][:, 0, 0, 0].tolist() == [5, 3]  # images in packed order
    assert b["attention_mask"] is None and b["num_samples"] == 3
