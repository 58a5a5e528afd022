"""`mmalign <verb>`: train, chat, serve, eval, export, toy."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path


def _load_config(a: argparse.Namespace):
    """The run config; a bad key or value is a command-line error naming it, not a traceback."""
    from mmalign.config import load_config

    try:
        return load_config(a.config, a.overrides)
    except (KeyError, ValueError) as e:
        raise SystemExit(f"mmalign {a.verb}: error: {e.args[0] if e.args else e}") from None


def _train(a: argparse.Namespace) -> None:
    from mmalign.data import DataError
    from mmalign.train.loop import train

    try:
        print(train(_load_config(a)))
    except DataError as e:  # unusable data, found before the model loads: named, not a traceback
        raise SystemExit(f"mmalign train: error: {e}") from None


def _chat(a: argparse.Namespace) -> None:
    from PIL import Image

    from mmalign.chat.session import ChatSession
    from mmalign.model import image_transform_for
    from mmalign.model.build import load_model, template_of

    model, tokenizer = load_model(a.model, dtype=a.dtype, device=a.device, load_in=a.load_in)
    session = ChatSession(model, tokenizer, a.template or template_of(a.model), image_transform_for(model))
    gen = {
        "num_beams": a.num_beams,
        "do_sample": a.temperature > 0,
        "temperature": a.temperature or None,
        "top_p": a.top_p,
        "repetition_penalty": a.repetition_penalty,
        "max_new_tokens": a.max_new_tokens,
    }
    if a.image:
        session.set_image(Image.open(a.image))

    def answer(text: str) -> None:
        print("Assistant: ", end="", flush=True)
        for piece in session.ask(text, **gen):
            print(piece, end="", flush=True)
        print(flush=True)

    if a.ask:  # scripted: one answer per --ask, then exit
        for text in a.ask:
            print(f"User: {text}")
            answer(text)
        return
    print("Commands: /image PATH (new conversation about it), /reset, /quit")
    for line in sys.stdin if not sys.stdin.isatty() else iter(lambda: input("User: "), None):
        text = line.strip()
        if not text:
            continue
        if text in ("/quit", "/exit"):
            break
        if text == "/reset":
            session.reset()
            continue
        if text.startswith("/image "):
            path = text.split(" ", 1)[1].strip()
            try:
                session.set_image(Image.open(path))
            except OSError as e:
                print(f"cannot open image {path}: {e}")
            continue
        try:
            answer(text)
        except ValueError as e:
            print(f"error: {e}")


def _eval(a: argparse.Namespace) -> None:
    from mmalign.evaluate.runner import evaluate, parse_models

    options = {"limit": a.limit, "seed": a.seed, "split": a.split, "n_scenes": a.n_scenes}
    try:
        results = evaluate(
            a.task,
            parse_models(a.model),
            a.out,
            data=a.data,
            images=a.images,
            options=options,
            batch_size=a.batch_size,
            max_new_tokens=a.max_new_tokens,
            template=a.template,
            dtype=a.dtype,
            device=a.device,
            rescore=a.rescore,
        )
    except (KeyError, ValueError, FileNotFoundError) as e:
        raise SystemExit(f"mmalign eval: error: {e.args[0] if e.args else e}") from None
    print(json.dumps(results[next(iter(results))] if len(results) == 1 else results, indent=1))
    print(f"report: {Path(a.out) / 'report.md'}")


def _export(a: argparse.Namespace) -> None:
    from mmalign.model import export, image_processor_for, load_trainable
    from mmalign.model.build import model_from_config

    cfg = _load_config(a)
    model, tokenizer = model_from_config(cfg.model)
    if cfg.train.lora_r:  # the checkpoint holds LoRA adapters: put them on; export merges them
        from mmalign.model import apply_freeze
        from mmalign.train.lora import apply_lora

        apply_freeze(model, cfg.train.trainable)
        apply_lora(model, cfg.train)
    load_trainable(model, a.checkpoint, strict=False)
    export(model, tokenizer, a.out, image_processor=image_processor_for(model), template=cfg.data.template)
    print(a.out)


def _demo(a: argparse.Namespace) -> None:
    from mmalign.chat.demo import launch, load_demo_model

    dm = load_demo_model(a.model, template=a.template, dtype=a.dtype, device=a.device)
    launch(dm, host=a.host, port=a.port, share=a.share)


def _serve(a: argparse.Namespace) -> None:
    from mmalign.chat.server import serve

    serve(
        a.model,
        host=a.host,
        port=a.port,
        template=a.template,
        dtype=a.dtype,
        device=a.device,
        load_in=a.load_in,
        model_name=a.served_name,
        allow_remote_images=a.allow_remote_images,
        max_batch_size=a.max_batch_size,
    )


def _convert(a: argparse.Namespace) -> None:
    import torch

    from mmalign.model.convert import ConversionError, convert_llava, convert_minigpt4

    dtype = None if a.dtype == "auto" else getattr(torch, a.dtype)
    common = dict(dtype=dtype, max_shard_size=a.max_shard_size, **({"template": a.template} if a.template else {}))
    try:
        if a.source == "minigpt4":
            out = convert_minigpt4(
                a.projection,
                a.llm,
                a.out,
                blip2=a.blip2,
                vit=a.vit,
                vit_layers=a.vit_layers,
                vit_heads=a.vit_heads,
                qformer_heads=a.qformer_heads,
                allow_pickle=a.trust_pickle,
                **common,
            )
        else:
            out = convert_llava(a.checkpoint, a.out, vision=a.vision, **common)
    except ConversionError as e:
        raise SystemExit(f"mmalign convert {a.source}: error: {e}") from None
    print(out)


def _toy(a: argparse.Namespace) -> None:
    from mmalign.toy import run

    if a.what == "data":
        run.write_toy_data(Path(a.out))
    else:
        run.main_job(Path(a.out), quick=a.quick, overrides=tuple(a.overrides))


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    p = argparse.ArgumentParser(prog="mmalign", description=__doc__)
    sub = p.add_subparsers(dest="verb", required=True)

    t = sub.add_parser("train", help="run one training stage from a YAML config")
    t.add_argument("config")
    t.add_argument("overrides", nargs="*", help="section.key=value, e.g. train.lr=1e-4")
    t.set_defaults(fn=_train)

    def model_args(q: argparse.ArgumentParser) -> None:
        q.add_argument("--model", required=True, help="exported folder or hub id")
        q.add_argument("--template", default=None, help="override the model's template")
        q.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
        q.add_argument("--device", default="cpu")

    c = sub.add_parser("chat", help="multi-turn terminal chat about an image")
    model_args(c)
    c.add_argument("--image", default=None)
    c.add_argument("--ask", action="append", help="ask this and exit (repeatable: a multi-turn script)")
    c.add_argument("--num-beams", type=int, default=1)
    c.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    c.add_argument("--top-p", type=float, default=0.9)
    c.add_argument("--repetition-penalty", type=float, default=1.0)
    c.add_argument("--max-new-tokens", type=int, default=300)
    c.add_argument("--load-in", choices=["8bit", "4bit"], default=None, help="quantize the LLM on load")
    c.set_defaults(fn=_chat)

    v = sub.add_parser("serve", help="OpenAI-compatible API server (POST /v1/chat/completions)")
    model_args(v)
    v.add_argument("--host", default="127.0.0.1")
    v.add_argument("--port", type=int, default=8000)
    v.add_argument("--served-name", default=None, help="model id clients send (default: --model)")
    v.add_argument("--load-in", choices=["8bit", "4bit"], default=None, help="quantize the LLM on load")
    v.add_argument("--allow-remote-images", action="store_true", help="fetch http(s) image URLs (size/time limited)")
    v.add_argument("--max-batch-size", type=int, default=16, help="requests generated together in one batch")
    v.set_defaults(fn=_serve)

    e = sub.add_parser(
        "eval",
        help="evaluate on a benchmark (toy, chair, pope, vqav2, gqa, vizwiz, textvqa, mme, "
        "mmbench): predictions JSONL (resumable) + report.md / report.png",
    )
    e.add_argument(
        "--model",
        required=True,
        action="append",
        help="exported folder or hub id, or NAME=PATH; repeat to compare models in one report",
    )
    e.add_argument("--task", default="toy", help="benchmark (default: toy, the embedded world; needs no --data)")
    e.add_argument("--data", default=None, help="the benchmark's file or folder in its published layout")
    e.add_argument("--images", default=None, help="image folder, when not where the layout puts it")
    e.add_argument("--template", default=None, help="override the model's template")
    e.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    e.add_argument("--device", default="cpu")
    e.add_argument("--n-scenes", type=int, default=200, help="toy: held-out scenes")
    e.add_argument("--limit", type=int, default=None, help="evaluate only this many items (images / questions)")
    e.add_argument("--seed", type=int, default=0, help="which items --limit draws (chair)")
    e.add_argument("--split", default=None, help="chair: COCO split (default val2014); toy: test (default) or val")
    e.add_argument("--batch-size", type=int, default=64)
    e.add_argument("--max-new-tokens", type=int, default=None, help="override the task's answer length")
    e.add_argument("--rescore", action="store_true", help="score the saved predictions again; load no model")
    e.add_argument("--out", default="runs/eval")
    e.set_defaults(fn=_eval)

    x = sub.add_parser("export", help="write a training checkpoint as a full Hugging Face folder")
    x.add_argument("config")
    x.add_argument("--checkpoint", required=True)
    x.add_argument("--out", required=True)
    x.add_argument("overrides", nargs="*")
    x.set_defaults(fn=_export)

    d = sub.add_parser("demo", help="web chat demo (Gradio): upload an image, chat, beams / temperature sliders")
    d.add_argument("--model", default=None, help="exported folder or hub id (default: the toy model)")
    d.add_argument("--template", default=None, help="override the model's template")
    d.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    d.add_argument("--device", default="cpu")
    d.add_argument("--host", default="127.0.0.1", help="0.0.0.0 to serve the local network")
    d.add_argument("--port", type=int, default=7860)
    d.add_argument("--share", action="store_true", help="also open a public Gradio share link (off by default)")
    d.set_defaults(fn=_demo)

    v = sub.add_parser("convert", help="convert published MiniGPT-4 / LLaVA-1.5 / ShareGPT4V weights (docs/convert.md)")
    vs = v.add_subparsers(dest="source", required=True)
    vm = vs.add_parser("minigpt4", help="MiniGPT-4 stage-2 .pth + BLIP-2 / EVA weights + LLM folder")
    vm.add_argument("--projection", required=True, help="MiniGPT-4 checkpoint .pth (holds llama_proj)")
    vm.add_argument("--blip2", help="LAVIS blip2_pretrained_flant5xxl.pth, or a HF Blip2 folder / hub id (Vicuna)")
    vm.add_argument("--vit", help="LAVIS eva_vit_g.pth (with a LAVIS --blip2; alone for the Llama-2 variant)")
    vm.add_argument("--llm", required=True, help="Vicuna / Llama-2-chat HF folder or hub id")
    vm.add_argument("--vit-layers", type=int, default=39, help="EVA blocks kept (MiniGPT-4: 39 of 40)")
    vm.add_argument("--vit-heads", type=int, help="EVA attention heads (default: 16 for ViT-g)")
    vm.add_argument("--qformer-heads", type=int, help="Q-Former attention heads (default: 12 for width 768)")
    vm.add_argument("--trust-pickle", action="store_true", help="read .pth files that hold more than tensors")
    vl = vs.add_parser("llava", help="LLaVA-1.5 / ShareGPT4V folder in the original LLaVA layout")
    vl.add_argument("--checkpoint", required=True, help="folder or hub id, e.g. liuhaotian/llava-v1.5-7b")
    vl.add_argument("--vision", help="vision tower folder / hub id (default: config.json's mm_vision_tower)")
    for q in (vm, vl):
        q.add_argument("--out", required=True)
        q.add_argument(
            "--dtype", default="auto", choices=["auto", "float16", "bfloat16", "float32"], help="auto: the LLM's"
        )
        q.add_argument("--max-shard-size", default="5GB")
        q.add_argument("--template", help="chat template to record (default: the original's)")
        q.set_defaults(fn=_convert)

    y = sub.add_parser("toy", help="the embedded toy world: write its data, or run the whole main job")
    y.add_argument("what", choices=["data", "run"])
    y.add_argument("--out", default="runs/toy")
    y.add_argument("--quick", action="store_true", help="a few steps only (smoke test)")
    y.add_argument("overrides", nargs="*", help="section.key=value for both stages, e.g. model.llm=DIR")
    y.set_defaults(fn=_toy)

    a, extra = p.parse_known_args(argv)  # `section.key=value` overrides may follow the options too
    if extra and (not hasattr(a, "overrides") or any(x.startswith("-") or "=" not in x for x in extra)):
        p.error(f"unrecognized arguments: {' '.join(extra)}")
    if extra:
        a.overrides = [*a.overrides, *extra]
    a.fn(a)


if __name__ == "__main__":
    main()
