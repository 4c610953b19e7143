"""Learned QAT scales (``weight_scale="learned"``): the LSQ gradient against autograd through a hand-written
fp64 reference, the LoRA merge's gradients, training that lowers the quantization error, the optimizer group,
convert writing the trained scales, and a run that saves them and converts again from them."""

import json

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from qat_helpers import FLIP_GRAD, FLIP_LOSS, rel_err, tiny_model

from edgeft import qat
from edgeft.arch import kernel_specs
from edgeft.errors import EdgeftError
from edgeft.models import load_model, resolve_model
from edgeft.qat.fake_quant import WeightQuant, initial_scale, int_weight_ref, learned_fake_quant
from edgeft.qat.prepare import LearnedWeightFakeQuantizer

KERNELS = kernel_specs()

SPEC = WeightQuant("int", 4, 32)


def lsq_reference(w: torch.Tensor, log_scale: torch.Tensor, init: torch.Tensor, gs: int) -> torch.Tensor:
    """fq(w) with s = init * exp(t) in fp64 autograd: round with a straight-through gradient, clamp's own
    gradient (zero outside [-8, 7], where the output is q * s and only s moves it), the weight's gradient left
    to autograd as identity by adding w - w.detach() (edgeft's straight-through weight gradient)."""
    s = (init.double() * torch.exp(log_scale.double())).unsqueeze(-1)
    g = w.double().reshape(w.shape[0], -1, gs)
    v = g.detach() / s
    r = v + (torch.round(v) - v).detach()
    q = torch.clamp(r, -8, 7)
    out = (q * s).reshape(w.shape)
    return out + (w.double() - w.double().detach())


def _weights(rows=8, cols=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, cols, generator=g) * 0.05


def test_untrained_learned_scales_are_the_ptq_grid_bit_for_bit():
    for dtype in (torch.float32, torch.bfloat16):
        w = _weights().to(dtype)
        init = initial_scale(w, SPEC)
        out = learned_fake_quant(w, torch.zeros_like(init), init, SPEC)
        assert torch.equal(out, int_weight_ref(w, SPEC))


@pytest.mark.parametrize("block", [None, 3 * 96], ids=["one-block", "row-blocks"])
def test_scale_and_weight_gradients_match_the_autograd_reference(block, monkeypatch):
    if block is not None:  # the scale gradient is reduced in blocks of rows (3 here, the last one short)
        monkeypatch.setattr("edgeft.kernels.learned_scale._LSQ_BLOCK", block)
    w = _weights().requires_grad_(True)
    init = initial_scale(w, SPEC)
    t = (torch.randn(init.shape, generator=torch.Generator().manual_seed(1)) * 0.3).requires_grad_(True)
    grad_out = torch.randn(w.shape, generator=torch.Generator().manual_seed(2))
    out = learned_fake_quant(w, t, init, SPEC)
    out.backward(grad_out)
    w_ref = w.detach().clone().requires_grad_(True)
    t_ref = t.detach().clone().requires_grad_(True)
    ref = lsq_reference(w_ref, t_ref, init, 32)
    torch.testing.assert_close(out.double(), ref.detach(), rtol=1e-6, atol=1e-7)
    ref.backward(grad_out.double())
    torch.testing.assert_close(t.grad.double(), t_ref.grad.double(), rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(w.grad, grad_out)  # straight-through
    # clipped groups exist (t < 0 shrinks scales), so the clamp branch of the gradient is exercised
    assert (w.detach().reshape(8, -1, 32).abs() / (init * torch.exp(t.detach())).unsqueeze(-1) > 8).any()


def test_learning_the_scales_lowers_the_layer_error_as_far_as_the_clip_search():
    """Trained on a layer's output error alone, the scales end near the best of the 13 clip candidates per group
    (a grid search on the weight error; white inputs make the two errors the same objective)."""
    from dataclasses import replace

    from edgeft.qat.fake_quant import MSE_RATIOS

    torch.manual_seed(0)
    w = torch.randn(16, 128) * 0.05
    x = torch.randn(256, 128)
    init = initial_scale(w, SPEC)
    t = torch.zeros_like(init, requires_grad=True)
    opt = torch.optim.Adam([t], lr=2e-2)

    def err(wq):
        return (F.linear(x, wq) - F.linear(x, w)).square().mean()

    start = err(learned_fake_quant(w, t, init, SPEC)).item()
    for _ in range(150):
        opt.zero_grad()
        err(learned_fake_quant(w, t, init, SPEC)).backward()
        opt.step()
    end = err(learned_fake_quant(w, t, init, SPEC)).item()
    searched = err(int_weight_ref(w, replace(SPEC, clip_ratios=MSE_RATIOS))).item()
    assert end < 0.93 * start and end < 1.06 * searched, (start, end, searched)
    assert t.detach().mean() < 0  # smaller scales than max|w|: some clipping pays


def _learned_lora_q_proj(dropout: float):
    """tiny-llama with a LoRA adapter (B != 0) on q_proj, prepared for int4 with learned scales moved as if
    trained: (model, the layer, its learned quantizer)."""
    torch.manual_seed(0)
    model, _ = load_model(resolve_model("tiny-llama"))
    model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj"], lora_dropout=dropout))
    for n, p in model.named_parameters():
        if "lora_B" in n:
            p.data = torch.randn(p.shape) * 0.02
    qat.prepare(model, "int4", weight_scale="learned")
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    fq = layer.weight_fake_quantizer
    with torch.no_grad():
        fq.log_scale.normal_(0, 0.2)
    return model, layer, fq


def test_lora_learned_scales_send_gradients_to_adapters_and_scales():
    _, layer, fq = _learned_lora_q_proj(0.0)
    x = torch.randn(5, 256)
    g = torch.randn(5, 256)
    layer(x).backward(g)
    a_, b_ = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    a_ref = a_.detach().clone().requires_grad_(True)
    b_ref = b_.detach().clone().requires_grad_(True)
    t_ref = fq.log_scale.detach().clone().requires_grad_(True)
    merged = layer.merged_weight().double() + layer.scaling * (
        b_ref.double() @ a_ref.double() - (b_ref.double() @ a_ref.double()).detach()
    )
    ref = F.linear(x.double(), lsq_reference(merged, t_ref, fq.init_scale, 32))
    ref.backward(g.double())
    torch.testing.assert_close(a_.grad.double(), a_ref.grad.double(), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(b_.grad.double(), b_ref.grad.double(), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(fq.log_scale.grad.double(), t_ref.grad.double(), rtol=1e-4, atol=1e-6)
    assert layer.base_layer.weight.grad is None  # the base stays frozen


def test_learned_scales_need_int4_and_train_under_lora_dropout():
    with pytest.raises(EdgeftError, match="needs int4 weights"):
        qat.resolve("int8", weight_scale="learned")
    # dropout: the merged weight plus the adapter's noise term, which does not involve fq(W): the scale gradient
    # is the same dY^T X̂ reduction, and eval mode is the deployed forward
    model, layer, fq = _learned_lora_q_proj(0.5)
    x = torch.randn(4, 256)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(layer(x), F.linear(x, fq(layer.merged_weight())), rtol=0, atol=1e-5)
    model.train()
    g = torch.randn(4, 256)
    layer(x).backward(g)
    want = F.linear(g.t(), x.t())  # dY^T X: the gradient of fq(W_m), whatever the dropout noise adds
    w_m = layer.merged_weight().detach().requires_grad_(False)
    t_ref = fq.log_scale.detach().clone().requires_grad_(True)
    lsq_reference(w_m, t_ref, fq.init_scale, 32).backward(want.double())
    torch.testing.assert_close(fq.log_scale.grad.double(), t_ref.grad.double(), rtol=1e-4, atol=1e-6)


def test_int8_linears_keep_max_abs_rows_under_learned_scales():
    model, _ = load_model(resolve_model("tiny-llama"))
    qat.prepare(model, "int8-int4", weight_scale="learned", int8_modules=("down_proj",))
    mlp = model.model.layers[0].mlp
    assert isinstance(mlp.gate_proj.weight_fake_quantizer, LearnedWeightFakeQuantizer)
    assert not isinstance(mlp.down_proj.weight_fake_quantizer, LearnedWeightFakeQuantizer)


def test_scales_get_their_own_optimizer_group():
    from edgeft.training.optim import param_groups

    model, _ = load_model(resolve_model("tiny-llama"))
    qat.prepare(model, "phone-deployment", weight_scale="learned")
    groups = param_groups(model, 1e-4, 0.1, embedding_lr=1e-5, scale_lr=3e-3)
    scale_groups = [g for g in groups if any(n.endswith("log_scale") for n in g["names"])]
    assert len(scale_groups) == 1 and all(n.endswith("log_scale") for n in scale_groups[0]["names"])
    assert scale_groups[0]["lr"] == 3e-3 and scale_groups[0]["weight_decay"] == 0.0
    assert any(n.startswith("lm_head") for n in scale_groups[0]["names"])  # not the embeddings' group


def test_a_learned_scale_run_saves_its_scales_and_converts_on_them(tmp_path):
    from safetensors.torch import load_file

    import edgeft
    from edgeft.config import TrainConfig, resolve
    from edgeft.pipeline import convert

    with pytest.raises(EdgeftError, match="needs --qat-weight-scale learned"):
        resolve(TrainConfig(model="tiny-llama", qat="int4", qat_scale_lr=1e-3))
    cfg = TrainConfig(
        model="tiny-llama",
        data="builtin:tasks",
        mode="full",
        qat="int8-int4",
        qat_weight_scale="learned",
        qat_scale_lr=5e-2,
        ptq=False,
        max_steps=3,
        batch_size=2,
        lr=1e-3,
        out=str(tmp_path / "r"),
        progress=False,
        threads=1,
    )
    run = edgeft.train(cfg)
    saved = load_file(str(run / "model" / "qat_scales.safetensors"))
    info = json.loads((run / "model" / "edgeft.json").read_text())
    assert info["learned_scales"] == len(saved) > 0
    record = json.loads((run / "converted" / "scheme.json").read_text())
    assert sorted(saved) == record["learned_scales"]
    # the scales are not max|w| of the trained weights, and convert wrote exactly the trained ones
    trained, _ = load_model(run / "model")
    name = "model.layers.0.mlp.up_proj"
    w = trained.get_submodule(name).weight.detach()
    assert not torch.equal(saved[name], initial_scale(w, WeightQuant("int", 4, 32)))
    converted, _, _ = qat.load_converted(run / "converted")
    qw = converted.get_submodule(name).weight
    assert torch.equal(qw.scale.reshape(saved[name].shape).to(saved[name].dtype), saved[name])
    # `edgeft convert` again from model/ (and its saved scales): the same integers
    before = qw.qdata.clone()
    convert(run)
    again, _, _ = qat.load_converted(run / "converted")
    assert torch.equal(again.get_submodule(name).weight.qdata, before)


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_patched_model_trains_learned_scales_like_the_unpatched_one(lora):
    """The fused kernels take a learned-scale layer's fake-quantized weight as an autograd value: loss and every
    gradient (weights or adapters, and the scales) as without the kernels."""
    import copy

    import edgeft.kernels as K

    m = tiny_model("llama", lora=lora)
    if not lora:
        m.requires_grad_(True)
    qat.prepare(m, "int8-int4", weight_scale="learned")
    with torch.no_grad():
        for n, p in m.named_parameters():
            if n.endswith("log_scale"):
                p.normal_(0, 0.2)
    unpatched = copy.deepcopy(m)
    assert K.patch(m, KERNELS)
    ids = torch.randint(3, 300, (2, 12), generator=torch.Generator().manual_seed(0))
    s, n = K.causal_lm_loss(m, ids, ids)
    (s / n).backward()
    ref = unpatched(input_ids=ids, labels=ids).loss
    ref.backward()
    # within the int8-flip floor (qat_helpers; a flip here: LoRA, draw 3 under ATEN_CPU_CAPABILITY=default)
    assert abs((s / n).item() - ref.item()) / ref.item() < FLIP_LOSS
    grads = {k: p.grad for k, p in m.named_parameters() if p.grad is not None}
    ref_grads = {k: p.grad for k, p in unpatched.named_parameters() if p.grad is not None}
    assert set(grads) == set(ref_grads) and sum(k.endswith("log_scale") for k in grads) == 15  # 7 x 2 layers + head
    for k, g in grads.items():
        assert rel_err(g, ref_grads[k]) < FLIP_GRAD, (k, rel_err(g, ref_grads[k]))


@pytest.mark.parametrize("bias", [False, True])
def test_fused_linear_function_matches_the_autograd_learned_quantizer(bias):
    """A learned-scale linear runs in the fused linear Function (fq(W) rebuilt in the backward, the scale
    gradient reduced from its own dW): output and gradients of x, W, b and the scales as plain autograd through
    the reference LearnedScaleFakeQuant gives them."""
    from edgeft.kernels.fake_quant import act_fake_quant
    from edgeft.qat.prepare import FakeQuantLinear

    torch.manual_seed(0)
    seq = torch.nn.Sequential(torch.nn.Linear(96, 40, bias=bias))
    qat.prepare(seq, "int8-int4", weight_scale="learned")
    layer = seq[0]
    assert isinstance(layer, FakeQuantLinear)
    with torch.no_grad():
        layer.weight_fake_quantizer.log_scale.normal_(0, 0.3)
    x = torch.randn(3, 7, 96, requires_grad=True)
    g = torch.randn(3, 7, 40)
    layer(x).backward(g)
    got = {"x": x.grad, "w": layer.weight.grad, "t": layer.weight_fake_quantizer.log_scale.grad}
    if bias:
        got["b"] = layer.bias.grad
    for t in (x, layer.weight, layer.bias, layer.weight_fake_quantizer.log_scale):
        if t is not None:
            t.grad = None
    spec, q = layer.activation_fake_quantizer.spec, layer.weight_fake_quantizer
    ref = F.linear(
        act_fake_quant(x, spec), learned_fake_quant(layer.weight, q.log_scale, q.init_scale, q.spec), layer.bias
    )
    ref.backward(g)
    want = {"x": x.grad, "w": layer.weight.grad, "t": layer.weight_fake_quantizer.log_scale.grad}
    if bias:
        want["b"] = layer.bias.grad
    for k in got:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6, msg=k)


def test_quantizer_follows_its_scales_through_optimizer_steps():
    """The quantizer keeps its scales per optimizer step (kernels.learned_scale.ScaleCache): after each step of
    edgeft's optimizer (fused AdamW, which leaves version counters alone) the layers and the convert-time scales
    are the reference's on the updated log-scales."""
    import edgeft.kernels as K
    from edgeft.training.optim import build_optimizer

    m = tiny_model("llama", lora=False)
    m.requires_grad_(True)
    qat.prepare(m, "int8-int4", weight_scale="learned")
    assert K.patch(m, KERNELS)
    opt = build_optimizer(m, lr=1e-2, weight_decay=0.0, scale_lr=1e-2)  # edgeft's: fused AdamW
    ids = torch.randint(3, 300, (2, 12), generator=torch.Generator().manual_seed(0))
    layer = m.model.layers[0].self_attn.q_proj
    q = layer.weight_fake_quantizer
    quantizers = [mod for mod in m.modules() if isinstance(mod, LearnedWeightFakeQuantizer)]
    bank = q.scales.bank  # prepare's one bank for the model
    assert len(quantizers) > 1 and bank.entries == [fq.scales for fq in quantizers]
    before = bank.refreshes
    for _ in range(2):
        s, n = K.causal_lm_loss(m, ids, ids)
        (s / n).backward()
        # one refresh for all quantizers per optimizer step, whoever asks first (forward, recompute, backward, the
        # checks below)
        assert bank.refreshes == before + 1
        for fq in quantizers:  # what the step used is what convert writes
            assert torch.equal(fq.scales.value, fq.scale(layer.weight.dtype))
        opt.step()
        opt.zero_grad()
        before = bank.refreshes
        want = learned_fake_quant(layer.weight, q.log_scale, q.init_scale, q.spec)
        assert torch.equal(q(layer.weight), want)
        assert torch.equal(q.scale(layer.weight.dtype), q.fused().scale(layer.weight.dtype))
    assert q.log_scale.abs().max() > 0  # the scales did move


def test_a_quantizer_alone_has_a_bank_of_its_own_and_copies_get_their_own():
    """Outside prepare (tests, sensitivity code) a quantizer works on its own bank; a deep copy of a prepared model
    gets one bank for its own quantizers, apart from the original's."""
    import copy

    w = _weights()
    q = LearnedWeightFakeQuantizer(SPEC, w)
    assert q.scales.bank.entries == [q.scales]
    with torch.no_grad():
        q.log_scale.normal_(0, 0.3)
    assert torch.equal(q(w), learned_fake_quant(w, q.log_scale, q.init_scale, SPEC))
    m = tiny_model("llama", lora=False)
    qat.prepare(m, "int8-int4", weight_scale="learned")
    twin = copy.deepcopy(m)
    (a, b) = ([mod.scales for mod in x.modules() if isinstance(mod, LearnedWeightFakeQuantizer)] for x in (m, twin))
    assert a[0].bank is not b[0].bank and b[0].bank.entries == b and a[0].bank.entries == a
