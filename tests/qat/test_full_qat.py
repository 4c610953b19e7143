"""Full fine-tuning + QAT: the same forward as torchao's QAT, straight-through gradients, the per-step weight cache
(gradient accumulation gives the uncached gradients, one quantization per weight per step), kernels in either order.
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from qat_helpers import FLIP_GRAD, FLIP_LOSS, rel_err, tiny_model
from torch import nn

import edgeft.kernels as K
from edgeft import qat
from edgeft.arch import kernel_specs
from edgeft.qat import fake_quant as R
from edgeft.qat.prepare import FakeQuantEmbedding, FakeQuantLinear, fake_quant_cache_stats

KERNELS = kernel_specs()


def _batches(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 300, (2, 10), generator=g) for _ in range(n)]


@pytest.mark.parametrize("tied", [False, True])
def test_gradient_accumulation_with_the_cache_equals_no_cache(tied):
    base = tiny_model("qwen3", lora=False, tie_word_embeddings=tied).requires_grad_(True)
    cached, uncached = copy.deepcopy(base), copy.deepcopy(base)
    qat.prepare(cached, "phone-deployment")
    qat.prepare(uncached, "phone-deployment", cache=False)
    n_linear = sum(isinstance(m, FakeQuantLinear) for m in cached.modules())
    assert n_linear == 2 * 7 + 1 and any(isinstance(m, FakeQuantEmbedding) for m in cached.modules())
    opts = [torch.optim.SGD(m.parameters(), lr=0.5) for m in (cached, uncached)]
    micro = 3
    for step in range(2):
        grads = []
        for m, opt in zip((cached, uncached), opts):
            for ids in _batches(micro, seed=step):
                (m(input_ids=ids, labels=ids).loss / micro).backward()
            grads.append({n: p.grad.clone() for n, p in m.named_parameters()})
            opt.step()
            opt.zero_grad()
        for n in grads[0]:
            assert torch.equal(grads[0][n], grads[1][n]), n
        stats = fake_quant_cache_stats(cached)
        # one quantization per weight per optimizer step; the other micro-batches' forwards and every backward
        # (which recomputes fq(W) instead of saving it) dequantize the same codes
        assert stats == {"misses": n_linear * (step + 1), "hits": n_linear * (2 * micro - 1) * (step + 1)}
    for a, b in zip(cached.parameters(), uncached.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("patched", [False, True], ids=["unpatched", "patched"])
def test_weight_cache_forms_train_identically(patched):
    """ "weights" keeps fq(W) for the step (no rebuild in the backward), "codes" dequantizes per use, "off"
    re-quantizes per use: the same bits, so the same gradients and updates, with each form's count of quantizations."""
    base = tiny_model("qwen3", lora=False, tie_word_embeddings=True).requires_grad_(True)
    models = {form: copy.deepcopy(base) for form in ("weights", "codes", "off")}
    for form, m in models.items():
        if patched:
            K.patch(m, KERNELS, checkpoint=None)
        qat.prepare(m, "phone-deployment", cache=form)
    n_linear = sum(isinstance(x, FakeQuantLinear) for x in base.modules()) or 2 * 7 + 1
    opts = {f: torch.optim.SGD(m.parameters(), lr=0.5) for f, m in models.items()}
    micro = 2
    for step in range(2):
        grads = {}
        for form, m in models.items():
            for ids in _batches(micro, seed=step):
                if patched:
                    s, n = K.causal_lm_loss(m, ids, ids)
                    (s / n / micro).backward()
                else:
                    (m(input_ids=ids, labels=ids).loss / micro).backward()
            grads[form] = {n: p.grad.clone() for n, p in m.named_parameters()}
            opts[form].step()
            opts[form].zero_grad()
        for form in ("codes", "off"):
            for n in grads["weights"]:
                assert torch.equal(grads["weights"][n], grads[form][n]), (form, n)
        stats = fake_quant_cache_stats(models["weights"])
        # one quantization per weight per step; the backward uses the kept weight without asking again
        assert stats == {"misses": n_linear * (step + 1), "hits": n_linear * (micro - 1) * (step + 1)}
    for n, p in models["weights"].named_parameters():
        assert torch.equal(p, dict(models["off"].named_parameters())[n]), n


def test_checkpointed_layers_save_the_quantized_weight_during_their_recompute():
    """Inside a checkpointed layer's recompute, rebuilding fq(W) in the backward would save nothing (the layer's
    backward follows at once), so the Functions keep it: per step, one quantization (the no-grad forward) and
    one dequantization (the recompute), none in the backward."""
    m = tiny_model("qwen3", lora=False, tie_word_embeddings=False).requires_grad_(True)
    ref = copy.deepcopy(m)
    K.patch(m, KERNELS, checkpoint="plain")
    K.patch(ref, KERNELS, checkpoint=None)
    qat.prepare(m, "int8-int4")
    qat.prepare(ref, "int8-int4")
    ids = _batches(1)[0]
    for model in (m, ref):
        s, n = K.causal_lm_loss(model, ids, ids)
        (s / n).backward()
    layer_linears = 2 * 7  # the head is outside the checkpointed layers
    stats = fake_quant_cache_stats(m)
    # the head (fused loss: its gradient is made in the forward) quantizes once and is not asked again
    assert stats == {"misses": layer_linears + 1, "hits": layer_linears}
    for (n, p), (_, q) in zip(m.named_parameters(), ref.named_parameters()):
        assert rel_err(p.grad, q.grad) < 1e-5, n


def _torchao_prepare(model, name):
    from torchao.quantization import quantize_
    from torchao.quantization.qat import QATConfig

    plan = qat.resolve(name)
    quantize_(model, plan.qat_prepare_config(), filter_fn=lambda m, fqn: type(m) is nn.Linear)
    if plan.embedding_config() is not None:
        quantize_(
            model, QATConfig(plan.embedding_config(), step="prepare"), filter_fn=lambda m, fqn: type(m) is nn.Embedding
        )


@pytest.mark.parametrize("scheme", ["phone-deployment", "int4", "int8"])
def test_forward_is_torchaos_qat_forward(scheme):
    model = tiny_model("llama", lora=False, tie_word_embeddings=True)
    ours, theirs = copy.deepcopy(model), copy.deepcopy(model)
    qat.prepare(ours, scheme)
    _torchao_prepare(theirs, scheme)
    ids = _batches(1)[0]
    with torch.no_grad():
        assert torch.equal(ours(input_ids=ids).logits, theirs(input_ids=ids).logits)


class RefLinear(nn.Module):
    """F.linear(fq_a(x), fq_w(W)) with identity gradients, by plain autograd (stands in for FakeQuantLinear)."""

    def __init__(self, m: FakeQuantLinear):
        super().__init__()
        self.weight, self.bias = m.weight, m.bias
        self.act = m.activation_fake_quantizer.spec if m.activation_fake_quantizer is not None else None
        self.spec = m.weight_fake_quantizer.spec

    def forward(self, x):
        if self.act is not None:
            x = R.ste(lambda t: R.act_ref(t, self.act), x)
        return F.linear(x, R.ste(lambda t: R.weight_ref(t, self.spec), self.weight), self.bias)


class RefEmbedding(nn.Module):
    def __init__(self, m: FakeQuantEmbedding):
        super().__init__()
        self.weight, self.spec = m.weight, m.spec

    def forward(self, ids):
        return R.ste(
            lambda t: R.weight_ref(t.reshape(-1, t.shape[-1]), self.spec).reshape(t.shape),
            F.embedding(ids, self.weight),
        )


def _reference(prepared):
    ref = copy.deepcopy(prepared)
    for name, mod in list(ref.named_modules()):
        new = (
            RefLinear(mod)
            if isinstance(mod, FakeQuantLinear)
            else (RefEmbedding(mod) if isinstance(mod, FakeQuantEmbedding) else None)
        )
        if new is not None:
            parent, _, child = name.rpartition(".")
            setattr(ref.get_submodule(parent) if parent else ref, child, new)
    return ref


@pytest.mark.parametrize("model_type", ["llama", "qwen3"])
@pytest.mark.parametrize("order", ["patch_then_prepare", "prepare_then_patch"])
def test_patched_full_qat_equals_the_reference(model_type, order):
    # int8-int4 rather than phone-deployment here: an int8 embedding puts the hidden states on a grid, where later
    # quantizers meet exact rounding ties and a 1e-7 difference between the fused and the stock RMSNorm flips
    # codes (each moving a value by a whole step); the unpatched model is compared exactly, with every scheme
    scheme = "int8-int4"
    m = tiny_model(model_type, lora=False, tie_word_embeddings=True).requires_grad_(True)
    unpatched = copy.deepcopy(m)
    qat.prepare(unpatched, scheme)
    ref = _reference(unpatched)
    if order == "patch_then_prepare":
        K.patch(m, KERNELS)
        qat.prepare(m, scheme)
    else:
        qat.prepare(m, scheme)
        K.patch(m, KERNELS)
    assert getattr(m, "_edgeft_fused_ce", False)  # the QAT head keeps the fused loss, in either order
    ids = _batches(1)[0]
    results = []
    for model, patched in ((m, True), (unpatched, False), (ref, False)):
        if patched:
            s, n = K.causal_lm_loss(model, ids, ids)
            loss = s / n
        else:
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        results.append((loss.item(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    ref_loss, ref_grads = results[-1]
    assert results[1][0] == ref_loss  # unpatched: the same operations as the plain-autograd reference
    assert all(torch.equal(g, ref_grads[n]) for n, g in results[1][1].items())
    loss, grads = results[0]  # the kernels: within the int8-flip floor (qat_helpers; a flip here: draw 8 on AVX2)
    assert abs(loss - ref_loss) / ref_loss < FLIP_LOSS
    assert set(grads) == set(ref_grads)
    for n, g in grads.items():
        assert rel_err(g, ref_grads[n]) < FLIP_GRAD, (n, rel_err(g, ref_grads[n]))


@pytest.mark.parametrize("scheme", ["phone-deployment", "int4", "int8"])
def test_straight_through_gradients_of_the_prepared_model(scheme):
    m = tiny_model("qwen3", lora=False, tie_word_embeddings=True).requires_grad_(True)
    qat.prepare(m, scheme)
    ref = _reference(m)
    ids = _batches(1)[0]
    m(input_ids=ids, labels=ids).loss.backward()
    ref(input_ids=ids, labels=ids).loss.backward()
    for (n, p), (_, q) in zip(m.named_parameters(), ref.named_parameters()):
        assert torch.equal(p.grad, q.grad), n


def test_unprepare_restores_modules_and_ties():
    m = tiny_model("qwen3", lora=False, tie_word_embeddings=True)
    keys = set(m.state_dict())
    replaced = qat.prepare(m, "phone-deployment")
    assert "lm_head" in replaced and "model.embed_tokens" in replaced
    assert m.lm_head.weight is m.model.embed_tokens.weight
    assert set(m.state_dict()) == keys
    qat.unprepare(m)
    assert type(m.lm_head) is nn.Linear and type(m.model.embed_tokens) is nn.Embedding
    assert m.lm_head.weight is m.model.embed_tokens.weight and set(m.state_dict()) == keys
    assert not qat.is_prepared(m)


def test_fake_quantized_head_copy_comes_out_of_the_loss_chunk_budget():
    from edgeft.kernels.cross_entropy import choose_chunk_rows
    from edgeft.kernels.patch import head_copy_chunk_rows, lm_head_operands

    m = tiny_model("qwen3", lora=False, vocab_size=4096)
    h = torch.randn(5000, 64)
    assert head_copy_chunk_rows(m.lm_head, h, m.lm_head.weight) is None  # no QAT: the loss chooses
    qat.prepare(m, "int8-int4")
    hq, w = lm_head_operands(m.lm_head, h)
    assert w is not m.lm_head.weight and not torch.equal(hq, h)
    rows = head_copy_chunk_rows(m.lm_head, hq, w)
    budget_rows = choose_chunk_rows(1 << 30, 4096, 4, h.device)
    # (chunk + copy) fits the budget the loss has without QAT
    assert rows * 4096 * 4 + w.numel() * w.element_size() <= budget_rows * 4096 * 4 and rows % 64 == 0


def test_a_large_head_copy_never_shrinks_the_loss_chunks_below_half():
    """A copy as large as the chunk budget (Llama-3.2-1B's 128k x 2048 head) once shrank the chunks to 64 rows,
    i.e. 128 full-size fp32 gradient accumulations per step; a copy a "weights" cache holds all step costs nothing."""
    from edgeft.kernels.cross_entropy import choose_chunk_rows
    from edgeft.kernels.patch import head_copy_chunk_rows, lm_head_operands

    for cache, trained in (("codes", True), ("weights", False), ("weights", True)):
        m = tiny_model(
            "qwen3",
            lora=False,
            vocab_size=4096,
            hidden_size=4096,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            head_dim=32,
        ).requires_grad_(trained)
        qat.prepare(m, "int8-int4", cache=cache)
        h = torch.randn(4096, 4096)
        _, w = lm_head_operands(m.lm_head, h)
        rows = head_copy_chunk_rows(m.lm_head, h, w)
        own = choose_chunk_rows(1 << 30, 4096, 4, h.device)
        assert w.numel() * w.element_size() >= own * 4096 * 4  # the copy alone fills the budget
        if cache == "weights" and trained:
            assert rows is None
        else:
            assert rows >= own // 2, (cache, rows, own)
