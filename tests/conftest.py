"""Shared test fixtures. Nothing here downloads anything: tokenizers are trained in memory."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

_CORPUS = [
    "a red circle above a blue square. a green triangle left of a small yellow star.",
    "Describe this image in detail. Take a look at this image and describe what you notice.",
    "Please provide a detailed description of the picture. Could you describe the contents?",
    "###Human: <Img><ImageHere></Img> ###Assistant: [INST] [/INST] <<SYS>> <</SYS>>",
    "A chat between a curious user and an artificial intelligence assistant. USER: ASSISTANT:",
    "Give the following image: <Img>ImageContent</Img>. You will be able to see the image.",
    "How many shapes are there? There are three shapes. What color is the circle? It is red.",
]


def build_tiny_tokenizer(image_token: bool = True, vocab_size: int = 400) -> PreTrainedTokenizerFast:
    """Byte-level BPE (exact decode of any text) with <s>, </s>, <unk>, <pad> and <image>."""
    specials = ["<unk>", "<s>", "</s>", "<pad>"] + (["<image>"] if image_token else [])
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_special_tokens=["<image>"] if image_token else [],
        clean_up_tokenization_spaces=False,
    )


@pytest.fixture(scope="session")
def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """Shared tiny tokenizer (session-scoped: do not mutate it; build your own to add tokens)."""
    return build_tiny_tokenizer()


@pytest.fixture(scope="session")
def make_tiny_tokenizer() -> Callable[..., PreTrainedTokenizerFast]:
    """The builder, for tests that need a variant (e.g. without <image>) or to mutate one."""
    return build_tiny_tokenizer


TINY_VISION = dict(  # 32 px / patch 8 -> 4x4 = 16 patches (+ CLS); 4 layers so "later half" = 2, 3
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=4,
    num_attention_heads=4,
    image_size=32,
    patch_size=8,
    initializer_range=0.02,
)


def build_tiny_spec(arch: str, tokenizer=None, **overrides):
    """A ModelSpec of tiny random parts for ``arch`` (minigpt4 | minigpt4_patch | llava)."""
    from mmalign.model import ModelSpec

    tok = tokenizer if tokenizer is not None else build_tiny_tokenizer()
    llm = dict(
        model_type="llama",
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=len(tok),
        max_position_embeddings=256,
        initializer_range=0.05,
    )
    vision_type = "clip_vision_model" if arch == "llava" else "blip_2_vision_model"
    kwargs = dict(arch=arch, llm=llm, vision=dict(model_type=vision_type, **TINY_VISION), tokenizer=tok)
    if arch == "minigpt4":
        kwargs.update(
            qformer=dict(
                hidden_size=32,
                num_hidden_layers=2,
                num_attention_heads=4,
                intermediate_size=64,
                vocab_size=50,
                max_position_embeddings=64,
            ),
            num_query_tokens=8,
        )
    kwargs.update(overrides)
    return ModelSpec(**kwargs)


@pytest.fixture
def tiny_spec() -> Callable[..., object]:
    """``tiny_spec(arch, **overrides)`` -> ModelSpec with a fresh tiny tokenizer."""
    return build_tiny_spec


BROWSER_WAIT = 30  # seconds, for any one thing to appear on a page driven by ``browser``


@pytest.fixture(scope="module")
def browser():
    """Debian's headless chromium through Selenium, for the web demo and the review page."""
    from pathlib import Path

    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    chromium, chromedriver = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
    assert chromium.exists() and chromedriver.exists(), "apt-get install -y chromium chromium-driver (see .ci/run)"
    opts = webdriver.ChromeOptions()
    opts.binary_location = str(chromium)  # set explicitly: selenium-manager must not download a browser
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1280,900"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(str(chromedriver)), options=opts)
    driver.set_page_load_timeout(BROWSER_WAIT)
    yield driver
    driver.quit()
