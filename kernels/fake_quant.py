"""Fused fake quantization and its PyTorch references.

References (plain torch, no Triton): ``WeightQuant``/``ActQuant`` specs and the grids torchao's fake quantizers
compute, in the same ops and dtypes, so they equal torchao bit for bit in fp32, bf16 and fp16
(tests/qat/test_fake_quant_reference.py); ``merge_lora_weight`` (W + s·B·A in a fixed fp32 order, the same bits on
every device); ``ste`` (straight-through gradients).

Kernels: group-wise int weights (optionally merging a LoRA adapter first), per-token int8 and per-row fp8
activations, each one pass over the tensor, with straight-through gradients; each equals its reference bit for bit
on the device it runs on. Without Triton (or off CUDA unless the interpreter is asked for) the references run.
Why by hand, how exactness is kept and why gradients are straight-through: docs/qat.md.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch

from ._common import HAS_TRITON, needs_long_indexing, next_pow2, param_state, use_triton, warps_for
from .checkpoint import recomputing

if HAS_TRITON:
    import triton
    import triton.language as tl

_KIND = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_MAGIC = 12582912.0  # 1.5 * 2**23: (v + M) - M rounds v half-to-even (|v| < 2**22)
_TILE = 4096  # elements per program tile on the GPU
_TILE_INTERPRETED = 1 << 16  # Triton's CPU interpreter pays per program, not per element: fewer, larger tiles


def _tile(t: torch.Tensor) -> int:
    return _TILE if t.is_cuda else _TILE_INTERPRETED


def _kinds(dtype: torch.dtype, scale_dtype: torch.dtype | None) -> tuple[int, int, int]:
    """(input, scale, product) dtype codes: the product of an input and a scale has torch's promoted dtype."""
    if dtype not in _KIND:
        raise TypeError(f"fake quantization supports fp32/bf16/fp16 tensors, got {dtype}")
    s = scale_dtype or dtype
    if s not in _KIND:
        raise TypeError(f"unsupported scale dtype {s}")
    return _KIND[dtype], _KIND[s], (_KIND[dtype] if s == dtype else 0)


# --- PyTorch references: the grids torchao's fake quantizers compute, bit for bit (docs/qat.md) -----------------

FP8_MAX = 448.0  # torch.finfo(torch.float8_e4m3fn).max


@dataclass(frozen=True)
class WeightQuant:
    """How a weight (out, in) is fake-quantized.

    kind "int": symmetric integer grid per group of ``group_size`` inputs of a row (None: the whole row),
    ``scale = max|w| / divisor`` clamped at ``eps`` in the weight's dtype, then cast to ``scale_dtype``.
    kind "fp8": e4m3 per row (``lb`` clamps max|w| from below first).
    kind "fp8_int4": fp8 per row (lb 1e-12), then the int grid on the fp8 values (torchao's int4 weights for fp8
    activations: divisor 8, eps 1e-6, group 128).
    """

    kind: str = "int"
    bits: int = 4
    group_size: int | None = 32
    divisor: float | None = None  # None: (qmax - qmin) / 2
    eps: float | None = None  # None: smallest normal of the input dtype
    scale_dtype: torch.dtype | None = None  # None: the input dtype
    lb: float | None = None  # fp8: lower bound on max|w|
    # kind "int": candidate fractions of max|w| (MSE_RATIOS); each group takes the one with the least squared
    # error. Empty: max|w| itself, torchao's grid.
    clip_ratios: tuple[float, ...] = ()

    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1))

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1

    def scale_divisor(self) -> float:
        return self.divisor if self.divisor is not None else (self.qmax - self.qmin) / 2

    def int_part(self) -> "WeightQuant":
        """The integer grid of an ``fp8_int4`` spec (applied after its fp8 rows)."""
        return WeightQuant(
            "int", self.bits, self.group_size, self.divisor, self.eps, self.scale_dtype, clip_ratios=self.clip_ratios
        )


# Clip search (``WeightQuant.clip_ratios``, scheme option ``weight_scale="mse"``): the group's scale is
# r * max|w| / divisor for the r of least squared error, as llama.cpp's and HQQ's quantizers search a scale rather
# than take the absolute maximum. The ratios are k/64 (exact in bf16 and fp16, so r * max|w| rounds the same way in
# every dtype and on every device), 1 first so that a tie keeps torchao's scale; errors are summed in fp64, so the
# Triton kernel and this reference pick the same scale unless two candidates' errors agree to ~1e-16.
MSE_RATIOS: tuple[float, ...] = tuple(k / 64 for k in (64, 62, 60, 58, 56, 54, 52, 50, 48, 46, 44, 66, 68))


@dataclass(frozen=True)
class ActQuant:
    """How an activation (..., K) is fake-quantized per row (token).

    kind "int8_asym": int8 asymmetric per token (ExecuTorch 8da4w); kind "fp8": e4m3 per row.
    """

    kind: str = "int8_asym"
    eps: float | None = None
    scale_dtype: torch.dtype | None = None
    lb: float | None = None
    ub: float | None = None


def _eps(eps: float | None, dtype: torch.dtype) -> float:
    return eps if eps is not None else torch.finfo(dtype).smallest_normal


def _group_quant(g: torch.Tensor, amax: torch.Tensor, spec: WeightQuant) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes as float, scale) of groups ``g`` on the grid whose largest magnitude is ``amax``."""
    scale = amax / spec.scale_divisor()  # computed and rounded in the weight dtype
    scale = torch.clamp(scale, min=_eps(spec.eps, g.dtype))
    scale = scale.to(spec.scale_dtype or g.dtype)
    return torch.clamp(torch.round(g * (1.0 / scale)), spec.qmin, spec.qmax), scale


def int_weight_ref(w: torch.Tensor, spec: WeightQuant, return_codes: bool = False):
    """Symmetric per-group quantize-dequantize of a 2-D weight, in torchao's dtypes (optionally codes + scales).

    With ``spec.clip_ratios`` each group takes the candidate scale of least squared error (fp64 sums, the first
    candidate on a tie)."""
    dt = w.dtype
    gs = spec.group_size or w.shape[-1]
    g = w.reshape(w.shape[0], -1, gs)
    amax = g.abs().amax(-1, keepdim=True)
    q, scale = _group_quant(g, amax, spec)
    if spec.clip_ratios:
        g64 = g.to(torch.float64)
        best = ((q.to(dt) * scale).to(dt).to(torch.float64) - g64).square().sum(-1, keepdim=True)
        for r in spec.clip_ratios:
            if r == 1.0:
                continue
            qr, sr = _group_quant(g, amax * r, spec)
            err = ((qr.to(dt) * sr).to(dt).to(torch.float64) - g64).square().sum(-1, keepdim=True)
            better = err < best
            q, scale, best = torch.where(better, qr, q), torch.where(better, sr, scale), torch.minimum(err, best)
    out = (q.to(dt) * scale).to(dt).reshape(w.shape)
    if return_codes:
        return out, q.to(torch.int8).reshape(w.shape), scale.reshape(w.shape[0], -1)
    return out


def fp8_rows_ref(x: torch.Tensor, lb: float | None = None, ub: float | None = None) -> torch.Tensor:
    """e4m3 per-row quantize-dequantize (torchao's Float8FakeQuantizer, PerRow); zero rows stay zero."""
    dt = x.dtype
    amax = x.abs().amax(-1, keepdim=True)
    if lb is not None or ub is not None:
        amax = torch.clamp(amax, min=lb, max=ub)
    scale = (amax / FP8_MAX).to(torch.float32)  # the division happens in x's dtype, as in torchao
    y = (x.to(torch.float32) / scale).clamp(-FP8_MAX, FP8_MAX)
    y = torch.where(scale == 0, torch.zeros_like(y), y)  # torchao: 0/0 = NaN
    return (y.to(torch.float8_e4m3fn).to(torch.float32) * scale).to(dt)


def weight_ref(w: torch.Tensor, spec: WeightQuant) -> torch.Tensor:
    if spec.kind == "int":
        return int_weight_ref(w, spec)
    if spec.kind == "fp8":
        return fp8_rows_ref(w, spec.lb)
    if spec.kind == "fp8_int4":
        return int_weight_ref(fp8_rows_ref(w, spec.lb), spec.int_part())
    raise ValueError(f"unknown weight quant kind {spec.kind!r}")


def int8_asym_ref(x: torch.Tensor, spec: ActQuant | None = None) -> torch.Tensor:
    """int8 asymmetric per-token quantize-dequantize in torchao's dtypes (ExecuTorch 8da4w activations)."""
    spec = spec or ActQuant()
    dt = x.dtype
    zero = torch.zeros((), dtype=dt, device=x.device)
    mn = torch.minimum(x.amin(-1, keepdim=True), zero)
    mx = torch.maximum(x.amax(-1, keepdim=True), zero)
    scale = torch.clamp((mx - mn) / 255.0, min=_eps(spec.eps, dt))
    zp = torch.clamp(-128 - torch.round(mn / scale), -128, 127).to(torch.int32)
    scale = scale.to(spec.scale_dtype or dt)
    q = torch.clamp(torch.round(x * (1.0 / scale)) + zp, -128, 127)
    return ((q.to(dt) - zp.to(dt)) * scale).to(dt)


def act_ref(x: torch.Tensor, spec: ActQuant) -> torch.Tensor:
    if spec.kind == "int8_asym":
        return int8_asym_ref(x, spec)
    if spec.kind == "fp8":
        return fp8_rows_ref(x, spec.lb, spec.ub)
    raise ValueError(f"unknown activation quant kind {spec.kind!r}")


def int8_per_token_asym(x: torch.Tensor) -> torch.Tensor:
    """Dynamic int8 asymmetric per-token quantize-dequantize (what torchao's converted 8da4w linears apply)."""
    return int8_asym_ref(x)


def intx_per_group_sym(w: torch.Tensor, bits: int, group_size: int | None) -> torch.Tensor:
    """Symmetric per-group (or per-row when ``group_size`` is None) weight quantize-dequantize."""
    return int_weight_ref(w, WeightQuant("int", bits, group_size))


def merge_lora_weight(w: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    """W + s·B·A rounded once to W's dtype; B·A summed over the rank in order, in fp32, one rounding per step.

    The fixed order (no matmul library, no fused multiply-add) makes the result the same on every device, so the
    merged weight convert writes is the merged weight the last fake-quant forward saw.
    """
    a32, b32 = a.detach().to(torch.float32), b.detach().to(torch.float32)
    acc = torch.zeros(w.shape, dtype=torch.float32, device=w.device)
    for k in range(a32.shape[0]):
        acc = acc + b32[:, k : k + 1] * a32[k : k + 1, :]
    return (w.detach().to(torch.float32) + acc * float(scale)).to(w.dtype)


class _STE(torch.autograd.Function):
    """y = f(x) forward, dy/dx = identity backward."""

    @staticmethod
    def forward(ctx, x, fn):
        return fn(x.detach())

    @staticmethod
    def backward(ctx, g):
        return g, None


def ste(fn, x: torch.Tensor) -> torch.Tensor:
    """Apply a fake-quant reference with the straight-through estimator."""
    return _STE.apply(x, fn)


# --- Triton kernels -------------------------------------------------------------------------------------------------


if HAS_TRITON:

    @triton.jit
    def _rnd(x, KIND: tl.constexpr):
        """Round fp32 ``x`` to the nearest (ties to even) value of dtype KIND (0 fp32, 1 bf16, 2 fp16), as fp32."""
        if KIND == 1:
            b = x.to(tl.uint32, bitcast=True)
            b = b + 0x7FFF + ((b >> 16) & 1)
            b = (b >> 16) << 16
            return b.to(tl.float32, bitcast=True)
        elif KIND == 2:
            return x.to(tl.float16, fp_downcast_rounding="rtne").to(tl.float32)
        else:
            return x

    @triton.jit
    def _div_scalar(x, d, inv_d, RECIP: tl.constexpr):
        """x / d as torch computes a tensor divided by a Python number: exactly on the CPU, as x * fp32(1/d) on
        CUDA (PyTorch's CUDA kernels multiply by the divisor's reciprocal)."""
        if RECIP:
            return x * inv_d
        else:
            return tl.math.div_rn(x, tl.full(x.shape, d, tl.float32))

    @triton.jit
    def _rint(x):
        return (x + 12582912.0) - 12582912.0

    @triton.jit
    def _fp8_e4m3(y):
        """Round fp32 ``y`` (|y| <= 448) to the nearest e4m3 value (ties to even), as fp32."""
        e = ((y.to(tl.uint32, bitcast=True) >> 23) & 0xFF).to(tl.int32) - 127
        e = tl.maximum(e, -6)  # subnormals share the smallest normal's quantum 2^-9
        quantum = ((e - 3 + 127) << 23).to(tl.float32, bitcast=True)
        inv_quantum = ((3 - e + 127) << 23).to(tl.float32, bitcast=True)
        return _rint(y * inv_quantum) * quantum

    @triton.jit
    def _tile_cols(n_cols, n_groups, GS: tl.constexpr, GSP: tl.constexpr, NG: tl.constexpr):
        """Column indices of this program's NG groups (each padded to GSP) and their mask."""
        j = tl.arange(0, NG * GSP)
        if GS == GSP:  # contiguous: vectorized loads
            cols = tl.program_id(1) * (NG * GSP) + j
            return cols, cols < n_cols
        else:
            grp = tl.program_id(1) * NG + j // GSP
            within = j % GSP
            return grp * GS + within, (within < GS) & (grp < n_groups)

    @triton.jit
    def _tile_index(
        n_rows,
        n_cols,
        n_groups,
        GS: tl.constexpr,
        GSP: tl.constexpr,
        NG: tl.constexpr,
        BLOCK_R: tl.constexpr,
        LONG: tl.constexpr,
    ):
        """This program's tile of a weight, BLOCK_R rows x NG groups: rows, row mask, columns, column mask, mask."""
        rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        if LONG:
            rows = rows.to(tl.int64)
        cols, cmask = _tile_cols(n_cols, n_groups, GS, GSP, NG)
        rmask = rows < n_rows
        return rows, rmask, cols, cmask, rmask[:, None] & cmask[None, :]

    @triton.jit
    def _group_grid(
        g,
        amax,
        eps,
        divisor,
        inv_divisor,
        QMIN: tl.constexpr,
        QMAX: tl.constexpr,
        D: tl.constexpr,
        S: tl.constexpr,
        P: tl.constexpr,
        RECIP: tl.constexpr,
    ):
        """(codes, dequantized, scale) of groups g (BLOCK_R, NG, GSP) on the grid whose largest magnitude is amax."""
        scale = _rnd(_div_scalar(amax, divisor, inv_divisor, RECIP), D)
        scale = _rnd(tl.maximum(scale, eps), D)
        scale = _rnd(scale, S)
        q, dq = _on_grid(g, scale, QMIN, QMAX, D, S, P)
        return q, dq, scale

    @triton.jit
    def _on_grid(g, scale, QMIN: tl.constexpr, QMAX: tl.constexpr, D: tl.constexpr, S: tl.constexpr, P: tl.constexpr):
        """(codes, dequantized) of groups g (BLOCK_R, NG, GSP) on given scales (BLOCK_R, NG), already of dtype S:
        q = clamp(round(g * (1 / s))), q * s, each step rounded as torch rounds it."""
        inv = _rnd(tl.math.div_rn(tl.full(scale.shape, 1.0, tl.float32), scale), S)
        v = _rnd(g * inv[:, :, None], P)
        q = tl.clamp(_rint(v), QMIN, QMAX, propagate_nan=tl.PropagateNan.ALL)
        return q, _rnd(_rnd(q * scale[:, :, None], P), D)

    @triton.jit
    def _merge_lora(w, A, B, rows, cols, rmask, cmask, n_cols, lora_scale, R: tl.constexpr, D: tl.constexpr):
        """W + s·B·A of a tile (fp32 ``w``, rounded to dtype D once): B·A summed over the rank in order, fp32, no
        FMA (launch option), as ``merge_lora_weight``."""
        acc = tl.zeros(w.shape, dtype=tl.float32)
        for k in range(R):
            bk = tl.load(B + rows * R + k, mask=rmask, other=0.0).to(tl.float32)
            ak = tl.load(A + k * n_cols + cols, mask=cmask, other=0.0).to(tl.float32)
            acc = acc + bk[:, None] * ak[None, :]
        return _rnd(w + acc * lora_scale, D)

    @triton.jit
    def _weight_kernel(
        W,
        A,
        B,
        OUT,
        MERGED,
        CODES,
        SCALES,
        RATIOS,
        n_rows,
        n_cols,
        n_groups,
        stride_w,
        lora_scale,
        eps,
        divisor,
        inv_divisor,
        R: tl.constexpr,
        GS: tl.constexpr,
        GSP: tl.constexpr,
        NG: tl.constexpr,
        BLOCK_R: tl.constexpr,
        QUANT: tl.constexpr,
        QMIN: tl.constexpr,
        QMAX: tl.constexpr,
        D: tl.constexpr,
        S: tl.constexpr,
        P: tl.constexpr,
        WRITE_MERGED: tl.constexpr,
        WRITE_CODES: tl.constexpr,
        PACK: tl.constexpr,
        LONG: tl.constexpr,
        RECIP: tl.constexpr,
        NR: tl.constexpr,
    ):
        """One tile = BLOCK_R rows x NG groups (each GS columns, padded to GSP): merge, quantize, dequantize."""
        rows, rmask, cols, cmask, mask = _tile_index(n_rows, n_cols, n_groups, GS, GSP, NG, BLOCK_R, LONG)
        w = tl.load(W + rows[:, None] * stride_w + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        if R > 0:
            w = _merge_lora(w, A, B, rows, cols, rmask, cmask, n_cols, lora_scale, R, D)
            if WRITE_MERGED:
                tl.store(MERGED + rows[:, None] * n_cols + cols[None, :], w.to(MERGED.dtype.element_ty), mask=mask)
        if QUANT:
            g = tl.reshape(w, (BLOCK_R, NG, GSP))
            amax = tl.max(tl.abs(g), axis=2)
            q, dq, scale = _group_grid(g, amax, eps, divisor, inv_divisor, QMIN, QMAX, D, S, P, RECIP)
            if NR > 0:  # clip search: the candidate r * max|w| of least squared error (fp64 sums), first on a tie
                g64 = g.to(tl.float64)
                d64 = dq.to(tl.float64) - g64
                best = tl.sum(d64 * d64, axis=2)
                for i in range(NR):
                    m = _rnd(amax * tl.load(RATIOS + i), D)
                    qr, dqr, sr = _group_grid(g, m, eps, divisor, inv_divisor, QMIN, QMAX, D, S, P, RECIP)
                    d64 = dqr.to(tl.float64) - g64
                    err = tl.sum(d64 * d64, axis=2)
                    better = err < best
                    q = tl.where(better[:, :, None], qr, q)
                    dq = tl.where(better[:, :, None], dqr, dq)
                    scale = tl.where(better, sr, scale)
                    best = tl.where(better, err, best)
            tl.store(
                OUT + rows[:, None] * n_cols + cols[None, :],
                tl.reshape(dq, (BLOCK_R, NG * GSP)).to(OUT.dtype.element_ty),
                mask=mask,
            )
            if WRITE_CODES:
                gidx = tl.program_id(1) * NG + tl.arange(0, NG)
                smask = rmask[:, None] & (gidx < n_groups)[None, :]
                tl.store(
                    SCALES + rows[:, None] * n_groups + gidx[None, :], scale.to(SCALES.dtype.element_ty), mask=smask
                )
                qi = tl.reshape(q, (BLOCK_R, NG * GSP)).to(tl.int32)
                if PACK:  # two 4-bit codes a byte, even column in the low nibble (GS == GSP here)
                    lo, hi = tl.split(tl.reshape(qi, (BLOCK_R, NG * GSP // 2, 2)))
                    byte = ((lo & 15) | ((hi & 15) << 4)).to(tl.uint8)
                    pc = tl.program_id(1) * (NG * GSP // 2) + tl.arange(0, NG * GSP // 2)
                    pmask = rmask[:, None] & (pc * 2 < n_cols)[None, :]
                    tl.store(CODES + rows[:, None] * (n_cols // 2) + pc[None, :], byte, mask=pmask)
                else:
                    tl.store(CODES + rows[:, None] * n_cols + cols[None, :], qi.to(tl.int8), mask=mask)

    @triton.jit
    def _dequant_kernel(
        CODES,
        SCALES,
        OUT,
        n_rows,
        n_cols,
        n_groups,
        GS: tl.constexpr,
        GSP: tl.constexpr,
        NG: tl.constexpr,
        BLOCK_R: tl.constexpr,
        D: tl.constexpr,
        P: tl.constexpr,
        PACK: tl.constexpr,
        LONG: tl.constexpr,
    ):
        """codes x scales -> the weight the fake quantizer produced (same rounding as _weight_kernel)."""
        rows, rmask, cols, cmask, mask = _tile_index(n_rows, n_cols, n_groups, GS, GSP, NG, BLOCK_R, LONG)
        if PACK:
            pc = tl.program_id(1) * (NG * GSP // 2) + tl.arange(0, NG * GSP // 2)
            pmask = rmask[:, None] & (pc * 2 < n_cols)[None, :]
            byte = tl.load(CODES + rows[:, None] * (n_cols // 2) + pc[None, :], mask=pmask, other=0).to(tl.int32)
            lo = ((byte & 15) ^ 8) - 8  # sign-extend the nibbles
            hi = (((byte >> 4) & 15) ^ 8) - 8
            q = tl.reshape(tl.join(lo, hi), (BLOCK_R, NG * GSP)).to(tl.float32)
        else:
            q = tl.load(CODES + rows[:, None] * n_cols + cols[None, :], mask=mask, other=0).to(tl.float32)
        gidx = tl.program_id(1) * NG + tl.arange(0, NG)
        smask = rmask[:, None] & (gidx < n_groups)[None, :]
        scale = tl.load(SCALES + rows[:, None] * n_groups + gidx[None, :], mask=smask, other=1.0).to(tl.float32)
        q3 = tl.reshape(q, (BLOCK_R, NG, GSP))
        dq = _rnd(_rnd(q3 * scale[:, :, None], P), D)
        tl.store(
            OUT + rows[:, None] * n_cols + cols[None, :],
            tl.reshape(dq, (BLOCK_R, NG * GSP)).to(OUT.dtype.element_ty),
            mask=mask,
        )

    @triton.jit
    def _row_params(
        mn,
        mx,
        eps,
        lb,
        ub,
        inv_d,
        MODE: tl.constexpr,
        HAS_LB: tl.constexpr,
        HAS_UB: tl.constexpr,
        D: tl.constexpr,
        S: tl.constexpr,
        RECIP: tl.constexpr,
    ):
        """Per-row (scale, reciprocal or unused, zero point) from the row's min and max (max|x| for fp8)."""
        if MODE == 0:  # int8 asymmetric per token
            mn = tl.minimum(mn, 0.0)
            mx = tl.maximum(mx, 0.0)
            scale = _rnd(mx - mn, D)
            scale = _rnd(_div_scalar(scale, 255.0, inv_d, RECIP), D)
            scale = _rnd(tl.maximum(scale, eps), D)
            zp = -128.0 - _rint(_rnd(tl.math.div_rn(mn, scale), D))
            zp = tl.minimum(tl.maximum(zp, -128.0), 127.0)
            scale = _rnd(scale, S)
            inv = _rnd(tl.math.div_rn(tl.full(scale.shape, 1.0, tl.float32), scale), S)
            return scale, inv, zp
        else:  # fp8 e4m3 per row: mx is max|x|
            amax = mx
            if HAS_LB:
                amax = _rnd(tl.maximum(amax, lb), D)
            if HAS_UB:
                amax = _rnd(tl.minimum(amax, ub), D)
            scale = _rnd(_div_scalar(amax, 448.0, inv_d, RECIP), D)
            return scale, scale, scale

    @triton.jit
    def _row_apply(x, scale, inv, zp, MODE: tl.constexpr, D: tl.constexpr, P: tl.constexpr):
        if MODE == 0:
            v = _rnd(x * inv[:, None], P)
            q = tl.minimum(tl.maximum(_rint(v) + zp[:, None], -128.0), 127.0)
            return _rnd(_rnd((q - zp[:, None]) * scale[:, None], P), D)
        else:
            s = scale[:, None]
            y = tl.math.div_rn(x, tl.broadcast_to(s, x.shape))
            y = tl.minimum(tl.maximum(y, -448.0), 448.0)
            y = tl.where(s == 0.0, 0.0, y)  # an all-zero row stays zero (torchao: 0/0)
            return _rnd(_fp8_e4m3(y) * s, D)

    @triton.jit
    def _row_kernel(
        X,
        OUT,
        n_rows,
        n_cols,
        stride_x,
        stride_o,
        eps,
        lb,
        ub,
        inv_d,
        MODE: tl.constexpr,
        HAS_LB: tl.constexpr,
        HAS_UB: tl.constexpr,
        D: tl.constexpr,
        S: tl.constexpr,
        P: tl.constexpr,
        BLOCK_R: tl.constexpr,
        BLOCK_C: tl.constexpr,
        SINGLE: tl.constexpr,
        LONG: tl.constexpr,
        RECIP: tl.constexpr,
    ):
        """Per-row fake quantization of BLOCK_R rows; SINGLE: the row fits one tile (read once)."""
        rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        if LONG:
            rows = rows.to(tl.int64)
        rmask = rows < n_rows
        c = tl.arange(0, BLOCK_C)
        if SINGLE:
            mask = rmask[:, None] & (c < n_cols)[None, :]
            x = tl.load(X + rows[:, None] * stride_x + c[None, :], mask=mask, other=0.0).to(tl.float32)
            # padding zeros change neither min(., 0), max(., 0) nor max|x|
            if MODE == 0:
                mn = tl.min(x, axis=1)
                mx = tl.max(x, axis=1)
            else:
                mn = tl.zeros((BLOCK_R,), tl.float32)
                mx = tl.max(tl.abs(x), axis=1)
            scale, inv, zp = _row_params(mn, mx, eps, lb, ub, inv_d, MODE, HAS_LB, HAS_UB, D, S, RECIP)
            out = _row_apply(x, scale, inv, zp, MODE, D, P)
            tl.store(OUT + rows[:, None] * stride_o + c[None, :], out.to(OUT.dtype.element_ty), mask=mask)
        else:
            mn = tl.zeros((BLOCK_R,), tl.float32)
            mx = tl.zeros((BLOCK_R,), tl.float32)
            for c0 in range(0, n_cols, BLOCK_C):
                mask = rmask[:, None] & (c0 + c < n_cols)[None, :]
                x = tl.load(X + rows[:, None] * stride_x + (c0 + c)[None, :], mask=mask, other=0.0).to(tl.float32)
                if MODE == 0:
                    mn = tl.minimum(mn, tl.min(x, axis=1))
                    mx = tl.maximum(mx, tl.max(x, axis=1))
                else:
                    mx = tl.maximum(mx, tl.max(tl.abs(x), axis=1))
            scale, inv, zp = _row_params(mn, mx, eps, lb, ub, inv_d, MODE, HAS_LB, HAS_UB, D, S, RECIP)
            for c0 in range(0, n_cols, BLOCK_C):
                mask = rmask[:, None] & (c0 + c < n_cols)[None, :]
                x = tl.load(X + rows[:, None] * stride_x + (c0 + c)[None, :], mask=mask, other=0.0).to(tl.float32)
                out = _row_apply(x, scale, inv, zp, MODE, D, P)
                tl.store(OUT + rows[:, None] * stride_o + (c0 + c)[None, :], out.to(OUT.dtype.element_ty), mask=mask)


# --- launchers ---------------------------------------------------------------------------------------------------
# Launch plans (grid, block sizes, dtype codes, scalars) are computed once per shape/dtype/spec and cached: the
# training steps these kernels serve are host-bound on small models, so per-call Python counts.


def _weight_geometry(n_cols: int, group_size: int | None, tile: int) -> tuple[int, int, int, int]:
    gs = group_size or n_cols
    if n_cols % gs:
        raise ValueError(f"group size {gs} does not divide the row length {n_cols}")
    gsp = next_pow2(gs)
    ng = max(1, min(256 // gsp, next_pow2(n_cols // gs))) if gsp == gs else 1
    block_r = max(1, tile // (ng * gsp))
    return gs, gsp, ng, block_r


def _recip32(d: float) -> float:
    """fp32(1 / d) as fp32 division gives it (what PyTorch's CUDA kernels multiply by)."""
    return float(torch.tensor(1.0, dtype=torch.float32) / torch.tensor(d, dtype=torch.float32))


@functools.lru_cache(maxsize=4096)
def _weight_plan(
    n_rows: int,
    n_cols: int,
    dtype: torch.dtype,
    spec: WeightQuant | None,
    rank: int,
    quant: bool,
    write_merged: bool,
    write_codes: bool,
    pack: bool,
    cuda: bool,
    long: bool,
    tile: int,
):
    gs, gsp, ng, block_r = _weight_geometry(n_cols, spec.group_size if spec is not None else None, tile)
    block_r = min(block_r, next_pow2(n_rows))
    n_groups = n_cols // gs
    d, s, p = _kinds(dtype, spec.scale_dtype if spec is not None else None)
    divisor = spec.scale_divisor() if spec is not None else 1.0
    scalars = (_eps(spec.eps, dtype) if spec is not None else 1.0, divisor, _recip32(divisor))
    kw = dict(
        R=rank,
        GS=gs,
        GSP=gsp,
        NG=ng,
        BLOCK_R=block_r,
        QUANT=quant,
        QMIN=spec.qmin if spec is not None else 0,
        QMAX=spec.qmax if spec is not None else 0,
        D=d,
        S=s,
        P=p,
        WRITE_MERGED=write_merged,
        WRITE_CODES=write_codes,
        PACK=pack,
        LONG=long,
        RECIP=cuda,
        NR=len(_search_ratios(spec)),
        num_warps=warps_for(block_r * ng * gsp),
    )
    if cuda:
        kw["enable_fp_fusion"] = False
    grid = (triton.cdiv(n_rows, block_r), triton.cdiv(n_groups, ng))
    return grid, n_groups, scalars, kw


def _search_ratios(spec: WeightQuant | None) -> tuple[float, ...]:
    """The clip-search candidates the kernel tries after max|w| itself (the reference skips r = 1 the same way)."""
    return tuple(r for r in spec.clip_ratios if r != 1.0) if spec is not None else ()


@functools.lru_cache(maxsize=64)
def _ratios_tensor(ratios: tuple[float, ...], device: torch.device) -> torch.Tensor:
    return torch.tensor(ratios or (1.0,), dtype=torch.float32, device=device)


def _weight_launch(
    w: torch.Tensor,
    spec: WeightQuant | None,
    lora: tuple | None,
    quant: bool,
    write_merged: bool,
    write_codes: bool,
    pack: bool,
) -> tuple[torch.Tensor | None, ...]:
    n_rows, n_cols = w.shape
    if w.stride(1) != 1:
        w = w.contiguous()
    if lora is not None:
        a, b, lora_scale = lora
        a, b = a.detach(), b.detach()
        if not a.is_contiguous():
            a = a.contiguous()
        if not b.is_contiguous():
            b = b.contiguous()
        rank = a.shape[0]
    else:
        a = b = w
        rank, lora_scale = 0, 1.0
    grid, n_groups, (eps, divisor, inv_divisor), kw = _weight_plan(
        n_rows,
        n_cols,
        w.dtype,
        spec,
        rank,
        quant,
        write_merged,
        write_codes,
        pack,
        w.is_cuda,
        needs_long_indexing(w),
        _tile(w),
    )
    out = torch.empty_like(w) if quant else None
    merged = torch.empty_like(w) if write_merged else None
    codes = scales = None
    if write_codes:
        codes = torch.empty(
            (n_rows, n_cols // 2 if pack else n_cols), dtype=torch.uint8 if pack else torch.int8, device=w.device
        )
        scales = torch.empty((n_rows, n_groups), dtype=spec.scale_dtype or w.dtype, device=w.device)
    _weight_kernel[grid](
        w,
        a,
        b,
        w if out is None else out,
        w if merged is None else merged,
        w if codes is None else codes,
        w if scales is None else scales,
        _ratios_tensor(_search_ratios(spec), w.device),
        n_rows,
        n_cols,
        n_groups,
        w.stride(0),
        float(lora_scale),
        eps,
        divisor,
        inv_divisor,
        **kw,
    )
    return out, merged, codes, scales


@functools.lru_cache(maxsize=4096)
def _row_plan(
    n_rows: int,
    n_cols: int,
    dtype: torch.dtype,
    mode: int,
    eps: float | None,
    lb: float | None,
    ub: float | None,
    scale_dtype: torch.dtype | None,
    cuda: bool,
    long: bool,
    tile: int,
):
    d, s, p = _kinds(dtype, scale_dtype)
    single = n_cols <= 8192
    block_c = next_pow2(n_cols) if single else 4096
    block_r = max(1, min(tile // block_c, next_pow2(n_rows)))
    scalars = (
        _eps(eps, dtype),
        lb if lb is not None else 0.0,
        ub if ub is not None else 0.0,
        _recip32(255.0 if mode == 0 else FP8_MAX),
    )
    kw = dict(
        MODE=mode,
        HAS_LB=lb is not None,
        HAS_UB=ub is not None,
        D=d,
        S=s,
        P=p,
        BLOCK_R=block_r,
        BLOCK_C=block_c,
        SINGLE=single,
        LONG=long,
        RECIP=cuda,
        num_warps=warps_for(block_r * block_c),
    )
    if cuda:
        kw["enable_fp_fusion"] = False
    return (triton.cdiv(n_rows, block_r),), scalars, kw


def _row_launch(
    x: torch.Tensor,
    mode: int,
    eps: float | None,
    lb: float | None,
    ub: float | None,
    scale_dtype: torch.dtype | None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    n_cols = x.shape[-1]
    x2 = x.reshape(-1, n_cols)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    o2 = torch.empty_like(x2) if out is None else out.view(-1, n_cols)
    n_rows = x2.shape[0]
    grid, (eps_, lb_, ub_, inv_d), kw = _row_plan(
        n_rows, n_cols, x.dtype, mode, eps, lb, ub, scale_dtype, x.is_cuda, needs_long_indexing(x2, o2), _tile(x2)
    )
    _row_kernel[grid](x2, o2, n_rows, n_cols, x2.stride(0), o2.stride(0), eps_, lb_, ub_, inv_d, **kw)
    return o2.view(x.shape) if out is None else out


# --- public functions (no autograd) ------------------------------------------------------------------------------


def can_pack(spec: WeightQuant, n_cols: int) -> bool:
    gs = spec.group_size or n_cols
    return spec.kind in ("int", "fp8_int4") and spec.bits <= 4 and gs == next_pow2(gs) and gs % 2 == 0


def merged_lora_weight(w: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    """W + s·B·A in W's dtype, the same bits as ``merge_lora_weight`` on every device."""
    if use_triton(w):
        return _weight_launch(w.detach(), None, (a, b, scale), False, True, False, False)[1]
    return merge_lora_weight(w, a, b, scale)


def fake_quant_weight(
    w: torch.Tensor,
    spec: WeightQuant,
    lora: tuple[torch.Tensor, torch.Tensor, float] | None = None,
    codes: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool]:
    """fq(W) or fq(W + s·B·A) for ``lora=(A, B, s)``, without autograd.

    With ``codes=True`` also returns (codes, scales, packed) of the integer grid (int and fp8_int4 kinds): codes
    as int8, or two 4-bit codes a byte (even column low) when ``packed``; scales (rows, groups).
    """
    w = w.detach()
    if use_triton(w):
        if spec.kind == "int":
            pack = codes and can_pack(spec, w.shape[1])
            out, _, c, s = _weight_launch(w, spec, lora, True, False, codes, pack)
            return (out, c, s, pack) if codes else out
        base = merged_lora_weight(w, *lora) if lora is not None else w
        rows = _row_launch(base, 1, None, spec.lb, None, None)
        if spec.kind == "fp8":
            if codes:
                raise ValueError("fp8 weights have no integer codes")
            return rows
        ip = spec.int_part()
        pack = codes and can_pack(ip, w.shape[1])
        out, _, c, s = _weight_launch(rows, ip, None, True, False, codes, pack)
        return (out, c, s, pack) if codes else out
    base = merge_lora_weight(w, *lora) if lora is not None else w
    if spec.kind == "int":
        if codes:
            out, c, s = int_weight_ref(base, spec, return_codes=True)
            return out, c, s, False
        return int_weight_ref(base, spec)
    rows = fp8_rows_ref(base, spec.lb)
    if spec.kind == "fp8":
        if codes:
            raise ValueError("fp8 weights have no integer codes")
        return rows
    if codes:
        out, c, s = int_weight_ref(rows, spec.int_part(), return_codes=True)
        return out, c, s, False
    return int_weight_ref(rows, spec.int_part())


@functools.lru_cache(maxsize=4096)
def _dequant_plan(
    n_rows: int,
    n_cols: int,
    group_size: int | None,
    dtype: torch.dtype,
    scale_dtype: torch.dtype,
    packed: bool,
    cuda: bool,
    long: bool,
    tile: int,
):
    gs, gsp, ng, block_r = _weight_geometry(n_cols, group_size, tile)
    block_r = min(block_r, next_pow2(n_rows))
    d, _, p = _kinds(dtype, scale_dtype)
    kw = dict(
        GS=gs,
        GSP=gsp,
        NG=ng,
        BLOCK_R=block_r,
        D=d,
        P=p,
        PACK=packed,
        LONG=long,
        num_warps=warps_for(block_r * ng * gsp),
    )
    if cuda:
        kw["enable_fp_fusion"] = False
    return (triton.cdiv(n_rows, block_r), triton.cdiv(n_cols // gs, ng)), kw


def dequantize_codes(
    codes: torch.Tensor, scales: torch.Tensor, packed: bool, dtype: torch.dtype, group_size: int | None, n_cols: int
) -> torch.Tensor:
    """The fake-quantized weight back from :func:`fake_quant_weight`'s codes and scales (same bits)."""
    n_rows = codes.shape[0]
    if use_triton(codes):
        out = torch.empty((n_rows, n_cols), dtype=dtype, device=codes.device)
        grid, kw = _dequant_plan(
            n_rows,
            n_cols,
            group_size,
            dtype,
            scales.dtype,
            packed,
            codes.is_cuda,
            needs_long_indexing(out),
            _tile(codes),
        )
        _dequant_kernel[grid](codes, scales, out, n_rows, n_cols, n_cols // (group_size or n_cols), **kw)
        return out
    if packed:
        lo = ((codes.to(torch.int16) & 15) ^ 8) - 8
        hi = (((codes.to(torch.int16) >> 4) & 15) ^ 8) - 8
        codes = torch.stack([lo, hi], -1).reshape(n_rows, n_cols)
    gs = group_size or n_cols
    q = codes.reshape(n_rows, -1, gs).to(dtype)
    return (q * scales.reshape(n_rows, -1, 1)).to(dtype).reshape(n_rows, n_cols)


def fake_quant_act(x: torch.Tensor, spec: ActQuant, out: torch.Tensor | None = None) -> torch.Tensor:
    """Per-row fake quantization of an activation (..., K), without autograd; ``out`` may be ``x`` (in place)."""
    x = x.detach()
    if use_triton(x):
        if spec.kind == "int8_asym":
            return _row_launch(x, 0, spec.eps, None, None, spec.scale_dtype, out)
        if spec.kind == "fp8":
            return _row_launch(x, 1, None, spec.lb, spec.ub, None, out)
        raise ValueError(f"unknown activation quant kind {spec.kind!r}")
    res = act_ref(x, spec)
    if out is not None:
        out.copy_(res)
        return out
    return res


def fake_quant_rows(x: torch.Tensor, spec: WeightQuant) -> torch.Tensor:
    """A weight grid applied to rows gathered from a weight (embedding lookups): per-row scales, so
    ``fq(W)[ids] == fq_rows(W[ids])`` exactly."""
    shape = x.shape
    x2 = x.detach().reshape(-1, shape[-1])
    return fake_quant_weight(x2, spec).reshape(shape)


# --- autograd: straight-through estimators -----------------------------------------------------------------------


class ActFakeQuantFunction(torch.autograd.Function):
    """fq_a(x) forward; identity backward (the straight-through estimator)."""

    @staticmethod
    def forward(ctx, x, spec):
        return fake_quant_act(x, spec)

    @staticmethod
    def backward(ctx, g):
        return g, None


class RowsFakeQuantFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, spec):
        return fake_quant_rows(x, spec)

    @staticmethod
    def backward(ctx, g):
        return g, None


def _needs_grad(t: torch.Tensor) -> bool:
    return t.requires_grad and torch.is_grad_enabled()


def act_fake_quant(x: torch.Tensor, spec: ActQuant) -> torch.Tensor:
    """Differentiable (straight-through) activation fake quantization."""
    if not _needs_grad(x):  # e.g. the no-grad first pass of checkpointed layers: no autograd node to build
        return fake_quant_act(x, spec)
    return ActFakeQuantFunction.apply(x, spec)


def rows_fake_quant(x: torch.Tensor, spec: WeightQuant) -> torch.Tensor:
    """Differentiable (straight-through) fake quantization of gathered weight rows."""
    if not _needs_grad(x):
        return fake_quant_rows(x, spec)
    return RowsFakeQuantFunction.apply(x, spec)


class WeightCache:
    """The fake-quantized form of one weight (or one LoRA layer's merged weight W + s·B·A), kept while its inputs
    are unchanged (version counters, storage and optimizer steps: :func:`param_state`), so that every use within
    an optimizer step (micro-batches, checkpoint recomputation, the backward) shares one quantization.

    Two forms, a memory/host-time trade (the 0.6B bench shapes are bound by the host's launch rate):

    - ``"codes"``: the integer codes (4-bit packed two a byte) and scales, a quarter of a bf16 copy for int4; each
      use dequantizes them (one launch, same bits as the fake-quant output). Full fine-tuning only (a LoRA merged
      weight changes every step and is cheaper to rebuild than to dequantize); fp8 weights have no integer form
      and are re-quantized per use.
    - ``"weights"``: the fake-quantized weight itself; uses cost nothing, the linear Functions save it instead of
      rebuilding it in the backward, and the step holds one quantized copy of the cached weights.

    Frozen weights outside LoRA (the LM head under LoRA) are re-quantized per use in either form: caching would
    hold a copy for the whole run to save one launch a step.
    """

    FORMS = ("codes", "weights")

    def __init__(self, form: str = "codes") -> None:
        if form not in self.FORMS:
            raise ValueError(f"weight cache form must be one of {self.FORMS}, got {form!r}")
        self.form = form
        self.key: tuple | None = None
        self.entry: Any = None
        self.hits = 0
        self.misses = 0

    def clear(self) -> None:
        self.key = self.entry = None

    def get(
        self, w: torch.Tensor, spec: WeightQuant, lora: tuple[torch.Tensor, torch.Tensor, float] | None = None
    ) -> torch.Tensor:
        weights = self.form == "weights"
        if (lora is None and not w.requires_grad) or (not weights and (spec.kind == "fp8" or lora is not None)):
            self.misses += 1
            return fake_quant_weight(w, spec, lora=lora)
        key = (param_state(w), w.shape)
        if lora is not None:
            key += (param_state(lora[0]), param_state(lora[1]), lora[2])
        if self.key == key:
            self.hits += 1
            if weights:
                return self.entry
            codes, scales, packed, gs = self.entry
            return dequantize_codes(codes, scales, packed, w.dtype, gs, w.shape[1])
        self.misses += 1
        self.key = self.entry = None  # drop the stale form before making the new one
        if weights:
            out = fake_quant_weight(w, spec, lora=lora)
            self.key, self.entry = key, out
            return out
        out, codes, scales, packed = fake_quant_weight(w, spec, codes=True)
        self.key, self.entry = key, (codes, scales, packed, spec.group_size)
        return out


class WeightFQ:
    """A weight fake quantizer that the linear Functions (``kernels/lora.py``) apply themselves.

    By default they apply it in the forward and again in the backward rather than saving fq(W) in between: saving
    would keep a full-size copy of every quantized weight alive from a layer's forward to its backward (with
    LoRA, a new fq(W + s·B·A) per layer and micro-batch; without checkpointing, a whole second model), while
    rebuilding is one memory-bound pass per linear (a dequantization with a ``"codes"`` cache). They save it
    instead when that costs nothing (:attr:`save`): a ``"weights"`` cache holds it anyway, and inside a checkpointed
    layer's recomputation (``kernels/checkpoint.py``) it lives only until that layer's backward, which follows at once.
    """

    __slots__ = ("spec", "cache")

    def __init__(self, spec: WeightQuant, cache: WeightCache | None = None) -> None:
        self.spec = spec
        self.cache = cache

    @property
    def save(self) -> bool:
        """Whether the Functions save the fake-quantized weight for the backward (else they rebuild it)."""
        return (self.cache is not None and self.cache.form == "weights") or recomputing()

    def __call__(self, w: torch.Tensor, lora: tuple[torch.Tensor, torch.Tensor, float] | None = None) -> torch.Tensor:
        """fq(W), or fq(W + s·B·A) for ``lora=(A, B, s)``; no autograd (the callers' backward is the STE)."""
        with torch.no_grad():
            if self.cache is not None:
                return self.cache.get(w, self.spec, lora)
            return fake_quant_weight(w, self.spec, lora=lora)

    def __repr__(self) -> str:
        return f"WeightFQ({self.spec!r}, cache={self.cache.form if self.cache is not None else None})"


class CachedWeightFakeQuantFunction(torch.autograd.Function):
    """fq(W) through a :class:`WeightCache`; straight-through backward (the gradient goes to W unchanged)."""

    @staticmethod
    def forward(ctx, w, spec, cache):
        if cache is None:
            return fake_quant_weight(w, spec)
        out = cache.get(w, spec)
        # a "weights" cache hands out the same tensor all step: each call's output must be its own tensor object
        return out.view_as(out) if out is cache.entry else out

    @staticmethod
    def backward(ctx, g):
        return g, None, None


def weight_fake_quant(w: torch.Tensor, spec: WeightQuant, cache: WeightCache | None = None) -> torch.Tensor:
    """Differentiable (straight-through) weight fake quantization, cached per weight version when ``cache``."""
    if not _needs_grad(w):
        with torch.no_grad():
            return cache.get(w, spec) if cache is not None else fake_quant_weight(w, spec)
    return CachedWeightFakeQuantFunction.apply(w, spec, cache)
