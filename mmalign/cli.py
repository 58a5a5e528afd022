"""`mmalign <verb>`: train, export, cache-features, chat, serve, demo, eval, convert, curate, toy.

Each verb is a parser and a handler side by side; options several verbs share come from
parent parsers. Nothing heavy is imported until a verb runs, so `mmalign --help` answers at
once, and a bad option or config key is a one-line error naming it, not a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

DTYPES = ["float32", "float16", "bfloat16"]


def _fail(verb: str, error: Exception) -> SystemExit:
    return SystemExit(f"mmalign {verb}: error: {error.args[0] if error.args else error}")


def _load_config(a: argparse.Namespace):
    """The run config; a bad key or value is a command-line error naming it, not a traceback."""
    from mmalign.config import load_config, with_recipe_defaults

    try:
        return with_recipe_defaults(load_config(a.config, a.overrides))
    except (KeyError, ValueError) as e:
        raise _fail(a.verb, e) from None


def _model_options(a: argparse.Namespace) -> dict:
    """The "model" parent parser's loading options, as `LoadedModel.load` (and `serve`) take them."""
    keys = ("template", "dtype", "device", "attn_implementation", "load_in")
    return {k: getattr(a, k) for k in keys}


def _loaded(a: argparse.Namespace):
    """The `--model` folder / hub id as a LoadedModel (template, dtype, device, --load-in applied)."""
    from mmalign.model import LoadedModel

    return LoadedModel.load(a.model, **_model_options(a))


# --------------------------------------------------------------------------- parent parsers


def _parents() -> dict[str, argparse.ArgumentParser]:
    config = argparse.ArgumentParser(add_help=False)
    config.add_argument("config", help="a stage YAML (configs/*.yaml)")
    config.add_argument("overrides", nargs="*", help="section.key=value, e.g. train.lr=1e-4")
    model = argparse.ArgumentParser(add_help=False)
    model.add_argument("--model", required=True, help="exported folder or hub id")
    model.add_argument("--template", default=None, help="override the model's recorded chat template")
    model.add_argument("--dtype", default="float32", choices=DTYPES)
    model.add_argument("--device", default="cpu")
    model.add_argument(
        "--attn-implementation",
        default=None,
        help="the LLM's attention backend: sdpa, eager, flash_attention_2, ... (default: the model's)",
    )
    quantized = argparse.ArgumentParser(add_help=False)
    quantized.add_argument("--load-in", choices=["8bit", "4bit"], default=None, help="quantize the LLM on load")
    return {"config": config, "model": model, "quantized": quantized}


# --------------------------------------------------------------------------- train, export


def add_train(sub, parents) -> None:
    p = sub.add_parser("train", parents=[parents["config"]], help="run one training stage from a YAML config")
    p.set_defaults(fn=run_train)


def run_train(a: argparse.Namespace) -> None:
    from mmalign.data import DataError
    from mmalign.train.loop import train

    try:
        print(train(_load_config(a)))
    except DataError as e:  # unusable data, found before the model loads: named, not a traceback
        raise _fail("train", e) from None


def add_export(sub, parents) -> None:
    p = sub.add_parser("export", parents=[parents["config"]], help="write a training checkpoint as a full HF folder")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--out", required=True)
    p.set_defaults(fn=run_export)


def run_export(a: argparse.Namespace) -> None:
    from mmalign.train.export import export_checkpoint

    print(export_checkpoint(_load_config(a), a.checkpoint, a.out))


def add_cache_features(sub, parents) -> None:
    p = sub.add_parser(
        "cache-features",
        parents=[parents["config"]],
        help="run a stage's frozen part once over its data; train from it with data.features=DIR",
    )
    p.add_argument("--out", required=True, help="the cache folder (new)")
    p.add_argument("--views", type=int, default=1, help="draws of a random train transform per image (one per epoch)")
    p.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    p.add_argument("--batch-size", type=int, default=64, help="images per frozen forward")
    p.add_argument("--num-workers", type=int, default=None, help="image decoding workers (default: data.num_workers)")
    p.set_defaults(fn=run_cache_features)


def run_cache_features(a: argparse.Namespace) -> None:
    from mmalign.data import DataError
    from mmalign.train.feature_cache import cache_features

    options = dict(views=a.views, dtype=a.dtype, batch_size=a.batch_size, num_workers=a.num_workers)
    try:
        print(cache_features(_load_config(a), a.out, **options).folder)
    except (DataError, ValueError) as e:
        raise _fail("cache-features", e) from None


# --------------------------------------------------------------------------- chat, serve, demo


def add_chat(sub, parents) -> None:
    p = sub.add_parser("chat", parents=[parents["model"], parents["quantized"]], help="terminal chat about an image")
    p.add_argument("--image", default=None)
    p.add_argument("--ask", action="append", help="ask this and exit (repeatable: a multi-turn script)")
    p.add_argument("--num-beams", type=int, default=1)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--max-new-tokens", type=int, default=300)
    p.set_defaults(fn=run_chat)


def run_chat(a: argparse.Namespace) -> None:
    from mmalign.chat.terminal import chat_in_terminal

    gen = {
        "num_beams": a.num_beams,
        "do_sample": a.temperature > 0,
        "temperature": a.temperature or None,
        "top_p": a.top_p,
        "repetition_penalty": a.repetition_penalty,
        "max_new_tokens": a.max_new_tokens,
    }
    chat_in_terminal(_loaded(a), image=a.image, script=a.ask, gen=gen)


def add_serve(sub, parents) -> None:
    p = sub.add_parser(
        "serve",
        parents=[parents["model"], parents["quantized"]],
        help="OpenAI-compatible API server (POST /v1/chat/completions)",
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--served-name", default=None, help="model id clients send (default: --model)")
    p.add_argument("--allow-remote-images", action="store_true", help="fetch http(s) image URLs (size/time limited)")
    p.add_argument("--max-batch-size", type=int, default=16, help="requests generated together in one batch")
    p.add_argument(
        "--batch-wait-ms",
        type=float,
        default=20.0,
        help="how long a batch waits for more requests before it starts (longer: fuller batches, more latency)",
    )
    p.add_argument(
        "--kv-cache",
        choices=("dynamic", "static"),  # chat.generate.KV_CACHES (not imported: the CLI starts without torch)
        default="dynamic",
        help="static: a preallocated KV cache per batch (no concatenation per token; faster on CPU)",
    )
    p.set_defaults(fn=run_serve)


def run_serve(a: argparse.Namespace) -> None:
    from mmalign.chat.server import serve

    serve(
        a.model,
        host=a.host,
        port=a.port,
        **_model_options(a),
        model_name=a.served_name,
        allow_remote_images=a.allow_remote_images,
        max_batch_size=a.max_batch_size,
        batch_wait_s=a.batch_wait_ms / 1000,
        kv_cache=a.kv_cache,
    )


def add_demo(sub, parents) -> None:
    p = sub.add_parser("demo", help="web chat demo (Gradio): upload an image, chat, beams / temperature sliders")
    p.add_argument("--model", default=None, help="exported folder or hub id (default: the toy model)")
    p.add_argument("--template", default=None, help="override the model's recorded chat template")
    p.add_argument("--dtype", default="float32", choices=DTYPES)
    p.add_argument("--device", default="cpu")
    p.add_argument("--host", default="127.0.0.1", help="0.0.0.0 to serve the local network")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--share", action="store_true", help="also open a public Gradio share link (off by default)")
    p.set_defaults(fn=run_demo)


def run_demo(a: argparse.Namespace) -> None:
    from mmalign.chat.demo import launch, load_demo_model

    dm = load_demo_model(a.model, template=a.template, dtype=a.dtype, device=a.device)
    launch(dm, host=a.host, port=a.port, share=a.share)


# --------------------------------------------------------------------------- eval


def add_eval(sub, parents) -> None:
    p = sub.add_parser(
        "eval",
        help="evaluate on a benchmark (toy, chair, pope, vqav2, gqa, vizwiz, textvqa, mme, "
        "mmbench): predictions JSONL (resumable) + report.md / report.png",
    )
    p.add_argument(
        "--model",
        required=True,
        action="append",
        help="exported folder or hub id, or NAME=PATH; repeat to compare models in one report",
    )
    p.add_argument("--task", default="toy", help="benchmark (default: toy, the embedded world; needs no --data)")
    p.add_argument("--data", default=None, help="the benchmark's file or folder in its published layout")
    p.add_argument("--images", default=None, help="image folder, when not where the layout puts it")
    p.add_argument("--template", default=None, help="override the model's recorded chat template")
    p.add_argument("--dtype", default="float32", choices=DTYPES)
    p.add_argument("--device", default="cpu")
    p.add_argument("--n-scenes", type=int, default=200, help="toy: held-out scenes")
    p.add_argument("--limit", type=int, default=None, help="evaluate only this many items (images / questions)")
    p.add_argument("--seed", type=int, default=0, help="which items --limit draws (chair)")
    p.add_argument("--split", default=None, help="chair: COCO split (default val2014); toy: test (default) or val")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--max-new-tokens", type=int, default=None, help="override the task's answer length")
    p.add_argument("--rescore", action="store_true", help="score the saved predictions again; load no model")
    p.add_argument("--out", default="runs/eval")
    p.set_defaults(fn=run_eval)


def run_eval(a: argparse.Namespace) -> None:
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
        raise _fail("eval", e) from None
    print(json.dumps(results[next(iter(results))] if len(results) == 1 else results, indent=1))
    print(f"report: {Path(a.out) / 'report.md'}")


# --------------------------------------------------------------------------- convert


def add_convert(sub, parents) -> None:
    p = sub.add_parser("convert", help="convert published MiniGPT-4 / LLaVA-1.5 / ShareGPT4V weights (docs/convert.md)")
    out = argparse.ArgumentParser(add_help=False)
    out.add_argument("--out", required=True)
    out.add_argument("--dtype", default="auto", choices=["auto", *DTYPES], help="auto: the LLM's")
    out.add_argument("--max-shard-size", default="5GB")
    out.add_argument("--template", help="chat template to record (default: the original's)")
    sources = p.add_subparsers(dest="source", required=True)
    m = sources.add_parser("minigpt4", parents=[out], help="MiniGPT-4 stage-2 .pth + BLIP-2 / EVA weights + LLM")
    m.add_argument("--projection", required=True, help="MiniGPT-4 checkpoint .pth (holds llama_proj)")
    m.add_argument("--blip2", help="LAVIS blip2_pretrained_flant5xxl.pth, or a HF Blip2 folder / hub id (Vicuna)")
    m.add_argument("--vit", help="LAVIS eva_vit_g.pth (with a LAVIS --blip2; alone for the Llama-2 variant)")
    m.add_argument("--llm", required=True, help="Vicuna / Llama-2-chat HF folder or hub id")
    m.add_argument("--vit-layers", type=int, default=39, help="EVA blocks kept (MiniGPT-4: 39 of 40)")
    m.add_argument("--vit-heads", type=int, help="EVA attention heads (default: 16 for ViT-g)")
    m.add_argument("--qformer-heads", type=int, help="Q-Former attention heads (default: 12 for width 768)")
    m.add_argument("--trust-pickle", action="store_true", help="read .pth files that hold more than tensors")
    llava = sources.add_parser("llava", parents=[out], help="LLaVA-1.5 / ShareGPT4V folder in LLaVA's layout")
    llava.add_argument("--checkpoint", required=True, help="folder or hub id, e.g. liuhaotian/llava-v1.5-7b")
    llava.add_argument("--vision", help="vision tower folder / hub id (default: config.json's mm_vision_tower)")
    p.set_defaults(fn=run_convert)


def run_convert(a: argparse.Namespace) -> None:
    from mmalign.model.bundle import torch_dtype
    from mmalign.model.convert import ConversionError, convert_llava, convert_minigpt4

    common = dict(dtype=None if a.dtype == "auto" else torch_dtype(a.dtype), max_shard_size=a.max_shard_size)
    common.update({"template": a.template} if a.template else {})
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
        raise _fail(f"convert {a.source}", e) from None
    print(out)


# --------------------------------------------------------------------------- curate


def add_curate(sub, parents) -> None:
    from mmalign.curate.commands import STEPS  # no heavy import: the step list only

    p = sub.add_parser(
        "curate",
        help="make stage-2 data: describe -> fix -> filter -> review -> export; recaption shards (docs/curate.md)",
    )
    p.add_argument("step", choices=STEPS)
    p.add_argument("config", nargs="?", default=None, help="a pipeline YAML (configs/curate_minigpt4.yaml)")
    p.add_argument("overrides", nargs="*", help="section.key=value, e.g. describe.model=DIR fix.endpoint.budget=100")
    p.add_argument("--base-url", default=None, help="the step's OpenAI-compatible endpoint (default: $OPENAI_BASE_URL)")
    p.add_argument("--model", default=None, help="the endpoint's model (default: $OPENAI_MODEL), or a local folder")
    p.add_argument("--api-key", default=None, help="default: the config's api_key_env ($OPENAI_API_KEY)")
    p.add_argument("--redo", action="store_true", help="filter: filter every record again (old file kept aside)")
    p.set_defaults(fn=run_curate)


def run_curate(a: argparse.Namespace) -> None:
    from mmalign.curate.commands import Options, apply_flags, run_step
    from mmalign.curate.config import load_curate_config

    config, overrides = a.config, list(a.overrides)
    if config and "=" in config and not Path(config).exists():  # no YAML: overrides only
        config, overrides = None, [config, *overrides]
    try:
        cfg = load_curate_config(config, overrides)
        apply_flags(cfg, a.step, a.base_url, a.model)
        run_step(a.step, cfg, Options(api_key=a.api_key, redo=a.redo))
    except FileNotFoundError as e:
        raise _fail(f"curate {a.step}", ValueError(f"{e.filename}: no such file")) from None
    except ValueError as e:
        raise _fail(f"curate {a.step}", e) from None


# --------------------------------------------------------------------------- toy


def add_toy(sub, parents) -> None:
    p = sub.add_parser("toy", help="the embedded toy world: write its data, or run the whole main job")
    p.add_argument("what", choices=["data", "run"])
    p.add_argument("--out", default="runs/toy")
    p.add_argument("--quick", action="store_true", help="a few steps only (smoke test)")
    p.add_argument(
        "--baseline",
        action="store_true",
        help="train as before the speed work: images every step, padded batches, float32, sdpa, no compile",
    )
    p.add_argument("overrides", nargs="*", help="section.key=value for both stages, e.g. model.llm=DIR")
    p.set_defaults(fn=run_toy)


def run_toy(a: argparse.Namespace) -> None:
    from mmalign.toy import run

    if a.what == "data":
        run.write_toy_data(Path(a.out))
    else:
        run.main_job(Path(a.out), quick=a.quick, overrides=tuple(a.overrides), baseline=a.baseline)


# --------------------------------------------------------------------------- main

VERBS: tuple[Callable, ...] = (
    add_train,
    add_export,
    add_cache_features,
    add_chat,
    add_serve,
    add_demo,
    add_eval,
    add_convert,
    add_curate,
    add_toy,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mmalign", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="verb", required=True)
    parents = _parents()
    for add in VERBS:
        add(sub, parents)
    return parser


def _quiet_third_party() -> None:
    """A normal command prints our log lines, not the import-time noise of optional packages
    (torchao's "Failed to load ... .so", torch's pytree deprecation, transformers' FutureWarnings)."""
    for name in ("torchao", "torch.utils._pytree"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"(transformers|torch|accelerate)(\.|$)")
    warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"(transformers|torch|accelerate)(\.|$)")


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    _quiet_third_party()
    parser = build_parser()
    a, extra = parser.parse_known_args(argv)  # `section.key=value` overrides may follow the options too
    if extra and (not hasattr(a, "overrides") or any(x.startswith("-") or "=" not in x for x in extra)):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if extra:
        a.overrides = [*a.overrides, *extra]
    a.fn(a)


if __name__ == "__main__":
    main(sys.argv[1:])
