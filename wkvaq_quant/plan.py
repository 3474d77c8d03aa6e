"""The plan: what `modeling.attach` applies to a model (`QuantPlan`), and its per-layer data
model (`LayerMap`: ordered `MixSetting`s addressed by `LayerTarget`s, the last match winning).

This module knows nothing about YAML: `mix_bits` parses llmc's `quant:` section into a `LayerMap`,
`cli` builds a `QuantPlan` from flags. Dependencies point one way: config <- plan <- mix_bits.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from wkvaq_quant.config import (A_DTYPES, FULL_PRECISION_BITS, LINEAR_NAMES, W_DTYPES, FieldError, KVArgs, QuantArgs,
                                _fmt_allowed)

__all__ = ["FLAGS", "GENERIC_BLOCK", "KV_ZERO_POINTS", "LayerMap", "LayerTarget", "MixSetting", "QuantPlan", "structure_error"]

FLAGS: dict[str, str] = {
    "w.bits": "--w_bits", "w.group_size": "--w_group_size", "w.dtype": "--w_dtype",
    "a.bits": "--a_bits", "a.group_size": "--a_group_size", "a.dtype": "--a_dtype",
    "q.bits": "--q_bits", "q.group_size": "--q_group_size", "k.bits": "--k_bits", "k.group_size": "--k_group_size",
    "v.bits": "--v_bits", "v.group_size": "--v_group_size", "p.bits": "--p_bits",
    "kv.method": "--kv_quant_method", "kv.residual_len": "--kv_residual_len", "kv.residual_mode": "--kv_residual_mode",
    "kv.k_scale": "--apply_k_scale", "kv.k_bias": "--apply_k_bias", "kv.k_post_rope": "--k_quant_post_rope",
    "kv.post_attn": "--kv_quant_post_attn", "kv.fold_v_scale": "--no_fold_v_scale",
    "k.zero_point": "--kv_zero_point", "v.zero_point": "--kv_zero_point",
}
ATTENTION_RULES = 2
"""Version of what a plan computes inside attention, raised whenever that changes for the same
settings (2: residual tokens keep the query and P in full precision, k-scale with k-bias is
P3-LLM's max |K - mu| ** 0.6); recorded, and hashed into result names, for plans that quantize
the attention."""
KV_ZERO_POINTS = ("int", "float")
"""--kv_zero_point: "int" (P3-LLM: z = clamp(round(-min / s), 0, 2^b - 1), codes shifted by z) or
"float" (KIVI: the group minimum itself). KCVT's per-channel keys always use the float one."""
"""QuantPlan field path -> the P3-LLM flag that sets it (what `from_flags` names in its errors;
awq.entry passes its own spellings)."""

GENERIC_BLOCK = -1
"""Stands for "a block that no `#` list names" when asking the map (`LayerMap.blocks_named`)."""


def _plan_err(field: str, value: Any, why: str, allowed: str) -> FieldError:
    return FieldError("QuantPlan", field, value, why, allowed)


def _allowed(values: Any) -> str:
    return ", ".join(repr(v) for v in values)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


@dataclass(frozen=True)
class LayerTarget:
    """One `layer_name` entry: `down_proj#13-21` is down_proj in blocks 13 and 21 (a list, not a
    range); no `#` (blocks=None) means every block."""

    layer: str
    blocks: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.layer not in LINEAR_NAMES:
            raise ValueError(f"unknown layer name {self.layer!r}; allowed: {_allowed(LINEAR_NAMES)}")
        if self.blocks is not None:
            if not self.blocks or not all(_is_int(b) and b >= 0 for b in self.blocks):
                raise ValueError(f"block indices {self.blocks!r} must be a non-empty list of integers >= 0")
            if len(set(self.blocks)) != len(self.blocks):
                raise ValueError(f"block indices {self.blocks!r} repeat a block")

    @classmethod
    def parse(cls, text: Any) -> LayerTarget:
        if not isinstance(text, str):
            raise ValueError(f"entry {text!r} must be a string like 'down_proj' or 'down_proj#0-1-31'")
        name, sep, rest = text.partition("#")
        if not sep:
            return cls(name)
        parts = rest.split("-")
        if not all(p.isdigit() for p in parts):
            raise ValueError(f"entry {text!r}: after '#' come block indices joined by '-', e.g. 'down_proj#0-1-31'")
        return cls(name, tuple(int(p) for p in parts))

    def matches(self, block: int, layer: str | None = None) -> bool:
        """True when this entry names `layer` (any layer when None) in `block`."""
        return (layer is None or layer == self.layer) and (self.blocks is None or block in self.blocks)

    def text(self) -> str:
        return self.layer if self.blocks is None else f"{self.layer}#" + "-".join(map(str, self.blocks))


def structure_error(do_quant: bool, has_w: bool, has_a: bool, k_bits: Any, v_bits: Any) -> str | None:
    """What is wrong with the shape of a setting (None when nothing)."""
    if not do_quant:
        given = [k for k, v in (("weight", has_w), ("act", has_a), ("k_bits", k_bits is not None),
                                ("v_bits", v_bits is not None)) if v]
        if given:
            return (f"do_quant: False keeps its layers in full precision, so it cannot also set {', '.join(given)}; "
                    f"allowed: do_quant: False alone, or do_quant: True with bit settings")
        return None
    if has_a and not has_w:
        return "an 'act' section needs a 'weight' section in the same setting"
    if not has_w and k_bits is None and v_bits is None:
        return "sets nothing; give weight (and act), k_bits / v_bits, or do_quant: False"
    return None


@dataclass(frozen=True)
class MixSetting:
    """One `mix_bits` setting, resolved.

    targets:  the layers (and blocks) it applies to.
    do_quant: False keeps the named layers' weights and inputs in full precision.
    w, a:     weight / input-activation settings of the named layers; `a=None` with a `w` makes
              them weight-only; both None (a KV-only setting) leaves the layers as they are.
    k_bits, v_bits: KV-cache bits of the attention of the named blocks (16 = full precision).
    """

    name: str
    targets: tuple[LayerTarget, ...]
    do_quant: bool = True
    w: QuantArgs | None = None
    a: QuantArgs | None = None
    k_bits: int | None = None
    v_bits: int | None = None

    def __post_init__(self) -> None:
        where = f"mix_bits setting {self.name!r}"
        if not self.targets or not all(isinstance(t, LayerTarget) for t in self.targets):
            raise ValueError(f"{where}: layer_name must list at least one layer")
        if not isinstance(self.do_quant, bool):
            raise ValueError(f"{where}: do_quant={self.do_quant!r} must be a bool; allowed: True, False")
        why = structure_error(self.do_quant, self.w is not None, self.a is not None, self.k_bits, self.v_bits)
        if why:
            raise ValueError(f"{where}: {why}")
        for name, args, target in (("weight", self.w, "weight"), ("act", self.a, "activation")):
            if args is not None and (not isinstance(args, QuantArgs) or args.target != target):
                raise ValueError(f"{where}: {name} must be QuantArgs(target={target!r}), got {args!r}")
        for name in ("k_bits", "v_bits"):
            v = getattr(self, name)
            if v is not None and not (_is_int(v) and 1 <= v <= FULL_PRECISION_BITS):
                raise ValueError(f"{where}: {name}={v!r}; allowed: 1..15 (asymmetric INT) or 16 (full precision)")

    @property
    def sets_linears(self) -> bool:
        return not self.do_quant or self.w is not None

    def matches(self, block: int, layer: str | None = None) -> bool:
        return any(t.matches(block, layer) for t in self.targets)


@dataclass(frozen=True)
class LayerMap:
    """Ordered per-layer settings; for any (block, layer) the last matching setting wins."""

    settings: tuple[MixSetting, ...]

    def __post_init__(self) -> None:
        if not self.settings or not all(isinstance(s, MixSetting) for s in self.settings):
            raise ValueError("LayerMap needs at least one MixSetting")
        names = [s.name for s in self.settings]
        if len(set(names)) != len(names):
            raise ValueError(f"LayerMap: setting names repeat: {names}")

    def linear_setting(self, block: int, layer: str) -> MixSetting | None:
        """The setting that decides Linear `layer` of `block` (None: the global settings)."""
        found = [s for s in self.settings if s.sets_linears and s.matches(block, layer)]
        return found[-1] if found else None

    def kv_settings(self, block: int) -> tuple[MixSetting | None, MixSetting | None]:
        """The settings that decide the K and the V bits of `block`'s attention."""
        def last(key: str) -> MixSetting | None:
            found = [s for s in self.settings if getattr(s, key) is not None and s.matches(block)]
            return found[-1] if found else None

        return last("k_bits"), last("v_bits")

    @property
    def has_kv(self) -> bool:
        return any(s.k_bits is not None or s.v_bits is not None for s in self.settings)

    def blocks_named(self) -> list[int]:
        """Every block index some entry names, then GENERIC_BLOCK (any block no entry names);
        asking the map about these covers every distinct outcome."""
        named = {b for s in self.settings for t in s.targets for b in (t.blocks or ())}
        return [*sorted(named), GENERIC_BLOCK]

    def check_depth(self, n_blocks: int) -> None:
        """Refuse block indices past the model's depth, naming the setting and the entry."""
        for s in self.settings:
            for t in s.targets:
                past = [b for b in t.blocks or () if b >= n_blocks]
                if past:
                    raise ValueError(f"mix_bits setting {s.name!r}: layer_name entry {t.text()!r} names block(s) "
                                     f"{', '.join(map(str, past))}, but the model has {n_blocks} blocks; "
                                     f"allowed: 0..{n_blocks - 1}")

    def to_dict(self) -> dict[str, Any]:
        out = []
        for s in self.settings:
            d = {"name": s.name, "layer_name": [t.text() for t in s.targets], "do_quant": s.do_quant}
            for key in ("w", "a"):
                d[key] = None if getattr(s, key) is None else getattr(s, key).to_dict()
            out.append({**d, "k_bits": s.k_bits, "v_bits": s.v_bits})
        return {"settings": out}

    def digest(self) -> str:
        """Short hash of the resolved map (for result slugs)."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:8]


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
    k: QuantArgs = field(default_factory=lambda: _off("key"))  # asymmetric INT, integer zero point (P3-LLM)
    v: QuantArgs = field(default_factory=lambda: _off("value"))
    p: QuantArgs = field(default_factory=lambda: _off("prob", "ufloat"))
    kv: KVArgs = field(default_factory=KVArgs)
    layers: LayerMap | None = None

    def __post_init__(self) -> None:
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
            raise _plan_err("w.dtype", w.dtype, "not a weight format", _fmt_allowed(W_DTYPES))
        if a.enabled and a.dtype not in A_DTYPES:
            raise _plan_err("a.dtype", a.dtype, "not an activation format", _fmt_allowed(A_DTYPES))
        if a.enabled and a.granularity != "per_token":
            raise _plan_err("a.group_size", a.group_size, f"activations are quantized per token, got "
                            f"granularity={a.granularity!r}", "per_token QuantArgs")
        if q.enabled and (q.dtype != "fp8_e4m3" or q.granularity != "per_token"):
            raise _plan_err("q.bits", q.bits, f"queries are FP8 E4M3 per (token, head), got dtype={q.dtype!r}, "
                            f"granularity={q.granularity!r}", "8 (fp8_e4m3, per_token) or 16 (off)")
        for name, args in (("k", k), ("v", v)):
            if args.enabled and (args.dtype != "int" or args.symmetric):
                raise _plan_err(f"{name}.bits", args.bits, f"the KV cache is asymmetric INT, got dtype={args.dtype!r}, "
                                f"symmetric={args.symmetric}", "1..15 (asymmetric int) or 16 (off)")
        if v.enabled and v.granularity != "per_token":
            raise _plan_err("v.group_size", v.group_size, "values are quantized per token", "per_token QuantArgs")
        if p.enabled and p.dtype != "ufloat":
            raise _plan_err("p.bits", p.bits, f"probabilities use the unsigned ufloat formats, got {p.dtype!r}",
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
            raise _plan_err("kv.method", kv.method, f"keys must be {want_k}, got {k.granularity!r}",
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
        fold_v_scale: bool = True, kv_zero_point: str = "int", flags: dict[str, str] | None = None,
    ) -> QuantPlan:
        """A plan from P3-LLM's command-line settings (16 bits = off, group size -1 = whole row).
        A bad value is reported under its flag (FLAGS; `flags` overrides some spellings)."""
        try:
            return cls._from_flags(w_bits, a_bits, q_bits, k_bits, v_bits, p_bits, w_group_size, a_group_size,
                                   q_group_size, k_group_size, v_group_size, w_dtype, a_dtype, kv_quant_method,
                                   kv_residual_len, kv_residual_mode, apply_k_scale, apply_k_bias, k_quant_post_rope,
                                   kv_quant_post_attn, fold_v_scale, kv_zero_point)
        except FieldError as err:  # name the flag that set the field
            raise err.for_flags({**FLAGS, **(flags or {})}) from None

    @classmethod
    def _from_flags(cls, w_bits, a_bits, q_bits, k_bits, v_bits, p_bits, w_group_size, a_group_size, q_group_size,
                    k_group_size, v_group_size, w_dtype, a_dtype, kv_quant_method, kv_residual_len, kv_residual_mode,
                    apply_k_scale, apply_k_bias, k_quant_post_rope, kv_quant_post_attn, fold_v_scale,
                    kv_zero_point) -> QuantPlan:
        if w_dtype not in W_DTYPES:
            raise _plan_err("w.dtype", w_dtype, "unknown weight format", _fmt_allowed(W_DTYPES))
        if a_dtype not in A_DTYPES:
            raise _plan_err("a.dtype", a_dtype, "unknown activation format", _fmt_allowed(A_DTYPES))

        def make(name: str, **kw: Any) -> QuantArgs:
            try:
                return QuantArgs(**kw)
            except FieldError as err:
                raise err.within("QuantPlan", name) from None

        try:
            kv = KVArgs(method=kv_quant_method, residual_len=kv_residual_len, residual_mode=kv_residual_mode,
                        k_scale=apply_k_scale, k_bias=apply_k_bias, k_post_rope=k_quant_post_rope,
                        post_attn=kv_quant_post_attn, fold_v_scale=fold_v_scale)
        except FieldError as err:
            raise err.within("QuantPlan", "kv") from None
        if kv_zero_point not in KV_ZERO_POINTS:
            raise _plan_err("k.zero_point", kv_zero_point, "unknown KV zero point", _fmt_allowed(KV_ZERO_POINTS))
        kcvt = kv_quant_method == "KCVT"

        return cls(
            w=make("w", bits=w_bits, dtype=w_dtype, group_size=w_group_size, target="weight"),
            a=make("a", bits=a_bits, dtype=a_dtype, group_size=a_group_size, target="activation",
                   symmetric=True if a_dtype == "int" else None),
            q=make("q", bits=q_bits, dtype="fp8_e4m3", group_size=q_group_size, target="query"),
            k=make("k", bits=k_bits, dtype="int", group_size=k_group_size, target="key",
                   granularity="per_channel" if kcvt else "per_token",
                   zero_point="float" if kcvt else kv_zero_point),  # KCVT keys: KIVI's float zero point
            v=make("v", bits=v_bits, dtype="int", group_size=v_group_size, target="value", zero_point=kv_zero_point),
            p=make("p", bits=p_bits, dtype="ufloat", target="prob"),
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

    def check_dims(self, dims: Any, seq_len: int | None = None) -> None:
        """Refuse (before any weight loads) group sizes larger than what they group, which would run
        per row under a `g<size>` name, and a residual that keeps every token of a `seq_len` window in
        full precision, so the K / V settings would quantize nothing. `dims`: arch.ModelDims."""
        blocks = self.layers.blocks_named() if self.layers is not None else [GENERIC_BLOCK]
        for block in blocks:
            for short, width in dims.linear_inputs.items():
                for part, args in zip(("w", "a"), self.linear_args(block, short)):
                    if not (args.enabled and args.group_size > width):
                        continue
                    why = f"larger than the {width} input channels of {short}"
                    if args == getattr(self, part):
                        raise _plan_err(f"{part}.group_size", args.group_size, why, f"-1 or 1..{width}")
                    setting = self.layers.linear_setting(block, short)
                    raise ValueError(f"mix_bits setting {setting.name!r}: {'weight' if part == 'w' else 'act'}."
                                     f"group_size={args.group_size}: {why}; allowed: -1 or 1..{width}")
        plans = self._attention_plans() if self.layers is not None and self.layers.has_kv else [self]
        k_on, v_on = any(p.k.enabled for p in plans), any(p.v.enabled for p in plans)
        k_per_token = self.k.granularity == "per_token"
        checks = [("q", self.q.enabled, self.q.group_size, dims.head_dim, "head_dim"),
                  ("k", k_on and k_per_token, self.k.group_size, dims.kv_width, "the K width (KV heads x head_dim)"),
                  ("v", v_on, self.v.group_size, dims.kv_width, "the V width (KV heads x head_dim)")]
        if seq_len is not None:
            checks.append(("k", k_on and not k_per_token, self.k.group_size, seq_len, "the tokens of a window "
                           "(KCVT groups tokens)"))
        for part, on, group, width, what in checks:
            if on and group > width:
                raise _plan_err(f"{part}.group_size", group, f"larger than {what} ({width})", f"-1 or 1..{width}")
        if seq_len is not None and (k_on or v_on) and self.kv.residual_len >= seq_len:
            raise _plan_err("kv.residual_len", self.kv.residual_len,
                            f"keeps all {seq_len} tokens of a window in full precision, so K / V quantize nothing",
                            f"0..{seq_len - 1}")

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
        """True when the attention must run eagerly in some block: quantized P, a per-query residual,
        or a quantized query with residual tokens (against them the query stays full precision)."""
        if self.layers is not None and self.layers.has_kv:  # block plans carry no map
            return any(p.needs_eager for p in self._attention_plans())
        return self.p.enabled or (self.kv.per_query_residual and (self.k.enabled or self.v.enabled)) \
            or (self.kv.residual_len > 0 and self.q.enabled)

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
            if (k.enabled and k.granularity == "per_token" and k.zero_point == "float") or \
                    (v.enabled and v.zero_point == "float"):
                parts.append("zpf")  # KIVI's float zero point (the default is P3-LLM's integer one)
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
        if self.quantizes_attention:  # in the result name's hash: no result of earlier attention rules is reused
            d["attention_rules"] = ATTENTION_RULES
        if self.layers is not None:
            d["layers"] = self.layers.to_dict()
        return d
