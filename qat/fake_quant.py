"""torchao's fake-quant configs as edgeft's grid specs, and the PyTorch reference grids under their public names.

:func:`specs_from_configs` translates torchao's ``FakeQuantizeConfig`` objects into the small frozen specs
(:class:`WeightQuant`, :class:`ActQuant`) that the references and the fused kernels compile, and refuses (ValueError)
what edgeft does not simulate. The references themselves live beside their kernels (``edgeft.kernels.fake_quant``,
``edgeft.kernels.learned_scale``: kernels/ imports nothing of edgeft) and are re-exported here; they equal torchao's
fake quantizers bit for bit in fp32, bf16 and fp16 (tests/qat/test_fake_quant_reference.py). What they rely on, the
two deliberate departures from torchao and the merged LoRA weight's order: docs/qat.md.
"""

from __future__ import annotations

from typing import Any

import torch

from edgeft.kernels.fake_quant import (
    FP8_MAX,
    MSE_RATIOS,
    ActQuant,
    WeightQuant,
    act_ref,
    fp8_rows_ref,
    int8_asym_ref,
    int8_per_token_asym,
    int_weight_ref,
    intx_per_group_sym,
    merge_lora_weight,
    ste,
    weight_ref,
)
from edgeft.kernels.learned_scale import (
    LearnedScaleFakeQuant,
    initial_scale,
    learned_fake_quant,
    learned_log_scale_grad,
    learned_scale,
    learned_weight_ref,
)

__all__ = [
    "FP8_MAX",
    "MSE_RATIOS",
    "ActQuant",
    "LearnedScaleFakeQuant",
    "WeightQuant",
    "act_ref",
    "act_spec",
    "fp8_rows_ref",
    "initial_scale",
    "int8_asym_ref",
    "int8_per_token_asym",
    "int_weight_ref",
    "intx_per_group_sym",
    "learned_fake_quant",
    "learned_log_scale_grad",
    "learned_scale",
    "learned_weight_ref",
    "merge_lora_weight",
    "specs_from_configs",
    "ste",
    "weight_ref",
    "weight_spec",
]


def specs_from_configs(act_cfg: Any, weight_cfg: Any) -> tuple[ActQuant | None, WeightQuant]:
    """Translate torchao's fake-quant configs into specs; raises ValueError for what edgeft does not simulate."""
    return (act_spec(act_cfg) if act_cfg is not None else None), weight_spec(weight_cfg)


def weight_spec(cfg: Any) -> WeightQuant:
    from torchao.quantization.granularity import PerAxis, PerGroup, PerRow
    from torchao.quantization.qat.fake_quantize_config import (
        Float8FakeQuantizeConfig,
        Int4WeightFakeQuantizeConfig,
        IntxFakeQuantizeConfig,
    )
    from torchao.quantization.quant_primitives import _DTYPE_TO_BIT_WIDTH, MappingType, ZeroPointDomain

    if isinstance(cfg, IntxFakeQuantizeConfig):
        if cfg.mapping_type != MappingType.SYMMETRIC or cfg.range_learning or not cfg.is_dynamic:
            raise ValueError(f"unsupported weight fake-quant config {cfg}: symmetric dynamic grids only")
        if cfg.zero_point_domain != ZeroPointDomain.INT:
            raise ValueError(f"unsupported zero-point domain in {cfg}")
        gran = cfg.granularity
        if isinstance(gran, PerGroup):
            gs = gran.group_size
        elif isinstance(gran, PerAxis) and gran.axis == 0:
            gs = None
        else:
            raise ValueError(f"unsupported weight granularity {gran}")
        return WeightQuant("int", _DTYPE_TO_BIT_WIDTH[cfg.dtype], gs, None, cfg.eps, cfg.scale_precision)
    if isinstance(cfg, Float8FakeQuantizeConfig):
        if cfg.dtype != torch.float8_e4m3fn or not isinstance(cfg.granularity, PerRow) or cfg.hp_value_ub is not None:
            raise ValueError(f"unsupported fp8 weight config {cfg}: e4m3 per row only")
        return WeightQuant("fp8", 8, None, lb=cfg.hp_value_lb)
    if isinstance(cfg, Int4WeightFakeQuantizeConfig):
        if cfg.activation_dtype != torch.float8_e4m3fn:
            raise ValueError(f"unsupported int4 weight config {cfg}: fp8 activations only")
        return WeightQuant("fp8_int4", 4, cfg.group_size, divisor=8.0, eps=1e-6, lb=1e-12)
    raise ValueError(f"unsupported weight fake-quant config {type(cfg).__name__}")


def act_spec(cfg: Any) -> ActQuant:
    from torchao.quantization.granularity import PerRow, PerToken
    from torchao.quantization.qat.fake_quantize_config import Float8FakeQuantizeConfig, IntxFakeQuantizeConfig
    from torchao.quantization.quant_primitives import MappingType, ZeroPointDomain

    if isinstance(cfg, IntxFakeQuantizeConfig):
        ok = (
            cfg.dtype == torch.int8
            and isinstance(cfg.granularity, PerToken)
            and cfg.mapping_type == MappingType.ASYMMETRIC
            and cfg.is_dynamic
            and not cfg.range_learning
            and cfg.zero_point_domain == ZeroPointDomain.INT
        )
        if not ok:
            raise ValueError(f"unsupported activation fake-quant config {cfg}: int8 asymmetric per token only")
        return ActQuant("int8_asym", cfg.eps, cfg.scale_precision)
    if isinstance(cfg, Float8FakeQuantizeConfig):
        if cfg.dtype != torch.float8_e4m3fn or not isinstance(cfg.granularity, PerRow):
            raise ValueError(f"unsupported fp8 activation config {cfg}: e4m3 per row only")
        return ActQuant("fp8", lb=cfg.hp_value_lb, ub=cfg.hp_value_ub)
    raise ValueError(f"unsupported activation fake-quant config {type(cfg).__name__}")
