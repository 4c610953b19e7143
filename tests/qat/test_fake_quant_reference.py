"""The fake-quant references (edgeft.qat.fake_quant) against torchao's own fake quantizers, bit for bit.

Every scheme and the embedding treatment, in fp32, bf16 and fp16, on inputs with all-zero groups and rows, tiny
groups (scale at the eps clamp), constant rows and exact rounding ties. The one intended difference: torchao turns
an all-zero fp8 row into NaN (0/0), edgeft keeps it zero.
"""

import pytest
import torch
from torchao.quantization.qat.fake_quantize_config import IntxFakeQuantizeConfig, _infer_fake_quantize_configs
from torchao.quantization.qat.fake_quantizer import FakeQuantizerBase

from edgeft import qat
from edgeft.qat import fake_quant as R

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def weight_like(rows, cols, dtype):
    torch.manual_seed(0)
    w = torch.randn(rows, cols) * torch.logspace(-4, 0, rows)[:, None]
    c = 2.0**-6
    w[1] = (torch.randint(-7, 7, (cols,)) + 0.5) * c  # x / scale = k + 0.5 exactly
    w[1, ::32] = 7.5 * c
    w[2, :128] = 0.0
    return w.to(dtype)


def act_like(rows, cols, dtype):
    torch.manual_seed(1)
    x = torch.randn(rows, cols) * 3 + 0.5
    x[0] = 0.0
    x[1] = 2.0
    x[2] = x[2].abs()
    return x.to(dtype)


def agree(ours: torch.Tensor, theirs: torch.Tensor, zero_rows_nan: bool = False) -> None:
    both_nan = ours.isnan() & theirs.isnan()
    if zero_rows_nan:  # torchao's fp8 0/0: ours stays zero there
        nan_rows = theirs.isnan().all(-1)
        assert (ours[nan_rows] == 0).all()
        both_nan = both_nan | nan_rows[:, None]
    assert bool(((ours == theirs) | both_nan).all()), int((~((ours == theirs) | both_nan)).sum())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scheme", list(qat.SCHEMES))
def test_scheme_references_equal_torchao(scheme, dtype):
    act_cfg, w_cfg = qat.resolve(scheme).fake_quant_configs()
    act, weight = R.specs_from_configs(act_cfg, w_cfg)
    w = weight_like(40, 256, dtype)
    agree(R.weight_ref(w, weight), FakeQuantizerBase.from_config(w_cfg)(w))
    if act is not None:
        x = act_like(33, 256, dtype)
        agree(R.act_ref(x, act), FakeQuantizerBase.from_config(act_cfg)(x), zero_rows_nan=act.kind == "fp8")


@pytest.mark.parametrize("dtype", DTYPES)
def test_embedding_reference_equals_torchao(dtype):
    cfg = _infer_fake_quantize_configs(qat.resolve("phone-deployment").embedding_config())[1]
    spec = R.weight_spec(cfg)
    assert spec == R.WeightQuant("int", 8, None)
    w = weight_like(50, 96, dtype)
    agree(R.weight_ref(w, spec), FakeQuantizerBase.from_config(cfg)(w))


def test_codes_and_scales_are_the_grid():
    w = weight_like(8, 64, torch.float32)
    out, q, s = R.int_weight_ref(w, R.WeightQuant("int", 4, 32), return_codes=True)
    assert q.dtype == torch.int8 and int(q.min()) >= -8 and int(q.max()) <= 7
    assert torch.equal(out, (q.float().reshape(8, 2, 32) * s[..., None]).reshape(8, 64))


def test_unsupported_configs_are_refused():
    with pytest.raises(ValueError, match="symmetric"):
        R.weight_spec(IntxFakeQuantizeConfig(torch.int4, group_size=32, is_symmetric=False))
    with pytest.raises(ValueError, match="int8 asymmetric per token"):
        R.act_spec(IntxFakeQuantizeConfig(torch.int8, "per_token", is_symmetric=True))


def test_ste_is_the_identity_gradient():
    x = torch.randn(4, 64, requires_grad=True)
    g = torch.randn(4, 64)
    y = R.ste(lambda t: R.act_ref(t, R.ActQuant()), x)
    assert torch.equal(y, R.act_ref(x.detach(), R.ActQuant()))
    y.backward(g)
    assert torch.equal(x.grad, g)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_fp8_reference_equals_torchaos_convert_primitives(dtype):
    """What fp8 convert stores (torchao's Float8Tensor scale and codes) dequantizes to our fake quant, bit for bit."""
    from torchao.quantization.quant_primitives import (
        _choose_scale_float8,
        _dequantize_affine_float8,
        _quantize_affine_float8,
    )

    torch.manual_seed(3)
    w = torch.randn(96, 200, dtype=dtype) * 0.05
    scale = _choose_scale_float8(w, [1, 200])
    deq = _dequantize_affine_float8(_quantize_affine_float8(w, scale), scale, dtype)
    assert torch.equal(deq, R.fp8_rows_ref(w))


def test_fp8_convert_accumulates_exactly():
    # cuBLAS fast accumulation would move the converted forward away from the trained fake quant
    cfg = qat.resolve("fp8-fp8").linear_config()
    assert cfg.mm_config.use_fast_accum is False


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits,group", [(4, 32), (8, None)])
def test_searched_scale_is_the_least_error_candidate(dtype, bits, group):
    """weight_scale "mse": each group's scale is, of r * max|w| / divisor over MSE_RATIOS, the one with the least
    squared error, the earliest on a tie; never worse than torchao's max|w| grid. Checked by brute force."""
    w = weight_like(16, 256, dtype)
    spec = R.WeightQuant("int", bits, group, clip_ratios=R.MSE_RATIOS)
    out, _, scales = R.int_weight_ref(w, spec, return_codes=True)
    gs = group or 256
    qmax, div = 2 ** (bits - 1) - 1, (2**bits - 1) / 2
    eps = torch.finfo(dtype).smallest_normal
    flat = w.reshape(-1, gs)
    best_scales, best_errs = [], []
    for grp in flat:
        amax = grp.abs().max()
        errs, cands = [], []
        for r in R.MSE_RATIOS:
            s = torch.clamp((amax * r) / div, min=eps)
            q = torch.clamp(torch.round(grp * (1.0 / s)), -qmax - 1, qmax)
            errs.append(float(((q * s).to(dtype).double() - grp.double()).square().sum()))
            cands.append(s)
        k = min(range(len(errs)), key=lambda i: (errs[i], i))
        best_scales.append(cands[k])
        best_errs.append(errs[k])
        assert errs[k] <= errs[0]  # r = 1 (torchao's grid) is a candidate
    assert torch.equal(scales.reshape(-1), torch.stack(best_scales).to(scales.dtype))
    got = (out.reshape(-1, gs).double() - flat.double()).square().sum(-1)
    assert torch.equal(got, torch.tensor(best_errs, dtype=torch.float64))
    absmax = R.int_weight_ref(w, R.WeightQuant("int", bits, group))
    assert (out.double() - w.double()).square().sum() < (absmax.double() - w.double()).square().sum()
