"""LoRA + QAT: the merged-weight Function against a plain autograd reference, inside the fused kernels in either
order of patch/prepare, without full-size weight gradients, with dropout, and convert writing what training used.
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from qat_helpers import FLIP_GRAD, FLIP_LOSS, assert_close, rel_err, tiny_model
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import edgeft.kernels as K
from edgeft import qat
from edgeft.arch import kernel_specs
from edgeft.kernels.fake_quant import fake_quant_weight
from edgeft.kernels.lora import Projection, lora_linear, lora_mlp
from edgeft.qat import fake_quant as R

KERNELS = kernel_specs()

ACT, W4 = R.ActQuant(), R.WeightQuant("int", 4, 32)


class Replace(torch.autograd.Function):
    """``value`` forward, the gradient straight to ``x`` (the straight-through estimator, written out)."""

    @staticmethod
    def forward(ctx, x, value):
        return value

    @staticmethod
    def backward(ctx, g):
        return g, None


def ref_merged(x, w, bias, a, b, s, act=ACT, spec=W4, values=None):
    """fq_a(x) fq_w(W + s B A)^T + bias by plain autograd: the deployed forward, STE gradients to x, A and B.

    ``values=(x, w, a, b)`` in the training dtypes: what the quantized values are computed from, when the
    gradient path (x, w, a, b) is an fp64 copy."""
    xv, wv, av, bv = values or (x.detach(), w, a.detach(), b.detach())
    wm = w.to(a.dtype) + s * (b @ a)
    wq = Replace.apply(wm, R.weight_ref(R.merge_lora_weight(wv, av, bv, s), spec).to(a.dtype))
    xq = Replace.apply(x, R.act_ref(xv, act).to(x.dtype))
    return F.linear(xq.to(wq.dtype), wq, None if bias is None else bias.to(wq.dtype))


class RefMergedLinear(nn.Module):
    """Stands in for a MergedFakeQuantLoraLinear (same parameters), computing ``ref_merged``."""

    def __init__(self, m: qat.MergedFakeQuantLoraLinear):
        super().__init__()
        self.m = m

    def forward(self, x):
        a, b = self.m._adapters()
        base = self.m.base_layer
        return ref_merged(x, base.weight, base.bias, a, b, self.m.scaling, self.m.act_spec, self.m.weight_spec)


def reference_model(prepared):
    ref = copy.deepcopy(prepared)
    for name, mod in list(ref.named_modules()):
        if isinstance(mod, qat.MergedFakeQuantLoraLinear):
            parent, _, child = name.rpartition(".")
            setattr(ref.get_submodule(parent), child, RefMergedLinear(mod))
    return ref


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [False, True])
def test_merged_function_matches_autograd_reference(dtype, bias):
    H, outs = 64, (96, 32, 32)  # Q/K/V-like: three projections share x
    x = torch.randn(2, 7, H, dtype=dtype, requires_grad=True)
    ws = [(torch.randn(o, H) * 0.1).to(dtype) for o in outs]
    bs = [torch.randn(o).to(dtype) if bias else None for o in outs]
    As = [(torch.randn(4, H) * 0.1).requires_grad_() for _ in outs]
    Bs = [(torch.randn(o, 4) * 0.1).requires_grad_() for o in outs]
    projs = [
        Projection(fake_quant_weight(w, W4, lora=(a, b, 2.0)), bb, a, b, 2.0, merged=True, act_quant=ACT)
        for w, bb, a, b in zip(ws, bs, As, Bs)
    ]
    ys = lora_linear(x, projs)
    gs = [torch.randn_like(y) for y in ys]
    torch.autograd.backward(ys, gs)
    x64 = x.detach().double().requires_grad_()
    ps64 = [(a.detach().double().requires_grad_(), b.detach().double().requires_grad_()) for a, b in zip(As, Bs)]
    refs = [
        ref_merged(x64, w.double(), None if bb is None else bb.double(), a, b, 2.0, values=(x.detach(), w, a0, b0))
        for w, bb, (a, b), a0, b0 in zip(ws, bs, ps64, As, Bs)
    ]
    torch.autograd.backward(refs, [g.double() for g in gs])
    for y, r in zip(ys, refs):
        assert_close(y, r, dtype)
    assert_close(x.grad, x64.grad, dtype)
    for (a, b), (a64, b64) in zip(zip(As, Bs), ps64):
        assert_close(a.grad, a64.grad, dtype)
        assert_close(b.grad, b64.grad, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_mlp_with_merged_adapters_and_quantized_h(dtype):
    H, I = 64, 96
    x = torch.randn(9, H, dtype=dtype, requires_grad=True)
    shapes = [(I, H), (I, H), (H, I)]
    ws = [(torch.randn(*s) * 0.1).to(dtype) for s in shapes]
    As = [(torch.randn(4, s[1]) * 0.1).requires_grad_() for s in shapes]
    Bs = [(torch.randn(s[0], 4) * 0.1).requires_grad_() for s in shapes]
    projs = [
        Projection(fake_quant_weight(w, W4, lora=(a, b, 2.0)), None, a, b, 2.0, merged=True, act_quant=ACT)
        for w, a, b in zip(ws, As, Bs)
    ]
    y = lora_mlp(x, *projs, "silu")
    g = torch.randn_like(y)
    y.backward(g)
    # reference: plain autograd, h computed (and fake-quantized) in the same dtype as the kernels do
    x2 = x.detach().clone().requires_grad_()
    ps = [(a.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()) for a, b in zip(As, Bs)]
    gate = ref_merged(x2, ws[0], None, *ps[0], 2.0).to(dtype)
    up = ref_merged(x2, ws[1], None, *ps[1], 2.0).to(dtype)
    h = F.silu(gate.float()).to(dtype) * up
    ref = ref_merged(h, ws[2], None, *ps[2], 2.0)
    ref.backward(g.to(ref.dtype))
    scale = 3.0 if dtype == torch.bfloat16 else 1.0  # h differs by bf16 rounding between kernel and reference
    assert_close(y, ref.detach().to(dtype), dtype, scale)
    assert_close(x.grad, x2.grad, dtype, scale)
    for (a, b), (ra, rb) in zip(zip(As, Bs), ps):
        assert_close(a.grad, ra.grad, dtype, scale)
        assert_close(b.grad, rb.grad, dtype, scale)


class ShapeLog(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.shapes = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.shapes.add(tuple(t.shape))
        return out


def test_backward_forms_no_full_size_weight_gradient():
    out_f, in_f = 96, 160
    w = torch.randn(out_f, in_f) * 0.1
    a = (torch.randn(4, in_f) * 0.1).requires_grad_()
    b = (torch.randn(out_f, 4) * 0.1).requires_grad_()
    x = torch.randn(24, in_f, requires_grad=True)
    p = Projection(fake_quant_weight(w, W4, lora=(a, b, 2.0)), None, a, b, 2.0, merged=True, act_quant=ACT)
    y = lora_linear(x, [p])[0]
    with ShapeLog() as log:
        y.backward(torch.randn_like(y))
    assert (out_f, in_f) not in log.shapes and (in_f, out_f) not in log.shapes, log.shapes
    assert a.grad.shape == (4, in_f) and b.grad.shape == (out_f, 4)
    # the reference (autograd through W + s B A) does form it
    with ShapeLog() as log:
        ref_merged(x.detach(), w, None, a, b, 2.0).sum().backward()
    assert (out_f, in_f) in log.shapes


def _lora_loss(m, ids, patched):
    if patched:
        s, n = K.causal_lm_loss(m, ids, ids)
        return s / n
    return m(input_ids=ids, labels=ids).loss


@pytest.mark.parametrize("model_type", ["llama", "qwen3"])
@pytest.mark.parametrize("order", ["patch_then_prepare", "prepare_then_patch"])
def test_patched_and_prepared_in_either_order_equal_the_reference(model_type, order):
    m = tiny_model(model_type, lora=True)
    unpatched = copy.deepcopy(m)
    qat.prepare(unpatched, "int8-int4")
    ref = reference_model(unpatched)
    if order == "patch_then_prepare":
        assert K.patch(m, KERNELS)
        qat.prepare(m, "int8-int4")
    else:
        qat.prepare(m, "int8-int4")
        assert K.patch(m, KERNELS)
    ids = torch.randint(3, 300, (2, 12))
    losses = {}
    for name, model, patched in (("edgeft", m, True), ("unpatched", unpatched, False), ("reference", ref, False)):
        loss = _lora_loss(model, ids, patched)
        loss.backward()
        losses[name] = (
            loss.item(),
            {n.replace(".m.", "."): p.grad for n, p in model.named_parameters() if p.grad is not None},
        )
    ref_loss, ref_grads = losses["reference"]
    # the kernels within the int8-flip floor (qat_helpers); the unpatched model runs the reference's own order
    for name, loss_tol, grad_tol in (("edgeft", FLIP_LOSS, FLIP_GRAD), ("unpatched", 1e-5, 1e-4)):
        loss, grads = losses[name]
        assert abs(loss - ref_loss) / ref_loss < loss_tol, (name, loss, ref_loss)
        assert set(grads) == set(ref_grads) and all("lora_" in n for n in grads)
        for n, g in grads.items():
            assert rel_err(g, ref_grads[n]) < grad_tol, (name, n, rel_err(g, ref_grads[n]))


@pytest.mark.parametrize("model_type", ["llama", "qwen3"])
def test_flip_bounds_catch_a_wrong_lora_scale(model_type):
    """The reference with one projection's LoRA scale 1% off fails the bounds the kernels are held to."""
    m = tiny_model(model_type, lora=True)
    qat.prepare(m, "int8-int4")
    ref, wrong = reference_model(m), reference_model(m)
    bad = next(mod for name, mod in wrong.named_modules() if name.endswith("layers.0.self_attn.v_proj"))
    bad.m.scaling *= 1.01
    ids = torch.randint(3, 300, (2, 12))
    grads = []
    for model in (ref, wrong):
        _lora_loss(model, ids, False).backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert max(rel_err(grads[1][n], g) for n, g in grads[0].items()) > FLIP_GRAD


@pytest.mark.parametrize("patched", [False, True], ids=["unpatched", "patched"])
def test_kept_merged_weights_train_like_rebuilt_ones(patched):
    """cache="weights" keeps fq(W + s·B·A) for the optimizer step (micro-batches and the backward share it) and
    rebuilds it after each step, since A and B changed: the same bits as rebuilding it on every use."""
    from edgeft.qat.prepare import fake_quant_cache_stats

    base = tiny_model("llama", lora=True)
    kept, rebuilt = copy.deepcopy(base), copy.deepcopy(base)
    for m, cache in ((kept, "weights"), (rebuilt, "off")):
        if patched:
            assert K.patch(m, KERNELS, checkpoint=None)
        qat.prepare(m, "int8-int4", cache=cache)
    opts = [torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2) for m in (kept, rebuilt)]
    n_lora, micro = 2 * 7, 2
    for step in range(2):
        grads = []
        for m, opt in zip((kept, rebuilt), opts):
            for seed in range(micro):
                ids = torch.randint(3, 300, (2, 12), generator=torch.Generator().manual_seed(10 * step + seed))
                (_lora_loss(m, ids, patched) / micro).backward()
            grads.append({n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None})
            opt.step()
            opt.zero_grad()
        assert grads[0].keys() == grads[1].keys() and all(torch.equal(g, grads[1][n]) for n, g in grads[0].items())
        # the frozen head is re-quantized per micro-batch (keeping it would hold a copy all run)
        assert fake_quant_cache_stats(kept) == {
            "misses": (n_lora + micro) * (step + 1),
            "hits": n_lora * (micro - 1) * (step + 1),
        }


def test_dropout_gradients_follow_the_stated_rule():
    """Under dropout a merged layer trains fq(x) fq(W_m)^T + s (drop(X̂) - X̂) A^T B^T (see qat/prepare.py)."""
    from peft import LoraConfig, get_peft_model

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(64, 48, bias=True)

        def forward(self, x):
            return self.proj(x)

    m = get_peft_model(M(), LoraConfig(r=4, lora_alpha=8, target_modules=["proj"], lora_dropout=0.4))
    nn.init.normal_(m.base_model.model.proj.lora_B["default"].weight, std=0.1)
    qat.prepare(m, "int8-int4")
    layer = m.base_model.model.proj
    a, b = layer._adapters()
    x = torch.randn(16, 64, requires_grad=True)
    g = torch.randn(16, 48)
    m.train()
    torch.manual_seed(5)
    layer(x).backward(g)
    got = [t.grad.clone() for t in (x, a, b)]
    for t in (x, a, b):
        t.grad = None
    xq = Replace.apply(x, R.act_ref(x.detach(), ACT))
    torch.manual_seed(5)
    dropped = layer.lora_dropout["default"](xq)
    y = ref_merged(x, layer.base_layer.weight, layer.base_layer.bias, a, b, layer.scaling)
    y = y + layer.scaling * F.linear(F.linear(dropped - xq, a), b)
    y.backward(g)
    for mine, want in zip(got, (x.grad, a.grad, b.grad)):
        assert rel_err(mine, want) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_convert_writes_the_integers_training_used(dtype):
    from peft import LoraConfig, get_peft_model
    from torchao.quantization import IntxUnpackedToInt8Tensor

    from edgeft.models import load_model, resolve_model

    torch.manual_seed(0)
    model, _ = load_model(resolve_model("tiny-qwen3"), dtype=dtype)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", lora_dropout=0.0))
    for n, p in model.named_parameters():
        if "lora_B" in n:
            p.data = torch.randn(p.shape) * 0.02
    qat.prepare(model, "int8-int4")
    used = {}
    for name, mod in model.named_modules():
        if isinstance(mod, qat.MergedFakeQuantLoraLinear):
            a, b = mod._adapters()
            _, codes, scales, packed = fake_quant_weight(
                mod.base_layer.weight, mod.weight_spec, lora=(a, b, mod.scaling), codes=True
            )
            used[name.removeprefix("base_model.model.")] = (codes, scales, packed)
    converted, record = qat.convert(model)
    assert used and set(used) <= set(record["linears"])
    for name, (codes, scales, packed) in used.items():
        t = converted.get_submodule(name).weight
        assert isinstance(t, IntxUnpackedToInt8Tensor)
        if packed:
            lo = ((codes.to(torch.int16) & 15) ^ 8) - 8
            hi = (((codes.to(torch.int16) >> 4) & 15) ^ 8) - 8
            codes = torch.stack([lo, hi], -1).reshape(t.qdata.shape).to(torch.int8)
        assert torch.equal(t.qdata, codes), name
        assert torch.equal(t.scale.reshape(scales.shape), scales), name
