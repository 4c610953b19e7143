"""Chunked fused linear + cross-entropy: the LM head and the loss without the tokens x vocab logits.

Why by hand: with a 128k-152k vocabulary, transformers materialises bf16 logits for every token, upcasts them to
fp32 and keeps softmax-sized buffers for the backward: 8192 tokens x 152k vocab is 5 GB per fp32 copy, most of a
fine-tuning step's peak memory. Here the rows are processed a chunk at a time: logits for the chunk (one matmul),
one Triton pass that computes max/log-sum-exp in fp32 and then overwrites the logits with the gradient of the
summed loss (softmax - one_hot), and two matmuls that turn that gradient into dL/dhidden (and dL/dweight when the
head is trained). The gradients are computed in the forward, so the backward only scales them by the incoming
gradient; peak extra memory is one chunk of logits.

Rows whose label is ``ignore_index`` (-100) are dropped before the matmul (prompt tokens under SFT masking cost
nothing). The function returns the summed loss (fp32) and the number of target tokens, so a training loop can
normalise over a whole gradient-accumulation window. Optional logit softcapping ``cap * tanh(logits / cap)``
(Gemma) is applied inside the kernel, derivative included.

The chunk size is chosen at run time from free device memory (a fraction of it, capped so that a large card does
not turn the saving back into a large buffer).
"""

from __future__ import annotations

import torch

from ._common import HAS_TRITON, mm_fp32_out, next_pow2, use_triton

IGNORE_INDEX = -100
# Upper bound for one chunk of logits; beyond this a larger chunk buys no matmul efficiency.
MAX_CHUNK_BYTES = 512 * 2**20
MIN_CHUNK_ROWS = 64

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _softcap(x, cap, HAS_SOFTCAP: tl.constexpr):
        if HAS_SOFTCAP:
            # cap * tanh(x / cap), tanh via sigmoid (tl has no tanh on every supported version)
            return cap * (2.0 * tl.sigmoid(2.0 * x / cap) - 1.0)
        return x

    @triton.jit
    def _ce_fwd_bwd_kernel(
        LOGITS,
        LABELS,
        LOSS,
        stride_row,
        n_cols,
        ignore_index,
        softcap,
        BLOCK: tl.constexpr,
        HAS_SOFTCAP: tl.constexpr,
        WRITE_GRAD: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)  # row * stride can pass 2**31 for large chunks x vocab
        base = LOGITS + row * stride_row
        label = tl.load(LABELS + row).to(tl.int64)
        valid = label != ignore_index
        # Pass 1: online max and sum of exp, vectorised per lane, combined at the end.
        m = tl.full((BLOCK,), float("-inf"), tl.float32)
        s = tl.zeros((BLOCK,), tl.float32)
        for start in range(0, n_cols, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            x = tl.load(base + cols, mask=cols < n_cols, other=float("-inf")).to(tl.float32)
            x = _softcap(x, softcap, HAS_SOFTCAP)
            m_new = tl.maximum(m, x)
            # lanes still at -inf contribute nothing; avoid (-inf) - (-inf)
            s = s * tl.exp(tl.where(m_new == float("-inf"), 0.0, m - m_new)) + tl.where(
                x == float("-inf"), 0.0, tl.exp(x - m_new)
            )
            m = m_new
        m_row = tl.max(m, axis=0)
        s_row = tl.sum(s * tl.exp(tl.where(m == float("-inf"), float("-inf"), m - m_row)), axis=0)
        lse = m_row + tl.log(s_row)
        safe_label = tl.where(valid, label, 0)
        x_t = _softcap(tl.load(base + safe_label).to(tl.float32), softcap, HAS_SOFTCAP)
        loss = tl.where(valid, lse - x_t, 0.0)
        tl.store(LOSS + row, loss)
        if WRITE_GRAD:
            # Pass 2: overwrite logits with d(loss_row)/d(logits) = softmax - one_hot (x dsoftcap/dx).
            for start in range(0, n_cols, BLOCK):
                cols = start + tl.arange(0, BLOCK)
                cmask = cols < n_cols
                raw = tl.load(base + cols, mask=cmask, other=0.0).to(tl.float32)
                x = _softcap(raw, softcap, HAS_SOFTCAP)
                g = tl.exp(x - lse) - tl.where(cols == label, 1.0, 0.0)
                if HAS_SOFTCAP:
                    t = x / softcap
                    g = g * (1.0 - t * t)
                g = tl.where(valid, g, 0.0)
                tl.store(base + cols, g.to(LOGITS.dtype.element_ty), mask=cmask)


def lm_head_loss_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    softcap: float | None = None,
    ignore_index: int = IGNORE_INDEX,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Materialises the logits: (sum of token losses in fp32, number of target tokens)."""
    logits = (hidden @ weight.t()).float()
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    loss = torch.nn.functional.cross_entropy(logits, labels, ignore_index=ignore_index, reduction="sum")
    return loss, (labels != ignore_index).sum()


def choose_chunk_rows(n_rows: int, vocab: int, elem_bytes: int, device: torch.device) -> int:
    """Rows per chunk: a quarter of free device memory, at most MAX_CHUNK_BYTES of logits, a multiple of 64."""
    budget = MAX_CHUNK_BYTES
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        budget = min(budget, free // 4)
    else:
        budget = min(budget, 64 * 2**20)  # CPU: the interpreter/reference path; keep chunks modest
    rows = budget // max(1, vocab * elem_bytes)
    rows = max(MIN_CHUNK_ROWS, rows // MIN_CHUNK_ROWS * MIN_CHUNK_ROWS)
    return int(min(rows, max(n_rows, 1)))


class LMHeadLossFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, softcap, ignore_index, chunk_rows):
        n, h = hidden.shape
        v = weight.shape[0]
        need_dh = ctx.needs_input_grad[0]
        need_dw = ctx.needs_input_grad[1]
        # Dropping ignored rows needs their count on the host: one sync per call, paid back by the skipped matmuls.
        keep = (labels != ignore_index).nonzero().squeeze(1)
        n_keep = int(keep.numel())
        hid = hidden if n_keep == n else hidden.index_select(0, keep)
        lab = labels if n_keep == n else labels.index_select(0, keep)
        if hid.stride(-1) != 1:
            hid = hid.contiguous()
        w = weight if weight.dtype == hid.dtype else weight.to(hid.dtype)
        loss_rows = torch.empty(n_keep, dtype=torch.float32, device=hidden.device)
        dh = torch.empty_like(hid) if need_dh else None
        dw = torch.zeros((v, h), dtype=torch.float32, device=hidden.device) if need_dw else None
        rows = chunk_rows or choose_chunk_rows(n_keep, v, hid.element_size(), hidden.device)
        block = min(8192 if hidden.is_cuda else 1024, next_pow2(v))
        for start in range(0, n_keep, rows):
            end = min(start + rows, n_keep)
            h_c = hid[start:end]
            logits = h_c @ w.t()  # (chunk, vocab) in the activation dtype, fp32 accumulation inside the matmul
            _ce_fwd_bwd_kernel[(end - start,)](
                logits,
                lab[start:end],
                loss_rows[start:end],
                logits.stride(0),
                v,
                ignore_index,
                float(softcap) if softcap is not None else 1.0,
                BLOCK=block,
                HAS_SOFTCAP=softcap is not None,
                WRITE_GRAD=need_dh or need_dw,
                num_warps=16 if block >= 8192 else 8,
            )
            if need_dh:
                torch.mm(logits, w, out=dh[start:end])
            if need_dw:
                dw += mm_fp32_out(logits.t(), h_c)
            del logits
        loss = loss_rows.sum()
        if need_dh and n_keep != n:
            dh_full = torch.zeros_like(hidden)
            dh_full.index_copy_(0, keep, dh)
            dh = dh_full
        ctx.save_for_backward(dh, dw)
        ctx.w_dtype = weight.dtype
        count = torch.tensor(n_keep, device=hidden.device)
        ctx.mark_non_differentiable(count)
        return loss, count

    @staticmethod
    def backward(ctx, g_loss, g_count):
        dh, dw = ctx.saved_tensors
        dh_out = dh * g_loss.to(dh.dtype) if dh is not None else None
        dw_out = (dw * g_loss).to(ctx.w_dtype) if dw is not None else None
        return dh_out, dw_out, None, None, None, None


def lm_head_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    softcap: float | None = None,
    ignore_index: int = IGNORE_INDEX,
    chunk_rows: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed cross-entropy of ``hidden @ weight.T`` against ``labels`` without materialising all logits.

    hidden: (N, H) final hidden states (after the final norm); weight: (V, H) LM head (tied embeddings too);
    labels: (N,) already shifted for next-token prediction, ``ignore_index`` (-100) ignored; softcap: Gemma-style
    final logit softcapping. Returns (loss_sum: fp32 scalar, n_targets: int64 scalar), both on hidden's device;
    divide the sum by the target count of the whole accumulation window.
    """
    if hidden.dim() != 2 or labels.dim() != 1 or hidden.shape[0] != labels.shape[0]:
        raise ValueError(
            f"lm_head_loss: expected hidden (N, H) and labels (N,), got {tuple(hidden.shape)} and {tuple(labels.shape)}"
        )
    if not use_triton(hidden):
        return lm_head_loss_reference(hidden, weight, labels, softcap, ignore_index)
    return LMHeadLossFunction.apply(hidden, weight, labels, softcap, ignore_index, chunk_rows)
