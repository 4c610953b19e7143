"""GGUF export of Gemma3 text (tiny-gemma3) on llama.cpp, against the eager transformers model.

tiny-gemma3 alternates sliding-window (16 tokens) and global layers, has two RoPE bases, random (1 + w) norm
weights and tied embeddings. The texts here are longer than the window, and generation runs past it through
llama.cpp's KV cache, so a window that llama.cpp did not apply, or applied on the wrong layers, shows in the
logits. Each piece of Gemma3 metadata is also written wrong on purpose to prove the exporter refuses the file.
"""

from __future__ import annotations

import copy
import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch

gguf = pytest.importorskip("gguf")
pytest.importorskip("llama_cpp")

from edgeft.arch import FAMILIES  # noqa: E402
from edgeft.devices.llamacpp_runtime import GgufRuntime  # noqa: E402
from edgeft.devices.runtimes import EagerRuntime  # noqa: E402
from edgeft.errors import EdgeftError  # noqa: E402
from edgeft.exporters import gguf as gguf_export  # noqa: E402
from edgeft.models import load_model, resolve_model  # noqa: E402

NAME = "tiny-gemma3"
QUANTS = ("f32", "f16", "q8_0", "q4_0")
# 60-70 tokens with the tiny tokenizer: four times the sliding window
LONG = (
    "The river bends twice before the old mill, where the water slows and the fish gather in the shade. "
    "On market days 1,204 people cross the bridge, and the baker sells 37 loaves before noon."
)
TEXTS = [LONG, "Hello world, this is a test.", "  digits 1234567 and\nnew lines\t\ttabs  "]


@pytest.fixture(scope="module")
def eager() -> tuple:
    return load_model(resolve_model(NAME))


@pytest.fixture(scope="module")
def exports(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    out = tmp_path_factory.mktemp("gguf-gemma3")
    src = resolve_model(NAME)
    return {q: gguf_export.export(src, out / f"{NAME}-{q}.gguf", quant=q) for q in QUANTS}


def _variant(tmp_path: Path, name: str, **changes) -> Path:
    """A copy of tiny-gemma3's directory with config.json changed."""
    d = tmp_path / name
    shutil.copytree(resolve_model(NAME), d)
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(changes)
    (d / "config.json").write_text(json.dumps(cfg))
    return d


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).norm() / want.norm())


def test_texts_are_longer_than_the_window_and_the_window_matters(eager):
    model, tok = eager
    window = model.config.sliding_window
    assert model.config.layer_types == ["sliding_attention", "full_attention"] * 2
    ids = tok(LONG)["input_ids"]
    assert len(ids) > 3 * window
    # the exporter's own validation sequences cross the window too
    seqs, prompt, _ = gguf_export.validate._sequences(tok)
    assert max(len(s) for s in seqs) > 2 * window and len(prompt) > window
    # without the window the eager model is far from itself: a file that lost it cannot pass the bounds below
    cfg = copy.deepcopy(model.config)
    cfg.sliding_window = 4096
    no_window = type(model)(cfg).eval()
    no_window.load_state_dict(model.state_dict())
    with torch.no_grad():
        want = model(input_ids=torch.tensor([ids])).logits[0]
        got = no_window(input_ids=torch.tensor([ids])).logits[0]
    assert _rel(got, want) > 0.1


@pytest.mark.parametrize("quant", QUANTS)
def test_logits_match_eager(exports, eager, quant):
    model, tok = eager
    r, spec = exports[quant], gguf_export.QUANTS[quant]
    v = r["validation"]
    assert r["architecture"] == "Gemma3ForCausalLM"
    assert v["fidelity_rel_err"] <= spec.fidelity_rel_err and v["rel_err"] <= spec.rel_err
    ref = EagerRuntime(model)
    with GgufRuntime(r["path"], n_ctx=128, kv_cache="f32") as rt:
        for text in TEXTS:
            ids = tok(text)["input_ids"]
            got, want = rt.logits(ids), ref.logits(ids)
            assert got.shape == want.shape == (len(ids), model.config.vocab_size)
            assert _rel(got, want) <= spec.rel_err, (text[:20], _rel(got, want))
            assert float((got.argmax(-1) == want.argmax(-1)).float().mean()) >= spec.top1


@pytest.mark.parametrize("quant", ["f32", "f16"])
def test_greedy_past_the_window_equals_eager(exports, eager, quant):
    # prompt of 17 tokens + 24 generated: decoding through llama.cpp's KV cache crosses the 16-token window
    model, tok = eager
    ids = tok(LONG)["input_ids"][:17]
    want = EagerRuntime(model).generate(ids, 24, set())
    with GgufRuntime(exports[quant]["path"], n_ctx=64) as rt:
        assert rt.generate(ids, 24, set()) == want


def test_gemma3_metadata_and_norm_weights(exports, eager):
    model, _ = eager
    reader = gguf.GGUFReader(exports["f32"]["path"])
    meta = {k: f.contents() for k, f in reader.fields.items()}
    assert meta["general.architecture"] == "gemma3"
    assert meta["gemma3.attention.sliding_window"] == 16
    assert meta["gemma3.attention.sliding_window_pattern"] == [True, False, True, False]
    assert meta["gemma3.rope.freq_base"] == 1e6 and meta["gemma3.rope.freq_base_swa"] == 1e4
    assert meta["gemma3.attention.key_length"] == 64
    tensors = {t.name: t for t in reader.tensors}
    assert "output.weight" not in tensors  # tied: llama.cpp reuses token_embd
    # llama.cpp multiplies by the stored norm weight: the file holds HF's (1 + w), in F32
    sd = model.state_dict()
    for gname, hf in [
        ("blk.0.attn_q_norm.weight", "model.layers.0.self_attn.q_norm.weight"),
        ("blk.1.post_ffw_norm.weight", "model.layers.1.post_feedforward_layernorm.weight"),
        ("output_norm.weight", "model.norm.weight"),
    ]:
        t = tensors[gname]
        assert t.tensor_type.name == "F32"
        assert torch.equal(torch.from_numpy(t.data.copy()), 1.0 + sd[hf])
    # the embedding is stored unscaled: llama.cpp multiplies by sqrt(hidden) itself, as HF does
    emb = torch.from_numpy(tensors["token_embd.weight"].data.copy()).reshape(sd["model.embed_tokens.weight"].shape)
    assert torch.equal(emb, sd["model.embed_tokens.weight"])


def _wrong_writer(monkeypatch, method: str, value) -> None:
    orig = getattr(gguf.GGUFWriter, method)
    monkeypatch.setattr(gguf.GGUFWriter, method, lambda self, _v: orig(self, value))


@pytest.mark.parametrize(
    "broken",
    ["no norm offset", "no window", "all layers sliding", "local base = global base"],
)
def test_wrong_gemma3_conversion_is_refused(tmp_path, monkeypatch, broken):
    if broken == "no norm offset":
        spec = FAMILIES["gemma3_text"]
        monkeypatch.setitem(FAMILIES, spec.model_type, replace(spec, norm_offset=0.0))
    elif broken == "no window":
        _wrong_writer(monkeypatch, "add_sliding_window", 4096)
    elif broken == "all layers sliding":
        _wrong_writer(monkeypatch, "add_sliding_window_pattern", [True] * 4)
    else:
        _wrong_writer(monkeypatch, "add_rope_freq_base_swa", 1e6)
    with pytest.raises(EdgeftError, match=r"validation failed.*rel. error"):
        gguf_export.export(resolve_model(NAME), tmp_path / "m.gguf", quant="f32")
    assert not list(tmp_path.iterdir())


def _rope(**changes_by_type) -> dict:
    rp = copy.deepcopy(json.loads((resolve_model(NAME) / "config.json").read_text())["rope_parameters"])
    for layer_type, ch in changes_by_type.items():
        rp[layer_type].update(ch)
    return rp


# config.json changes (built lazily: the rope ones read the built-in model's config)
VARIANTS = {
    # each changes the eager model's logits by 0.2-0.7 (relative), so passing at f32 (<= 0.002) proves llama.cpp
    # read the key
    "pattern": lambda: dict(layer_types=["full_attention", "sliding_attention", "sliding_attention", "full_attention"]),
    "final softcap": lambda: dict(final_logit_softcapping=0.3),
    "linear rope on global layers": lambda: dict(
        rope_parameters=_rope(full_attention={"rope_type": "linear", "factor": 8.0})
    ),
    "local base 100": lambda: dict(rope_parameters=_rope(sliding_attention={"rope_theta": 100.0})),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_config_variants_carried(tmp_path, eager, variant):
    model, tok = eager
    src = _variant(tmp_path, variant.replace(" ", "-"), **VARIANTS[variant]())
    other, _ = load_model(src)
    ids = tok(LONG)["input_ids"]
    r = gguf_export.export(src, tmp_path / "v.gguf", quant="f32")
    assert r["validation"]["rel_err"] <= gguf_export.QUANTS["f32"].rel_err
    with GgufRuntime(tmp_path / "v.gguf", n_ctx=128, kv_cache="f32") as rt:
        got = rt.logits(ids)
    want, base = EagerRuntime(other).logits(ids), EagerRuntime(model).logits(ids)
    assert _rel(base, want) > 0.1  # the variant is a different model
    assert _rel(got, want) <= gguf_export.QUANTS["f32"].rel_err


@pytest.mark.parametrize(
    "changes,message",
    [
        (lambda: dict(query_pre_attn_scalar=100), "query_pre_attn_scalar 100 differs from the 64"),
        (lambda: dict(attn_logit_softcapping=50.0), "attn_logit_softcapping is not supported"),
        (lambda: dict(hidden_activation="silu"), "activation 'silu' is not supported"),
        (
            lambda: dict(rope_parameters=_rope(sliding_attention={"rope_type": "linear", "factor": 2.0})),
            "RoPE scaling 'linear' on sliding-window layers",
        ),
    ],
)
def test_unsupported_gemma3_configs_are_one_line_errors(tmp_path, changes, message):
    src = _variant(tmp_path, "bad", **changes())
    with pytest.raises(EdgeftError, match=message) as e:
        gguf_export.export(src, tmp_path / "x.gguf", quant="f32")
    assert "\n" not in str(e.value)
    assert not (tmp_path / "x.gguf").exists()


def test_k_quant_reads_norms_back(tmp_path):
    # llama.cpp quantizes an F32 file; the fidelity reference is read back from it, norms minus their offset
    r = gguf_export.export(resolve_model(NAME), tmp_path / "m.gguf", quant="q4_k_m")
    assert r["validation"]["fidelity_rel_err"] <= gguf_export.QUANTS["q4_k_m"].fidelity_rel_err
    assert r["tensor_types"]["F32"] == 4 * 6 + 1  # six norms per layer and the final one stay F32


def test_converted_int8_int4_exact(tmp_path):
    from edgeft import qat

    model, tok = load_model(resolve_model(NAME))
    converted, record = qat.convert(model, "int8-int4")
    qat.save_converted(converted, tok, record, tmp_path / "converted")
    r = gguf_export.export(tmp_path / "converted", tmp_path / "m.gguf", quant="q4_0")
    assert len(r["exact_tensors"]) == len(record["linears"]) and not r["requantized_tensors"]
    assert r["validation"]["fidelity_rel_err"] <= gguf_export.QUANTS["q4_0"].fidelity_rel_err
