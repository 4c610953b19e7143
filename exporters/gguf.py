"""GGUF export: a Hugging Face (or converted) model written with gguf-py, proven equal on llama.cpp.

- gguf-py gives the format, tensor names, special vocabularies and block quantizers but no HF converter; the
  conversion (architecture metadata, Llama's q/k permutation, the byte-level BPE and SentencePiece vocabularies)
  is written here for the families of ``edgeft.arch`` with a ``gguf_arch``; anything llama.cpp cannot run as the
  HF model does (an unsupported family, RoPE or attention option, or tokenizer) is refused in one line.
- Types (``QUANTS``): f32, f16, bf16, q8_0, q4_0 through gguf-py; q4_k_m, q5_k_m, q6_k through llama.cpp's
  quantizer (after an F32 file is validated). A converted (QAT) directory's int4/int8 grids are packed into
  Q4_0/Q8_0 blocks from their trained integers and scales (``EXACT_TYPES``), not quantized a second time; each
  such tensor is read back and checked against the converted weights.
- Before the file is renamed into place llama.cpp runs it on the validation texts and its logits are compared
  with a float model holding exactly the file's weights (*fidelity*: conversion bugs) and with the source model
  (*source*: the type's total error), within the per-type bounds of ``QUANTS``; llama.cpp's tokenization (and,
  for SentencePiece, detokenization) must equal the HF tokenizer's and the chat template must be intact. A
  failure raises ``EdgeftError`` in one line and leaves any previous file untouched.

How and why (per-family metadata, tokenizers, exact packing, the thresholds and what they were measured on):
docs/exporters.md.
"""

from __future__ import annotations

import ctypes
import json
import logging
import math
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edgeft.arch import FAMILIES, Family, for_config, rotary_dims
from edgeft.errors import EdgeftError
from edgeft.fsutil import atomic_path
from edgeft.rundir import is_converted, run_name


@dataclass(frozen=True)
class QuantSpec:
    """A GGUF output type and the validation tolerances a correct export of it meets."""

    name: str
    file_type: str  # gguf.LlamaFileType member name
    weight: str  # gguf.GGMLQuantizationType for 2-D weights
    output: str  # type of the output projection (or the tied embedding)
    fidelity_rel_err: float  # llama.cpp vs the file's own weights in eager PyTorch
    fidelity_top1: float
    rel_err: float  # llama.cpp vs the source model (adds the type's rounding error)
    top1: float
    greedy_exact: bool
    llama_ftype: str | None = None  # llama_cpp LLAMA_FTYPE_* constant: written by llama_model_quantize


QUANTS: dict[str, QuantSpec] = {
    q.name: q
    for q in [
        QuantSpec("f32", "ALL_F32", "F32", "F32", 0.001, 0.99, 0.002, 0.99, greedy_exact=True),
        QuantSpec("f16", "MOSTLY_F16", "F16", "F16", 0.005, 0.98, 0.01, 0.97, greedy_exact=True),
        QuantSpec("bf16", "MOSTLY_BF16", "BF16", "BF16", 0.02, 0.95, 0.04, 0.93, greedy_exact=False),
        QuantSpec("q8_0", "MOSTLY_Q8_0", "Q8_0", "Q8_0", 0.10, 0.85, 0.20, 0.80, greedy_exact=False),
        QuantSpec("q4_0", "MOSTLY_Q4_0", "Q4_0", "Q8_0", 0.15, 0.75, 0.80, 0.30, greedy_exact=False),
        # K-quants: llama.cpp picks each tensor's type (Q4_K_M mixes Q4_K/Q6_K; rows not a multiple of 256
        # fall back to Q5_0/Q5_1/Q8_0), so ``weight``/``output`` only describe the main type
        QuantSpec("q4_k_m", "MOSTLY_Q4_K_M", "Q4_K", "Q6_K", 0.15, 0.75, 0.50, 0.45, greedy_exact=False,
                  llama_ftype="LLAMA_FTYPE_MOSTLY_Q4_K_M"),
        QuantSpec("q5_k_m", "MOSTLY_Q5_K_M", "Q5_K", "Q6_K", 0.15, 0.75, 0.45, 0.55, greedy_exact=False,
                  llama_ftype="LLAMA_FTYPE_MOSTLY_Q5_K_M"),
        QuantSpec("q6_k", "MOSTLY_Q6_K", "Q6_K", "Q6_K", 0.12, 0.80, 0.25, 0.70, greedy_exact=False,
                  llama_ftype="LLAMA_FTYPE_MOSTLY_Q6_K"),
    ]
}

# GGUF block types that can hold a trained symmetric grid exactly: nibble/int8 = q (+ 8), d = scale as fp16.
# A requested type maps each trained weight dtype to the block written (the smallest exact one it allows).
EXACT_TYPES: dict[str, dict[str, str]] = {
    "q4_0": {"int4": "Q4_0", "int8": "Q8_0"},  # an int8 grid (embeddings) stays Q8_0 rather than re-rounded
    "q8_0": {"int4": "Q8_0", "int8": "Q8_0"},
}
EXACT_BLOCK = 32
# In an exact export, the 2-D tensors the scheme left in float (e.g. the token embedding of int4/int8-int4) are
# written Q8_0 whatever the requested type: Q4_0 there would be a second quantization QAT never saw (tiny models:
# logits rel. error vs the converted model 0.11-0.14 with a Q4_0 embedding, 0.013-0.015 with Q8_0, 0.013 with F16).
EXACT_FLOAT_TYPE = "Q8_0"

# torchao's int8 per-token activations vs llama.cpp's (float / Q8_0 blocks): extra room on the source bounds
ACT_QUANT_ALLOWANCE = {"rel_err": 0.05, "top1": 0.10}

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


def export(
    src: str | os.PathLike,
    out_path: str | os.PathLike,
    *,
    quant: str = "q8_0",
    exact: bool = True,
    _skip_qk_permute: bool = False,
    _corrupt: str | None = None,
) -> dict[str, Any]:
    """Write ``src`` (an HF or converted directory) as a GGUF file at ``out_path`` and validate it on llama.cpp.

    Returns a report: path, bytes, quant, architecture, tensor type counts, which trained tensors were written
    exactly and which re-quantized, validation numbers, seconds. ``exact=False`` re-quantizes every trained
    tensor from its dequantized weights (the comparison baseline). Raises ``EdgeftError`` (and leaves an existing
    ``out_path`` untouched) when the file does not validate.
    ``_skip_qk_permute`` / ``_corrupt`` (a GGUF tensor name to scramble) exist only to prove the check works.
    """
    t0 = time.perf_counter()
    src, out_path = Path(src), Path(out_path)
    qspec = QUANTS.get(quant.lower())
    if qspec is None:
        raise EdgeftError(f"unknown GGUF type {quant!r}: choose one of {', '.join(QUANTS)}")
    if not (src / "config.json").is_file():
        raise EdgeftError(f"{src} is not a model directory (no config.json)")
    cfg = json.loads((src / "config.json").read_text())
    arch = _arch_spec(cfg)
    _check_tokenizer_files(src)
    model, tokenizer, record = _load_source(src)
    scheme = _trained_scheme(record)
    act_quant = scheme is not None and scheme.activation is not None

    with atomic_path(out_path) as tmp:
        if qspec.llama_ftype is None:
            vocab_info, tensors = _write_file(
                tmp, model, tokenizer, cfg, arch, qspec, src, skip_permute=_skip_qk_permute, corrupt=_corrupt,
                exact=exact,
            )
        else:
            vocab_info, tensors = _write_k_quant(
                tmp, model, tokenizer, cfg, arch, qspec, src, _skip_qk_permute, act_quant
            )
        t_write = time.perf_counter() - t0
        if tensors.exact:
            # the file's dequantized weights, read back through gguf-py, against the converted model's own
            _check_exact_weights(tmp, model, cfg, arch, tensors.exact, skip_permute=_skip_qk_permute)
        all_exact = scheme is not None and not tensors.requantized
        reference = _reference_model(model, tensors.reference)
        tensors.reference.clear()
        validation = _validate(
            tmp,
            model,
            reference,
            tokenizer,
            qspec,
            act_quant,
            vocab_info,
            label=f"{out_path.name} ({quant})",
            exact=all_exact,
            rope=tensors.rope,
        )
        del reference
        nbytes = tmp.stat().st_size
    total = time.perf_counter() - t0
    report = {
        "path": str(out_path),
        "bytes": nbytes,
        "quant": qspec.name,
        "architecture": arch.hf_class,
        "source": str(src),
        "source_scheme": ((record or {}).get("plan") or {}).get("name"),
        "tensor_types": tensors.counts,
        # tensors the scheme quantized: written from the trained integers, or quantized a second time
        "exact_tensors": sorted(tensors.exact),
        "requantized_tensors": sorted(tensors.requantized),
        "float_tensors": tensors.float_tensors,  # exact export: untrained 2-D tensors and their type
        "tokenizer_model": vocab_info["model"],  # gpt2 (byte-level BPE) or llama (SentencePiece)
        "tokenizer_pre": vocab_info["pre"],
        "rope": {"type": tensors.rope.kind, "dims": tensors.rope.dims, "tensors": sorted(tensors.rope.tensors)},
        "validation": validation,
        "seconds": {"write": round(t_write, 2), "validate": round(total - t_write, 2), "total": round(total, 2)},
        "warnings": tensors.warnings,
    }
    if tensors.exact:
        report["exact"] = {
            "scale_rounding_max_rel": tensors.scale_rounding,  # fp32 -> fp16 scales; 0.0 for fp16-scale schemes
            "degenerate_groups": tensors.degenerate_groups,  # 0 < fp16 scale < FP16_SCALE_FLOOR (see qat.schemes)
        }
    if scheme is not None:
        if tensors.requantized:
            report["note"] = (
                f"{len(tensors.requantized)} trained tensors were dequantized and quantized again to {qspec.name} "
                f"(exact export needs {'/'.join(EXACT_TYPES)} and symmetric groups that are multiples of "
                f"{EXACT_BLOCK})"
            )
        else:
            report["note"] = "every trained tensor was written from its trained integers and scales (exact)"
    return report


@dataclass
class _Tensors:
    """What was written: type counts, the file's weights in HF layout (the fidelity reference), exactness."""

    counts: dict[str, int] = field(default_factory=dict)
    reference: dict[str, torch.Tensor] = field(default_factory=dict)
    exact: dict[str, tuple[str, str]] = field(default_factory=dict)  # gguf name -> (hf name, GGML type)
    requantized: list[str] = field(default_factory=list)
    float_tensors: dict[str, str] = field(default_factory=dict)  # exact export: untrained 2-D tensors -> type
    scale_rounding: float = 0.0
    degenerate_groups: int = 0
    rope: Any = None  # the file's _Rope
    warnings: list[str] = field(default_factory=list)


def _write_file(
    path: Path,
    model: Any,
    tokenizer: Any,
    cfg: dict[str, Any],
    arch: Family,
    qspec: QuantSpec,
    src: Path,
    *,
    skip_permute: bool = False,
    corrupt: str | None = None,
    exact: bool = True,
) -> tuple[dict[str, Any], _Tensors]:
    """Write the whole GGUF file (metadata, vocabulary, tensors) with gguf-py."""
    import gguf

    writer = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH[arch.gguf_arch]])
    rope, warnings = _add_metadata(writer, cfg, arch, qspec, src, model)
    writer.add_name(_gguf_name(src, tokenizer))
    vocab_info = _add_vocab(writer, src, cfg, tokenizer)
    tensors = _add_tensors(writer, model, cfg, arch, qspec, skip_permute=skip_permute, corrupt=corrupt, exact=exact,
                           generated=rope.tensors)
    tensors.rope, tensors.warnings = rope, warnings
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return vocab_info, tensors


# --- source -----------------------------------------------------------------------------------------


def _arch_spec(cfg: dict[str, Any]) -> Family:
    fam = for_config(cfg)
    if fam is None or fam.gguf_arch is None:
        names = cfg.get("architectures") or [cfg.get("model_type", "?")]
        supported = sorted(f.hf_class for f in FAMILIES.values() if f.gguf_arch)
        raise EdgeftError(f"GGUF export does not support architecture {names[0]} (supported: {', '.join(supported)})")
    return fam


def _check_tokenizer_files(src: Path) -> None:
    if not (src / "tokenizer.json").is_file():
        raise EdgeftError(f"{src} has no tokenizer.json: GGUF export needs a fast (tokenizers) tokenizer")


def _trained_scheme(record: dict[str, Any] | None) -> Any:
    """The QAT scheme a converted directory was quantized with (None for float models)."""
    plan = (record or {}).get("plan")
    if not plan:
        return None
    from edgeft.qat.schemes import SCHEMES

    return SCHEMES.get(plan.get("scheme"))


def _load_source(src: Path) -> tuple[Any, Any, dict[str, Any] | None]:
    """The model the file must reproduce: float HF model, or the torchao-quantized converted model."""
    if is_converted(src):
        from edgeft.qat import load_converted

        model, tokenizer, record = load_converted(src)
        return model.eval(), tokenizer, record
    from edgeft.models import load_model

    model, tokenizer = load_model(src)
    return model.eval(), tokenizer, None


def _float_weight(t: torch.Tensor) -> torch.Tensor:
    """A plain float32 tensor: torchao quantized tensors (tensor subclasses) are dequantized."""
    if type(t) is not torch.Tensor and hasattr(t, "dequantize"):
        t = t.dequantize()
    return t.detach().to(torch.float32).contiguous()


# --- metadata ---------------------------------------------------------------------------------------


@dataclass
class _Rope:
    """How the file carries the model's RoPE: base, rotated dims, and the llama.cpp form of its scaling."""

    theta: float
    kind: str  # HF rope_type: default, linear, llama3, longrope
    dims: int  # rotated dims per head (fewer than head_dim under partial_rotary_factor)
    factor: float = 1.0  # linear
    tensors: dict[str, np.ndarray] = field(default_factory=dict)  # generated F32 tensors by llama.cpp name
    attn_factor: float = 1.0  # longrope: HF scales cos/sin by it, llama.cpp's rope by rope.scaling.attn_factor
    original_context: int | None = None  # longrope: beyond it llama.cpp (by n_ctx) and HF (by length) go long


# Scaled RoPE (llama3, longrope) moves only low frequencies, which the short validation texts barely rotate:
# such files are also compared on one sequence of this many held-out tokens (within the file's context)
ROPE_CHECK_TOKENS = 512


def _rope_parameters(c: Any) -> dict[str, Any]:
    """The loaded config's RoPE parameters (transformers normalises legacy ``rope_scaling``/``rope_theta`` keys)."""
    params = dict(getattr(c, "rope_parameters", None) or {})
    if "rope_theta" not in params:
        params["rope_theta"] = getattr(c, "rope_theta", 10000.0)
    return params


def llama3_rope_factors(params: dict[str, Any], dims: int) -> np.ndarray:
    """Per-frequency divisors of RoPE ``llama3`` (Llama 3.1+), as llama.cpp reads them from ``rope_freqs``:
    wavelengths below original / high_freq_factor keep their frequency (1), above original / low_freq_factor are
    slowed by ``factor``, and in between the two blend smoothly (Meta's definition, as HF computes it)."""
    base = float(params["rope_theta"])
    factor = float(params.get("factor", 8.0))
    low, high = float(params.get("low_freq_factor", 1.0)), float(params.get("high_freq_factor", 4.0))
    original = float(params.get("original_max_position_embeddings", 8192))
    out = []
    for i in range(0, dims, 2):
        wavelen = 2 * math.pi * base ** (i / dims)
        if wavelen < original / high:
            out.append(1.0)
        elif wavelen > original / low:
            out.append(factor)
        else:
            smooth = (original / wavelen - low) / (high - low)
            out.append(1.0 / ((1.0 - smooth) / factor + smooth))
    return np.asarray(out, dtype=np.float32)


def _tensor_name(arch: Family, tensor: str) -> str:
    import gguf

    key = gguf.MODEL_TENSOR[tensor]
    if key not in gguf.MODEL_TENSORS[gguf.MODEL_ARCH[arch.gguf_arch]]:
        raise EdgeftError(f"GGUF export: llama.cpp's {arch.gguf_arch} has no {tensor} tensor")
    return gguf.TENSOR_NAMES[key] + ".weight"


def _rope_plan(model: Any, arch: Family, src: Path, theta: float, scaling: dict[str, Any] | None) -> _Rope:
    """The file's RoPE from the loaded model: what llama.cpp's graph for ``arch`` needs to rotate as HF does."""
    kind = (scaling or {}).get("rope_type", (scaling or {}).get("type")) or "default"
    if kind not in arch.gguf_rope:
        raise EdgeftError(
            f"GGUF export of {arch.model_type} does not support RoPE scaling {kind!r} ({src.name}; llama.cpp's "
            f"{arch.gguf_arch} takes {', '.join(arch.gguf_rope)})"
        )
    rope = _Rope(theta=theta, kind=kind, dims=rotary_dims(model))
    if kind == "linear":
        rope.factor = float(scaling["factor"])
    elif kind == "llama3":
        factors = llama3_rope_factors({**scaling, "rope_theta": theta}, rope.dims)
        rope.tensors[_tensor_name(arch, "ROPE_FREQS")] = factors
    elif kind == "longrope":
        inner = getattr(model, model.base_model_prefix)
        rope.attn_factor = float(inner.rotary_emb.attention_scaling)  # what HF multiplies cos and sin by
        rope.original_context = int(scaling["original_max_position_embeddings"])
        for which in ("long", "short"):
            f = np.asarray(scaling[f"{which}_factor"], dtype=np.float32)
            if f.shape != (rope.dims // 2,):
                raise EdgeftError(f"GGUF export: {len(f)} LongRoPE {which} factors for {rope.dims // 2} frequencies")
            rope.tensors[_tensor_name(arch, f"ROPE_FACTORS_{which.upper()}")] = f
    return rope


# llama.cpp keeps no per-token attributes in GGUF; it sets them by general.name. A name containing one of these
# (lowercased) gets Phi-3's: every special token strips the whitespace after it (rstrip) but <unk>, <s> and
# <|endoftext|>, and </s> does too (it then looks those four up, and fails to load a vocabulary without them).
_PHI3_NAMES = ("phi-3", "phi3")


def _gguf_name(src: Path, tokenizer: Any) -> str:
    """general.name: the run's (or directory's) name, with llama.cpp's Phi-3 token attributes switched on exactly
    when the HF tokenizer has special tokens that strip the whitespace after them (Phi-3's, and any run of it
    whatever its name), and off otherwise (a run called "phi3-..." of another family). The tokenizer check then
    proves that llama.cpp tokenizes as HF does."""
    name = run_name(src)
    rstrip = any(t.special and t.rstrip for t in getattr(tokenizer, "added_tokens_decoder", {}).values())
    has = any(k in name.lower() for k in _PHI3_NAMES)
    if rstrip and not has:
        return f"{name} (phi-3 tokenizer)"
    if has and not rstrip:
        return re.sub(r"(?i)phi-?3", lambda m: m.group(0)[:-1] + "_3", name)
    return name


def _window(model: Any, arch: Family) -> int:
    """The narrowest sliding window any layer applies as HF runs the model (0: none)."""
    c = model.config
    if arch.window == "config":
        ws = [getattr(c, "sliding_window", None)]
    elif arch.window == "layer":
        stack = getattr(model, model.base_model_prefix)
        ws = [getattr(layer.self_attn, "sliding_window", None) for layer in stack.layers]
    else:
        ws = []
    ws = [int(w) for w in ws if w]
    return min(ws) if ws else 0


def _gemma3_metadata(writer: Any, c: Any, src: Path) -> tuple[float, dict[str, Any] | None]:
    """Write Gemma3's own keys from the loaded HF config; return the global layers' RoPE base and scaling.

    The loaded config (not config.json) is read because transformers normalises Gemma3's legacy keys
    (``rope_local_base_freq``, ``sliding_window_pattern``, ``rope_scaling``) into ``rope_parameters`` per layer
    type and ``layer_types``. What llama.cpp's Gemma3 graph has no equivalent for is refused in one line.
    """
    where = f"GGUF export of Gemma3 ({src.name})"
    if getattr(c, "use_bidirectional_attention", False):
        raise EdgeftError(f"{where}: bidirectional attention is not supported (llama.cpp's gemma3 is causal)")
    if getattr(c, "attn_logit_softcapping", None) is not None:
        raise EdgeftError(f"{where}: attn_logit_softcapping is not supported (llama.cpp's gemma3 has none)")
    types = list(c.layer_types)
    if set(types) - {"sliding_attention", "full_attention"}:
        raise EdgeftError(f"{where}: unknown layer types {sorted(set(types))}")
    sliding = [t == "sliding_attention" for t in types]
    if any(sliding) and not c.sliding_window:
        raise EdgeftError(f"{where}: sliding-window layers without a sliding_window size")
    rope = c.rope_parameters
    full, local = rope["full_attention"], rope["sliding_attention"]
    if local.get("rope_type", "default") != "default":
        raise EdgeftError(f"{where}: RoPE scaling {local.get('rope_type')!r} on sliding-window layers is not supported")
    # HF scales scores by query_pre_attn_scalar**-0.5; llama.cpp's gemma3 ignores attention.scale and uses
    # head_dim**-0.5, or (hidden / heads)**-0.5 for the 62-layer 27B (measured: 0.19 rel. error when they differ)
    llama_scalar = c.hidden_size / c.num_attention_heads if c.num_hidden_layers == 62 else c.head_dim
    if float(c.query_pre_attn_scalar) != float(llama_scalar):
        raise EdgeftError(
            f"{where}: query_pre_attn_scalar {c.query_pre_attn_scalar} differs from the {llama_scalar:g} llama.cpp "
            "derives from the shape (it has no key for it)"
        )
    # llama.cpp masks a key when pos_q - pos_k >= n_swa, HF keeps pos_q - pos_k < sliding_window: the same window
    writer.add_sliding_window(int(c.sliding_window) if any(sliding) else 0)
    writer.add_sliding_window_pattern(sliding)  # one flag per layer: True = sliding window
    writer.add_rope_freq_base_swa(float(local["rope_theta"]))
    if c.final_logit_softcapping is not None:
        writer.add_final_logit_softcapping(float(c.final_logit_softcapping))
    scaling = full if full.get("rope_type", "default") != "default" else None
    return float(full["rope_theta"]), scaling


def _add_metadata(
    writer: Any, cfg: dict[str, Any], arch: Family, qspec: QuantSpec, src: Path, model: Any
) -> tuple[_Rope, list[str]]:
    """Write the architecture's keys from the loaded model; return its RoPE plan and warnings."""
    import gguf

    c = model.config
    warnings: list[str] = []
    act = getattr(c, arch.act_attr)
    if act not in arch.gguf_activations:
        raise EdgeftError(
            f"GGUF export of {arch.model_type} ({src.name}): activation {act!r} is not supported (llama.cpp's "
            f"{arch.gguf_arch} computes {', '.join(arch.gguf_activations)})"
        )
    n_head = cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // n_head
    if arch.gguf_windows:
        theta, scaling = _gemma3_metadata(writer, c, src)
    else:
        params = _rope_parameters(c)
        theta = float(params["rope_theta"])
        scaling = params if params.get("rope_type", "default") != "default" else None
    rope = _rope_plan(model, arch, src, theta, scaling)
    if rope.kind == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(rope.factor)
    elif rope.kind == "longrope":
        writer.add_rope_scaling_attn_factors(rope.attn_factor)
        writer.add_rope_scaling_orig_ctx_len(rope.original_context)
    context = int(cfg.get("max_position_embeddings", 2048))
    window = 0 if arch.gguf_windows else _window(model, arch)
    if 0 < window < context:
        # llama.cpp attends to everything: equal to HF's windowed attention only while the context fits the window
        warnings.append(
            f"llama.cpp's {arch.gguf_arch} has no sliding window: the file's context length is {window} (the "
            f"window), not {context}; beyond it llama.cpp would attend further back than the model does"
        )
        context = window
    writer.add_context_length(context)
    writer.add_embedding_length(cfg["hidden_size"])
    writer.add_block_count(cfg["num_hidden_layers"])
    writer.add_feed_forward_length(cfg["intermediate_size"])
    writer.add_head_count(n_head)
    writer.add_head_count_kv(cfg.get("num_key_value_heads", n_head))
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(rope.dims)
    writer.add_rope_freq_base(rope.theta)
    writer.add_layer_norm_rms_eps(float(cfg.get("rms_norm_eps", 1e-6)))
    writer.add_vocab_size(cfg["vocab_size"])
    writer.add_file_type(gguf.LlamaFileType[qspec.file_type])
    if qspec.weight not in ("F32", "F16", "BF16"):
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    return rope, warnings


# --- tokenizer --------------------------------------------------------------------------------------


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
        kept = split.get("behavior") == "Isolated" and not split.get("invert") or (
            split.get("behavior") == "Removed" and split.get("invert"))
        if kept and regex in _SPLIT_PRE:
            return _SPLIT_PRE[regex]
    raise EdgeftError(f"GGUF export: unrecognised tokenizer pre-tokenizer {kinds} (byte-level BPE of GPT-2, "
                      "SmolLM, Llama 3, Qwen2, Mistral tekken or GPT-4o style are supported)")


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
    add_bos = len(full) > len(plain) and full[0] == tokenizer.bos_token_id and full[1:1 + len(plain)] == plain
    add_eos = len(full) > len(plain) and full[-1] == tokenizer.eos_token_id and full[-1 - len(plain):-1] == plain
    if len(full) - len(plain) != int(add_bos) + int(add_eos):
        raise EdgeftError("GGUF export: the tokenizer adds special tokens other than BOS/EOS; not supported")
    return add_bos, add_eos


# SentencePiece-style tokenizers (Llama 2, TinyLlama, Mistral 7B v0.1, Gemma): llama.cpp's SPM tokenizer
# ("llama") escapes spaces as U+2581, prefixes one (add_space_prefix) at the start of the text and after every
# special or user-defined token, then repeatedly merges the adjacent pair whose concatenation is a token of the
# highest score (leftmost first), and writes what did not become a token as <0xXX> byte tokens. It normalizes
# nothing else.
SPM_SPACE = "\u2581"
SPM_TOKENIZER_TEXTS = (  # checked on llama.cpp besides VALIDATION_TEXTS (tokenization only)
    " leading space, then  two and   three spaces",
    "  two leading spaces\nand a newline, trailing  ",
    "\n\nnewlines first\r\n\tand tabs\t",
    "digits 0 12 345 6789 3.14159 1,000,000",
    "bytes: \u00dcml\u00e4ut, \u65e5\u672c\u8a9e, emoji \U0001f642\U0001f680, "
    "\u0416\u0436 \u03a9 \u00a7\u00b6 \u2581 end",
)


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
        if after.startswith(marker) and after[len(marker):].startswith(SPM_SPACE) != prefix:
            raise EdgeftError(
                "GGUF export: the HF tokenizer adds its \u2581 prefix at the start of a text but not after a special "
                "token (non-legacy Llama tokenizer, Metaspace prepend_scheme 'first'); llama.cpp's SPM tokenizer "
                "adds it after every special token; not representable"
                if prefix else
                "GGUF export: the HF tokenizer adds a \u2581 prefix after special tokens only; not representable"
            )
    return prefix


_BYTE_TOKEN = re.compile(r"<0x[0-9A-F]{2}>")


def _spm_scores_from_model(path: Path, by_id: dict[int, str], n_vocab: int) -> tuple[dict[int, float], dict[int, int]]:
    """Scores and types of the pieces of a tokenizer.model (SentencePiece reads it; no protobuf needed)."""
    import gguf

    try:
        from sentencepiece import SentencePieceProcessor
    except ImportError:
        raise EdgeftError(
            f"GGUF export: reading {path.name} needs sentencepiece: pip install sentencepiece"
        ) from None
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
            gguf.TokenType.UNKNOWN if sp.is_unknown(i) else
            gguf.TokenType.CONTROL if sp.is_control(i) else
            gguf.TokenType.UNUSED if sp.is_unused(i) else
            gguf.TokenType.BYTE if sp.is_byte(i) else
            gguf.TokenType.NORMAL
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


def _add_vocab_spm(
    writer: Any, src: Path, cfg: dict[str, Any], tokenizer: Any, tj: dict[str, Any]
) -> dict[str, Any]:
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
        piece = (i in added and not added[i].get("special") and model["vocab"].get(text) == i and text in merged
                 and SPM_SPACE in text)
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
        "model": "llama", "pre": "default", "scores_from": source, "add_bos": add_bos, "add_eos": add_eos,
        "add_space_prefix": add_space_prefix, "chat_template": special.chat_template,
    }


# --- tensors ----------------------------------------------------------------------------------------


def _permute_rope(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF rotate-half rows -> interleaved pairs per head, which llama.cpp's (non-NEOX) RoPE expects."""
    shape = w.shape
    return w.reshape(n_head, 2, shape[0] // n_head // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def _tensor_qtype(
    gguf_name: str, arr: np.ndarray, qspec: QuantSpec, tied: bool, float_type: str | None = None
) -> Any:
    """The GGML type of one tensor: norms/biases F32; output at ``qspec.output``; misfit rows fall back to F16.

    ``float_type`` overrides the type of every 2-D tensor (an exact export's untrained tensors).
    """
    import gguf

    if arr.ndim == 1:
        return gguf.GGMLQuantizationType.F32
    is_output = gguf_name == "output.weight" or (tied and gguf_name == "token_embd.weight")
    qtype = gguf.GGMLQuantizationType[float_type or (qspec.output if is_output else qspec.weight)]
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    if arr.shape[-1] % block:
        qtype = gguf.GGMLQuantizationType.F16  # as llama.cpp's converter does for rows that do not fit
    return qtype


def _add_tensors(
    writer: Any,
    model: Any,
    cfg: dict[str, Any],
    arch: Family,
    qspec: QuantSpec,
    *,
    skip_permute: bool,
    corrupt: str | None,
    exact: bool = True,
    generated: dict[str, np.ndarray] | None = None,
) -> _Tensors:
    """Write every tensor; return the type counts, the file's weights back in HF layout (the reference), and
    which trained tensors were written exactly.

    A trained (torchao) tensor whose grid a requested block type holds exactly is packed from its integers and
    scales (:func:`_exact_blocks`); every other tensor is quantized once in HF layout by gguf-py. The reference
    is the dequantization of the packed data. The q/k permutation then moves whole rows of the quantized data
    (blocks run along rows, so this commutes with quantizing), which keeps the reference independent of the
    writing path: a wrong permutation cannot also fool the check.
    """
    import gguf
    from gguf.quants import dequantize, quantize

    tmap = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.gguf_arch], cfg["num_hidden_layers"])
    n_head = cfg["num_attention_heads"]
    n_kv = cfg.get("num_key_value_heads", n_head)
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    out = _Tensors()
    written: set[str] = set()
    # an exact export of a trained model: float tensors the scheme left alone go at Q8_0, not the requested type
    exact_mode = exact and qspec.name in EXACT_TYPES and any(_is_trained(x) for x in model.state_dict().values())
    for hf_name, t in model.state_dict().items():
        if hf_name.endswith("rotary_emb.inv_freq"):
            continue
        if tied and hf_name == "lm_head.weight":
            continue  # llama.cpp uses token_embd as the output when output.weight is absent
        name = tmap.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise EdgeftError(f"GGUF export: no llama.cpp name for tensor {hf_name} ({arch.hf_class})")
        block_type = _exact_block_type(t, qspec) if exact else None
        if block_type is not None:
            qtype = gguf.GGMLQuantizationType[block_type]
            data, rounding, degenerate = _exact_blocks(t, qtype, hf_name)
            out.exact[name] = (hf_name, qtype.name)
            out.scale_rounding = max(out.scale_rounding, rounding)
            out.degenerate_groups += degenerate
            shape = tuple(t.shape)
        else:
            if _is_trained(t):
                out.requantized.append(name)
            arr = _float_weight(t).numpy()
            qtype = _tensor_qtype(name, arr, qspec, tied, float_type=EXACT_FLOAT_TYPE if exact_mode else None)
            if exact_mode and not _is_trained(t) and arr.ndim == 2:
                out.float_tensors[name] = qtype.name
            data = quantize(arr, qtype)
            shape = arr.shape
        out.reference[hf_name] = torch.from_numpy(np.ascontiguousarray(dequantize(data, qtype)).reshape(shape))
        if arch.norm_offset and _is_norm(hf_name, data):
            data = data + np.float32(arch.norm_offset)  # F32: the same (1 + w) HF computes in float32
        if arch.gguf_permute_qk and not skip_permute:
            if hf_name.endswith(("q_proj.weight", "q_proj.bias")):
                data = _permute_rope(data, n_head)
            elif hf_name.endswith(("k_proj.weight", "k_proj.bias")):
                data = _permute_rope(data, n_kv)
        if name == corrupt:  # tests only: a layout bug, rows in the wrong order
            data = data[np.random.default_rng(0).permutation(data.shape[0])]
        writer.add_tensor(name, np.ascontiguousarray(data), raw_dtype=qtype)
        out.counts[qtype.name] = out.counts.get(qtype.name, 0) + 1
        written.add(name)
    if "token_embd.weight" not in written or not ("output.weight" in written or tied):
        raise EdgeftError("GGUF export: the model lacks its token embedding or output projection")
    for name, arr in (generated or {}).items():  # RoPE factors: llama.cpp's own tensors, not the model's weights
        writer.add_tensor(name, np.ascontiguousarray(arr, dtype=np.float32), raw_dtype=gguf.GGMLQuantizationType.F32)
        out.counts["F32"] = out.counts.get("F32", 0) + 1
    return out


def _is_norm(name: str, data: np.ndarray) -> bool:
    """An RMSNorm weight (HF or GGUF name: both end in ``norm.weight``; norms are the only such 1-D tensors)."""
    return data.ndim == 1 and name.endswith("norm.weight")


# --- exact (QAT-matched) blocks -----------------------------------------------------------------------


def _is_trained(t: torch.Tensor) -> bool:
    """A torchao quantized tensor (the scheme's grid) rather than a float one."""
    return type(t) is not torch.Tensor and hasattr(t, "qdata") and hasattr(t, "scale")


def _exact_block_type(t: torch.Tensor, qspec: QuantSpec) -> str | None:
    """The GGML block type that holds ``t``'s trained grid exactly under ``qspec``, or None.

    Exact needs a symmetric grid (zero points all 0) of int4 or int8 values, one scale per group of a
    2-D weight, and groups that are whole multiples of the 32-weight block (a group of 64 is two blocks with
    the same scale; per channel is one group per row).
    """
    allowed = EXACT_TYPES.get(qspec.name)
    if allowed is None or not _is_trained(t) or t.dim() != 2:
        return None
    bits = {torch.int4: "int4", torch.int8: "int8"}.get(getattr(t, "target_dtype", None))
    block = tuple(getattr(t, "block_size", ()))
    if bits is None or len(block) != 2 or block[0] != 1 or block[1] % EXACT_BLOCK:
        return None
    if t.zero_point is not None and t.zero_point.numel() and bool(t.zero_point.ne(0).any()):
        return None
    return allowed[bits]


def _exact_blocks(t: torch.Tensor, qtype: Any, hf_name: str) -> tuple[np.ndarray, float, int]:
    """Pack a trained tensor's integers and scales as Q4_0 or Q8_0 blocks: (bytes, max scale rounding, degenerate).

    Q4_0 block (ggml's ``block_q4_0``): fp16 ``d`` then 16 bytes whose low nibbles are weights 0..15 and high
    nibbles weights 16..31, each ``q + 8``. Q8_0 (``block_q8_0``): fp16 ``d`` then 32 int8 ``q``.
    """
    from edgeft.qat.schemes import FP16_SCALE_FLOOR

    q = t.qdata.detach().to(torch.int16)
    rows, cols = q.shape
    group = t.block_size[1]
    scale = t.scale.detach().reshape(rows, cols // group).to(torch.float32)
    s16 = scale.to(torch.float16)
    normal = scale.abs() >= torch.finfo(torch.float16).smallest_normal  # below: counted as degenerate instead
    rounding = float(((s16.float() - scale).abs()[normal] / scale[normal].abs()).max()) if bool(normal.any()) else 0.0
    degenerate = int(((s16.float() > 0) & (s16.float() < FP16_SCALE_FLOOR)).sum())
    if not bool(torch.isfinite(s16).all()):
        raise EdgeftError(f"GGUF export: {hf_name} has scales that do not fit fp16; cannot write it exactly")
    lo, hi = (-8, 7) if qtype.name == "Q4_0" else (-128, 127)
    if int(q.min()) < lo or int(q.max()) > hi:
        raise EdgeftError(f"GGUF export: {hf_name} has integers outside [{lo}, {hi}] for {qtype.name}")
    nblk = cols // EXACT_BLOCK
    d = s16.repeat_interleave(group // EXACT_BLOCK, dim=1).numpy().view(np.uint8).reshape(rows, nblk, 2)
    qb = q.numpy().reshape(rows, nblk, EXACT_BLOCK)
    if qtype.name == "Q4_0":
        n = (qb + 8).astype(np.uint8)
        payload = n[..., :16] | (n[..., 16:] << np.uint8(4))
    else:
        payload = qb.astype(np.int8).view(np.uint8)
    data = np.concatenate([d, payload], axis=-1).reshape(rows, -1)
    return data, rounding, degenerate


def _check_exact_weights(
    path: Path,
    model: Any,
    cfg: dict[str, Any],
    arch: Family,
    exact: dict[str, tuple[str, str]],
    *,
    skip_permute: bool,
) -> None:
    """Read the exactly written tensors back from the file and compare them with the converted model's weights.

    Each must equal ``q * scale`` up to the fp16 rounding of the scale: |file - converted| <= |q| * |fp16(s) - s|
    (plus half an fp32 ulp of the converted product), i.e. identical for fp16-scale schemes.
    """
    file_weights = _read_file_weights(path, cfg, arch, names=set(exact), skip_permute=skip_permute)
    sd = model.state_dict()
    for name, (hf_name, _) in exact.items():
        t = sd[hf_name]
        conv = t.dequantize().detach().to(torch.float32)
        group = t.block_size[1]
        scale = t.scale.detach().reshape(conv.shape[0], -1).to(torch.float64).repeat_interleave(group, dim=1)
        s16 = scale.to(torch.float16).to(torch.float64)
        bound = t.qdata.to(torch.float64).abs() * (s16 - scale).abs() + conv.double().abs() * 2.0**-24
        diff = (file_weights[name].double() - conv.double()).abs()
        if not bool((diff <= bound).all()):
            worst = float((diff - bound).max())
            raise EdgeftError(
                f"GGUF export: {name} read back from the file differs from the converted weights by more than "
                f"the fp16 rounding of its scales (excess {worst:.3g}); file not written"
            )


def _read_file_weights(
    path: Path, cfg: dict[str, Any], arch: Family, *, names: set[str] | None = None, skip_permute: bool = False
) -> dict[str, torch.Tensor]:
    """A GGUF file's tensors dequantized by gguf-py, q/k rows put back in HF order; keyed by GGUF name."""
    import gguf
    from gguf.quants import dequantize

    n_head = cfg["num_attention_heads"]
    n_kv = cfg.get("num_key_value_heads", n_head)
    out: dict[str, torch.Tensor] = {}
    reader = gguf.GGUFReader(str(path))
    for rt in reader.tensors:
        if names is not None and rt.name not in names:
            continue
        arr = np.asarray(dequantize(np.asarray(rt.data), rt.tensor_type), dtype=np.float32)
        arr = arr.reshape(tuple(int(x) for x in reversed(rt.shape)))  # GGUF lists dims innermost first
        if arch.norm_offset and _is_norm(rt.name, arr):
            arr = arr - np.float32(arch.norm_offset)  # back to HF's (1 + w) convention
        if arch.gguf_permute_qk and not skip_permute:
            if rt.name.endswith("attn_q.weight") or rt.name.endswith("attn_q.bias"):
                arr = _unpermute_rope(arr, n_head)
            elif rt.name.endswith("attn_k.weight") or rt.name.endswith("attn_k.bias"):
                arr = _unpermute_rope(arr, n_kv)
        out[rt.name] = torch.from_numpy(np.array(arr, dtype=np.float32, copy=True))  # not a view of the mmap
    del reader
    return out


def _unpermute_rope(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of :func:`_permute_rope`: llama.cpp's interleaved rows back to HF's rotate-half order."""
    shape = w.shape
    return w.reshape(n_head, shape[0] // n_head // 2, 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


# --- K-quants through llama.cpp --------------------------------------------------------------------------


def _write_k_quant(
    path: Path,
    model: Any,
    tokenizer: Any,
    cfg: dict[str, Any],
    arch: Family,
    qspec: QuantSpec,
    src: Path,
    skip_permute: bool,
    act_quant: bool,
) -> tuple[dict[str, Any], _Tensors]:
    """Write an F32 GGUF beside ``path``, quantize it with llama.cpp's ``llama_model_quantize`` into ``path``.

    gguf-py has no K-quant quantizer (only dequantizers), and llama.cpp's choice of per-tensor types (Q4_K_M's
    Q6_K for attn_v/ffn_down halves and the output, fallbacks for rows not a multiple of 256) is part of what
    the type means, so llama.cpp itself quantizes. F32 (not F16) input: a converted model's dequantized grid is
    carried without another rounding. The reference weights are then read back from the file (gguf-py's
    dequantizers, q/k rows un-permuted), so fidelity still compares llama.cpp with the file's own weights.
    """
    import tempfile

    import llama_cpp

    fd, name = tempfile.mkstemp(prefix=f".{path.name}.f32-", dir=path.parent)
    os.close(fd)
    base = Path(name)
    try:
        vocab_info, written = _write_file(
            base, model, tokenizer, cfg, arch, QUANTS["f32"], src, skip_permute=skip_permute, exact=False
        )
        # the conversion itself is proven at F32 first: llama.cpp's quantizer is trusted, our writer is not
        reference = _reference_model(model, written.reference)
        written.reference.clear()
        _validate(base, model, reference, tokenizer, QUANTS["f32"], act_quant, vocab_info,
                  label=f"{path.name} (f32 before {qspec.name})", check_tokenizer=False, rope=written.rope)
        del reference
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = getattr(llama_cpp, qspec.llama_ftype)
        params.nthread = max(1, os.cpu_count() or 1)
        log = logging.getLogger("llama-cpp-python")  # llama-cpp-python's log callback prints per tensor
        level = log.level
        log.setLevel(logging.ERROR)
        try:
            rc = llama_cpp.llama_model_quantize(str(base).encode(), str(path).encode(), ctypes.byref(params))
        finally:
            log.setLevel(level)
        if rc != 0:
            raise EdgeftError(f"GGUF export: llama.cpp could not quantize to {qspec.name} (llama_model_quantize={rc})")
    finally:
        base.unlink(missing_ok=True)
    tensors = _Tensors(requantized=written.requantized, rope=written.rope, warnings=written.warnings)
    hf_names = {g: h for h, g in _gguf_names(model, cfg, arch).items()}
    for gname, w in _read_file_weights(path, cfg, arch, skip_permute=skip_permute).items():
        if gname in hf_names:  # not the generated RoPE factors
            tensors.reference[hf_names[gname]] = w
    import gguf

    for rt in gguf.GGUFReader(str(path)).tensors:
        tname = rt.tensor_type.name
        tensors.counts[tname] = tensors.counts.get(tname, 0) + 1
    return vocab_info, tensors


def _gguf_names(model: Any, cfg: dict[str, Any], arch: Family) -> dict[str, str]:
    """HF state-dict name -> GGUF tensor name, for the tensors :func:`_add_tensors` writes."""
    import gguf

    tmap = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.gguf_arch], cfg["num_hidden_layers"])
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    out = {}
    for hf_name in model.state_dict():
        if hf_name.endswith("rotary_emb.inv_freq") or (tied and hf_name == "lm_head.weight"):
            continue
        out[hf_name] = tmap.get_name(hf_name, try_suffixes=(".weight", ".bias"))
    return out


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


# --- validation -------------------------------------------------------------------------------------


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
    tokenize: Any, detokenize: Any, stored_template: str | None, tokenizer: Any, vocab_info: dict[str, Any],
    tok_checks: dict[str, tuple[list[int], bool]], label: str,
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
                return out.raw[:max(n, 0)].decode("utf-8", errors="replace")

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
    return out[len(ids):]


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
            _check_tokenization(rt.tokenize, lambda ids: _llama_detokenize(rt, ids),
                                rt.metadata.get("tokenizer.chat_template"), tokenizer, vocab_info, tok_checks, label)
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
