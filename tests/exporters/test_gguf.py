"""GGUF exporter and llama.cpp runtime on the tiny models, against eager PyTorch and the HF tokenizer.

Every export here runs the exporter's own validation on llama.cpp; the tests check its numbers independently
(logits through GgufRuntime vs the eager model, greedy tokens, tokenization) and that broken conversions are
refused without touching an earlier good file.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("gguf")
llama_cpp = pytest.importorskip("llama_cpp")

from edgeft.devices.llamacpp_runtime import GgufRuntime  # noqa: E402
from edgeft.devices.runtimes import EagerRuntime, load_runtime  # noqa: E402
from edgeft.errors import EdgeftError  # noqa: E402
from edgeft.exporters import gguf as gguf_export  # noqa: E402
from edgeft.models import load_model, resolve_model  # noqa: E402

MODELS = ("tiny-llama", "tiny-qwen3")
TEXTS = [
    "Hello world, this is a test.",
    "  leading spaces, digits 1234567 and\nnew lines\t\ttabs  ",
    "Ünïcödé façade — “quotes” and emoji 🙂",
]


@pytest.fixture(scope="module")
def exports(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str], dict]:
    """Each tiny model exported (and validated by the exporter) at F16, Q8_0 and Q4_0."""
    out = tmp_path_factory.mktemp("gguf")
    reports = {}
    for name in MODELS:
        src = resolve_model(name)
        for quant in ("f16", "q8_0", "q4_0"):
            reports[name, quant] = gguf_export.export(src, out / f"{name}-{quant}.gguf", quant=quant)
    return reports


@pytest.fixture(scope="module")
def eager() -> dict[str, tuple]:
    return {name: load_model(resolve_model(name)) for name in MODELS}


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("quant", ["f16", "q8_0", "q4_0"])
def test_export_report_within_documented_tolerance(exports, name, quant):
    r = exports[name, quant]
    path = Path(r["path"])
    assert path.is_file() and r["bytes"] == path.stat().st_size
    assert r["quant"] == quant
    assert not list(path.parent.glob(f".{path.name}.tmp-*")), "temporary file left behind"
    v, spec = r["validation"], gguf_export.QUANTS[quant]
    assert v["fidelity_rel_err"] <= spec.fidelity_rel_err and v["fidelity_top1"] >= spec.fidelity_top1
    assert v["rel_err"] <= spec.rel_err and v["top1"] >= spec.top1
    # norms stay F32; weights carry the type (q4_0 keeps the output projection at Q8_0)
    main = {"f16": "F16", "q8_0": "Q8_0", "q4_0": "Q4_0"}[quant]
    assert r["tensor_types"]["F32"] > 0 and r["tensor_types"][main] > 0


@pytest.mark.parametrize("name", MODELS)
def test_sizes_shrink_with_bits(exports, name):
    sizes = [exports[name, q]["bytes"] for q in ("f16", "q8_0", "q4_0")]
    assert sizes[0] > sizes[1] > sizes[2]


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("quant", ["f16", "q8_0", "q4_0"])
def test_runtime_logits_match_eager(exports, eager, name, quant):
    model, tok = eager[name]
    ref_rt = EagerRuntime(model)
    rt = load_runtime("gguf", exports[name, quant]["path"], n_ctx=128)
    try:
        assert rt.name == "gguf"
        spec = gguf_export.QUANTS[quant]
        for text in TEXTS:
            ids = tok(text)["input_ids"]
            got, want = rt.logits(ids), ref_rt.logits(ids)
            assert got.dtype == torch.float32 and got.shape == want.shape == (len(ids), model.config.vocab_size)
            rel = float((got - want).norm() / want.norm())
            assert rel <= spec.rel_err, (text, rel)
            assert float((got.argmax(-1) == want.argmax(-1)).float().mean()) >= spec.top1
        # a fresh context each call: the same ids give the same logits after something else ran
        ids = tok(TEXTS[0])["input_ids"]
        first = rt.logits(ids)
        rt.logits(tok(TEXTS[1])["input_ids"])
        assert torch.equal(rt.logits(ids), first)
    finally:
        rt.close()


@pytest.mark.parametrize("name", MODELS)
def test_generate_equals_eager_greedy_f16(exports, eager, name):
    model, tok = eager[name]
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "Count: one two three"}], tokenize=False, add_generation_prompt=True
    )
    ids = tok(prompt, add_special_tokens=False)["input_ids"]
    want = EagerRuntime(model).generate(ids, 10, set())
    with GgufRuntime(exports[name, "f16"]["path"], n_ctx=128) as rt:
        got = rt.generate(ids, 10, set())
        assert got == want and len(got) == 10
        # a stop token ends generation and is not returned
        stopped = rt.generate(ids, 10, {want[3]})
        assert stopped == want[: want.index(want[3])]


@pytest.mark.parametrize("name", MODELS)
def test_tokenizer_and_chat_template_roundtrip(exports, eager, name):
    _, tok = eager[name]
    src = resolve_model(name)
    with GgufRuntime(exports[name, "q8_0"]["path"], n_ctx=64) as rt:
        for text in TEXTS:
            assert rt.tokenize(text, add_bos=True) == tok(text)["input_ids"], text
        chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2 + 2 = ?"}]
        rendered = tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
        assert rt.tokenize(rendered, add_bos=False) == tok(rendered, add_special_tokens=False)["input_ids"]
        meta = rt.metadata
        assert meta["tokenizer.chat_template"] == (src / "chat_template.jinja").read_text()
        assert meta["tokenizer.ggml.add_bos_token"] == ("true" if name == "tiny-llama" else "false")
        assert int(meta["tokenizer.ggml.eos_token_id"]) == tok.eos_token_id
        assert meta["general.architecture"] == {"tiny-llama": "llama", "tiny-qwen3": "qwen3"}[name]


def test_broken_conversion_refused_and_previous_file_kept(tmp_path):
    src = resolve_model("tiny-llama")
    out = tmp_path / "model.gguf"
    gguf_export.export(src, out, quant="f16")
    good = _sha(out)
    # without the q/k permutation llama.cpp's RoPE rotates the wrong pairs
    with pytest.raises(EdgeftError, match="validation failed.*rel. error"):
        gguf_export.export(src, out, quant="f16", _skip_qk_permute=True)
    assert _sha(out) == good
    # a tensor whose rows are scrambled after quantization (a layout bug) is caught at Q8_0 too
    with pytest.raises(EdgeftError, match="validation failed"):
        gguf_export.export(src, out, quant="q8_0", _corrupt="blk.2.ffn_down.weight")
    assert _sha(out) == good
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.gguf"]


def test_qwen3_corrupt_tensor_refused(tmp_path):
    with pytest.raises(EdgeftError, match="validation failed"):
        gguf_export.export(
            resolve_model("tiny-qwen3"), tmp_path / "m.gguf", quant="q4_0", _corrupt="blk.1.attn_k.weight"
        )
    assert not list(tmp_path.iterdir())


def test_unsupported_architecture_and_type_are_one_line_errors(tmp_path):
    src = resolve_model("tiny-llama")
    bad = _variant(tmp_path, "gpt2", architectures=["GPT2LMHeadModel"])
    with pytest.raises(EdgeftError, match="does not support architecture GPT2LMHeadModel") as e:
        gguf_export.export(bad, tmp_path / "x.gguf")
    assert "\n" not in str(e.value)
    with pytest.raises(EdgeftError, match="unknown GGUF type 'q3_x'"):
        gguf_export.export(src, tmp_path / "x.gguf", quant="q3_x")
    assert not (tmp_path / "x.gguf").exists()


@pytest.mark.parametrize(
    "weight_scale,int8", [("absmax", ()), ("mse", ()), ("mse", ("gate_proj", "up_proj")), ("learned", ())]
)
def test_converted_int8_int4_model_exports(tmp_path, weight_scale, int8):
    # "mse": the searched group scales reach the file as they are (the exact path compares every weight); int8
    # linears (per output channel) become Q8_0 blocks from their integers, exactly too; "learned": trained scales
    # (here max|w|'s, each moved by a random factor) the same way
    from edgeft import qat
    from edgeft.qat.fake_quant import WeightQuant, initial_scale

    model, tok = load_model(resolve_model("tiny-qwen3"))
    scales = None
    if weight_scale == "learned":
        g = torch.Generator().manual_seed(0)
        scales = {
            n: initial_scale(m.weight, WeightQuant("int", 4, 32))
            * torch.exp(torch.randn(m.out_features, m.in_features // 32, generator=g) * 0.2)
            for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear)
        }
    converted, record = qat.convert(
        model, qat.resolve("int8-int4", weight_scale=weight_scale, int8_modules=int8), scales
    )
    assert len(record["learned_scales"]) == (len(record["linears"]) if scales else 0)
    qat.save_converted(converted, tok, record, tmp_path / "converted")
    r = gguf_export.export(tmp_path / "converted", tmp_path / "m.gguf", quant="q4_0")
    v = r["validation"]
    assert r["source_scheme"] == "int8-int4" and "exact" in r["note"]
    # every trained linear is written from its integers; the float embedding goes Q8_0
    assert len(r["exact_tensors"]) == len(record["linears"]) and not r["requantized_tensors"]
    assert r["float_tensors"] == {"token_embd.weight": "Q8_0"}
    n_int8 = len(record["int8_linears"])
    assert n_int8 == converted.config.num_hidden_layers * len(int8) and r["tensor_types"].get("Q8_0") == 1 + n_int8
    # the file reproduces its own (dequantized) weights as tightly as any q4_0 export
    assert v["fidelity_rel_err"] <= gguf_export.QUANTS["q4_0"].fidelity_rel_err
    # the file is the converted model, so the source bound is the fidelity bound, plus the allowance for
    # torchao's int8 activations (llama.cpp quantizes activations its own way)
    assert v["tolerance"]["rel_err"] == pytest.approx(
        gguf_export.QUANTS["q4_0"].fidelity_rel_err + gguf_export.ACT_QUANT_ALLOWANCE["rel_err"]
    )


def _variant(tmp_path: Path, name: str, **changes) -> Path:
    """A copy of a built-in model directory with config.json changed."""
    d = tmp_path / name
    shutil.copytree(resolve_model("tiny-llama"), d)
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(changes)
    (d / "config.json").write_text(json.dumps(cfg))
    return d


def test_linear_rope_scaling_carried(tmp_path):
    # positions are divided by the factor in HF; llama.cpp must read the same from the metadata
    rope = {"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0}
    src = _variant(tmp_path, "linear", rope_parameters=rope)
    r = gguf_export.export(src, tmp_path / "lin.gguf", quant="f32")
    assert r["validation"]["fidelity_rel_err"] <= gguf_export.QUANTS["f32"].fidelity_rel_err
    with GgufRuntime(tmp_path / "lin.gguf", n_ctx=32) as rt:
        assert rt.metadata["llama.rope.scaling.type"] == "linear"
    unsupported = _variant(tmp_path, "yarn", rope_parameters={**rope, "rope_type": "yarn"})
    with pytest.raises(EdgeftError, match="RoPE scaling 'yarn'"):
        gguf_export.export(unsupported, tmp_path / "y.gguf", quant="f32")


_SPLIT = {"type": "Split", "behavior": "Isolated", "invert": False}
_BYTES = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}
PRE_TOKENIZERS = {
    "smollm": [{"type": "Digits", "individual_digits": True}, {**_BYTES, "use_regex": True}],
    "llama-bpe": [{**_SPLIT, "pattern": {"Regex": gguf_export.vocab._LLAMA3_RE}}, _BYTES],
    "qwen2": [{**_SPLIT, "pattern": {"Regex": gguf_export.vocab._QWEN2_RE}}, _BYTES],
}


@pytest.mark.parametrize("pre", sorted(PRE_TOKENIZERS))
def test_pre_tokenizer_variants_tokenize_like_hf(tmp_path, pre):
    # the tiny tokenizer re-wired with another pre-tokenizer: llama.cpp must split digits/words as HF does
    src = _variant(tmp_path, pre)
    tj = json.loads((src / "tokenizer.json").read_text())
    tj["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": PRE_TOKENIZERS[pre]}
    tj["model"]["ignore_merges"] = pre == "llama-bpe"  # llama.cpp's llama-bpe looks whole words up first
    (src / "tokenizer.json").write_text(json.dumps(tj))
    r = gguf_export.export(src, tmp_path / "m.gguf", quant="f16")
    assert r["tokenizer_pre"] == pre
    _, tok = load_model(src)
    with GgufRuntime(tmp_path / "m.gguf", n_ctx=64) as rt:
        for text in TEXTS:
            assert rt.tokenize(text) == tok(text)["input_ids"], text


# --- K-quants (llama.cpp's llama_model_quantize) ---------------------------------------------------------

K_QUANTS = {"q4_k_m": ("Q4_K", 0.15), "q5_k_m": ("Q5_K", 0.08), "q6_k": ("Q6_K", 0.04)}


@pytest.fixture(scope="module")
def k_exports(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    out = tmp_path_factory.mktemp("kquant")
    src = resolve_model("tiny-qwen3")
    return {q: gguf_export.export(src, out / f"m-{q}.gguf", quant=q) for q in K_QUANTS}


@pytest.mark.parametrize("quant", sorted(K_QUANTS))
def test_k_quant_export_validates_and_carries_the_type(k_exports, quant):
    r = k_exports[quant]
    path = Path(r["path"])
    v, spec = r["validation"], gguf_export.QUANTS[quant]
    assert v["fidelity_rel_err"] <= spec.fidelity_rel_err and v["rel_err"] <= spec.rel_err and v["top1"] >= spec.top1
    main = K_QUANTS[quant][0]
    assert r["tensor_types"][main] >= 20 and r["tensor_types"]["F32"] > 0  # norms stay F32
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")], "temporary file left behind"
    with GgufRuntime(path, n_ctx=64) as rt:
        assert int(rt.metadata["general.file_type"]) == int(getattr(llama_cpp, spec.llama_ftype))


def test_k_quant_sizes_and_logits(k_exports, eager):
    sizes = [k_exports[q]["bytes"] for q in ("q4_k_m", "q5_k_m", "q6_k")]
    assert sizes[0] < sizes[1] < sizes[2]
    model, tok = eager["tiny-qwen3"]
    ids = tok(TEXTS[0])["input_ids"]
    want = EagerRuntime(model).logits(ids)
    errs = []
    for q in ("q4_k_m", "q5_k_m", "q6_k"):
        with GgufRuntime(k_exports[q]["path"], n_ctx=64) as rt:
            got = rt.logits(ids)
        errs.append(float((got - want).norm() / want.norm()))
        assert errs[-1] <= gguf_export.QUANTS[q].rel_err, (q, errs[-1])
    assert errs[2] < errs[0]  # more bits, closer to the float model


@pytest.mark.parametrize("quant", sorted(K_QUANTS))
def test_k_quant_file_weights_are_the_model_weights(k_exports, eager, quant):
    # every tensor read back (gguf-py's K-quant dequantizers) is its source tensor within the type's rounding
    import gguf

    model, _ = eager["tiny-qwen3"]
    sd = model.state_dict()
    tmap = gguf.get_tensor_name_map(gguf.MODEL_ARCH.QWEN3, model.config.num_hidden_layers)
    by_gguf = {tmap.get_name(k, try_suffixes=(".weight", ".bias")): v for k, v in sd.items() if k != "lm_head.weight"}
    bound = K_QUANTS[quant][1]
    for t in gguf.GGUFReader(k_exports[quant]["path"]).tensors:
        w = gguf.quants.dequantize(np.array(t.data), t.tensor_type).reshape(tuple(reversed([int(x) for x in t.shape])))
        ref = by_gguf[t.name].float().numpy()
        rel = float(np.linalg.norm(w - ref) / np.linalg.norm(ref))
        assert rel <= (1e-6 if t.tensor_type.name == "F32" else bound), (t.name, t.tensor_type.name, rel)


def test_k_quant_broken_conversion_refused_at_f32(tmp_path):
    with pytest.raises(EdgeftError, match=r"f32 before q4_k_m.*rel. error"):
        gguf_export.export(resolve_model("tiny-llama"), tmp_path / "m.gguf", quant="q4_k_m", _skip_qk_permute=True)
    assert not list(tmp_path.iterdir())
