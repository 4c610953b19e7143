"""Fake-quantization math in plain PyTorch: the reference every faster path is checked against.

Why a re-implementation of torchao's fake quantizers: edgeft's fused kernels (``edgeft.kernels.fake_quant``) must
produce exactly what torchao's convert writes, and they need a spec they can compile (group size, bounds, scale
dtype) rather than torchao's module objects. This file translates torchao's fake-quant configs into small frozen
specs (:func:`specs_from_configs`) and implements each grid with the *same torch operations in the same dtypes*
as torchao 0.18, so that the references equal torchao's ``FakeQuantizer`` outputs bit for bit in fp32, bf16 and
fp16 (tests/qat/test_fake_quant_reference.py checks that against torchao itself). Facts this relies on:

- torchao computes scales in the input's dtype unless the config names a ``scale_precision`` (the configs it
  infers for ``int8-int4``/``int4``/``int8`` pass ``None``, so a bf16 weight gets a bf16 scale), clamps them at
  ``eps`` (default: the smallest normal of the input dtype), and quantizes as ``round(x * (1 / scale))`` with
  round-half-to-even, in the dtype torch's type promotion gives ``x`` times the scale;
- fp8 (e4m3) rows divide by the fp32 scale, clamp to +-448 and round to nearest even;
- a tensor divided by a Python number (``max / 7.5``, ``range / 255``) divides exactly on the CPU and multiplies by
  the fp32 reciprocal on CUDA, so these references (plain torch ops) follow whichever device they run on, and the
  kernels do the same.

Two deliberate departures, both where torchao's result is not a number or not low rank:

- an all-zero fp8 row gets scale 0 in torchao and becomes NaN (0/0); here it stays zero;
- gradients are the straight-through estimator (identity). torchao's fake quantizer also zeroes the gradient of
  elements its clamp saturates (for the symmetric grid that is each group's largest positive weight, since
  ``7.5`` rounds to ``8`` and clamps to ``7``) and scales it by ``scale * (1 / scale)`` (1 up to rounding). That
  mask would make the LoRA adapter gradients depend on a full-size masked weight gradient; edgeft passes the
  gradient through unchanged, so dA and dB stay low-rank products (see ``edgeft.kernels.fake_quant``).

The merged LoRA weight W + s·B·A is defined here too (:func:`merge_lora_weight`): an fp32 sum over the rank in a
fixed order, one IEEE operation at a time, so that the Triton kernel, this reference and convert compute the
same bits on any device.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

_EPS32 = torch.finfo(torch.float32).eps
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
        return WeightQuant("int", self.bits, self.group_size, self.divisor, self.eps, self.scale_dtype,
                           clip_ratios=self.clip_ratios)


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


def specs_from_configs(act_cfg: Any, weight_cfg: Any) -> tuple[ActQuant | None, WeightQuant]:
    """Translate torchao's fake-quant configs into specs; raises ValueError for what edgeft does not simulate."""
    return (act_spec(act_cfg) if act_cfg is not None else None), weight_spec(weight_cfg)


def weight_spec(cfg: Any) -> WeightQuant:
    from torchao.quantization.granularity import PerAxis, PerGroup, PerRow
    from torchao.quantization.qat.fake_quantize_config import (
        Float8FakeQuantizeConfig,
        Int4WeightFakeQuantizeConfig,
        IntxFakeQuantizeConfig,
    )
    from torchao.quantization.quant_primitives import _DTYPE_TO_BIT_WIDTH, MappingType, ZeroPointDomain

    if isinstance(cfg, IntxFakeQuantizeConfig):
        if cfg.mapping_type != MappingType.SYMMETRIC or cfg.range_learning or not cfg.is_dynamic:
            raise ValueError(f"unsupported weight fake-quant config {cfg}: symmetric dynamic grids only")
        if cfg.zero_point_domain != ZeroPointDomain.INT:
            raise ValueError(f"unsupported zero-point domain in {cfg}")
        gran = cfg.granularity
        if isinstance(gran, PerGroup):
            gs = gran.group_size
        elif isinstance(gran, PerAxis) and gran.axis == 0:
            gs = None
        else:
            raise ValueError(f"unsupported weight granularity {gran}")
        return WeightQuant("int", _DTYPE_TO_BIT_WIDTH[cfg.dtype], gs, None, cfg.eps, cfg.scale_precision)
    if isinstance(cfg, Float8FakeQuantizeConfig):
        if cfg.dtype != torch.float8_e4m3fn or not isinstance(cfg.granularity, PerRow) or cfg.hp_value_ub is not None:
            raise ValueError(f"unsupported fp8 weight config {cfg}: e4m3 per row only")
        return WeightQuant("fp8", 8, None, lb=cfg.hp_value_lb)
    if isinstance(cfg, Int4WeightFakeQuantizeConfig):
        if cfg.activation_dtype != torch.float8_e4m3fn:
            raise ValueError(f"unsupported int4 weight config {cfg}: fp8 activations only")
        return WeightQuant("fp8_int4", 4, cfg.group_size, divisor=8.0, eps=1e-6, lb=1e-12)
    raise ValueError(f"unsupported weight fake-quant config {type(cfg).__name__}")


def act_spec(cfg: Any) -> ActQuant:
    from torchao.quantization.granularity import PerRow, PerToken
    from torchao.quantization.qat.fake_quantize_config import Float8FakeQuantizeConfig, IntxFakeQuantizeConfig
    from torchao.quantization.quant_primitives import MappingType, ZeroPointDomain

    if isinstance(cfg, IntxFakeQuantizeConfig):
        ok = (cfg.dtype == torch.int8 and isinstance(cfg.granularity, PerToken)
              and cfg.mapping_type == MappingType.ASYMMETRIC and cfg.is_dynamic and not cfg.range_learning
              and cfg.zero_point_domain == ZeroPointDomain.INT)
        if not ok:
            raise ValueError(f"unsupported activation fake-quant config {cfg}: int8 asymmetric per token only")
        return ActQuant("int8_asym", cfg.eps, cfg.scale_precision)
    if isinstance(cfg, Float8FakeQuantizeConfig):
        if cfg.dtype != torch.float8_e4m3fn or not isinstance(cfg.granularity, PerRow):
            raise ValueError(f"unsupported fp8 activation config {cfg}: e4m3 per row only")
        return ActQuant("fp8", lb=cfg.hp_value_lb, ub=cfg.hp_value_ub)
    raise ValueError(f"unsupported activation fake-quant config {type(cfg).__name__}")


# --- references (forward only; see ``ste`` for gradients) ---------------------------------------------------------


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


def learned_scale(init_scale: torch.Tensor, log_scale: torch.Tensor, spec: WeightQuant,
                  dtype: torch.dtype) -> torch.Tensor:
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


def learned_fake_quant(w: torch.Tensor, log_scale: torch.Tensor, init_scale: torch.Tensor,
                       spec: WeightQuant) -> torch.Tensor:
    """fq(w) on the scales ``init_scale * exp(log_scale)``, differentiable in w and log_scale
    (:class:`LearnedScaleFakeQuant`)."""
    if spec.kind != "int":
        raise ValueError(f"learned scales are for integer grids, not {spec.kind!r}")
    return LearnedScaleFakeQuant.apply(w, log_scale, init_scale, spec)


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
