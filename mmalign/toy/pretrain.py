"""Pretrain the tiny toy backbones that stand in for EVA-CLIP and Vicuna.

Run once (like the real backbones' own pretraining); the outputs ship in `mmalign/assets/toy`:

    python -m mmalign.toy.pretrain tokenizer
    python -m mmalign.toy.pretrain vision --minutes 12
    python -m mmalign.toy.pretrain llm --minutes 35
    python -m mmalign.toy.pretrain fix --minutes 15 --threads 1

* tokenizer: byte-level BPE trained with `tokenizers` on toy-world text, saved as a normal HF tokenizer.
* vision: a small CLIP ViT trained with an image-text contrastive loss (BLIP-2 / CLIP first stage);
  only the vision tower is kept.
* llm: a Llama-architecture chat model trained on TEXT ONLY: chats in the MiniGPT-4 template
  where the scene is written in words inside `<Img> ... </Img>`, so it learns to read a scene
  from its context and answer about it, but never sees an image. It is gated on a text-only
  check (colour / shape / yes-no answered from a listing) before it is shipped.
* fix: the curation pipeline's text-only fixer, the toy LLM fine-tuned to repair toy
  descriptions (``mmalign.toy.fix_model``); its exact-repair rate is saved beside it.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from mmalign.data import toyworld as tw

ASSETS = Path(__file__).resolve().parent.parent / "assets" / "toy"
SPECIAL_TOKENS = ["<pad>", "<unk>", "<s>", "</s>", "<image>"]  # eos != 2: CLIP's legacy argmax pooling keys on id 2

SHORT_PROMPT = "Please describe the image shortly and precisely, in less than 20 words."
LONG_PROMPTS = ["Please describe this image as detailed as possible."]


# ---------------------------------------------------------------- tokenizer


def _corpus_lines(n_scenes: int) -> list[str]:
    lines = [
        "Give the following image: <Img>ImageContent</Img>. You will be able to see the image once I provide "
        "it to you. Please answer my questions.",
        "Describe this image in detail. Take a look at this image and describe what you notice. Please provide "
        "a detailed description of the picture. Could you describe the contents of this image for me?",
        SHORT_PROMPT,
        *LONG_PROMPTS,
    ]
    lines += ["###Human: <Img></Img> ###Assistant: ###", "[INST] [/INST]", "USER: ASSISTANT:"]
    rng = random.Random(0)
    for seed in tw.split_seeds("pretrain", n_scenes):
        scene = tw.make_scene(seed)
        lines += [tw.listing(scene, rng), tw.caption(scene, rng), tw.description(scene), short_description(scene)]
        lines += [f"{q.question} {q.answer}" for q in tw.questions(scene, rng)]
    return lines


def train_tokenizer(out: Path, vocab_size: int = 640) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    # prefix space, like Llama's SentencePiece: an answer tokenized on its own ("red") gets the same
    # token as the word inside a sentence (" red"), so the LLM can copy it from its context
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(_corpus_lines(3000), trainer)
    # Like Llama tokenizers: BOS is added when add_special_tokens=True.
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        additional_special_tokens=["<image>"],
    )
    fast.model_max_length = 512
    fast.save_pretrained(out)
    print(f"tokenizer: {len(fast)} tokens -> {out}")


def load_tokenizer(path: Path = ASSETS / "llm"):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


# ---------------------------------------------------------------- text about scenes


def short_description(scene: tw.Scene) -> str:
    """The answer to the paper's short prompt: every object, no positions, under 20 words."""
    names = [f"a {o.size} {o.colour} {o.shape}" for o in scene.objects]
    joined = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
    return f"{joined[0].upper()}{joined[1:]} on a gray background."


def scene_in_words(scene: tw.Scene, rng: random.Random) -> str:
    """How the text-only LLM sees an image: the listing inside the template's image tags."""
    return f"<Img> {tw.listing(scene)} </Img>"  # raster order: the order image tokens come in


def text_chat(scene: tw.Scene, rng: random.Random) -> tuple[list[dict], str | None]:
    """A text-only chat about a scene written in words: questions, descriptions, follow-ups."""
    from mmalign.prompts import MINIGPT4_INSTRUCTIONS, get_template

    qas = tw.questions(scene, rng)
    rng.shuffle(qas)
    kind = rng.random()
    turns: list[dict] = []
    if kind < 0.25:
        prompt = rng.choice(list(MINIGPT4_INSTRUCTIONS) + LONG_PROMPTS)
        turns += [{"role": "user", "content": prompt}, {"role": "assistant", "content": tw.description(scene)}]
    elif kind < 0.35:
        turns += [{"role": "user", "content": SHORT_PROMPT}, {"role": "assistant", "content": short_description(scene)}]
    for qa in qas[: rng.randint(2, 6)]:
        turns += [{"role": "user", "content": qa.question}, {"role": "assistant", "content": qa.answer}]
    turns[0] = {"role": "user", "content": f"{scene_in_words(scene, rng)} {turns[0]['content']}"}
    system = get_template("minigpt4_v0").system if rng.random() < 0.1 else None
    return turns, system


def scene_slots(tokenizer, scene: tw.Scene, rng: random.Random) -> list[list[int]]:
    """The scene the way image tokens give it: one slot per grid cell in raster order.

    A slot is the sum of the embeddings of the words of its cell (size, colour, shape, and half
    the time the position), so the text-only LLM learns to read several attributes from one
    input vector, as it must from a projected image token. Still text: no image is involved.
    """
    by_cell = {o.cell: o for o in scene.objects}
    with_position = rng.random() < 0.5
    slots = []
    for cell, position in enumerate(tw.POSITIONS):
        o = by_cell.get(cell)
        words = [f"{o.size} {o.colour} {o.shape}"] if o else []
        if with_position or not o:
            words.append(position)
        slots.append(tokenizer.encode(" " + " ".join(words), add_special_tokens=False))
    return slots


def encode_text_example(tokenizer, scene: tw.Scene, rng: random.Random) -> dict:
    """One LLM pretraining example: a text-only chat (mostly) or a stage-1 style caption document.

    Half the examples write the scene as a listing in words, half as one slot per grid cell
    (see `scene_slots`) at the template's image placeholder.
    """
    from mmalign.prompts import encode_caption, encode_conversation, get_template, user_with_image

    slots = scene_slots(tokenizer, scene, rng) if rng.random() < 0.5 else None
    if rng.random() < 0.15:  # [BOS] scene caption "\n": what stage 1 will ask of the LLM
        if slots:
            return {**encode_caption(tokenizer, tw.caption(scene, rng), len(slots)), "slots": slots}
        prefix = [tokenizer.bos_token_id] + tokenizer.encode(tw.listing(scene), add_special_tokens=False)
        target = tokenizer.encode(" " + tw.caption(scene, rng) + "\n", add_special_tokens=False)
        return {"input_ids": prefix + target, "labels": [-100] * len(prefix) + target}
    turns, system = text_chat(scene, rng)
    if slots:
        first = turns[0]["content"].split(" </Img> ", 1)[1]
        turns[0] = {"role": "user", "content": user_with_image("minigpt4_v0", first)}
        return {
            **encode_conversation(tokenizer, get_template("minigpt4_v0"), turns, len(slots), system=system),
            "slots": slots,
        }
    return encode_conversation(tokenizer, get_template("minigpt4_v0"), turns, 0, system=system)


def _pad_batch(examples: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    n = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), n), pad_id)
    labels = torch.full((len(examples), n), -100)
    mask = torch.zeros((len(examples), n), dtype=torch.long)
    for i, e in enumerate(examples):
        k = len(e["input_ids"])
        ids[i, :k] = torch.tensor(e["input_ids"])
        labels[i, :k] = torch.tensor(e["labels"])
        mask[i, :k] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask, "slots": [e.get("slots") for e in examples]}


def embed_with_slots(
    model, input_ids: torch.Tensor, slots: list, image_token_id: int, jitter: torch.Generator | None = None
) -> torch.Tensor:
    """Input embeddings where each image placeholder holds its slot's summed word embeddings.

    ``jitter`` (training): half the slot rows are scaled by 1-30x and get up to 50 % noise, so
    the LLM reads a slot by its direction, as it must read a projected image token, whose norm
    and fine detail the projection sets (a trained toy projection's tokens are ~20x a word sum).
    """
    table = model.get_input_embeddings()
    x = table(input_ids)
    for i, row in enumerate(slots):
        if row:
            where = (input_ids[i] == image_token_id).nonzero().squeeze(1)
            v = torch.stack([table.weight[s].sum(0) for s in row])
            if jitter is not None and torch.rand((), generator=jitter) < 0.5:
                scale = torch.exp(torch.rand((len(row), 1), generator=jitter) * math.log(30.0))
                eps = torch.rand((len(row), 1), generator=jitter) * 0.5
                noise = torch.randn(v.shape, generator=jitter) * v.norm(dim=-1, keepdim=True) / v.shape[-1] ** 0.5
                v = scale * (v + eps * noise)
            x[i, where] = v
    return x


# ---------------------------------------------------------------- LLM


def llm_config(tokenizer):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=160,
        intermediate_size=448,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


@torch.no_grad()
def text_only_gate(model, tokenizer, n_scenes: int = 150, seed: int = 1, form: str = "words") -> dict[str, float]:
    """Answer accuracy per question kind from the scene in context (greedy), on held-out scenes.

    ``form``: "words" (a listing) or "slots" (one summed-embedding slot per grid cell).
    """
    from mmalign.prompts import build_generation_prompt, get_template, strip_stop, user_with_image

    template = get_template("minigpt4_v0")
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    rng = random.Random(seed)
    hits: dict[str, list[int]] = {}
    model.eval()
    for s in tw.split_seeds("val", n_scenes):
        scene = tw.make_scene(s)
        qas = tw.questions(scene, rng)
        prompts, slots = [], []
        for qa in qas:
            if form == "slots":
                slots.append(scene_slots(tokenizer, scene, rng))
                turns = [{"role": "user", "content": user_with_image(template, qa.question)}]
            else:
                turns = [{"role": "user", "content": f"{scene_in_words(scene, rng)} {qa.question}"}]
            prompts.append(
                build_generation_prompt(tokenizer, template, turns, len(tw.POSITIONS) if slots else 0, system=None)
            )
        n = max(map(len, prompts))
        ids = torch.tensor([[tokenizer.pad_token_id] * (n - len(p)) + p for p in prompts])
        mask = (torch.arange(n)[None] >= torch.tensor([n - len(p) for p in prompts])[:, None]).long()
        embeds = embed_with_slots(model, ids, slots or [None] * len(ids), image_id)
        out = model.generate(
            inputs_embeds=embeds,
            attention_mask=mask,
            max_new_tokens=6,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )
        for row, qa in zip(out, qas):
            text = strip_stop(tokenizer.decode(row, skip_special_tokens=True), template).strip()
            hits.setdefault(qa.kind, []).append(int(text == qa.answer))
    model.train()
    return {k: sum(v) / len(v) for k, v in sorted(hits.items())}


def train_llm(
    out: Path, minutes: float, batch_size: int = 48, lr: float = 2e-3, seed: int = 0, resume: bool = False
) -> None:
    """`resume`: continue from the weights already in `out` (a second, lower-lr session)."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    tokenizer = load_tokenizer(out)
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    jitter = torch.Generator().manual_seed(seed)
    model = LlamaForCausalLM.from_pretrained(out) if resume else LlamaForCausalLM(llm_config(tokenizer))
    print(f"llm: {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters")
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.05)
    rng = random.Random(seed)
    seeds = iter(range(10**9))
    deadline = time.time() + minutes * 60
    log = open(out / "pretrain_log.jsonl", "a" if resume else "w")
    step = 0
    bar = tqdm(desc="llm pretrain", unit="step")
    while time.time() < deadline:
        batch = _pad_batch(
            [encode_text_example(tokenizer, tw.make_scene(next(seeds)), rng) for _ in range(batch_size)],
            tokenizer.pad_token_id,
        )
        # warmup, flat, then cosine over the last 40% of the wall-clock budget (robust to a busy CPU)
        frac = 1 - (deadline - time.time()) / (minutes * 60)
        decay = 0.0 if frac < 0.6 else (frac - 0.6) / 0.4
        cur = lr * min(1.0, (step + 1) / 100) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(decay, 1.0))))
        for g in opt.param_groups:
            g["lr"] = cur
        slots = batch.pop("slots")
        embeds = embed_with_slots(model, batch.pop("input_ids"), slots, image_id, jitter=jitter)
        loss = model(inputs_embeds=embeds, **batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{cur:.1e}")
        rec = {"step": step, "loss": loss.item(), "lr": cur}
        if step % 400 == 0:  # a look at the gate, and a save a kill cannot take away
            rec["gate"] = text_only_gate(model, tokenizer, n_scenes=40)
            rec["gate_slots"] = text_only_gate(model, tokenizer, n_scenes=40, form="slots")
            tqdm.write(json.dumps(rec))
            model.save_pretrained(out)
        log.write(json.dumps(rec) + "\n")
        log.flush()
    bar.close()
    gate = {form: text_only_gate(model, tokenizer, form=form) for form in ("words", "slots")}
    print("text-only gate:", json.dumps(gate))
    model.save_pretrained(out)
    (out / "text_only_gate.json").write_text(json.dumps({"steps": step, "accuracy": gate}, indent=1))


# ---------------------------------------------------------------- vision


def vision_config():
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        image_size=tw.IMAGE_SIZE,
        patch_size=8,
        projection_dim=128,
    )


def image_processor():
    from transformers import CLIPImageProcessorPil as CLIPImageProcessor

    size = tw.IMAGE_SIZE
    return CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})


def _pixels(images) -> torch.Tensor:
    """Fast path for the toy (already 48 px): CLIP mean / std normalisation, same as the processor."""
    import numpy as np
    from transformers.utils.constants import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

    x = torch.from_numpy(np.stack([np.asarray(im, dtype=np.float32) / 255.0 for im in images]))
    x = (x - torch.tensor(OPENAI_CLIP_MEAN)) / torch.tensor(OPENAI_CLIP_STD)
    return x.permute(0, 3, 1, 2).contiguous()


def train_vision(out: Path, minutes: float, batch_size: int = 128, lr: float = 1e-3, seed: int = 0) -> None:
    from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPVisionModel

    torch.manual_seed(seed)
    tokenizer = load_tokenizer()
    text_cfg = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=3,
        num_attention_heads=4,
        max_position_embeddings=64,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )
    clip = CLIPModel(
        CLIPConfig(text_config=text_cfg.to_dict(), vision_config=vision_config().to_dict(), projection_dim=128)
    )
    opt = torch.optim.AdamW(clip.parameters(), lr=lr, weight_decay=0.05)
    rng = random.Random(seed)
    seeds = iter(range(10**9))
    deadline = time.time() + minutes * 60
    step = 0
    bar = tqdm(desc="vision pretrain", unit="step")
    while time.time() < deadline:
        scenes = [tw.make_scene(next(seeds)) for _ in range(batch_size)]
        texts = [tw.listing(s, rng) + " </s>" for s in scenes]
        enc = tokenizer(texts, padding=True, return_tensors="pt", add_special_tokens=False)
        pixels = _pixels([tw.render(s) for s in scenes])
        for g in opt.param_groups:
            g["lr"] = lr * min(1.0, (step + 1) / 100)
        out_ = clip(input_ids=enc.input_ids, attention_mask=enc.attention_mask, pixel_values=pixels, return_loss=True)
        out_.loss.backward()
        torch.nn.utils.clip_grad_norm_(clip.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{out_.loss.item():.3f}")
    bar.close()
    acc = retrieval_top1(clip, tokenizer)
    print(f"vision: {step} steps, 300-way image->text retrieval top-1 {acc:.3f}")
    vision = CLIPVisionModel(clip.config.vision_config)
    vision.load_state_dict(clip.vision_model.state_dict())
    vision.save_pretrained(out)
    image_processor().save_pretrained(out)
    (out / "pretrain_eval.json").write_text(json.dumps({"steps": step, "retrieval_top1_300way": acc}, indent=1))


@torch.no_grad()
def retrieval_top1(clip, tokenizer, n: int = 300) -> float:
    clip.eval()
    scenes = [tw.make_scene(s) for s in tw.split_seeds("val", n)]
    texts = [tw.listing(s) + " </s>" for s in scenes]
    enc = tokenizer(texts, padding=True, return_tensors="pt", add_special_tokens=False)
    img = F.normalize(
        clip.get_image_features(pixel_values=_pixels([tw.render(s) for s in scenes])).pooler_output, dim=-1
    )
    txt = F.normalize(
        clip.get_text_features(input_ids=enc.input_ids, attention_mask=enc.attention_mask).pooler_output, dim=-1
    )
    clip.train()
    return (img @ txt.T).argmax(-1).eq(torch.arange(n)).float().mean().item()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["tokenizer", "vision", "llm", "fix"])
    p.add_argument("--minutes", type=float, default=30.0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--lr", type=float, default=None, help="default: 2e-3 (vision, llm), 1e-3 (fix)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true", help="llm, fix: continue from the saved weights")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.what == "tokenizer":
        train_tokenizer(a.out or ASSETS / "llm")
    elif a.what == "vision":
        (a.out or ASSETS / "vision").mkdir(parents=True, exist_ok=True)
        train_vision(a.out or ASSETS / "vision", a.minutes)
    elif a.what == "fix":
        from mmalign.toy.fix_model import train_fix

        train_fix(a.out or ASSETS / "fix", a.minutes, lr=a.lr or 1e-3, seed=a.seed, resume=a.resume)
    else:
        train_llm(a.out or ASSETS / "llm", a.minutes, lr=a.lr or 2e-3, seed=a.seed, resume=a.resume)


if __name__ == "__main__":
    main()
