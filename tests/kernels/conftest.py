"""Shared helpers for the kernel tests: fp64 references, relative errors, per-dtype tolerances."""

import os

import pytest
import torch

# EDGEFT_KERNEL_TEST_DEVICE=cuda runs the same tests on the GPU (compiled kernels instead of the interpreter).
ON_CUDA = os.environ.get("EDGEFT_KERNEL_TEST_DEVICE") == "cuda" and torch.cuda.is_available()
if ON_CUDA:
    torch.set_default_device("cuda")

# Relative error bounds against an fp64 reference. bf16 is loose because Triton's CPU interpreter rounds
# fp32 -> bf16 by truncation (about one bf16 ulp); on the GPU the conversion rounds to nearest.
TOL = {torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 4e-3}
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    assert torch.isfinite(a).all(), "non-finite values"
    denom = b.norm().item()
    return (a - b).norm().item() / (denom if denom > 0 else 1.0)


def assert_close(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype, scale: float = 1.0) -> None:
    assert a.shape == b.shape, (a.shape, b.shape)
    err = rel_err(a, b)
    assert err <= TOL[dtype] * scale, f"relative error {err:.2e} > {TOL[dtype] * scale:.1e}"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)
