"""Fake-quantization math in plain PyTorch: the reference every faster path is checked against.

These reproduce torchao's grids bit for bit (``quantize_affine`` multiplies by ``1 / scale`` and rounds half
to even), so a model that uses them computes exactly what the converted torchao model computes.
"""

from __future__ import annotations

import torch

_EPS32 = torch.finfo(torch.float32).eps


def int8_per_token_asym(x: torch.Tensor) -> torch.Tensor:
    """Dynamic int8 asymmetric per-token quantize-dequantize (ExecuTorch 8da4w activations)."""
    xf = x.float()
    mn = xf.amin(-1, keepdim=True).clamp(max=0)
    mx = xf.amax(-1, keepdim=True).clamp(min=0)
    scale = ((mx - mn) / 255.0).clamp(min=_EPS32)
    zp = torch.clamp(-128 - torch.round(mn / scale), -128, 127)
    q = torch.clamp(torch.round(xf * (1.0 / scale)) + zp, -128, 127)
    return ((q - zp) * scale).to(x.dtype)


def intx_per_group_sym(w: torch.Tensor, bits: int, group_size: int | None) -> torch.Tensor:
    """Symmetric per-group (or per-row when ``group_size`` is None) weight quantize-dequantize."""
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    gs = group_size or w.shape[-1]
    g = w.float().reshape(w.shape[0], -1, gs)
    scale = (g.abs().amax(-1, keepdim=True) / ((qmax - qmin) / 2)).clamp(min=torch.finfo(torch.float32).smallest_normal)
    q = torch.clamp(torch.round(g * (1.0 / scale)), qmin, qmax)
    return (q * scale).reshape(w.shape).to(w.dtype)
