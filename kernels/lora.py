"""Fast LoRA: autograd Functions for the attention projections (QKV together, O) and the whole MLP.

- The same values and gradients as PEFT's ``lora.Linear`` (within the kernels' tolerances): the LoRA term enters
  the base GEMM as its ``addmm`` input, Q/K/V (and gate/up) share one ``x @ A^T`` matmul, the backward is derived by
  hand and saves nothing tokens-sized but the inputs; the MLP fuses its activation and runs its backward in place.
- Eligibility (else the module is called as is: DoRA, several active adapters ...): ``projection_of`` reads a
  module's ``edgeft_projection()`` hook, a plain ``nn.Linear``, a torchao ``FakeQuantizedLinear`` without activation
  fake-quant, or a PEFT ``lora.Linear`` with one active vanilla adapter (:func:`is_lora_linear`, which never imports
  peft).
- QAT inside the Functions: ``Projection.act_quant`` fake-quantizes each shared input once (straight-through);
  ``Projection.merged`` runs on fq(W + s·B·A), giving A and B their straight-through gradients from rank-r
  products, never an (out, in) weight gradient. ``lora_dropout > 0`` adds the dropped input's noise term only.

The derivations: docs/kernels.md.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from ._common import cached_cast, mm_fp32_out, param_state, use_triton
from .fake_quant import fake_quant_act
from .geglu import geglu_backward, geglu_forward, geglu_reference
from .learned_scale import LearnedWeightFQ
from .swiglu import swiglu_backward, swiglu_forward, swiglu_reference


@dataclass
class Projection:
    """What a linear layer computes: ``x W^T + b + scale * dropout(x) A^T B^T`` (A, B optional)."""

    weight: torch.Tensor
    bias: torch.Tensor | None = None
    lora_A: torch.Tensor | None = None  # (r, in)
    lora_B: torch.Tensor | None = None  # (out, r)
    scale: float = 1.0
    dropout: nn.Module | None = None  # active dropout with p > 0 (training), else None
    merged: bool = False  # the layer's weight is fq(W + s·B·A): the adapter only receives gradients
    act_quant: Any = None  # an ActQuant spec (kernels/fake_quant.py): fake-quantize the input first
    # a WeightFQ (kernels/fake_quant.py): ``weight`` is the raw W and the Functions compute fq(W) (merged:
    # fq(W + s·B·A)) in the forward and again in the backward, so no fake-quantized copy is saved between them.
    # None: ``weight`` is used as it is (for ``merged``, it already holds the merged fake-quantized weight).
    weight_fq: Any = None


def _effective_weight(
    W: torch.Tensor, fq: Any, merged: bool, A: torch.Tensor | None, B: torch.Tensor | None, s: float, dt: torch.dtype
) -> torch.Tensor:
    """The weight a projection multiplies by, in the activation dtype (see ``Projection.weight_fq``)."""
    if fq is None:
        return _cast(W, dt)
    return _cast(fq(W, (A, B, s) if merged and A is not None else None), dt)


def _base_weight(layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    if type(layer) is nn.Linear:
        return layer.weight, layer.bias
    # torchao QAT (FakeQuantizedLinear): weight fake-quant only; the fake-quantized weight enters the kernel.
    if isinstance(layer, nn.Linear) and hasattr(layer, "weight_fake_quantizer"):
        if getattr(layer, "activation_fake_quantizer", None) is not None:
            return None
        fq = layer.weight_fake_quantizer
        return (fq(layer.weight) if fq is not None else layer.weight), layer.bias
    return None


def is_lora_linear(m: nn.Module) -> bool:
    """Whether ``m`` is PEFT's LoRA ``Linear`` (or a subclass of it). No module can be one before peft is imported, so
    this never imports peft (kernels/ has no dependency on it)."""
    lora = sys.modules.get("peft.tuners.lora")
    return lora is not None and isinstance(m, lora.Linear)


def projection_of(module: nn.Module) -> Projection | None:
    """The Projection a module computes, or None when the fast path cannot represent it exactly."""
    hook = getattr(module, "edgeft_projection", None)
    if hook is not None:
        return hook()
    base = _base_weight(module)
    if base is not None:
        return Projection(*base)
    if not is_lora_linear(module) or type(module).__name__ != "Linear":
        return None
    base = _base_weight(module.base_layer)
    if base is None:
        return None
    if module.disable_adapters or module.merged:
        return Projection(*base)  # adapter off, or already merged into the base weight
    active = [a for a in module.active_adapters if a in module.lora_A]
    if not active:
        return Projection(*base)
    if len(active) > 1:
        return None
    name = active[0]
    if name in getattr(module, "lora_variant", {}) or getattr(module, "use_dora", {}).get(name, False):
        return None
    lora_A, lora_B = module.lora_A[name], module.lora_B[name]
    if lora_A.bias is not None or lora_B.bias is not None or type(lora_A) is not nn.Linear:
        return None
    drop = module.lora_dropout[name]
    if isinstance(drop, nn.Identity) or (isinstance(drop, nn.Dropout) and (drop.p == 0 or not drop.training)):
        drop = None
    elif not isinstance(drop, nn.Dropout):
        return None
    return Projection(base[0], base[1], lora_A.weight, lora_B.weight, float(module.scaling[name]), drop)


# --- multi-projection LoRA linear (Q/K/V together, O, fused qkv / gate_up) ------------------------------------


def _cast(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    return t if t is None or t.dtype == dtype else t.to(dtype)


def _cat_A(As: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """The adapters' A matrices stacked (sum r, in) in the activation dtype, cached until one of them changes."""
    if len(As) == 1:
        return cached_cast(As[0], dtype)
    key = (tuple(id(a) for a in As), dtype)
    state = tuple(param_state(a) for a in As)
    cache = As[0].__dict__.setdefault("_edgeft_cats", {})
    hit = cache.get(key)
    if hit is not None and hit[0] == state:
        return hit[1]
    with torch.no_grad():
        out = torch.cat([a.to(dtype) for a in As], 0)
    cache[key] = (state, out)
    return out


class LoRALinearFunction(torch.autograd.Function):
    """y_i = x W_i^T + b_i + s_i * x_l A_i^T B_i^T for i in 1..n, sharing x (x_l = x, or dropout(x) if given).

    A ``merged`` projection's W_i already holds fq(W + s_i B_i A_i): its adapter term is s_i (x_l - x) A_i^T B_i^T
    (zero without dropout) and its dX gets no adapter term, while A_i and B_i get the same rank-r gradients.
    ``flat`` is (W, b, A, B) per projection, then the ``log_scale`` of each projection whose ``fqs`` entry is a
    :class:`~edgeft.kernels.learned_scale.LearnedWeightFQ`, in order: those get the gradient of their scales.
    """

    @staticmethod
    def forward(ctx, x, x_lora, scales, merged, fqs, act_in, *flat):
        # act_in = (spec, save_raw): fake-quantize x here (straight-through: dX passes unchanged); save_raw keeps
        # the raw x (held by its producer anyway) and quantizes it again in the backward
        ctx.requant = None
        x_raw = x
        if act_in is not None:
            x = fake_quant_act(x, act_in[0])
            if act_in[1]:
                ctx.requant = act_in[0]
        dt = x.dtype
        n = len(scales)
        flat = flat[: 4 * n]  # the learned scales' log_scale follow: read through their fqs entries
        Ws, bs, As, Bs = flat[0::4], flat[1::4], flat[2::4], flat[3::4]
        xl = x if x_lora is None else x_lora
        lora = [i for i in range(n) if As[i] is not None]
        xa = xa0 = None
        if lora:
            a_cat = _cat_A([As[i] for i in lora], dt)
            xa = xl @ a_cat.t()  # (M, sum r): one skinny GEMM for every adapter that shares x
            if x_lora is not None and any(merged[i] for i in lora):
                xa0 = x @ a_cat.t()  # merged adapters under dropout: s (drop(x) - x) A^T B^T
        outs, off = [], 0
        saved = list(flat)
        w_dtypes = tuple(w.dtype for w in Ws)
        for i in range(n):
            W = _effective_weight(Ws[i], fqs[i], merged[i], As[i], Bs[i], scales[i], dt)
            if fqs[i] is not None and fqs[i].save:  # free to keep (see WeightFQ.save): no rebuild in the backward
                saved[4 * i] = W
                fqs = fqs[:i] + (None,) + fqs[i + 1 :]
            low = None
            if As[i] is not None:
                r = As[i].shape[0]
                if not merged[i]:
                    low = xa[:, off : off + r] @ cached_cast(Bs[i], dt, scales[i]).t()
                elif xa0 is not None:
                    low = (xa[:, off : off + r] - xa0[:, off : off + r]) @ cached_cast(Bs[i], dt, scales[i]).t()
                off += r
            if low is not None:
                y = torch.addmm(low, x, W.t())  # LoRA term added in the GEMM epilogue
                if bs[i] is not None:
                    y += _cast(bs[i], dt)
            elif bs[i] is not None:
                y = torch.addmm(_cast(bs[i], dt), x, W.t())
            else:
                y = x @ W.t()
            outs.append(y)
        ctx.scales, ctx.merged, ctx.fqs, ctx.w_dtypes = scales, merged, fqs, w_dtypes
        ctx.save_for_backward(x if ctx.requant is None else x_raw, x_lora, xa, *saved)
        return tuple(outs)

    @staticmethod
    def backward(ctx, *dys):
        x, x_lora, xa, *flat = ctx.saved_tensors
        scales, merged, fqs = ctx.scales, ctx.merged, ctx.fqs
        n = len(scales)
        dt = x.dtype
        Ws, bs, As, Bs = flat[0::4], flat[1::4], flat[2::4], flat[3::4]
        needs = ctx.needs_input_grad
        need_dx = needs[0]
        learned = [i for i in range(n) if isinstance(fqs[i], LearnedWeightFQ)]
        log_needs = {i: needs[6 + len(flat) + j] for j, i in enumerate(learned)}
        log_grads: dict[int, torch.Tensor] = {}
        if ctx.requant is not None and (
            any(needs[6 + k] for k in range(len(flat)) if k % 4 in (0, 2)) or any(log_needs.values())
        ):
            x = fake_quant_act(x, ctx.requant)  # dW and dA read the fake-quantized input (straight-through)
        xl = x if x_lora is None else x_lora
        grads: list[torch.Tensor | None] = [None] * len(flat)
        dx = None
        d_parts, a_parts, a_idx = [], [], []
        off = 0
        for i in range(n):
            dy = dys[i]
            r = As[i].shape[0] if As[i] is not None else 0
            if dy is None:
                off += r
                continue
            dy = dy.reshape(-1, dy.shape[-1])
            W = dwq = None
            if log_needs.get(i):  # learned scales: their gradient reduces the (out, in) gradient of fq(W)
                dwq = mm_fp32_out(dy.t(), x)
                lora_i = (As[i], Bs[i], scales[i]) if merged[i] and As[i] is not None else None
                if need_dx:  # fq(W) for dX from the same pass over W
                    W, log_grads[i] = fqs[i].log_scale_grad(Ws[i], lora_i, dwq, with_weight=True)
                    W = _cast(W, dt)
                else:
                    log_grads[i] = fqs[i].log_scale_grad(Ws[i], lora_i, dwq)
            if need_dx:  # a WeightFQ recomputes the fake-quantized weight here rather than having saved it
                if W is None:
                    W = _effective_weight(Ws[i], fqs[i], merged[i], As[i], Bs[i], scales[i], dt)
                dx = dy @ W if dx is None else dx.addmm_(dy, W)
                del W
            if needs[6 + 4 * i]:  # straight-through: dW = dY^T x (x already fake-quantized when act_quant)
                wdt = ctx.w_dtypes[i]
                if dwq is not None:
                    grads[4 * i] = dwq.to(wdt)
                else:
                    grads[4 * i] = dy.t() @ x if wdt == dt else mm_fp32_out(dy.t(), x).to(wdt)
            del dwq
            if bs[i] is not None and needs[6 + 4 * i + 1]:
                grads[4 * i + 1] = dy.sum(0, dtype=torch.float32).to(bs[i].dtype)
            if As[i] is not None:
                s = scales[i]
                d_i = dy @ cached_cast(Bs[i], dt, s)  # (M, r) = s * dY B
                d_parts.append(d_i)
                a_parts.append(As[i])
                a_idx.append(i)
                if needs[6 + 4 * i + 3]:
                    grads[4 * i + 3] = (mm_fp32_out(dy.t(), xa[:, off : off + r]) * s).to(Bs[i].dtype)
            off += r
        dx_lora = None
        if d_parts:
            d_cat = torch.cat(d_parts, 1) if len(d_parts) > 1 else d_parts[0]
            a_cat = _cat_A(a_parts, dt)
            plain = [k for k, i in enumerate(a_idx) if not merged[i]]
            folded = [k for k, i in enumerate(a_idx) if merged[i]]
            if x_lora is None:
                # merged adapters add nothing here: their dX term is inside dY fq(W_m) (straight-through)
                if need_dx and plain:
                    dp, ap = _subset(d_parts, a_parts, plain, d_cat, a_cat, dt)
                    dx = dp @ ap if dx is None else dx.addmm_(dp, ap)
            else:
                if needs[1]:
                    dx_lora = d_cat @ a_cat
                if need_dx and folded:  # the -s x A^T B^T term of merged adapters under dropout
                    dm, am = _subset(d_parts, a_parts, folded, d_cat, a_cat, dt)
                    dx = -(dm @ am) if dx is None else dx.addmm_(dm, am, alpha=-1)
            da = mm_fp32_out(d_cat.t(), xl)  # (sum r, in)
            o = 0
            for i in a_idx:
                r = As[i].shape[0]
                if needs[6 + 4 * i + 2]:
                    grads[4 * i + 2] = da[o : o + r].to(As[i].dtype)
                o += r
        if need_dx and dx is None:
            dx = torch.zeros_like(x)
        return (dx, dx_lora, None, None, None, None, *grads, *(log_grads.get(i) for i in learned))


def _subset(d_parts, a_parts, idx, d_cat, a_cat, dt):
    """(dY s B, A) of the adapters at positions ``idx``: the concatenations themselves when that is all of them."""
    if len(idx) == len(d_parts):
        return d_cat, a_cat
    d = torch.cat([d_parts[k] for k in idx], 1) if len(idx) > 1 else d_parts[idx[0]]
    return d, _cat_A([a_parts[k] for k in idx], dt)


def lora_linear(x: torch.Tensor, projections: list[Projection], input_kept: bool = False) -> tuple[torch.Tensor, ...]:
    """Apply several projections that share the input x (..., in); returns one output (..., out_i) per projection.

    ``input_kept``: another op keeps x for its own backward (the attention keeps its output, o_proj's input). With
    input fake quantization the Function then saves x itself rather than a fake-quantized copy, and re-quantizes
    it in the backward: one pass instead of a tokens x hidden tensor held per layer.
    """
    quants = {p.act_quant for p in projections}
    if len(quants) > 1:  # different input fake quantizers: one call each
        return tuple(lora_linear(x, [p], input_kept)[0] for p in projections)
    act_quant = next(iter(quants))
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    dropout = next((p.dropout for p in projections if p.dropout is not None), None)
    if dropout is not None and any(p.dropout is not dropout for p in projections if p.lora_A is not None):
        # different dropout modules: apply them one projection at a time
        return tuple(lora_linear(x, [p], input_kept)[0] for p in projections)
    # the input fake quant goes inside the Function when it runs one (no separate autograd node, and o_proj can
    # save the raw input); otherwise (dropout, plain F.linear) it is its own straight-through op
    function = any(p.lora_A is not None or p.weight_fq is not None for p in projections)
    act_in = (act_quant, input_kept) if act_quant is not None and dropout is None and function else None
    if act_quant is not None and act_in is None:
        from .fake_quant import act_fake_quant

        x2 = act_fake_quant(x2, act_quant)  # once for every projection of x; straight-through backward
    x_lora = dropout(x2) if dropout is not None else None
    flat: list[torch.Tensor | None] = []
    for p in projections:
        flat += [p.weight, p.bias, p.lora_A, p.lora_B]
    scales = tuple(p.scale for p in projections)
    merged = tuple(p.merged for p in projections)
    fqs = tuple(p.weight_fq for p in projections)
    flat += [fq.log_scale for fq in fqs if isinstance(fq, LearnedWeightFQ)]  # their gradient comes back too
    if not function:
        outs = tuple(F.linear(x2, _cast(p.weight, x.dtype), _cast(p.bias, x.dtype)) for p in projections)
    else:
        outs = LoRALinearFunction.apply(x2, x_lora, scales, merged, fqs, act_in, *flat)
    if x.dim() == 2:
        return tuple(outs)  # not views: callers (RoPE) may rotate them in place
    return tuple(o.view(*lead, o.shape[-1]) for o in outs)


def lora_linear_reference(x: torch.Tensor, p: Projection) -> torch.Tensor:
    """PEFT's arithmetic: base(x) + lora_B(lora_A(x)) * scale, adapter math in the adapter's dtype."""
    y = F.linear(x, p.weight, p.bias)
    if p.lora_A is not None:
        xl = x.to(p.lora_A.dtype)
        y = (y + F.linear(F.linear(xl, p.lora_A), p.lora_B) * p.scale).to(y.dtype)
    return y


# --- the whole MLP: gate/up (+ LoRA) -> activation -> down (+ LoRA) --------------------------------------------

ACTIVATIONS: dict[str, tuple[Callable, Callable, Callable]] = {
    # name -> (forward(g, u), backward(dh, g, u, in_place) -> (h, dg, du), reference(g, u))
    "silu": (swiglu_forward, swiglu_backward, swiglu_reference),
    "gelu": (
        lambda g, u: geglu_forward(g, u, approximate="none"),
        lambda dh, g, u, in_place: geglu_backward(dh, g, u, in_place, approximate="none"),
        lambda g, u: geglu_reference(g, u, "none"),
    ),
    "gelu_tanh": (
        lambda g, u: geglu_forward(g, u, approximate="tanh"),
        lambda dh, g, u, in_place: geglu_backward(dh, g, u, in_place, approximate="tanh"),
        lambda g, u: geglu_reference(g, u, "tanh"),
    ),
}

# transformers' activation names -> ours
HF_ACTIVATIONS = {
    "silu": "silu",
    "swish": "silu",
    "gelu": "gelu",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_new": "gelu_tanh",
    "gelu_fast": "gelu_tanh",
}


def _proj_fwd(x, W, xa, B, s):
    if xa is None:
        return x @ W.t()
    return torch.addmm(xa @ cached_cast(B, x.dtype, s).t(), x, W.t())


class LoRAMLPFunction(torch.autograd.Function):
    """down(act(gate(x)) * up(x)) with frozen base weights, optional LoRA on each of gate/up/down.

    ``merged`` (gate, up, down): that weight already holds fq(W + s·B·A), so its adapter adds no output and no dX
    term; ``act_quant``: h is fake-quantized (in place, straight-through) before down_proj.
    """

    @staticmethod
    def forward(ctx, x, act, sg, su, sd, merged, act_quant, fqs, Wg, Ag, Bg, Wu, Au, Bu, Wd, Ad, Bd):
        dt = x.dtype
        mg, mu, md = merged
        saved_w = (Wg, Wu, Wd)  # the raw weights: a WeightFQ recomputes fq(W) in the backward
        Wg = _effective_weight(Wg, fqs[0], mg, Ag, Bg, sg, dt)
        Wu = _effective_weight(Wu, fqs[1], mu, Au, Bu, su, dt)
        a_gu = [a for a in (Ag, Au) if a is not None]
        xa = x @ _cat_A(a_gu, dt).t() if a_gu else None
        rg = Ag.shape[0] if Ag is not None else 0
        xa_g = xa[:, :rg] if Ag is not None and not mg else None
        xa_u = xa[:, rg:] if Au is not None and not mu else None
        G = _proj_fwd(x, Wg, xa_g, Bg, sg)
        U = _proj_fwd(x, Wu, xa_u, Bu, su)
        H = ACTIVATIONS[act][0](G, U)
        if act_quant is not None:
            fake_quant_act(H, act_quant, out=H)
        ha = H @ cached_cast(Ad, dt).t() if Ad is not None else None
        Wd = _effective_weight(Wd, fqs[2], md, Ad, Bd, sd, dt)
        out = _proj_fwd(H, Wd, None if md else ha, Bd, sd)
        keep = tuple(fq is None or fq.save for fq in fqs)  # save the weight used, or the raw one to rebuild from
        ctx.act, ctx.scales, ctx.rg, ctx.merged, ctx.act_quant = act, (sg, su, sd), rg, merged, act_quant
        ctx.fqs = tuple(None if k else fq for k, fq in zip(keep, fqs))
        Wg, Wu, Wd = (w if k else raw for w, raw, k in zip((Wg, Wu, Wd), saved_w, keep))
        ctx.save_for_backward(x, xa, G, U, ha, Wg, Ag, Bg, Wu, Au, Bu, Wd, Ad, Bd)
        return out

    @staticmethod
    def backward(ctx, dout):
        x, xa, G, U, ha, Wg, Ag, Bg, Wu, Au, Bu, Wd, Ad, Bd = ctx.saved_tensors
        sg, su, sd = ctx.scales
        mg, mu, md = ctx.merged
        dt = x.dtype
        needs = ctx.needs_input_grad
        dout = dout.reshape(-1, dout.shape[-1])
        g_Ag = g_Bg = g_Au = g_Bu = g_Ad = g_Bd = None
        fqs = ctx.fqs
        # down: dH = dout Wd + (dout sd Bd) Ad (the second term only for an unmerged adapter)
        dH = dout @ _effective_weight(Wd, fqs[2], md, Ad, Bd, sd, dt)
        dd = None
        if Ad is not None:
            dd = dout @ cached_cast(Bd, dt, sd)
            if not md:
                dH.addmm_(dd, cached_cast(Ad, dt))
            if needs[16]:
                g_Bd = (mm_fp32_out(dout.t(), ha) * sd).to(Bd.dtype)
        # activation backward in place: H -> dH's buffer, dG -> G's, dU -> U's (saved tensors are ours alone);
        # with act_quant the gradient w.r.t. fq(H) is the gradient w.r.t. H (straight-through)
        H, dG, dU = ACTIVATIONS[ctx.act][1](dH, G, U, True)
        if Ad is not None and needs[15]:
            if ctx.act_quant is not None:
                fake_quant_act(H, ctx.act_quant, out=H)
            g_Ad = mm_fp32_out(dd.t(), H).to(Ad.dtype)
        del H, dH
        dx = dG @ _effective_weight(Wg, fqs[0], mg, Ag, Bg, sg, dt)
        dx.addmm_(dU, _effective_weight(Wu, fqs[1], mu, Au, Bu, su, dt))
        parts, a_parts, plain = [], [], []
        if Ag is not None:
            parts.append(dG @ cached_cast(Bg, dt, sg))
            a_parts.append(Ag)
            if not mg:
                plain.append(len(parts) - 1)
            if needs[10]:
                g_Bg = (mm_fp32_out(dG.t(), xa[:, : ctx.rg]) * sg).to(Bg.dtype)
        if Au is not None:
            parts.append(dU @ cached_cast(Bu, dt, su))
            a_parts.append(Au)
            if not mu:
                plain.append(len(parts) - 1)
            if needs[13]:
                g_Bu = (mm_fp32_out(dU.t(), xa[:, ctx.rg :]) * su).to(Bu.dtype)
        if parts:
            d_cat = torch.cat(parts, 1) if len(parts) > 1 else parts[0]
            a_cat = _cat_A(a_parts, dt)
            if plain:
                dp, ap = _subset(parts, a_parts, plain, d_cat, a_cat, dt)
                dx.addmm_(dp, ap)
            da = mm_fp32_out(d_cat.t(), x)
            if Ag is not None:
                g_Ag = da[: ctx.rg].to(Ag.dtype)
            if Au is not None:
                g_Au = da[ctx.rg :].to(Au.dtype)
        return dx, None, None, None, None, None, None, None, None, g_Ag, g_Bg, None, g_Au, g_Bu, None, g_Ad, g_Bd


def _mlp_eligible(ps: list[Projection]) -> bool:
    # learned scales take the composed path: LoRALinearFunction returns their gradient, the fused MLP does not
    return (
        all(
            p.bias is None
            and p.dropout is None
            and not p.weight.requires_grad
            and not isinstance(p.weight_fq, LearnedWeightFQ)
            for p in ps
        )
        and ps[0].act_quant == ps[1].act_quant
    )


def lora_mlp(x: torch.Tensor, gate: Projection, up: Projection, down: Projection, act: str) -> torch.Tensor:
    """down(act(gate(x)) * up(x)); frozen base weights take the fused LoRA MLP, anything else the composed path."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    if use_triton(x2) and _mlp_eligible([gate, up, down]):
        if gate.act_quant is not None:
            from .fake_quant import act_fake_quant

            x2 = act_fake_quant(x2, gate.act_quant)
        out = LoRAMLPFunction.apply(
            x2,
            act,
            gate.scale,
            up.scale,
            down.scale,
            (gate.merged, up.merged, down.merged),
            down.act_quant,
            (gate.weight_fq, up.weight_fq, down.weight_fq),
            gate.weight,
            gate.lora_A,
            gate.lora_B,
            up.weight,
            up.lora_A,
            up.lora_B,
            down.weight,
            down.lora_A,
            down.lora_B,
        )
        return out.view(*lead, out.shape[-1])
    # Composed path (full fine-tuning, biases, dropout, or no Triton): fused activation, autograd around it.
    g, u = lora_linear(x2, [gate, up])
    h = glu(g, u, act)
    (out,) = lora_linear(h, [down])
    return out.view(*lead, out.shape[-1])


def glu(gate: torch.Tensor, up: torch.Tensor, act: str) -> torch.Tensor:
    """act(gate) * up with the fused kernel for ``act`` in ACTIVATIONS."""
    from .geglu import geglu
    from .swiglu import swiglu

    if act == "silu":
        return swiglu(gate, up)
    if act == "gelu":
        return geglu(gate, up, "none")
    if act == "gelu_tanh":
        return geglu(gate, up, "tanh")
    raise ValueError(f"unsupported activation {act!r}")
