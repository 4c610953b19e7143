"""GeGLU, ``gelu(gate) * up`` with exact (erf) or tanh-approximated GELU, forward and backward fused.

Why by hand: the same reason as SwiGLU (swiglu.py): transformers runs the activation, its derivative and the multiply
as separate passes over the tokens x intermediate tensor. Gemma3 uses the tanh form (``gelu_pytorch_tanh``); the
exact form is HF's ``gelu``. ``APPROX_TANH`` is a constexpr, so each form compiles to its own kernel. Same
``LONG_INDEXING`` switch and in-place backward as swiglu.py.
"""

from __future__ import annotations

import torch

from ._common import HAS_TRITON, needs_long_indexing, next_pow2, use_triton

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _gelu_and_grad(g, APPROX_TANH: tl.constexpr):
        # Returns gelu(g) and its derivative, fp32. tanh(z) = 2 * sigmoid(2z) - 1 (tl has no tanh on all versions).
        if APPROX_TANH:
            k0 = 0.7978845608028654  # sqrt(2 / pi)
            inner = k0 * (g + 0.044715 * g * g * g)
            t = 2.0 * tl.sigmoid(2.0 * inner) - 1.0
            act = 0.5 * g * (1.0 + t)
            dact = 0.5 * (1.0 + t) + 0.5 * g * (1.0 - t * t) * k0 * (1.0 + 3.0 * 0.044715 * g * g)
        else:
            cdf = 0.5 * (1.0 + tl.math.erf(g * 0.7071067811865476))
            act = g * cdf
            dact = cdf + g * 0.3989422804014327 * tl.exp(-0.5 * g * g)  # pdf = exp(-g^2/2) / sqrt(2 pi)
        return act, dact

    @triton.jit
    def _geglu_fwd_kernel(
        G,
        U,
        H,
        stride_g,
        stride_u,
        stride_h,
        n_cols,
        BLOCK: tl.constexpr,
        APPROX_TANH: tl.constexpr,
        LONG_INDEXING: tl.constexpr,
    ):
        row = tl.program_id(0)
        if LONG_INDEXING:
            row = row.to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < n_cols
        g = tl.load(G + row * stride_g + cols, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(U + row * stride_u + cols, mask=mask, other=0.0).to(tl.float32)
        act, _ = _gelu_and_grad(g, APPROX_TANH)
        h = act * u
        tl.store(H + row * stride_h + cols, h.to(H.dtype.element_ty), mask=mask)

    @triton.jit
    def _geglu_bwd_kernel(
        DH,
        G,
        U,
        H_OUT,
        DG,
        DU,
        stride_dh,
        stride_g,
        stride_u,
        stride_ho,
        stride_dg,
        stride_du,
        n_cols,
        BLOCK: tl.constexpr,
        STORE_H: tl.constexpr,
        APPROX_TANH: tl.constexpr,
        LONG_INDEXING: tl.constexpr,
    ):
        row = tl.program_id(0)
        if LONG_INDEXING:
            row = row.to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < n_cols
        dh = tl.load(DH + row * stride_dh + cols, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(G + row * stride_g + cols, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(U + row * stride_u + cols, mask=mask, other=0.0).to(tl.float32)
        act, dact = _gelu_and_grad(g, APPROX_TANH)
        dg = dh * u * dact
        du = dh * act
        # All loads happen before any store, so the outputs may alias the inputs (in-place backward).
        if STORE_H:
            tl.store(H_OUT + row * stride_ho + cols, (act * u).to(H_OUT.dtype.element_ty), mask=mask)
        tl.store(DG + row * stride_dg + cols, dg.to(DG.dtype.element_ty), mask=mask)
        tl.store(DU + row * stride_du + cols, du.to(DU.dtype.element_ty), mask=mask)


def geglu_reference(gate: torch.Tensor, up: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    return (torch.nn.functional.gelu(gate.float(), approximate=approximate) * up.float()).to(gate.dtype)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """A 2-D (rows, cols) view with unit column stride; copies only when no such view exists."""
    t2 = t.reshape(-1, t.shape[-1]) if t.dim() != 2 else t
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def _launch_grid(n_rows: int, n_cols: int) -> tuple[tuple[int, int], int]:
    block = min(2048, next_pow2(n_cols))
    return (n_rows, triton.cdiv(n_cols, block)), block


def geglu_forward(
    gate: torch.Tensor, up: torch.Tensor, out: torch.Tensor | None = None, approximate: str = "none"
) -> torch.Tensor:
    """h = gelu(gate) * up on (rows, cols) tensors of any row stride."""
    g, u = _rows(gate), _rows(up)
    h = out if out is not None else torch.empty(g.shape, dtype=gate.dtype, device=gate.device)
    if g.numel():
        grid, block = _launch_grid(*g.shape)
        _geglu_fwd_kernel[grid](
            g,
            u,
            h,
            g.stride(0),
            u.stride(0),
            h.stride(0),
            g.shape[1],
            BLOCK=block,
            APPROX_TANH=_tanh(approximate),
            LONG_INDEXING=needs_long_indexing(g, u, h),
            num_warps=4 if block >= 1024 else 2,
        )
    return h


def geglu_backward(
    dh: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, in_place: bool = False, approximate: str = "none"
) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """Returns (h, dgate, dup). ``in_place``: h overwrites dh, dgate overwrites gate, dup overwrites up."""
    dh2, g, u = _rows(dh), _rows(gate), _rows(up)
    if in_place:
        h_out, dg, du = dh2, g, u
    else:
        h_out, dg, du = None, torch.empty_like(g), torch.empty_like(u)
    if g.numel():
        grid, block = _launch_grid(*g.shape)
        _geglu_bwd_kernel[grid](
            dh2,
            g,
            u,
            h_out if h_out is not None else dg,
            dg,
            du,
            dh2.stride(0),
            g.stride(0),
            u.stride(0),
            (h_out if h_out is not None else dg).stride(0),
            dg.stride(0),
            du.stride(0),
            g.shape[1],
            BLOCK=block,
            STORE_H=h_out is not None,
            APPROX_TANH=_tanh(approximate),
            LONG_INDEXING=needs_long_indexing(dh2, g, u, dg, du),
            num_warps=4 if block >= 1024 else 2,
        )
    return h_out, dg, du


class GeGLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor, approximate: str) -> torch.Tensor:
        h = geglu_forward(gate, up, approximate=approximate)
        ctx.save_for_backward(gate, up)
        ctx.approximate = approximate
        return h.view(gate.shape)

    @staticmethod
    def backward(ctx, dh: torch.Tensor):
        gate, up = ctx.saved_tensors
        _, dg, du = geglu_backward(dh, gate, up, in_place=False, approximate=ctx.approximate)
        return dg.view(gate.shape), du.view(up.shape), None


def _tanh(approximate: str) -> bool:
    if approximate not in ("none", "tanh"):
        raise ValueError(f"approximate must be 'none' or 'tanh', got {approximate!r}")
    return approximate == "tanh"


def geglu(gate: torch.Tensor, up: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    """``gelu(gate, approximate) * up`` (fp32 math, one rounding); ``approximate`` is 'none' (erf) or 'tanh'."""
    _tanh(approximate)
    if not use_triton(gate):
        return geglu_reference(gate, up, approximate)
    return GeGLUFunction.apply(gate, up, approximate)
