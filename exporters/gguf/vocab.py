"""The vocabulary: a tokenizer.json written as llama.cpp's byte-level BPE ("gpt2") or SentencePiece ("llama")
tokenizer, with the HF tokenizer's special tokens, BOS/EOS insertion and chat template.

Only what llama.cpp tokenizes exactly as HF does is written: a pre-tokenizer llama.cpp knows by name, a
SentencePiece-style BPE with byte fallback and no normalization beyond the U+2581 space, a space prefix added
where llama.cpp adds it; anything else is refused with one ``EdgeftError`` line. Whether the written vocabulary
really tokenizes as HF does is proven on llama.cpp by ``validate``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from edgeft.errors import EdgeftError

# HF pre-tokenizer regexes whose llama.cpp equivalents are known by name.
_LLAMA3_RE = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_RE = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Mistral NeMo's tekken and GPT-4o's o200k regexes (Phi-4-mini uses the latter): llama.cpp's "tekken" / "gpt-4o".
_TEKKEN_RE = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|[^\r\n\p{L}\p{N}]?"
    r"[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
_GPT4O_RE = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_SPLIT_PRE = {_LLAMA3_RE: "llama-bpe", _QWEN2_RE: "qwen2", _TEKKEN_RE: "tekken", _GPT4O_RE: "gpt-4o"}


def _check_tokenizer_files(src: Path) -> None:
    if not (src / "tokenizer.json").is_file():
        raise EdgeftError(f"{src} has no tokenizer.json: GGUF export needs a fast (tokenizers) tokenizer")


def _pre_tokenizer(tj: dict[str, Any]) -> str:
    """llama.cpp's name for the tokenizer.json pre-tokenizer (byte-level BPE only)."""
    norm = tj.get("normalizer")
    if norm is not None and norm.get("type") != "NFC":
        raise EdgeftError(f"GGUF export: tokenizer normalizer {norm.get('type')} is not supported")
    pre = tj.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True) and not steps[0].get("add_prefix_space"):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        split = steps[0]
        regex = (split.get("pattern") or {}).get("Regex")
        # the regex's matches kept whole: "Isolated", or "Removed" with invert (GPT-4o's tokenizer.json)
        kept = (
            split.get("behavior") == "Isolated"
            and not split.get("invert")
            or (split.get("behavior") == "Removed" and split.get("invert"))
        )
        if kept and regex in _SPLIT_PRE:
            return _SPLIT_PRE[regex]
    raise EdgeftError(
        f"GGUF export: unrecognised tokenizer pre-tokenizer {kinds} (byte-level BPE of GPT-2, "
        "SmolLM, Llama 3, Qwen2, Mistral tekken or GPT-4o style are supported)"
    )


def _vocab_by_id(tj: dict[str, Any], n_vocab: int) -> tuple[dict[int, str], dict[int, dict[str, Any]]]:
    """tokenizer.json's id -> token text (the model's vocab, then added tokens over it) and the added tokens by id;
    refuses ids beyond the model's ``vocab_size``."""
    by_id: dict[int, str] = {i: t for t, i in tj["model"]["vocab"].items()}
    # special added tokens the model has no row for (Gemma 3 text: the vision tower's <image_soft_token> at
    # 262144 = vocab_size) can never be embedded: left out, as the model itself cannot take them
    added = {a["id"]: a for a in tj.get("added_tokens", []) if not (a["id"] >= n_vocab and a.get("special"))}
    for i, a in added.items():
        by_id[i] = a["content"]
    if max(by_id) >= n_vocab:
        raise EdgeftError(f"tokenizer has ids up to {max(by_id)} but the model's vocab_size is {n_vocab}")
    return by_id, added


def _add_vocab(writer: Any, src: Path, cfg: dict[str, Any], tokenizer: Any) -> dict[str, Any]:
    import gguf

    tj = json.loads((src / "tokenizer.json").read_text(encoding="utf-8"))
    model = tj.get("model", {})
    if _is_sentencepiece(tj):
        return _add_vocab_spm(writer, src, cfg, tokenizer, tj)
    if model.get("type") != "BPE":
        raise EdgeftError(
            f"GGUF export supports byte-level BPE and SentencePiece-style BPE tokenizers, not {model.get('type')}"
        )
    pre = _pre_tokenizer(tj)  # refuses BPE without byte-level pre-tokenization
    n_vocab = int(cfg["vocab_size"])
    by_id, added = _vocab_by_id(tj, n_vocab)
    tokens, types = [], []
    for i in range(n_vocab):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.CONTROL if added[i].get("special") else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)

    special = gguf.SpecialVocab(src, load_merges=True, n_vocab=n_vocab)
    if not special.merges:
        raise EdgeftError("GGUF export: tokenizer.json has no BPE merges")
    add_bos, add_eos = _write_special(writer, special, tokenizer)
    return {"model": "gpt2", "pre": pre, "add_bos": add_bos, "add_eos": add_eos, "chat_template": special.chat_template}


def _write_special(writer: Any, special: Any, tokenizer: Any) -> tuple[bool, bool]:
    """Write a gguf ``SpecialVocab`` with the HF tokenizer's BOS/EOS insertion and the run's chat template;
    returns (add_bos, add_eos)."""
    add_bos, add_eos = _added_bos_eos(tokenizer)
    special.add_special_token = {"bos": add_bos, "eos": add_eos}
    chat_template = getattr(tokenizer, "chat_template", None)
    if isinstance(chat_template, str):
        special.chat_template = chat_template
    special.add_to_gguf(writer, quiet=True)
    return add_bos, add_eos


def _added_bos_eos(tokenizer: Any) -> tuple[bool, bool]:
    """Whether the HF tokenizer really adds BOS / EOS around a text (the post-processor may differ from what
    tokenizer_config.json says)."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a", add_special_tokens=True)["input_ids"]
    add_bos = len(full) > len(plain) and full[0] == tokenizer.bos_token_id and full[1 : 1 + len(plain)] == plain
    add_eos = len(full) > len(plain) and full[-1] == tokenizer.eos_token_id and full[-1 - len(plain) : -1] == plain
    if len(full) - len(plain) != int(add_bos) + int(add_eos):
        raise EdgeftError("GGUF export: the tokenizer adds special tokens other than BOS/EOS; not supported")
    return add_bos, add_eos


# SentencePiece-style tokenizers (Llama 2, TinyLlama, Mistral 7B v0.1, Gemma): llama.cpp's SPM tokenizer
# ("llama") escapes spaces as U+2581, prefixes one (add_space_prefix) at the start of the text and after every
# special or user-defined token, then repeatedly merges the adjacent pair whose concatenation is a token of the
# highest score (leftmost first), and writes what did not become a token as <0xXX> byte tokens. It normalizes
# nothing else.
SPM_SPACE = "\u2581"


def _is_sentencepiece(tj: dict[str, Any]) -> bool:
    """A SentencePiece-derived tokenizer.json: Unigram, byte-fallback BPE, or U+2581 space handling."""
    model = tj.get("model") or {}
    if model.get("type") == "Unigram" or model.get("byte_fallback"):
        return True
    return SPM_SPACE in json.dumps([tj.get("normalizer"), tj.get("pre_tokenizer")], ensure_ascii=False)


def _check_spm_normalizer(norm: dict[str, Any] | None) -> None:
    """llama.cpp's SPM tokenizer only escapes spaces (and adds the prefix): any other normalization is refused."""
    if norm is None:
        return
    kind = norm.get("type")
    if kind == "Sequence":
        for n in norm.get("normalizers", []):
            _check_spm_normalizer(n)
    elif kind == "Prepend" and norm.get("prepend") == SPM_SPACE:
        return
    elif kind == "Replace" and norm.get("pattern") == {"String": " "} and norm.get("content") == SPM_SPACE:
        return
    else:
        raise EdgeftError(
            f"GGUF export: SentencePiece-style tokenizer normalizer {kind} {json.dumps(norm.get('pattern', ''))} has "
            "no llama.cpp equivalent (its SPM tokenizer only turns spaces into \u2581); not supported"
        )


def _spm_space_prefix(tokenizer: Any) -> bool:
    """Whether the HF tokenizer adds the U+2581 prefix, refusing what llama.cpp's add_space_prefix cannot mirror."""

    def pieces(text: str) -> str:
        return "".join(tokenizer.convert_ids_to_tokens(tokenizer(text, add_special_tokens=False)["input_ids"]))

    prefix = pieces("a").startswith(SPM_SPACE)
    if prefix and not pieces(" a").startswith(SPM_SPACE * 2):
        raise EdgeftError(
            "GGUF export: the HF tokenizer adds its \u2581 prefix only when a text does not start with a space "
            "(a Metaspace pre-tokenizer); llama.cpp's SPM tokenizer always adds it; not representable"
        )
    marker = tokenizer.eos_token or tokenizer.bos_token
    if marker:
        after = pieces(marker + "a")
        if after.startswith(marker) and after[len(marker) :].startswith(SPM_SPACE) != prefix:
            raise EdgeftError(
                "GGUF export: the HF tokenizer adds its \u2581 prefix at the start of a text but not after a special "
                "token (non-legacy Llama tokenizer, Metaspace prepend_scheme 'first'); llama.cpp's SPM tokenizer "
                "adds it after every special token; not representable"
                if prefix
                else "GGUF export: the HF tokenizer adds a \u2581 prefix after special tokens only; not representable"
            )
    return prefix


_BYTE_TOKEN = re.compile(r"<0x[0-9A-F]{2}>")


def _spm_scores_from_model(path: Path, by_id: dict[int, str], n_vocab: int) -> tuple[dict[int, float], dict[int, int]]:
    """Scores and types of the pieces of a tokenizer.model (SentencePiece reads it; no protobuf needed)."""
    import gguf

    try:
        from sentencepiece import SentencePieceProcessor
    except ImportError:
        raise EdgeftError(f"GGUF export: reading {path.name} needs sentencepiece: pip install sentencepiece") from None
    try:
        sp = SentencePieceProcessor(model_file=str(path))
    except (OSError, RuntimeError) as e:
        raise EdgeftError(f"GGUF export: {path} is not a readable SentencePiece model ({e})") from None
    scores, types = {}, {}
    for i in range(sp.get_piece_size()):
        piece = sp.id_to_piece(i)
        if i >= n_vocab or by_id.get(i) != piece:
            raise EdgeftError(
                f"GGUF export: {path.name} does not match tokenizer.json (id {i}: {piece!r} vs {by_id.get(i)!r})"
            )
        scores[i] = float(sp.get_score(i))
        types[i] = (
            gguf.TokenType.UNKNOWN
            if sp.is_unknown(i)
            else gguf.TokenType.CONTROL
            if sp.is_control(i)
            else gguf.TokenType.UNUSED
            if sp.is_unused(i)
            else gguf.TokenType.BYTE
            if sp.is_byte(i)
            else gguf.TokenType.NORMAL
        )
    return scores, types


def _spm_scores_from_merges(model: dict[str, Any], by_id: dict[int, str]) -> dict[int, float]:
    """Scores for llama.cpp's merge-by-score from a tokenizer.json's BPE merges: a token made by merge rank r
    scores -r, so llama.cpp's highest-score-first order is HF's lowest-rank-first order; tokens no merge makes
    score below every merge (llama.cpp only reads the scores of tokens two symbols concatenate to)."""
    merges = model.get("merges") or []
    rank: dict[str, int] = {}
    for r, m in enumerate(merges):
        left, right = m.split(" ", 1) if isinstance(m, str) else m
        rank.setdefault(left + right, r)
    floor = -float(len(merges) + 1)
    return {i: (-float(rank[t]) if t in rank else floor) for i, t in by_id.items()}


def _add_vocab_spm(writer: Any, src: Path, cfg: dict[str, Any], tokenizer: Any, tj: dict[str, Any]) -> dict[str, Any]:
    """tokenizer.ggml.model = llama: tokens, scores and types for llama.cpp's SPM tokenizer."""
    import gguf

    model = tj["model"]
    if model.get("type") == "Unigram":
        raise EdgeftError(
            "GGUF export: SentencePiece unigram tokenizers are not supported (llama.cpp's SPM tokenizer merges "
            "pieces by score; a unigram model picks the most likely segmentation, which can differ)"
        )
    if model.get("type") != "BPE":
        raise EdgeftError(f"GGUF export: SentencePiece-style tokenizer model {model.get('type')} is not supported")
    if not model.get("byte_fallback"):
        raise EdgeftError(
            "GGUF export: SentencePiece-style BPE without byte_fallback is not supported (llama.cpp's SPM tokenizer "
            "writes unknown characters as <0xXX> byte tokens, HF as <unk>)"
        )
    if model.get("dropout"):
        raise EdgeftError("GGUF export: BPE dropout is not supported (llama.cpp tokenizes deterministically)")
    _check_spm_normalizer(tj.get("normalizer"))
    n_vocab = int(cfg["vocab_size"])
    by_id, added = _vocab_by_id(tj, n_vocab)
    missing = [f"<0x{b:02X}>" for b in range(256) if f"<0x{b:02X}>" not in model["vocab"]]
    if missing:
        raise EdgeftError(
            f"GGUF export: the byte-fallback vocabulary lacks {len(missing)} byte tokens ({missing[0]}, ...); "
            "llama.cpp's SPM tokenizer needs all 256"
        )
    sp_path = src / "tokenizer.model"
    if sp_path.is_file():  # the SentencePiece model's own scores and types, as llama.cpp's converter reads them
        scores, sp_types = _spm_scores_from_model(sp_path, by_id, n_vocab)
        source = "tokenizer.model"
    else:  # tokenizer.json only: scores from the merge ranks, types from the token texts and added tokens
        scores, sp_types = _spm_scores_from_merges(model, by_id), {}
        source = "tokenizer.json merges"
    unk_id = tokenizer.unk_token_id
    merged = {"".join(m.split(" ", 1) if isinstance(m, str) else m) for m in model.get("merges") or []}
    tokens, token_scores, types = [], [], []
    for i in range(n_vocab):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            token_scores.append(-1000.0)
            types.append(gguf.TokenType.UNUSED)
            continue
        text = by_id[i]
        # a non-special added run of U+2581 that BPE merges also make (Gemma 3's "▁▁▁") is a piece to llama.cpp
        # too: merged by score and written back as spaces (typed user-defined, llama.cpp would write "▁▁▁")
        piece = (
            i in added
            and not added[i].get("special")
            and model["vocab"].get(text) == i
            and text in merged
            and SPM_SPACE in text
        )
        if i in added and not piece:
            # added tokens are matched in the raw text before any SentencePiece processing, in llama.cpp as in HF
            if i == unk_id:
                kind = gguf.TokenType.UNKNOWN
            elif added[i].get("special"):
                kind = gguf.TokenType.CONTROL
            else:
                kind = gguf.TokenType.USER_DEFINED
                if added[i].get("normalized"):  # HF matches it after " " -> U+2581; llama.cpp in the raw text
                    text = text.replace(SPM_SPACE, " ")
            score = -1000.0
        else:
            kind = sp_types.get(i, gguf.TokenType.BYTE if _BYTE_TOKEN.fullmatch(text) else gguf.TokenType.NORMAL)
            if i == unk_id:
                kind = gguf.TokenType.UNKNOWN
            score = scores.get(i, -1000.0)
        tokens.append(text)
        token_scores.append(score)
        types.append(kind)
    not_bytes: list[str] = []  # every <0xXX> (all present, checked above) must be typed BYTE
    for b in range(256):
        i = model["vocab"][f"<0x{b:02X}>"]
        if types[i] != gguf.TokenType.BYTE:
            not_bytes.append(f"<0x{b:02X}>")
    if not_bytes:
        raise EdgeftError(f"GGUF export: {sp_path.name} does not mark {not_bytes[0]} as a byte piece")
    add_space_prefix = _spm_space_prefix(tokenizer)
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(token_scores)
    writer.add_token_types(types)
    writer.add_add_space_prefix(add_space_prefix)

    special = gguf.SpecialVocab(src, load_merges=False, n_vocab=n_vocab)
    # the ids the loaded HF tokenizer uses (llama.cpp's SPM defaults, 1/2/0, would apply to any left unset)
    for kind in ("bos", "eos", "unk", "pad"):
        tid = getattr(tokenizer, f"{kind}_token_id", None)
        if tid is not None and not (kind == "pad" and tokenizer.pad_token == tokenizer.eos_token):
            special.special_token_ids[kind] = int(tid)
    add_bos, add_eos = _write_special(writer, special, tokenizer)
    return {
        "model": "llama",
        "pre": "default",
        "scores_from": source,
        "add_bos": add_bos,
        "add_eos": add_eos,
        "add_space_prefix": add_space_prefix,
        "chat_template": special.chat_template,
    }
