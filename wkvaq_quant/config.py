"""Typed, validated quantization settings.

`QuantArgs` describes how one tensor is fake-quantized: number format (`dtype`), bit width,
grouping and zero point. Every field is checked in `__post_init__`; an invalid combination
raises `ValueError` naming the field and the allowed values. Fields left as `None` are
resolved to the format's natural default, so two spellings of the same setting compare equal.
See docs/formats.md for the exact math of each format.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from wkvaq_quant.arch import linear_names
from wkvaq_quant.formats import available_formats, get_format

if TYPE_CHECKING:
    from wkvaq_quant.mix_bits import LayerMap

__all__ = [
    "A_DTYPES",
    "FULL_PRECISION_BITS",
    "GRANULARITIES",
    "KV_METHODS",
    "RESIDUAL_MODES",
    "KVArgs",
    "LINEAR_NAMES",
    "QuantArgs",
    "QuantPlan",
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


def _flag_err(flag: str, value: Any, why: str, allowed: str) -> ValueError:
    return ValueError(f"{flag} {value}: {why}; allowed: {allowed}")


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
            raise _flag_err("--kv_quant_method", self.method, "unknown KV quantization method", _fmt_allowed(KV_METHODS))
        if self.residual_mode not in RESIDUAL_MODES:
            raise _flag_err("--kv_residual_mode", self.residual_mode, "unknown residual mode",
                            _fmt_allowed(RESIDUAL_MODES))
        if isinstance(self.residual_len, bool) or not isinstance(self.residual_len, int) or self.residual_len < 0:
            raise _flag_err("--kv_residual_len", self.residual_len, "must be a token count", "an integer >= 0")
        for flag, v in (("--apply_k_scale", self.k_scale), ("--apply_k_bias", self.k_bias),
                        ("--k_quant_post_rope", self.k_post_rope), ("--kv_quant_post_attn", self.post_attn),
                        ("--no_fold_v_scale", self.fold_v_scale)):
            if not isinstance(v, bool):
                raise _flag_err(flag, v, "must be a bool", "True, False")

    @property
    def per_query_residual(self) -> bool:
        """True when each query keeps its own newest `residual_len` tokens in full precision."""
        return self.residual_mode == "per_query" and self.residual_len > 0


def _off(target: str, dtype: str = "int", **kw: Any) -> QuantArgs:
    return QuantArgs(bits=FULL_PRECISION_BITS, dtype=dtype, target=target, **kw)


_W_OFF, _A_OFF = _off("weight"), _off("activation", "fp8_e4m3")


@dataclass(frozen=True)
class QuantPlan:
    """Everything `modeling.attach` applies to a model.

    w: decoder Linear weights (RTN once at attach), per output row or per group.
    a: inputs of q/k/v/o_proj and gate/up/down_proj, per token (or per group of channels).
    q: queries after RoPE, per (token, head), groups over head_dim.
    k: keys: KTVT per token, groups over the flattened heads*head_dim; KCVT per channel,
       groups of `group_size` tokens, float zero point.
    v: values per token, groups over the flattened heads*head_dim.
    p: attention probabilities after softmax (ufloat).
    kv: KV-cache options (method, residual, k-scale, k-bias, pre/post-RoPE keys).
    layers: per-layer settings (an llmc `mix_bits` map, see mix_bits.py) refining w / a per
       (block, Linear) and k / v bits per block; None: the same settings everywhere.

    Build it from P3-LLM's flags with `QuantPlan.from_flags(...)`.
    """

    w: QuantArgs = _W_OFF
    a: QuantArgs = _A_OFF
    q: QuantArgs = field(default_factory=lambda: _off("query", "fp8_e4m3"))
    k: QuantArgs = field(default_factory=lambda: _off("key", zero_point="float"))
    v: QuantArgs = field(default_factory=lambda: _off("value", zero_point="float"))
    p: QuantArgs = field(default_factory=lambda: _off("prob", "ufloat"))
    kv: KVArgs = field(default_factory=KVArgs)
    layers: LayerMap | None = None

    def __post_init__(self) -> None:
        from wkvaq_quant.mix_bits import LayerMap  # mix_bits builds on this module

        if self.layers is not None and not isinstance(self.layers, LayerMap):
            raise ValueError(f"QuantPlan.layers must be a LayerMap or None, got {type(self.layers).__name__}")
        for name, target in (("w", "weight"), ("a", "activation"), ("q", "query"), ("k", "key"),
                             ("v", "value"), ("p", "prob")):
            args = getattr(self, name)
            if not isinstance(args, QuantArgs) or args.target != target:
                raise ValueError(f"QuantPlan.{name} must be QuantArgs(target={target!r}, ...), got {args!r}")
        if not isinstance(self.kv, KVArgs):
            raise ValueError(f"QuantPlan.kv must be KVArgs, got {self.kv!r}")
        w, a, q, k, v, p, kv = self.w, self.a, self.q, self.k, self.v, self.p, self.kv
        if w.enabled and w.dtype not in W_DTYPES:
            raise _flag_err("--w_dtype", w.dtype, "not a weight format", _fmt_allowed(W_DTYPES))
        if a.enabled and a.dtype not in A_DTYPES:
            raise _flag_err("--a_dtype", a.dtype, "not an activation format", _fmt_allowed(A_DTYPES))
        if a.enabled and a.granularity != "per_token":
            raise _flag_err("--a_group_size", a.group_size, f"activations are quantized per token, got "
                            f"granularity={a.granularity!r}", "per_token QuantArgs")
        if q.enabled and (q.dtype != "fp8_e4m3" or q.granularity != "per_token"):
            raise _flag_err("--q_bits", q.bits, f"queries are FP8 E4M3 per (token, head), got dtype={q.dtype!r}, "
                            f"granularity={q.granularity!r}", "8 (fp8_e4m3, per_token) or 16 (off)")
        for flag, args in (("--k_bits", k), ("--v_bits", v)):
            if args.enabled and (args.dtype != "int" or args.symmetric):
                raise _flag_err(flag, args.bits, f"the KV cache is asymmetric INT, got dtype={args.dtype!r}, "
                                f"symmetric={args.symmetric}", "1..15 (asymmetric int) or 16 (off)")
        if v.enabled and v.granularity != "per_token":
            raise _flag_err("--v_group_size", v.group_size, "values are quantized per token", "per_token QuantArgs")
        if p.enabled and p.dtype != "ufloat":
            raise _flag_err("--p_bits", p.bits, f"probabilities use the unsigned ufloat formats, got {p.dtype!r}",
                            "8, 12 or 16 (off)")
        if kv.post_attn and not kv.k_post_rope and (k.enabled or kv.k_scale or kv.k_bias):
            raise ValueError("--kv_quant_post_attn needs --k_quant_post_rope: keys quantized before RoPE enter the "
                             "cache already quantized, so the prompt could not attend in full precision; allowed: "
                             "--kv_quant_post_attn --k_quant_post_rope")
        if kv.per_query_residual and not kv.k_post_rope and (k.enabled or kv.k_scale or kv.k_bias):
            raise ValueError("--kv_residual_mode per_query needs --k_quant_post_rope: each query needs both the "
                             "quantized and the full-precision key of a token after RoPE; allowed: "
                             "--kv_residual_mode per_query --k_quant_post_rope, or --kv_residual_mode last")
        want_k = "per_channel" if kv.method == "KCVT" else "per_token"
        if k.enabled and k.granularity != want_k:
            raise _flag_err("--kv_quant_method", kv.method, f"keys must be {want_k}, got {k.granularity!r}",
                            f"QuantArgs(granularity={want_k!r}) for the keys")
        if kv.method == "KCVT":
            if kv.k_scale or kv.k_bias:
                flag = "--apply_k_scale" if kv.k_scale else "--apply_k_bias"
                raise ValueError(f"{flag} cannot be combined with --kv_quant_method KCVT: per-channel keys already "
                                 f"have a scale and zero point per channel; allowed: --kv_quant_method KTVT with "
                                 f"{flag}, or KCVT without it")
            if kv.residual_len and k.group_size != -1 and kv.residual_len % k.group_size:
                raise ValueError(f"--kv_residual_len {kv.residual_len} with --kv_quant_method KCVT must be a multiple "
                                 f"of --k_group_size {k.group_size} (keys are grouped along tokens); allowed: "
                                 f"0, {k.group_size}, {2 * k.group_size}, ...")
            if kv.residual_len and k.group_size == -1:
                raise ValueError(f"--kv_residual_len {kv.residual_len} with --kv_quant_method KCVT needs a token "
                                 f"group (--k_group_size > 0) that divides it; allowed: --k_group_size 32, 64, 128, ...")

        if self.layers is not None and self.layers.has_kv:
            for block in self.layers.blocks_named():
                k_set, v_set = self.layers.kv_settings(block)
                if k_set is None and v_set is None:
                    continue
                try:
                    self.block_plan(block)
                except ValueError as err:
                    names = " / ".join(sorted({s.name for s in (k_set, v_set) if s is not None}))
                    raise ValueError(f"mix_bits setting {names!r}: k_bits / v_bits of block "
                                     f"{'(any)' if block < 0 else block}: {err}") from None

    # -- construction from P3-LLM's flags --------------------------------------------------
    @classmethod
    def from_flags(
        cls, *, w_bits: int = 16, a_bits: int = 16, q_bits: int = 16, k_bits: int = 16, v_bits: int = 16,
        p_bits: int = 16, w_group_size: int = -1, a_group_size: int = -1, q_group_size: int = -1,
        k_group_size: int = -1, v_group_size: int = -1, w_dtype: str = "int", a_dtype: str = "fp8_e4m3",
        kv_quant_method: str = "KTVT", kv_residual_len: int = 0, kv_residual_mode: str = "last", apply_k_scale: bool = False,
        apply_k_bias: bool = False, k_quant_post_rope: bool = False, kv_quant_post_attn: bool = False,
        fold_v_scale: bool = True,
    ) -> QuantPlan:
        """A plan from P3-LLM's command-line settings (16 bits = off, group size -1 = whole row)."""
        kv = KVArgs(method=kv_quant_method, residual_len=kv_residual_len, residual_mode=kv_residual_mode, k_scale=apply_k_scale,
                    k_bias=apply_k_bias, k_post_rope=k_quant_post_rope,
                    post_attn=kv_quant_post_attn, fold_v_scale=fold_v_scale)
        if w_dtype not in W_DTYPES:
            raise _flag_err("--w_dtype", repr(w_dtype), "unknown weight format", _fmt_allowed(W_DTYPES))
        if a_dtype not in A_DTYPES:
            raise _flag_err("--a_dtype", repr(a_dtype), "unknown activation format", _fmt_allowed(A_DTYPES))

        def make(flag: str, bits: int, **kw: Any) -> QuantArgs:
            try:
                return QuantArgs(bits=bits, **kw)
            except ValueError as err:
                raise ValueError(f"{flag} {bits}: {err}") from None

        kcvt = kv_quant_method == "KCVT"
        return cls(
            w=make("--w_bits", w_bits, dtype=w_dtype,
                   group_size=w_group_size, target="weight"),
            a=make("--a_bits", a_bits, dtype=a_dtype,
                   group_size=a_group_size, target="activation", symmetric=True if a_dtype == "int" else None),
            q=make("--q_bits", q_bits, dtype="fp8_e4m3", group_size=q_group_size,
                   target="query"),
            k=make("--k_bits", k_bits, dtype="int", group_size=k_group_size, target="key",
                   granularity="per_channel" if kcvt else "per_token", zero_point="float"),
            v=make("--v_bits", v_bits, dtype="int", group_size=v_group_size, target="value",
                   zero_point="float"),
            p=make("--p_bits", p_bits, dtype="ufloat", target="prob"),
            kv=kv,
        )

    # -- per-layer settings ----------------------------------------------------------------
    def linear_args(self, block: int, layer: str) -> tuple[QuantArgs, QuantArgs]:
        """(weight, input activation) settings of decoder Linear `layer` ("q_proj" ... "down_proj")
        in decoder block `block`. Every caller that quantizes a Linear (attach, RTN, GPTQ, AWQ)
        asks here, so per-layer maps act everywhere at once."""
        setting = None if self.layers is None else self.layers.linear_setting(block, layer)
        if setting is None:
            return self.w, self.a
        if not setting.do_quant:
            return _W_OFF, _A_OFF
        return setting.w, setting.a if setting.a is not None else _A_OFF

    def block_plan(self, block: int) -> QuantPlan:
        """The plan the attention of decoder block `block` applies (its Q/K/V/P settings)."""
        if self.layers is None:
            return self
        k_set, v_set = self.layers.kv_settings(block)
        k = self.k if k_set is None else self.k.replace(bits=k_set.k_bits)
        v = self.v if v_set is None else self.v.replace(bits=v_set.v_bits)
        return dataclasses.replace(self, k=k, v=v, layers=None)

    def _attention_plans(self) -> list[QuantPlan]:
        """One plan per distinct attention setting among the blocks (needs a KV map)."""
        return [self.block_plan(b) for b in self.layers.blocks_named()]

    def _quantizes_linears(self) -> bool:
        if self.layers is None:
            return self.w.enabled or self.a.enabled
        return any(x.enabled for block in self.layers.blocks_named() for layer in LINEAR_NAMES
                   for x in self.linear_args(block, layer))

    # -- convenience --------------------------------------------------------------------
    @property
    def needs_eager(self) -> bool:
        """True when the attention must run eagerly (quantized P, per-query residual) in some block."""
        if self.layers is not None and self.layers.has_kv:  # block plans carry no map
            return any(p.needs_eager for p in self._attention_plans())
        return self.p.enabled or (self.kv.per_query_residual and (self.k.enabled or self.v.enabled))

    @property
    def quantizes_attention(self) -> bool:
        """True when anything inside the attention function changes (Q, K, V, P or a K transform)."""
        if self.layers is not None and self.layers.has_kv:  # block plans carry no map
            return any(p.quantizes_attention for p in self._attention_plans())
        return any(x.enabled for x in (self.q, self.k, self.v, self.p)) or self.kv.k_scale or self.kv.k_bias

    @property
    def folds_v_scale(self) -> bool:
        """True when V's per-token scale is folded into P before P's quantization."""
        return self.p.enabled and self.v.enabled and self.kv.fold_v_scale

    @property
    def is_full_precision(self) -> bool:
        """True when attaching changes no number at all."""
        return not (self._quantizes_linears() or self.quantizes_attention)

    def slug(self) -> str:
        """Readable summary of the enabled settings, e.g. `w4g128-a8fp8-q8-k4v4-KTVT-r32-ks`."""
        if self.is_full_precision:
            return "fp"
        w, a, q, k, v, p, kv = self.w, self.a, self.q, self.k, self.v, self.p, self.kv

        def g(args: QuantArgs) -> str:
            return f"g{args.group_size}" if args.group_size != -1 else ""

        parts = []
        if w.enabled:
            parts.append(f"w{w.bits}{g(w)}" + ("" if w.dtype == "int" else w.dtype.replace("_", "")))
        if a.enabled:
            parts.append(f"a{a.bits}{g(a)}" + ("fp8" if a.dtype == "fp8_e4m3" else "int"))
        if q.enabled:
            parts.append(f"q{q.bits}{g(q)}")
        if k.enabled or v.enabled or kv.k_scale or kv.k_bias:
            parts.append(f"k{k.bits}{g(k)}v{v.bits}{g(v)}")
            parts.append(kv.method)
            if kv.residual_len:
                parts.append(f"r{kv.residual_len}" + ("pq" if kv.residual_mode == "per_query" else ""))
            if kv.k_post_rope:
                parts.append("postrope")
            if kv.post_attn:
                parts.append("postattn")
            if kv.k_scale:
                parts.append("kscale")
            if kv.k_bias:
                parts.append("kbias")
        if p.enabled:
            parts.append(f"p{p.bits}" + ("" if kv.fold_v_scale or not v.enabled else "nofold"))
        if self.layers is not None:
            parts.append(f"mix{self.layers.digest()}")
        return "-".join(parts)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(dataclasses.replace(self, layers=None))
        d.pop("layers")  # plans without a map keep their earlier dict (and result slugs)
        if self.layers is not None:
            d["layers"] = self.layers.to_dict()
        return d
