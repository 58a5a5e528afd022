from mmalign.evaluate.report import ROWS, table, write_toy_report

STAGE1 = {
    "n_scenes": 16,
    "n_questions": 100,
    "vqa_accuracy": {"colour": 0.5, "count": 0.25, "shape": 0.125},
    "presence": {"precision": 0.5, "recall": 1.0, "f1": 0.6667, "yes_ratio": 0.75},
    "describe_long": {
        "prompt": "Describe this image in detail.",
        "chair_i": 0.4,
        "chair_s": 0.8,
        "object_recall": 0.3,
        "mean_words": 12.34,
        "repeated_trigram_rate": 0.1,
        "repeated_sentence_rate": 0.25,
        "unfinished_rate": 0.5,
        "malformed_sentence_rate": 0.125,
    },
    "describe_short": {"prompt": "short", "chair_i": 0.2, "mean_words": 7.0},
}
STAGE2 = {
    "n_scenes": 16,
    "n_questions": 100,
    "vqa_accuracy": {"colour": 0.875, "count": 0.5, "shape": 1.0, "position": 0.625},
    "presence": {"precision": 0.9, "recall": 0.9, "f1": 0.9, "yes_ratio": 0.5},
    "describe_long": {
        "prompt": "Describe this image in detail.",
        "chair_i": 0.05,
        "chair_s": 0.125,
        "object_recall": 0.95,
        "mean_words": 40.0,
        "repeated_trigram_rate": 0.0,
        "repeated_sentence_rate": 0.0,
        "unfinished_rate": 0.0,
        "malformed_sentence_rate": 0.0,
    },
    "describe_short": {"prompt": "short", "chair_i": 0.0, "mean_words": 15.55},
}


def rows_of(md: str) -> dict[str, list[str]]:
    out = {}
    for line in md.splitlines():
        if line.startswith("| ") and not line.startswith("| metric"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            out[cells[0]] = cells[1:]
    return out


def test_write_toy_report_markdown_and_png(tmp_path):
    text = write_toy_report({"stage1": STAGE1, "stage2": STAGE2}, tmp_path, minutes=12.34)
    md = (tmp_path / "report.md").read_text()
    assert md == text
    assert "16 held-out scenes" in md
    assert "12.3 min" in md
    assert "| metric | stage1 | stage2 |" in md
    assert "![report](report.png)" in md
    rows = rows_of(md)
    assert rows["colour accuracy"] == ["50.0%", "87.5%"]
    assert rows["shape accuracy"] == ["12.5%", "100.0%"]
    assert rows["count accuracy"] == ["25.0%", "50.0%"]
    assert rows["position accuracy"] == ["-", "62.5%"]  # only stage 2 has it
    assert rows["presence F1"] == ["0.667", "0.900"]
    assert rows["presence yes-ratio"] == ["0.75", "0.50"]
    assert rows["CHAIRi, detailed prompt"] == ["40.0%", "5.0%"]
    assert rows["CHAIRs, detailed prompt"] == ["80.0%", "12.5%"]
    assert rows["object recall, detailed prompt"] == ["30.0%", "95.0%"]
    assert rows["mean words, detailed prompt"] == ["12.3", "40.0"]
    assert rows["repeated-trigram rate, detailed prompt"] == ["10.0%", "0.0%"]
    assert rows["repeated-sentence rate, detailed prompt"] == ["25.0%", "0.0%"]
    assert rows["unfinished rate, detailed prompt"] == ["50.0%", "0.0%"]
    assert rows["malformed-sentence rate, detailed prompt"] == ["12.5%", "0.0%"]
    assert rows["CHAIRi, short prompt"] == ["20.0%", "0.0%"]
    assert rows["mean words, short prompt"] == ["7.0", "15.6"]
    # relation accuracy is in neither stage: no row; every other metric has exactly one
    assert "relation accuracy" not in rows
    assert set(rows) == {label for label, _, _ in ROWS} - {"relation accuracy"}
    assert md.count("| colour accuracy |") == 1

    png = (tmp_path / "report.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(png) > 1000


def test_report_without_minutes_and_single_stage(tmp_path):
    text = write_toy_report({"only": {"n_scenes": 3, "presence": {"f1": 0.5}}}, tmp_path)
    assert "min." not in text
    assert "3 held-out scenes" in text
    assert rows_of(text) == {"presence F1": ["0.500"]}
    assert (tmp_path / "report.png").read_bytes()[:4] == b"\x89PNG"


def test_toy_table_header_and_separator():
    text = table({"a": STAGE1, "b": STAGE2, "c": {}}, ROWS)
    lines = text.splitlines()
    assert lines[0] == "| metric | a | b | c |"
    assert lines[1] == "|---|---|---|---|"
    assert rows_of(text)["colour accuracy"] == ["50.0%", "87.5%", "-"]
