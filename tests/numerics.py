"""Relative errors against fp64 references and per-dtype bounds, shared by the kernel and QAT tests."""

import torch

# Relative error bounds against an fp64 reference. bf16 is loose because Triton's CPU interpreter rounds
# fp32 -> bf16 by truncation (about one bf16 ulp); on the GPU the conversion rounds to nearest.
TOL = {torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 4e-3}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in fp64 (||a - b|| when b is zero); a must be finite."""
    a, b = a.detach().double(), b.detach().double()
    assert torch.isfinite(a).all(), "non-finite values"
    denom = b.norm().item()
    return (a - b).norm().item() / (denom if denom > 0 else 1.0)


def assert_close(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype, scale: float = 1.0) -> None:
    """a equals the reference b within ``scale`` times the dtype's bound (relative norm)."""
    assert a.shape == b.shape, (a.shape, b.shape)
    err = rel_err(a, b)
    assert err <= TOL[dtype] * scale, f"relative error {err:.2e} > {TOL[dtype] * scale:.1e}"
