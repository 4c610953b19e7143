"""QAT: registry entries, fake-quant math against hand-written references, convert == fake-quant, LoRA merge."""

import json

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model

from edgeft import qat
from edgeft.errors import EdgeftError
from edgeft.models import load_model, resolve_model


def ref_int4_group_sym(w: torch.Tensor, gs: int) -> torch.Tensor:
    """Symmetric int4 per-group grid written out by hand: scale = max|w| / 7.5, q in [-8, 7]."""
    g = w.reshape(w.shape[0], -1, gs)
    scale = (g.abs().amax(-1, keepdim=True) / 7.5).clamp(min=torch.finfo(torch.float32).smallest_normal)
    return (torch.clamp(torch.round(g * (1.0 / scale)), -8, 7) * scale).reshape(w.shape)


def ref_int8_token_asym(x: torch.Tensor) -> torch.Tensor:
    """Asymmetric int8 per-token dynamic activations: range includes 0, 255 steps, zero point in [-128, 127]."""
    mn = x.amin(-1, keepdim=True).clamp(max=0)
    mx = x.amax(-1, keepdim=True).clamp(min=0)
    scale = ((mx - mn) / 255).clamp(min=torch.finfo(torch.float32).eps)
    zp = torch.clamp(-128 - torch.round(mn / scale), -128, 127)
    q = torch.clamp(torch.round(x / scale) + zp, -128, 127)
    return (q - zp) * scale


def test_registry_entries_resolve_and_build_configs():
    rows = qat.describe()
    assert {r["name"] for r in rows} >= {"int8-int4", "int4", "int8", "fp8-int4", "fp8-fp8", "phone-deployment"}
    for name in qat.SCHEMES:
        plan = qat.resolve(name)
        assert plan.scheme.name == name
        if not plan.scheme.cuda_convert_only:
            assert plan.linear_config() is not None
    phone = qat.resolve("phone-deployment")
    assert phone.scheme.name == "int8-int4" and phone.embedding == "int8-per-channel" and phone.full_finetuning
    assert qat.resolve("int4", group_size=128).group_size == 128


def test_unknown_scheme_and_group_size():
    with pytest.raises(EdgeftError, match="unknown QAT scheme 'int3'"):
        qat.resolve("int3")
    with pytest.raises(EdgeftError, match="group size 48"):
        qat.resolve("int8-int4", group_size=48)


def test_weight_scale_choices_and_their_record():
    with pytest.raises(EdgeftError, match="unknown weight scale 'l1'"):
        qat.resolve("int4", weight_scale="l1")
    for name in ("int8", "fp8-int4", "fp8-fp8", "gguf-q4_0"):  # int8 rows, fp8, or fp16 scales torchao re-rounds
        with pytest.raises(EdgeftError, match="needs int4 weights"):
            qat.resolve(name, weight_scale="mse")
    plan = qat.resolve("phone-deployment", group_size=64, weight_scale="mse")
    assert qat.QATPlan.from_dict(plan.to_dict()) == plan
    old = {k: v for k, v in plan.to_dict().items() if k not in ("weight_scale", "int8_modules")}  # older records
    assert qat.QATPlan.from_dict(old).weight_scale == "absmax" and not qat.QATPlan.from_dict(old).int8_modules


def test_int8_modules_choices():
    plan = qat.resolve("int8-int4", int8_modules=["down_proj", "down_proj"])
    assert plan.int8_modules == ("down_proj",) and plan.is_int8("model.layers.3.mlp.down_proj")
    assert not plan.is_int8("model.layers.3.mlp.up_proj")
    assert qat.QATPlan.from_dict(json.loads(json.dumps(plan.to_dict()))) == plan  # through scheme.json
    for name in ("int8", "fp8-int4", "gguf-q4_0"):
        with pytest.raises(EdgeftError, match="int8 modules need int4"):
            qat.resolve(name, int8_modules=["down_proj"])
    with pytest.raises(EdgeftError, match="linear names such as down_proj"):
        qat.resolve("int4", int8_modules=["mlp.down-proj"])
    one = qat.resolve("int4", int8_modules=["layers.3.mlp.down_proj"])  # a path: that linear only
    assert one.is_int8("model.layers.3.mlp.down_proj") and not one.is_int8("model.layers.13.mlp.down_proj")
    model, _ = load_model(resolve_model("tiny-llama"))
    with pytest.raises(EdgeftError, match="'ffn_down' names no linear of this model; its linears: down_proj"):
        qat.prepare(model, "int4", int8_modules=("ffn_down",))
    with pytest.raises(EdgeftError, match="'ffn_down' names no linear"):
        qat.quantize(model, qat.resolve("int4", int8_modules=("ffn_down",)))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU refusal")
def test_fp8_is_refused_on_cpu_before_training():
    with pytest.raises(EdgeftError, match="only on a CUDA GPU"):
        qat.check_convertible(qat.resolve("fp8-int4"))


def _lora(model):
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", lora_dropout=0.0))
    g = torch.Generator().manual_seed(1)
    for n, p in model.named_parameters():
        if "lora_B" in n:  # peft starts B at zero; make the adapter matter
            p.data = torch.randn(p.shape, generator=g) * 0.02
    return model


def test_lora_forward_fake_quantizes_the_merged_weight():
    torch.manual_seed(0)
    model, _ = load_model(resolve_model("tiny-llama"))
    model = _lora(model)
    qat.prepare(model, "int8-int4")
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, qat.MergedFakeQuantLoraLinear)
    x = torch.randn(3, 5, 256)
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    delta = torch.zeros_like(layer.base_layer.weight)
    for k in range(a.shape[0]):  # the merge's definition: fp32, summed over the rank in order, scaled once
        delta = delta + b[:, k : k + 1] * a[k : k + 1, :]
    w = layer.base_layer.weight + delta * layer.scaling
    expected = F.linear(ref_int8_token_asym(x), ref_int4_group_sym(w, 32))
    torch.testing.assert_close(layer(x), expected, rtol=0, atol=1e-5)
    # the same weight convert writes
    torch.testing.assert_close(layer.merged_weight(), w, rtol=0, atol=0)


def test_lora_qat_gradients_reach_adapters_only():
    model, _ = load_model(resolve_model("tiny-llama"))
    model = _lora(model)
    qat.prepare(model, "int8-int4")
    ids = torch.randint(0, 8192, (2, 12))
    model(input_ids=ids, labels=ids).loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert grads and all("lora_" in n for n in grads)
    assert all(g.abs().sum() > 0 for n, g in grads.items() if "lora_A" in n)


def test_unprepare_restores_peft_modules_and_state_dict_keys():
    model, _ = load_model(resolve_model("tiny-llama"))
    model = _lora(model)
    keys = set(model.state_dict())
    qat.prepare(model, "int4")
    assert set(model.state_dict()) == keys  # checkpoints keep PEFT's names while prepared
    qat.unprepare(model)
    from peft.tuners.lora import Linear as LoraLinear

    assert isinstance(model.base_model.model.model.layers[0].mlp.down_proj, LoraLinear)
    assert set(model.state_dict()) == keys


def test_lora_dropout_trains_the_merged_weight_plus_adapter_noise():
    model, _ = load_model(resolve_model("tiny-llama"))
    model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj"], lora_dropout=0.5))
    for n, p in model.named_parameters():
        if "lora_B" in n:
            p.data = torch.randn(p.shape) * 0.02
    qat.prepare(model, "int8-int4")
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, qat.MergedFakeQuantLoraLinear)
    x = torch.randn(4, 256)
    model.eval()  # no dropout: exactly the deployed forward
    w = layer.merged_weight()
    torch.testing.assert_close(layer(x), F.linear(ref_int8_token_asym(x), ref_int4_group_sym(w, 32)), rtol=0, atol=1e-5)
    model.train()
    torch.manual_seed(3)
    y = layer(x)
    xq = ref_int8_token_asym(x)
    torch.manual_seed(3)
    dropped = layer.lora_dropout["default"](xq)
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    noise = F.linear(F.linear(dropped - xq, a), b) * layer.scaling
    torch.testing.assert_close(y, F.linear(xq, ref_int4_group_sym(w, 32)) + noise, rtol=0, atol=1e-5)
    assert noise.abs().max() > 0


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen3"])
@pytest.mark.parametrize("mode", ["lora", "full"])
@pytest.mark.parametrize(
    "scheme",
    [
        "int8-int4",
        "int4",
        "int8",
        "phone-deployment",
        "phone-deployment:mse",
        "int4:mse",
        "phone-deployment:mse:gate_proj+up_proj",
        "int4::down_proj",
        "phone-deployment:learned",
        "int4:learned-mse:down_proj",
    ],
)
def test_converted_forward_equals_fake_quant_forward(tmp_path, name, mode, scheme):
    # ":mse": searched group scales, which convert hands torchao as custom scales; a third part: linears at int8
    scheme, weight_scale, int8 = (scheme.split(":") + ["", ""])[:3]
    int8_modules = tuple(int8.split("+")) if int8 else ()
    torch.manual_seed(0)
    model, tok = load_model(resolve_model(name))
    if mode == "lora":
        model = _lora(model)
    qat.prepare(model, scheme, weight_scale=weight_scale or "absmax", int8_modules=int8_modules)
    if weight_scale.startswith("learned"):  # as if trained: convert must write these scales, not its own choice
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n.endswith("log_scale"):
                    p.normal_(0, 0.2)
    ids = torch.randint(0, 8192, (2, 20))
    with torch.no_grad():
        fq = model(input_ids=ids).logits
    converted, record = qat.convert(model)
    assert record["linears"] and not record["skipped"]
    assert bool(record["learned_scales"]) == weight_scale.startswith("learned")
    with torch.no_grad():
        real = converted(input_ids=ids).logits
    rel = ((real - fq).norm() / fq.norm()).item()
    assert rel <= 1e-6, rel
    qat.save_converted(converted, tok, record, tmp_path / "converted")
    again, _, rec2 = qat.load_converted(tmp_path / "converted")
    assert rec2["plan"]["name"] == scheme and rec2["plan"]["weight_scale"] == (weight_scale or "absmax")
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=ids).logits, real, rtol=0, atol=0)
    from torchao.quantization import IntxUnpackedToInt8Tensor

    gate, down = again.model.layers[0].mlp.gate_proj.weight, again.model.layers[0].mlp.down_proj.weight
    assert isinstance(gate, IntxUnpackedToInt8Tensor)
    for mod, w in (("gate_proj", gate), ("down_proj", down)):  # int8 per output channel, or the scheme's grid
        int8 = mod in int8_modules or scheme == "int8"
        assert (w.target_dtype, w.block_size[1] == w.shape[1]) == ((torch.int8, True) if int8 else (torch.int4, False))
    assert len(rec2["int8_linears"]) == again.config.num_hidden_layers * len(int8_modules)
    assert isinstance(again.model.embed_tokens.weight, IntxUnpackedToInt8Tensor) == (scheme == "phone-deployment")


def test_ptq_quantizes_a_plain_model_with_the_same_grid():
    torch.manual_seed(0)
    model, _ = load_model(resolve_model("tiny-llama"))
    w = model.model.layers[1].self_attn.o_proj.weight.detach().clone()
    record = qat.quantize(model, "int4")
    q = model.model.layers[1].self_attn.o_proj.weight
    torch.testing.assert_close(q.dequantize(), ref_int4_group_sym(w, 32), rtol=0, atol=1e-6)
    assert "lm_head" in record["linears"]


def test_bf16_converted_model_loads_in_float32_with_the_same_integers(tmp_path):
    """A model trained in bf16 converts in bf16 (the trained grid); loading widens only the scales."""
    model, tok = load_model(resolve_model("tiny-llama"))
    model = model.to(torch.bfloat16)
    converted, record = qat.convert(model, "int8-int4")
    w = converted.model.layers[0].mlp.up_proj.weight
    qat.save_converted(converted, tok, record, tmp_path / "c")
    again, _, _ = qat.load_converted(tmp_path / "c")
    w2 = again.model.layers[0].mlp.up_proj.weight
    assert w2.dtype == torch.float32 and torch.equal(w2.qdata, w.qdata)
    assert torch.equal(w2.scale, w.scale.float())
    ids = torch.randint(0, 8192, (1, 12))
    with torch.no_grad():
        assert torch.isfinite(again(input_ids=ids).logits).all()
