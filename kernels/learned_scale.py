"""Learned int group scales (``weight_scale="learned"``, LSQ in log space): references and kernels.

References (plain torch): ``learned_scale`` (init_scale * exp(log_scale), exactly init_scale at 0, so the untrained
model is the PTQ model bit for bit), ``learned_weight_ref`` (fake quantization on given scales, torchao's
arithmetic, so convert's custom-scale quantization rounds the same integers), ``learned_log_scale_grad`` and the
autograd Function ``LearnedScaleFakeQuant`` (straight-through for the weight, LSQ for the log-scales).

Kernels: :class:`LearnedWeightFQ` (the quantizer the fused linear Functions of ``kernels/lora.py`` take) and
:class:`LearnedScaleFakeQuantFunction` (the LM-head loss's), each one pass over the weight: the forward equals
``learned_weight_ref`` bit for bit, the scale gradient equals the reference to fp32 rounding (another summation
order). :class:`ScaleBank` computes the scales of all of a model's quantizers together, once per optimizer step
(:class:`ScaleCache` is one quantizer's entry). Why by hand and the math: docs/qat.md.
"""

from __future__ import annotations

import functools

import torch

from ._common import HAS_TRITON, needs_long_indexing, next_pow2, param_state, use_triton, warps_for
from .fake_quant import WeightQuant, _eps, _kinds, _tile, _weight_geometry, int_weight_ref, merge_lora_weight

# --- PyTorch references (LSQ in log space; docs/qat.md) -------------------------------------------------------------


def learned_scale(
    init_scale: torch.Tensor, log_scale: torch.Tensor, spec: WeightQuant, dtype: torch.dtype
) -> torch.Tensor:
    """Group scales (rows, groups) of a learned scale, as fake quantization uses them and convert writes them:
    ``init_scale * exp(log_scale)`` in fp32, clamped at the grid's eps, in the scale dtype. At ``log_scale == 0``
    this is ``init_scale`` exactly (the untrained model is the PTQ model, bit for bit)."""
    s = init_scale.to(torch.float32) * torch.exp(log_scale.to(torch.float32))
    return s.clamp(min=_eps(spec.eps, dtype)).to(spec.scale_dtype or dtype)


def initial_scale(w: torch.Tensor, spec: WeightQuant) -> torch.Tensor:
    """The scales the spec's own rule picks for ``w`` (max|w|, or the clip search), fp32 (rows, groups): where
    learning starts."""
    _, _, scale = int_weight_ref(w.detach(), spec, return_codes=True)
    return scale.to(torch.float32)


_LSQ_BLOCK = 1 << 22  # elements per row block of the scale gradient (16 MiB per fp32 temporary)


def learned_weight_ref(w: torch.Tensor, scale: torch.Tensor, spec: WeightQuant) -> torch.Tensor:
    """q = clamp(round(w * (1 / s))), out = q * s on given group scales (rows, groups) in the scale dtype:
    torchao's arithmetic, so convert's custom-scale quantization rounds the same integers."""
    dt = w.dtype
    s = scale.unsqueeze(-1)
    g = w.detach().reshape(s.shape[0], s.shape[1], -1)
    q = torch.clamp(torch.round(g * (1.0 / s)), spec.qmin, spec.qmax)
    return (q.to(dt) * s).to(dt).reshape(w.shape)


def learned_log_scale_grad(w: torch.Tensor, scale: torch.Tensor, grad: torch.Tensor, spec: WeightQuant) -> torch.Tensor:
    """d loss / d log_scale (rows, groups, fp32) of :func:`learned_weight_ref` given d loss / d out (``grad``):
    sum over each group of grad * dout/ds, times s (the log-space chain rule), where dout/ds = q - w/s inside the
    grid and q (qmin or qmax) where the clamp saturates. Reduced in blocks of rows, so the fp32 temporaries stay
    small next to the weight (an LM head's would be several GiB)."""
    s32 = scale.to(torch.float32)
    d_log = torch.empty(s32.shape, dtype=torch.float32, device=w.device)
    rows = max(1, _LSQ_BLOCK // w.shape[1])
    for i in range(0, w.shape[0], rows):
        sb = s32[i : i + rows].unsqueeze(-1)
        v = w[i : i + rows].detach().to(torch.float32).reshape(sb.shape[0], sb.shape[1], -1) / sb
        r = torch.round(v)
        q = r.clamp(spec.qmin, spec.qmax)
        dq_ds = torch.where(r == q, q - v, q)
        g = grad[i : i + rows].to(torch.float32).reshape(v.shape)
        d_log[i : i + rows] = (g * dq_ds).sum(-1) * sb.squeeze(-1)
    return d_log


class LearnedScaleFakeQuant(torch.autograd.Function):
    """Symmetric int fake quantization on trained group scales (LSQ, Esser et al. 2020, in log space).

    Forward: :func:`learned_weight_ref` on s = :func:`learned_scale`. Backward: the weight gets the
    straight-through gradient (identity, as everywhere in edgeft); each group's log-scale gets
    :func:`learned_log_scale_grad`: a larger scale trades rounding error for clipping error, and the loss decides.
    Log space makes one learning rate mean the same relative step for every layer's scales. (The fused linear
    Functions, ``edgeft.kernels.lora``, compute the same two things from their own weight gradient.)
    """

    @staticmethod
    def forward(ctx, w, log_scale, init_scale, spec):
        scale = learned_scale(init_scale, log_scale.detach(), spec, w.dtype)
        ctx.save_for_backward(w, scale)
        ctx.spec = spec
        return learned_weight_ref(w, scale, spec)

    @staticmethod
    def backward(ctx, grad):
        w, scale = ctx.saved_tensors
        d_log = learned_log_scale_grad(w, scale, grad, ctx.spec) if ctx.needs_input_grad[1] else None
        return (grad if ctx.needs_input_grad[0] else None), d_log, None, None


def learned_fake_quant(
    w: torch.Tensor, log_scale: torch.Tensor, init_scale: torch.Tensor, spec: WeightQuant
) -> torch.Tensor:
    """fq(w) on the scales ``init_scale * exp(log_scale)``, differentiable in w and log_scale
    (:class:`LearnedScaleFakeQuant`)."""
    if spec.kind != "int":
        raise ValueError(f"learned scales are for integer grids, not {spec.kind!r}")
    return LearnedScaleFakeQuant.apply(w, log_scale, init_scale, spec)


# --- Triton kernels -------------------------------------------------------------------------------------------------

if HAS_TRITON:
    import triton
    import triton.language as tl

    from .fake_quant import _merge_lora, _on_grid, _rint, _tile_index

    @triton.jit
    def _learned_kernel(
        W,
        A,
        B,
        SCALES,
        OUT,
        GRAD,
        DLOG,
        n_rows,
        n_cols,
        n_groups,
        stride_w,
        lora_scale,
        R: tl.constexpr,
        GS: tl.constexpr,
        GSP: tl.constexpr,
        NG: tl.constexpr,
        BLOCK_R: tl.constexpr,
        QMIN: tl.constexpr,
        QMAX: tl.constexpr,
        D: tl.constexpr,
        S: tl.constexpr,
        P: tl.constexpr,
        BACKWARD: tl.constexpr,
        WRITE_FQ: tl.constexpr,
        LONG: tl.constexpr,
    ):
        """One tile = BLOCK_R rows x NG groups: merge, then fq(W) on the given scales (WRITE_FQ) and/or each group's
        d loss / d log_scale = s * sum(grad * dq/ds), dq/ds = q - w/s in the grid, q where it clamps (BACKWARD)."""
        rows, rmask, cols, cmask, mask = _tile_index(n_rows, n_cols, n_groups, GS, GSP, NG, BLOCK_R, LONG)
        w = tl.load(W + rows[:, None] * stride_w + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        if R > 0:
            w = _merge_lora(w, A, B, rows, cols, rmask, cmask, n_cols, lora_scale, R, D)
        g = tl.reshape(w, (BLOCK_R, NG, GSP))
        gidx = tl.program_id(1) * NG + tl.arange(0, NG)
        smask = rmask[:, None] & (gidx < n_groups)[None, :]
        sidx = rows[:, None] * n_groups + gidx[None, :]
        scale = tl.load(SCALES + sidx, mask=smask, other=1.0).to(tl.float32)
        if BACKWARD:
            v = tl.math.div_rn(g, scale[:, :, None])  # fp32 w / s, as the reference
            r = _rint(v)
            q = tl.clamp(r, QMIN, QMAX)
            dq_ds = tl.where(r == q, q - v, q)
            gr = tl.load(GRAD + rows[:, None] * n_cols + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            d = tl.sum(tl.reshape(gr, (BLOCK_R, NG, GSP)) * dq_ds, axis=2) * scale
            tl.store(DLOG + sidx, d, mask=smask)
        if WRITE_FQ:
            _, dq = _on_grid(g, scale, QMIN, QMAX, D, S, P)
            tl.store(
                OUT + rows[:, None] * n_cols + cols[None, :],
                tl.reshape(dq, (BLOCK_R, NG * GSP)).to(OUT.dtype.element_ty),
                mask=mask,
            )


@functools.lru_cache(maxsize=4096)
def _plan(
    n_rows: int,
    n_cols: int,
    dtype: torch.dtype,
    spec: WeightQuant,
    rank: int,
    backward: bool,
    write_fq: bool,
    cuda: bool,
    long: bool,
    tile: int,
):
    gs, gsp, ng, block_r = _weight_geometry(n_cols, spec.group_size, tile)
    block_r = min(block_r, next_pow2(n_rows))
    d, s, p = _kinds(dtype, spec.scale_dtype)
    kw = dict(
        R=rank,
        GS=gs,
        GSP=gsp,
        NG=ng,
        BLOCK_R=block_r,
        QMIN=spec.qmin,
        QMAX=spec.qmax,
        D=d,
        S=s,
        P=p,
        BACKWARD=backward,
        WRITE_FQ=write_fq,
        LONG=long,
        num_warps=warps_for(block_r * ng * gsp),
    )
    if cuda:
        kw["enable_fp_fusion"] = False  # no multiply-add contraction: the merge rounds as merge_lora_weight
    return (triton.cdiv(n_rows, block_r), triton.cdiv(n_cols // gs, ng)), kw


def _launch(
    w: torch.Tensor,
    scale: torch.Tensor,
    spec: WeightQuant,
    lora: tuple | None,
    grad: torch.Tensor | None,
    write_fq: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(fq(W) if ``write_fq``, d log_scale if ``grad`` is given): one pass over W (and ``grad``)."""
    n_rows, n_cols = w.shape
    w = w.detach()
    if w.stride(1) != 1:
        w = w.contiguous()
    scale = scale.contiguous()
    if lora is not None:
        a, b, lora_scale = lora
        a, b = a.detach().contiguous(), b.detach().contiguous()
        rank = a.shape[0]
    else:
        a = b = w
        rank, lora_scale = 0, 1.0
    backward = grad is not None
    d_log = out = None
    if backward:
        grad = grad.contiguous()
        d_log = torch.empty(scale.shape, dtype=torch.float32, device=w.device)
    if write_fq:
        out = torch.empty((n_rows, n_cols), dtype=w.dtype, device=w.device)
    grid, kw = _plan(
        n_rows,
        n_cols,
        w.dtype,
        spec,
        rank,
        backward,
        write_fq,
        w.is_cuda,
        needs_long_indexing(w, grad) if backward else needs_long_indexing(w),
        _tile(w),
    )
    _learned_kernel[grid](
        w,
        a,
        b,
        scale,
        w if out is None else out,
        grad if backward else w,
        scale if d_log is None else d_log,
        n_rows,
        n_cols,
        scale.shape[1],
        w.stride(0),
        float(lora_scale),
        **kw,
    )
    return out, d_log


def learned_fake_quant_weight(
    w: torch.Tensor,
    scale: torch.Tensor,
    spec: WeightQuant,
    lora: tuple[torch.Tensor, torch.Tensor, float] | None = None,
) -> torch.Tensor:
    """fq(W) or fq(W + s·B·A) on given group scales (rows, groups, in the scale dtype), without autograd:
    ``learned_weight_ref`` bit for bit."""
    if use_triton(w):
        return _launch(w, scale, spec, lora, None, True)[0]
    base = merge_lora_weight(w, *lora) if lora is not None else w.detach()
    return learned_weight_ref(base, scale, spec)


def learned_scale_grad(
    w: torch.Tensor,
    scale: torch.Tensor,
    grad: torch.Tensor,
    spec: WeightQuant,
    lora: tuple[torch.Tensor, torch.Tensor, float] | None = None,
) -> torch.Tensor:
    """d loss / d log_scale (rows, groups, fp32) from d loss / d fq(W) (``grad``, (out, in)): the reference's
    ``learned_log_scale_grad`` of W, or of W + s·B·A, on one pass."""
    if use_triton(w):
        return _launch(w, scale, spec, lora, grad, False)[1]
    base = merge_lora_weight(w, *lora) if lora is not None else w.detach()
    return learned_log_scale_grad(base, scale, grad, spec)


def learned_fake_quant_and_grad(
    w: torch.Tensor,
    scale: torch.Tensor,
    grad: torch.Tensor,
    spec: WeightQuant,
    lora: tuple[torch.Tensor, torch.Tensor, float] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(fq(W), d loss / d log_scale) together, on one pass: what a linear's backward needs when it forms dX from
    the fake-quantized weight and already has the weight gradient."""
    if use_triton(w):
        return _launch(w, scale, spec, lora, grad, True)
    base = merge_lora_weight(w, *lora) if lora is not None else w.detach()
    return learned_weight_ref(base, scale, spec), learned_log_scale_grad(base, scale, grad, spec)


class ScaleBank:
    """The learned scales of every quantizer of one model, refreshed together.

    A step uses each quantizer's scales in the forward, again in the checkpointed recomputation and in the
    backward; each computation is four small kernel launches (exp, multiply, clamp, cast), and a model has one
    quantizer per linear (197 on Qwen3-0.6B), which a host-bound step pays for in launches. The bank keeps one
    :class:`ScaleCache` entry per quantizer; when any entry is asked for while stale, every stale entry is
    recomputed at once with PyTorch's multi-tensor ``torch._foreach_*`` ops, one set of launches per
    (device, eps, scale dtype) group, so a step refreshes once. The values are :func:`learned_scale`'s bit for bit
    (the same fp32 ops per element), which is what convert writes. An entry whose tensors have no storage at the
    time (FSDP2 frees each layer's gathered parameters after use) waits for its own request."""

    __slots__ = ("entries", "refreshes")

    def __init__(self) -> None:
        self.entries: list[ScaleCache] = []
        self.refreshes = 0  # foreach passes so far (tests and benchmarks read it)

    def entry(self) -> ScaleCache:
        """A new entry of this bank (one quantizer's scales)."""
        return ScaleCache(self)

    def refresh(self) -> None:
        """Recompute every stale entry (its tensors' state moved since it was computed) in one foreach pass."""
        groups: dict[tuple, list[tuple[ScaleCache, tuple]]] = {}
        for e in self.entries:
            if e.src is None:
                continue
            key = e.state()
            # storage freed (FSDP2 frees a layer's gathered parameters between its uses): nothing to read; the
            # entry's own request, with its tensors gathered again, computes it
            if key != e.key and _readable(e.src[1], key[0][2]) and _readable(e.src[0], key[1]):
                init, log, spec, dtype = e.src
                groups.setdefault((log.device, _eps(spec.eps, dtype), spec.scale_dtype or dtype), []).append((e, key))
        if not groups:
            return
        with torch.no_grad():
            for (_, eps, out_dtype), items in groups.items():
                values = _foreach_learned_scales(
                    [e.src[0] for e, _ in items], [e.src[1] for e, _ in items], eps, out_dtype
                )
                for (e, key), v in zip(items, values):
                    e.key, e.value = key, v
        self.refreshes += 1


def _readable(t: torch.Tensor, data_ptr: int) -> bool:
    return data_ptr != 0 or t.numel() == 0


def _foreach_learned_scales(
    inits: list[torch.Tensor], logs: list[torch.Tensor], eps: float, dtype: torch.dtype
) -> list[torch.Tensor]:
    """:func:`learned_scale` of many (init_scale, log_scale) pairs sharing eps and scale dtype, a few multi-tensor
    launches in all: the same fp32 exp, multiply (commutative, so exp * init == init * exp), clamp at eps and
    cast per element, hence the same bits."""
    f32 = torch.float32
    s = torch._foreach_exp([t.detach().to(f32) for t in logs])
    torch._foreach_mul_(s, [t.to(f32) for t in inits])
    torch._foreach_clamp_min_(s, eps)
    if dtype == f32:
        return s
    out = [torch.empty_like(t, dtype=dtype) for t in s]
    torch._foreach_copy_(out, s)
    return out


class ScaleCache:
    """One learned quantizer's scales: an entry of a :class:`ScaleBank` (its own bank of one if none is given),
    computed once per state of its ``log_scale``. Keyed on :func:`~edgeft.kernels._common.param_state` like the
    other caches (the version counter alone misses fused AdamW's update), on ``init_scale``'s storage and on the
    dtype asked for, so a moved or cast model is never served old values."""

    __slots__ = ("bank", "src", "key", "value")

    def __init__(self, bank: ScaleBank | None = None) -> None:
        self.bank = bank if bank is not None else ScaleBank()
        self.bank.entries.append(self)
        self.src: tuple | None = None  # (init_scale, log_scale, spec, dtype) as last asked for
        self.key: tuple | None = None
        self.value: torch.Tensor | None = None

    def track(self, init_scale: torch.Tensor, log_scale: torch.Tensor, spec: WeightQuant, dtype: torch.dtype) -> None:
        """Name the tensors and dtype before the first use, so the bank's first refresh computes this entry too."""
        self.src = (init_scale, log_scale, spec, dtype)

    def state(self) -> tuple:
        init, log, _, dtype = self.src
        return (param_state(log), init.data_ptr(), dtype)

    def get(
        self, init_scale: torch.Tensor, log_scale: torch.Tensor, spec: WeightQuant, dtype: torch.dtype
    ) -> torch.Tensor:
        """``learned_scale(init_scale, log_scale, spec, dtype)``, from the bank (refreshed first if stale)."""
        self.src = (init_scale, log_scale, spec, dtype)
        if self.state() != self.key:
            self.bank.refresh()
        return self.value


def _scale(
    init_scale: torch.Tensor, log_scale: torch.Tensor, spec: WeightQuant, dtype: torch.dtype, cache: ScaleCache | None
) -> torch.Tensor:
    if cache is None:
        return learned_scale(init_scale, log_scale.detach(), spec, dtype)
    return cache.get(init_scale, log_scale, spec, dtype)


class LearnedWeightFQ:
    """A weight fake quantizer on trained group scales that the linear Functions (``kernels/lora.py``) apply
    themselves, like ``kernels.fake_quant.WeightFQ``, and whose ``log_scale`` they also give a gradient: the
    Function takes it as an extra input, forms the (out, in) weight gradient dW_q = dY^T X̂ in its backward (full
    fine-tuning forms it anyway; LoRA's merged path otherwise never does) and reduces it with
    :func:`learned_scale_grad`. The fake-quantized weight is rebuilt in the backward (the scales change every
    step, so there is nothing to cache), never saved, so a learned-scale layer keeps the activation memory of the
    other grids."""

    __slots__ = ("spec", "init_scale", "log_scale", "cache")
    save = False  # the backward needs the raw (merged) weight for the scale gradient: always rebuild

    def __init__(
        self, spec: WeightQuant, init_scale: torch.Tensor, log_scale: torch.Tensor, cache: ScaleCache | None = None
    ) -> None:
        self.spec = spec
        self.init_scale = init_scale
        self.log_scale = log_scale
        self.cache = cache

    def scale(self, dtype: torch.dtype) -> torch.Tensor:
        return _scale(self.init_scale, self.log_scale, self.spec, dtype, self.cache)

    def __call__(self, w: torch.Tensor, lora: tuple[torch.Tensor, torch.Tensor, float] | None = None) -> torch.Tensor:
        with torch.no_grad():
            return learned_fake_quant_weight(w, self.scale(w.dtype), self.spec, lora)

    def log_scale_grad(
        self,
        w: torch.Tensor,
        lora: tuple[torch.Tensor, torch.Tensor, float] | None,
        grad: torch.Tensor,
        with_weight: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, ...]:
        """d loss / d log_scale from d loss / d fq(W) (``grad``, (out, in)); with ``with_weight`` the pair
        (fq(W), d log_scale) from the same pass."""
        with torch.no_grad():
            if with_weight:
                return learned_fake_quant_and_grad(w, self.scale(w.dtype), grad, self.spec, lora)
            return learned_scale_grad(w, self.scale(w.dtype), grad, self.spec, lora)

    def __repr__(self) -> str:
        return f"LearnedWeightFQ({self.spec!r}, scales {tuple(self.log_scale.shape)})"


class LearnedScaleFakeQuantFunction(torch.autograd.Function):
    """fq(w) on ``init_scale * exp(log_scale)``: straight-through to w, the LSQ gradient to ``log_scale`` (the
    kernels' version of ``LearnedScaleFakeQuant``, same values)."""

    @staticmethod
    def forward(ctx, w, log_scale, init_scale, spec, cache):
        scale = _scale(init_scale, log_scale, spec, w.dtype, cache)
        ctx.save_for_backward(w, scale)
        ctx.spec = spec
        return learned_fake_quant_weight(w, scale, spec)

    @staticmethod
    def backward(ctx, grad):
        w, scale = ctx.saved_tensors
        d_log = learned_scale_grad(w, scale, grad, ctx.spec) if ctx.needs_input_grad[1] else None
        return (grad if ctx.needs_input_grad[0] else None), d_log, None, None, None


def learned_weight_fake_quant(
    w: torch.Tensor,
    log_scale: torch.Tensor,
    init_scale: torch.Tensor,
    spec: WeightQuant,
    cache: ScaleCache | None = None,
) -> torch.Tensor:
    """Differentiable fq(w) on learned scales (:class:`LearnedScaleFakeQuantFunction`); ``cache`` keeps the
    scales between calls on the same ``log_scale`` version."""
    if spec.kind != "int":
        raise ValueError(f"learned scales are for integer grids, not {spec.kind!r}")
    return LearnedScaleFakeQuantFunction.apply(w, log_scale, init_scale, spec, cache)
