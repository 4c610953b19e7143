"""ExecuTorch ``.pte`` export: XNNPACK-lowered, KV-cached, the trained quantization, proven on ExecuTorch.

- The program is the transformers model itself holding the converted model's torchao tensors (the integers and
  scales a QAT run trained), after explicit, reversible rewrites (``_edge_rewrites``: attention on ExecuTorch's
  KV-cache ops, sliding-window layers on ring caches, RMSNorm, the int8 embedding, the quantized linears), undone
  before validation, which runs the untouched model. Families: ``edgeft.arch``'s with ``pte``; what a program
  cannot carry (attention logit softcapping, bidirectional attention, LongRoPE past the original context) is
  refused in one line.
- Method ``forward`` takes ``tokens [1, n]`` and ``input_pos [n]`` and returns fp32 logits ``[1, n, vocab]``
  (``logits="all"``, ``model.pte``, what the evaluator reads) or ``[1, 1, vocab]`` (``"last"``,
  ``model-last.pte``, the deployment program); constant methods for ExecuTorch's LLM runner; the tokenizer files
  and chat template are copied beside it.
- Before the file is renamed into place it is checked: its structure (XNNPACK delegates, KV-cache ops, no stray
  dequantize op, size within 5% + 1 MiB of what the scheme's weights need), its logits through ExecuTorch's
  runtime against eager PyTorch (float: rel_err <= 1e-3; int8 activations: bounds scaled by eager's own noise),
  greedy generation, and ExecuTorch's ``TextLLMRunner`` emitting the program's greedy tokens. A failure raises
  ``EdgeftError`` in one line and leaves any previous ``model.pte`` and tokenizer untouched.

How and why (rewrites, ring caches, linears by grid, lowering, output modes, tolerances): docs/exporters.md.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import time
import types
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from edgeft.arch import FAMILIES, Family, for_config, rotary_dims
from edgeft.data.templates import adds_bos
from edgeft.devices.executorch_runtime import FULL_LOGITS_METHOD, REWIND_METHOD
from edgeft.errors import EdgeftError
from edgeft.fsutil import atomic_path
from edgeft.rundir import PTE_FILES, Exports, is_converted

MASK_NAME = "edgeft_executorch"  # attention implementation name whose mask function builds no mask
VALIDATION_SEQ_LENS = (48, 17, 5)  # held-out token sequences compared by logits
INCREMENTAL_PREFILL = 5
GREEDY_TOKENS = 16
FLOAT_REL = 1e-3
EMBEDDING_FORMATS = ("int8", "int4")  # export(embedding=...): embedding_byte, embedding_4bit
KV_CACHE_FORMATS = ("fp32", "int8")  # export(kv_cache=...)


# --- source -------------------------------------------------------------------------------------------


def _arch(src: Path) -> tuple[Family, dict[str, Any]]:
    cfg_path = src / "config.json"
    if not cfg_path.exists():
        raise EdgeftError(f"{src} is not a model directory (no config.json)")
    cfg = json.loads(cfg_path.read_text())
    mt = cfg.get("model_type")
    fam = for_config(cfg)
    if fam is None or not fam.pte:
        supported = ", ".join(f.model_type for f in FAMILIES.values() if f.pte)
        raise EdgeftError(f"pte export: architecture {mt!r} is not supported (supported: {supported})")
    if cfg.get("use_sliding_window"):  # Qwen2/3's optional windows on the upper layers: not validated here yet
        raise EdgeftError(f"pte export: {mt} with sliding-window attention is not supported")
    # custom_sdpa takes an additive mask but no score transform, and attends causally
    for key, why in (
        ("attn_logit_softcapping", "attention logit softcapping"),
        ("use_bidirectional_attention", "bidirectional attention"),
    ):
        if cfg.get(key):
            raise EdgeftError(f"pte export: {mt} with {why} is not supported (ExecuTorch's custom_sdpa has none)")
    return fam, cfg


def _load_source(src: Path) -> tuple[nn.Module, Any, dict[str, Any] | None]:
    if is_converted(src):
        from edgeft.qat import load_converted

        model, tok, record = load_converted(src)
    else:
        from edgeft.models import load_model

        model, tok = load_model(src, dtype=torch.float32)
        record = None
    model.eval().requires_grad_(False)
    return model, tok, record


def _weight_kind(w: torch.Tensor) -> str:
    """'float', 'dyn-act' (int8 per-token activations + intx weights) or 'weight-only'."""
    try:
        from torchao.quantization import IntxUnpackedToInt8Tensor
    except ImportError:  # pragma: no cover - torchao is a dependency
        return "float"
    if isinstance(w, IntxUnpackedToInt8Tensor):
        return "dyn-act" if w.activation_quantization is not None else "weight-only"
    if type(w) not in (torch.Tensor, nn.Parameter):
        return "other"
    return "float"


def _is_int8_per_row(w: torch.Tensor) -> bool:
    return w.target_dtype == torch.int8 and list(w.block_size) == [1, w.shape[1]] and bool((w.zero_point == 0).all())


# --- reversible rewrites --------------------------------------------------------------------------------


class EdgeRMSNorm(nn.Module):
    """RMSNorm with the mean over the last dim written as a linear (XNNPACK's mean needs 4-D inputs)."""

    def __init__(self, weight: torch.Tensor, eps: float, offset: float = 0.0) -> None:
        super().__init__()
        self.weight = weight
        self.eps = eps
        self.offset = offset  # Gemma: x * (1 + w); 0 adds no op to the graph
        d = weight.shape[0]
        self.register_buffer("avg", torch.full((1, d), 1.0 / d, dtype=weight.dtype), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight + self.offset if self.offset else self.weight
        return x * torch.rsqrt(F.linear(x * x, self.avg) + self.eps) * w


class DynActIntxLinear(nn.Module):
    """A trained int8-activation/intx-weight linear as ``quantized_decomposed`` ops (same integers and scales).

    XNNPACK lowers this pattern and torchao's to the same qd8 x qb4w kernel (the programs are identical);
    these ops have meta kernels, so tracing them costs a node each instead of torchao's traced Python bodies
    (lowering SmolLM2-135M int8-int4 3x faster).
    """

    def __init__(self, lin: nn.Linear) -> None:
        super().__init__()
        w = lin.weight
        self.register_buffer("qdata", w.qdata.detach().clone(), persistent=False)
        self.register_buffer("scale", w.scale.detach().float().clone(), persistent=False)
        self.register_buffer("zero", torch.zeros_like(self.scale, dtype=torch.int8), persistent=False)
        self.qmin, self.qmax = _int_range(w.target_dtype)
        self.group = int(w.block_size[1])
        self.bias = lin.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        qd = torch.ops.quantized_decomposed
        s, zp = qd.choose_qparams_per_token_asymmetric(x, torch.int8)
        xq = qd.quantize_per_token(x, s, zp, -128, 127, torch.int8)
        xdq = qd.dequantize_per_token(xq, s, zp, -128, 127, torch.int8, x.dtype)
        wdq = qd.dequantize_per_channel_group(
            self.qdata, self.scale, self.zero, self.qmin, self.qmax, torch.int8, self.group, x.dtype
        )
        return F.linear(xdq, wdq, self.bias)


class WeightOnlyIntxLinear(nn.Module):
    """A trained weight-only linear (float activations; int4/int8 symmetric weights) with its integers and fp32
    scales as ``quantized_decomposed.dequantize_per_channel`` -> ``linear``.

    - per channel (one scale per row): ``WeightOnlyLinearConfig`` delegates the pair to XNNPACK's weight-only
      fully-connected (f32-qc8w / f32-qc4w): the filter is packed as int8 (int4 as nibbles) with the row scales.
    - in groups (``int4``'s groups of 32): XNNPACK has no float x blockwise-int4 kernel (its qb4w kernels take
      int8-quantized activations, which the scheme did not train with), so the codes are stored one per int8
      as rows of ``group`` weights, one scale each, and ExecuTorch's quantized kernel ``dequantize_per_channel``
      rebuilds the fp32 weight on every call; XNNPACK multiplies it as a dynamic filter.
    The bias, if any, is a separate add on the per-channel path (XNNPACK's quantized bias wants quantized
    activations).
    """

    def __init__(self, lin: nn.Linear) -> None:
        super().__init__()
        w = lin.weight
        self.shape = tuple(w.shape)
        n, k = self.shape
        group = int(w.block_size[1])
        self.grouped = group < k
        self.qmin, self.qmax = _int_range(w.target_dtype)
        rows = n * k // group if self.grouped else n
        self.register_buffer("qdata", w.qdata.detach().reshape(rows, -1).clone(), persistent=False)
        self.register_buffer("scale", w.scale.detach().float().reshape(rows).clone(), persistent=False)
        self.register_buffer("zero", torch.zeros(rows, dtype=torch.int64), persistent=False)
        self.bias = lin.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = torch.ops.quantized_decomposed.dequantize_per_channel(
            self.qdata, self.scale, self.zero, 0, self.qmin, self.qmax, torch.int8
        )
        if self.grouped:
            return F.linear(x, w.view(self.shape), self.bias)
        y = F.linear(x, w)
        return y if self.bias is None else y + self.bias


class Int4Embedding(nn.Module):
    """A symmetric int4 group-quantized embedding (torchao's grid: codes in [-8, 7], one fp32 scale per group) as
    ExecuTorch's ``quantized_decomposed.embedding_4bit``: two codes per byte (code + 8; the even column in the high
    nibble, as ExecuTorch's LLM export packs them), the same fp32 scales, so the rows are the converted model's."""

    def __init__(self, emb: nn.Embedding) -> None:
        super().__init__()
        w = emb.weight
        codes = (w.qdata.detach().to(torch.int16) + 8).to(torch.uint8)  # [vocab, dim] in 0..15
        self.register_buffer("packed", (codes[:, 0::2] << 4) | codes[:, 1::2], persistent=False)
        self.register_buffer("scale", w.scale.detach().float().reshape(w.shape[0], -1).clone(), persistent=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.ops.quantized_decomposed.embedding_4bit.dtype(
            self.packed, self.scale, None, -8, 7, ids, dtype=torch.float32
        )


def _is_int4_group_embedding(w: torch.Tensor) -> bool:
    """Weight-only symmetric int4 in row groups of an even size: what ``embedding_4bit`` carries."""
    return (
        _weight_kind(w) == "weight-only"
        and w.target_dtype == torch.int4
        and len(w.block_size) == 2
        and w.block_size[0] == 1
        and w.block_size[1] % 2 == 0
        and w.shape[1] % w.block_size[1] == 0
        and bool((w.zero_point == 0).all())
    )


def _embedding_format(w: torch.Tensor) -> str:
    """How the program stores the embedding: ``int8`` (embedding_byte), ``int4`` (embedding_4bit) or ``float``."""
    if _weight_kind(w) == "weight-only" and _is_int8_per_row(w):
        return "int8"
    if _is_int4_group_embedding(w):
        return "int4"
    return "float"


def _quantize_embedding(model: nn.Module, fmt: str, warn: list[str]) -> None:
    """Put the embedding on ``fmt``'s grid (torchao, as convert would: ``schemes.EMBEDDING_TREATMENTS``), untying a
    head that shares its weight (the head keeps the source's values). The model is the validation reference too."""
    from torchao.quantization import quantize_

    from edgeft.qat.schemes import EMBEDDING_TREATMENTS, embedding_treatment_config

    treatment = {"int8": "int8-per-channel", "int4": "int4-per-group"}[fmt]
    emb = model.get_input_embeddings()
    head = model.get_output_embeddings()
    w = emb.weight
    dense = w.dequantize() if _weight_kind(w) != "float" else w.detach()
    if head is not None and head.weight is w:
        head.weight = nn.Parameter(dense.clone(), requires_grad=False)
        model.config.tie_word_embeddings = False
    emb.weight = nn.Parameter(dense.clone(), requires_grad=False)
    quantize_(emb, embedding_treatment_config(treatment), filter_fn=lambda m, _: isinstance(m, nn.Embedding))
    emb.weight.requires_grad_(False)
    warn.append(
        f"embedding quantized at export to {treatment} ({EMBEDDING_TREATMENTS[treatment]}); validated "
        "against the converted model with that embedding"
    )


def _is_symmetric_weight_only(w: torch.Tensor) -> bool:
    """Weight-only int4/int8, per row or in row groups, zero points 0: what ``WeightOnlyIntxLinear`` carries."""
    return (
        w.target_dtype in (torch.int4, torch.int8)
        and len(w.block_size) == 2
        and w.block_size[0] == 1
        and w.shape[1] % w.block_size[1] == 0
        and w.qdata.dtype == torch.int8
        and bool((w.zero_point == 0).all())
    )


def _int_range(dtype: torch.dtype) -> tuple[int, int]:
    bits = {torch.int4: 4, torch.int8: 8}.get(dtype) or int(str(dtype).rsplit("int", 1)[-1])
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def _is_symmetric_int4_groups(w: torch.Tensor) -> bool:
    return (
        w.target_dtype == torch.int4
        and len(w.block_size) == 2
        and w.block_size[0] == 1
        and w.shape[1] % w.block_size[1] == 0
        and bool((w.zero_point == 0).all())
    )


def _rotate_half_matrix(d: int, rot: int | None = None) -> torch.Tensor:
    """W with F.linear(x, W) == cat(-x[r/2:r], x[:r/2], 0...) (HF's rotate_half of the first ``rot`` dims, default
    all ``d``; the rest map to 0), exactly: at most one ±1 per row."""
    rot = rot or d
    w = torch.zeros(d, d)
    h = rot // 2
    idx = torch.arange(h)
    w[idx, idx + h] = -1.0
    w[idx + h, idx] = 1.0
    return w


def _et_attention_forward(
    self: nn.Module,
    hidden_states: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
    attention_mask: torch.Tensor | None = None,
    cache: Any = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Llama/Qwen2/Qwen3/Gemma3 attention on ExecuTorch's KV-cache ops (replaces the HF forward during export).

    A sliding-window layer (``et_window`` > 0) passes custom_sdpa an additive [n, cache rows] mask (ExecuTorch's
    op asserts the mask spans the whole cache) that keeps key position j for the query at position p iff
    j <= p and p - j < window, as HF's sliding mask does. With a ring (``et_ring`` rows, fewer than the
    context) position j lives in row j mod ring, written by ``update_cache_with_indices``; after this call's
    writes row i holds position ``last - (last - i) mod ring`` (last: this call's last position), negative
    for a row this context has not written yet (masked: it may hold an earlier sequence's keys).
    """
    pos = kwargs["et_start_pos"]
    b, s, _ = hidden_states.shape
    if self.et_qkv_split:  # Phi-3: one projection, q, k, v rows in that order
        q, k, v = self.qkv_proj(hidden_states).split(self.et_qkv_split, dim=-1)
    else:
        q, k, v = self.q_proj(hidden_states), self.k_proj(hidden_states), self.v_proj(hidden_states)
    q, k, v = (t.view(b, s, -1, self.head_dim) for t in (q, k, v))
    if self.et_qk_norm:
        q, k = self.q_norm(q), self.k_norm(k)
    cos, sin = position_embeddings
    if self.et_rot_embed is not None:
        # partial rotary: cos/sin cover the first rot dims; the rest pass through (cos 1, sin 0), exactly
        cos = F.linear(cos, self.et_rot_embed, self.et_cos_pass)
        sin = F.linear(sin, self.et_rot_embed)
    cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)  # [b, s, 1, d] against [b, s, heads, d]
    q = q * cos + F.linear(q, self.et_rot) * sin
    k = k * cos + F.linear(k, self.et_rot) * sin
    if self.et_ring:
        qpos = kwargs["position_ids"].reshape(-1, 1)  # [n, 1]: the query positions, pos .. pos + n - 1
        rows = (qpos % self.et_ring).reshape(1, -1)  # [1, n]: where each new key goes
        torch.ops.llama.update_cache_with_indices(k, self.et_k_cache, 0, rows)
        torch.ops.llama.update_cache_with_indices(v, self.et_v_cache, 0, rows)
        last = qpos[-1:]  # [1, 1]
        kpos = last - (last - self.et_kpos) % self.et_ring  # [1, ring]: the position each row holds
        keep = (kpos >= 0) & (kpos <= qpos) & (qpos - kpos < self.et_window)
        mask = torch.where(keep, 0.0, float("-inf"))
        # with a mask custom_sdpa attends over every row and ignores start_pos (it only bounds causal attention)
        out = torch.ops.llama.custom_sdpa(q, self.et_k_cache, self.et_v_cache, 0, mask, 0.0, False, self.scaling)
        return self.o_proj(out.reshape(b, s, -1)), None
    if self.et_kv_int8:
        return self.o_proj(_int8_kv_sdpa(self, q, k, v, pos).reshape(b, s, -1)), None
    torch.ops.llama.update_cache(k, self.et_k_cache, pos)
    torch.ops.llama.update_cache(v, self.et_v_cache, pos)
    if self.et_window:
        qpos = kwargs["position_ids"].reshape(-1, 1)  # [n, 1]: the query positions, pos .. pos + n - 1
        keep = (self.et_kpos <= qpos) & (qpos - self.et_kpos < self.et_window)
        mask = torch.where(keep, 0.0, float("-inf"))
        out = torch.ops.llama.custom_sdpa(q, self.et_k_cache, self.et_v_cache, pos, mask, 0.0, False, self.scaling)
    else:
        out = torch.ops.llama.custom_sdpa(q, self.et_k_cache, self.et_v_cache, pos, None, 0.0, True, self.scaling)
    return self.o_proj(out.reshape(b, s, -1)), None


def _quantize_per_token(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """int8 asymmetric per (token, head) over the head dim: codes, fp32 scales, int8 zero points [..., 1]."""
    qd = torch.ops.quantized_decomposed
    scale, zp = qd.choose_qparams_per_token_asymmetric.default(t, torch.int8)
    codes = qd.quantize_per_token(t, scale, zp, -128, 127, torch.int8)
    return codes, scale.to(torch.float32), zp.to(torch.int8)


def _int8_kv_sdpa(attn: nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: Any) -> torch.Tensor:
    """ExecuTorch's quantized KV cache (``QuantizedKVCache`` + ``QuantizedSDPA`` of its LLM export): keys and values
    stored int8 per (token, head) with a scale and zero point each (``llama::update_cache`` on the codes and on the
    parameters), and ``llama::custom_quantized_sdpa`` attending over the int8 cache with the query quantized the
    same way. Causal from ``pos``, GQA native, as the float path."""
    qq, qs, qz = _quantize_per_token(q)
    for t, cache, scales, zps in (
        (k, attn.et_k_cache, attn.et_k_scales, attn.et_k_zps),
        (v, attn.et_v_cache, attn.et_v_scales, attn.et_v_zps),
    ):
        codes, sc, zp = _quantize_per_token(t)
        torch.ops.llama.update_cache(codes, cache, pos)
        torch.ops.llama.update_cache(sc, scales, pos)
        torch.ops.llama.update_cache(zp, zps, pos)
    return torch.ops.llama.custom_quantized_sdpa(
        qq,
        attn.et_k_cache,
        attn.et_v_cache,
        pos,
        None,
        0.0,
        True,
        attn.scaling,
        qz,
        qs,
        attn.et_k_zps,
        attn.et_k_scales,
        attn.et_v_zps,
        attn.et_v_scales,
    )


def _layer_window(fam: Family, attn: nn.Module) -> int:
    """The sliding window one attention layer applies, as its HF forward reads it (0: none)."""
    if fam.window == "config":
        w = getattr(attn.config, "sliding_window", None)
    elif fam.window == "layer":
        w = getattr(attn, "sliding_window", None)
    else:
        w = None
    return int(w) if w else 0


def _static_rope(model: nn.Module, max_context_len: int) -> list[Any]:
    """LongRoPE (Phi-3.5/Phi-4-mini): HF picks the short or the long factors by the largest position of each call.
    A program whose context ends within the original length always has the short ones: it takes HF's table with
    them, fixed (undo functions returned). A longer context is refused: a KV-cached program would hold keys rotated
    with both sets, which no HF forward does."""
    rotary = getattr(model.model, "rotary_emb", None)
    if rotary is None or getattr(rotary, "rope_type", None) != "longrope":
        return []
    original = int(model.config.rope_parameters["original_max_position_embeddings"])
    if max_context_len > original:
        raise EdgeftError(
            f"pte export: LongRoPE with max_context_len {max_context_len} beyond the original context {original} "
            "is not supported (HF switches to the long factors per call; a KV cache would mix both)"
        )
    old_type, old_freq = rotary.rope_type, rotary.inv_freq.clone()
    rotary.rope_type = "default"  # HF's dynamic update is keyed on the type: the short table stays in place
    rotary.inv_freq.copy_(rotary.original_inv_freq)

    def restore() -> None:
        rotary.rope_type = old_type
        rotary.inv_freq.copy_(old_freq)

    return [restore]


def _kv_cache_report(model: nn.Module) -> dict[str, Any]:
    """The program's KV caches (fp32, or int8 with per-(token, head) fp32 scales and int8 zero points): rows of the
    global and sliding-window layers, total bytes, and the bytes the same program with every layer at full length
    would hold."""
    attns = [layer.self_attn for layer in model.model.layers]
    full = max(a.et_k_cache.shape[1] for a in attns)
    rings = sorted({a.et_ring for a in attns if a.et_ring})

    def per_row(a: nn.Module) -> int:  # K + V bytes of one position: codes, and an int8 cache's scales and zero points
        bufs = [a.et_k_cache] + ([a.et_k_scales, a.et_k_zps] if a.et_kv_int8 else [])
        return 2 * sum(t[:, :1].numel() * t.element_size() for t in bufs)

    nbytes = sum(per_row(a) * a.et_k_cache.shape[1] for a in attns)
    full_bytes = sum(per_row(a) * full for a in attns)
    return {
        "dtype": "int8" if attns[0].et_kv_int8 else "fp32",
        "context_rows": full,
        "ring_rows": rings[0] if rings else 0,  # 0: no ring (no sliding layers, or the window covers the context)
        "ring_layers": sum(bool(a.et_ring) for a in attns),
        "layers": len(attns),
        "bytes": nbytes,
        "full_length_bytes": full_bytes,
    }


def ring_rows(window: int, max_seq_len: int, max_context_len: int) -> int:
    """Cache rows of a sliding-window layer: ``window + max_seq_len - 1``, or the context if that is not less.

    One call writes up to ``max_seq_len`` keys before it attends, and its first query still needs the
    ``window - 1`` keys before it: all of them must sit in the ring at once. Restarting at a position P after
    writing up to L stays exact while L - P + 1 <= ``max_seq_len`` (``REWIND_METHOD``): the writes at P..L
    have then overwritten no key (positions >= P - window + 1) that a query at P or after needs.
    """
    return min(max_context_len, window + max_seq_len - 1)


def _no_mask(*args: Any, **kwargs: Any) -> None:
    return None


class _Program(nn.Module):
    """What the .pte runs: (tokens [1, n], input_pos [n]) -> logits [1, n, vocab] (``last_only``: [1, 1, vocab])."""

    def __init__(self, model: nn.Module, max_context_len: int, last_only: bool = False) -> None:
        super().__init__()
        self.model = model
        self.max_context_len = max_context_len
        # HF's logits_to_keep slices the hidden states before lm_head: the head runs on one position only
        self.logits_to_keep = 1 if last_only else 0

    def forward(self, tokens: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        pos = input_pos[0].item()
        torch._check(pos >= 0)
        torch._check(pos < self.max_context_len)
        out = self.model(
            input_ids=tokens,
            position_ids=input_pos.unsqueeze(0),
            use_cache=False,
            et_start_pos=pos,
            logits_to_keep=self.logits_to_keep,
        )
        return out.logits.float()


@contextlib.contextmanager
def _edge_rewrites(
    model: nn.Module,
    arch: Family,
    max_context_len: int,
    warn: list[str],
    last_only: bool = False,
    max_seq_len: int | None = None,
    kv_cache: str = "fp32",
) -> Iterator[_Program]:
    """Apply the export rewrites (module docstring) to ``model`` and undo every one of them on exit.

    ``max_seq_len`` (default ``max_context_len``): the longest chunk one call takes, which sizes the
    sliding-window layers' rings (``ring_rows``). ``kv_cache``: ``"fp32"`` or ``"int8"`` (``_int8_kv_sdpa``).
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    from edgeft.devices.executorch_runtime import load_executorch_ops

    load_executorch_ops()  # registers llama::update_cache / custom_sdpa for tracing
    undo: list[Any] = []
    cfg = model.config
    try:
        # weight-only linears: the same integers and scales as XNNPACK weight-only linears (WeightOnlyIntxLinear);
        # a grid it cannot carry (asymmetric) goes as float32 with the same values
        n_float = n_grouped = 0
        for parent in list(model.modules()):
            for name, child in list(parent.named_children()):
                if not (isinstance(child, nn.Linear) and _weight_kind(child.weight) == "weight-only"):
                    continue
                if _is_symmetric_weight_only(child.weight):
                    wo = WeightOnlyIntxLinear(child)
                    setattr(parent, name, wo)
                    undo.append(lambda p=parent, n=name, c=child: setattr(p, n, c))
                    n_grouped += wo.grouped
                else:
                    old = child.weight
                    child.weight = nn.Parameter(old.dequantize(), requires_grad=False)
                    undo.append(lambda m=child, w=old: setattr(m, "weight", w))
                    n_float += 1
        if n_float:
            warn.append(
                f"{n_float} weight-only quantized linears with zero points exported as float32 (same values; "
                "XNNPACK's weight-only kernels are symmetric)"
            )
        if n_grouped:  # measured on SmolLM2-135M: 272 vs 652 MB, decode 4.8 vs 20.8 tokens/s (module docstring)
            warn.append(
                f"{n_grouped} weight-only linears in int4 groups are stored as int8 codes and dequantized on every "
                "call (executorch 1.5.1's XNNPACK has no float x grouped-int4 kernel): smaller than float, but "
                "slower to decode; int8-int4 / phone-deployment is the fast 4-bit scheme for a .pte"
            )
        # int8-activation / int4-weight linears: the same integers as quantized_decomposed ops (fast to lower)
        for parent in list(model.modules()):
            for name, child in list(parent.named_children()):
                if (
                    isinstance(child, nn.Linear)
                    and _weight_kind(child.weight) == "dyn-act"
                    and _is_symmetric_int4_groups(child.weight)
                ):
                    setattr(parent, name, DynActIntxLinear(child))
                    undo.append(lambda p=parent, n=name, c=child: setattr(p, n, c))
        # embeddings: drop padding_idx (gradient-only) so quant fusion matches; non-int8 grids -> float
        for mod in model.modules():
            if isinstance(mod, nn.Embedding):
                if mod.padding_idx is not None:
                    undo.append(lambda m=mod, p=mod.padding_idx: setattr(m, "padding_idx", p))
                    mod.padding_idx = None
                kind = _weight_kind(mod.weight)
                if _is_int4_group_embedding(mod.weight):
                    for parent in list(model.modules()):
                        for name, child in list(parent.named_children()):
                            if child is mod:
                                setattr(parent, name, Int4Embedding(mod))
                                undo.append(lambda p=parent, n=name, c=mod: setattr(p, n, c))
                    continue
                if kind != "float" and not (kind == "weight-only" and _is_int8_per_row(mod.weight)):
                    old = mod.weight
                    mod.weight = nn.Parameter(old.dequantize(), requires_grad=False)
                    undo.append(lambda m=mod, w=old: setattr(m, "weight", w))
                    warn.append("embedding quantization other than int8 per row or int4 in groups exported as float32")
        # RMSNorm -> EdgeRMSNorm (same weight tensor)
        for parent in list(model.modules()):
            for name, child in list(parent.named_children()):
                if type(child).__name__ == arch.norm_class:
                    eps = getattr(child, arch.norm_eps_attr)
                    setattr(parent, name, EdgeRMSNorm(child.weight, eps, arch.norm_offset))
                    undo.append(lambda p=parent, n=name, c=child: setattr(p, n, c))
        undo.extend(_static_rope(model, max_context_len))
        # attention -> ExecuTorch KV-cache ops
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        rot_dims = rotary_dims(model)
        rot = _rotate_half_matrix(head_dim, rot_dims)
        n_q, n_kv = cfg.num_attention_heads * head_dim, cfg.num_key_value_heads * head_dim
        for i, layer in enumerate(model.model.layers):
            attn = layer.self_attn
            window = _layer_window(arch, attn)
            attn.et_window = window if window and window < max_context_len else 0  # a wider window never binds
            rows = max_context_len
            if attn.et_window:
                rows = ring_rows(attn.et_window, max_seq_len or max_context_len, max_context_len)
            attn.et_ring = rows if rows < max_context_len else 0  # 0: position j in row j, as global layers
            shape = (1, rows, cfg.num_key_value_heads, head_dim)
            attn.et_kv_int8 = kv_cache == "int8"
            if attn.et_kv_int8 and (attn.et_window or attn.et_ring):
                raise EdgeftError("pte export: an int8 KV cache with sliding-window layers is not supported")
            dtype = torch.int8 if attn.et_kv_int8 else torch.float32
            attn.register_buffer("et_k_cache", torch.zeros(shape, dtype=dtype), persistent=False)
            attn.register_buffer("et_v_cache", torch.zeros(shape, dtype=dtype), persistent=False)
            if attn.et_kv_int8:
                for kv in "kv":
                    attn.register_buffer(f"et_{kv}_scales", torch.ones(*shape[:3], 1), persistent=False)
                    attn.register_buffer(f"et_{kv}_zps", torch.zeros(*shape[:3], 1, dtype=torch.int8), persistent=False)
            attn.register_buffer("et_rot", rot, persistent=False)
            attn.register_buffer("et_kpos", torch.arange(rows).unsqueeze(0), persistent=False)
            if rot_dims < head_dim:
                attn.register_buffer("et_rot_embed", torch.eye(head_dim, rot_dims), persistent=False)
                attn.register_buffer("et_cos_pass", (torch.arange(head_dim) >= rot_dims).float(), persistent=False)
            else:
                attn.et_rot_embed = attn.et_cos_pass = None
            attn.et_qk_norm = arch.qk_norm
            attn.et_qkv_split = [n_q, n_kv, n_kv] if arch.fused_qkv else None
            attn.forward = types.MethodType(_et_attention_forward, attn)

            def _restore(a: nn.Module = attn) -> None:
                for n in ("et_k_cache", "et_v_cache", "et_rot", "et_kpos", "et_rot_embed", "et_cos_pass"):
                    delattr(a, n)
                if a.et_kv_int8:
                    for n in ("et_k_scales", "et_k_zps", "et_v_scales", "et_v_zps"):
                        delattr(a, n)
                del a.et_qk_norm, a.et_window, a.et_ring, a.et_qkv_split, a.et_kv_int8
                del a.forward

            undo.append(_restore)
        AttentionInterface.register(MASK_NAME, AttentionInterface._global_mapping["sdpa"])
        AttentionMaskInterface.register(MASK_NAME, _no_mask)
        old_impl = cfg._attn_implementation
        model.set_attn_implementation(MASK_NAME)
        undo.append(lambda: model.set_attn_implementation(old_impl))
        yield _Program(model, max_context_len, last_only).eval()
    finally:
        for fn in reversed(undo):
            fn()


# --- lowering -------------------------------------------------------------------------------------------


def _metadata(
    model: nn.Module, tokenizer: Any, max_seq_len: int, max_context_len: int, dynamic: bool, full_logits: bool = True
) -> dict[str, Any]:
    eos: list[int] = []
    for src in (getattr(model, "generation_config", None), model.config, tokenizer):
        e = getattr(src, "eos_token_id", None) if src is not tokenizer else tokenizer.eos_token_id
        for t in e if isinstance(e, (list, tuple)) else [e]:
            if t is not None and int(t) not in eos:
                eos.append(int(t))
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else model.config.bos_token_id
    return {
        "get_max_seq_len": max_seq_len,
        "get_max_context_len": max_context_len,
        "get_vocab_size": int(model.config.vocab_size),
        "get_bos_id": int(bos) if bos is not None else -1,
        "get_eos_ids": eos,
        "use_kv_cache": True,
        "use_sdpa_with_kv_cache": True,
        "enable_dynamic_shape": dynamic,
        FULL_LOGITS_METHOD: full_logits,
    }


def _xnnpack_configs() -> list[Any]:
    """XNNPACK's partitioner configs with ``LinearConfig`` replaced by one that also takes weight-only linears.

    ExecuTorch 1.5.1's ``LinearConfig`` classifies a linear whose weight comes from a dequantize node as
    statically quantized and then requires a dequantized activation and a quantize node on the output, so a
    float-activation linear over a dequantized weight is never delegated as such: XNNPACK's own weight-only
    kernels (f32-qc8w, f32-qc4w) are unreachable. (What happens instead depends on the pattern: torchao's
    ``dequantize_affine`` -> ``linear`` is decomposed to ``mm`` and the whole chain is delegated with the
    dequantize dropped, i.e. the raw integers as weights: logits off by 1/scale, the "100x" seen before;
    ``quantized_decomposed`` dequantize ops stay outside XNNPACK in ExecuTorch's portable kernels.) This config
    accepts exactly that pattern (weight from a dequantize node, activation not), with no activation or output
    dependencies; ``LinearVisitor`` then serializes a float input and a per-channel quantized filter, which
    XNNPACK runs as its weight-only fully-connected. Everything else goes to ``LinearConfig`` unchanged.
    """
    from executorch.backends.xnnpack.partition.config import ALL_PARTITIONER_CONFIGS
    from executorch.backends.xnnpack.partition.config.gemm_configs import LinearConfig
    from executorch.backends.xnnpack.partition.config.xnnpack_config import ConfigPrecisionType
    from executorch.backends.xnnpack.utils.quant_utils import is_dequant
    from executorch.backends.xnnpack.utils.utils import get_input_node, is_param_node

    class WeightOnlyLinearConfig(LinearConfig):
        def _weight_only(self, node: Any, precision: Any) -> bool:
            return (
                precision == ConfigPrecisionType.STATIC_QUANT
                and is_dequant(get_input_node(node, self.weight_idx))
                and not is_dequant(get_input_node(node, self.act_idx))
                and not (len(node.args) > 2 and node.args[2] is not None)  # the bias would need input qparams
            )

        def _get_weight_deps(self, node: Any, ep: Any, precision: Any) -> tuple[bool, list[Any]]:
            if precision == ConfigPrecisionType.FP32 and not is_param_node(ep, get_input_node(node, self.weight_idx)):
                return True, []  # a weight computed in the program: XNNPACK takes it as a dynamic filter
            return super()._get_weight_deps(node, ep, precision)

        def _get_act_deps(self, node: Any, ep: Any, precision: Any) -> tuple[bool, list[Any]]:
            if self._weight_only(node, precision):
                return True, []
            return super()._get_act_deps(node, ep, precision)

        def _get_output_deps(self, node: Any, ep: Any, precision: Any) -> tuple[bool, list[Any]]:
            if self._weight_only(node, precision):
                return True, []
            return super()._get_output_deps(node, ep, precision)

    return [WeightOnlyLinearConfig if c is LinearConfig else c for c in ALL_PARTITIONER_CONFIGS]


def _partitioner(lean: bool) -> Any:
    """XNNPACK's partitioner, or (``lean``) the same partitioner with two shortcuts for decoder graphs.

    - ``XnnpackBackend.preprocess`` runs only ConvertToLinearPass on partitions carrying the
      ``dqlinear_partitioner`` compile spec. The 16 passes this skips rewrite convolutions, batch norms,
      pooling, upsampling, SDPA patterns and static-quant padding, none of which these programs contain.
    - ``ops_to_not_decompose`` returns no per-node check, so ``to_edge_transform_and_lower`` keeps every op
      XNNPACK can take (linear, ...) whole in one decomposition instead of ExecuTorch's two-retrace
      EDGE_DO_NOT_DECOMP route.

    Together they cut lowering time by 60% (SmolLM2-135M int8-int4: 250 s -> 97 s of CPU) and the programs
    are the same (same size, bit-identical logits on the tiny models and SmolLM2-135M). Validation checks
    the result anyway, and a lean lowering that fails is retried without the shortcuts.
    """
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.backends.xnnpack.xnnpack_preprocess import XnnpackBackend
    from executorch.exir.backend.compile_spec_schema import CompileSpec
    from executorch.exir.backend.partitioner import DelegationSpec

    configs = _xnnpack_configs()
    if not lean:
        return XnnpackPartitioner(configs=configs)

    class LeanXnnpackPartitioner(XnnpackPartitioner):
        def ops_to_not_decompose(self, ep: Any) -> tuple[list[Any], None]:
            ops, _ = super().ops_to_not_decompose(ep)
            return ops, None

    part = LeanXnnpackPartitioner(configs=configs)
    part.delegation_spec = DelegationSpec(XnnpackBackend.__name__, [CompileSpec("dqlinear_partitioner", b"")])
    return part


def _lower(program: nn.Module, max_seq_len: int, metadata: dict[str, Any], dynamic: bool, warn: list[str]) -> bytes:
    """torch.export -> edge -> XNNPACK -> ExecuTorch program bytes."""
    try:
        return _lower_once(program, max_seq_len, metadata, dynamic, lean=True)
    except Exception as e:  # noqa: BLE001 - any failure of the lean route: take ExecuTorch's full route
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        warn.append(f"lean XNNPACK lowering failed ({first[:200]}); lowered with ExecuTorch's full pass list")
    try:
        return _lower_once(program, max_seq_len, metadata, dynamic, lean=False)
    except Exception as e:  # noqa: BLE001
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise EdgeftError(f"pte export: ExecuTorch could not lower the model: {first}") from None


def _lower_once(program: nn.Module, max_seq_len: int, metadata: dict[str, Any], dynamic: bool, lean: bool) -> bytes:
    from executorch.exir import EdgeCompileConfig, ExecutorchBackendConfig, to_edge_transform_and_lower
    from executorch.exir.passes import MemoryPlanningPass
    from executorch.exir.passes.sym_shape_eval_pass import ConstraintBasedSymShapeEvalPass

    n = min(8, max_seq_len) if dynamic else 1
    example = (torch.zeros(1, n, dtype=torch.long), torch.arange(n, dtype=torch.long))
    seq = torch.export.Dim("seq_len", min=1, max=max_seq_len)
    shapes = ({1: seq}, {0: seq}) if dynamic else None
    with torch.no_grad():
        # non-strict: 6x faster than dynamo here, and correct once no parameter requires grad
        ep = torch.export.export(program, example, dynamic_shapes=shapes, strict=False)
    edge = to_edge_transform_and_lower(
        ep,
        partitioner=[_partitioner(lean)],
        compile_config=EdgeCompileConfig(_check_ir_validity=False, _skip_dim_order=True),
        constant_methods=metadata,
    )
    et = edge.to_executorch(
        ExecutorchBackendConfig(
            extract_delegate_segments=True,
            do_quant_fusion_and_const_prop=True,  # torchao int8 embedding -> embedding_byte
            memory_planning_pass=MemoryPlanningPass(alloc_graph_input=False),
            sym_shape_eval_pass=ConstraintBasedSymShapeEvalPass(),
        )
    )
    return et.buffer


def _expected_bytes(model: nn.Module) -> int:
    """Weight bytes the program should hold: int4 as nibbles with bf16 group scales (XNNPACK's qb4w), the
    int8 embedding as bytes with fp32 row scales, the int4 one as nibbles with fp32 group scales, everything
    else fp32 (a tied float head is stored twice:
    once for the embedding kernel, once packed by XNNPACK). Off by < 2% on every model measured."""
    total = 0
    for mod in model.modules():
        for name, p in mod.named_parameters(recurse=False):
            kind = _weight_kind(p)
            if kind == "dyn-act":
                bits = 4 if p.target_dtype == torch.int4 else 8
                total += p.numel() * bits // 8 + p.scale.numel() * 2
            elif kind == "weight-only" and isinstance(mod, nn.Embedding) and _is_int8_per_row(p):
                total += p.numel() + p.scale.numel() * 4
            elif isinstance(mod, nn.Embedding) and _is_int4_group_embedding(p):
                total += p.numel() // 2 + p.scale.numel() * 4  # embedding_4bit: two codes a byte, fp32 group scales
            elif kind == "weight-only" and isinstance(mod, nn.Linear) and _is_symmetric_weight_only(p):
                # per channel: XNNPACK packs int4 as nibbles; in groups: one int8 per code; fp32 scales
                bits = 4 if p.target_dtype == torch.int4 and p.block_size[1] == p.shape[1] else 8
                total += p.numel() * bits // 8 + p.scale.numel() * 4
            else:
                total += p.numel() * 4
    return total


def _structure(
    buf: bytes,
    embedding: str,
    grouped_weight_only: bool = False,
    ring: bool = False,
    full: bool = True,
    kv_int8: bool = False,
) -> dict[str, Any]:
    """Check the serialized program itself: KV-cache ops (``full``: some layer keeps a full-length cache, ``ring``:
    some layer a ring; ``kv_int8``: the quantized sdpa), XNNPACK delegates, the embedding's kernel (``embedding``:
    ``int8``, ``int4`` or ``float``), no stray quantized ops (but ``dequantize_per_channel``, required, where
    grouped weight-only linears rebuild their weights, and the per-token quantize ops of an int8 cache)."""
    from executorch.exir._serialize._program import deserialize_pte_binary

    try:
        prog = deserialize_pte_binary(buf)
        prog = getattr(prog, "program", prog)
        plan = next(p for p in prog.execution_plan if p.name == "forward")
    except Exception as e:  # noqa: BLE001 - not a program at all
        raise EdgeftError(f"pte export: the written program cannot be read back ({type(e).__name__})") from None
    ops = {o.name for o in plan.operators}
    delegates = [d.id for d in plan.delegates]
    missing = {"llama::custom_quantized_sdpa" if kv_int8 else "llama::custom_sdpa"} - ops
    if full:  # layers whose cache holds the whole context
        missing |= {"llama::update_cache"} - ops
    if ring:  # sliding-window layers' ring caches
        missing |= {"llama::update_cache_with_indices"} - ops
    if missing or "XnnpackBackend" not in delegates:
        raise EdgeftError(f"pte export: program lacks {', '.join(sorted(missing)) or 'XNNPACK delegates'}")
    dq = "quantized_decomposed::dequantize_per_channel"
    if grouped_weight_only and dq not in ops:
        raise EdgeftError("pte export: grouped weight-only linears without dequantize_per_channel (no integers)")
    allowed = {dq} if grouped_weight_only else set()
    if kv_int8:  # the int8 cache: keys, values and queries quantized per token by ExecuTorch's quantized kernels
        allowed |= {
            "quantized_decomposed::choose_qparams_per_token_asymmetric",
            "quantized_decomposed::quantize_per_token",
        }
    leftover = sorted(o for o in ops if (o.startswith("torchao") or "dequantize" in o) and o not in allowed)
    if leftover:
        raise EdgeftError(f"pte export: quantized ops left outside XNNPACK: {', '.join(leftover)}")
    kernels = {"int8": "embedding_byte", "int4": "embedding_4bit"}
    have = [f for f, k in kernels.items() if f"quantized_decomposed::{k}" in ops]
    if embedding in kernels and embedding not in have:
        raise EdgeftError(
            f"pte export: the {embedding} embedding was not lowered to ExecuTorch's {kernels[embedding]} kernel"
        )
    return {
        "xnnpack_partitions": len(delegates),
        "embedding": f"{have[0]} ({kernels[have[0]]})" if have else "float32",
    }


def _check_size(n_bytes: int, expected: int) -> None:
    """A program holding float where the scheme has int4 (or the reverse) is 2-8x off."""
    if abs(n_bytes - expected) > 0.05 * expected + 2**20:
        raise EdgeftError(
            f"pte export: program is {n_bytes / 2**20:.1f} MiB, the scheme's weights need {expected / 2**20:.1f} MiB"
        )


# --- validation -----------------------------------------------------------------------------------------


def _validation_sequences(tokenizer: Any, max_seq_len: int) -> list[list[int]]:
    ids = _heldout_ids(tokenizer)
    seqs, start = [], 0
    for n in VALIDATION_SEQ_LENS:
        n = min(n, max_seq_len)
        chunk = ids[start : start + n]
        if tokenizer.bos_token_id is not None and ids and ids[0] == tokenizer.bos_token_id and start > 0:
            chunk = [ids[0]] + chunk[: n - 1]  # every sequence starts like a prompt does
        seqs.append(chunk)
        start += n
    return seqs


def _heldout_ids(tokenizer: Any) -> list[int]:
    from importlib import resources

    text = resources.files("edgeft").joinpath("assets/heldout.txt").read_text(encoding="utf-8")
    body = " ".join(ln for ln in text.splitlines() if ln and not ln.startswith("#"))
    return tokenizer(body[:20000]).input_ids


def _rel(got: torch.Tensor, ref: torch.Tensor) -> float:
    return float((got - ref).norm() / ref.norm().clamp_min(1e-12))


@torch.no_grad()
def _eager_logits(model: nn.Module, ids: list[int]) -> torch.Tensor:
    return model(input_ids=torch.tensor([ids])).logits[0].float()


@contextlib.contextmanager
def _int8_qkv(model: nn.Module) -> Iterator[None]:
    """Eager with every attention's q, k and v projections put through int8 per-(token, head) asymmetric fake
    quantization: the rounding an int8 KV cache (and its quantized query) applies, though before RoPE where the
    program applies it after (a rotation: the same size of error, not the same numbers)."""
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads

    def fq(_m: nn.Module, _i: Any, out: torch.Tensor) -> torch.Tensor:
        t = out.reshape(*out.shape[:-1], -1, head_dim)
        codes, scale, zp = _quantize_per_token(t)
        deq = torch.ops.quantized_decomposed.dequantize_per_token(
            codes, scale, zp.to(torch.int64), -128, 127, torch.int8, t.dtype
        )
        return deq.reshape(out.shape)

    hooks = [
        getattr(layer.self_attn, n).register_forward_hook(fq)
        for layer in model.model.layers
        for n in ("q_proj", "k_proj", "v_proj", "qkv_proj")
        if hasattr(layer.self_attn, n)
    ]
    try:
        yield
    finally:
        for h in hooks:
            h.remove()


@torch.no_grad()
def _noise(
    model: nn.Module, seqs: list[list[int]], refs: list[torch.Tensor], kv_int8: bool = False
) -> tuple[float, float]:
    """How far eager moves under perturbations the program legitimately has: another float summation order
    (eager vs sdpa attention), XNNPACK's bf16 group scales, and (``kv_int8``) the int8 cache's rounding of q, k
    and v (``_int8_qkv``). Returns (max rel_err, pooled top-1)."""
    alts: list[list[torch.Tensor]] = []
    if kv_int8:
        with _int8_qkv(model):
            alts.append([_eager_logits(model, s) for s in seqs])
    impl = model.config._attn_implementation
    model.set_attn_implementation("eager" if impl != "eager" else "sdpa")
    try:
        alts.append([_eager_logits(model, s) for s in seqs])
    finally:
        model.set_attn_implementation(impl)
    scales = [
        m.weight.scale
        for m in model.modules()
        if isinstance(m, nn.Linear) and _weight_kind(m.weight) == "dyn-act" and _is_symmetric_int4_groups(m.weight)
    ]
    if scales:
        saved = [t.clone() for t in scales]
        try:
            for t in scales:
                t.copy_(t.to(torch.bfloat16).to(t.dtype))
            alts.append([_eager_logits(model, s) for s in seqs])
        finally:
            for t, v in zip(scales, saved):
                t.copy_(v)
    rel = max(_rel(a, r) for alt in alts for a, r in zip(alt, refs))
    agree = min(
        sum(float((a.argmax(-1) == r.argmax(-1)).sum()) for a, r in zip(alt, refs)) / sum(len(s) for s in seqs)
        for alt in alts
    )
    return rel, agree


def _clamp(x: float, lo: float, hi: float) -> float:
    return max(lo, min(hi, x))


def _tolerances(quant_activations: bool, noise_rel: float) -> dict[str, float]:
    """rel: max logits rel_err; gap: max eager logit gap (in row std) of the program's argmax; top1: floor."""
    if not quant_activations:
        return {"rel": FLOAT_REL, "gap": 10 * FLOAT_REL, "top1": 0.99}
    return {"rel": _clamp(8 * noise_rel, 0.03, 0.5), "gap": _clamp(20 * noise_rel, 0.05, 2.0), "top1": 0.3}


def _gaps(got: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Per position: how far (in units of eager's logit std) eager's choice is above the program's choice."""
    pick = got.argmax(-1, keepdim=True)
    return (ref.max(-1).values - ref.gather(-1, pick)[:, 0]) / ref.std(-1).clamp_min(1e-12)


@contextlib.contextmanager
def _quiet_fds() -> Iterator[None]:
    """Silence ExecuTorch's runner, which prints tokens and stats from C++ to stdout/stderr."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in (*saved, devnull):
            os.close(fd)


def _runner_check(
    pte: Path, tok_dir: Path, tokenizer: Any, rt: Any, prompt: str, stop: set[int], warn: list[str]
) -> dict[str, Any]:
    """TextLLMRunner's greedy pieces must equal the program's greedy tokens decoded by the same tokenizer."""
    from executorch.extension.llm.runner import GenerationConfig, TextLLMRunner
    from pytorch_tokenizers import CppHFTokenizer

    add_bos = adds_bos(tokenizer)
    cpp = CppHFTokenizer()
    cpp.load(str(tok_dir / "tokenizer.json"))
    tok_path = tok_dir / "tokenizer.json"
    if add_bos and cpp.bos_tok() != tokenizer.bos_token_id:
        # from tokenizer.json alone ExecuTorch guesses BOS by name; tokenizer_config.json names it
        warn.append(
            f"ExecuTorch's tokenizer guesses BOS {cpp.bos_tok()} from tokenizer.json alone (HF: "
            f"{tokenizer.bos_token_id}): give the runner the directory, which has tokenizer_config.json"
        )
        cpp = CppHFTokenizer()
        cpp.load(str(tok_dir))
        tok_path = tok_dir
    ids = list(cpp.encode(prompt, 1 if add_bos else 0, 0))
    hf_ids = tokenizer(prompt).input_ids
    if ids != hf_ids:
        warn.append("ExecuTorch's tokenizer encodes the validation prompt differently from the HF tokenizer")
    # the runner needs prompt + new tokens <= context (and stops there by itself)
    budget = min(GREEDY_TOKENS, rt.max_context_len - len(ids))
    expected = rt.generate(ids, budget, stop) if budget > 0 else []
    # the runner hands pieces to Python as str: stop before a token that is not valid UTF-8 on its own
    pieces_exp: list[str] = []
    for t in expected:
        try:
            pieces_exp.append(cpp.decode(t))  # the binding is decode(token, skip_special_tokens=False)
        except UnicodeDecodeError:
            break
    n = len(pieces_exp)
    if n == 0:
        warn.append("TextLLMRunner check skipped: no room to generate in the context, or a non-UTF-8 first token")
        return {"runner_tokens": 0, "runner_match": False, "num_bos": int(add_bos)}
    got: list[str] = []
    runner = TextLLMRunner(str(pte), str(tok_path))
    cfg = GenerationConfig(echo=False, max_new_tokens=n, temperature=0.0, num_bos=int(add_bos), num_eos=0)
    try:
        with _quiet_fds():
            runner.generate(prompt, cfg, token_callback=got.append)
    except (RuntimeError, UnicodeDecodeError) as e:
        raise EdgeftError(f"pte validation: ExecuTorch's TextLLMRunner failed: {e}") from None
    got = got[:n]
    if got != pieces_exp:
        k = next((i for i, (a, b) in enumerate(zip(got, pieces_exp)) if a != b), min(len(got), n))
        raise EdgeftError(
            f"pte validation: ExecuTorch's TextLLMRunner diverges from the program's greedy tokens at step {k} "
            f"({got[k : k + 1]!r} vs {pieces_exp[k : k + 1]!r})"
        )
    return {"runner_tokens": n, "runner_match": True, "num_bos": int(add_bos)}


def _validate(
    pte: Path,
    tok_dir: Path,
    model: nn.Module,
    tokenizer: Any,
    quant_activations: bool,
    max_seq_len: int,
    warn: list[str],
    full_logits: bool = True,
    ring_rows: int = 0,
    kv_int8: bool = False,
) -> dict[str, Any]:
    from edgeft.devices.executorch_runtime import PteRuntime

    seqs = _validation_sequences(tokenizer, max_seq_len)
    refs = [_eager_logits(model, s) for s in seqs]
    wrap: list[int] = []
    if ring_rows:
        # the sliding-window layers' rings wrap: one sequence a chunk past the ring, fed in max_seq_len chunks
        # (by the runtime) so that a chunk crosses the wrap; compared like the others, not in the noise estimate
        wrap = _heldout_ids(tokenizer)[: ring_rows + max_seq_len]
    noise_rel, noise_top1 = _noise(model, seqs, refs, kv_int8)
    tol = _tolerances(quant_activations or kv_int8, noise_rel)
    rt = PteRuntime(pte)
    try:
        if rt.full_logits != full_logits:
            raise EdgeftError(
                f"pte validation: the program's {FULL_LOGITS_METHOD} is {rt.full_logits}, "
                f"export asked for {full_logits}"
            )
        # (program, eager) logits pairs; a last-token program gives each prompt's last row only
        pairs: list[tuple[torch.Tensor, torch.Tensor]] = []
        for s, ref in zip(seqs, refs):
            got = rt.logits(s) if full_logits else rt.next_logits(s)[None]
            want = ref if full_logits else ref[-1:]
            if got.shape != want.shape:
                raise EdgeftError(f"pte validation: logits shape {tuple(got.shape)}, eager {tuple(want.shape)}")
            pairs.append((got, want))
        if wrap:
            ref = _eager_logits(model, wrap)
            pairs.append((rt.logits(wrap), ref) if full_logits else (rt.next_logits(wrap)[None], ref[-1:]))
        # through the KV cache: a short prefill, then one token at a time (a static program only does that);
        # on a last-token program these one-token steps give every position after the prefill
        s = seqs[0]
        k = min(INCREMENTAL_PREFILL, len(s) - 1)
        if rt.dynamic:
            steps = [rt._step(s[:k], 0)] + [rt._step([t], k + i) for i, t in enumerate(s[k:])]
            pairs.append((torch.cat(steps, 0), refs[0] if full_logits else refs[0][k - 1 :]))
        rels, top1s, gaps = [], [], []
        for got, ref in pairs:
            rels.append(_rel(got, ref))
            top1s.append(float((got.argmax(-1) == ref.argmax(-1)).sum()))
            gaps.append(float(_gaps(got, ref).max()))
        n_pos = sum(len(g) for g, _ in pairs)
        rel, top1, gap = max(rels), sum(top1s) / n_pos, max(gaps)
        report: dict[str, Any] = {
            "rel_err": round(rel, 6),
            "top1": round(top1, 4),
            "max_gap": round(gap, 4),
            "noise_rel_err": round(noise_rel, 6),
            "noise_top1": round(noise_top1, 4),
            "tolerance": {k: round(v, 6) for k, v in tol.items()},
        }
        if rel > tol["rel"] or top1 < tol["top1"] or gap > tol["gap"]:
            raise EdgeftError(
                f"pte validation failed against the eager model: logits rel_err {rel:.4g} (max {tol['rel']:.3g}), "
                f"top-1 agreement {top1:.3f} (min {tol['top1']:.2f}), argmax gap {gap:.3g} std (max {tol['gap']:.3g})"
            )
        # greedy generation, teacher-forced through eager
        stop = set(rt.eos_ids)
        prompt_ids = seqs[1][: max(1, rt.max_context_len // 2)]  # leave room to generate in small contexts
        gen = rt.generate(prompt_ids, min(GREEDY_TOKENS, rt.max_context_len - len(prompt_ids)), stop)
        if gen:
            full = _eager_logits(model, prompt_ids + gen)[len(prompt_ids) - 1 : -1]
            onehot = torch.full_like(full, -1.0).scatter_(-1, torch.tensor(gen)[:, None], 1.0)
            g = _gaps(onehot, full)
            report.update(
                greedy_tokens=len(gen),
                greedy_agreement=round(float((g == 0).float().mean()), 4),
                greedy_max_gap=round(float(g.max()), 4),
            )
            if float(g.max()) > tol["gap"]:
                raise EdgeftError(
                    f"pte validation failed: greedy token {int(g.argmax())} is not eager's choice (logit gap "
                    f"{float(g.max()):.3g} std, max {tol['gap']:.3g})"
                )
        prompt = tokenizer.decode(prompt_ids, skip_special_tokens=True)
        report.update(_runner_check(pte, tok_dir, tokenizer, rt, prompt, stop, warn))
    finally:
        rt.close()
    return report


# --- public API -----------------------------------------------------------------------------------------


def export(
    src: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    max_seq_len: int = 512,
    max_context_len: int | None = None,
    dynamic_shape: bool = True,
    logits: str = "all",
    embedding: str | None = None,
    kv_cache: str = "fp32",
) -> dict[str, Any]:
    """Export ``src`` (HF directory or converted directory) to ``out_dir/model.pte`` + tokenizer, validated.

    ``max_seq_len``: the longest prompt chunk one call takes; ``max_context_len`` (default ``max_seq_len``):
    the KV cache length. ``dynamic_shape=False`` exports a one-token program (prompts are fed token by
    token, by the runner too): a third less export time, 4-5x slower prefill. ``logits``: ``"all"`` (logits
    for every position, what ``edgeft eval`` needs; ``model.pte``) or ``"last"`` (the last position only, for
    deployment: the head runs on one position; written as ``model-last.pte``, see the module docstring).
    ``embedding``: None (as the source has it: an int8-per-row grid -> ``embedding_byte``, int4 groups ->
    ``embedding_4bit``), or ``"int8"``/``"int4"`` to put the embedding on that grid here (torchao, as convert
    does; the validation reference is the source with that embedding). ``kv_cache``: ``"fp32"`` or ``"int8"``
    (ExecuTorch's quantized KV cache and quantized sdpa; validated within eager's own int8-rounding noise).
    Returns a report (path, bytes, scheme, logits mode, validation numbers, seconds, warnings).
    """
    t0 = time.perf_counter()
    src, out_dir = Path(src), Path(out_dir)
    if logits not in PTE_FILES:
        raise EdgeftError(f"pte export: logits must be one of {', '.join(PTE_FILES)}, not {logits!r}")
    if logits == "last" and not dynamic_shape:
        raise EdgeftError(
            "pte export: logits='last' needs a dynamic-shape program (a one-token program has one position)"
        )
    full_logits = logits == "all"
    if embedding not in (None, *EMBEDDING_FORMATS):
        raise EdgeftError(f"pte export: embedding must be one of {', '.join(EMBEDDING_FORMATS)}, not {embedding!r}")
    if kv_cache not in KV_CACHE_FORMATS:
        raise EdgeftError(f"pte export: kv_cache must be one of {', '.join(KV_CACHE_FORMATS)}, not {kv_cache!r}")
    max_context_len = max_context_len or max_seq_len
    if not 2 <= max_seq_len <= max_context_len:
        raise EdgeftError(f"pte export: need 2 <= max_seq_len ({max_seq_len}) <= max_context_len ({max_context_len})")
    arch, cfg = _arch(src)
    if max_context_len > int(cfg.get("max_position_embeddings") or max_context_len):
        raise EdgeftError(
            f"pte export: max_context_len {max_context_len} exceeds the model's "
            f"{cfg['max_position_embeddings']} positions"
        )
    if not (src / "tokenizer.json").exists():
        raise EdgeftError(f"pte export: {src} has no tokenizer.json (ExecuTorch's runner needs it)")
    model, tokenizer, record = _load_source(src)
    warn: list[str] = []
    kinds = {n: _weight_kind(m.weight) for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    other = sorted(n for n, k in kinds.items() if k == "other")
    if other:
        w = model.get_submodule(other[0]).weight
        raise EdgeftError(f"pte export: {other[0]} has a {type(w).__name__} weight, which this exporter cannot carry")
    quant_act = any(k == "dyn-act" for k in kinds.values())
    grouped_wo = any(
        kinds[n] == "weight-only" and _is_symmetric_weight_only(m.weight) and m.weight.block_size[1] < m.weight.shape[1]
        for n, m in model.named_modules()
        if isinstance(m, nn.Linear)
    )
    if embedding is not None and _embedding_format(model.get_input_embeddings().weight) != embedding:
        _quantize_embedding(model, embedding, warn)
    emb_fmt = _embedding_format(model.get_input_embeddings().weight)
    seq_meta = max_seq_len if dynamic_shape else max_context_len  # a static program never chunks
    metadata = _metadata(model, tokenizer, seq_meta, max_context_len, dynamic_shape, full_logits)
    expected = _expected_bytes(model)

    t_lower = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.export / ExecuTorch deprecation chatter
        with _edge_rewrites(
            model,
            arch,
            max_context_len,
            warn,
            last_only=not full_logits,
            max_seq_len=max_seq_len,
            kv_cache=kv_cache,
        ) as program:
            kv_report = _kv_cache_report(model)
            if kv_report["ring_rows"]:
                metadata[REWIND_METHOD] = max_seq_len  # ring_rows: rewinding stays exact within one chunk
            buf = _lower(program, max_seq_len, metadata, dynamic_shape, warn)
    lower_s = time.perf_counter() - t_lower
    structure = _structure(
        buf,
        emb_fmt,
        grouped_wo,
        ring=bool(kv_report["ring_rows"]),
        full=kv_report["ring_layers"] < kv_report["layers"],
        kv_int8=kv_cache == "int8",
    )
    _check_size(len(buf), expected)
    if record and record.get("embeddings") and emb_fmt == "float":
        warn.append(
            "the scheme's embedding quantization is neither int8 per row nor int4 in groups: embedding "
            "exported as float32"
        )

    out_dir.mkdir(parents=True, exist_ok=True)
    dest = Exports(out_dir).pte(logits)
    t_val = time.perf_counter()
    with atomic_path(dest) as tmp_pte:
        tmp_pte.write_bytes(buf)
        os.chmod(tmp_pte, 0o644)  # mkstemp makes 0600; artifacts are meant to be shared
        with _staged_tokenizer(src) as tok_dir:
            validation = _validate(
                tmp_pte,
                tok_dir,
                model,
                tokenizer,
                quant_act,
                max_seq_len,
                warn,
                full_logits,
                kv_report["ring_rows"],
                kv_int8=kv_cache == "int8",
            )
        for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
            if (src / name).exists():
                with atomic_path(out_dir / name) as tmp:
                    shutil.copyfile(src / name, tmp)
                    os.chmod(tmp, 0o644)
        _write_prompt_format(src, out_dir, warn)
    val_s = time.perf_counter() - t_val

    plan = (record or {}).get("plan") or {}
    return {
        "name": "pte" if full_logits else "pte-last",  # the run's exports/manifest.json keeps both modes
        "path": str(dest),
        "bytes": dest.stat().st_size,
        "logits": logits,
        "architecture": arch.model_type,
        "scheme": plan.get("name", "float"),
        "linears": {k: sum(v == k for v in kinds.values()) for k in sorted(set(kinds.values()))},
        "embedding": structure["embedding"],
        "expected_bytes": expected,
        "xnnpack_partitions": structure["xnnpack_partitions"],
        "max_seq_len": seq_meta,
        "max_context_len": max_context_len,
        "dynamic_shape": dynamic_shape,
        "kv_cache": kv_report,
        "validation": validation,
        "seconds": {
            "lower": round(lower_s, 1),
            "validate": round(val_s, 1),
            "total": round(time.perf_counter() - t0, 1),
        },
        "warnings": warn,
    }


def _write_prompt_format(src: Path, out_dir: Path, warn: list[str]) -> None:
    """The run's template as the apps' one-turn prompt format (exporters/prompt_format.py), beside the program."""
    from edgeft.exporters.prompt_format import write_prompt_format

    try:
        write_prompt_format(src, out_dir)
    except EdgeftError as e:
        warn.append(f"no prompt_format.json for the apps: {e}")


@contextlib.contextmanager
def _staged_tokenizer(src: Path) -> Iterator[Path]:
    """The tokenizer files as they will sit beside model.pte, in a scratch directory for the runner check."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="edgeft-pte-tok-") as d:
        for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
            if (src / name).exists():
                shutil.copyfile(src / name, Path(d) / name)
        yield Path(d)
