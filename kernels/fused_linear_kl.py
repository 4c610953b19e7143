"""Chunked fused LM heads + distillation loss: T²·KL(teacher ‖ student) (and CE) without the tokens x vocab logits.

- A chunk of rows at a time: both heads' logits for the chunk, one Triton program per row for the online fp32
  log-sum-exps, the KL (as ``F.log_softmax`` would compute it) and the gradient of the declared mix
  ``kl_weight · T²·KL + ce_weight · CE`` (softcap included), then the gradient matmuls. Peak extra memory is one
  chunk of each model's logits; rows neither distilled nor labelled are dropped first.
- The gradient is computed in the forward, so the backward only scales it; incoming gradients not proportional
  to the declared mix raise instead of returning a wrong gradient.
- Equal to the materialised PyTorch computation (tests/kernels/test_fused_linear_kl.py).

How and why: docs/kernels.md.
"""

from __future__ import annotations

import torch

from ._common import HAS_TRITON, mm_fp32_out, next_pow2, use_triton
from .cross_entropy import IGNORE_INDEX, choose_chunk_rows

if HAS_TRITON:
    import triton
    import triton.language as tl

    from .cross_entropy import _softcap

    @triton.jit
    def _online_lse(m, s, x):
        """One online log-sum-exp step over a vector of lanes (lanes still at -inf contribute nothing; shifting by
        0 there avoids (-inf) - (-inf))."""
        m_new = tl.maximum(m, x)
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        return m_new, s * tl.exp(m - shift) + tl.exp(x - shift)

    @triton.jit
    def _lse_finish(m, s):
        m_row = tl.max(m, axis=0)
        s_row = tl.sum(s * tl.exp(tl.where(m == float("-inf"), float("-inf"), m - m_row)), axis=0)
        return m_row + tl.log(s_row)

    @triton.jit
    def _kl_fwd_bwd_kernel(
        S,
        T,
        LABELS,
        KLMASK,
        KL,
        CE,
        stride_s,
        stride_t,
        n_cols,
        ignore_index,
        inv_temp,
        temp,
        cap_s,
        cap_t,
        kl_weight,
        ce_weight,
        BLOCK: tl.constexpr,
        HAS_CAP_S: tl.constexpr,
        HAS_CAP_T: tl.constexpr,
        HAS_CE: tl.constexpr,
        NEED_LSE1: tl.constexpr,
        WRITE_GRAD: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)  # row * stride can pass 2**31 for large chunks x vocab
        s_base = S + row * stride_s
        t_base = T + row * stride_t
        is_kl = tl.load(KLMASK + row) != 0
        label = tl.load(LABELS + row).to(tl.int64)  # HAS_CE=False: a dummy row value, never used
        is_ce = label != ignore_index
        # Pass 1: online max / sum of exp for s/T, t/T (and s at T = 1), vectorised per lane.
        ms = tl.full((BLOCK,), float("-inf"), tl.float32)
        zs = tl.zeros((BLOCK,), tl.float32)
        mt = tl.full((BLOCK,), float("-inf"), tl.float32)
        zt = tl.zeros((BLOCK,), tl.float32)
        m1 = tl.full((BLOCK,), float("-inf"), tl.float32)
        z1 = tl.zeros((BLOCK,), tl.float32)
        for start in range(0, n_cols, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            cmask = cols < n_cols
            xs = _softcap(tl.load(s_base + cols, mask=cmask, other=0.0).to(tl.float32), cap_s, HAS_CAP_S)
            xt = _softcap(tl.load(t_base + cols, mask=cmask, other=0.0).to(tl.float32), cap_t, HAS_CAP_T)
            ms, zs = _online_lse(ms, zs, tl.where(cmask, xs * inv_temp, float("-inf")))
            mt, zt = _online_lse(mt, zt, tl.where(cmask, xt * inv_temp, float("-inf")))
            if NEED_LSE1:
                m1, z1 = _online_lse(m1, z1, tl.where(cmask, xs, float("-inf")))
        lse_s = _lse_finish(ms, zs)
        lse_t = _lse_finish(mt, zt)
        if NEED_LSE1:
            lse_1 = _lse_finish(m1, z1)
        else:
            lse_1 = lse_s  # T == 1 (or no CE: unused)
        if HAS_CE:  # the target logit, read before pass 2 overwrites it
            safe = tl.where(is_ce, label, 0)
            x_lab = _softcap(tl.load(s_base + safe).to(tl.float32), cap_s, HAS_CAP_S)
            tl.store(CE + row, tl.where(is_ce, lse_1 - x_lab, 0.0))
        # Pass 2: the KL elementwise (p · (log p - log q), as the reference), and the gradient of the mixed
        # objective wrt the raw student logits, written over them.
        kl_acc = tl.zeros((BLOCK,), tl.float32)
        g_kl = tl.where(is_kl, kl_weight * temp, 0.0)  # d(T²·KL)/d(s') = T · (q - p)
        g_ce = tl.where(is_ce, ce_weight, 0.0)  # d(CE)/d(s') = softmax(s') - one_hot
        for start in range(0, n_cols, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            cmask = cols < n_cols
            xs = _softcap(tl.load(s_base + cols, mask=cmask, other=0.0).to(tl.float32), cap_s, HAS_CAP_S)
            xt = _softcap(tl.load(t_base + cols, mask=cmask, other=0.0).to(tl.float32), cap_t, HAS_CAP_T)
            log_q = xs * inv_temp - lse_s
            log_p = xt * inv_temp - lse_t
            p = tl.exp(log_p)
            kl_acc += tl.where(cmask, p * (log_p - log_q), 0.0)
            if WRITE_GRAD:
                g = g_kl * (tl.exp(log_q) - p)
                if HAS_CE:
                    g += g_ce * (tl.exp(xs - lse_1) - tl.where(cols == label, 1.0, 0.0))
                if HAS_CAP_S:
                    c = xs / cap_s
                    g = g * (1.0 - c * c)
                tl.store(s_base + cols, g.to(S.dtype.element_ty), mask=cmask)
        tl.store(KL + row, tl.where(is_kl, tl.sum(kl_acc, axis=0) * (temp * temp), 0.0))


def _capped(logits: torch.Tensor, cap: float | None) -> torch.Tensor:
    return cap * torch.tanh(logits / cap) if cap else logits


def lm_head_kl_loss_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    labels: torch.Tensor | None = None,
    distill_mask: torch.Tensor | None = None,
    temperature: float = 1.0,
    softcap: float | None = None,
    teacher_softcap: float | None = None,
    ignore_index: int = IGNORE_INDEX,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Materialises both models' logits: (Σ T²·KL over the distilled rows, Σ CE over the labelled rows), fp32.

    Differentiable by autograd for any mix of the two sums (the fused version needs the mix declared)."""
    s = _capped((hidden @ weight.t()).float(), softcap)
    with torch.no_grad():
        t = _capped((teacher_hidden @ teacher_weight.t()).float(), teacher_softcap)
    mask = torch.ones(s.shape[0], dtype=torch.bool, device=s.device) if distill_mask is None else distill_mask.bool()
    lt = torch.nn.functional.log_softmax(t[mask] / temperature, dim=-1)
    ls = torch.nn.functional.log_softmax(s[mask] / temperature, dim=-1)
    kl = (lt.exp() * (lt - ls)).sum() * temperature**2
    if labels is None:
        ce = s.new_zeros(())
    else:
        ce = torch.nn.functional.cross_entropy(s, labels, ignore_index=ignore_index, reduction="sum")
    return kl, ce


class LMHeadKLFunction(torch.autograd.Function):
    """(kl_sum, ce_sum) with the gradient of ``kl_weight·kl_sum + ce_weight·ce_sum`` computed in the forward."""

    @staticmethod
    def forward(
        ctx,
        hidden,
        weight,
        teacher_hidden,
        teacher_weight,
        labels,
        distill_mask,
        temperature,
        softcap,
        teacher_softcap,
        kl_weight,
        ce_weight,
        ignore_index,
        chunk_rows,
    ):
        n, d = hidden.shape
        v = weight.shape[0]
        need_dh = ctx.needs_input_grad[0]
        need_dw = ctx.needs_input_grad[1]
        dev = hidden.device
        kl_mask = (
            torch.ones(n, dtype=torch.bool, device=dev)
            if distill_mask is None
            else distill_mask.to(device=dev, dtype=torch.bool)
        )
        has_ce = labels is not None
        rows_used = kl_mask | (labels != ignore_index) if has_ce else kl_mask
        # Dropping unused rows needs their count on the host: one sync per call, paid back by the skipped matmuls.
        keep = rows_used.nonzero().squeeze(1)
        n_keep = int(keep.numel())
        full = n_keep == n

        def rows(t):
            return t if full else t.index_select(0, keep)

        hid, thid, klm = rows(hidden), rows(teacher_hidden), rows(kl_mask).to(torch.int8)
        lab = rows(labels).contiguous() if has_ce else klm  # a dummy pointer when there is no CE
        if hid.stride(-1) != 1:
            hid = hid.contiguous()
        if thid.stride(-1) != 1:
            thid = thid.contiguous()
        w = weight if weight.dtype == hid.dtype else weight.to(hid.dtype)
        wt = teacher_weight if teacher_weight.dtype == thid.dtype else teacher_weight.to(thid.dtype)
        kl_rows = torch.empty(n_keep, dtype=torch.float32, device=dev)
        ce_rows = torch.empty(n_keep if has_ce else 0, dtype=torch.float32, device=dev)
        write_grad = need_dh or need_dw
        dh = torch.empty_like(hid) if need_dh else None
        dw = torch.zeros((v, d), dtype=torch.float32, device=dev) if need_dw else None
        # two logit chunks live at once (student's, teacher's): both come out of the chunk budget
        step = chunk_rows or choose_chunk_rows(n_keep, v, hid.element_size() + thid.element_size(), dev)
        block = min(4096 if hidden.is_cuda else 1024, next_pow2(v))
        temp = float(temperature)
        for start in range(0, n_keep, step):
            end = min(start + step, n_keep)
            h_c = hid[start:end]
            s = h_c @ w.t()  # (chunk, vocab) in the activation dtype, fp32 accumulation inside the matmul
            with torch.no_grad():
                t = thid[start:end] @ wt.t()
            _kl_fwd_bwd_kernel[(end - start,)](
                s,
                t,
                lab[start:end],
                klm[start:end],
                kl_rows[start:end],
                ce_rows[start:end] if has_ce else kl_rows,
                s.stride(0),
                t.stride(0),
                v,
                ignore_index,
                1.0 / temp,
                temp,
                float(softcap) if softcap else 1.0,
                float(teacher_softcap) if teacher_softcap else 1.0,
                float(kl_weight),
                float(ce_weight),
                BLOCK=block,
                HAS_CAP_S=bool(softcap),
                HAS_CAP_T=bool(teacher_softcap),
                HAS_CE=has_ce,
                NEED_LSE1=has_ce and temp != 1.0,
                WRITE_GRAD=write_grad,
                num_warps=8 if block >= 2048 else 4,
            )
            del t
            if need_dh:
                torch.mm(s, w, out=dh[start:end])
            if need_dw:
                dw += mm_fp32_out(s.t(), h_c)
            del s
        kl = kl_rows.sum()
        ce = ce_rows.sum() if has_ce else kl_rows.new_zeros(())
        if need_dh and not full:
            dh_full = torch.zeros_like(hidden)
            dh_full.index_copy_(0, keep, dh)
            dh = dh_full
        ctx.save_for_backward(dh, dw)
        ctx.w_dtype = weight.dtype
        ctx.mix = (float(kl_weight), float(ce_weight))
        return kl, ce

    @staticmethod
    def backward(ctx, g_kl, g_ce):
        dh, dw = ctx.saved_tensors
        if dh is None and dw is None:
            return (None,) * 13
        a, b = ctx.mix
        gk = g_kl if g_kl is not None else torch.zeros((), device=(dh if dh is not None else dw).device)
        gc = g_ce if g_ce is not None else torch.zeros_like(gk)
        # the scale of the declared mix that autograd asks for: exact when (g_kl, g_ce) = c·(a, b)
        c = (gk.float() * a + gc.float() * b) / (a * a + b * b)
        gk_h, gc_h, c_h = torch.stack([gk.float(), gc.float(), c]).tolist()  # one sync per micro-batch
        if abs(gk_h - c_h * a) > 1e-5 * abs(gk_h) + 1e-30 or abs(gc_h - c_h * b) > 1e-5 * abs(gc_h) + 1e-30:
            raise RuntimeError(
                f"lm_head_kl_loss: the incoming gradients (kl {gk_h:.6g}, ce {gc_h:.6g}) are not proportional to "
                f"the mix declared in the forward (kl_weight {a:.6g}, ce_weight {b:.6g}); declare the weights the "
                "loss is used with"
            )
        dh_out = dh * c.to(dh.dtype) if dh is not None else None
        dw_out = (dw * c).to(ctx.w_dtype) if dw is not None else None
        return dh_out, dw_out, *(None,) * 11


def lm_head_kl_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    labels: torch.Tensor | None = None,
    distill_mask: torch.Tensor | None = None,
    temperature: float = 1.0,
    softcap: float | None = None,
    teacher_softcap: float | None = None,
    kl_weight: float = 1.0,
    ce_weight: float = 0.0,
    ignore_index: int = IGNORE_INDEX,
    chunk_rows: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed distillation KL and CE of ``hidden @ weight.T`` against ``teacher_hidden @ teacher_weight.T``,
    without materialising either model's logits.

    hidden: (N, D) student final hidden states (after the final norm, and after a QAT head's activation fake
    quantizer); weight: (V, D) student head, possibly fake-quantized (autograd flows through it) and trained;
    teacher_hidden: (N, Dt) and teacher_weight: (V, Dt): the teacher's, no gradient; labels: (N,) next-token labels
    (``ignore_index`` ignored) or None for no CE; distill_mask: (N,) bool, the rows whose KL is summed (None: all);
    softcap / teacher_softcap: Gemma-style final logit softcapping of each model.

    Returns (kl_sum, ce_sum), fp32 scalars: Σ T²·KL(softmax(t/T) ‖ softmax(s/T)) over the distilled rows and Σ CE
    over the labelled rows (0 without labels). Differentiable for objectives ``c · (kl_weight·kl_sum +
    ce_weight·ce_sum)`` for any c (e.g. the window normalisation): the forward computes that mix's gradient (see
    the module docstring); any other combination of the two outputs raises in backward. On CPU without Triton's
    interpreter, the materialising reference (any combination allowed).
    """
    if hidden.dim() != 2 or teacher_hidden.dim() != 2 or hidden.shape[0] != teacher_hidden.shape[0]:
        raise ValueError(
            f"lm_head_kl_loss: expected hidden (N, D) and teacher_hidden (N, Dt), got "
            f"{tuple(hidden.shape)} and {tuple(teacher_hidden.shape)}"
        )
    if weight.shape[0] != teacher_weight.shape[0]:
        raise ValueError(
            f"lm_head_kl_loss: student and teacher vocabularies differ ({weight.shape[0]} vs {teacher_weight.shape[0]})"
        )
    for name, t in (("labels", labels), ("distill_mask", distill_mask)):
        if t is not None and t.shape != (hidden.shape[0],):
            raise ValueError(f"lm_head_kl_loss: {name} must be ({hidden.shape[0]},), got {tuple(t.shape)}")
    if temperature <= 0:
        raise ValueError(f"lm_head_kl_loss: temperature must be positive, not {temperature}")
    if kl_weight < 0 or ce_weight < 0 or kl_weight + ce_weight == 0:
        raise ValueError(f"lm_head_kl_loss: weights must be >= 0 and not both 0 ({kl_weight}, {ce_weight})")
    teacher_hidden, teacher_weight = teacher_hidden.detach(), teacher_weight.detach()
    if not use_triton(hidden):
        return lm_head_kl_loss_reference(
            hidden,
            weight,
            teacher_hidden,
            teacher_weight,
            labels,
            distill_mask,
            temperature,
            softcap,
            teacher_softcap,
            ignore_index,
        )
    return LMHeadKLFunction.apply(
        hidden,
        weight,
        teacher_hidden,
        teacher_weight,
        labels,
        distill_mask,
        temperature,
        softcap,
        teacher_softcap,
        kl_weight,
        ce_weight,
        ignore_index,
        chunk_rows,
    )
