"""Tiny models with SentencePiece-style tokenizers, built locally (no downloads) for the GGUF SPM tests.

A SentencePiece BPE model is trained on the packaged corpus (``edgeft/assets/corpus.txt``, a fraction of a
second) with byte fallback, as Llama 2 / Mistral / Gemma ship theirs, and turned into a ``tokenizer.json`` the
way transformers' SentencePiece converter does it: the pieces as a byte-fallback BPE vocabulary, merges ranked
by the merged piece's score, ``▁`` for spaces (with the dummy prefix for the Llama style), the control and
user-defined pieces as added tokens, and two chat tokens added past the SentencePiece vocabulary (as chat
fine-tunes do). ``tokenizer.model`` is kept or dropped to exercise both of the exporter's paths.

Styles:
- ``llama``: ``<unk> <s> </s>`` at 0-2, dummy prefix (legacy ``Prepend("▁")`` normalizer: after every added
  token too, as llama.cpp's SPM tokenizer does), BOS added, the decoder strips the prefix.
- ``gemma``: ``<pad> <eos> <bos> <unk>`` at 0-3, no dummy prefix (Gemma's ``Replace(" ", "▁")`` only), BOS added.
"""

from __future__ import annotations

import re
from pathlib import Path

from edgeft.models import _TINY_COMMON, ASSETS, CHATML_TEMPLATE

USER_DEFINED = "<tool>"  # a user-defined SentencePiece piece: an added token, not special
STYLES = {
    "llama": dict(
        pad=None,
        eos="</s>",
        bos="<s>",
        unk="<unk>",
        ids=dict(unk_id=0, bos_id=1, eos_id=2, pad_id=-1),
        dummy_prefix=True,
        chat=("<|im_start|>", "<|im_end|>"),
    ),
    "gemma": dict(
        pad="<pad>",
        eos="<eos>",
        bos="<bos>",
        unk="<unk>",
        ids=dict(pad_id=0, eos_id=1, bos_id=2, unk_id=3),
        dummy_prefix=False,
        chat=("<start_of_turn>", "<end_of_turn>"),
    ),
}


def _sentences() -> list[str]:
    text = (ASSETS / "corpus.txt").read_text(encoding="utf-8")
    lines = [ln for ln in text.splitlines() if ln and not ln.startswith("#")]
    return [s for ln in lines for s in re.split(r"(?<=[.;:!?]) ", ln) if s]


def train_spm(out: Path, style: str, vocab_size: int = 3000, model_type: str = "bpe") -> Path:
    """Train a SentencePiece model (deterministic for a given corpus); returns the .model path."""
    import sentencepiece as spm

    s = STYLES[style]
    prefix = out / f"spm-{style}-{model_type}"
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_sentences()),
        model_prefix=str(prefix),
        vocab_size=vocab_size,
        model_type=model_type,
        byte_fallback=True,
        character_coverage=1.0,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        remove_extra_whitespaces=False,
        normalization_rule_name="identity",
        add_dummy_prefix=s["dummy_prefix"],
        user_defined_symbols=[USER_DEFINED],
        pad_piece=s["pad"] or "<pad>",
        unk_piece=s["unk"],
        bos_piece=s["bos"],
        eos_piece=s["eos"],
        num_threads=1,
        minloglevel=2,
        **s["ids"],
    )
    return Path(f"{prefix}.model")


def hf_tokenizer(spm_model: Path, style: str, *, prepend_scheme: str | None = None, unigram: bool = False):
    """The transformers fast tokenizer of a SentencePiece BPE model, built like HF's SentencePiece converter.

    ``prepend_scheme`` (llama style only) replaces the legacy ``Prepend`` normalizer by a ``Metaspace``
    pre-tokenizer with that scheme (``first`` is transformers' non-legacy Llama tokenizer).
    """
    import sentencepiece as spm
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    s = STYLES[style]
    sp = spm.SentencePieceProcessor(model_file=str(spm_model))
    n = sp.get_piece_size()
    vocab = {sp.id_to_piece(i): i for i in range(n)}
    normal = {
        sp.id_to_piece(i): (sp.get_score(i), i)
        for i in range(n)
        if not (
            sp.is_control(i)
            or sp.is_unknown(i)
            or sp.is_byte(i)
            or sp.is_unused(i)
            or sp.id_to_piece(i) == USER_DEFINED
        )
    }
    ranked = []
    for piece, (score, i) in normal.items():
        for k in range(1, len(piece)):
            left, right = piece[:k], piece[k:]
            if left in normal and right in normal:
                ranked.append((-score, i, left, right))
    merges = [(left, right) for _, _, left, right in sorted(ranked)]
    if unigram:
        tok = Tokenizer(
            models.Unigram(
                [(sp.id_to_piece(i), sp.get_score(i)) for i in range(n)], unk_id=vocab[s["unk"]], byte_fallback=True
            )
        )
    else:
        tok = Tokenizer(
            models.BPE(vocab=vocab, merges=merges, unk_token=s["unk"], fuse_unk=True, byte_fallback=True, dropout=None)
        )
    if style == "llama" and prepend_scheme is None:
        tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    elif style == "llama":
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme=prepend_scheme, split=False)
    else:
        tok.normalizer = normalizers.Replace(" ", "▁")
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if s["dummy_prefix"]:
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    tok.decoder = decoders.Sequence(steps)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{s['bos']} $A", pair=f"{s['bos']} $A $B", special_tokens=[(s["bos"], vocab[s["bos"]])]
    )
    specials = [sp.id_to_piece(i) for i in range(n) if sp.is_control(i) or sp.is_unknown(i)]
    tok.add_tokens([AddedToken(USER_DEFINED, normalized=False, special=False)])
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in specials])
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in s["chat"]])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=s["bos"],
        eos_token=s["eos"],
        unk_token=s["unk"],
        pad_token=s["pad"],
        additional_special_tokens=list(s["chat"]),
    )
    start, end = s["chat"]
    fast.chat_template = "{{- bos_token }}" + CHATML_TEMPLATE.replace("<|im_start|>", start).replace("<|im_end|>", end)
    return fast


def build_tiny(
    out: Path,
    style: str,
    *,
    arch: str = "llama",
    keep_model_file: bool = True,
    extra_vocab: int = 3,
    prepend_scheme: str | None = None,
    model_type: str = "bpe",
    seed: int = 0,
) -> Path:
    """A tiny random-init model directory with a SentencePiece-style tokenizer; returns it."""
    import shutil

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    out.mkdir(parents=True, exist_ok=True)
    work = out / "_spm"
    work.mkdir(exist_ok=True)
    sp_model = train_spm(work, style, model_type=model_type)
    d = out / "model"
    tok = hf_tokenizer(sp_model, style, prepend_scheme=prepend_scheme, unigram=model_type == "unigram")
    tok.save_pretrained(d)
    if keep_model_file:
        shutil.copy(sp_model, d / "tokenizer.model")
    n_tok = len(tok)
    common = {k: v for k, v in _TINY_COMMON.items() if k not in ("vocab_size", "rope_theta")}
    if arch == "llama":
        extra = dict(rope_theta=10000.0, tie_word_embeddings=False)
    else:  # gemma3_text, the tiny-gemma3 shape
        extra = dict(
            tie_word_embeddings=True,
            query_pre_attn_scalar=64,
            sliding_window=16,
            layer_types=["sliding_attention", "full_attention"] * 2,
            rope_parameters={
                "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                "full_attention": {"rope_type": "default", "rope_theta": 1000000.0},
            },
        )
    ids = {k: v for k, v in STYLES[style]["ids"].items() if v >= 0}
    cfg = AutoConfig.for_model(
        arch,
        **common,
        **extra,
        vocab_size=n_tok + extra_vocab,
        bos_token_id=ids["bos_id"],
        eos_token_id=ids["eos_id"],
        pad_token_id=ids.get("pad_id"),
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    if arch != "llama":  # random (1 + w) norms, as tiny-gemma3
        with torch.no_grad():
            for mod in model.modules():
                if type(mod).__name__.endswith("RMSNorm"):
                    mod.weight.normal_(0.0, 0.1)
    model.save_pretrained(d)
    return d
