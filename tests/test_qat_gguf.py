"""QAT-matched GGUF: the gguf-q4_0 preset trains on Q4_0's exact grid, and the GGUF holds the trained integers.

References are independent of the exporter: the file is read back with gguf-py's reader and dequantizers, the
llama.cpp q/k row order is undone with an index map written out here, the raw Q4_0 bytes are decoded by hand
from ggml's block layout, and the grid is checked against a hand-written fp16-scale int4 quantizer.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from peft import LoraConfig, get_peft_model

pytest.importorskip("gguf")
pytest.importorskip("llama_cpp")

import gguf  # noqa: E402
from gguf.quants import dequantize  # noqa: E402

from edgeft import qat  # noqa: E402
from edgeft.errors import EdgeftError  # noqa: E402
from edgeft.exporters import gguf as gguf_export  # noqa: E402
from edgeft.models import load_model, resolve_model  # noqa: E402


def _lora(model):
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", lora_dropout=0.0))
    g = torch.Generator().manual_seed(1)
    for n, p in model.named_parameters():
        if "lora_B" in n:  # peft starts B at zero; make the adapter matter
            p.data = torch.randn(p.shape, generator=g) * 0.02
    return model


def ref_q4_0_grid(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int4, blocks of 32, fp16 scale = fp16(max|w| / 7.5), q = round(w * fp16(1 / scale)) in [-8, 7].

    torchao rounds the reciprocal to the scale's dtype (``1.0 / scale`` on an fp16 tensor), so this does too.
    """
    g = w.float().reshape(w.shape[0], -1, 32)
    s16 = (g.abs().amax(-1, keepdim=True) / 7.5).to(torch.float16)
    inv = (1.0 / s16).float()
    q = torch.clamp(torch.round(g * inv), -8, 7)
    return q.reshape(w.shape), s16.squeeze(-1)


def hf_row_of_file_row(n_rows: int, n_head: int) -> torch.Tensor:
    """llama.cpp's interleaved RoPE rows: file row h*D + 2i is HF row h*D + i, file row h*D + 2i + 1 is HF
    row h*D + D/2 + i (D = rows per head)."""
    d = n_rows // n_head
    idx = torch.empty(n_rows, dtype=torch.long)
    for h in range(n_head):
        for i in range(d // 2):
            idx[h * d + 2 * i] = h * d + i
            idx[h * d + 2 * i + 1] = h * d + d // 2 + i
    return idx


def read_gguf(path: Path, cfg) -> dict[str, tuple[np.ndarray, torch.Tensor, str]]:
    """GGUF name -> (raw bytes per row in file order, dequantized weight in HF row order, type name)."""
    out = {}
    for t in gguf.GGUFReader(str(path)).tensors:
        raw = np.array(t.data, copy=True)
        w = torch.from_numpy(np.array(dequantize(raw, t.tensor_type), dtype=np.float32))
        w = w.reshape(tuple(int(x) for x in reversed(t.shape)))
        if cfg.model_type == "llama" and t.name.endswith(("attn_q.weight", "attn_k.weight")):
            heads = cfg.num_attention_heads if "attn_q" in t.name else cfg.num_key_value_heads
            hf = torch.empty_like(w)
            hf[hf_row_of_file_row(w.shape[0], heads)] = w
            w = hf
        out[t.name] = (raw, w, t.tensor_type.name)
    return out


def hf_to_gguf_name(hf: str) -> str:
    if hf == "lm_head.weight":
        return "output.weight"
    if hf == "model.embed_tokens.weight":
        return "token_embd.weight"
    parts = hf.split(".")  # model.layers.N.self_attn.q_proj.weight
    names = {
        "q_proj": "attn_q",
        "k_proj": "attn_k",
        "v_proj": "attn_v",
        "o_proj": "attn_output",
        "gate_proj": "ffn_gate",
        "up_proj": "ffn_up",
        "down_proj": "ffn_down",
    }
    return f"blk.{parts[2]}.{names[parts[4]]}.weight"


# --- the preset -------------------------------------------------------------------------------------


def test_gguf_presets_resolve_to_fp16_scale_grids():
    import torchao.quantization as tq

    plan = qat.resolve("gguf-q4_0")
    assert plan.scheme.name == "int4-fp16-scale" and plan.group_size == 32 and plan.embedding is None
    cfg = plan.linear_config()
    assert isinstance(cfg, tq.IntxWeightOnlyConfig) and cfg.scale_dtype == torch.float16
    assert cfg.weight_dtype == torch.int4 and cfg.granularity.group_size == 32
    act, w = plan.fake_quant_configs()
    assert act is None and w.scale_precision == torch.float16 and w.is_symmetric and w.group_size == 32
    q8 = qat.resolve("gguf-q8_0")
    assert q8.scheme.weight_dtype == "int8" and q8.linear_config().scale_dtype == torch.float16
    # Q4_0's block is fixed: no other group size
    with pytest.raises(EdgeftError, match="group size 64"):
        qat.resolve("gguf-q4_0", group_size=64)
    rows = {r["name"]: r for r in qat.describe()}
    assert "gguf" in rows["gguf-q4_0"]["exporters"] and "activations" in rows["gguf-q4_0"]["description"]
    # the existing schemes are untouched: torchao's inference, fp32 scales
    assert qat.resolve("int4").linear_config().scale_dtype is None


def test_fake_quant_grid_is_fp16_scale_int4_and_safe_on_zero_groups():
    torch.manual_seed(0)
    w = torch.randn(8, 128) * 0.05
    w[0, :32] = 0.0  # an all-zero group: torchao's fp16 reciprocal would give 0 * inf = NaN
    _, wcfg = qat.resolve("gguf-q4_0").fake_quant_configs()
    from torchao.quantization.qat.fake_quantizer import FakeQuantizerBase

    out = FakeQuantizerBase.from_config(wcfg)(w)
    assert torch.isfinite(out).all() and torch.equal(out[0, :32], torch.zeros(32))
    q, s16 = ref_q4_0_grid(w)
    ref = (q.reshape(8, -1, 32) * s16.float().unsqueeze(-1)).reshape(w.shape)
    torch.testing.assert_close(out[1:], ref[1:], rtol=0, atol=0)


@pytest.mark.parametrize("preset", ["gguf-q4_0", "gguf-q8_0"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fake_quant_equals_convert_with_zero_groups(preset, dtype):
    # bf16 weights: torchao computes the scale in bf16 before the fp16 cast, so the floor must survive bf16 too
    from torchao.quantization import quantize_
    from torchao.quantization.qat.fake_quantizer import FakeQuantizerBase

    torch.manual_seed(0)
    w = (torch.randn(16, 256) * 0.05).to(dtype)
    w[0, :32] = 0.0
    w[3] = 0.0
    plan = qat.resolve(preset)
    out = FakeQuantizerBase.from_config(plan.fake_quant_configs()[1])(w)
    lin = torch.nn.Linear(256, 16, bias=False).to(dtype)
    lin.weight.data = w.clone()
    quantize_(lin, plan.linear_config())
    assert torch.isfinite(out).all()
    assert torch.equal(out, lin.weight.dequantize())


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_gguf_q4_0_converted_forward_equals_fake_quant(mode):
    torch.manual_seed(0)
    model, _ = load_model(resolve_model("tiny-llama"))
    if mode == "lora":
        model = _lora(model)
    replaced = qat.prepare(model, "gguf-q4_0")
    assert replaced and not any(r.startswith("skip:") for r in replaced)
    ids = torch.randint(0, 8192, (2, 20))
    with torch.no_grad():
        fq = model(input_ids=ids).logits
    converted, record = qat.convert(model)
    with torch.no_grad():
        real = converted(input_ids=ids).logits
    assert float((real - fq).norm() / fq.norm()) <= 1e-6
    w = converted.model.layers[1].mlp.down_proj.weight
    assert w.scale.dtype == torch.float16 and int(w.qdata.min()) >= -8 and int(w.qdata.max()) <= 7


# --- GGUF bit-exactness -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lora_q4_0(tmp_path_factory):
    """tiny-llama + LoRA, QAT-prepared with gguf-q4_0, converted, saved and exported as Q4_0."""
    out = tmp_path_factory.mktemp("qat_gguf")
    torch.manual_seed(0)
    model, tok = load_model(resolve_model("tiny-llama"))
    model = _lora(model)
    qat.prepare(model, "gguf-q4_0")
    converted, record = qat.convert(model)
    qat.save_converted(converted, tok, record, out / "converted")
    report = gguf_export.export(out / "converted", out / "m.gguf", quant="q4_0")
    return converted, record, report, out


def test_gguf_q4_0_file_equals_converted_model_bit_for_bit(lora_q4_0):
    converted, record, report, out = lora_q4_0
    assert not report["requantized_tensors"] and report["exact"]["scale_rounding_max_rel"] == 0.0
    assert sorted(report["exact_tensors"]) == sorted(hf_to_gguf_name(n + ".weight") for n in record["linears"])
    tensors = read_gguf(Path(report["path"]), converted.config)
    sd = converted.state_dict()
    for name in record["linears"]:
        t = sd[name + ".weight"]
        raw, w, qtype = tensors[hf_to_gguf_name(name + ".weight")]
        assert qtype == "Q4_0", name
        assert torch.equal(w, t.dequantize().float()), name  # identical numbers, not merely close
    # the raw ggml block of one unpermuted tensor, decoded by hand: fp16 d, low nibbles 0..15, high 16..31
    t = sd["model.layers.2.mlp.down_proj.weight"]
    raw = tensors["blk.2.ffn_down.weight"][0].reshape(t.shape[0], -1, 18)
    d = raw[..., :2].copy().view(np.float16)[..., 0]
    nib = np.concatenate([raw[..., 2:] & 0x0F, raw[..., 2:] >> 4], axis=-1).astype(np.int16) - 8
    assert np.array_equal(d, t.scale.reshape(t.shape[0], -1).numpy())
    assert np.array_equal(nib.reshape(t.shape), t.qdata.numpy().astype(np.int16))


def test_gguf_q4_0_llama_cpp_matches_converted_within_fidelity(lora_q4_0):
    _, _, report, _ = lora_q4_0
    v, spec = report["validation"], gguf_export.QUANTS["q4_0"]
    # the file is the converted model: llama.cpp's distance to it is bounded like its distance to the file
    assert v["tolerance"]["rel_err"] == spec.fidelity_rel_err and v["rel_err"] <= spec.fidelity_rel_err
    assert v["top1"] >= spec.fidelity_top1
    assert report["float_tensors"] == {"token_embd.weight": "Q8_0"}


@pytest.fixture(scope="module")
def int4_exports(tmp_path_factory):
    """tiny-qwen3 PTQ'd with the fp32-scale int4 scheme, exported exactly and re-rounded."""
    out = tmp_path_factory.mktemp("int4_gguf")
    model, tok = load_model(resolve_model("tiny-qwen3"))
    converted, record = qat.convert(model, "int4")
    qat.save_converted(converted, tok, record, out / "converted")
    exact = gguf_export.export(out / "converted", out / "exact.gguf", quant="q4_0")
    again = gguf_export.export(out / "converted", out / "again.gguf", quant="q4_0", exact=False)
    return converted, record, exact, again


def test_int4_scheme_is_exact_up_to_fp16_scale_rounding(int4_exports):
    converted, record, exact, _ = int4_exports
    tensors = read_gguf(Path(exact["path"]), converted.config)
    sd = converted.state_dict()
    worst = 0.0
    for name in record["linears"]:
        t = sd[name + ".weight"]
        _, w, qtype = tensors[hf_to_gguf_name(name + ".weight")]
        assert qtype == "Q4_0"
        s = t.scale.double().repeat_interleave(32, dim=1)
        q = t.qdata.double()
        # the trained integers times the fp16-rounded scale, exactly
        assert torch.equal(w.double(), q * s.to(torch.float16).double()), name
        conv = t.dequantize().double()  # fp32 q * s: rounded once more, by half an fp32 ulp at most
        err = (w.double() - conv).abs()
        assert bool((err <= q.abs() * (s - s.to(torch.float16).double()).abs() + conv.abs() * 2.0**-24).all()), name
        rel = (s.to(torch.float16).double() - s).abs() / s
        worst = max(worst, float(rel[s >= 2.0**-14].max()))
    assert 0 < worst <= 2.0**-11  # fp16's unit roundoff
    assert exact["exact"]["scale_rounding_max_rel"] == pytest.approx(worst, rel=1e-3)


def test_exact_export_is_closer_to_the_converted_model_than_rerounding(int4_exports):
    _, record, exact, again = int4_exports
    assert len(again["requantized_tensors"]) == len(record["linears"]) and not again["exact_tensors"]
    assert "quantized again" in again["note"]
    ve, va = exact["validation"], again["validation"]
    assert ve["rel_err"] < va["rel_err"] / 3, (ve, va)
    assert ve["top1"] >= va["top1"]


def test_int8_embedding_and_int4_linears_in_q8_0(tmp_path):
    # phone-deployment: int8 per-channel embeddings + int4 linears; Q8_0 blocks hold both grids exactly
    model, tok = load_model(resolve_model("tiny-llama"))
    converted, record = qat.convert(model, "phone-deployment")
    qat.save_converted(converted, tok, record, tmp_path / "converted")
    r = gguf_export.export(tmp_path / "converted", tmp_path / "m.gguf", quant="q8_0")
    assert "token_embd.weight" in r["exact_tensors"] and not r["requantized_tensors"] and not r["float_tensors"]
    tensors = read_gguf(Path(r["path"]), converted.config)
    sd = converted.state_dict()
    for hf in ["model.embed_tokens.weight", "lm_head.weight", "model.layers.0.self_attn.k_proj.weight"]:
        t = sd[hf]
        _, w, qtype = tensors[hf_to_gguf_name(hf)]
        assert qtype == "Q8_0"
        s16 = t.scale.to(torch.float16).float().repeat_interleave(t.block_size[1], dim=1)
        assert torch.equal(w, t.qdata.float() * s16), hf


def test_exact_check_refuses_a_corrupted_tensor(tmp_path, lora_q4_0):
    # a layout bug after packing (rows scrambled) is caught by reading the file back, before llama.cpp runs
    _, _, _, out = lora_q4_0
    with pytest.raises(EdgeftError, match="blk.1.ffn_up.weight read back from the file differs"):
        gguf_export.export(out / "converted", tmp_path / "bad.gguf", quant="q4_0", _corrupt="blk.1.ffn_up.weight")
    assert not list(tmp_path.iterdir())
