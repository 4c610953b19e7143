import pytest
import torch

from edgeft.kernels.cross_entropy import choose_chunk_rows, lm_head_loss, lm_head_loss_reference

from .conftest import DTYPES, assert_close

CASES = [  # N, H, V, softcap, chunk_rows
    (1, 8, 77, None, None),  # single row
    (37, 24, 1000, None, 16),  # several chunks, a short last one
    (20, 17, 3001, 30.0, None),  # odd hidden, vocab past one block, softcap
    (9, 32, 5000, None, 4),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("train_head", [False, True])
def test_fused_loss_matches_reference(case, dtype, train_head):
    N, H, V, cap, chunk = case
    h = torch.randn(N, H).to(dtype).requires_grad_()
    w = (torch.randn(V, H) * 0.3).to(dtype).requires_grad_(train_head)
    labels = torch.randint(0, V, (N,))
    labels[1::3] = -100
    loss, count = lm_head_loss(h, w, labels, cap, chunk_rows=chunk)
    (loss * 0.5).backward()  # a non-unit upstream gradient, as (sum / window tokens) gives
    h64, w64 = h.detach().double().requires_grad_(), w.detach().double().requires_grad_(train_head)
    loss64, count64 = lm_head_loss_reference(h64, w64, labels, cap)
    (loss64 * 0.5).backward()
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert count.item() == count64.item() == int((labels != -100).sum())
    assert_close(loss, loss64, dtype, scale=0.5)
    assert_close(h.grad, h64.grad, dtype)
    if train_head:
        assert_close(w.grad, w64.grad, dtype)
    else:
        assert w.grad is None


def test_all_ignored_gives_zero_loss_and_grad():
    h = torch.randn(4, 8, requires_grad=True)
    w = torch.randn(50, 8)
    loss, count = lm_head_loss(h, w, torch.full((4,), -100))
    loss.backward()
    assert loss.item() == 0.0 and count.item() == 0
    assert torch.count_nonzero(h.grad) == 0


def test_gradient_accumulation_normalises_over_the_window():
    # two micro-batches, loss_sum / total_count of the window == one big batch's mean
    h = torch.randn(12, 16, requires_grad=True)
    w = torch.randn(100, 16) * 0.2
    labels = torch.randint(0, 100, (12,))
    labels[:5] = -100
    s1, c1 = lm_head_loss(h[:6], w, labels[:6])
    s2, c2 = lm_head_loss(h[6:], w, labels[6:])
    total = c1 + c2
    ((s1 + s2) / total).backward()
    g_acc = h.grad.clone()
    h.grad = None
    ref = torch.nn.functional.cross_entropy(h @ w.t(), labels, ignore_index=-100)
    ref.backward()
    assert_close(g_acc, h.grad, torch.float32)
    assert abs(((s1 + s2) / total).item() - ref.item()) < 1e-5


def test_chunk_rows_from_memory_budget():
    rows = choose_chunk_rows(100_000, 151_936, 2, torch.device("cpu"))
    assert rows % 64 == 0 and rows * 151_936 * 2 <= 64 * 2**20
    assert choose_chunk_rows(10, 1000, 2, torch.device("cpu")) == 10
