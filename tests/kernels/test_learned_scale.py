"""Learned-scale kernels (kernels/learned_scale.py) against the PyTorch references (edgeft.qat.fake_quant): fq(W)
on given scales bit for bit, the log-scale gradient to fp32 rounding, with and without the LoRA merge, on odd
shapes, groups padded to a power of two, fp16 and fp32 scales, and scales pushed so that groups clip."""

import pytest
import torch

from edgeft.kernels import fake_quant as K
from edgeft.kernels import learned_scale as L
from edgeft.qat import fake_quant as R

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SPECS = {
    "int4-g32": R.WeightQuant("int", 4, 32),
    "int4-g24": R.WeightQuant("int", 4, 24),  # padded to 32 lanes inside the kernel
    "int4-row": R.WeightQuant("int", 4, None),
    "int4-g32-fp32scale": R.WeightQuant("int", 4, 32, scale_dtype=torch.float32),
    "int4-g32-fp16scale": R.WeightQuant("int", 4, 32, eps=258 * 2.0**-24, scale_dtype=torch.float16),
}


@pytest.fixture(autouse=True)
def _small_tiles(monkeypatch):
    """Small interpreted tiles: multi-program grids and masked edges."""
    monkeypatch.setattr(K, "_TILE_INTERPRETED", 1024)


def _case(dtype, spec, rows=37, cols=96, seed=0, lora=False):
    torch.manual_seed(seed)  # the default device's generator (CPU, or CUDA under EDGEFT_KERNEL_TEST_DEVICE)
    w = (torch.randn(rows, cols) * 0.05).to(dtype)
    init = R.initial_scale(w, spec)
    # log-scales of both signs: t < 0 shrinks a group's scale until its largest weights clip
    t = torch.randn(init.shape) * 0.4
    scale = R.learned_scale(init, t, spec, dtype)
    ad = None
    if lora:
        ad = ((torch.randn(4, cols) * 0.1).to(dtype), (torch.randn(rows, 4) * 0.1).to(dtype), 2.0)
    grad = torch.randn(rows, cols)
    return w, scale, ad, grad


@pytest.mark.parametrize("lora", [False, True], ids=["plain", "lora"])
@pytest.mark.parametrize("name", list(SPECS))
@pytest.mark.parametrize("dtype", DTYPES)
def test_fake_quant_on_given_scales_is_bit_exact(dtype, name, lora):
    spec = SPECS[name]
    w, scale, ad, _ = _case(dtype, spec, lora=lora)
    base = R.merge_lora_weight(w, *ad) if lora else w
    out = L.learned_fake_quant_weight(w, scale, spec, ad)
    ref = R.learned_weight_ref(base, scale, spec)
    assert out.dtype == ref.dtype and torch.equal(out, ref)


@pytest.mark.parametrize("lora", [False, True], ids=["plain", "lora"])
@pytest.mark.parametrize("name", list(SPECS))
@pytest.mark.parametrize("dtype", DTYPES)
def test_log_scale_gradient_matches_the_reference(dtype, name, lora):
    spec = SPECS[name]
    w, scale, ad, grad = _case(dtype, spec, lora=lora, seed=1)
    base = R.merge_lora_weight(w, *ad) if lora else w
    d = L.learned_scale_grad(w, scale, grad, spec, ad)
    ref = R.learned_log_scale_grad(base, scale, grad, spec)
    assert d.dtype == torch.float32 and d.shape == scale.shape
    torch.testing.assert_close(d, ref, rtol=1e-5, atol=1e-6)
    # the clamp branch is exercised: some weights lie outside their group's grid
    v = base.float().reshape(scale.shape[0], scale.shape[1], -1) / scale.float().unsqueeze(-1)
    assert (v.round() > spec.qmax).any() or (v.round() < spec.qmin).any()


def test_autograd_function_equals_the_reference_function():
    """The kernels' autograd Function (LM head's path) against qat.fake_quant.LearnedScaleFakeQuant."""
    spec = SPECS["int4-g32"]
    w0, _, _, grad = _case(torch.bfloat16, spec, seed=2)
    init = R.initial_scale(w0, spec)
    t0 = torch.randn(init.shape) * 0.3
    outs = []
    for fn in (L.learned_weight_fake_quant, R.learned_fake_quant):
        w, t = w0.clone().requires_grad_(True), t0.clone().requires_grad_(True)
        out = fn(w, t, init, spec)
        out.float().backward(grad)
        outs.append((out, w.grad, t.grad))
    (a, wa, ta), (b, wb, tb) = outs
    assert torch.equal(a, b) and torch.equal(wa, wb)
    torch.testing.assert_close(ta, tb, rtol=1e-5, atol=1e-6)


def test_untrained_scales_give_the_ptq_grid():
    spec = SPECS["int4-g32"]
    for dtype in DTYPES:
        torch.manual_seed(4)
        w = (torch.randn(9, 128) * 0.05).to(dtype)
        init = R.initial_scale(w, spec)
        out = L.learned_fake_quant_weight(w, R.learned_scale(init, torch.zeros_like(init), spec, dtype), spec)
        assert torch.equal(out, R.int_weight_ref(w, spec))


def test_non_contiguous_weight_is_read_by_value():
    spec = SPECS["int4-g32"]
    w, scale, _, grad = _case(torch.float32, spec, rows=96, cols=96, seed=5)
    wt = w.t().contiguous().t()  # same values, column-major
    assert not wt.is_contiguous()
    assert torch.equal(L.learned_fake_quant_weight(wt, scale, spec), L.learned_fake_quant_weight(w, scale, spec))
    torch.testing.assert_close(L.learned_scale_grad(wt, scale, grad, spec), L.learned_scale_grad(w, scale, grad, spec))


@pytest.mark.parametrize("lora", [False, True], ids=["plain", "lora"])
def test_weight_and_gradient_from_one_pass_equal_the_two_kernels(lora):
    spec = SPECS["int4-g32"]
    w, scale, ad, grad = _case(torch.bfloat16, spec, lora=lora, seed=6)
    fq, d = L.learned_fake_quant_and_grad(w, scale, grad, spec, ad)
    assert torch.equal(fq, L.learned_fake_quant_weight(w, scale, spec, ad))
    assert torch.equal(d, L.learned_scale_grad(w, scale, grad, spec, ad))


@pytest.mark.parametrize("fused", [False, True], ids=["adamw", "fused-adamw"])
def test_scale_cache_recomputes_after_an_optimizer_step(fused):
    """Fused AdamW (edgeft's optimizer) writes the parameter without moving its version counter: the cache must
    see the step anyway."""
    spec = SPECS["int4-g32"]
    w, _, _, _ = _case(torch.float32, spec, seed=7)
    init = R.initial_scale(w, spec)
    log = torch.nn.Parameter(torch.zeros_like(init))
    cache = L.ScaleCache()
    first = cache.get(init, log, spec, w.dtype)
    assert cache.get(init, log, spec, w.dtype) is first  # same state: no recomputation
    opt = torch.optim.AdamW([log], lr=0.1, fused=fused)
    log.grad = torch.ones_like(log)
    opt.step()
    again = cache.get(init, log, spec, w.dtype)
    assert again is not first and torch.equal(again, R.learned_scale(init, log.detach(), spec, w.dtype))
    assert not torch.equal(again, first)
    assert cache.get(init, log, spec, torch.bfloat16).dtype == R.learned_scale(init, log, spec, torch.bfloat16).dtype


def _bank_pairs(dtype, seed=8):
    """(init_scale, log_scale parameter, spec) for each spec and a few shapes, log-scales large enough that some
    groups clamp at eps (exp underflows) or overflow to inf."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i, spec in enumerate(SPECS.values()):
        for rows, cols in ((37, 96), (5, 96 * (i + 1))):
            w = (torch.randn(rows, cols, generator=g) * 0.05).to(dtype)
            init = R.initial_scale(w, spec)
            t = torch.randn(init.shape, generator=g) * 0.4
            t.view(-1)[:2] = torch.tensor([-120.0, 95.0])  # clamped at eps; inf
            out.append((init, torch.nn.Parameter(t), spec))
    return out


def _assert_bank_is_reference(bank, pairs, dtype):
    for e, (init, log, spec) in zip(bank.entries, pairs):
        got = e.get(init, log, spec, dtype)
        ref = R.learned_scale(init, log.detach(), spec, dtype)
        assert got.dtype == ref.dtype and torch.equal(got, ref), spec


@pytest.mark.parametrize("dtype", DTYPES)
def test_scale_bank_equals_learned_scale_bit_for_bit_through_optimizer_steps(dtype):
    """The bank's foreach pass gives every entry ``learned_scale``'s bits (what convert writes), for every spec
    (eps, scale dtype) in one bank, and again after AdamW steps that move only the log-scales that train."""
    pairs = _bank_pairs(dtype)
    bank = L.ScaleBank()
    for init, log, spec in pairs:
        bank.entry().track(init, log, spec, dtype)
    _assert_bank_is_reference(bank, pairs, dtype)
    assert bank.refreshes == 1  # the first request computed them all
    first = [e.value for e in bank.entries]
    for i, (_, log, _) in enumerate(pairs):
        log.requires_grad_(i % 3 != 0)  # a frozen subset
    opt = torch.optim.AdamW([p for _, p, _ in pairs if p.requires_grad], lr=0.05, fused=False)
    for step in range(2):
        for i, (_, log, _) in enumerate(pairs):
            # only some get a gradient on the first step: AdamW leaves the others alone
            log.grad = torch.randn_like(log) if log.requires_grad and (step or i % 2) else None
        opt.step()
        _assert_bank_is_reference(bank, pairs, dtype)
        assert bank.refreshes == 2 + step  # one pass per step, whichever entry asks first
    moved = [not torch.equal(e.value, v) for e, v in zip(bank.entries, first)]
    assert any(moved) and not all(moved)


def test_scale_bank_refreshes_only_stale_entries_once_per_state():
    """Requests within a step hit the bank; an entry whose tensors change (an in-place edit, a new init_scale
    storage, another dtype) is recomputed on its own next request, and the untouched entries keep their values."""
    pairs = _bank_pairs(torch.float32)[:4]
    bank = L.ScaleBank()
    entries = [bank.entry() for _ in pairs]
    untracked = bank.entry()  # never asked for: the bank skips it
    for e, (init, log, spec) in zip(entries, pairs):
        e.get(init, log, spec, torch.float32)
    assert bank.refreshes == 4 and untracked.value is None  # nothing tracked ahead: one pass per first request
    values = [e.value for e in entries]
    for e, (init, log, spec) in zip(entries[::-1], pairs[::-1]):
        assert e.get(init, log, spec, torch.float32) is values[entries.index(e)]
    assert bank.refreshes == 4
    init0, log0, spec0 = pairs[0]
    with torch.no_grad():
        log0.mul_(0.5)  # moves the version counter
    got = entries[0].get(init0, log0, spec0, torch.float32)
    assert torch.equal(got, R.learned_scale(init0, log0.detach(), spec0, torch.float32))
    assert all(e.value is v for e, v in zip(entries[1:], values[1:]))
    init1, log1, spec1 = pairs[1]
    init1 = init1.clone()  # as after model.to(): a new buffer
    assert entries[1].get(init1, log1, spec1, torch.float32) is not values[1]
    half = entries[2].get(pairs[2][0], pairs[2][1], pairs[2][2], torch.float16)
    assert torch.equal(half, R.learned_scale(pairs[2][0], pairs[2][1].detach(), pairs[2][2], torch.float16))
    assert bank.refreshes == 7 and entries[3].value is values[3]


def test_foreach_scales_equal_the_unary_ops():
    """The multi-tensor ops the bank uses give the same bits as the unary ops ``learned_scale`` runs."""
    g = torch.Generator().manual_seed(9)
    inits = [torch.rand(n, 3, generator=g) * 0.02 for n in (1, 7, 64)]
    logs = [torch.randn(t.shape, generator=g) * 30 for t in inits]  # underflow and overflow included
    for dtype in DTYPES:
        eps = torch.finfo(dtype).smallest_normal
        got = L._foreach_learned_scales(inits, logs, eps, dtype)
        want = [(i * torch.exp(t)).clamp(min=eps).to(dtype) for i, t in zip(inits, logs)]
        assert all(a.dtype == b.dtype and torch.equal(a, b) for a, b in zip(got, want))


def test_scale_bank_skips_entries_whose_storage_is_freed():
    """FSDP2 frees a layer's gathered parameters between its uses: the bank must not read them (that is garbage
    or a crash) while another entry refreshes, and computes them on their own request once they are back."""
    pairs = _bank_pairs(torch.float32)[:2]
    bank = L.ScaleBank()
    for init, log, spec in pairs:
        bank.entry().track(init, log, spec, torch.float32)
    _assert_bank_is_reference(bank, pairs, torch.float32)
    (init0, log0, spec0), (init1, log1, spec1) = pairs
    kept = log1.detach().clone()
    old1 = bank.entries[1].value
    log1.untyped_storage().resize_(0)  # as FSDP2's reshard
    with torch.no_grad():
        log0.add_(0.25)
    assert torch.equal(
        bank.entries[0].get(init0, log0, spec0, torch.float32), R.learned_scale(init0, log0, spec0, torch.float32)
    )
    assert bank.entries[1].value is old1  # not recomputed from freed memory
    log1.untyped_storage().resize_(kept.numel() * 4)  # gathered again
    with torch.no_grad():
        log1.copy_(kept * 0.5)
    _assert_bank_is_reference(bank, pairs, torch.float32)
