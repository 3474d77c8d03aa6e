"""Number formats behind `fake_quantize`, registered by name.

    int       uniform integer, asymmetric (int or float zero point) or symmetric
    fp8_e4m3  OCP FP8 E4M3, scaled so the group's amax maps to 448
    fp4_e2m1  FP4 E2M1, scaled so the group's amax maps to 6
    bitmod    BitMoD 3/4-bit: best of four special-value grids per group
    ufloat    unsigned minifloats for attention probabilities (8: E4M4, 12: E5M7)

Add a format by subclassing `NumberFormat` and decorating it with `@register_format(name)`.
"""

from wkvaq_quant.formats.registry import NumberFormat, QParams, Scratch, available_formats, get_format, register_format

# Importing the modules registers their formats.
from wkvaq_quant.formats import bitmod, floating, integer, prob  # noqa: E402,F401  isort: skip
from wkvaq_quant.formats.bitmod import BITMOD_GRIDS, bitmod_grid
from wkvaq_quant.formats.floating import FP4_E2M1_VALUES, round_fp4_e2m1_, round_fp8_e4m3_
from wkvaq_quant.formats.prob import UFLOAT_SPECS, round_ufloat_
from wkvaq_quant.formats.scale import SCALE_FLOOR, double_quantize_scales

__all__ = [
    "BITMOD_GRIDS",
    "FP4_E2M1_VALUES",
    "SCALE_FLOOR",
    "UFLOAT_SPECS",
    "NumberFormat",
    "QParams",
    "Scratch",
    "available_formats",
    "bitmod_grid",
    "double_quantize_scales",
    "get_format",
    "register_format",
    "round_fp4_e2m1_",
    "round_fp8_e4m3_",
    "round_ufloat_",
]
