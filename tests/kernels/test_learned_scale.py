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
