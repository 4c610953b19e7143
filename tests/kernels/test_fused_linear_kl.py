"""Chunked fused LM heads + distillation KL/CE: loss and gradients (hidden, trained or fake-quantized head) equal the
materialising PyTorch reference (F.log_softmax, autograd in fp64), over ragged chunks, temperatures, softcaps and
KL/CE mixes; the declared mix is enforced in backward; a window of micro-batches normalises exactly."""

import pytest
import torch

from edgeft.kernels._common import use_triton
from edgeft.kernels.fused_linear_kl import lm_head_kl_loss, lm_head_kl_loss_reference

from .conftest import TOL, assert_close, rel_err

CASES = [  # N, D, Dt, V, chunk_rows
    (1, 8, 8, 77, None),  # single row, vocab under one block
    (37, 24, 20, 1000, 16),  # several chunks, a short last one; teacher of another width
    (20, 17, 32, 3001, 7),  # odd widths, vocab past two blocks (1024 in the interpreter), ragged chunks
]


def _inputs(n, d, dt, v, dtype=torch.float32, train_head=True, spread=3.0):
    h = torch.randn(n, d).to(dtype).requires_grad_()
    w = (torch.randn(v, d) * spread / d**0.5).to(dtype).requires_grad_(train_head)
    ht = torch.randn(n, dt).to(dtype)
    wt = (torch.randn(v, dt) * spread / dt**0.5).to(dtype)
    labels = torch.randint(0, v, (n,))
    labels[1::3] = -100
    mask = torch.rand(n) > 0.3
    if n > 1:
        mask[2::3] = True  # some rows only distilled, some only labelled, some both, some neither
        mask[3::4] = False
        labels[4::4] = -100
    return h, w, ht, wt, labels, mask


def _run(fn, h, w, ht, wt, labels, mask, temp, cap, kl_w, ce_w, **kw):
    """fn's (kl, ce) and the gradients of 0.37 · (kl_w·kl + ce_w·ce): a non-unit scale as a window's 1/N gives."""
    kl, ce = fn(h, w, ht, wt, labels, mask, temp, cap, cap, **kw)
    obj = 0.37 * (kl * kl_w + ce * ce_w)
    grads = torch.autograd.grad(obj, [t for t in (h, w) if t.requires_grad])
    return kl, ce, grads


def _reference(h, w, ht, wt, labels, mask, temp, cap, kl_w, ce_w):
    h64 = h.detach().double().requires_grad_()
    w64 = w.detach().double().requires_grad_(w.requires_grad)
    return _run(lm_head_kl_loss_reference, h64, w64, ht.double(), wt.double(), labels, mask, temp, cap, kl_w, ce_w)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("temp,cap", [(1.0, None), (2.0, None), (0.5, 30.0), (1.0, 2.0)])
@pytest.mark.parametrize("w", [1.0, 0.5, 0.0])
@pytest.mark.parametrize("train_head", [False, True])
def test_fused_kl_matches_reference(case, temp, cap, w, train_head):
    n, d, dt, v, chunk = case
    h, wgt, ht, wt, labels, mask = _inputs(n, d, dt, v, train_head=train_head)
    kl, ce, grads = _run(
        lm_head_kl_loss,
        h,
        wgt,
        ht,
        wt,
        labels,
        mask,
        temp,
        cap,
        w,
        1 - w,
        kl_weight=w,
        ce_weight=1 - w,
        chunk_rows=chunk,
    )
    kl64, ce64, grads64 = _reference(h, wgt, ht, wt, labels, mask, temp, cap, w, 1 - w)
    assert kl.dtype == ce.dtype == torch.float32 and kl.dim() == ce.dim() == 0
    assert_close(kl, kl64, torch.float32)
    assert_close(ce, ce64, torch.float32)
    assert len(grads) == len(grads64) == (2 if train_head else 1)
    for g, g64 in zip(grads, grads64):
        assert_close(g, g64, torch.float32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_activations(dtype):
    h, w, ht, wt, labels, mask = _inputs(33, 32, 16, 2000, dtype)
    kl, ce, grads = _run(
        lm_head_kl_loss, h, w, ht, wt, labels, mask, 2.0, None, 0.5, 0.5, kl_weight=0.5, ce_weight=0.5, chunk_rows=8
    )
    kl64, ce64, grads64 = _reference(h, w, ht, wt, labels, mask, 2.0, None, 0.5, 0.5)
    assert_close(kl, kl64, dtype)
    assert_close(ce, ce64, dtype)
    for g, g64 in zip(grads, grads64):
        assert_close(g, g64, dtype)


def test_fake_quantized_head_passes_gradients_to_its_parameter():
    """The student's head as QAT uses it: a straight-through fake quantization of a trained parameter."""
    h, p, ht, wt, labels, mask = _inputs(21, 16, 16, 600)

    def fq(x):
        return x + (torch.round(x * 16) / 16 - x).detach()

    def fused(h_, w_, *rest):
        return lm_head_kl_loss(h_, fq(w_), *rest, kl_weight=1.0, ce_weight=0.25, chunk_rows=5)

    def ref(h_, w_, *rest):
        return lm_head_kl_loss_reference(h_, fq(w_), *rest)

    kl, ce, grads = _run(fused, h, p, ht, wt, labels, mask, 1.0, None, 1.0, 0.25)
    h64, p64 = h.detach().double().requires_grad_(), p.detach().double().requires_grad_()
    kl64, ce64, grads64 = _run(ref, h64, p64, ht.double(), wt.double(), labels, mask, 1.0, None, 1.0, 0.25)
    assert_close(kl, kl64, torch.float32)
    for g, g64 in zip(grads, grads64):
        assert_close(g, g64, torch.float32)


def test_window_of_micro_batches_normalises_exactly():
    """Two micro-batches, each declaring the window's mix (w/N_pos, (1-w)/N_targets): the accumulated gradient is
    that of the window objective, as Distillation.objective builds it."""
    h, w, ht, wt, labels, mask = _inputs(30, 16, 12, 500)
    wd = 0.5
    n_pos, n_t = int(mask.sum()), int((labels != -100).sum())
    a, b = wd / n_pos, (1 - wd) / n_t
    for part in (slice(0, 11), slice(11, 30)):
        kl, ce = lm_head_kl_loss(
            h[part], w, ht[part], wt, labels[part], mask[part], 2.0, kl_weight=a, ce_weight=b, chunk_rows=4
        )
        (kl * a + ce * b).backward()
    h64, w64 = h.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    kl64, ce64 = lm_head_kl_loss_reference(h64, w64, ht.double(), wt.double(), labels, mask, 2.0)
    (kl64 * a + ce64 * b).backward()
    assert_close(h.grad, h64.grad, torch.float32)
    assert_close(w.grad, w64.grad, torch.float32)


def test_no_labels_no_mask_and_nothing_to_do():
    h, w, ht, wt, _, _ = _inputs(9, 8, 8, 300)
    kl, ce, grads = _run(lm_head_kl_loss, h, w, ht, wt, None, None, 1.5, None, 1.0, 0.0, chunk_rows=4)
    kl64, ce64, grads64 = _reference(h, w, ht, wt, None, None, 1.5, None, 1.0, 0.0)
    assert ce.item() == 0.0
    assert_close(kl, kl64, torch.float32)
    for g, g64 in zip(grads, grads64):
        assert_close(g, g64, torch.float32)
    # no row distilled or labelled: zero losses, zero gradients
    kl, ce = lm_head_kl_loss(
        h, w, ht, wt, torch.full((9,), -100), torch.zeros(9, dtype=torch.bool), 1.0, kl_weight=1.0, ce_weight=1.0
    )
    (kl + ce).backward()
    assert kl.item() == ce.item() == 0.0
    assert torch.count_nonzero(h.grad) == 0 and torch.count_nonzero(w.grad) == 0


def test_identical_models_have_zero_kl_and_zero_kl_gradient():
    h, w, _, _, _, _ = _inputs(12, 16, 16, 700)
    kl, _ = lm_head_kl_loss(h, w, h.detach(), w.detach(), temperature=2.0, chunk_rows=5)
    gh, gw = torch.autograd.grad(kl, [h, w])
    assert abs(kl.item()) < 1e-5
    assert gh.abs().max().item() < 1e-6 and gw.abs().max().item() < 1e-6


def test_undeclared_mix_raises_instead_of_a_wrong_gradient():
    if not use_triton(torch.empty(1)):
        pytest.skip("the reference (no Triton interpreter) accepts any mix")
    h, w, ht, wt, labels, mask = _inputs(10, 8, 8, 200)
    kl, ce = lm_head_kl_loss(h, w, ht, wt, labels, mask, kl_weight=1.0, ce_weight=0.0)
    with pytest.raises(RuntimeError, match="not proportional"):
        ce.backward()
    kl, ce = lm_head_kl_loss(h, w, ht, wt, labels, mask, kl_weight=1.0, ce_weight=1.0)
    with pytest.raises(RuntimeError, match="not proportional"):
        (kl + 2 * ce).backward()
    kl, ce = lm_head_kl_loss(h, w, ht, wt, labels, mask, kl_weight=2.0, ce_weight=6.0)
    (kl * 0.1 + ce * 0.3).backward()  # any multiple of the declared mix is fine
    with pytest.raises(ValueError, match="vocabularies"):
        lm_head_kl_loss(h, w, ht, wt[:-1])


def test_large_logit_spread_stays_finite():
    """Peaked distributions (logits ~ +-60): the online log-sum-exp and p·(log p - log q) stay finite and exact."""
    h, w, ht, wt, labels, mask = _inputs(8, 16, 16, 900, spread=60.0)
    kl, ce, grads = _run(
        lm_head_kl_loss, h, w, ht, wt, labels, mask, 1.0, None, 0.5, 0.5, kl_weight=0.5, ce_weight=0.5, chunk_rows=3
    )
    kl64, ce64, grads64 = _reference(h, w, ht, wt, labels, mask, 1.0, None, 0.5, 0.5)
    assert rel_err(kl, kl64) < TOL[torch.float32] * 5
    for g, g64 in zip(grads, grads64):
        assert_close(g, g64, torch.float32, scale=5)
