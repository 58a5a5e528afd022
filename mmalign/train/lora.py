"""LoRA / QLoRA on the LLM through peft (LLaVA's recipe: adapters on the LLM's Linear layers,
the projector trained fully, optionally with its own learning rate).

The adapters are injected in place, so parameter names stay the model's own
(`model.language_model.layers.0.self_attn.q_proj.lora_A.default.weight`): the freezing roles,
trainable-only checkpoints and resume work unchanged. `mmalign.model.checkpoint.export` merges
them into the base weights, so the exported folder is a plain HF model.
"""

from __future__ import annotations

import logging

from torch import nn

from mmalign.config import TrainConfig
from mmalign.model.architectures import architecture_of

log = logging.getLogger(__name__)


def lora_target_modules(model: nn.Module, target: str = "all-linear") -> list[str]:
    """Full names of the LLM's Linear layers that get adapters: every one but `lm_head` for
    "all-linear" (LLaVA's `find_all_linear_names`), else those whose last name component is in
    the comma-separated `target` (e.g. "q_proj,v_proj"). Vision tower and projector never."""
    llm = architecture_of(model).roles["llm"]
    linears = [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and name.startswith(llm) and name.rsplit(".", 1)[-1] != "lm_head"
    ]
    if target.strip() == "all-linear":
        chosen = linears
    else:
        wanted = [t.strip() for t in target.split(",") if t.strip()]
        missing = [w for w in wanted if not any(n.rsplit(".", 1)[-1] == w for n in linears)]
        if missing:
            have = sorted({n.rsplit(".", 1)[-1] for n in linears})
            raise ValueError(f"train.lora_target: no LLM Linear layer named {missing}; the LLM has {have}")
        chosen = [n for n in linears if n.rsplit(".", 1)[-1] in wanted]
    if not chosen:
        raise ValueError(f"train.lora_target={target!r} selects no Linear layer of the LLM")
    return chosen


def apply_lora(model: nn.Module, tc: TrainConfig):
    """Add LoRA adapters (r, alpha, dropout, targets from `tc`) to the LLM of `model`, in place.

    What the freezing policy made trainable stays trainable (the projector); the adapted base
    weights stay frozen. Returns the `PeftModel` (its `.base_model.model` is `model`)."""
    from peft import LoraConfig, get_peft_model

    targets = lora_target_modules(model, tc.lora_target)
    target_set = {f"{t}.weight" for t in targets} | {f"{t}.bias" for t in targets}
    keep = [n for n, p in model.named_parameters() if p.requires_grad]
    clash = sorted(set(keep) & target_set)
    if clash:
        raise ValueError(
            f"train.trainable={tc.trainable!r} trains LLM layers that LoRA adapts ({clash[:3]} ...): "
            "use a policy without the LLM (e.g. projector) together with train.lora_r"
        )
    config = LoraConfig(
        r=tc.lora_r, lora_alpha=tc.lora_alpha, lora_dropout=tc.lora_dropout, target_modules=targets, bias="none"
    )
    peft_model = get_peft_model(model, config)  # marks only the adapters trainable ...
    params = dict(model.named_parameters())
    for name in keep:  # ... so the policy's own trainable parts are switched back on
        params[name].requires_grad_(True)
    log.info(
        "LoRA r=%d alpha=%d dropout=%.2f on %d LLM Linear layers",
        tc.lora_r,
        tc.lora_alpha,
        tc.lora_dropout,
        len(targets),
    )
    return peft_model


def prepare_quantized(model: nn.Module, tc: TrainConfig) -> None:
    """QLoRA: a 4-/8-bit base (loaded with `model.quantization`) needs peft's k-bit preparation
    (norms in float32, input grads for checkpointing) before adapters go on. CUDA only."""
    if not tc.lora_r:
        raise ValueError(
            "model.quantization trains only with LoRA (set train.lora_r > 0): quantized weights cannot train"
        )
    from peft import prepare_model_for_kbit_training

    prepare_model_for_kbit_training(
        model,
        use_gradient_checkpointing=tc.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False},
    )
