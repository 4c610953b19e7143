"""Where a quantization plan loses: each linear's grid applied to a float model, one module kind or one linear at a
time (``bench/sensitivity.py`` measures exact match this way; the device-fit planner, ``plan.py``, the task loss).

The quantization is edgeft's reference (``fake_quant.weight_ref`` / ``act_ref``: the grids convert writes, bit for
bit), weights quantized once. :func:`apply_variant` quantizes a whole model as a named variant;
:func:`linear_sensitivity` measures, for every linear, how much the task loss on calibration batches rises when that
linear alone takes the plan's int4 grid (its activations quantized as the scheme says) while everything else stays
float: the per-linear sensitivity the planner ranks int8 upgrades by. The loss rise of one int4 linear is measured,
not estimated from gradients: it is what a linear's int4 grid costs this model on this data.
"""

from __future__ import annotations

from typing import Any, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from edgeft.errors import EdgeftError


class Quantized(nn.Module):
    """A linear with its weight quantized once and its input fake-quantized per call."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, act: Any) -> None:
        super().__init__()
        self.weight, self.bias, self.act = weight, bias, act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from .fake_quant import act_ref

        return F.linear(act_ref(x, self.act) if self.act is not None else x, self.weight, self.bias)


def int8_spec() -> Any:
    """The weight grid of a plan's ``int8_modules``: int8, max|w| per output row (``schemes.WEIGHT_SCALES``)."""
    from .fake_quant import WeightQuant

    return WeightQuant("int", 8, None)


def _set(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def quantizable_linears(model: nn.Module, plan: Any) -> list[str]:
    """The linears convert quantizes under ``plan`` (those whose input the group size divides, or int8 ones)."""
    from .prepare import _group_ok

    return [n for n, m in model.named_modules() if type(m) is nn.Linear and _group_ok(m.in_features, plan, n)]


def apply_variant(model: nn.Module, variant: str, plan: Any) -> list[str]:
    """Quantize ``model`` in place as ``variant`` says; returns the quantized linears.

    ``float`` (nothing), ``all`` (every linear and the embeddings as the plan says, its int8 modules included),
    ``only=A+B`` (only linears whose name contains A or B), ``int8=A+B`` (all, with those linears' weights at int8
    per output channel instead, activations as the scheme says)."""
    from .fake_quant import weight_ref
    from .prepare import embedding_spec, plan_specs

    if variant == "float":
        return []
    kind, _, arg = variant.partition("=")
    if kind not in ("all", "only", "int8") or (kind != "all" and not arg):
        raise EdgeftError(f"unknown variant {variant!r}: float, all, only=A+B, int8=A+B")
    names = arg.split("+") if arg else []
    act, wspec = plan_specs(plan)
    done = []
    for name in quantizable_linears(model, plan):
        m = model.get_submodule(name)
        if kind == "only" and not any(n in name for n in names):
            continue
        upgrade = (kind == "int8" and any(n in name for n in names)) or plan.is_int8(name)
        q = Quantized(weight_ref(m.weight.detach(), int8_spec() if upgrade else wspec), m.bias, act)
        _set(model, name, q)
        done.append(name)
    emb = embedding_spec(plan)
    if emb is not None and kind != "only":
        e = model.get_input_embeddings()
        e.weight = nn.Parameter(weight_ref(e.weight.detach(), emb), requires_grad=False)
    return done


def untie_head(model: nn.Module) -> None:
    """Give a tied LM head its own weight (convert does the same when the head or the embedding is quantized)."""
    head = model.get_output_embeddings()
    if head is not None and head.weight is model.get_input_embeddings().weight:
        head.weight = nn.Parameter(head.weight.detach().clone(), requires_grad=False)


@torch.no_grad()
def _loss(model: nn.Module, batches: list[dict[str, torch.Tensor]]) -> float:
    """Token-weighted mean cross-entropy of the labelled positions over ``batches``."""
    total, count = 0.0, 0
    for b in batches:
        logits = model(input_ids=b["input_ids"], attention_mask=b.get("attention_mask")).logits.float()
        labels = b["labels"][:, 1:]
        n = int((labels != -100).sum())
        if n == 0:
            continue
        loss = F.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100, reduction="sum"
        )
        total, count = total + float(loss), count + n
    if count == 0:
        raise EdgeftError("calibration: the batches hold no labelled token")
    return total / count


class _Replay:
    """The float model's hidden states entering each decoder layer (and the final norm), captured once per batch, so
    that one linear's loss rise runs only the layers from its own onward, and the head only on the labelled
    positions: the same loss as a whole forward, at about half the layers' cost and a fraction of the head's.

    :meth:`build` returns None where the model is not a decoder stack of ``layers`` + ``norm`` + output embedding
    (the caller then runs whole forwards)."""

    def __init__(self, model: nn.Module, stack: nn.Module, batches: list[dict[str, torch.Tensor]]) -> None:
        self.model, self.layers, self.norm = model, stack.layers, stack.norm
        self.softcap = getattr(model.config, "final_logit_softcapping", None)
        self.calls: list[list[tuple[tuple, dict]]] = []  # per batch, per layer: its (args, kwargs); then norm's input
        self.targets: list[tuple[torch.Tensor, torch.Tensor]] = []  # per batch: (positions mask, labels there)
        for b in batches:
            seen: list[tuple[tuple, dict]] = []

            def keep(_m: nn.Module, args: tuple, kwargs: dict) -> None:
                seen.append((args, dict(kwargs)))

            hooks = [m.register_forward_pre_hook(keep, with_kwargs=True) for m in (*self.layers, self.norm)]
            try:
                model(input_ids=b["input_ids"], attention_mask=b.get("attention_mask"), use_cache=False)
            finally:
                for h in hooks:
                    h.remove()
            if len(seen) != len(self.layers) + 1:
                raise _NoReplay
            labels = b["labels"][:, 1:]
            mask = labels != -100
            self.calls.append(seen)
            self.targets.append((mask, labels[mask]))

    @classmethod
    def build(cls, model: nn.Module, batches: list[dict[str, torch.Tensor]]) -> "_Replay | None":
        from edgeft.kernels.patch import decoder_stack

        try:
            stack = decoder_stack(model)
        except Exception:  # noqa: BLE001 - not a stack we know: whole forwards instead
            return None
        if not all(hasattr(stack, a) for a in ("layers", "norm")) or model.get_output_embeddings() is None:
            return None
        try:
            return cls(model, stack, batches)
        except _NoReplay:
            return None

    def start(self, name: str) -> int:
        """The index of the first layer a change to ``name`` affects (the number of layers: only the head)."""
        for i, layer in enumerate(self.layers):
            if any(m is layer for _, m in self._parents(name)):
                return i
        return len(self.layers)

    def _parents(self, name: str) -> Iterable[tuple[str, nn.Module]]:
        parts = name.split(".")
        for k in range(1, len(parts)):
            yield ".".join(parts[:k]), self.model.get_submodule(".".join(parts[:k]))

    def loss(self, start: int) -> float:
        """Token-weighted mean cross-entropy of the labelled positions, layers ``start`` onward run again."""
        total, count = 0.0, 0
        for calls, (mask, labels) in zip(self.calls, self.targets):
            args, kwargs = calls[start]
            h = args[0] if args else kwargs["hidden_states"]
            for i in range(start, len(self.layers)):
                a, kw = calls[i]
                kw = {k: v for k, v in kw.items() if k != "hidden_states"}
                out = self.layers[i](h, *a[1:], **kw)
                h = out[0] if isinstance(out, tuple) else out
            h = self.norm(h)[:, :-1][mask]  # the positions whose next token is labelled
            logits = self.model.get_output_embeddings()(h).float()  # looked up: the head may be the one swapped
            if self.softcap:
                logits = torch.tanh(logits / self.softcap) * self.softcap
            total += float(F.cross_entropy(logits, labels, reduction="sum"))
            count += int(labels.numel())
        if count == 0:
            raise EdgeftError("calibration: the batches hold no labelled token")
        return total / count


class _NoReplay(Exception):
    """The decoder stack did not call its layers and norm once each per forward."""


@torch.no_grad()
def embedding_sensitivity(
    model: nn.Module, batches: list[dict[str, torch.Tensor]], plan: Any, treatments: dict[str, str], float_loss: float
) -> dict[str, float]:
    """Per embedding format (``treatments``: format -> the plan's embedding treatment, e.g. ``int4`` ->
    ``int4-per-group``): the task loss on ``batches`` with the input embedding on that grid (the one convert writes)
    and everything else float, minus ``float_loss``. ``model``'s head must not share the embedding's weight
    (:func:`untie_head`): the head is measured with the linears. ``model`` is left as it was."""
    from dataclasses import replace

    from .fake_quant import weight_ref
    from .prepare import embedding_spec

    emb = model.get_input_embeddings()
    w0 = emb.weight.detach().clone()
    out: dict[str, float] = {}
    try:
        for fmt, treatment in treatments.items():
            spec = embedding_spec(replace(plan, embedding=treatment))
            emb.weight.copy_(weight_ref(w0, spec).to(w0.dtype))
            out[fmt] = _loss(model, batches) - float_loss
    finally:
        emb.weight.copy_(w0)
    return out


@torch.no_grad()
def linear_sensitivity(
    model: nn.Module,
    batches: list[dict[str, torch.Tensor]],
    plan: Any,
    group_sizes: Iterable[int | None],
    names: list[str] | None = None,
    fast: bool = True,
) -> dict[str, Any]:
    """Per linear and group size: the task loss on ``batches`` with that linear alone on the plan's int4 grid (the
    scheme's activation quantization too) minus the float model's loss.

    ``fast`` (default): the float hidden states entering each layer are captured once and each linear's loss runs
    only the layers from its own onward and the head on the labelled positions (:class:`_Replay`; the same losses
    as whole forwards up to float rounding, tests/qat/test_sensitivity_replay.py); False runs whole forwards.

    ``model`` is float (it is left as it was); ``plan`` gives the grid (its ``int8_modules`` are ignored: each
    linear is measured at int4). Returns ``{"float_loss", "tokens", "sensitivity": {group_size: {linear: rise}}}``.
    """
    from dataclasses import replace

    from .fake_quant import weight_ref
    from .prepare import plan_specs

    model.eval()
    replay = _Replay.build(model, batches) if fast else None
    n_layers = len(replay.layers) if replay is not None else 0
    base = replay.loss(n_layers) if replay is not None else _loss(model, batches)
    tokens = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)
    out: dict[Any, dict[str, float]] = {}
    for gs in group_sizes:
        p = replace(plan, group_size=gs, int8_modules=())
        act, wspec = plan_specs(p)
        todo = names if names is not None else quantizable_linears(model, p)
        rises = {}
        for name in todo:
            m = model.get_submodule(name)
            if gs and m.in_features % gs:
                continue  # stays float under this group size (convert skips it)
            _set(model, name, Quantized(weight_ref(m.weight.detach(), wspec), m.bias, act))
            try:
                rises[name] = (replay.loss(replay.start(name)) if replay is not None else _loss(model, batches)) - base
            finally:
                _set(model, name, m)
        out[gs] = rises
    return {"float_loss": base, "tokens": tokens, "sensitivity": out}
