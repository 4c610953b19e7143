"""Tiny random models of the real families' shapes, for the exporter tests (built once in the test cache).

Each is a real family's config (RoPE variant, head_dim, fused projections, tied or not) at width 256 with two
layers and the locally fitted byte-level tokenizer of the built-in tiny models. Random init at std 0.02 attends
almost uniformly, so RoPE hardly moves the logits; trained models attend sharply. ``qk_std`` re-draws the q/k
projections wider so that positions (and a RoPE converted wrong) show in the logits: with it, a Llama 3 file
without its frequency factors moves the logits 25x more than the f32 bound (measured in the tests).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch

from edgeft.fsutil import atomic_dir, cache_dir
from edgeft.models import TinySpec, _build_tiny

_COMMON = dict(
    hidden_size=256,
    intermediate_size=768,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=8192,
    rms_norm_eps=1e-5,
)

# Llama-3.2-1B/3B: RoPE "llama3" (factor 32, low 1, high 4, original 8192, theta 500000), tied embeddings
LLAMA32 = dict(
    _COMMON,
    head_dim=64,
    max_position_embeddings=131072,
    tie_word_embeddings=True,
    rope_theta=500000.0,
    rope_scaling=dict(
        rope_type="llama3",
        factor=32.0,
        low_freq_factor=1.0,
        high_freq_factor=4.0,
        original_max_position_embeddings=8192,
    ),
)
# Mistral NeMo: head_dim 128 with hidden 5120 / 32 heads = 160, i.e. head_dim != hidden / heads (here 32 vs 64);
# no sliding window (v0.2 and later), untied
MISTRAL_NEMO = dict(
    _COMMON,
    head_dim=32,
    max_position_embeddings=131072,
    tie_word_embeddings=False,
    rope_theta=1000000.0,
    sliding_window=None,
)
# Phi-4-mini: fused qkv and gate/up, partial rotary 0.75, LongRoPE (short/long factors per rotated pair; factor
# 131072 / 4096 = 32 gives HF's attention factor 1.19), tied embeddings. The factors here are made up in the
# range of Phi-4-mini's (short 1-3, long 1-50).
_PAIRS = 64 * 3 // 4 // 2
PHI4_MINI = dict(
    _COMMON,
    max_position_embeddings=131072,
    original_max_position_embeddings=4096,
    tie_word_embeddings=True,
    rope_theta=10000.0,
    partial_rotary_factor=0.75,
    sliding_window=None,
    rope_scaling=dict(
        rope_type="longrope",
        short_factor=[1.0 + 2.0 * (i / (_PAIRS - 1)) ** 2 for i in range(_PAIRS)],
        long_factor=[1.0 + 49.0 * (i / (_PAIRS - 1)) ** 3 for i in range(_PAIRS)],
    ),
)
# Phi-3-mini-4k: fused projections, full rotary, no RoPE scaling, a 2047-token sliding window in a 4096 context
PHI3_MINI_4K = dict(
    _COMMON,
    max_position_embeddings=4096,
    original_max_position_embeddings=4096,
    tie_word_embeddings=False,
    rope_theta=10000.0,
    sliding_window=2047,
)


def build(name: str, arch: str, config: dict[str, Any], add_bos: bool = True, qk_std: float | None = 0.08) -> Path:
    """A tiny model directory for ``config`` (cached by its contents)."""
    key = hashlib.sha256(json.dumps([arch, config, add_bos, qk_std], sort_keys=True).encode()).hexdigest()[:10]
    dest = cache_dir() / "test-models" / f"{name}-{key}"
    if (dest / "config.json").exists():
        return dest
    with atomic_dir(dest) as tmp:
        _build_tiny(TinySpec(arch=arch, config=config, add_bos=add_bos, description=name), tmp)
        if qk_std:
            _widen_qk(tmp, qk_std)
    return dest


def _widen_qk(path: Path, std: float) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    qk_rows = (cfg.num_attention_heads + cfg.num_key_value_heads) * head_dim
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                p.copy_(torch.randn(p.shape, generator=g) * std)
            elif name.endswith("qkv_proj.weight"):  # q and k rows of the fused projection
                p[:qk_rows].copy_(torch.randn(p[:qk_rows].shape, generator=g) * std)
    model.save_pretrained(str(path))
