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

from wkvaq_quant.arch import linear_names
from wkvaq_quant.formats import available_formats, get_format

__all__ = [
    "A_DTYPES",
    "FULL_PRECISION_BITS",
    "FieldError",
    "GRANULARITIES",
    "KV_METHODS",
    "RESIDUAL_MODES",
    "KVArgs",
    "LINEAR_NAMES",
    "QuantArgs",
    "TARGETS",
    "W_DTYPES",
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


class FieldError(ValueError):
    """A bad value of one field of a settings dataclass. `field` is its dotted path inside the
    object that raised it ("group_size" in QuantArgs, "w.group_size" in a QuantPlan, "residual_len"
    in KVArgs); a front end names its own flag with `for_flags(FLAGS)`, the core never does."""

    def __init__(self, owner: str, field: str, value: Any, why: str, allowed: Any) -> None:
        self.owner, self.field, self.value, self.why, self.allowed = owner, field, value, why, allowed
        super().__init__(f"{owner}.{field}={value!r}: {why}; allowed: {allowed}")

    def within(self, owner: str, prefix: str) -> FieldError:
        """The same error as a field of an enclosing object (`QuantPlan.w` holding a QuantArgs)."""
        return FieldError(owner, f"{prefix}.{self.field}", self.value, self.why, self.allowed)

    def for_flags(self, flags: dict[str, str]) -> ValueError:
        """A one-line error naming the front end's flag for this field (field path -> flag), or the
        field itself when no flag sets it."""
        flag = flags.get(self.field)
        if flag is None:
            return ValueError(str(self))
        value = self.value if not isinstance(self.value, str) else repr(self.value)
        return ValueError(f"{flag} {value}: {self.why}; allowed: {self.allowed}")


def _err(field: str, value: Any, why: str, allowed: Any) -> FieldError:
    return FieldError("QuantArgs", field, value, why, allowed)


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
        if not 1 <= self.bits <= FULL_PRECISION_BITS:
            raise _err("bits", self.bits, "out of range", f"1..{FULL_PRECISION_BITS} ({FULL_PRECISION_BITS} = full precision)")
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


# ---------------------------------------------------------------------------------------
# A whole-model plan: W / A / Q / K / V / P settings plus the KV-cache options (P3-LLM flags)
# ---------------------------------------------------------------------------------------

KV_METHODS = ("KTVT", "KCVT")
RESIDUAL_MODES = ("last", "per_query")
"""last: the last R positions of the sequence stay full precision for every query (P3-LLM, one
forward). per_query: every query sees its own R most recent tokens in full precision (what a
decoder with a full-precision residual buffer computes)."""
"""KTVT: K and V per token. KCVT: K per channel over groups of tokens (KIVI), V per token."""
W_DTYPES = ("int", "bitmod", "fp4_e2m1")
LINEAR_NAMES = linear_names()
"""Short names of the decoder Linears that per-layer settings address (every registered family's)."""
A_DTYPES = ("fp8_e4m3", "int")


def _kv_err(field: str, value: Any, why: str, allowed: str) -> FieldError:
    return FieldError("KVArgs", field, value, why, allowed)


@dataclass(frozen=True)
class KVArgs:
    """KV-cache options that are not per-tensor number formats.

    method:       "KTVT" | "KCVT" (--kv_quant_method).
    residual_len: newest tokens of K and V kept in full precision (--kv_residual_len); in one
                  forward pass these are the last `residual_len` positions of the sequence.
    residual_mode: "last" (P3-LLM) | "per_query" (--kv_residual_mode); see RESIDUAL_MODES.
    k_scale:      divide keys by s_c = max over the prompt's tokens of |K| per channel before
                  quantizing, compensated exactly (--apply_k_scale).
    k_bias:       subtract the per-channel mean of K before quantizing, added back (--apply_k_bias).
    k_post_rope:  quantize keys after RoPE (--k_quant_post_rope); default before RoPE.
    post_attn:    the prompt attends with full-precision K and V; only the cache that later
                  tokens read is quantized (--kv_quant_post_attn). Needs post-RoPE keys.
    fold_v_scale: with quantized P and V, fold V's per-token scale into P before P's
                  quantization, as the integer-V datapath does: out = Q(P * s_v) . V_int
                  (--no_fold_v_scale turns it off: out = Q(P) . V_hat).
    """

    method: str = "KTVT"
    residual_len: int = 0
    residual_mode: str = "last"
    k_scale: bool = False
    k_bias: bool = False
    k_post_rope: bool = False
    post_attn: bool = False
    fold_v_scale: bool = True

    def __post_init__(self) -> None:
        if self.method not in KV_METHODS:
            raise _kv_err("method", self.method, "unknown KV quantization method", _fmt_allowed(KV_METHODS))
        if self.residual_mode not in RESIDUAL_MODES:
            raise _kv_err("residual_mode", self.residual_mode, "unknown residual mode", _fmt_allowed(RESIDUAL_MODES))
        if isinstance(self.residual_len, bool) or not isinstance(self.residual_len, int) or self.residual_len < 0:
            raise _kv_err("residual_len", self.residual_len, "must be a token count", "an integer >= 0")
        for name in ("k_scale", "k_bias", "k_post_rope", "post_attn", "fold_v_scale"):
            if not isinstance(getattr(self, name), bool):
                raise _kv_err(name, getattr(self, name), "must be a bool", "True, False")

    @property
    def per_query_residual(self) -> bool:
        """True when each query keeps its own newest `residual_len` tokens in full precision."""
        return self.residual_mode == "per_query" and self.residual_len > 0
