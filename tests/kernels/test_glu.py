import importlib

import pytest
import torch

from edgeft.kernels._common import needs_long_indexing
from edgeft.kernels.geglu import geglu, geglu_reference
from edgeft.kernels.swiglu import swiglu, swiglu_backward, swiglu_forward, swiglu_reference

from .conftest import DTYPES, assert_close

# the package re-exports the functions under the module names, so fetch the modules themselves
swiglu_mod = importlib.import_module("edgeft.kernels.swiglu")
geglu_mod = importlib.import_module("edgeft.kernels.geglu")

SHAPES = [(1, 1), (3, 37), (2, 3, 100), (1, 5000)]
OPS = {
    "swiglu": (lambda g, u: swiglu(g, u), swiglu_reference),
    "geglu": (lambda g, u: geglu(g, u, "none"), lambda g, u: geglu_reference(g, u, "none")),
    "geglu_tanh": (lambda g, u: geglu(g, u, "tanh"), lambda g, u: geglu_reference(g, u, "tanh")),
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("op", list(OPS))
def test_glu_matches_reference(op, shape, dtype):
    fn, ref = OPS[op]
    g = (torch.randn(shape) * 3).to(dtype).requires_grad_()
    u = torch.randn(shape).to(dtype).requires_grad_()
    h = fn(g, u)
    d = torch.randn_like(h)
    h.backward(d)
    g64, u64 = g.detach().double().requires_grad_(), u.detach().double().requires_grad_()
    h64 = ref(g64, u64)
    h64.backward(d.double())
    assert h.dtype == dtype
    assert_close(h, h64, dtype)
    assert_close(g.grad, g64.grad, dtype)
    assert_close(u.grad, u64.grad, dtype)


def test_strided_halves_of_fused_gate_up():
    gu = torch.randn(4, 6, 40, requires_grad=True)
    g, u = gu.chunk(2, dim=-1)
    swiglu(g, u).square().sum().backward()
    gu64 = gu.detach().double().requires_grad_()
    g64, u64 = gu64.chunk(2, dim=-1)
    swiglu_reference(g64, u64).square().sum().backward()
    assert_close(gu.grad, gu64.grad, torch.float32)


def test_in_place_backward_overwrites_buffers():
    g, u, dh = torch.randn(5, 33), torch.randn(5, 33), torch.randn(5, 33)
    h_ref = swiglu_forward(g, u).clone()
    _, dg_ref, du_ref = swiglu_backward(dh, g, u, in_place=False)
    g2, u2, dh2 = g.clone(), u.clone(), dh.clone()
    h, dg, du = swiglu_backward(dh2, g2, u2, in_place=True)
    assert h.data_ptr() == dh2.data_ptr() and dg.data_ptr() == g2.data_ptr() and du.data_ptr() == u2.data_ptr()
    assert_close(h, h_ref, torch.float32)
    assert_close(dg, dg_ref, torch.float32)
    assert_close(du, du_ref, torch.float32)


def test_long_indexing_switch_threshold():
    small = torch.empty(4, 8)
    assert not needs_long_indexing(small)
    # a 2**31-element extent without allocating it: a stride-expanded view
    big = torch.empty(1).expand(2**16, 2**15)
    assert big.numel() == 2**31 and needs_long_indexing(big)
    assert not needs_long_indexing(torch.empty(1).expand(2**16, 2**15 - 1))


@pytest.mark.parametrize("mod,kw", [(swiglu_mod, {}), (geglu_mod, {"APPROX_TANH": True})])
def test_int64_variant_computes_the_same(mod, kw):
    # The LONG_INDEXING=True kernel must give the same numbers as the int32 one (run on a small tensor).
    prefix = "_swiglu" if mod is swiglu_mod else "_geglu"
    g, u = torch.randn(3, 50), torch.randn(3, 50)
    outs = []
    for long in (False, True):
        h = torch.empty_like(g)
        getattr(mod, prefix + "_fwd_kernel")[(3, 1)](
            g, u, h, g.stride(0), u.stride(0), h.stride(0), 50, BLOCK=64, LONG_INDEXING=long, **kw
        )
        outs.append(h)
    assert torch.equal(outs[0], outs[1])
    ref = swiglu_reference(g, u) if mod is swiglu_mod else geglu_reference(g, u, "tanh")
    assert_close(outs[1], ref, torch.float32)


def test_bad_approximate_rejected():
    with pytest.raises(ValueError):
        geglu(torch.randn(2, 2), torch.randn(2, 2), "erf")
