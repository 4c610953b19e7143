"""Rotary position embedding applied to Q and K together, in place, in one kernel.

Why by hand: transformers' ``apply_rotary_pos_emb`` builds ``rotate_half`` copies with ``torch.cat`` and four
multiplies for each of Q and K: about ten passes and two new tensors per layer. Here one program handles one token:
it loads that token's cos/sin once and rotates every Q head and every K head in place, so Q and K are read and
written once, and the backward (rotation by -theta) is the same kernel with the sign of sin flipped.

cos/sin are computed once per step by the model (transformers' rotary module, which knows every RoPE scaling
variant) and shared by all layers. Two ways to address them:

- per token: ``cos``/``sin`` of shape (batch, seq, rot_dim) (or (1, seq, rot_dim), broadcast over the batch) as
  transformers produces them from ``position_ids``; packed sequences restart because their position_ids do.
- by position: a table ``cos``/``sin`` of shape (max_pos, rot_dim) plus ``position_ids`` (batch, seq); the kernel
  gathers row ``position_ids[b, s]``, so a table computed once serves every step and packed rows restart at 0.

Only the first half of the last dim of cos/sin is read: transformers' cos/sin are ``cat(freqs, freqs)``.
``rot_dim`` may be smaller than head_dim (partial rotary); the remaining dims pass through.
"""

from __future__ import annotations

import torch

from ._common import HAS_TRITON, needs_long_indexing, next_pow2, use_triton

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _rotate_heads(
        X,
        x_row_off,
        stride_head,
        n_heads,
        c,
        s,
        half,
        BLOCK_H: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        h = tl.arange(0, BLOCK_H)
        d = tl.arange(0, BLOCK_D)
        mask = (h < n_heads)[:, None] & (d < half)[None, :]
        p1 = X + x_row_off + h[:, None] * stride_head + d[None, :]
        x1 = tl.load(p1, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(p1 + half, mask=mask, other=0.0).to(tl.float32)
        tl.store(p1, (x1 * c[None, :] - x2 * s[None, :]).to(X.dtype.element_ty), mask=mask)
        tl.store(p1 + half, (x2 * c[None, :] + x1 * s[None, :]).to(X.dtype.element_ty), mask=mask)

    @triton.jit
    def _rope_kernel(
        Q,
        K,
        COS,
        SIN,
        POS,
        stride_q_row,
        stride_q_head,
        stride_k_row,
        stride_k_head,
        stride_c_b,
        stride_c_s,
        stride_s_b,
        stride_s_s,
        stride_pos_b,
        stride_pos_s,
        seq_len,
        n_q_heads,
        n_k_heads,
        half,
        HAS_POS: tl.constexpr,
        BACKWARD: tl.constexpr,
        BLOCK_HQ: tl.constexpr,
        BLOCK_HK: tl.constexpr,
        BLOCK_D: tl.constexpr,
        LONG_INDEXING: tl.constexpr,
    ):
        row = tl.program_id(0)
        if LONG_INDEXING:
            row = row.to(tl.int64)
        b = row // seq_len
        t = row % seq_len
        if HAS_POS:
            p = tl.load(POS + b * stride_pos_b + t * stride_pos_s).to(tl.int64)
            c_off = p * stride_c_s
            s_off = p * stride_s_s
        else:
            c_off = b * stride_c_b + t * stride_c_s
            s_off = b * stride_s_b + t * stride_s_s
        d = tl.arange(0, BLOCK_D)
        dmask = d < half
        c = tl.load(COS + c_off + d, mask=dmask, other=1.0).to(tl.float32)
        s = tl.load(SIN + s_off + d, mask=dmask, other=0.0).to(tl.float32)
        if BACKWARD:
            s = -s  # the inverse rotation is the transpose: rotate by -theta
        _rotate_heads(Q, row * stride_q_row, stride_q_head, n_q_heads, c, s, half, BLOCK_HQ, BLOCK_D)
        _rotate_heads(K, row * stride_k_row, stride_k_head, n_k_heads, c, s, half, BLOCK_HK, BLOCK_D)


def rope_reference(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, position_ids: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Out-of-place reference. q: (B, S, Hq, D), k: (B, S, Hk, D); cos/sin as in the module docstring."""
    if position_ids is not None:
        cos, sin = cos[position_ids], sin[position_ids]
    rot = cos.shape[-1]
    cos = cos.unsqueeze(2).float()
    sin = sin.unsqueeze(2).float()

    def apply(x: torch.Tensor) -> torch.Tensor:
        xr, xp = x[..., :rot].float(), x[..., rot:]
        x1, x2 = xr[..., : rot // 2], xr[..., rot // 2 :]
        out = xr * cos + torch.cat((-x2, x1), dim=-1) * sin
        return torch.cat((out.to(x.dtype), xp), dim=-1)

    return apply(q), apply(k)


def _rows3(x: torch.Tensor, head_dim: int) -> torch.Tensor:
    """(B, S, H, D), (B, S, H*D) or (B*S, H*D) -> a (B*S, H, D) view (the kernel addresses rows/heads by stride)."""
    if x.stride(-1) != 1:
        raise ValueError("rope: the last dim of q/k must be contiguous")
    rows = x.shape[0] if x.dim() == 2 else x.shape[0] * x.shape[1]
    return x.view(rows, -1, head_dim)


def _launch(q3, k3, qo3, ko3, B, S, cos, sin, position_ids, backward: bool) -> None:
    rot = cos.shape[-1]
    if rot % 2 or rot > q3.shape[-1]:
        raise ValueError(f"rope: rotary dim {rot} must be even and at most head_dim {q3.shape[-1]}")
    if position_ids is not None:
        pos = position_ids.expand(B, S) if position_ids.dim() == 2 else position_ids.view(B, S)
        c2, s2 = cos.reshape(-1, rot), sin.reshape(-1, rot)
    else:
        pos = None
        c2, s2 = cos.expand(B, S, rot), sin.expand(B, S, rot)
    if c2.stride(-1) != 1 or s2.stride(-1) != 1:
        c2, s2 = c2.contiguous(), s2.contiguous()
    if position_ids is not None:
        strides = (0, c2.stride(0), 0, s2.stride(0), pos.stride(0), pos.stride(1))
    else:
        strides = (c2.stride(0), c2.stride(1), s2.stride(0), s2.stride(1), 0, 0)
    half = rot // 2
    n_rows = B * S
    if n_rows == 0:
        return
    # Out of place: copy the pass-through dims and let the kernel overwrite the rotated ones.
    if qo3.data_ptr() != q3.data_ptr():
        qo3.copy_(q3)
    if ko3.data_ptr() != k3.data_ptr():
        ko3.copy_(k3)
    _rope_kernel[(n_rows,)](
        qo3,
        ko3,
        c2,
        s2,
        pos if pos is not None else c2,
        qo3.stride(0),
        qo3.stride(1),
        ko3.stride(0),
        ko3.stride(1),
        *strides,
        S,
        qo3.shape[1],
        ko3.shape[1],
        half,
        HAS_POS=position_ids is not None,
        BACKWARD=backward,
        BLOCK_HQ=next_pow2(qo3.shape[1]),
        BLOCK_HK=next_pow2(ko3.shape[1]),
        BLOCK_D=next_pow2(half),
        LONG_INDEXING=needs_long_indexing(qo3, ko3),
        num_warps=4 if next_pow2(qo3.shape[1]) * next_pow2(half) >= 2048 else 2,
    )


class RoPEFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, cos, sin, position_ids, head_dim: int, in_place: bool, seq_len: int):
        S = seq_len
        B = (q.shape[0] if q.dim() == 2 else q.shape[0] * q.shape[1]) // S
        q3, k3 = _rows3(q, head_dim), _rows3(k, head_dim)
        if in_place:
            qo, ko = q, k
        else:
            qo, ko = (
                torch.empty_like(q, memory_format=torch.contiguous_format),
                torch.empty_like(k, memory_format=torch.contiguous_format),
            )
        _launch(q3, k3, _rows3(qo, head_dim), _rows3(ko, head_dim), B, S, cos, sin, position_ids, backward=False)
        if in_place:
            ctx.mark_dirty(q, k)
        ctx.save_for_backward(cos, sin, position_ids)
        ctx.dims = (B, S, head_dim)
        return qo, ko

    @staticmethod
    def backward(ctx, dq, dk):
        cos, sin, position_ids = ctx.saved_tensors
        B, S, head_dim = ctx.dims
        # The incoming gradients are fresh tensors from the attention backward: rotate them in place when their
        # layout allows, else on a copy.
        dq = dq if _viewable(dq, head_dim) else dq.contiguous()
        dk = dk if _viewable(dk, head_dim) else dk.contiguous()
        dq3, dk3 = _rows3(dq, head_dim), _rows3(dk, head_dim)
        _launch(dq3, dk3, dq3, dk3, B, S, cos, sin, position_ids, backward=True)
        return dq, dk, None, None, None, None, None, None


def _viewable(x: torch.Tensor, head_dim: int) -> bool:
    if x.stride(-1) != 1:
        return False
    try:
        _rows3(x, head_dim)
        return True
    except RuntimeError:
        return False


def rope_(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    position_ids: torch.Tensor | None = None,
    head_dim: int | None = None,
    seq_len: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q and k; returns the rotated pair (autograd-aware).

    q: (B, S, Hq, D), (B, S, Hq*D) with ``head_dim``, or (B*S, Hq*D) with ``head_dim`` and ``seq_len``;
    k likewise. ``cos``/``sin``: (B or 1, S, rot_dim) per token,
    or (max_pos, rot_dim) tables with ``position_ids`` (B, S). Works in place when q and k own their storage (not
    views of another tensor, e.g. the separate outputs of q_proj and k_proj); views (slices of a fused qkv
    projection) are rotated out of place, because autograd cannot track in-place writes to two views at once.
    """
    head_dim = head_dim or q.shape[-1]
    if q.dim() == 2 and seq_len is None:
        raise ValueError("rope_: 2-D q/k need seq_len")
    seq_len = seq_len if q.dim() == 2 else q.shape[1]
    if not use_triton(q):
        rows = q.shape[0] if q.dim() == 2 else q.shape[0] * q.shape[1]
        q4 = q.reshape(rows // seq_len, seq_len, -1, head_dim)
        k4 = k.reshape(rows // seq_len, seq_len, -1, head_dim)
        q2, k2 = rope_reference(q4, k4, cos, sin, position_ids)
        return q2.view(q.shape), k2.view(k.shape)
    if not (_viewable(q, head_dim) and _viewable(k, head_dim)):
        raise ValueError("rope_: q and k must be viewable as (B*S, heads, head_dim) with a contiguous last dim")
    in_place = q._base is None and k._base is None
    if not in_place and not (q.requires_grad or k.requires_grad):
        in_place = True  # no autograd involved: views can be rotated in place too
    return RoPEFunction.apply(q, k, cos, sin, position_ids, head_dim, in_place, seq_len)
