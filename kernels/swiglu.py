"""SwiGLU, ``silu(gate) * up``, forward and backward in one elementwise pass each.

Why by hand: transformers runs SiLU, the multiply and (in backward) the sigmoid derivative as separate kernels over
the tokens x intermediate tensor, the largest activation of the layer. One fused pass per direction halves or
better the traffic. The backward can run in place (h into dh's buffer, dgate/dup into gate/up's), which the fast
LoRA MLP uses so that the backward allocates no extra intermediate-sized buffers.

Long context: offsets are int32 unless a tensor's extent reaches 2**31 elements, then the ``LONG_INDEXING``
constexpr compiles an int64 variant (short context pays nothing, long context cannot overflow).
"""

from __future__ import annotations

import torch

from ._common import HAS_TRITON, needs_long_indexing, next_pow2, use_triton

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _swiglu_fwd_kernel(
        G,
        U,
        H,
        stride_g,
        stride_u,
        stride_h,
        n_cols,
        BLOCK: tl.constexpr,
        LONG_INDEXING: tl.constexpr,
    ):
        row = tl.program_id(0)
        if LONG_INDEXING:
            row = row.to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < n_cols
        g = tl.load(G + row * stride_g + cols, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(U + row * stride_u + cols, mask=mask, other=0.0).to(tl.float32)
        h = g * tl.sigmoid(g) * u
        tl.store(H + row * stride_h + cols, h.to(H.dtype.element_ty), mask=mask)

    @triton.jit
    def _swiglu_bwd_kernel(
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
        sig = tl.sigmoid(g)
        silu = g * sig
        # d silu/dg = sig * (1 + g * (1 - sig))
        dg = dh * u * sig * (1.0 + g * (1.0 - sig))
        du = dh * silu
        # All loads happen before any store, so the outputs may alias the inputs (in-place backward).
        if STORE_H:
            tl.store(H_OUT + row * stride_ho + cols, (silu * u).to(H_OUT.dtype.element_ty), mask=mask)
        tl.store(DG + row * stride_dg + cols, dg.to(DG.dtype.element_ty), mask=mask)
        tl.store(DU + row * stride_du + cols, du.to(DU.dtype.element_ty), mask=mask)


def swiglu_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return (torch.nn.functional.silu(gate.float()) * up.float()).to(gate.dtype)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """A 2-D (rows, cols) view with unit column stride; copies only when no such view exists."""
    t2 = t.reshape(-1, t.shape[-1]) if t.dim() != 2 else t
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def _launch_grid(n_rows: int, n_cols: int) -> tuple[tuple[int, int], int]:
    block = min(2048, next_pow2(n_cols))
    return (n_rows, triton.cdiv(n_cols, block)), block


def swiglu_forward(gate: torch.Tensor, up: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """h = silu(gate) * up on (rows, cols) tensors of any row stride."""
    g, u = _rows(gate), _rows(up)
    h = out if out is not None else torch.empty(g.shape, dtype=gate.dtype, device=gate.device)
    if g.numel():
        grid, block = _launch_grid(*g.shape)
        _swiglu_fwd_kernel[grid](
            g,
            u,
            h,
            g.stride(0),
            u.stride(0),
            h.stride(0),
            g.shape[1],
            BLOCK=block,
            LONG_INDEXING=needs_long_indexing(g, u, h),
            num_warps=4 if block >= 1024 else 2,
        )
    return h


def swiglu_backward(
    dh: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, in_place: bool = False
) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """Returns (h, dgate, dup). ``in_place``: h overwrites dh, dgate overwrites gate, dup overwrites up."""
    dh2, g, u = _rows(dh), _rows(gate), _rows(up)
    if in_place:
        h_out, dg, du = dh2, g, u
    else:
        h_out, dg, du = None, torch.empty_like(g), torch.empty_like(u)
    if g.numel():
        grid, block = _launch_grid(*g.shape)
        _swiglu_bwd_kernel[grid](
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
            LONG_INDEXING=needs_long_indexing(dh2, g, u, dg, du),
            num_warps=4 if block >= 1024 else 2,
        )
    return h_out, dg, du


class SwiGLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        h = swiglu_forward(gate, up)
        ctx.save_for_backward(gate, up)
        return h.view(gate.shape)

    @staticmethod
    def backward(ctx, dh: torch.Tensor):
        gate, up = ctx.saved_tensors
        _, dg, du = swiglu_backward(dh, gate, up, in_place=False)
        return dg.view(gate.shape), du.view(up.shape)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` (fp32 math, one rounding). Inputs may be strided views, e.g. halves of a fused gate_up."""
    if not use_triton(gate):
        return swiglu_reference(gate, up)
    return SwiGLUFunction.apply(gate, up)
