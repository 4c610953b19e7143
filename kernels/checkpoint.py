"""Gradient checkpointing per decoder layer, keeping the checkpointed hidden states in pinned CPU memory.

Why by hand: ``torch.utils.checkpoint`` keeps each layer's input on the GPU. With LoRA and the fused loss those
inputs are a large share of what is left (layers x tokens x hidden, e.g. 28 x 8192 x 1024 bf16 = 470 MB), so
"offload" mode copies each one to pinned host memory on a side CUDA stream as soon as the layer has run (the copy
overlaps the next layers' compute), frees the GPU copy, and in the backward brings it back one layer ahead (layer
i's backward starts the copy for layer i-1), so the transfers hide behind compute. "plain" mode keeps the input on
the device (torch's reentrant checkpoint, without its generality).

Mechanics (reentrant style): the layer runs under no_grad in the forward; in the backward it runs again with grad
enabled from the restored input and ``torch.autograd.backward`` pushes the gradient through it, accumulating the
parameters' ``.grad`` directly. A zero-size tensor that requires grad is passed along so the backward runs even
when the layer's input needs no gradient (frozen embeddings under LoRA). RNG state is restored for the recompute
when the layer has active dropout.
"""

from __future__ import annotations

import weakref
from typing import Callable

import torch

MODES = ("offload", "plain")
_RECOMPUTING = [0]  # depth of checkpointed-layer recomputations in progress (see recomputing())


def recomputing() -> bool:
    """True while a checkpointed layer is being recomputed for its backward: what its ops save now lives only
    until that layer's backward, which follows at once (QAT's linears then save their fake-quantized weights
    rather than rebuilding them, ``kernels/fake_quant.py`` WeightFQ)."""
    return _RECOMPUTING[0] > 0


class OffloadChain:
    """The layers' offloaded inputs of one forward, in order, so that each backward can prefetch the previous one."""

    def __init__(self) -> None:
        self.records: list[weakref.ref] = []
        self._stream: torch.cuda.Stream | None = None

    def reset(self) -> None:
        self.records = []

    def stream(self, device: torch.device) -> torch.cuda.Stream:
        if self._stream is None or self._stream.device != device:
            self._stream = torch.cuda.Stream(device=device)
        return self._stream

    def add(self, rec: "_Offloaded") -> None:
        if self.records:
            rec.prev = self.records[-1]
        self.records.append(weakref.ref(rec))


class _Offloaded:
    """One hidden state copied to pinned host memory on a side stream; fetched back (or prefetched) on demand."""

    def __init__(self, t: torch.Tensor, stream: torch.cuda.Stream) -> None:
        self.device = t.device
        self.stream = stream
        self.prev: weakref.ref | None = None
        self.gpu: torch.Tensor | None = None
        self.ready: torch.cuda.Event | None = None
        self.cpu = torch.empty(
            t.shape, dtype=t.dtype, device="cpu", pin_memory=True
        )  # explicit: default device may be cuda
        stream.wait_stream(torch.cuda.current_stream(t.device))  # the copy reads t only after it is computed
        with torch.cuda.stream(stream):
            self.cpu.copy_(t, non_blocking=True)
        t.record_stream(stream)  # t's memory is not reused until the copy has read it

    def prefetch(self) -> None:
        if self.gpu is not None or self.cpu is None:
            return
        with torch.cuda.stream(self.stream):  # same stream as the D2H copy, so it runs after it
            self.gpu = self.cpu.to(self.device, non_blocking=True)
            self.ready = torch.cuda.Event()
            self.ready.record(self.stream)

    def fetch(self) -> torch.Tensor:
        self.prefetch()
        cur = torch.cuda.current_stream(self.device)
        cur.wait_event(self.ready)
        t = self.gpu
        t.record_stream(cur)
        self.gpu = self.cpu = None
        return t


class _LayerCheckpoint(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, run: Callable, mode: str, chain: OffloadChain | None, rng: bool, hidden: torch.Tensor, _dummy: torch.Tensor
    ):
        ctx.run = run
        ctx.hidden_requires_grad = hidden.requires_grad
        ctx.rng = None
        if rng:
            ctx.rng = (torch.get_rng_state(), torch.cuda.get_rng_state(hidden.device) if hidden.is_cuda else None)
        with torch.no_grad():
            out = run(hidden)
        if not isinstance(out, torch.Tensor):
            raise TypeError("checkpointed layer must return a tensor")
        ctx.offloaded = None
        if mode == "offload" and hidden.is_cuda:
            stream = chain.stream(hidden.device) if chain is not None else torch.cuda.Stream(hidden.device)
            ctx.offloaded = _Offloaded(hidden, stream)
            if chain is not None:
                chain.add(ctx.offloaded)
        else:
            ctx.save_for_backward(hidden)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        if ctx.offloaded is not None:
            rec = ctx.offloaded
            hidden = rec.fetch()
            prev = rec.prev() if rec.prev is not None else None
            if prev is not None:
                prev.prefetch()  # overlap the next layer's host-to-device copy with this layer's recompute
            ctx.offloaded = None
        else:
            (hidden,) = ctx.saved_tensors
        hidden = hidden.detach().requires_grad_(True)
        with (
            torch.enable_grad(),
            torch.random.fork_rng(devices=[hidden.device] if hidden.is_cuda else [], enabled=ctx.rng is not None),
        ):
            if ctx.rng is not None:
                torch.set_rng_state(ctx.rng[0])
                if ctx.rng[1] is not None:
                    torch.cuda.set_rng_state(ctx.rng[1], hidden.device)
            _RECOMPUTING[0] += 1
            try:
                out = ctx.run(hidden)
            finally:
                _RECOMPUTING[0] -= 1
        torch.autograd.backward(out, grad_out)
        ctx.run = None
        return None, None, None, None, (hidden.grad if ctx.hidden_requires_grad else None), None


def checkpoint_layer(
    run: Callable[[torch.Tensor], torch.Tensor],
    hidden: torch.Tensor,
    mode: str = "offload",
    chain: OffloadChain | None = None,
    preserve_rng: bool = False,
) -> torch.Tensor:
    """``run(hidden)`` without keeping its activations; recomputed in the backward.

    mode "offload": the input waits in pinned CPU memory (CUDA only; elsewhere it behaves like "plain").
    ``chain`` links the layers of one forward for prefetching; ``preserve_rng`` for layers with dropout.
    """
    if mode not in MODES:
        raise ValueError(f"checkpoint mode must be one of {MODES}, got {mode!r}")
    dummy = torch.empty(0, device="cpu", requires_grad=True)
    return _LayerCheckpoint.apply(run, mode, chain, preserve_rng, hidden, dummy)
