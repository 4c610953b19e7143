"""Helpers shared by the kernel files: when to run Triton, launch sizing, dtype mapping.

Every op runs its Triton kernel on CUDA tensors, and also on CPU tensors when Triton's interpreter is on
(``TRITON_INTERPRET=1``, which is how CI tests the kernels). Anywhere else (a CPU run without the interpreter)
the op falls back to its PyTorch reference, so a patched model still trains, just without the speed-up.
"""

from __future__ import annotations

import functools
import os

import torch

try:  # Triton is optional at import time: CPU-only installs still get the references.
    import triton
    import triton.language as tl  # noqa: F401

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only where triton is missing
    triton = None
    HAS_TRITON = False

# Offsets past this need int64 arithmetic; below it int32 is enough and cheaper.
INT32_LIMIT = 2**31


def interpreting() -> bool:
    """True when Triton kernels run in the CPU interpreter (TRITON_INTERPRET=1 at import of triton)."""
    if not HAS_TRITON:
        return False
    try:
        from triton import knobs  # triton >= 3.4

        return bool(knobs.runtime.interpret)
    except Exception:  # pragma: no cover - older triton
        return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def use_triton(*tensors: torch.Tensor) -> bool:
    """Run the Triton kernel for these tensors (else the PyTorch reference)."""
    if not HAS_TRITON:
        return False
    t = tensors[0]
    if t.is_cuda:
        return True
    return t.device.type == "cpu" and interpreting()


def needs_long_indexing(*tensors: torch.Tensor) -> bool:
    """int64 offsets only when some tensor spans 2**31 elements or more (its storage extent, strides included)."""
    for t in tensors:
        if t is None:
            continue
        # Fast path (this runs on every launch): any view's extent lies inside its storage.
        if t.numel() < INT32_LIMIT and t.untyped_storage().nbytes() < INT32_LIMIT * t.element_size():
            continue
        extent = 1 + sum((s - 1) * abs(st) for s, st in zip(t.shape, t.stride()) if s > 0)
        if max(extent, t.numel()) >= INT32_LIMIT:
            return True
    return False


def next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


@functools.lru_cache(maxsize=None)
def num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def grid_programs(t: torch.Tensor, work_items: int, per_sm: int = 4) -> int:
    """Number of persistent programs for a loop-over-rows kernel: a few per SM on GPU, few in the interpreter."""
    if t.is_cuda:
        return max(1, min(work_items, num_sms(t.device.index or 0) * per_sm))
    return max(1, min(work_items, 4))


def warps_for(block: int) -> int:
    if block >= 8192:
        return 16
    if block >= 2048:
        return 8
    if block >= 512:
        return 4
    return 2


@functools.lru_cache(maxsize=None)
def _mm_out_dtype_works(device_type: str, dtype: torch.dtype) -> bool:
    """Whether torch.mm(..., out_dtype=float32) exists for this device/dtype (probed once: a failing call
    raises, and raising on every call would cost far more than the matmul)."""
    try:
        a = torch.ones(16, 16, dtype=dtype, device=device_type)
        torch.mm(a, a, out_dtype=torch.float32)
        return True
    except (TypeError, RuntimeError):
        return False


def mm_fp32_out(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b with an fp32 result (fp32 accumulation kept, no bf16 rounding) where the backend offers it (CUDA)."""
    if a.dtype == torch.float32:
        return a @ b
    if a.is_cuda and _mm_out_dtype_works("cuda", a.dtype):
        return torch.mm(a, b, out_dtype=torch.float32)
    return (a @ b).float()


_OPTIMIZER_STEPS = [0]
_HOOK: list = []


def _count_step(optimizer, args, kwargs) -> None:  # noqa: ANN001 - torch's hook signature
    _OPTIMIZER_STEPS[0] += 1


def param_state(p: torch.Tensor) -> tuple[int, int, int]:
    """What a cache derived from parameter ``p`` must be keyed on to notice every change of ``p``.

    The version counter alone misses optimizer updates: fused AdamW (``fused=True``, the default on CUDA here)
    writes parameters without bumping ``_version``, which once left every cached adapter and weight code stale
    after step 1. A global optimizer step-post hook (registered on first use) counts every ``step()`` of every
    torch optimizer, fused or not, bitsandbytes' included.
    """
    if not _HOOK:
        from torch.optim.optimizer import register_optimizer_step_post_hook

        _HOOK.append(register_optimizer_step_post_hook(_count_step))
    return (_OPTIMIZER_STEPS[0], p._version, p.data_ptr())


def cached_cast(p: torch.Tensor, dtype: torch.dtype, scale: float = 1.0) -> torch.Tensor:
    """``(p * scale).to(dtype)``, kept on the tensor until it changes (see :func:`param_state`).

    LoRA adapters are fp32 parameters read in the activation dtype by every forward, recompute and backward of a
    step; casting them once per optimizer step instead of per use removes two small kernels per projection call.
    """
    if p.dtype == dtype and scale == 1.0:
        return p
    key = (dtype, scale)
    cache = p.__dict__.setdefault("_edgeft_casts", {})
    hit = cache.get(key)
    state = param_state(p)
    if hit is not None and hit[0] == state:
        return hit[1]
    with torch.no_grad():
        out = (p * scale).to(dtype) if scale != 1.0 else p.to(dtype)
    cache[key] = (state, out)
    return out
