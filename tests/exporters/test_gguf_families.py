"""GGUF export of the Llama 3.2, Mistral NeMo, Phi-4-mini and Phi-3-mini-4k shapes on llama.cpp, against eager.

The models are tiny random ones with the real configs' RoPE variants and shapes (family_models.py). What each
family needs from the file is checked independently here (llama.cpp's logits against the eager model, on a
sequence long enough for scaled RoPE to matter, and the metadata and generated tensors themselves), and each
piece is also left out or written wrong on purpose to show that the exporter's own validation refuses the file.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
pytest.importorskip("llama_cpp")

from edgeft import qat  # noqa: E402
from edgeft.devices.llamacpp_runtime import GgufRuntime  # noqa: E402
from edgeft.devices.runtimes import EagerRuntime  # noqa: E402
from edgeft.errors import EdgeftError  # noqa: E402
from edgeft.exporters import gguf as gguf_export  # noqa: E402
from edgeft.exporters.pte import _heldout_ids  # noqa: E402
from edgeft.models import load_model  # noqa: E402

from . import family_models as fm  # noqa: E402

F32 = gguf_export.QUANTS["f32"]
# (llama.cpp's own name hacks key on "phi3"/"phi-3" in general.name, which the run directory's name becomes:
# llama.cpp then expects Phi-3's SentencePiece tokens, which the tiny tokenizer lacks; hence "phimini")
FAMILIES = {
    "llama32": ("llama", fm.LLAMA32),
    "nemo": ("mistral", fm.MISTRAL_NEMO),
    "phi4mini": ("phi3", fm.PHI4_MINI),
    "phimini4k": ("phi3", fm.PHI3_MINI_4K),
}


@pytest.fixture(scope="module")
def sources() -> dict:
    return {name: fm.build(name, arch, cfg) for name, (arch, cfg) in FAMILIES.items()}


@pytest.fixture(scope="module")
def eager(sources) -> dict:
    return {name: load_model(src) for name, src in sources.items()}


@pytest.fixture(scope="module")
def f32(sources, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("gguf-families")
    return {name: gguf_export.export(src, out / f"{name}.gguf", quant="f32") for name, src in sources.items()}


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).norm() / want.norm())


def _meta(path) -> tuple[dict, dict]:
    reader = gguf.GGUFReader(str(path))
    return {k: f.contents() for k, f in reader.fields.items()}, {t.name: t for t in reader.tensors}


@pytest.mark.parametrize("name", FAMILIES)
def test_f32_logits_match_eager_far_into_the_context(f32, eager, name):
    model, tok = eager[name]
    r = f32[name]
    assert r["validation"]["rel_err"] <= F32.rel_err and r["validation"]["greedy_match"] == 12
    ids = _heldout_ids(tok)[:700]  # positions up to 700: scaled low frequencies have turned by then
    with GgufRuntime(r["path"], n_ctx=768, kv_cache="f32") as rt:
        got = rt.logits(ids)
    assert _rel(got, EagerRuntime(model).logits(ids)) <= F32.rel_err


def test_llama3_rope_factors_are_hf_frequencies(f32, eager):
    # llama.cpp divides each default frequency by rope_freqs[i]; HF's llama3 table is the reference
    model, _ = eager["llama32"]
    params = model.config.rope_parameters
    dims = model.config.head_dim
    default = 1.0 / params["rope_theta"] ** (torch.arange(0, dims, 2, dtype=torch.int64).float() / dims)
    want = (default / model.model.rotary_emb.inv_freq).numpy()
    factors = gguf_export.llama3_rope_factors(params, dims)
    np.testing.assert_allclose(factors, want, rtol=1e-5)
    assert factors.min() == 1.0 and factors.max() == 32.0 and ((factors > 1) & (factors < 32)).any()  # all 3 bands
    _, tensors = _meta(f32["llama32"]["path"])
    assert np.array_equal(tensors["rope_freqs.weight"].data, factors)
    assert "output.weight" not in tensors  # tied embeddings, as Llama 3.2 1B/3B


def test_phi3_metadata_and_fused_tensors(f32, eager):
    model, _ = eager["phi4mini"]
    meta, tensors = _meta(f32["phi4mini"]["path"])
    assert meta["general.architecture"] == "phi3"
    assert meta["phi3.rope.dimension_count"] == 48  # partial_rotary_factor 0.75 of head_dim 64
    assert meta["phi3.rope.scaling.original_context_length"] == 4096
    assert meta["phi3.rope.scaling.attn_factor"] == pytest.approx(model.model.rotary_emb.attention_scaling, rel=1e-6)
    assert meta["phi3.rope.scaling.attn_factor"] == pytest.approx((1 + np.log(32) / np.log(4096)) ** 0.5, rel=1e-6)
    rp = model.config.rope_parameters
    np.testing.assert_array_equal(tensors["rope_factors_long.weight"].data, np.float32(rp["long_factor"]))
    np.testing.assert_array_equal(tensors["rope_factors_short.weight"].data, np.float32(rp["short_factor"]))
    # llama.cpp's phi3 keeps Phi-3's fused projections: q, k, v rows in one tensor, gate then up in ffn_up
    sd = model.state_dict()
    qkv = tensors["blk.0.attn_qkv.weight"].data.reshape(sd["model.layers.0.self_attn.qkv_proj.weight"].shape)
    assert np.array_equal(qkv, sd["model.layers.0.self_attn.qkv_proj.weight"].numpy())
    assert tuple(tensors["blk.0.ffn_up.weight"].shape) == (256, 2 * 768)


def test_head_dim_other_than_hidden_over_heads(f32):
    meta, _ = _meta(f32["nemo"]["path"])
    assert meta["general.architecture"] == "llama"  # MistralForCausalLM is llama.cpp's LLAMA
    assert meta["llama.attention.key_length"] == meta["llama.rope.dimension_count"] == 32
    assert meta["llama.embedding_length"] // meta["llama.attention.head_count"] == 64


def test_a_window_llama_cpp_ignores_caps_the_context(f32):
    # Phi-3-mini-4k: a 2047-token window in a 4096 context; llama.cpp's phi3 disables sliding windows
    r = f32["phimini4k"]
    meta, _ = _meta(r["path"])
    assert meta["phi3.context_length"] == 2047
    assert len(r["warnings"]) == 1 and "context length is 2047" in r["warnings"][0]
    assert f32["nemo"]["warnings"] == [] and _meta(f32["nemo"]["path"])[0]["llama.context_length"] == 131072


def _rope_plan_changed(monkeypatch, change) -> None:
    plan = gguf_export.metadata._rope_plan

    def changed(*args, **kwargs):
        rope = plan(*args, **kwargs)
        change(rope)
        return rope

    monkeypatch.setattr(gguf_export.metadata, "_rope_plan", changed)


BROKEN = {
    "llama3 without rope_freqs": ("llama32", lambda r: r.tensors.clear()),
    "longrope without factors": ("phi4mini", lambda r: r.tensors.clear()),
    "longrope long and short swapped": (
        "phi4mini",
        lambda r: r.tensors.update(
            {
                "rope_factors_long.weight": r.tensors["rope_factors_short.weight"],
                "rope_factors_short.weight": r.tensors["rope_factors_long.weight"],
            }
        ),
    ),
    "longrope without attention factor": ("phi4mini", lambda r: setattr(r, "attn_factor", 1.0)),
}


@pytest.mark.parametrize("broken,quant", [(b, "f32") for b in BROKEN] + [("llama3 without rope_freqs", "f16")])
def test_rope_written_wrong_is_refused(sources, tmp_path, monkeypatch, broken, quant):
    # measured at f32: llama3 without rope_freqs 0.076 (0.008 on the short texts alone, hence the long sequence),
    # longrope without factors 0.75, swapped 0.87, attention factor 1: 0.46; the f16 bound is 0.01
    name, change = BROKEN[broken]
    _rope_plan_changed(monkeypatch, change)
    with pytest.raises(EdgeftError, match=r"validation failed.*rel. error"):
        gguf_export.export(sources[name], tmp_path / "m.gguf", quant=quant)
    assert not list(tmp_path.iterdir())


def test_longrope_long_factors_beyond_the_original_context(f32, eager):
    # past 4096 positions HF takes the long factors (by sequence length), llama.cpp too (by context size)
    model, tok = eager["phi4mini"]
    ids = (_heldout_ids(tok) * 2)[:4200]
    want = EagerRuntime(model).logits(ids)
    with GgufRuntime(f32["phi4mini"]["path"], n_ctx=4224, kv_cache="f32") as rt:
        got = rt.logits(ids)
    assert _rel(got, want) <= F32.rel_err
    with torch.no_grad():  # the same positions with the short factors: far apart, so the long ones were used
        short = model(input_ids=torch.tensor([ids[:4000]])).logits[0]
    assert _rel(short[-200:], want[3800:4000]) > 0.05


@pytest.mark.parametrize("quant", ["q8_0", "q4_k_m"])
def test_llama3_quantized(sources, tmp_path, quant):
    # q4_k_m goes through an F32 file that llama.cpp quantizes; the RoPE factors stay F32 and out of the reference
    r = gguf_export.export(sources["llama32"], tmp_path / "m.gguf", quant=quant)
    spec = gguf_export.QUANTS[quant]
    assert r["validation"]["fidelity_rel_err"] <= spec.fidelity_rel_err
    assert r["rope"]["tensors"] == ["rope_freqs.weight"]
    _, tensors = _meta(tmp_path / "m.gguf")
    assert tensors["rope_freqs.weight"].tensor_type.name == "F32"


def test_qat_fused_projections_exact_q4_0(sources, tmp_path):
    # Phi-3's fused qkv_proj at int8 per channel (--qat-int8 qkv_proj), the rest int4 groups: each written from
    # its trained integers, qkv as Q8_0 and gate_up as Q4_0, still fused as llama.cpp's phi3 reads them
    model, tok = load_model(sources["phi4mini"])
    plan = qat.resolve("int4", int8_modules=("qkv_proj",))
    converted, record = qat.convert(model, plan)
    src = qat.save_converted(converted, tok, record, tmp_path / "converted")
    r = gguf_export.export(src, tmp_path / "m.gguf", quant="q4_0")
    assert not r["requantized_tensors"] and "blk.1.attn_qkv.weight" in r["exact_tensors"]
    assert r["validation"]["fidelity_rel_err"] <= gguf_export.QUANTS["q4_0"].fidelity_rel_err
    assert r["validation"]["rel_err"] <= gguf_export.QUANTS["q4_0"].fidelity_rel_err  # exact: fidelity bounds
    _, tensors = _meta(tmp_path / "m.gguf")
    assert tensors["blk.0.attn_qkv.weight"].tensor_type.name == "Q8_0"
    assert tensors["blk.0.ffn_up.weight"].tensor_type.name == "Q4_0"


def test_unsupported_rope_for_the_family_is_one_line(sources, tmp_path):
    # llama.cpp's LLAMA reads llama3's rope_freqs, not LongRoPE's factor pairs (its PHI3 does)
    src = tmp_path / "src"
    shutil.copytree(sources["llama32"], src)
    cfg = json.loads((src / "config.json").read_text())
    cfg["rope_parameters"] = dict(
        rope_type="longrope",
        rope_theta=500000.0,
        original_max_position_embeddings=8192,
        short_factor=[1.0] * 32,
        long_factor=[4.0] * 32,
    )
    (src / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(EdgeftError, match="llama does not support RoPE scaling 'longrope'") as e:
        gguf_export.export(src, tmp_path / "m.gguf", quant="f32")
    assert "\n" not in str(e.value) and not (tmp_path / "m.gguf").exists()


def test_general_name_carries_llama_cpps_token_attributes_only_when_the_tokenizer_has_them(sources, tmp_path):
    # llama.cpp gives files named "*phi3*" Phi-3's token attributes (and then needs Phi-3's SentencePiece
    # tokens): a run of another family called so loads and tokenizes as HF, under a name without it
    src = tmp_path / "my-phi3-run"
    shutil.copytree(sources["llama32"], src)
    r = gguf_export.export(src, tmp_path / "m.gguf", quant="f32")
    assert r["validation"]["tokenizer_strings"] >= 3
    meta, _ = _meta(tmp_path / "m.gguf")
    assert meta["general.name"] == "my-phi_3-run"
