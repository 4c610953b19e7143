"""Host runtimes: run a model as a device would and give the evaluator logits and greedy generations.

Every runtime answers the same two questions, so the evaluator never knows which one it is talking to:

- ``logits(ids)``: next-token logits at every position of ``ids`` from a fresh context, float32 [len, vocab];
- ``generate(ids, max_new_tokens, stop_ids)``: greedy continuation token ids (stop token excluded).

All three also give ``continuation_logits(prefix, continuations)``: for each continuation, the logits that predict
its tokens after ``prefix`` (the rows ``logits(prefix + c)`` has at positions ``len(prefix) - 1 ..``), running the
shared prefix once; multiple-choice scoring uses it when a runtime has it, and ``logits`` otherwise.

``eager`` runs the transformers model (float or torchao-quantized); ``pte`` runs an ExecuTorch program with
ExecuTorch's runtime; ``gguf`` runs llama.cpp through llama-cpp-python. The latter two import their backend
lazily.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from edgeft.qat.fake_quant import int8_per_token_asym
from edgeft.rundir import is_converted


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
    def continuation_logits(self, prefix: list[int], continuations: list[list[int]]) -> list[torch.Tensor]:
        """The prefix once into a KV cache; each continuation after it, the cache cropped back to the prefix."""
        import inspect

        dev = self.model.device
        # transformers >= 5.2x names the cache argument and output ``cache`` (``past_key_values`` before)
        key = "cache" if "cache" in inspect.signature(self.model.forward).parameters else "past_key_values"
        out = self.model(input_ids=torch.tensor([prefix], dtype=torch.long, device=dev), use_cache=True)
        cache, last = getattr(out, key, None), out.logits[0, -1:].float().cpu()
        res = []
        try:
            if cache is None:
                raise ValueError("the model returned no cache")
            for c in continuations:
                rows = [last]
                if len(c) > 1:
                    x = torch.tensor([c[:-1]], dtype=torch.long, device=dev)
                    rows.append(self.model(input_ids=x, use_cache=True, **{key: cache}).logits[0].float().cpu())
                    cache.crop(-(len(c) - 1))  # a negative count removes that many tokens (every transformers)
                    if cache.get_seq_length() != len(prefix):
                        raise ValueError("the cache did not go back to the prefix")
                res.append(torch.cat(rows, 0))
        except (AttributeError, ValueError, NotImplementedError):  # a cache that cannot be cut back (sliding window)
            return [self.logits(prefix + c)[len(prefix) - 1 : len(prefix) + len(c) - 1] for c in continuations]
        return res

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


class _DequantizedLinear(nn.Linear):
    """A torchao-quantized linear with its weight dequantized once; activations quantized per call."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, act_int8: bool) -> None:
        super().__init__(weight.shape[1], weight.shape[0], bias is not None, dtype=weight.dtype)
        self.weight = nn.Parameter(weight, requires_grad=False)
        if bias is not None:
            self.bias = nn.Parameter(bias.detach(), requires_grad=False)
        self.act_int8 = act_int8

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.act_int8:
            x = int8_per_token_asym(x)
        return F.linear(x, self.weight, self.bias)


def dequantized_view(model: nn.Module) -> tuple[nn.Module, list[str]]:
    """Replace torchao weights by their dequantized floats (once), keeping dynamic activation quantization.

    On a CPU torchao computes exactly this on every call (dequantize, then a float matmul), so the result is
    the same model minus the per-call dequantization; :func:`load_runtime` checks that on a probe.
    """
    from torchao.quantization import IntxUnpackedToInt8Tensor

    replaced = []
    for name, mod in list(model.named_modules()):
        w = getattr(mod, "weight", None)
        if not isinstance(w, IntxUnpackedToInt8Tensor):
            continue
        deq = w.dequantize().detach()
        if isinstance(mod, nn.Linear):
            act = w.activation_quantization is not None
            if act and "INT8_ASYM_PER_TOKEN" not in str(w.activation_quantization).upper():
                continue  # an activation scheme this path does not know: keep torchao's
            new = _DequantizedLinear(deq, mod.bias, act)
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, new)
        elif isinstance(mod, nn.Embedding):
            mod.weight = nn.Parameter(deq, requires_grad=False)  # a row lookup of dequantized rows is exact
        else:
            continue
        replaced.append(name)
    return model, replaced


def _converted_runtime(path: Path) -> EagerRuntime:
    import copy

    from edgeft.qat import load_converted

    model, _, record = load_converted(path)
    if not record.get("plan"):
        return EagerRuntime(model)
    probe = torch.randint(0, model.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(input_ids=probe).logits
        fast, _ = dequantized_view(copy.deepcopy(model))
        got = fast(input_ids=probe).logits
    if float((got - ref).norm() / ref.norm()) > 1e-5:  # not the same function: use torchao's own path
        return EagerRuntime(model)
    return EagerRuntime(fast)


def load_runtime(kind: str, path: str | os.PathLike, **kwargs: Any) -> Runtime:
    """Open an artifact on its runtime: ``eager`` (HF or converted dir; ``device=`` a torch device, default the
    CPU), ``pte`` (.pte file), ``gguf`` (.gguf file)."""
    path = Path(path)
    if kind == "eager":
        from edgeft.models import load_model

        device = kwargs.pop("device", None) or "cpu"
        if kwargs:
            raise TypeError(f"eager runtime: unexpected options {sorted(kwargs)}")
        if is_converted(path):
            rt = _converted_runtime(path)
        else:
            model, _ = load_model(path)
            rt = EagerRuntime(model)
        if str(device) != "cpu":  # loaded (and checked) on the CPU, then moved: same weights, faster on a GPU
            rt.model.to(device)
        return rt
    if kind == "pte":
        from .executorch_runtime import PteRuntime

        return PteRuntime(path, **kwargs)
    if kind == "gguf":
        from .llamacpp_runtime import GgufRuntime

        return GgufRuntime(path, **kwargs)
    raise ValueError(f"unknown runtime {kind!r} (eager, pte, gguf)")
