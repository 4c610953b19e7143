"""RMSNorm forward/backward in one pass each, with Gemma's (1 + w) variant.

Why by hand: transformers' RMSNorm is five to eight separate elementwise kernels (upcast, square, mean, rsqrt,
scale, cast, weight multiply), each a pass over the hidden states in fp32, and its backward is longer still. A norm
runs twice per layer (four times in Gemma3, plus per-head q/k norms in Qwen3/Gemma3), so fusing it into one read
and one write per direction is one of the cheapest wins in the step. The kernel keeps the per-row 1/rms (fp32) for
the backward instead of the normalised activations.

Numerics: everything in fp32, one rounding at the output. (Llama rounds x/rms to the input dtype before the weight
multiply; doing it in fp32 is at least as accurate and differs by bf16 rounding only.)
"""

from __future__ import annotations

import torch

from ._common import HAS_TRITON, grid_programs, needs_long_indexing, next_pow2, use_triton, warps_for

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _rms_norm_fwd_kernel(
        X,
        Y,
        W,
        RSTD,
        stride_x,
        stride_y,
        n_rows,
        n_cols,
        eps,
        w_offset,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        LONG_INDEXING: tl.constexpr,
    ):
        pid = tl.program_id(0)
        rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
        if LONG_INDEXING:
            rows = rows.to(tl.int64)
        cols = tl.arange(0, BLOCK_N)
        rmask = rows < n_rows
        cmask = cols < n_cols
        mask = rmask[:, None] & cmask[None, :]
        x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        rstd = tl.math.rsqrt(tl.sum(x * x, axis=1) / n_cols + eps)
        w = tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32) + w_offset
        y = x * rstd[:, None] * w[None, :]
        tl.store(Y + rows[:, None] * stride_y + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)
        tl.store(RSTD + rows, rstd, mask=rmask)

    @triton.jit
    def _rms_norm_bwd_kernel(
        DY,
        X,
        W,
        RSTD,
        DX,
        DW_PARTIAL,
        stride_dy,
        stride_x,
        stride_dx,
        n_rows,
        n_cols,
        w_offset,
        n_progs,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        COMPUTE_DW: tl.constexpr,
        LONG_INDEXING: tl.constexpr,
    ):
        # Persistent programs walk row tiles so the weight-gradient partial sums stay in registers:
        # one fp32 row of partials per program, reduced by torch afterwards.
        pid = tl.program_id(0)
        cols = tl.arange(0, BLOCK_N)
        cmask = cols < n_cols
        w = tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32) + w_offset
        dw_acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
        n_tiles = tl.cdiv(n_rows, BLOCK_M)
        for tile in range(pid, n_tiles, n_progs):
            rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
            if LONG_INDEXING:
                rows = rows.to(tl.int64)
            rmask = rows < n_rows
            mask = rmask[:, None] & cmask[None, :]
            x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(DY + rows[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            rstd = tl.load(RSTD + rows, mask=rmask, other=0.0)
            xhat = x * rstd[:, None]
            dyw = dy * w[None, :]
            # d/dx of x * rstd(x): rstd * (dyw - xhat * mean(dyw * xhat))
            c = tl.sum(dyw * xhat, axis=1) / n_cols
            dx = rstd[:, None] * (dyw - xhat * c[:, None])
            tl.store(DX + rows[:, None] * stride_dx + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
            if COMPUTE_DW:
                dw_acc += tl.sum(dy * xhat, axis=0)
        if COMPUTE_DW:
            tl.store(DW_PARTIAL + pid * n_cols + cols, dw_acc, mask=cmask)


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, offset: float = 0.0) -> torch.Tensor:
    """PyTorch reference: fp32 math, output in x's dtype (Gemma style) or promoted with the weight (Llama style)."""
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * (weight.float() + offset)
    return y.to(_out_dtype(x, weight, offset))


def _out_dtype(x: torch.Tensor, weight: torch.Tensor, offset: float) -> torch.dtype:
    # Mirrors transformers: Llama-style norms return `weight * x.to(input_dtype)` (type promotion with the
    # weight), Gemma-style norms cast back to the input dtype.
    return x.dtype if offset else torch.promote_types(x.dtype, weight.dtype)


def _tile(n_cols: int) -> tuple[int, int]:
    block_n = next_pow2(n_cols)
    block_m = max(1, min(64, 4096 // block_n))
    return block_m, block_n


class RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if x2.stride(-1) != 1:
            x2 = x2.contiguous()
        n_rows, n_cols = x2.shape
        # Allocate in the caller's shape so the output is not a view (in-place ops downstream, e.g. RoPE, need that).
        y_full = torch.empty(shape, dtype=_out_dtype(x, weight, offset), device=x.device)
        y = y_full.view(n_rows, n_cols)
        rstd = torch.empty(n_rows, dtype=torch.float32, device=x.device)
        block_m, block_n = _tile(n_cols)
        if n_rows:
            _rms_norm_fwd_kernel[(triton.cdiv(n_rows, block_m),)](
                x2,
                y,
                weight,
                rstd,
                x2.stride(0),
                y.stride(0),
                n_rows,
                n_cols,
                eps,
                offset,
                BLOCK_M=block_m,
                BLOCK_N=block_n,
                LONG_INDEXING=needs_long_indexing(x2, y),
                num_warps=warps_for(block_m * block_n),
            )
        ctx.save_for_backward(x2, weight, rstd)
        ctx.offset = offset
        ctx.x_dtype = x.dtype
        return y_full

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x2, weight, rstd = ctx.saved_tensors
        n_rows, n_cols = x2.shape
        dy2 = dy.reshape(-1, n_cols)
        if dy2.stride(-1) != 1:
            dy2 = dy2.contiguous()
        dx = torch.empty((n_rows, n_cols), dtype=ctx.x_dtype, device=x2.device)
        compute_dw = ctx.needs_input_grad[1]
        block_m, block_n = _tile(n_cols)
        n_progs = grid_programs(x2, triton.cdiv(n_rows, block_m) if n_rows else 1)
        dw_partial = torch.empty((n_progs, n_cols), dtype=torch.float32, device=x2.device) if compute_dw else rstd
        if n_rows:
            _rms_norm_bwd_kernel[(n_progs,)](
                dy2,
                x2,
                weight,
                rstd,
                dx,
                dw_partial,
                dy2.stride(0),
                x2.stride(0),
                dx.stride(0),
                n_rows,
                n_cols,
                ctx.offset,
                n_progs,
                BLOCK_M=block_m,
                BLOCK_N=block_n,
                COMPUTE_DW=compute_dw,
                LONG_INDEXING=needs_long_indexing(x2, dy2, dx),
                num_warps=warps_for(block_m * block_n),
            )
        elif compute_dw:
            dw_partial.zero_()
        dw = dw_partial.sum(0).to(weight.dtype) if compute_dw else None
        return dx.view(dy.shape), dw, None, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, offset: float = 0.0) -> torch.Tensor:
    """RMSNorm over the last dim: ``x / rms(x) * (weight + offset)``; ``offset=1.0`` is Gemma's (1 + w) form.

    Triton on CUDA (and under TRITON_INTERPRET=1); the PyTorch reference elsewhere.
    """
    if not use_triton(x):
        return rms_norm_reference(x, weight, eps, offset)
    return RMSNormFunction.apply(x, weight, float(eps), float(offset))
