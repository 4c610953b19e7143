"""Padding-free attention for packed rows: several examples in one row never attend to each other.

Why by hand: packing short examples into full rows removes padding (2-5x fewer tokens on chat data), but a plain
causal mask would let a token see the previous examples of its row. transformers can build a 4-D block-diagonal
mask from ``position_ids`` for its SDPA path, which costs (tokens x tokens) memory and sends SDPA to its slower
masked kernels. Here the sequence boundaries become ``cu_seqlens`` once per step (from position_ids restarting at
0), and each layer calls a variable-length kernel:

1. flash-attention's ``flash_attn_varlen_func`` when the package is installed (CUDA, fp16/bf16);
2. else, on CUDA above ``SDPA_MAX_TOKENS`` packed tokens, PyTorch FlexAttention with a document mask
   (block-sparse: whole blocks across documents are skipped), compiled once per power-of-two token bucket;
3. else SDPA with a block-diagonal boolean mask (exact, O(tokens^2) memory and compute; faster than FlexAttention
   up to ~8k tokens on an H200; CPU and tests).

Sliding windows (Mistral, Gemma3 local layers) and logit softcapping are honoured by every backend.
Layout: q (T, Hq, D), k/v (T, Hk, D) with T the packed token count; Hq a multiple of Hk (GQA).
"""

from __future__ import annotations

import functools
import math
import warnings
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


@dataclass
class PackedBatch:
    """Sequence boundaries of a packed batch, computed once per step and shared by all layers."""

    cu_seqlens: torch.Tensor  # (n_seqs + 1,) int32, offsets into the flattened (B*S) tokens
    max_seqlen: int
    doc_ids: torch.Tensor  # (T,) int32: which sequence each token belongs to
    total: int
    cache: dict = field(default_factory=dict, repr=False)  # per-step backend objects (FlexAttention block masks)


def packed_batch_from_position_ids(position_ids: torch.Tensor, force: bool = False) -> PackedBatch | None:
    """Sequences start where the position does not continue (``pos[i] != pos[i-1] + 1``) and at every row start.

    Returns None when no row holds more than one sequence (then plain causal attention is exact and faster),
    unless ``force``. One host sync (the number of sequences and the longest one).
    """
    pos = position_ids.reshape(position_ids.shape[0] if position_ids.dim() > 1 else 1, -1)
    B, S = pos.shape
    starts = torch.ones_like(pos, dtype=torch.bool)
    starts[:, 1:] = pos[:, 1:] != pos[:, :-1] + 1
    flat = starts.reshape(-1)
    idx = flat.nonzero().squeeze(1)
    n_seqs = idx.numel()
    if n_seqs == B and not force:
        return None
    T = B * S
    cu = torch.empty(n_seqs + 1, dtype=torch.int32, device=pos.device)
    cu[:-1] = idx.to(torch.int32)
    cu[-1] = T
    lengths = cu[1:] - cu[:-1]
    doc_ids = (flat.cumsum(0) - 1).to(torch.int32)
    return PackedBatch(cu, int(lengths.max().item()), doc_ids, T)


def packed_batch_from_cu_seqlens(cu_seqlens: torch.Tensor, max_seqlen: int | None = None) -> PackedBatch:
    cu = cu_seqlens.to(torch.int32)
    T = int(cu[-1].item())
    lengths = (cu[1:] - cu[:-1]).long()
    doc_ids = torch.repeat_interleave(torch.arange(lengths.numel(), device=cu.device, dtype=torch.int32), lengths)
    ms = int(max_seqlen) if max_seqlen is not None else int(lengths.max().item())
    return PackedBatch(cu, ms, doc_ids, T)


# --- backends --------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _flash_attn_varlen():
    try:
        from flash_attn import flash_attn_varlen_func  # type: ignore

        return flash_attn_varlen_func
    except Exception:
        return None


_FLEX_FAILED: set = set()  # (dtype, device) where compiled FlexAttention failed once: don't retry every layer


# How compiled FlexAttention meets a token count that changes every step (padding-free batches):
#   "pow2": pad the packed tokens to the next power of two (>= 128), each pad token its own document, so a run
#           compiles once per bucket (~6-8 buckets) instead of once per batch; the pad blocks cost one diagonal
#           block each (block sparsity);
#   "dynamic": no padding, the token count a symbolic size (torch.compile(dynamic=True));
#   "none": exact sizes, dynamic=False (each new size recompiles; after torch's recompile limit of 8 the call
#           runs FlexAttention unfused, materialising the scores: the bug bench/varlen_attention.py measured).
FLEX_SHAPES = "pow2"
FLEX_MIN_BUCKET = 128
# "auto" on CUDA without flash-attn: masked SDPA up to this many packed tokens, FlexAttention above. Measured
# (bench/varlen_attention.py, H200, Qwen3-0.6B heads, fwd+bwd): SDPA 1.3x faster than FlexAttention at 2k-8k
# tokens, FlexAttention 2.0x / 5.7x / 8.3x faster at 12-16k / 24-32k / 48-64k (SDPA's dense mask is O(tokens^2)).
SDPA_MAX_TOKENS = 8192


@functools.lru_cache(maxsize=2)
def _compiled_flex(dynamic: bool = False):
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=dynamic)


def flex_bucket(total: int) -> int:
    """The padded token count compiled FlexAttention runs at ("pow2")."""
    return max(FLEX_MIN_BUCKET, 1 << (total - 1).bit_length())


_BLOCK = 128  # FlexAttention's default sparse block size


def document_block_mask(doc: torch.Tensor, mask_mod):
    """The causal document BlockMask from the (non-decreasing) document id of every token, in O((n/128)^2).

    ``create_block_mask`` finds the empty, partial and full blocks by evaluating ``mask_mod`` on all n x n token
    pairs (40 GiB at 64k tokens, bench/README.md); with ids that never decrease along the row the blocks follow
    from each block's first and last id: kv block j <= q block i holds a valid pair iff j's last document reaches
    i's first, and is full iff j < i and both lie in one document (first id of j == last id of i). ``mask_mod``
    is still applied inside the partial blocks. Needs n a multiple of 128.
    """
    from torch.nn.attention.flex_attention import BlockMask

    nb = doc.numel() // _BLOCK
    blocks = doc.view(nb, _BLOCK)
    first, last = blocks[:, 0], blocks[:, -1]
    i = torch.arange(nb, device=doc.device)
    below = i[None, :] <= i[:, None]  # [q block, kv block]: kv block not after the q block
    touch = below & (last[None, :] >= first[:, None])
    full = touch & (i[None, :] < i[:, None]) & (first[None, :] == last[:, None])
    partial = touch & ~full

    def index(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # the kv blocks of each q row, listed first (stable: in order), then the rest (ignored past the count)
        order = torch.argsort((~m).to(torch.int8), dim=-1, stable=True).to(torch.int32)
        return m.sum(-1).to(torch.int32)[None, None], order[None, None]

    kv_num, kv_idx = index(partial)
    full_num, full_idx = index(full)
    return BlockMask.from_kv_blocks(kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=_BLOCK, mask_mod=mask_mod)


def _flex(
    q,
    k,
    v,
    packed: PackedBatch,
    causal: bool,
    scale: float,
    window: int | None,
    softcap: float | None,
    compiled: bool = True,
    shapes: str | None = None,
):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    shapes = shapes or (FLEX_SHAPES if compiled else "none")
    total = packed.total
    n = flex_bucket(total) if shapes == "pow2" else total
    key = ("flex_mask", causal, window, q.device, n)
    block_mask = packed.cache.get(key)
    if block_mask is None:
        doc = packed.doc_ids
        if n > total:  # every pad token a document of its own: it sees itself only, and nothing sees it
            start = int(doc[-1].item()) + 1 if total else 0
            doc = torch.cat([doc, torch.arange(start, start + n - total, device=doc.device, dtype=doc.dtype)])

        def mask_mod(b, h, q_idx, kv_idx):
            m = doc[q_idx] == doc[kv_idx]
            if causal:
                m = m & (q_idx >= kv_idx)
            if window is not None:
                m = m & (q_idx - kv_idx < window)
            return m

        if causal and window is None and n % _BLOCK == 0:
            block_mask = document_block_mask(doc, mask_mod)
        else:
            # evaluates all n x n pairs (measured peak: 2.6 GiB at 16k tokens, 40 GiB at 64k)
            block_mask = create_block_mask(mask_mod, 1, None, n, n, device=q.device)
        packed.cache[key] = block_mask
    score_mod = None
    if softcap is not None:

        def score_mod(score, b, h, q_idx, kv_idx):
            return softcap * torch.tanh(score / softcap)

    fn = _compiled_flex(shapes == "dynamic") if compiled else flex_attention
    qp, kp, vp = (F.pad(t, (0, 0, 0, 0, 0, n - total)) for t in (q, k, v)) if n > total else (q, k, v)
    args = (qp.transpose(0, 1).unsqueeze(0), kp.transpose(0, 1).unsqueeze(0), vp.transpose(0, 1).unsqueeze(0))
    kwargs = dict(score_mod=score_mod, block_mask=block_mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1])
    if compiled:
        try:
            out = fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - inductor's lowering errors have no common public base class
            # Seen on torch 2.11 + 2 GPUs (fp32, a 73-token packed batch): inductor failed to lower FlexAttention's
            # backward. The masked SDPA path computes the same attention; only its memory is O(tokens^2).
            _FLEX_FAILED.add((q.dtype, q.device))
            warnings.warn(
                f"FlexAttention did not compile ({type(e).__name__}); padding-free attention uses SDPA "
                "with a block-diagonal mask for this dtype from now on",
                stacklevel=2,
            )
            return _sdpa_masked(q, k, v, packed, causal, scale, window, softcap)
    else:
        out = fn(*args, **kwargs)
    return out.squeeze(0).transpose(0, 1)[:total]


def _dense_mask(packed: PackedBatch, causal: bool, window: int | None) -> torch.Tensor:
    doc = packed.doc_ids
    mask = doc[:, None] == doc[None, :]
    i = torch.arange(packed.total, device=doc.device)
    if causal:
        mask &= i[:, None] >= i[None, :]
    if window is not None:
        mask &= (i[:, None] - i[None, :]) < window
    return mask


def _sdpa_masked(q, k, v, packed: PackedBatch, causal: bool, scale: float, window: int | None, softcap: float | None):
    mask = _dense_mask(packed, causal, window)
    groups = q.shape[1] // k.shape[1]
    qh, kh, vh = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)  # (H, T, D)
    if groups > 1:
        kh, vh = kh.repeat_interleave(groups, 0), vh.repeat_interleave(groups, 0)
    if softcap is None:
        out = F.scaled_dot_product_attention(
            qh.unsqueeze(0), kh.unsqueeze(0), vh.unsqueeze(0), attn_mask=mask, scale=scale
        ).squeeze(0)
    else:  # SDPA has no softcap: explicit math
        s = (qh.float() @ kh.float().transpose(1, 2)) * scale
        s = softcap * torch.tanh(s / softcap)
        s = s.masked_fill(~mask, float("-inf"))
        out = (s.softmax(-1) @ vh.float()).to(q.dtype)
    return out.transpose(0, 1)


def varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    packed: PackedBatch,
    *,
    causal: bool = True,
    scale: float | None = None,
    window: int | None = None,
    softcap: float | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Attention within each packed sequence. q (T, Hq, D), k/v (T, Hk, D) -> (T, Hq, D).

    ``window``: a token sees keys at most ``window - 1`` positions back (transformers' sliding_window).
    ``backend``: "auto", "flash_attn", "flex", "flex_eager" (uncompiled, for tests) or "sdpa".
    """
    scale = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    if backend == "auto":
        if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and _flash_attn_varlen() is not None:
            backend = "flash_attn"
        elif q.is_cuda and packed.total > SDPA_MAX_TOKENS and (q.dtype, q.device) not in _FLEX_FAILED:
            backend = "flex"
        else:
            backend = "sdpa"
    if backend == "flash_attn":
        fn = _flash_attn_varlen()
        if fn is None:
            raise RuntimeError("flash_attn is not installed")
        kwargs = {}
        if window is not None:
            kwargs["window_size"] = (window - 1, 0 if causal else window - 1)
        if softcap is not None:
            kwargs["softcap"] = softcap
        return fn(
            q,
            k,
            v,
            packed.cu_seqlens,
            packed.cu_seqlens,
            packed.max_seqlen,
            packed.max_seqlen,
            dropout_p=0.0,
            softmax_scale=scale,
            causal=causal,
            **kwargs,
        )
    if backend in ("flex", "flex_eager"):
        return _flex(q, k, v, packed, causal, scale, window, softcap, compiled=backend == "flex")
    if backend == "sdpa":
        return _sdpa_masked(q, k, v, packed, causal, scale, window, softcap)
    raise ValueError(f"unknown attention backend {backend!r}")


def varlen_attention_reference(q, k, v, packed: PackedBatch, *, causal=True, scale=None, window=None, softcap=None):
    """Each sequence on its own through explicit fp32 math (slow, obviously right)."""
    scale = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    groups = q.shape[1] // k.shape[1]
    out = torch.empty_like(q)
    cu = packed.cu_seqlens.tolist()
    for s0, s1 in zip(cu[:-1], cu[1:]):
        qs = q[s0:s1].transpose(0, 1).float()
        ks = k[s0:s1].transpose(0, 1).float().repeat_interleave(groups, 0)
        vs = v[s0:s1].transpose(0, 1).float().repeat_interleave(groups, 0)
        s = qs @ ks.transpose(1, 2) * scale
        if softcap is not None:
            s = softcap * torch.tanh(s / softcap)
        n = s1 - s0
        i = torch.arange(n, device=q.device)
        allowed = torch.ones(n, n, dtype=torch.bool, device=q.device)
        if causal:
            allowed &= i[:, None] >= i[None, :]
        if window is not None:
            allowed &= (i[:, None] - i[None, :]) < window
        s = s.masked_fill(~allowed, float("-inf"))
        out[s0:s1] = (s.softmax(-1) @ vs).transpose(0, 1).to(q.dtype)
    return out
