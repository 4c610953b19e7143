import pytest
import torch
from torch import nn

from edgeft.kernels.lora import (
    ACTIVATIONS,
    LoRAMLPFunction,
    Projection,
    lora_linear,
    lora_linear_reference,
    lora_mlp,
    projection_of,
)

from .conftest import DTYPES, assert_close


def _proj(out_f, in_f, dtype, lora=True, bias=False, train_base=False, r=4):
    w = (torch.randn(out_f, in_f) / in_f**0.5).to(dtype).requires_grad_(train_base)
    b = torch.randn(out_f).to(dtype).requires_grad_(train_base) if bias else None
    a = torch.randn(r, in_f, requires_grad=True) if lora else None  # adapters in fp32, as PEFT makes them
    bb = torch.randn(out_f, r, requires_grad=True) if lora else None
    return Projection(w, b, a, bb, 0.5)


def _f64(p: Projection) -> Projection:
    c = lambda t: None if t is None else t.detach().double().requires_grad_(t.requires_grad)  # noqa: E731
    return Projection(c(p.weight), c(p.bias), c(p.lora_A), c(p.lora_B), p.scale)


def _grads(ps):
    return [
        getattr(p, n)
        for p in ps
        for n in ("weight", "bias", "lora_A", "lora_B")
        if getattr(p, n) is not None and getattr(p, n).requires_grad
    ]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("train_base", [False, True])
@pytest.mark.parametrize("M", [1, 13])
def test_qkv_style_projections_share_x(dtype, train_base, M):
    H = 24
    ps = [
        _proj(16, H, dtype, bias=True, train_base=train_base),
        _proj(8, H, dtype, lora=False, train_base=train_base),
        _proj(8, H, dtype, train_base=train_base),
    ]
    x = torch.randn(M, H, dtype=dtype, requires_grad=True)
    gs = [torch.randn(M, p.weight.shape[0]) for p in ps]
    outs = lora_linear(x, ps)
    sum((o.float() * g).sum() for o, g in zip(outs, gs)).backward()
    rs, x64 = [_f64(p) for p in ps], x.detach().double().requires_grad_()
    outs64 = [lora_linear_reference(x64, p) for p in rs]
    sum((o * g.double()).sum() for o, g in zip(outs64, gs)).backward()
    for o, o64 in zip(outs, outs64):
        assert_close(o, o64, dtype)
    assert_close(x.grad, x64.grad, dtype)
    for a, b in zip(_grads(ps), _grads(rs)):
        assert a.grad.dtype == a.dtype
        assert_close(a.grad, b.grad, dtype)
    assert all(o._base is None for o in outs)  # 2-D outputs own their storage (RoPE rotates them in place)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("act", list(ACTIVATIONS))
@pytest.mark.parametrize("lora_on", [(True, True, True), (True, False, True), (False, False, False)])
def test_fused_mlp_matches_reference(dtype, act, lora_on):
    H, I = 24, 40
    g, u, d = _proj(I, H, dtype, lora_on[0]), _proj(I, H, dtype, lora_on[1]), _proj(H, I, dtype, lora_on[2])
    x = torch.randn(2, 7, H, dtype=dtype, requires_grad=True)
    y = lora_mlp(x, g, u, d, act)
    dy = torch.randn_like(y)
    y.backward(dy)
    G, U, D = _f64(g), _f64(u), _f64(d)
    x64 = x.detach().double().requires_grad_()
    y64 = lora_linear_reference(ACTIVATIONS[act][2](lora_linear_reference(x64, G), lora_linear_reference(x64, U)), D)
    y64.backward(dy.double())
    assert_close(y, y64, dtype)
    assert_close(x.grad, x64.grad, dtype)
    for a, b in zip(_grads([g, u, d]), _grads([G, U, D])):
        assert_close(a.grad, b.grad, dtype)


def test_fused_mlp_is_used_for_frozen_base_and_composed_for_full_finetuning(monkeypatch):
    calls = []
    orig = LoRAMLPFunction.apply
    monkeypatch.setattr(LoRAMLPFunction, "apply", lambda *a: calls.append(1) or orig(*a))
    x = torch.randn(3, 16, requires_grad=True)
    lora_mlp(x, _proj(32, 16, torch.float32), _proj(32, 16, torch.float32), _proj(16, 32, torch.float32), "silu")
    assert calls == [1]
    full = [
        _proj(32, 16, torch.float32, lora=False, train_base=True),
        _proj(32, 16, torch.float32, lora=False, train_base=True),
        _proj(16, 32, torch.float32, lora=False, train_base=True),
    ]
    lora_mlp(x, *full, "silu").sum().backward()
    assert calls == [1] and full[0].weight.grad is not None


def _peft_linear(dropout=0.0, r=4):
    from peft import LoraConfig, get_peft_model

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(16, 12, bias=True)

        def forward(self, x):
            return self.proj(x)

    m = get_peft_model(M(), LoraConfig(r=r, lora_alpha=8, target_modules=["proj"], lora_dropout=dropout))
    nn.init.normal_(m.base_model.model.proj.lora_B["default"].weight)
    return m, m.base_model.model.proj


def test_projection_of_peft_lora_linear_and_fallbacks():
    m, lin = _peft_linear()
    p = projection_of(lin)
    assert p is not None and p.lora_A is lin.lora_A["default"].weight and p.scale == 2.0 and p.dropout is None
    x = torch.randn(5, 16)
    assert_close(lora_linear(x, [p])[0], lin(x), torch.float32)
    with m.disable_adapter():
        q = projection_of(lin)
        assert q.lora_A is None
        assert_close(lora_linear(x, [q])[0], lin(x), torch.float32)
    assert projection_of(nn.Conv1d(2, 2, 1)) is None
    lin.use_dora = {"default": True}
    assert projection_of(lin) is None  # DoRA: module is called as is


def test_lora_dropout_path_matches_peft():
    m, lin = _peft_linear(dropout=0.3)
    m.train()
    p = projection_of(lin)
    assert p.dropout is not None
    x = torch.randn(64, 16, requires_grad=True)
    torch.manual_seed(7)
    y = lora_linear(x, [p])[0]
    y.square().sum().backward()
    gx, gA = x.grad.clone(), lin.lora_A["default"].weight.grad.clone()
    x.grad = None
    lin.lora_A["default"].weight.grad = None
    torch.manual_seed(7)
    y2 = lin(x)
    y2.square().sum().backward()
    assert_close(y, y2, torch.float32)
    assert_close(gx, x.grad, torch.float32)
    assert_close(gA, lin.lora_A["default"].weight.grad, torch.float32)
    m.eval()
    assert projection_of(lin).dropout is None  # eval: dropout is the identity, fast path again


def test_cached_adapter_casts_follow_optimizer_updates():
    # adapters are cast/scaled once per version; an in-place update (optimizer step) must be seen next call
    p = _proj(12, 16, torch.bfloat16)
    x = torch.randn(5, 16, dtype=torch.bfloat16)
    y1 = lora_linear(x, [p])[0]
    opt = torch.optim.SGD([p.lora_A, p.lora_B], lr=0.5)
    y1.float().square().sum().backward()
    opt.step()
    y2 = lora_linear(x, [p])[0]
    ref = lora_linear_reference(x.double(), _f64(p))
    assert_close(y2, ref, torch.bfloat16)
    assert not torch.allclose(y1.float(), y2.float())
