"""Architecture metadata: the GGUF keys that make llama.cpp run a model as HF does.

Only families of ``edgeft.arch`` with a ``gguf_arch`` are written; an activation, RoPE scaling, attention option
or Gemma3 setting llama.cpp's graph for the family has no equivalent of is refused with one ``EdgeftError`` line.
RoPE is planned from the loaded model (:func:`_rope_plan`): base, rotated dims, linear/llama3/longrope scaling and
the factor tensors llama.cpp reads. ``general.name`` switches llama.cpp's Phi-3 token attributes on exactly when
the HF tokenizer has them.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgeft.arch import FAMILIES, Family, for_config, rotary_dims
from edgeft.errors import EdgeftError
from edgeft.rundir import run_name

from .quants import QuantSpec


def _arch_spec(cfg: dict[str, Any]) -> Family:
    fam = for_config(cfg)
    if fam is None or fam.gguf_arch is None:
        names = cfg.get("architectures") or [cfg.get("model_type", "?")]
        supported = sorted(f.hf_class for f in FAMILIES.values() if f.gguf_arch)
        raise EdgeftError(f"GGUF export does not support architecture {names[0]} (supported: {', '.join(supported)})")
    return fam


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
