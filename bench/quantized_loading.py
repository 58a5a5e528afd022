"""Memory and output agreement of `load_model(..., load_in=...)` against full precision, on CPU.

Two models, each exported to a temporary folder and loaded back as users load them:
- toy: the `toy-minigpt4` recipe (shipped toy backbones, untrained projector);
- random-llama: the toy vision tower + a randomly initialised ~135M-parameter Llama
  (hidden 768, 12 layers, 32k vocabulary), the size class where quantization starts to matter.

Variants: float32 (reference), `8bit` (torchao int8 weight-only on CPU), `4bit` (bitsandbytes
NF4, CPU backend). The vision tower, projector and LM head stay float32. Printed per variant:
weight bytes (whole model), teacher-forced top-1 agreement and max |logit diff| / logit std on
the reference's greedy continuations, and how many greedy continuations are token-identical.

    OMP_NUM_THREADS=1 PYTHONPATH=. python bench/quantized_loading.py [--quick]
"""

from __future__ import annotations

import argparse
import tempfile

import torch

from bench.common import Row, Timing, peak_memory
from mmalign.data import toyworld
from mmalign.model import build_model, export, image_transform_for, load_model, num_image_tokens, weight_bytes
from mmalign.prompts import build_generation_prompt, user_with_image
from mmalign.recipes import get_recipe, with_backbones

TEMPLATE = "minigpt4_v0"
QUESTIONS = [
    "Describe this image in detail.",
    "How many shapes are there?",
    "What color is the circle?",
    "Is there a square in the image?",
]


def prompts(model, tok, n: int):
    transform, n_img = image_transform_for(model), num_image_tokens(model.config)
    out = []
    for i in range(n):
        image = toyworld.render(toyworld.make_scene(1000 + i))
        turns = [{"role": "user", "content": user_with_image(TEMPLATE, QUESTIONS[i % len(QUESTIONS)])}]
        ids = torch.tensor([build_generation_prompt(tok, TEMPLATE, turns, n_img, system=None)])
        out.append((ids, transform(image)[None]))
    return out


@torch.no_grad()
def measure(folder: str, n_prompts: int, new_tokens: int) -> list[dict]:
    ref, tok = load_model(folder)
    cases = prompts(ref, tok, n_prompts)
    vocab = ref.config.get_text_config().vocab_size
    greedy = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
    seqs = [ref.generate(input_ids=ids, pixel_values=px, **greedy) for ids, px in cases]
    ref_logits = [
        ref(input_ids=s, pixel_values=px).logits[0, ids.shape[1] - 1 : -1] for s, (ids, px) in zip(seqs, cases)
    ]
    rows = [{"variant": "float32", "bytes": weight_bytes(ref), "top1": 1.0, "dlogit": 0.0, "same": len(cases)}]
    del ref
    for load_in in ("8bit", "4bit"):
        try:
            q, _ = load_model(folder, load_in=load_in)
        except ValueError as e:  # e.g. 4bit on CPU with widths bitsandbytes' CPU kernels refuse
            rows.append({"variant": load_in, "error": str(e).split(";")[0]})
            continue
        top1, dmax, same = [], 0.0, 0
        for s, (ids, px), rl in zip(seqs, cases, ref_logits):
            ql = q(input_ids=s, pixel_values=px).logits[0, ids.shape[1] - 1 : -1]
            top1.append((ql[:, :vocab].argmax(-1) == rl[:, :vocab].argmax(-1)).float().mean().item())
            dmax = max(dmax, ((ql - rl).abs().max() / rl.std()).item())
            same += int(torch.equal(q.generate(input_ids=ids, pixel_values=px, **greedy), s))
        rows.append(
            {"variant": load_in, "bytes": weight_bytes(q), "top1": sum(top1) / len(top1), "dlogit": dmax, "same": same}
        )
        del q
    return rows


def models(quick: bool) -> dict:
    """The toy recipe, and (not quick) the toy vision tower + a random ~135M-parameter Llama."""
    import dataclasses

    toy = get_recipe("toy-minigpt4")
    out = {"toy": toy}
    if not quick:
        llama = dict(
            model_type="llama",
            hidden_size=768,
            intermediate_size=2048,
            num_hidden_layers=12,
            num_attention_heads=12,
            num_key_value_heads=12,
            vocab_size=32000,
            max_position_embeddings=1024,
            tie_word_embeddings=False,
            initializer_range=0.02,
        )
        spec = with_backbones(toy).spec
        out["random-llama"] = dataclasses.replace(
            toy, spec=dataclasses.replace(spec, llm=llama, tokenizer=str(toy.spec.llm))
        )
    return out


@torch.no_grad()
def _load_and_answer(folder: str, load_in: str | None, n_prompts: int, new_tokens: int) -> tuple[int, list]:
    """Weight bytes of ``folder`` loaded as ``load_in``, and its greedy continuations."""
    model, tok = load_model(folder, load_in=load_in)
    greedy = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
    answers = [model.generate(input_ids=ids, pixel_values=px, **greedy) for ids, px in prompts(model, tok, n_prompts)]
    return weight_bytes(model), answers


def rows(quick: bool = False) -> list[Row]:
    """Per model, one row: int8 weights (torchao) vs float32, loaded as users load them; the
    columns hold weight MiB (the ratio: x smaller) and the peak resident memory of loading +
    answering, the note how many greedy answers are identical."""
    out = []
    n, new = (2, 8) if quick else (8, 24)
    for name, recipe in models(quick).items():
        torch.manual_seed(0)
        model, tok = build_model(recipe.spec)
        params = sum(p.numel() for p in model.parameters())
        sizes, answers, peaks = {}, {}, {}
        with tempfile.TemporaryDirectory() as d:
            export(model, tok, d, template=TEMPLATE)
            del model
            for load_in in (None, "8bit"):
                with peak_memory() as peak:
                    sizes[load_in], answers[load_in] = _load_and_answer(d, load_in, n, new)
                peaks[load_in] = peak[0]
        same = sum(torch.equal(a, b) for a, b in zip(answers[None], answers["8bit"]))
        base, fast = Timing([sizes[None] / 2**20], [], peaks[None]), Timing([sizes["8bit"] / 2**20], [], peaks["8bit"])
        row = Row(f"int8 weights ({name}, {params / 1e6:.0f}M params)", "float32", base, fast, "MiB weights")
        row.note = (
            f"torchao int8 weight-only on CPU (vision tower, projector, LM head stay float32); ratio = x smaller; "
            f"{same}/{n} greedy answers of {new} tokens identical"
        )
        out.append(row)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="toy model only, fewer prompts")
    a = p.parse_args()
    torch.manual_seed(0)
    n, new = (4, 8) if a.quick else (8, 24)
    print(f"{n} prompts x {new} greedy tokens; CPU; weights = parameters + buffers\n")
    print(
        "| model | params | variant | weight MB | x smaller | teacher-forced top-1 agree | max abs dlogit / std "
        "| identical greedy continuations |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name, recipe in models(a.quick).items():
        model, tok = build_model(recipe.spec)
        params = sum(p.numel() for p in model.parameters())
        with tempfile.TemporaryDirectory() as d:
            export(model, tok, d, template=TEMPLATE)
            del model
            measured = measure(d, n, new)
        full = measured[0]["bytes"]
        for r in measured:
            if "error" in r:
                print(f"| {name} | {params / 1e6:.1f}M | {r['variant']} | n/a: {r['error']} | | | | |")
                continue
            print(
                f"| {name} | {params / 1e6:.1f}M | {r['variant']} | {r['bytes'] / 2**20:.1f} | "
                f"{full / r['bytes']:.2f} | {r['top1']:.3f} | {r['dlogit']:.3f} | {r['same']}/{n} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
