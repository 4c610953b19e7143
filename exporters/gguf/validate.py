"""The self-check: a written GGUF file run on llama.cpp and compared with the model it came from.

:func:`_validate` compares llama.cpp's logits with a float model holding exactly the file's weights (fidelity:
conversion bugs) and with the source model (the type's total error) within ``QUANTS``' bounds, checks greedy
decoding, and checks that llama.cpp tokenizes (and, for SentencePiece, detokenizes) the validation texts as the HF
tokenizer does and stores the chat template intact. :func:`check_tokenizer` runs the same tokenizer checks on a
vocabulary-only file, for any family. A failure raises ``EdgeftError`` in one line.
"""

from __future__ import annotations

import ctypes
import json
import math
import os
from pathlib import Path
from typing import Any

import torch

from edgeft.errors import EdgeftError

from .metadata import _gguf_name, _Rope
from .quants import ACT_QUANT_ALLOWANCE, QuantSpec
from .vocab import _add_vocab, _check_tokenizer_files

VALIDATION_TEXTS = (
    "The quick brown fox jumps over the lazy dog. It's 12:45, and they'd walked 3,017 miles!",
    "def f(x):\n    return x  *  2   \n\n\tTabs, trailing spaces   and 0.5e-3; naïve café, Tōkyō.",
)
VALIDATION_CHAT = (
    {"role": "user", "content": "What is 17 + 25? Answer with the number."},
    {"role": "assistant", "content": "42"},
    {"role": "user", "content": "And 3 * 14?"},
)
GREEDY_TOKENS = 12
# SentencePiece-style tokenizers: whitespace and byte-fallback texts checked on llama.cpp besides
# VALIDATION_TEXTS (tokenization only)
SPM_TOKENIZER_TEXTS = (
    " leading space, then  two and   three spaces",
    "  two leading spaces\nand a newline, trailing  ",
    "\n\nnewlines first\r\n\tand tabs\t",
    "digits 0 12 345 6789 3.14159 1,000,000",
    "bytes: \u00dcml\u00e4ut, \u65e5\u672c\u8a9e, emoji \U0001f642\U0001f680, "
    "\u0416\u0436 \u03a9 \u00a7\u00b6 \u2581 end",
)

# Scaled RoPE (llama3, longrope) moves only low frequencies, which the short validation texts barely rotate:
# such files are also compared on one sequence of this many held-out tokens (within the file's context)
ROPE_CHECK_TOKENS = 512


def _reference_model(model: Any, weights: dict[str, torch.Tensor]) -> Any:
    """A float model of the source's config holding exactly the weights the file stores."""
    import copy

    from transformers import AutoModelForCausalLM

    cfg = copy.deepcopy(model.config)
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    ref = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    missing, unexpected = ref.load_state_dict(weights, strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and getattr(cfg, "tie_word_embeddings", False))]
    if missing or unexpected:
        raise EdgeftError(f"GGUF export: reference model weights unmatched: {missing[:3]} {unexpected[:3]}")
    return ref.eval()


def _sequences(tokenizer: Any) -> tuple[list[list[int]], list[int], dict[str, tuple[list[int], bool]]]:
    """Token sequences to compare logits on, the greedy prompt, and the strings to check tokenization on."""
    seqs = [tokenizer(t, add_special_tokens=True)["input_ids"] for t in VALIDATION_TEXTS]
    tok_checks: dict[str, tuple[list[int], bool]] = {
        t: (tokenizer(t, add_special_tokens=True)["input_ids"], True) for t in VALIDATION_TEXTS
    }
    if getattr(tokenizer, "chat_template", None):
        rendered = tokenizer.apply_chat_template(list(VALIDATION_CHAT), tokenize=False, add_generation_prompt=True)
        ids = tokenizer(rendered, add_special_tokens=False)["input_ids"]
        tok_checks[rendered] = (ids, False)
        seqs.append(ids)
        prompt = ids
    else:
        prompt = seqs[0]
    return seqs, prompt, tok_checks


def _llama_detokenize(rt: Any, ids: list[int]) -> str:
    """llama.cpp's own detokenization (llama_detokenize: leading BOS removed, control tokens not rendered, the
    space prefix stripped as add_space_prefix says); llama-cpp-python's ``detokenize`` strips a leading space
    only after a BOS token, so the C function is called directly."""
    import llama_cpp

    vocab = llama_cpp.llama_model_get_vocab(rt._llm.model)
    arr = (llama_cpp.llama_token * len(ids))(*ids)
    size = 32 * len(ids) + 64
    buf = ctypes.create_string_buffer(size)
    n = llama_cpp.llama_detokenize(vocab, arr, len(ids), buf, size, True, False)
    if n < 0:
        raise EdgeftError(f"llama.cpp detokenization needs {-n} bytes, more than {size}")
    return buf.raw[:n].decode("utf-8", errors="replace")


def _spm_tokenizer_checks(tokenizer: Any) -> dict[str, tuple[list[int], bool]]:
    """More strings for SentencePiece-style tokenizers: whitespace at the start, runs of spaces, byte fallback,
    and the space prefix after each special / user-defined token written in the text."""
    texts = list(SPM_TOKENIZER_TEXTS)
    added = tokenizer.get_added_vocab()
    special = set(tokenizer.all_special_tokens)
    user = [t for t in added if t not in special][:3]  # Gemma has thousands of added tokens: a few of each kind
    others = [t for t in added if t in special][:3]
    for tok in dict.fromkeys(t for t in [tokenizer.bos_token, tokenizer.eos_token, *user, *others] if t):
        texts.append(f"before{tok}after {tok} spaced{tok}\n{tok}")
    return {t: (tokenizer(t, add_special_tokens=True)["input_ids"], True) for t in texts}


def _check_tokenization(
    tokenize: Any,
    detokenize: Any,
    stored_template: str | None,
    tokenizer: Any,
    vocab_info: dict[str, Any],
    tok_checks: dict[str, tuple[list[int], bool]],
    label: str,
) -> None:
    """llama.cpp must split each text exactly as the HF tokenizer does, detokenize SentencePiece-style pieces as
    HF decodes them, and hold the chat template intact; raises ``EdgeftError`` in one line otherwise."""
    for text, (want, add_special) in tok_checks.items():
        got = tokenize(text, add_bos=add_special, special=True)
        if got != want:
            i = next((k for k, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
            raise EdgeftError(
                f"GGUF validation failed for {label}: llama.cpp tokenizes {text[:30]!r} differently from the "
                f"HF tokenizer (first difference at token {i}); file not written"
            )
    # SentencePiece-style: pieces come back as text (U+2581 -> space, <0xXX> -> bytes, the prefix stripped).
    # Detokenized without the BOS, as generated text is (llama.cpp keeps the prefix's space after a BOS).
    plain_texts = (*VALIDATION_TEXTS, *SPM_TOKENIZER_TEXTS) if vocab_info.get("model") == "llama" else ()
    for text in plain_texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        want = tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        if detokenize(ids) != want:
            raise EdgeftError(
                f"GGUF validation failed for {label}: llama.cpp detokenizes {text[:30]!r} differently from the "
                "HF tokenizer; file not written"
            )
    if vocab_info["chat_template"] and stored_template != vocab_info["chat_template"]:
        raise EdgeftError(f"GGUF validation failed for {label}: chat template not stored intact; file not written")


def _tokenizer_checks(tokenizer: Any, vocab_info: dict[str, Any]) -> dict[str, tuple[list[int], bool]]:
    checks = _sequences(tokenizer)[2]
    if vocab_info.get("model") == "llama":
        checks.update(_spm_tokenizer_checks(tokenizer))
    return checks


def check_tokenizer(src: str | os.PathLike) -> dict[str, Any]:
    """Write ``src``'s tokenizer alone into a vocabulary-only GGUF (as :func:`export` writes it) and check it on
    llama.cpp exactly as :func:`export` does: the same texts tokenize and detokenize as the HF tokenizer does and the
    chat template is stored intact. Independent of the model's architecture, so every family's tokenizer is checked
    even where its tensors are not exported. Returns what was written; raises ``EdgeftError`` on any difference."""
    import tempfile

    import gguf
    import llama_cpp
    from transformers import AutoTokenizer

    src = Path(src)
    cfg = json.loads((src / "config.json").read_text())
    _check_tokenizer_files(src)
    tokenizer = AutoTokenizer.from_pretrained(str(src))
    with tempfile.TemporaryDirectory(prefix="edgeft-vocab-") as d:
        path = Path(d) / "vocab.gguf"
        writer = gguf.GGUFWriter(str(path), "llama")
        # the hyperparameters llama.cpp reads before it loads a vocabulary (no tensors follow)
        writer.add_context_length(2048)
        writer.add_embedding_length(64)
        writer.add_block_count(1)
        writer.add_feed_forward_length(128)
        writer.add_head_count(1)
        writer.add_layer_norm_rms_eps(1e-5)
        writer.add_name(_gguf_name(src, tokenizer))
        vocab_info = _add_vocab(writer, src, cfg, tokenizer)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        from llama_cpp._logger import set_verbose

        set_verbose(False)  # llama.cpp's loader log, as GgufRuntime(verbose=False) has it
        params = llama_cpp.llama_model_default_params()
        params.vocab_only = True
        model = llama_cpp.llama_model_load_from_file(str(path).encode(), params)
        if not model:
            raise EdgeftError(f"llama.cpp could not load the vocabulary of {src.name}")
        try:
            vocab = llama_cpp.llama_model_get_vocab(model)

            def tokenize(text: str, add_bos: bool, special: bool) -> list[int]:
                raw = text.encode("utf-8")
                n_max = len(raw) + 16
                buf = (llama_cpp.llama_token * n_max)()
                n = llama_cpp.llama_tokenize(vocab, raw, len(raw), buf, n_max, add_bos, special)
                if n < 0:
                    raise EdgeftError(f"llama.cpp tokenization needs {-n} tokens")
                return list(buf[:n])

            def detokenize(ids: list[int]) -> str:
                arr = (llama_cpp.llama_token * len(ids))(*ids)
                size = 32 * len(ids) + 64
                out = ctypes.create_string_buffer(size)
                n = llama_cpp.llama_detokenize(vocab, arr, len(ids), out, size, True, False)
                return out.raw[: max(n, 0)].decode("utf-8", errors="replace")

            checks = _tokenizer_checks(tokenizer, vocab_info)
            stored_text = None
            size = len((vocab_info["chat_template"] or "").encode("utf-8")) + 64
            meta = ctypes.create_string_buffer(size)
            n = llama_cpp.llama_model_meta_val_str(model, b"tokenizer.chat_template", meta, size)
            if n >= 0:
                stored_text = meta.raw[:n].decode("utf-8", errors="replace")
            _check_tokenization(tokenize, detokenize, stored_text, tokenizer, vocab_info, checks, src.name)
        finally:
            llama_cpp.llama_model_free(model)
    return {**vocab_info, "strings": len(checks)}


def _rope_check_ids(tokenizer: Any, rope: _Rope) -> list[int]:
    """Held-out tokens far enough into the context that scaled low frequencies have turned (ROPE_CHECK_TOKENS);
    for LongRoPE within the original context, where HF and llama.cpp (with this validation's n_ctx) both take the
    short factors."""
    from edgeft.exporters.pte import _heldout_ids

    n = ROPE_CHECK_TOKENS
    if rope.original_context:
        n = min(n, rope.original_context - GREEDY_TOKENS - 16)
    return _heldout_ids(tokenizer)[:n]


@torch.no_grad()
def _eager_greedy(model: Any, ids: list[int], n: int) -> list[int]:
    out = list(ids)
    for _ in range(n):
        logits = model(input_ids=torch.tensor([out])).logits[0, -1]
        out.append(int(torch.argmax(logits)))
    return out[len(ids) :]


def _compare(got: torch.Tensor, ref: torch.Tensor) -> tuple[float, int]:
    """(relative L2 error, number of positions whose argmax agrees)."""
    rel = float((got - ref).norm() / ref.norm().clamp_min(1e-12))
    return rel, int((got.argmax(-1) == ref.argmax(-1)).sum())


def _validate(
    path: Path,
    source: Any,
    reference: Any,
    tokenizer: Any,
    qspec: QuantSpec,
    act_quant: bool,
    vocab_info: dict[str, Any],
    label: str,
    exact: bool = False,
    check_tokenizer: bool = True,
    rope: _Rope | None = None,
) -> dict[str, Any]:
    """Run the file on llama.cpp; compare with the file's own weights (fidelity) and with the source model.

    ``exact``: every trained tensor was written from its integers, so the file's weights are the source's (up to
    fp16 scale rounding) and the source bounds tighten to the fidelity bounds.
    """
    from edgeft.devices.llamacpp_runtime import GgufRuntime

    seqs, prompt, _ = _sequences(tokenizer)
    if rope is not None and rope.kind in ("llama3", "longrope"):
        seqs.append(_rope_check_ids(tokenizer, rope))
    tok_checks = _tokenizer_checks(tokenizer, vocab_info)
    n_ctx = max(max(len(s) for s in seqs), len(prompt) + GREEDY_TOKENS) + 8
    fid_rel = src_rel = 0.0
    fid_agree = src_agree = total = 0
    # F32 KV cache: the F16 cache's rounding, re-quantized by the next Q8_0 matmul, would blur an otherwise
    # exact comparison (the cache type is a runtime setting, not part of the file).
    with GgufRuntime(path, n_ctx=n_ctx, kv_cache="f32") as rt:
        if check_tokenizer:
            _check_tokenization(
                rt.tokenize,
                lambda ids: _llama_detokenize(rt, ids),
                rt.metadata.get("tokenizer.chat_template"),
                tokenizer,
                vocab_info,
                tok_checks,
                label,
            )
        with torch.no_grad():
            for ids in seqs:
                x = torch.tensor([ids])
                got = rt.logits(ids)
                if not torch.isfinite(got).all():
                    raise EdgeftError(f"GGUF validation failed for {label}: llama.cpp produced non-finite logits")
                rel, agree = _compare(got, reference(input_ids=x).logits[0].float())
                fid_rel, fid_agree = max(fid_rel, rel), fid_agree + agree
                rel, agree = _compare(got, source(input_ids=x).logits[0].float())
                src_rel, src_agree = max(src_rel, rel), src_agree + agree
                total += len(ids)
        want_greedy = _eager_greedy(source, prompt, GREEDY_TOKENS)
        got_greedy = rt.generate(prompt, GREEDY_TOKENS, set())
    greedy_match = next((i for i, (a, b) in enumerate(zip(got_greedy, want_greedy)) if a != b), GREEDY_TOKENS)
    bound_rel, bound_top1 = (qspec.fidelity_rel_err, qspec.fidelity_top1) if exact else (qspec.rel_err, qspec.top1)
    tol = {
        "fidelity_rel_err": qspec.fidelity_rel_err,
        "fidelity_top1": qspec.fidelity_top1,
        "rel_err": round(bound_rel + (ACT_QUANT_ALLOWANCE["rel_err"] if act_quant else 0.0), 4),
        "top1": round(bound_top1 - (ACT_QUANT_ALLOWANCE["top1"] if act_quant else 0.0), 4),
        "greedy_exact": qspec.greedy_exact and not act_quant,
    }
    result = {
        "fidelity_rel_err": round(fid_rel, 5),
        "fidelity_top1": round(fid_agree / total, 4),
        "rel_err": round(src_rel, 5),
        "top1": round(src_agree / total, 4),
        "greedy_match": greedy_match,
        "greedy_tokens": GREEDY_TOKENS,
        "positions": total,
        "tokenizer_strings": len(tok_checks),
        "tolerance": tol,
    }
    problems = []
    for key, what in (("fidelity_rel_err", "vs the file's own weights"), ("rel_err", "vs the source model")):
        if not math.isfinite(result[key]) or result[key] > tol[key]:
            problems.append(f"logits rel. error {what} {result[key]:.4g} > {tol[key]:g}")
    for key, what in (("fidelity_top1", "vs the file's own weights"), ("top1", "vs the source model")):
        if result[key] < tol[key]:
            problems.append(f"top-1 agreement {what} {result[key]:.3f} < {tol[key]:g}")
    if tol["greedy_exact"] and greedy_match < GREEDY_TOKENS:
        problems.append(f"greedy tokens differ from the source at step {greedy_match}")
    if problems:
        raise EdgeftError(f"GGUF validation failed for {label}: {'; '.join(problems)}; file not written")
    return result
