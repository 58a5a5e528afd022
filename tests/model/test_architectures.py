"""One entry per architecture: its facts match the real classes they describe."""

import subprocess
import sys

import pytest
from mm_helpers import ARCHS

from mmalign.model.architectures import ARCHITECTURES, architecture_named, architecture_of
from mmalign.model.freeze import role_of


@pytest.mark.parametrize("arch", ARCHS)
def test_every_parameter_belongs_to_exactly_one_role(build, arch):
    model, _ = build(arch)
    entry = architecture_of(model)
    assert entry is architecture_named(arch)
    for name, _ in model.named_parameters():
        roles = [r for r, prefixes in entry.roles.items() if prefixes and name.startswith(prefixes)]
        assert len(roles) == 1, (name, roles)
        assert role_of(model, name) == roles[0]


@pytest.mark.parametrize("arch", ARCHS)
def test_full_precision_and_conversion_prefixes_name_real_modules(build, arch):
    model, _ = build(arch)
    entry = architecture_of(model)
    names = dict(model.named_modules())
    for module in entry.full_precision:
        assert module in names, module
    params = dict(model.named_parameters())
    prefixes = entry.conversion_prefixes
    assert any(n.startswith(prefixes["vision"]) for n in params)
    assert any(n.startswith(prefixes["projector"]) for n in params)
    assert any(n.startswith(prefixes["text"]) for n in params)
    assert prefixes["lm_head"] in params or prefixes["lm_head"].rsplit(".", 1)[0] in names


def test_unknown_names_are_errors_listing_the_known_ones():
    with pytest.raises(ValueError, match="unknown arch 'gpt4v'"):
        architecture_named("gpt4v")
    with pytest.raises(ValueError, match="unsupported model_type 'bert'"):
        architecture_of("bert")
    assert len({a.name for a in ARCHITECTURES.values()}) == len(ARCHITECTURES)


@pytest.mark.parametrize("first", ["mmalign.recipes", "mmalign.config", "mmalign.model.architectures", "mmalign.model"])
def test_each_module_imports_first_in_a_fresh_process(first):
    """No import cycle: whichever module a user imports first, it and the rest load."""
    code = f"import {first}\nimport mmalign.model, mmalign.recipes, mmalign.train.loop, mmalign.chat.server\n"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr[-2000:]


def test_the_package_and_the_cli_parser_stay_light():
    """`import mmalign`, recipes, config and the CLI's parser pull in neither torch nor
    transformers, so `mmalign --help` answers at once."""
    code = (
        "import sys\n"
        "import mmalign, mmalign.recipes, mmalign.config\n"
        "from mmalign.cli import build_parser\n"
        "build_parser()\n"
        "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]", done.stdout
