"""`mmalign curate <step>`: the config and its overrides, flags, one-line errors, the status funnel,
and the YAMLs that repeat the papers' prompts."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from mmalign.cli import main
from mmalign.curate.commands import apply_flags
from mmalign.curate.config import (
    CONTINUE_PROMPT,
    DESCRIBE_PROMPT,
    FIX_INSTRUCTION,
    SHARECAPTIONER_PROMPT,
    load_curate_config,
)
from mmalign.curate.filters import DEFAULT_RULES, FAILURE_PHRASES
from mmalign.curate.store import StepLog

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def test_published_configs_repeat_the_papers_prompts():
    cfg = load_curate_config(CONFIGS / "curate_minigpt4.yaml")
    assert cfg.describe.prompt == DESCRIBE_PROMPT and cfg.describe.continue_prompt == CONTINUE_PROMPT
    assert cfg.describe.min_tokens == 80 and cfg.fix.instruction == FIX_INSTRUCTION
    phrases = next(r for r in cfg.filter.rules if r["name"] == "failure_phrase")["phrases"]
    assert tuple(phrases) == FAILURE_PHRASES
    assert [r["name"] for r in cfg.filter.rules] == [r["name"] for r in DEFAULT_RULES]
    share = load_curate_config(CONFIGS / "recaption_sharegpt4v.yaml").recaption
    assert share.prompt == SHARECAPTIONER_PROMPT and (share.batch_size, share.num_beams) == (4, 3)
    assert share.repetition_penalty == 1.5
    toy = load_curate_config(CONFIGS / "curate_toy.yaml")
    assert toy.fix.instruction == FIX_INSTRUCTION  # the toy fixes with the paper's instruction too


def test_overrides_reach_nested_sections_and_bad_keys_are_named(tmp_path):
    cfg = load_curate_config(None, ["fix.endpoint.budget=7", "describe.min_tokens=12", "recaption.base_urls=a,b"])
    assert (cfg.fix.endpoint.budget, cfg.describe.min_tokens, cfg.recaption.base_urls) == (7, 12, ["a", "b"])
    with pytest.raises(ValueError, match="unknown config key fix.endpoint.'budgt'"):
        load_curate_config(None, ["fix.endpoint.budgt=7"])
    with pytest.raises(ValueError, match="describe.min_tokens"):
        load_curate_config(None, ["describe.min_tokens=many"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("filter:\n  rules:\n    - {name: x, kind: nope}\n")
    with pytest.raises(ValueError, match=r"bad.yaml: filter.rules\[0\] \(x\): unknown kind 'nope'"):
        load_curate_config(bad)


def test_flags_go_to_the_steps_endpoint_or_local_model():
    cfg = load_curate_config(None)
    apply_flags(cfg, "fix", "http://h/v1", "m")
    assert (cfg.fix.endpoint.base_url, cfg.fix.endpoint.model) == ("http://h/v1", "m")
    apply_flags(cfg, "describe", None, "runs/stage1")  # the local backend: --model is the folder
    assert cfg.describe.model == "runs/stage1"
    with pytest.raises(ValueError, match="do not apply to the filter step"):
        apply_flags(cfg, "filter", "http://h/v1", None)


def test_errors_are_one_line_and_status_prints_the_funnel(tmp_path, capsys):
    with pytest.raises(SystemExit, match="mmalign curate fix: error: fix: no described records"):
        main(["curate", "fix", f"workdir={tmp_path}", "--base-url", "http://127.0.0.1:9/v1", "--model", "m"])
    with pytest.raises(SystemExit, match="mmalign curate describe: error: images: the config names no images"):
        main(["curate", "describe", f"workdir={tmp_path}", "describe.model=x"])
    with StepLog(tmp_path, "describe") as log:
        log.done("a", image="a.jpg", text="t", continued=True)
        log.failed("b", "corrupt image: truncated", image="b.jpg")
    main(["curate", "status", f"workdir={tmp_path}"])
    out = capsys.readouterr().out
    assert "| images described (failed: still pending) | 1 (1) |" in out and "| ↳ asked to Continue | 1 |" in out


def test_help_imports_nothing_heavy():
    code = "import sys; from mmalign.cli import build_parser; build_parser(); print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"


def test_a_missing_config_file_is_named(tmp_path):
    with pytest.raises(SystemExit, match=r"mmalign curate filter: error: .*absent.yaml: no such file"):
        main(["curate", "filter", str(tmp_path / "absent.yaml")])
