"""Read named tensors from a checkpoint folder or hub id without loading the rest.

A Blip2 checkpoint's ViT + Q-Former sit beside an LLM we do not want, and a 13B LLaVA folder is
sharded: only the shards that hold wanted tensors are opened (and, for a hub id, downloaded).
safetensors is preferred; ``pytorch_model.bin`` (older CLIP repos) is the fallback. Used by
model composition (``compose``) and by the conversion of the original checkpoints (``convert``).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

_LAYOUTS = (
    ("model.safetensors.index.json", "model.safetensors"),
    ("pytorch_model.bin.index.json", "pytorch_model.bin"),
)


class WeightReader:
    """Tensor names -> shard files of ``src``; ``read`` opens only the files it needs."""

    def __init__(self, src: str):
        self.src, self.folder = src, Path(src)
        for index, single in _LAYOUTS:
            if path := self._fetch(index):
                self.weight_map: dict[str, str] = json.loads(Path(path).read_text())["weight_map"]
                return
            if path := self._fetch(single):
                self.weight_map = dict.fromkeys(self._read_file(path, None), single)
                return
        raise FileNotFoundError(f"{src}: no model.safetensors / pytorch_model.bin (or their index) found")

    def _fetch(self, name: str) -> str | None:
        if self.folder.is_dir():
            return str(self.folder / name) if (self.folder / name).exists() else None
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError

        try:
            return hf_hub_download(self.src, name)
        except EntryNotFoundError:
            return None

    @staticmethod
    def _read_file(path: str, names: list[str] | None) -> dict[str, torch.Tensor]:
        """Tensors ``names`` of one file (all names, as a dict of None, when ``names`` is None)."""
        if path.endswith(".safetensors"):
            with safe_open(path, "pt") as f:
                return {n: f.get_tensor(n) for n in names} if names is not None else dict.fromkeys(f.keys())
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        return {n: state[n] for n in names} if names is not None else dict.fromkeys(state)

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        """The tensors ``names`` (each must be in ``weight_map``)."""
        by_file: dict[str, list[str]] = {}
        for n in names:
            by_file.setdefault(self.weight_map[n], []).append(n)
        out: dict[str, torch.Tensor] = {}
        for file, keys in by_file.items():
            out.update(self._read_file(self._fetch(file), keys))
        return out

    def read_one(self, name: str) -> torch.Tensor:
        if name not in self.weight_map:
            raise ValueError(f"{self.src}: no tensor {name!r}")
        return self.read([name])[name]


def load_module_weights(module: nn.Module, src: str, prefixes: tuple[str, ...]) -> None:
    """Fill ``module`` (strictly) from the tensors of ``src`` under the first prefix that has them all."""
    reader = WeightReader(src)
    want = list(module.state_dict())
    prefix = next((p for p in prefixes if all(p + k in reader.weight_map for k in want)), None)
    if prefix is None:
        p = prefixes[0]
        missing = [p + k for k in want if p + k not in reader.weight_map][:5]
        raise ValueError(f"{src}: no tensors for {type(module).__name__} under {prefixes}; e.g. missing {missing}")
    state = reader.read([prefix + k for k in want])
    module.load_state_dict({k: state[prefix + k] for k in want}, strict=True)


__all__ = ["WeightReader", "load_module_weights"]
