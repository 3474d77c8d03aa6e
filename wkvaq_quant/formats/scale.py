"""Scale helpers shared by the scaled formats: the scale floor and UINT8 double quantization."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["SCALE_FLOOR", "DoubleQuantScales", "double_quantize_scales", "floor_scale_"]

SCALE_FLOOR = torch.finfo(torch.float32).tiny
"""Smallest scale ever used (2^-126, the smallest normal fp32). A zero or subnormal scale
(all-zero or denormal group) is raised to it, so x / s and x_hat = q * s stay finite."""


def floor_scale_(s: Tensor) -> Tensor:
    """In place: s = max(s, SCALE_FLOOR)."""
    return s.clamp_min_(SCALE_FLOOR)


class DoubleQuantScales:
    """UINT8 codes of per-group scales with one fp32 scale per row: scale_hat = code * scale2."""

    def __init__(self, scale_hat: Tensor, code: Tensor, scale2: Tensor) -> None:
        self.scale_hat = scale_hat
        self.code = code
        self.scale2 = scale2


def double_quantize_scales(scale: Tensor) -> DoubleQuantScales:
    """Quantize positive scales [rows, n_groups, ...] to UINT8 per row (AWQ --use_double_quant).

    s2 = max(scale over the row) / 255, code = clamp(round(scale / s2), 1, 255),
    scale_hat = code * s2. Codes start at 1, so no scale becomes 0.
    """
    flat = scale.reshape(scale.shape[0], -1)
    s2 = floor_scale_(flat.amax(dim=1, keepdim=True) / 255.0)
    code = torch.round(flat / s2).clamp_(1.0, 255.0)
    scale_hat = (code * s2).reshape(scale.shape)
    return DoubleQuantScales(scale_hat, code.to(torch.uint8).reshape(scale.shape), s2)
