"""Stage-2 training tokens/s, packed rows vs padded batches, on the same model and batches.

A random LLaVA-class model (a small CLIP tower, 64 image tokens; a Llama LLM of width 128 with
4 layers and positions to 2048; projector + LLM train, as in ShareGPT4V / LLaVA stage 2) trains on
batches of 8 conversations whose lengths follow a LLaVA-665k-like mix: most are short VQA answers,
some multi-turn chats and detailed descriptions, a few long text-only conversations up to 2,048
tokens. Padded batches are as long as their longest sample; packed ones (`data.packing=true`,
rows of 2,048 tokens) place the same samples whole. tokens/s counts real (non-padding) tokens of
a full step (forward, backward, AdamW). A second row repeats it with every sample 512 tokens long,
where there is no padding to remove and packing only adds the block mask.

Per-sample losses of both layouts are checked to agree before anything is timed.

    PYTHONPATH=. python -m bench.packing [--quick]
"""

from __future__ import annotations

import argparse
import random
from typing import Any

import torch

from bench.common import Row, Timing, interleaved, machine, table, verdict
from mmalign.data.collate import collate
from mmalign.model.inputs import per_sample_losses, training_inputs

BUDGET = 2048
IMAGE_TOKENS = 64


def llava_model(attn: str) -> Any:
    """Random LLaVA-1.5-class model: CLIP 64 px / 8 -> 64 patches (CLS dropped), MLP, Llama."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    vision = CLIPVisionConfig(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4)
    vision.image_size, vision.patch_size = 64, 8
    text = LlamaConfig(hidden_size=128, intermediate_size=344, num_hidden_layers=4, num_attention_heads=4)
    text.num_key_value_heads, text.vocab_size, text.max_position_embeddings = 4, 1000, BUDGET
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=999, vision_feature_layer=-2)
    config.image_seq_length = IMAGE_TOKENS
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(config)
    model.set_attn_implementation(attn)
    for p in model.model.vision_tower.parameters():  # stage 2: projector + LLM train
        p.requires_grad_(False)
    model.train()
    model.model.vision_tower.eval()
    return model


def llava_like_lengths(n: int, seed: int) -> list[tuple[int, bool]]:
    """(text tokens, has image) per sample: LLaVA-665k-like (many short answers, a long tail)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        kind = rng.random()
        if kind < 0.55:  # VQA: one short question, a word or a sentence back
            out.append((rng.randint(20, 90), True))
        elif kind < 0.85:  # multi-turn chats
            out.append((rng.randint(100, 500), True))
        elif kind < 0.95:  # detailed descriptions / reasoning
            out.append((rng.randint(300, 900), True))
        else:  # ShareGPT text-only conversations, cut at 2048
            out.append((rng.randint(800, BUDGET), False))
    return out


def samples(lengths: list[tuple[int, bool]], seed: int) -> list[dict[str, Any]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for text, image in lengths:
        text = min(text, BUDGET - 1 - IMAGE_TOKENS * image)
        ids = torch.randint(5, 990, (text,), generator=g).tolist()
        prompt = [1, *([999] * IMAGE_TOKENS if image else [])]
        labels = [-100] * len(prompt) + [(-100 if i < text // 3 else t) for i, t in enumerate(ids)]
        pixels = torch.randn(3, 64, 64, generator=g) if image else None
        out.append({"input_ids": prompt + ids, "labels": labels, "pixel_values": pixels})
    return out


def _loss_per_sample(model: Any, batch: dict[str, Any]) -> list[float]:
    with torch.no_grad():
        logits = model(**training_inputs(model, batch, "cpu")).logits
    losses = per_sample_losses(logits, batch["labels"], batch.get("sample_ids"))
    return [losses[k] for k in sorted(losses)]


class PackingBench:
    def __init__(self, attn: str, batches: list[list[dict[str, Any]]]) -> None:
        self.model = llava_model(attn)
        self.optimizer = torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad], lr=1e-5)
        self.padded = [collate(b, 0) for b in batches]
        self.packed = [collate(b, 0, pack_tokens=BUDGET) for b in batches]
        self.tokens = sum(int(b["attention_mask"].sum()) for b in self.padded)

    def check(self) -> float:
        """The largest per-sample loss difference between the two layouts (first batch)."""
        a, b = _loss_per_sample(self.model, self.padded[0]), _loss_per_sample(self.model, self.packed[0])
        return max(abs(x - y) for x, y in zip(a, b))

    def _train(self, batches: list[dict[str, Any]]) -> None:
        for batch in batches:
            self.model(**training_inputs(self.model, batch, "cpu")).loss.backward()
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)

    def shapes(self) -> str:
        padded = sum(b["input_ids"].numel() for b in self.padded)
        packed = sum(b["input_ids"].numel() for b in self.packed)
        return f"{self.tokens:,} real tokens; padded layout {padded:,}, packed {packed:,} positions"


def _rate(t: Timing, tokens: int) -> Timing:
    """Seconds per pass -> tokens per second (wall and CPU)."""
    return Timing([tokens / s for s in t.wall], [tokens / s for s in t.cpu], t.peak_bytes, rate=True)


def measure(name: str, lengths: list[tuple[int, bool]], attn: str, batch_size: int, repeats: int) -> Row:
    batches = [samples(lengths[i : i + batch_size], seed=i) for i in range(0, len(lengths), batch_size)]
    bench = PackingBench(attn, batches)
    worst = bench.check()
    if worst > 1e-4:
        raise SystemExit(f"packed and padded per-sample losses differ by {worst:.2e}")
    t = interleaved(
        {"padded": lambda: bench._train(bench.padded), "packed": lambda: bench._train(bench.packed)}, repeats
    )
    padded, packed = _rate(t["padded"], bench.tokens), _rate(t["packed"], bench.tokens)
    row = Row(f"stage-2 tokens/s, packed rows ({name}, {attn})", "padded batches", padded, packed, "tok/s")
    row.higher_is_better = True
    row.note = f"batch {batch_size}, rows of {BUDGET}; {bench.shapes()}; per-sample losses agree to {worst:.1e}"
    if "mix" in name:
        row.target = f"packed >= 1.5 x padded tokens/s: {row.ratio:.2f}x, {verdict(row.ratio >= 1.5)}"
    else:
        slower = "packing is slower here (nothing to unpad; the block mask costs)" if row.ratio < 1 else "no loss"
        row.target = f"no target (equal lengths): {row.ratio:.2f}x, {slower}"
    return row


def rows(quick: bool = False) -> list[Row]:
    n, repeats = (16, 2) if quick else (32, 3)
    mix = llava_like_lengths(n, seed=0)
    equal = [(512 - 1 - IMAGE_TOKENS, True)] * (8 if quick else 16)
    out = [measure("LLaVA-665k-like mix", mix, "sdpa", 8, repeats)]
    if not quick:
        out.append(measure("LLaVA-665k-like mix", mix, "eager", 8, repeats))
    out.append(measure("equal lengths, 512", equal, "sdpa", 8, repeats))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true")
    a = p.parse_args()
    print(machine())
    print(table(rows(a.quick)))


if __name__ == "__main__":
    main()
