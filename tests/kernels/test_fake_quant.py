"""Fused fake-quant kernels against the PyTorch references (edgeft.qat.fake_quant), bit for bit.

The references equal torchao's fake quantizers (tests/qat/test_fake_quant_reference.py); here every kernel path
(group-wise int with and without the LoRA merge, codes/scales and their dequantization, per-token int8, per-row
fp8) must give identical bits in fp32, bf16 and fp16, on odd shapes and on inputs built to hit the rounding
ties, the eps clamp and all-zero groups.
"""

import pytest
import torch

from edgeft.kernels import fake_quant as K
from edgeft.qat import fake_quant as R

from .conftest import ON_CUDA

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
WEIGHT_SPECS = {
    "int4-g32": R.WeightQuant("int", 4, 32),
    "int4-g128": R.WeightQuant("int", 4, 128),
    "int8-row": R.WeightQuant("int", 8, None),
    "int4-g32-fp16scale": R.WeightQuant("int", 4, 32, eps=258 * 2.0**-24, scale_dtype=torch.float16),
    "fp8-row": R.WeightQuant("fp8", 8, None),
    "fp8-int4": R.WeightQuant("fp8_int4", 4, 128, divisor=8.0, eps=1e-6, lb=1e-12),
    # the clip search (weight_scale "mse"): 13 candidate scales per group, the least squared error wins
    "int4-g32-mse": R.WeightQuant("int", 4, 32, clip_ratios=R.MSE_RATIOS),
    "int8-row-mse": R.WeightQuant("int", 8, None, clip_ratios=R.MSE_RATIOS),
}


@pytest.fixture(autouse=True)
def _small_tiles(monkeypatch):
    """Interpreted launches use large tiles (speed); small ones here exercise multi-program grids and masking."""
    monkeypatch.setattr(K, "_TILE_INTERPRETED", 1024)


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality (NaN equal to NaN, +0 vs -0 distinguished by value only)."""
    assert a.shape == b.shape and a.dtype == b.dtype, (a.shape, b.shape, a.dtype, b.dtype)
    return bool(((a == b) | (a.isnan() & b.isnan())).all())


def nasty_weight(rows: int, cols: int, dtype: torch.dtype, group: int) -> torch.Tensor:
    """Random rows with per-row magnitudes over 6 decades, plus rows built to hit exact .5 ties, an all-zero
    group, a group under the eps clamp and a constant group."""
    w = torch.randn(rows, cols) * torch.logspace(-4, 1, rows)[:, None]
    g = min(group, cols)
    if rows > 3:
        # max 7.5 c and values (k + 0.5) c with c a power of two: x / scale lands exactly on k + 0.5
        c = 2.0**-6
        tie = (torch.randint(-7, 7, (cols,)) + 0.5) * c
        tie[::g] = 7.5 * c
        w[1] = tie
        w[2, :g] = 0.0
        w[3, :g] = 1e-39 if dtype == torch.float32 else 0.0
        w[0, :g] = 0.25
    return w.to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", list(WEIGHT_SPECS))
@pytest.mark.parametrize("shape", [(37, 256), (6, 384), (1, 128)])
def test_weight_fake_quant_is_bit_exact(dtype, name, shape):
    spec = WEIGHT_SPECS[name]
    if spec.group_size and shape[1] % spec.group_size:
        pytest.skip("group does not divide the row")
    w = nasty_weight(*shape, dtype, spec.group_size or shape[1])
    assert same(K.fake_quant_weight(w, spec), R.weight_ref(w, spec))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", ["int4-g32", "int8-row", "fp8-int4", "int4-g32-mse"])
def test_lora_merge_inside_the_kernel_is_bit_exact(dtype, name):
    spec = WEIGHT_SPECS[name]
    w = nasty_weight(19, 256, dtype, spec.group_size or 256)
    a = torch.randn(8, 256) * 0.05
    b = torch.randn(19, 8) * 0.05
    merged = R.merge_lora_weight(w, a, b, 1.75)
    assert same(K.merged_lora_weight(w, a, b, 1.75), merged)
    assert same(K.fake_quant_weight(w, spec, lora=(a, b, 1.75)), R.weight_ref(merged, spec))


def test_merge_is_the_rank_ordered_fp32_sum():
    # the merge's definition, written out: W + s * sum_k B[:, k] A[k, :], fp32, in order, rounded once
    w = torch.randn(5, 32, dtype=torch.bfloat16)
    a, b = torch.randn(3, 32), torch.randn(5, 3)
    acc = torch.zeros(5, 32)
    for k in range(3):
        acc = acc + torch.outer(b[:, k], a[k])
    assert same(K.merged_lora_weight(w, a, b, 0.5), (w.float() + acc * 0.5).to(torch.bfloat16))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", ["int4-g32", "int8-row", "int4-g32-fp16scale", "fp8-int4", "int4-g32-mse"])
def test_codes_scales_and_dequantization(dtype, name):
    spec = WEIGHT_SPECS[name]
    w = nasty_weight(9, 256, dtype, spec.group_size or 256)
    out, codes, scales, packed = K.fake_quant_weight(w, spec, codes=True)
    base = R.fp8_rows_ref(w, spec.lb) if spec.kind == "fp8_int4" else w
    ref_out, ref_codes, ref_scales = R.int_weight_ref(base, spec.int_part(), return_codes=True)
    assert same(out, ref_out) and same(scales, ref_scales)
    assert packed == (spec.bits == 4)
    # torchao's NaNs (an fp16 scale whose reciprocal overflows, times a zero) have no integer code: compare the rest
    ok = ~out.isnan()
    assert same(K.dequantize_codes(codes, scales, packed, dtype, spec.group_size, 256)[ok], out[ok])
    if packed:
        assert codes.dtype == torch.uint8 and codes.shape == (9, 128)
        lo = ((codes.to(torch.int16) & 15) ^ 8) - 8
        hi = (((codes.to(torch.int16) >> 4) & 15) ^ 8) - 8
        codes = torch.stack([lo, hi], -1).reshape(9, 256).to(torch.int8)
        assert same(K.dequantize_codes(codes, scales, False, dtype, spec.group_size, 256)[ok], out[ok])
    assert torch.equal(codes[ok], ref_codes[ok])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_codes_match_torchao_convert(dtype):
    """What convert writes (torchao's IntxUnpackedToInt8Tensor) is what the kernel's fake quantization used."""
    from torchao.quantization.quant_primitives import MappingType
    from torchao.quantization.quantize_.workflows.intx.intx_unpacked_to_int8_tensor import IntxUnpackedToInt8Tensor

    w = nasty_weight(24, 128, dtype, 32)
    _, codes, scales, _ = K.fake_quant_weight(w, WEIGHT_SPECS["int4-g32"], codes=True)
    t = IntxUnpackedToInt8Tensor.from_hp(w, (1, 32), torch.int4, mapping_type=MappingType.SYMMETRIC)
    lo = ((codes.to(torch.int16) & 15) ^ 8) - 8
    hi = (((codes.to(torch.int16) >> 4) & 15) ^ 8) - 8
    unpacked = torch.stack([lo, hi], -1).reshape(24, 128).to(torch.int8)
    assert torch.equal(t.qdata, unpacked)
    assert same(t.scale.reshape(24, 4), scales)


def nasty_rows(shape, dtype):
    x = torch.randn(*shape) * 3 + 0.7
    x2 = x.view(-1, shape[-1])
    if x2.shape[0] > 4:
        x2[0] = 0.0  # zero row
        x2[1] = 1.5  # constant positive row
        x2[2] = x2[2].abs()  # no negatives
        x2[3] = -x2[3].abs() * 1e-30 if dtype == torch.float32 else -x2[3].abs()  # scale at the eps clamp
    return x.to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["int8_asym", "fp8"])
@pytest.mark.parametrize("shape", [(1, 1), (3, 5, 96), (17, 1000), (2, 3, 9000)])
def test_activation_fake_quant_is_bit_exact(dtype, kind, shape):
    x = nasty_rows(shape, dtype)
    spec = R.ActQuant(kind)
    y = K.fake_quant_act(x, spec)
    assert same(y, R.act_ref(x, spec))
    # in place on a strided view's rows
    buf = x.clone()
    K.fake_quant_act(buf, spec, out=buf)
    assert same(buf, y)


def test_fp8_rounding_covers_the_grid():
    # every e4m3 value and every midpoint between neighbours (ties to even), scaled into one row whose max is 448
    grid = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    grid = grid[torch.isfinite(grid)].unique()
    mids = (grid[1:] + grid[:-1]) / 2
    row = torch.cat([grid, mids, torch.tensor([448.0])])[None]
    y = K.fake_quant_act(row, R.ActQuant("fp8"))
    assert same(y, row.to(torch.float8_e4m3fn).float())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_straight_through_gradients(dtype):
    x = torch.randn(6, 64, dtype=dtype, requires_grad=True)
    g = torch.randn(6, 64, dtype=dtype)
    K.act_fake_quant(x, R.ActQuant()).backward(g)
    assert torch.equal(x.grad, g)
    w = torch.randn(8, 64, dtype=dtype, requires_grad=True)
    gw = torch.randn(8, 64, dtype=dtype)
    y = K.weight_fake_quant(w, WEIGHT_SPECS["int4-g32"], K.WeightCache())
    assert same(y.detach(), R.weight_ref(w.detach(), WEIGHT_SPECS["int4-g32"]))
    y.backward(gw)
    assert torch.equal(w.grad, gw)


def test_weight_cache_follows_the_parameter_version():
    spec = WEIGHT_SPECS["int4-g32"]
    w = torch.nn.Parameter(torch.randn(16, 64, dtype=torch.bfloat16))
    cache = K.WeightCache()
    first = K.weight_fake_quant(w, spec, cache)
    again = K.weight_fake_quant(w, spec, cache)
    assert (cache.misses, cache.hits) == (1, 1) and same(first, again)
    with torch.no_grad():
        w.mul_(1.5)  # what an optimizer step does: in place, version counter moves
    after = K.weight_fake_quant(w, spec, cache)
    assert cache.misses == 2 and same(after, R.weight_ref(w.detach(), spec))
    w.data = torch.randn(16, 64, dtype=torch.bfloat16)  # new storage
    assert same(K.weight_fake_quant(w, spec, cache), R.weight_ref(w.detach(), spec)) and cache.misses == 3


def test_gathered_rows_equal_the_quantized_table():
    spec = R.WeightQuant("int", 8, None)
    table = torch.randn(50, 96, dtype=torch.bfloat16)
    ids = torch.tensor([[3, 3, 49], [0, 7, 21]])
    assert same(K.fake_quant_rows(table[ids], spec), R.weight_ref(table, spec)[ids])


@pytest.mark.skipif(ON_CUDA, reason="simulates CUDA's division in the interpreter; on CUDA every test runs with it")
def test_cuda_scalar_division_semantics(monkeypatch):
    """On CUDA, torch computes ``tensor / number`` as ``tensor * fp32(1 / number)`` (the CPU divides exactly), so
    torchao's scales differ in the last bit between devices; the kernels follow the device they run on. Here the
    kernels' CUDA branch runs in the interpreter against references computed with CUDA's division."""
    weight_plan, row_plan = K._weight_plan, K._row_plan
    monkeypatch.setattr(K, "_weight_plan", lambda *a: weight_plan(*a[:9], True, *a[10:]))
    monkeypatch.setattr(K, "_row_plan", lambda *a: row_plan(*a[:8], True, *a[9:]))
    true_div = torch.Tensor.__truediv__

    def cuda_div(self, other):
        if isinstance(other, (int, float)):
            return (self.float() * K._recip32(float(other))).to(self.dtype)
        return true_div(self, other)

    for dtype in DTYPES:
        w = nasty_weight(24, 256, dtype, 32)
        x = nasty_rows((9, 300), dtype)
        specs = [WEIGHT_SPECS[n] for n in ("int4-g32", "int8-row", "fp8-row", "fp8-int4")]
        acts = [R.ActQuant("int8_asym"), R.ActQuant("fp8")]
        monkeypatch.setattr(torch.Tensor, "__truediv__", cuda_div)
        refs = [R.weight_ref(w, s) for s in specs] + [R.act_ref(x, a) for a in acts]
        monkeypatch.setattr(torch.Tensor, "__truediv__", true_div)
        got = [K.fake_quant_weight(w, s) for s in specs] + [K.fake_quant_act(x, a) for a in acts]
        for g, r in zip(got, refs):
            assert same(g, r)
        if dtype == torch.float32:  # the two semantics do differ (in the scales' last bit): the test can tell
            assert not same(got[-2], R.act_ref(x, acts[0]))
