"""The export entry point: load a model directory, write its GGUF file, prove it on llama.cpp, rename it in place.

:func:`export` writes metadata, vocabulary and tensors with gguf-py (K-quants: an F32 file, validated, then
quantized by llama.cpp's own quantizer), validates the result and only then renames it to ``out_path``: a file
that fails leaves any previous one untouched. Its report says what was written and how exactly.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from edgeft.arch import Family
from edgeft.errors import EdgeftError
from edgeft.fsutil import atomic_path
from edgeft.rundir import is_converted

from .metadata import _add_metadata, _arch_spec, _gguf_name
from .quants import EXACT_BLOCK, EXACT_TYPES, QUANTS, QuantSpec
from .tensors import _add_tensors, _check_exact_weights, _gguf_names, _read_file_weights, _Tensors
from .validate import _reference_model, _validate
from .vocab import _add_vocab, _check_tokenizer_files


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
                tmp,
                model,
                tokenizer,
                cfg,
                arch,
                qspec,
                src,
                skip_permute=_skip_qk_permute,
                corrupt=_corrupt,
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
    tensors = _add_tensors(
        writer, model, cfg, arch, qspec, skip_permute=skip_permute, corrupt=corrupt, exact=exact, generated=rope.tensors
    )
    tensors.rope, tensors.warnings = rope, warnings
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return vocab_info, tensors


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
        _validate(
            base,
            model,
            reference,
            tokenizer,
            QUANTS["f32"],
            act_quant,
            vocab_info,
            label=f"{path.name} (f32 before {qspec.name})",
            check_tokenizer=False,
            rope=written.rope,
        )
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
