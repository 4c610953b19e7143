"""QAT on Phi-3's fused projections (one qkv_proj, one gate_up_proj): names, the kernels' fast path, convert.

Fused projections quantize like any linear (groups run along the input dimension, so fusing outputs changes no
group); what is specific is that ``--qat-int8`` names them (``qkv_proj``, ``gate_up_proj``), and that the kernels'
fused-attention and fused-MLP paths take the QAT modules there. Weight-only int4 is used so that the patched
and stock forwards compare at float rounding (int8 activations would flip codes on 1e-7 differences).
"""

import copy

import pytest
import torch
from qat_helpers import rel_err, tiny_model

import edgeft.kernels as K
from edgeft import qat
from edgeft.arch import kernel_specs
from edgeft.errors import EdgeftError

KERNELS = kernel_specs()
PHI3 = dict(partial_rotary_factor=0.75)  # Phi-4-mini: 3/4 of each head rotated


def _plan():
    return qat.resolve("int4", int8_modules=("qkv_proj",))


def test_int8_modules_name_the_fused_projections():
    m = tiny_model("phi3", lora=False, **PHI3)
    replaced = qat.prepare(m, _plan())
    assert "model.layers.0.self_attn.qkv_proj" in replaced and "model.layers.0.mlp.gate_up_proj" in replaced
    qkv = m.get_submodule("model.layers.0.self_attn.qkv_proj")
    gate_up = m.get_submodule("model.layers.0.mlp.gate_up_proj")
    assert qkv.weight_fake_quantizer.spec.bits == 8 and qkv.weight_fake_quantizer.spec.group_size is None
    assert gate_up.weight_fake_quantizer.spec.bits == 4
    with pytest.raises(EdgeftError, match="'q_proj' names no linear of this model; its linears: .*qkv_proj"):
        qat.prepare(tiny_model("phi3", lora=False), qat.resolve("int4", int8_modules=("q_proj",)))


@pytest.mark.parametrize("lora", [False, True])
@pytest.mark.parametrize("order", ["patch_then_prepare", "prepare_then_patch"])
def test_patched_qat_on_fused_projections_equals_stock(lora, order):
    m = tiny_model("phi3", lora=False, tie_word_embeddings=True, **PHI3)
    if lora:
        from peft import LoraConfig, get_peft_model

        m = get_peft_model(
            m,
            LoraConfig(
                r=4, lora_alpha=8, target_modules=["qkv_proj", "o_proj", "gate_up_proj", "down_proj"], lora_dropout=0.0
            ),
        )
        for n, p in m.named_parameters():
            if "lora_B" in n:
                torch.nn.init.normal_(p, std=0.1)
    else:
        m.requires_grad_(True)
    stock = copy.deepcopy(m)
    qat.prepare(stock, _plan())
    if order == "patch_then_prepare":
        assert K.patch(m, KERNELS)
        qat.prepare(m, _plan())
    else:
        qat.prepare(m, _plan())
        assert K.patch(m, KERNELS)
    ids = torch.randint(3, 300, (2, 12), generator=torch.Generator().manual_seed(0))
    s, n = K.causal_lm_loss(m, ids, ids)
    (s / n).backward()
    ref = stock(input_ids=ids, labels=ids).loss
    ref.backward()
    assert abs((s / n).item() - ref.item()) <= 1e-5 * ref.item()
    got = {k: p.grad for k, p in m.named_parameters() if p.grad is not None}
    want = {k: p.grad for k, p in stock.named_parameters() if p.grad is not None}
    assert set(got) == set(want) and any("qkv_proj" in k for k in got)
    worst = max(rel_err(got[k], want[k]) for k in want)
    assert worst < 1e-4, worst


def test_converted_fused_projections_equal_the_prepared_model():
    # weight-only: the converted integers x scales are the fake-quantized weights, so the logits agree to rounding
    m = tiny_model("phi3", lora=False, tie_word_embeddings=True, **PHI3).eval()
    prepared = copy.deepcopy(m)
    qat.prepare(prepared, _plan())
    converted, record = qat.convert(m, _plan())
    ids = torch.randint(3, 300, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = prepared.eval()(input_ids=ids).logits
        got = converted(input_ids=ids).logits
    assert rel_err(got, want) < 1e-5
    w = converted.get_submodule("model.layers.0.self_attn.qkv_proj").weight
    assert w.target_dtype == torch.int8 and list(w.block_size) == [1, w.shape[1]]  # int8 per output row
    w = converted.get_submodule("model.layers.0.mlp.gate_up_proj").weight
    assert w.target_dtype == torch.int4 and w.block_size[1] == 32
