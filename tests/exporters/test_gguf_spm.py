"""GGUF export of SentencePiece-style tokenizers (llama.cpp's SPM tokenizer) against the HF tokenizer.

The tiny models come from ``spm_models`` (a SentencePiece BPE trained locally, no downloads): a Llama with the
Llama 2 style tokenizer (dummy prefix, ``<s>``), the same without ``tokenizer.model`` (scores derived from the
tokenizer.json merges), and a Gemma3 with the Gemma style tokenizer (no prefix, ``<bos>`` at id 2). Each is
exported (the exporter validates it) and then checked independently here: llama.cpp's token ids equal the HF
tokenizer's on varied text, its detokenization gives the text back, its logits and greedy tokens equal eager.
Files written with wrong scores or without byte types are refused; so are variants llama.cpp cannot mirror.
"""

from __future__ import annotations

import ctypes
import json
import shutil
from pathlib import Path

import pytest
import torch

gguf = pytest.importorskip("gguf")
llama_cpp = pytest.importorskip("llama_cpp")
pytest.importorskip("sentencepiece")

from edgeft.devices.llamacpp_runtime import GgufRuntime  # noqa: E402
from edgeft.errors import EdgeftError  # noqa: E402
from edgeft.exporters import gguf as gguf_export  # noqa: E402
from edgeft.models import load_model  # noqa: E402

from .spm_models import STYLES, USER_DEFINED, build_tiny  # noqa: E402

CASES = {  # name -> (style, arch, keep tokenizer.model)
    "llama": ("llama", "llama", True),
    "llama-json-only": ("llama", "llama", False),
    "gemma3": ("gemma", "gemma3_text", True),
}
PLAIN = [
    "Hello world, this is a test.",
    " one leading space",
    "   three leading spaces and trailing ones   ",
    "a  b   c    d",
    "\nnewline first\n\nthen two\r\nand CRLF\ttab",
    "digits 0 7 42 1234567 3.14159 and 1,000",
    "unicode needing bytes: Ünïcödé façade — “quotes” 🙂 日本語 Ωμέγα",
    "▁ a literal U+2581 and <0x41> written as text",
]


def _with_specials(style: str) -> list[str]:
    s = STYLES[style]
    start, end = s["chat"]
    return [
        f"{s['bos']}Hello{s['eos']} again",
        f"{start}user\nWhat is 2 + 2?{end}\n{start}assistant\n",
        f"call {USER_DEFINED}tool{USER_DEFINED} done",
        f"{end}{end} two ends then text",
    ]


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("spm")
    out = {}
    for name, (style, arch, keep) in CASES.items():
        if name == "llama-json-only":
            d = root / name
            shutil.copytree(out["llama"], d)
            (d / "tokenizer.model").unlink()
        else:
            d = build_tiny(root / name, style, arch=arch)
        out[name] = d
    return out


@pytest.fixture(scope="module")
def exports(built, tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    out = tmp_path_factory.mktemp("spm-gguf")
    return {name: gguf_export.export(d, out / f"{name}.gguf", quant="f32") for name, d in built.items()}


@pytest.fixture(scope="module")
def eager(built) -> dict[str, tuple]:
    return {name: load_model(d) for name, d in built.items()}


def _field(reader, key):
    f = reader.fields[key]
    if len(f.data) == 1 and key not in ("tokenizer.ggml.tokens", "tokenizer.ggml.scores", "tokenizer.ggml.token_type"):
        part = f.parts[f.data[0]]
        return bytes(part).decode() if part.dtype == "uint8" else part.tolist()[0]
    return [f.parts[i].tolist()[0] if f.parts[i].dtype != "uint8" else bytes(f.parts[i]).decode() for i in f.data]


def _detokenize(rt: GgufRuntime, ids: list[int]) -> str:
    """llama.cpp's llama_detokenize (remove_special, control tokens not rendered)."""
    vocab = llama_cpp.llama_model_get_vocab(rt._llm.model)
    arr = (llama_cpp.llama_token * len(ids))(*ids)
    buf = ctypes.create_string_buffer(64 * len(ids) + 64)
    n = llama_cpp.llama_detokenize(vocab, arr, len(ids), buf, len(buf), True, False)
    assert n >= 0
    return buf.raw[:n].decode("utf-8")


@pytest.mark.parametrize("name", CASES)
def test_spm_metadata(exports, eager, name):
    r = exports[name]
    assert r["tokenizer_pre"] == "default" and r["tokenizer_model"] == "llama"
    assert r["validation"]["tokenizer_strings"] >= 10
    model, tok = eager[name]
    reader = gguf.GGUFReader(r["path"])
    assert _field(reader, "tokenizer.ggml.model") == "llama"
    types = _field(reader, "tokenizer.ggml.token_type")
    scores = _field(reader, "tokenizer.ggml.scores")
    tokens = _field(reader, "tokenizer.ggml.tokens")
    assert len(types) == len(scores) == len(tokens) == model.config.vocab_size
    assert types.count(gguf.TokenType.BYTE) == 256
    assert all(types[tok.convert_tokens_to_ids(f"<0x{b:02X}>")] == gguf.TokenType.BYTE for b in range(256))
    assert types[tok.unk_token_id] == gguf.TokenType.UNKNOWN
    assert types[tok.bos_token_id] == types[tok.eos_token_id] == gguf.TokenType.CONTROL
    assert types[tok.convert_tokens_to_ids(USER_DEFINED)] == gguf.TokenType.USER_DEFINED
    assert types[-3:] == [gguf.TokenType.UNUSED] * 3  # the model's vocab is 3 larger than the tokenizer's
    assert len(set(scores)) > 1000  # real scores, not llama.cpp HF-vocab's -1000 everywhere
    assert _field(reader, "tokenizer.ggml.bos_token_id") == tok.bos_token_id
    assert _field(reader, "tokenizer.ggml.eos_token_id") == tok.eos_token_id
    assert _field(reader, "tokenizer.ggml.unknown_token_id") == tok.unk_token_id
    assert _field(reader, "tokenizer.ggml.add_bos_token") is True
    assert _field(reader, "tokenizer.ggml.add_space_prefix") is (CASES[name][0] == "llama")
    assert _field(reader, "tokenizer.chat_template") == tok.chat_template


def test_json_only_scores_order_like_the_sentencepiece_model(exports):
    """The merge-rank scores differ from the SentencePiece scores but order the merges the same way."""
    a = _field(gguf.GGUFReader(exports["llama"]["path"]), "tokenizer.ggml.scores")
    b = _field(gguf.GGUFReader(exports["llama-json-only"]["path"]), "tokenizer.ggml.scores")
    assert a != b
    types = _field(gguf.GGUFReader(exports["llama"]["path"]), "tokenizer.ggml.token_type")
    normal = [i for i, t in enumerate(types) if t == gguf.TokenType.NORMAL]
    floor = min(b[i] for i in normal)  # the tokens no merge makes (single characters)
    merged = [i for i in normal if b[i] > floor]
    assert len(merged) > 1000
    assert sorted(merged, key=lambda i: (-a[i], i)) == sorted(merged, key=lambda i: (-b[i], i))


@pytest.mark.parametrize("name", CASES)
def test_llama_cpp_tokenizes_like_hf(exports, eager, name):
    _, tok = eager[name]
    with GgufRuntime(exports[name]["path"], n_ctx=256) as rt:
        for text in PLAIN + _with_specials(CASES[name][0]):
            assert rt.tokenize(text, add_bos=True, special=True) == tok(text)["input_ids"], text
            assert rt.tokenize(text, add_bos=False, special=True) == tok(text, add_special_tokens=False)["input_ids"]
        chat = [{"role": "user", "content": " Hi, what's 2+2?"}, {"role": "assistant", "content": "4"}]
        rendered = tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
        want = tok(rendered, add_special_tokens=False)["input_ids"]
        assert rt.tokenize(rendered, add_bos=False, special=True) == want


@pytest.mark.parametrize("name", CASES)
def test_detokenization_round_trips(exports, eager, name):
    _, tok = eager[name]
    with GgufRuntime(exports[name]["path"], n_ctx=256) as rt:
        for text in PLAIN[:-1]:  # not the literal U+2581: it comes back as a space, in HF as in llama.cpp
            ids = tok(text, add_special_tokens=False)["input_ids"]
            assert _detokenize(rt, ids) == text
            assert tok.decode(ids) == text
            # with BOS llama.cpp keeps the prefix's space; BOS is never rendered
            prefix = " " if CASES[name][0] == "llama" else ""
            assert _detokenize(rt, [tok.bos_token_id, *ids]) == prefix + text


@pytest.mark.parametrize("name", CASES)
def test_logits_and_greedy_equal_eager(exports, eager, name):
    model, tok = eager[name]
    with GgufRuntime(exports[name]["path"], n_ctx=256, kv_cache="f32") as rt:
        for text in PLAIN[:3] + PLAIN[6:7]:
            ids = tok(text)["input_ids"]
            got = rt.logits(ids)
            with torch.no_grad():
                want = model(input_ids=torch.tensor([ids])).logits[0]
            assert float((got - want).norm() / want.norm()) < gguf_export.QUANTS["f32"].rel_err
        prompt = tok(PLAIN[0])["input_ids"]
        want = gguf_export.validate._eager_greedy(model, prompt, 12)
        assert rt.generate(prompt, 12, set()) == want


def test_wrong_scores_are_refused(built, tmp_path, monkeypatch):
    """llama.cpp's HF-vocab path writes -1000 for every score: the merges then go leftmost-first and the file
    tokenizes differently, so it is refused (an earlier good file stays)."""
    out = tmp_path / "m.gguf"
    out.write_bytes(b"previous")
    monkeypatch.setattr(gguf_export.vocab, "_spm_scores_from_merges", lambda model, by_id: {i: -1000.0 for i in by_id})
    with pytest.raises(EdgeftError, match="tokenizes .* differently"):
        gguf_export.export(built["llama-json-only"], out, quant="f32")
    assert out.read_bytes() == b"previous"


def test_missing_byte_types_are_refused(built, tmp_path, monkeypatch):
    """<0xXX> tokens written as NORMAL tokens detokenize as their text: refused by the detokenization check."""
    orig = gguf.GGUFWriter.add_token_types

    def no_bytes(self, types):
        orig(self, [gguf.TokenType.NORMAL if t == gguf.TokenType.BYTE else t for t in types])

    monkeypatch.setattr(gguf.GGUFWriter, "add_token_types", no_bytes)
    with pytest.raises(EdgeftError, match="tokenizes|detokenizes"):
        gguf_export.export(built["llama"], tmp_path / "m.gguf", quant="f32")
    assert not (tmp_path / "m.gguf").exists()


def test_wrong_space_prefix_is_refused(built, tmp_path, monkeypatch):
    monkeypatch.setattr(gguf_export.vocab, "_spm_space_prefix", lambda tok: False)
    with pytest.raises(EdgeftError, match="tokenizes .* differently"):
        gguf_export.export(built["llama-json-only"], tmp_path / "m.gguf", quant="f32")


def _edit_tokenizer_json(src: Path, dst: Path, edit) -> Path:
    shutil.copytree(src, dst)
    (dst / "tokenizer.model").unlink(missing_ok=True)
    tj = json.loads((dst / "tokenizer.json").read_text())
    edit(tj)
    (dst / "tokenizer.json").write_text(json.dumps(tj, ensure_ascii=False))
    return dst


def _no_byte_fallback(tj):
    tj["model"]["byte_fallback"] = False


def _nfkc(tj):
    tj["normalizer"] = {"type": "Sequence", "normalizers": [{"type": "NFKC"}, tj["normalizer"]]}


def _drop_byte_token(tj):
    tj["model"]["vocab"].pop("<0x7F>")


@pytest.mark.parametrize(
    "edit, message",
    [
        (_no_byte_fallback, "without byte_fallback"),
        (_nfkc, "normalizer NFKC"),
        (_drop_byte_token, "lacks 1 byte tokens"),
    ],
)
def test_unrepresentable_tokenizer_json_is_one_line_error(built, tmp_path, edit, message):
    d = _edit_tokenizer_json(built["llama"], tmp_path / "v", edit)
    with pytest.raises(EdgeftError, match=message) as e:
        gguf_export.export(d, tmp_path / "m.gguf", quant="f32")
    assert "\n" not in str(e.value)
    assert not (tmp_path / "m.gguf").exists()


def test_non_legacy_prefix_is_refused(tmp_path):
    """transformers' non-legacy Llama tokenizer (Metaspace, prepend_scheme 'first') prefixes only the start of the
    text, and not when it starts with a space; llama.cpp prefixes every text and after every special token."""
    d = build_tiny(tmp_path / "first", "llama", prepend_scheme="first", keep_model_file=False)
    with pytest.raises(EdgeftError, match="Metaspace .* not representable") as e:
        gguf_export.export(d, tmp_path / "m.gguf", quant="f32")
    assert "\n" not in str(e.value)


def test_unigram_is_refused(tmp_path):
    d = build_tiny(tmp_path / "uni", "llama", model_type="unigram")
    with pytest.raises(EdgeftError, match="unigram"):
        gguf_export.export(d, tmp_path / "m.gguf", quant="f32")
