"""Typed, validated quantization settings.

`QuantArgs` describes how one tensor is fake-quantized: number format (`dtype`), bit width,
grouping and zero point. Every field is checked in `__post_init__`; an invalid combination
raises `ValueError` naming the field and the allowed values. Fields left as `None` are
resolved to the format's natural default, so two spellings of the same setting compare equal.
See docs/formats.md for the exact math of each format.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from wkvaq_quant.formats import available_formats, get_format

__all__ = [
    "FULL_PRECISION_BITS",
    "GRANULARITIES",
    "QuantArgs",
    "TARGETS",
    "ZERO_POINTS",
]

FULL_PRECISION_BITS = 16
"""`bits >= 16` means "no quantization" (P3-LLM / QuaRot convention: quantize iff bits < 16)."""

TARGETS = ("weight", "activation", "query", "key", "value", "prob")
GRANULARITIES = ("per_tensor", "per_channel", "per_token", "per_group", "per_head")
ZERO_POINTS = ("int", "float", "none")

# target -> granularities that make sense for it (see docs/formats.md, "Granularity").
_GRANULARITY_BY_TARGET: dict[str, tuple[str, ...]] = {
    "weight": ("per_tensor", "per_channel", "per_group"),
    "activation": ("per_tensor", "per_token", "per_channel"),
    "query": ("per_tensor", "per_token", "per_channel", "per_head"),
    "key": ("per_tensor", "per_token", "per_channel", "per_head"),
    "value": ("per_tensor", "per_token", "per_channel", "per_head"),
    "prob": ("per_tensor", "per_token"),
}


def _fmt_allowed(values: Any) -> str:
    return ", ".join(repr(v) for v in values)


def _err(field: str, value: Any, why: str, allowed: Any) -> ValueError:
    return ValueError(f"QuantArgs.{field}={value!r}: {why}; allowed: {allowed}")


@dataclass(frozen=True)
class QuantArgs:
    """How to fake-quantize one tensor.

    bits:        1..32; >= 16 is full precision (identity). Each format accepts its own widths.
    dtype:       number format name from the registry ("int", "fp8_e4m3", "fp4_e2m1",
                 "bitmod", "ufloat").
    group_size:  -1 = the whole row (or the whole token axis for per-channel activations);
                 otherwise elements per group. A last group shorter than group_size is allowed.
    symmetric:   int only: amax scale and no zero point (True) or min/max with zero point.
                 Other formats are symmetric by construction. None = format default.
    granularity: per_tensor | per_channel | per_token | per_group | per_head (per target).
                 None = per_channel/per_group for weights, per_token otherwise,
                 per_tensor for formats without a scale.
    zero_point:  "int" (AWQ/GPTQ integer zero point) | "float" (KIVI: the group minimum)
                 | "none" (symmetric formats). None = "int" for asymmetric int, else "none".
    target:      weight | activation | query | key | value | prob (used for validation and
                 for the meaning of per_channel).
    double_quant: quantize per-group weight scales to UINT8 per output row (s2 = max/255).
    """

    bits: int = FULL_PRECISION_BITS
    dtype: str = "int"
    group_size: int = -1
    symmetric: bool | None = None
    granularity: str | None = None
    zero_point: str | None = None
    target: str = "weight"
    double_quant: bool = False

    def __post_init__(self) -> None:
        self._check_types()
        if self.target not in TARGETS:
            raise _err("target", self.target, "unknown tensor kind", _fmt_allowed(TARGETS))
        if self.dtype not in available_formats():
            raise _err("dtype", self.dtype, "unknown number format", _fmt_allowed(available_formats()))
        fmt = get_format(self.dtype)
        if not 1 <= self.bits <= 32:
            raise _err("bits", self.bits, "out of range", "1..32 (>= 16 means full precision)")
        if self.bits < FULL_PRECISION_BITS and self.bits not in fmt.bits:
            raise _err(
                "bits", self.bits, f"not supported by dtype={self.dtype!r}",
                f"{_fmt_allowed(fmt.bits)}, or >= {FULL_PRECISION_BITS} (off)",
            )
        if self.group_size == 0 or self.group_size < -1:
            raise _err("group_size", self.group_size, "invalid group size", "-1 (whole row) or a positive integer")

        symmetric = self._resolve_symmetric(fmt)
        zero_point = self._resolve_zero_point(fmt, symmetric)
        granularity = self._resolve_granularity(fmt)
        object.__setattr__(self, "symmetric", symmetric)
        object.__setattr__(self, "zero_point", zero_point)
        object.__setattr__(self, "granularity", granularity)

        if self.dtype == "int" and symmetric and self.enabled and self.bits < 2:
            raise _err("bits", self.bits, "symmetric int needs a sign bit", "2..15 when symmetric=True")
        if self.double_quant:
            if self.target != "weight" or granularity != "per_group" or not fmt.scaled:
                raise _err(
                    "double_quant", True,
                    f"needs per-group weight scales (target={self.target!r}, granularity={granularity!r}, "
                    f"dtype={self.dtype!r})",
                    "True only with target='weight', granularity='per_group' and a scaled format; else False",
                )

    # -- validation helpers -------------------------------------------------------------
    def _check_types(self) -> None:
        for name, typ in (("bits", int), ("group_size", int)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, typ):
                raise _err(name, v, f"must be an int, got {type(v).__name__}", "an integer")
        for name in ("dtype", "target"):
            v = getattr(self, name)
            if not isinstance(v, str):
                raise _err(name, v, f"must be a str, got {type(v).__name__}", "a string")
        for name in ("symmetric",):
            v = getattr(self, name)
            if v is not None and not isinstance(v, bool):
                raise _err(name, v, f"must be a bool or None, got {type(v).__name__}", "True, False, None")
        if not isinstance(self.double_quant, bool):
            raise _err("double_quant", self.double_quant, "must be a bool", "True, False")

    def _resolve_symmetric(self, fmt: Any) -> bool:
        if self.symmetric is None:
            return fmt.default_symmetric
        if self.symmetric not in fmt.symmetric_modes:
            raise _err(
                "symmetric", self.symmetric, f"not supported by dtype={self.dtype!r}",
                _fmt_allowed(fmt.symmetric_modes),
            )
        return self.symmetric

    def _resolve_zero_point(self, fmt: Any, symmetric: bool) -> str:
        has_zero = self.dtype == "int" and not symmetric
        allowed = ("int", "float") if has_zero else ("none",)
        if self.zero_point is None:
            return allowed[0]
        if self.zero_point not in ZERO_POINTS:
            raise _err("zero_point", self.zero_point, "unknown zero-point kind", _fmt_allowed(ZERO_POINTS))
        if self.zero_point not in allowed:
            why = (
                "asymmetric int needs a zero point" if has_zero
                else f"dtype={self.dtype!r} with symmetric={symmetric} has no zero point"
            )
            raise _err("zero_point", self.zero_point, why, _fmt_allowed(allowed))
        return self.zero_point

    def _resolve_granularity(self, fmt: Any) -> str:
        g = self.granularity
        if not fmt.scaled:
            if g not in (None, "per_tensor") or self.group_size != -1:
                field, value = ("granularity", g) if g not in (None, "per_tensor") else ("group_size", self.group_size)
                raise _err(field, value, f"dtype={self.dtype!r} has no scale, so no grouping",
                           "granularity='per_tensor' (or None) with group_size=-1")
            return "per_tensor"
        if g is None:
            if self.target == "weight":
                return "per_channel" if self.group_size == -1 else "per_group"
            return "per_token"
        if g not in GRANULARITIES:
            raise _err("granularity", g, "unknown granularity", _fmt_allowed(GRANULARITIES))
        allowed = _GRANULARITY_BY_TARGET[self.target]
        if g not in allowed:
            raise _err("granularity", g, f"not valid for target={self.target!r}", _fmt_allowed(allowed))
        if g == "per_group" and self.group_size == -1:
            raise _err("group_size", -1, "granularity='per_group' needs a group size", "a positive integer")
        if g in ("per_tensor",) and self.group_size != -1:
            raise _err("group_size", self.group_size, "granularity='per_tensor' has one group", "-1")
        if g == "per_channel" and self.target == "weight" and self.group_size != -1:
            raise _err("group_size", self.group_size,
                       "weight per_channel has one group per output row (use granularity='per_group')", "-1")
        return g

    # -- convenience --------------------------------------------------------------------
    @property
    def enabled(self) -> bool:
        """False when `bits >= 16`: fake_quantize is then the identity."""
        return self.bits < FULL_PRECISION_BITS

    def replace(self, **changes: Any) -> QuantArgs:
        """A validated copy with some fields changed (resolved defaults are re-derived)."""
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        for key in ("symmetric", "zero_point", "granularity"):
            if key not in changes:
                fields[key] = None if self._is_default(key) else fields[key]
        fields.update(changes)
        return QuantArgs(**fields)

    def _is_default(self, key: str) -> bool:
        fresh = QuantArgs(bits=self.bits, dtype=self.dtype, group_size=self.group_size,
                          target=self.target, double_quant=False)
        return getattr(fresh, key) == getattr(self, key)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
