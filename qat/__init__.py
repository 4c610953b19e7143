"""Quantization-aware training: schemes as data, prepare (fake-quant), convert (real quantized tensors), PTQ.

plan = edgeft.qat.resolve("phone-deployment")
edgeft.qat.prepare(model, plan)        # fake-quant: trains on the deployed grid (fused kernels, STE)
model, record = edgeft.qat.convert(model)   # LoRA merged, real torchao tensors, the integers training used
"""

from .convert import check_convertible, convert, load_converted, merge_lora, quantize, save_converted
from .prepare import (
    FakeQuantEmbedding,
    FakeQuantLinear,
    MergedFakeQuantLoraLinear,
    fake_quant_cache_stats,
    is_prepared,
    learned_scales,
    prepare,
    unprepare,
)
from .schemes import PRESETS, SCHEMES, Preset, QATPlan, Scheme, describe, resolve

__all__ = [
    "PRESETS",
    "SCHEMES",
    "Preset",
    "QATPlan",
    "Scheme",
    "describe",
    "resolve",
    "prepare",
    "unprepare",
    "is_prepared",
    "MergedFakeQuantLoraLinear",
    "FakeQuantLinear",
    "FakeQuantEmbedding",
    "fake_quant_cache_stats",
    "learned_scales",
    "convert",
    "quantize",
    "merge_lora",
    "check_convertible",
    "save_converted",
    "load_converted",
]
