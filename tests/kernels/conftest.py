"""Shared helpers for the kernel tests: fp64 references, relative errors, per-dtype tolerances."""

import os

import pytest
import torch
from numerics import TOL, assert_close, rel_err  # noqa: F401 (re-exported to the tests)

# EDGEFT_KERNEL_TEST_DEVICE=cuda runs the same tests on the GPU (compiled kernels instead of the interpreter).
ON_CUDA = os.environ.get("EDGEFT_KERNEL_TEST_DEVICE") == "cuda" and torch.cuda.is_available()
if ON_CUDA:
    torch.set_default_device("cuda")

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)
