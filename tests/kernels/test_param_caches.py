"""Caches derived from parameters (adapter casts, QAT weight codes) must notice every optimizer step.

Fused AdamW writes parameters without bumping their version counter; these tests use it on purpose.
"""

import pytest
import torch

from edgeft.kernels._common import cached_cast, param_state


@pytest.mark.parametrize("fused", [True, False])
def test_cached_cast_follows_optimizer_steps(fused):
    p = torch.nn.Parameter(torch.randn(8, 16))
    opt = torch.optim.AdamW([p], lr=0.1, fused=fused, foreach=None if fused else False)
    first = cached_cast(p, torch.bfloat16)
    assert cached_cast(p, torch.bfloat16) is first  # a hit while nothing changed
    p.grad = torch.randn_like(p)
    opt.step()
    again = cached_cast(p, torch.bfloat16)
    assert again is not first
    torch.testing.assert_close(again, p.detach().to(torch.bfloat16), rtol=0, atol=0)


def test_param_state_moves_on_in_place_edits_and_steps():
    p = torch.nn.Parameter(torch.zeros(3))
    s0 = param_state(p)
    with torch.no_grad():
        p.add_(1)
    s1 = param_state(p)
    assert s1 != s0
    opt = torch.optim.SGD([p], lr=1.0)
    p.grad = torch.ones(3)
    opt.step()
    assert param_state(p) != s1


def test_weight_code_cache_is_refreshed_after_a_fused_step():
    from edgeft.kernels.fake_quant import WeightCache
    from edgeft.qat import resolve
    from edgeft.qat.fake_quant import weight_ref, weight_spec

    _, wcfg = resolve("int4").fake_quant_configs()
    spec = weight_spec(wcfg)
    w = torch.nn.Parameter(torch.randn(16, 64))
    opt = torch.optim.AdamW([w], lr=0.5, fused=True)
    cache = WeightCache()
    before = cache.get(w, spec).clone()
    w.grad = torch.randn_like(w)
    opt.step()
    got = cache.get(w, spec)
    assert not torch.equal(got, before)
    torch.testing.assert_close(got, weight_ref(w.detach(), spec), rtol=0, atol=0)
