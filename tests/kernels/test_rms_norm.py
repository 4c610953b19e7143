import pytest
import torch

from edgeft.kernels.rms_norm import rms_norm, rms_norm_reference

from .conftest import DTYPES, assert_close

SHAPES = [(1, 64), (7, 33), (3, 5, 100), (2, 4097), (130, 128)]  # single row, odd, 3-D, long row, many rows


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("offset", [0.0, 1.0])
def test_rms_norm_matches_reference(dtype, shape, offset):
    x = (torch.randn(shape) * 3).to(dtype).requires_grad_()
    w = (torch.randn(shape[-1]) * 0.5).to(dtype).requires_grad_()
    y = rms_norm(x, w, 1e-6, offset)
    g = torch.randn_like(y)
    y.backward(g)
    x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    y64 = rms_norm_reference(x64, w64, 1e-6, offset)
    y64.backward(g.double())
    assert y.dtype == dtype
    assert_close(y, y64, dtype)
    assert_close(x.grad, x64.grad, dtype)
    assert_close(w.grad, w64.grad, dtype, scale=2)


def test_frozen_weight_gets_no_grad_and_output_is_not_a_view():
    x = torch.randn(4, 6, 32, requires_grad=True)
    w = torch.ones(32)
    y = rms_norm(x, w)
    assert y._base is None  # RoPE rotates norm outputs in place
    y.sum().backward()
    assert w.grad is None and x.grad is not None


def test_llama_style_promotes_with_fp32_weight():
    x = torch.randn(3, 16, dtype=torch.bfloat16)
    w = torch.randn(16)
    assert rms_norm(x, w).dtype == torch.float32  # like transformers' weight * x.to(input_dtype)
    assert rms_norm(x, w, offset=1.0).dtype == torch.bfloat16  # Gemma casts back to the input dtype
