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

On a GPU, ``--shape 7b`` builds the same class at LLaVA-1.5-7B's shapes (CLIP-L/14 at 336 px:
576 image tokens; a Llama-2-7B LLM), random weights, in bfloat16, and the note adds the model
FLOPs utilisation: (6 x LLM parameters + 6 x layers x width x mean sample length) per real token
x tokens/s / the chip's peak (``--peak-tflops``, default by device name).

    PYTHONPATH=. python -m bench.packing [--quick]
    PYTHONPATH=. python -m bench.packing --shape 7b --device cuda [--peak-tflops 989] [--checkpointing]
"""

from __future__ import annotations

import argparse
import random
from dataclasses import dataclass
from typing import Any

import torch

from bench.common import Row, Timing, interleaved, machine, table, verdict
from mmalign.data.collate import collate
from mmalign.model.inputs import per_sample_losses, training_inputs

BUDGET = 2048


@dataclass(frozen=True)
class Shape:
    """The widths of the random LLaVA-class model (vision tower, LLM)."""

    vision: dict
    image_size: int
    patch_size: int
    llm: dict

    @property
    def image_tokens(self) -> int:  # patches; the CLS token is dropped (vision_feature_select_strategy default)
        return (self.image_size // self.patch_size) ** 2

    @property
    def image_token(self) -> int:
        return self.llm["vocab_size"] - 1


SHAPES = {
    "small": Shape(  # CPU: CLIP 64 px / 8 -> 64 patches; a Llama of width 128, 4 layers
        dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4),
        64,
        8,
        dict(hidden_size=128, intermediate_size=344, num_hidden_layers=4, num_attention_heads=4, vocab_size=1000),
    ),
    "7b": Shape(  # LLaVA-1.5-7B: CLIP ViT-L/14 at 336 px (576 patches), Vicuna / Llama-2-7B
        dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16),
        336,
        14,
        dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32, vocab_size=32000),
    ),
}
IMAGE_TOKENS = SHAPES["small"].image_tokens
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "H800": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0}  # dense bf16


def llava_model(attn: str, shape: Shape = SHAPES["small"], device: str = "cpu", dtype: Any = None) -> Any:
    """Random LLaVA-1.5-class model of ``shape``; vision tower frozen, projector + LLM train."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    vision = CLIPVisionConfig(**shape.vision, image_size=shape.image_size, patch_size=shape.patch_size)
    text = LlamaConfig(**shape.llm, num_key_value_heads=shape.llm["num_attention_heads"])
    text.max_position_embeddings = BUDGET
    config = LlavaConfig(
        vision_config=vision, text_config=text, image_token_index=shape.image_token, vision_feature_layer=-2
    )
    config.image_seq_length = shape.image_tokens
    torch.manual_seed(0)
    with torch.device(device):
        model = LlavaForConditionalGeneration(config).to(dtype or torch.float32)
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


def samples(lengths: list[tuple[int, bool]], seed: int, shape: Shape = SHAPES["small"]) -> list[dict[str, Any]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for text, image in lengths:
        text = min(text, BUDGET - 1 - shape.image_tokens * image)
        ids = torch.randint(5, shape.image_token - 10, (text,), generator=g).tolist()
        prompt = [1, *([shape.image_token] * shape.image_tokens if image else [])]
        labels = [-100] * len(prompt) + [(-100 if i < text // 3 else t) for i, t in enumerate(ids)]
        pixels = torch.randn(3, shape.image_size, shape.image_size, generator=g) if image else None
        out.append({"input_ids": prompt + ids, "labels": labels, "pixel_values": pixels})
    return out


def llm_flops_per_token(model: Any, mean_length: float) -> float:
    """Training FLOPs per token of the LLM (PaLM's estimate): 6 x its parameters but the input
    embedding, + 6 x layers x width x the mean sample length (causal attention within a sample)."""
    llm = model.config.text_config
    params = sum(p.numel() for p in model.model.language_model.parameters()) + model.lm_head.weight.numel()
    params -= model.model.language_model.embed_tokens.weight.numel()
    return 6 * params + 6 * llm.num_hidden_layers * llm.hidden_size * mean_length


class PackingBench:
    def __init__(self, attn: str, batches: list[list[dict[str, Any]]], setup: dict[str, Any]) -> None:
        self.device = setup.get("device", "cpu")
        self.model = llava_model(attn, setup.get("shape", SHAPES["small"]), self.device, setup.get("dtype"))
        if setup.get("checkpointing"):
            self.model.gradient_checkpointing_enable()
        self.optimizer = torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad], lr=1e-5)
        self.padded = [collate(b, 0) for b in batches]
        self.packed = [collate(b, 0, pack_tokens=BUDGET) for b in batches]
        self.tokens = sum(int(b["attention_mask"].sum()) for b in self.padded)
        self.samples = sum(len(b) for b in batches)

    def _inputs(self, batch: dict[str, Any]) -> dict[str, Any]:
        inputs = training_inputs(self.model, batch, self.device)
        if "pixel_values" in inputs and inputs["pixel_values"] is not None:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        return inputs

    def check(self) -> float:
        """The largest per-sample loss difference between the two layouts (first batch)."""
        losses = []
        for batch in (self.padded[0], self.packed[0]):
            with torch.no_grad():
                logits = self.model(**self._inputs(batch)).logits
            by_sample = per_sample_losses(
                logits, batch["labels"].to(self.device), _to(batch.get("sample_ids"), self.device)
            )
            losses.append([by_sample[k] for k in sorted(by_sample)])
        return max(abs(x - y) for x, y in zip(*losses))

    def train(self, batches: list[dict[str, Any]]) -> None:
        for batch in batches:
            self.model(**self._inputs(batch)).loss.backward()
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        if self.device != "cpu":
            torch.cuda.synchronize()

    def shapes(self) -> str:
        padded = sum(b["input_ids"].numel() for b in self.padded)
        packed = sum(b["input_ids"].numel() for b in self.packed)
        return f"{self.tokens:,} real tokens; padded layout {padded:,}, packed {packed:,} positions"


def _to(tensor: torch.Tensor | None, device: str) -> torch.Tensor | None:
    return None if tensor is None else tensor.to(device)


def _rate(t: Timing, tokens: int) -> Timing:
    """Seconds per pass -> tokens per second (wall and CPU)."""
    return Timing([tokens / s for s in t.wall], [tokens / s for s in t.cpu], t.peak_bytes, rate=True)


def peak_tflops(device: str, given: float | None) -> float | None:
    """The chip's dense bf16 peak: given, or looked up by the CUDA device's name."""
    if given or device == "cpu":
        return given
    name = torch.cuda.get_device_name()
    return next((tflops for chip, tflops in PEAK_TFLOPS.items() if chip in name), None)


def measure(
    name: str, lengths: list[tuple[int, bool]], attn: str, batch_size: int, repeats: int, setup: dict | None = None
) -> Row:
    setup = setup or {}
    shape = setup.get("shape", SHAPES["small"])
    batches = [samples(lengths[i : i + batch_size], i, shape) for i in range(0, len(lengths), batch_size)]
    bench = PackingBench(attn, batches, setup)
    worst = bench.check()
    tolerance = 1e-4 if setup.get("dtype") in (None, torch.float32) else 5e-2  # bf16: rounding differs by layout
    if worst > tolerance:
        raise SystemExit(f"packed and padded per-sample losses differ by {worst:.2e}")
    t = interleaved({"padded": lambda: bench.train(bench.padded), "packed": lambda: bench.train(bench.packed)}, repeats)
    padded, packed = _rate(t["padded"], bench.tokens), _rate(t["packed"], bench.tokens)
    row = Row(f"stage-2 tokens/s, packed rows ({name}, {attn})", "padded batches", padded, packed, "tok/s")
    row.higher_is_better = True
    row.note = f"batch {batch_size}, rows of {BUDGET}; {bench.shapes()}; per-sample losses agree to {worst:.1e}"
    peak = peak_tflops(bench.device, setup.get("peak_tflops"))
    if peak:
        flops = llm_flops_per_token(bench.model, bench.tokens / bench.samples)
        mfu = {side: flops * rate.best / (peak * 1e12) for side, rate in (("padded", padded), ("packed", packed))}
        row.note += f"; MFU padded {mfu['padded']:.1%}, packed {mfu['packed']:.1%} (peak {peak:g} TFLOP/s)"
    if "mix" in name:
        row.target = f"packed >= 1.5 x padded tokens/s: {row.ratio:.2f}x, {verdict(row.ratio >= 1.5)}"
    else:
        slower = (
            "packing is slower here: nothing to unpad, and sdpa computes each row's whole attention, masked"
            if row.ratio < 1
            else "no loss"
        )
        row.target = f"no target (equal lengths): {row.ratio:.2f}x, {slower}"
    return row


def rows(quick: bool = False, setup: dict | None = None) -> list[Row]:
    n, repeats = (16, 2) if quick else (32, 3)
    image_tokens = (setup or {}).get("shape", SHAPES["small"]).image_tokens
    mix = llava_like_lengths(n, seed=0)
    equal = [(512 - 1 - image_tokens, True)] * (8 if quick else 16)
    out = [measure("LLaVA-665k-like mix", mix, "sdpa", 8, repeats, setup)]
    if not quick:
        out.append(measure("LLaVA-665k-like mix", mix, "eager", 8, repeats, setup))
    out.append(measure("equal lengths, 512", equal, "sdpa", 8, repeats, setup))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--shape", choices=sorted(SHAPES), default="small")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None, help="default: bfloat16 on cuda")
    p.add_argument("--peak-tflops", type=float, default=None, help="the chip's dense bf16 peak (for MFU)")
    p.add_argument(
        "--checkpointing",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="gradient checkpointing (default: on for --shape 7b, whose activations would not fit; MFU does not "
        "count the recompute)",
    )
    a = p.parse_args()
    dtype = getattr(torch, a.dtype or ("bfloat16" if a.device != "cpu" else "float32"))
    setup = dict(shape=SHAPES[a.shape], device=a.device, dtype=dtype, peak_tflops=a.peak_tflops)
    setup["checkpointing"] = a.shape == "7b" if a.checkpointing is None else a.checkpointing
    print(machine())
    print(table(rows(a.quick, setup)))


if __name__ == "__main__":
    main()
