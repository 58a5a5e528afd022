"""Low-memory loading: the quantization config for ``--load-in 8bit|4bit``, and weight bytes.

The LLM's linear layers are quantized; the modules the architecture lists as full precision
(vision tower, Q-Former / projector, LM head) keep the model's dtype, as MiniGPT-4's
low-resource demo keeps its vision encoder.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import PreTrainedConfig

from mmalign.model.architectures import architecture_of

LOAD_IN = ("8bit", "4bit")


def quantization_config(config: PreTrainedConfig, load_in: str, device: str | torch.device, dtype: Any = None) -> Any:
    """The transformers quantization config for ``--load-in 8bit|4bit`` on ``device``.

    CUDA: bitsandbytes (LLM.int8() / NF4), as MiniGPT-4's low-resource demo. CPU: torchao's
    int8 weight-only quantization for 8bit (bitsandbytes' CPU 8-bit path casts to float16 and
    is slow), bitsandbytes' CPU backend for NF4 4bit (its CPU kernels need every LLM layer
    width to be a multiple of its block size, 64).
    """
    if load_in not in LOAD_IN:
        raise ValueError(f"load_in must be one of {LOAD_IN}, got {load_in!r}")
    skip = list(architecture_of(config).full_precision)
    cpu = torch.device(device).type == "cpu"
    if cpu and load_in == "4bit":
        text = config.get_text_config()
        widths = {"hidden_size": text.hidden_size, "intermediate_size": getattr(text, "intermediate_size", 0)}
        if bad := {k: v for k, v in widths.items() if v % 64}:
            raise ValueError(
                f"4bit on CPU (bitsandbytes NF4) needs LLM widths divisible by 64, got {bad}; "
                "use load_in='8bit' (torchao int8) or a CUDA device"
            )
    if cpu and load_in == "8bit":
        from torchao.quantization import Int8WeightOnlyConfig
        from transformers import TorchAoConfig

        return TorchAoConfig(Int8WeightOnlyConfig(), modules_to_not_convert=skip)
    from transformers import BitsAndBytesConfig

    if load_in == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        llm_int8_skip_modules=skip,
        bnb_4bit_compute_dtype=dtype or torch.float16,
    )


def weight_bytes(model: nn.Module) -> int:
    """Bytes held by the model's parameters and buffers, counting a quantized tensor subclass
    (torchao) by its inner tensors and a bitsandbytes weight by its packed storage."""

    def nbytes(t: torch.Tensor) -> int:
        if hasattr(t, "__tensor_flatten__"):
            names, _ = t.__tensor_flatten__()
            return sum(nbytes(getattr(t, n)) for n in names)
        return t.numel() * t.element_size()

    seen: set[int] = set()
    total = 0
    for t in [*model.parameters(), *model.buffers()]:
        if id(t) not in seen:
            seen.add(id(t))
            total += nbytes(t) + sum(nbytes(s) for s in _bnb_state_tensors(t))
    return total


def _bnb_state_tensors(t: torch.Tensor) -> list[torch.Tensor]:
    """The scales bitsandbytes keeps beside a quantized weight (absmax, SCB)."""
    out = [getattr(t, "SCB", None)]
    qs = getattr(t, "quant_state", None)
    if qs is not None:
        out += [getattr(qs, "absmax", None), getattr(getattr(qs, "state2", None), "absmax", None)]
    return [x for x in out if isinstance(x, torch.Tensor)]


__all__ = ["LOAD_IN", "quantization_config", "weight_bytes"]
