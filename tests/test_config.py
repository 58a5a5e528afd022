from pathlib import Path

import pytest

from mmalign.config import DataConfig, ModelConfig, RunConfig, TrainConfig, load_config, to_dict
from mmalign.recipes import RECIPES

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
PIPELINES = ("curate_", "recaption_")  # curation / recaption pipeline YAMLs, not stage configs (as in test_recipes)
CONFIG_FILES = sorted(p for p in CONFIG_DIR.glob("*.yaml") if not p.name.startswith(PIPELINES))


def test_configs_directory_is_not_empty():
    names = {p.name for p in CONFIG_FILES}
    assert {"toy_stage1.yaml", "toy_stage2.yaml", "minigpt4_stage1.yaml", "sharegpt4v_stage2.yaml"} <= names


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: p.name)
def test_every_config_file_loads_and_names_a_known_recipe(path):
    cfg = load_config(path)
    assert isinstance(cfg, RunConfig)
    assert isinstance(cfg.model, ModelConfig) and isinstance(cfg.data, DataConfig)
    assert isinstance(cfg.train, TrainConfig)
    assert cfg.model.recipe in RECIPES, f"{path.name}: unknown recipe {cfg.model.recipe!r}"
    assert cfg.train.stage in ("stage1", "stage2")
    assert cfg.data.source in ("captions", "conversations", "toy")
    # the YAML floats ("1.0e-4") and ints arrive with the annotated types
    assert type(cfg.train.lr) is float and type(cfg.train.max_steps) is int and type(cfg.train.resume) is bool
    assert isinstance(cfg.train.betas, tuple) and len(cfg.train.betas) == 2
    assert 0 < cfg.train.lr < 1 and cfg.train.min_lr <= cfg.train.lr
    # file stage and file name agree (minigpt4_stage1.yaml -> stage1)
    assert path.stem.endswith(cfg.train.stage)


def test_yaml_values_override_defaults():
    cfg = load_config(CONFIG_DIR / "minigpt4_stage1.yaml")
    assert cfg.model.recipe == "minigpt4-vicuna7b"
    assert cfg.model.dtype == "float16" and cfg.model.device == "cuda"
    assert cfg.train.max_steps == 20000 and cfg.train.batch_size == 64 and cfg.train.global_batch_size == 256
    assert cfg.train.lr == pytest.approx(1e-4) and cfg.train.warmup_steps == 5000
    assert cfg.data.clean_captions is True and cfg.data.num_workers == 4
    # a field not in the file keeps its default
    assert cfg.train.betas == (0.9, 0.999) and cfg.model.path is None

    cfg2 = load_config(CONFIG_DIR / "toy_stage2.yaml")
    assert cfg2.data.source == "conversations" and cfg2.data.template == "minigpt4_v0"
    assert cfg2.train.lr == pytest.approx(1e-3) and cfg2.train.min_lr == pytest.approx(3e-4)


def test_defaults_without_file():
    cfg = load_config()
    assert to_dict(cfg) == to_dict(RunConfig())
    assert cfg.train.lr == 1e-4 and cfg.model.recipe is None


def test_dotted_overrides_are_coerced():
    cfg = load_config(
        CONFIG_DIR / "toy_stage1.yaml",
        [
            "train.lr=1e-4",
            "train.betas=0.9,0.95",
            "model.path=none",
            "train.resume=false",
            "train.max_steps=7",
            "data.clean_captions=0",
            "model.attn_implementation=sdpa",
        ],
    )
    assert cfg.train.lr == 1e-4 and type(cfg.train.lr) is float
    assert cfg.train.betas == (0.9, 0.95)
    assert cfg.model.path is None
    assert cfg.train.resume is False
    assert cfg.train.max_steps == 7 and type(cfg.train.max_steps) is int
    assert cfg.data.clean_captions is False
    assert cfg.model.attn_implementation == "sdpa"
    # untouched values still come from the file
    assert cfg.train.batch_size == 64 and cfg.model.recipe == "toy-minigpt4"


def test_override_beats_file_and_later_override_wins():
    cfg = load_config(CONFIG_DIR / "toy_stage2.yaml", ["model.path=runs/x", "model.path=NULL", "train.resume=Yes"])
    assert cfg.model.path is None
    assert cfg.train.resume is True
    cfg = load_config(CONFIG_DIR / "toy_stage2.yaml", ["model.path=runs/x"])
    assert cfg.model.path == "runs/x"


def test_none_is_a_string_for_non_optional_fields():
    # "none" only means None where the field accepts None
    assert load_config(None, ["data.instructions=none"]).data.instructions == "none"


def test_value_with_equals_sign_is_kept_whole():
    cfg = load_config(None, ["data.path=a=b.json"])
    assert cfg.data.path == "a=b.json"


def test_unknown_key_in_override_names_the_key():
    with pytest.raises(KeyError, match=r"train\.'lrr'|train\.lrr"):
        load_config(None, ["train.lrr=1e-4"])


def test_unknown_key_in_yaml_names_the_key(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("model:\n  recipe: toy-minigpt4\ndata:\n  sourcee: toy\n")
    with pytest.raises(KeyError, match="sourcee") as e:
        load_config(p)
    assert "data." in str(e.value)


def test_unknown_section_names_the_section(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("optim:\n  lr: 0.1\n")
    with pytest.raises(KeyError, match="optim"):
        load_config(p)


@pytest.mark.parametrize("item", ["train.lr", "lr=1e-4", "optim.lr=1e-4", "train.=3", "=3"])
def test_malformed_override_raises_naming_it(item):
    with pytest.raises(ValueError, match="section.key=value") as e:
        load_config(None, [item])
    assert repr(item) in str(e.value)


@pytest.mark.parametrize(
    "item, key",
    [
        ("train.resume=maybe", "train.resume"),
        ("train.lr=fast", "train.lr"),
        ("train.max_steps=1.5", "train.max_steps"),
        ("train.betas=0.9,x", "train.betas"),
    ],
)
def test_bad_value_raises_naming_the_key(item, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        load_config(None, [item])


@pytest.mark.parametrize("betas", ["0.9", "0.9,0.95,0.99"])
def test_betas_need_exactly_two_values(betas):
    with pytest.raises(ValueError, match=r"train\.betas"):
        load_config(None, [f"train.betas={betas}"])


def test_empty_yaml_and_empty_section(tmp_path):
    p = tmp_path / "empty.yaml"
    p.write_text("")
    assert to_dict(load_config(p)) == to_dict(RunConfig())
    p.write_text("train:\n")
    assert to_dict(load_config(p)) == to_dict(RunConfig())


def test_yaml_list_betas_and_string_float(tmp_path):
    p = tmp_path / "c.yaml"
    # PyYAML reads "1e-4" (no dot) as a string: it must still become a float
    p.write_text("train:\n  lr: 1e-4\n  betas: [0.8, 0.9]\n")
    cfg = load_config(p)
    assert cfg.train.lr == 1e-4 and type(cfg.train.lr) is float
    assert cfg.train.betas == (0.8, 0.9)
