"""The tensors: every weight named for llama.cpp, laid out as it reads them and stored at the requested type.

A trained (torchao) int4/int8 grid that a Q4_0/Q8_0 block holds exactly is packed from its integers and scales
(:func:`_exact_blocks`), never quantized a second time, and read back and checked against the converted weights
(:func:`_check_exact_weights`); other tensors are quantized once by gguf-py. Llama's q/k rows are permuted to
llama.cpp's interleaved RoPE, Gemma3's norms written as 1 + w. :func:`_add_tensors` also returns the file's weights
in HF layout (independent of the permutation), the reference validation compares llama.cpp with.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edgeft.arch import Family
from edgeft.errors import EdgeftError

from .quants import EXACT_BLOCK, EXACT_FLOAT_TYPE, EXACT_TYPES, QuantSpec


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


def _float_weight(t: torch.Tensor) -> torch.Tensor:
    """A plain float32 tensor: torchao quantized tensors (tensor subclasses) are dequantized."""
    if type(t) is not torch.Tensor and hasattr(t, "dequantize"):
        t = t.dequantize()
    return t.detach().to(torch.float32).contiguous()


def _permute_rope(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF rotate-half rows -> interleaved pairs per head, which llama.cpp's (non-NEOX) RoPE expects."""
    shape = w.shape
    return w.reshape(n_head, 2, shape[0] // n_head // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def _tensor_qtype(gguf_name: str, arr: np.ndarray, qspec: QuantSpec, tied: bool, float_type: str | None = None) -> Any:
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
