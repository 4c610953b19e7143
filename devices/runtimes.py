"""Host runtimes: run a model as a device would and give the evaluator logits and greedy generations.

Every runtime answers the same two questions, so the evaluator never knows which one it is talking to:

- ``logits(ids)``: next-token logits at every position of ``ids`` from a fresh context, float32 [len, vocab];
- ``generate(ids, max_new_tokens, stop_ids)``: greedy continuation token ids (stop token excluded).

``eager`` runs the transformers model (float or torchao-quantized); ``pte`` runs an ExecuTorch program with
ExecuTorch's runtime; ``gguf`` runs llama.cpp through llama-cpp-python. The latter two import their backend
lazily.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Protocol

import torch


class Runtime(Protocol):
    """What the evaluator needs from a runtime."""

    name: str

    def logits(self, ids: list[int]) -> torch.Tensor: ...

    def generate(self, ids: list[int], max_new_tokens: int, stop_ids: set[int]) -> list[int]: ...

    def close(self) -> None: ...


class EagerRuntime:
    """A transformers model in PyTorch eager mode (KV cache through ``generate``)."""

    name = "eager"

    def __init__(self, model: Any) -> None:
        self.model = model.eval()

    @torch.no_grad()
    def logits(self, ids: list[int]) -> torch.Tensor:
        x = torch.tensor([ids], dtype=torch.long, device=self.model.device)
        return self.model(input_ids=x).logits[0].float().cpu()

    @torch.no_grad()
    def generate(self, ids: list[int], max_new_tokens: int, stop_ids: set[int]) -> list[int]:
        x = torch.tensor([ids], dtype=torch.long, device=self.model.device)
        out = self.model.generate(
            input_ids=x,
            attention_mask=torch.ones_like(x),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=sorted(stop_ids) or None,
            pad_token_id=next(iter(stop_ids), 0),
        )[0, len(ids) :].tolist()
        for i, t in enumerate(out):
            if t in stop_ids:
                return out[:i]
        return out

    def close(self) -> None:
        pass


def load_runtime(kind: str, path: str | os.PathLike, **kwargs: Any) -> Runtime:
    """Open an artifact on its runtime: ``eager`` (HF or converted dir), ``pte`` (.pte file), ``gguf`` (.gguf file)."""
    path = Path(path)
    if kind == "eager":
        from edgeft.models import load_model

        if (path / "scheme.json").exists():
            from edgeft.qat import load_converted

            model, _, _ = load_converted(path)
        else:
            model, _ = load_model(path)
        return EagerRuntime(model)
    if kind == "pte":
        from .executorch_runtime import PteRuntime

        return PteRuntime(path, **kwargs)
    if kind == "gguf":
        from .llamacpp_runtime import GgufRuntime

        return GgufRuntime(path, **kwargs)
    raise ValueError(f"unknown runtime {kind!r} (eager, pte, gguf)")
