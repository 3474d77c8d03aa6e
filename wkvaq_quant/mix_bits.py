"""llmc's `quant:` YAML section (with `mix_bits`) -> validated per-layer settings.

Two steps, because a setting refines the global defaults and those may come from flags:

1. `load_quant_config(path)` reads and checks the file (`LlmcQuant`): every key is known,
   every layer name exists, bits and granularities are supported; nothing is ignored.
2. `LlmcQuant.apply(plan, explicit)` refines a flag-built `QuantPlan`: the YAML's global
   `weight` / `act` sections replace the flags' (an explicit flag that disagrees is an error),
   and the settings become the plan's ordered `LayerMap` (the later setting wins on overlap).

A setting's `weight` / `act` keys that are not given are taken from the global section
(the YAML's, else the flags'; a global that is off contributes llmc's defaults: INT,
asymmetric weights, symmetric per-token activations).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import yaml

from wkvaq_quant.config import A_DTYPES, FULL_PRECISION_BITS, LINEAR_NAMES, W_DTYPES, FieldError, QuantArgs
from wkvaq_quant.userfiles import reading, short
from wkvaq_quant.plan import FLAGS, LayerMap, LayerTarget, MixSetting, QuantPlan, structure_error

__all__ = [
    "LINEAR_NAMES",
    "METHODS",
    "LlmcQuant",
    "load_quant_config",
    "parse_quant_config",
]

METHODS = ("RTN", "Awq", "Gptq")
"""Weight algorithms, in llmc's spelling (matched case-insensitively)."""

_TOP_KEYS = ("quant",)
_QUANT_KEYS = ("method", "weight", "act", "mix_bits")
_SETTING_KEYS = ("layer_name", "do_quant", "weight", "act", "k_bits", "v_bits")
_SECTION_KEYS = ("bit", "symmetric", "granularity", "group_size", "dtype")
_GRANULARITIES = {"weight": ("per_channel", "per_group", "per_tensor"), "act": ("per_token",)}
_DTYPES = {"weight": W_DTYPES, "act": A_DTYPES}
# llmc's defaults for a section's missing keys when there is no enabled global to refine
_LLMC_BASE = {
    "weight": QuantArgs(bits=FULL_PRECISION_BITS, dtype="int", target="weight"),
    "act": QuantArgs(bits=FULL_PRECISION_BITS, dtype="int", symmetric=True, target="activation"),
}
# flag dest -> (section, llmc key, QuantArgs field): flags that the YAML's global sections also set
_FLAG_KEYS = {
    "w_bits": ("weight", "bit", "bits"), "w_group_size": ("weight", "group_size", "group_size"),
    "w_dtype": ("weight", "dtype", "dtype"), "a_bits": ("act", "bit", "bits"),
    "a_group_size": ("act", "group_size", "group_size"), "a_dtype": ("act", "dtype", "dtype"),
}


def _allowed(values: Any) -> str:
    return ", ".join(repr(v) for v in values)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


# ---------------------------------------------------------------------------------------
# The YAML file
# ---------------------------------------------------------------------------------------


MAX_YAML_BYTES = 64 * 1024
"""Largest --config file read (an llmc config is a few KB)."""
MAX_YAML_DEPTH = 20
"""Deepest nesting of mappings / lists (llmc's `quant:` section nests 5 levels)."""
MAX_YAML_ALIASES = 16
"""Most `*alias` references in one file (a YAML alias bomb needs many to blow up)."""


class _StrictLoader(yaml.SafeLoader):
    """PyYAML's safe loader, but a key repeated in one mapping is an error (not "last wins"), and the
    nesting depth and the number of aliases are limited, so a bomb is refused while composing."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0
        self._aliases = 0

    def compose_node(self, parent, index):  # noqa: ANN001, ANN201 (PyYAML's signature)
        if self.check_event(yaml.AliasEvent):
            self._aliases += 1
            if self._aliases > MAX_YAML_ALIASES:
                raise ValueError(f"more than {MAX_YAML_ALIASES} aliases (*name); allowed: at most {MAX_YAML_ALIASES}")
        self._depth += 1
        try:
            if self._depth > MAX_YAML_DEPTH:
                mark = self.peek_event().start_mark
                raise ValueError(f"nested deeper than {MAX_YAML_DEPTH} levels (line {mark.line + 1}); allowed: at most "
                                 f"{MAX_YAML_DEPTH}")
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: set = set()
    for key_node, _ in node.value:
        if not isinstance(key_node, yaml.ScalarNode):
            raise ValueError(f"a mapping key must be a plain value, not a {key_node.id} (line "
                             f"{key_node.start_mark.line + 1})")
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise ValueError(f"key {key!r} appears twice in one mapping (line {key_node.start_mark.line + 1})")
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _mapping(value: Any, where: str, allowed: tuple[str, ...]) -> dict:
    if not isinstance(value, dict):
        raise ValueError(f"{where} must be a mapping with keys {_allowed(allowed)}, got {value!r}")
    unknown = [k for k in value if k not in allowed]
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {_allowed(unknown)}; allowed: {_allowed(allowed)}")
    return value


def _section_changes(value: Any, where: str, section: str) -> tuple[tuple[str, Any], ...]:
    """Validated QuantArgs changes of one llmc `weight` / `act` section."""
    d = _mapping(value, where, _SECTION_KEYS)
    if "bit" not in d:
        raise ValueError(f"{where}: 'bit' is required")
    bit = d["bit"]
    if not _is_int(bit) or not 1 <= bit < FULL_PRECISION_BITS:
        hint = "do_quant: False keeps layers in full precision" if "mix_bits" in where else "omit the section"
        raise ValueError(f"{where}.bit={bit!r}: must be an integer below {FULL_PRECISION_BITS} ({hint}); "
                         f"allowed: the widths of the format (int: 1..15, bitmod: 3, 4, fp4_e2m1: 4, fp8_e4m3: 8)")
    changes: dict[str, Any] = {"bits": bit}
    if "symmetric" in d:
        if not isinstance(d["symmetric"], bool):
            raise ValueError(f"{where}.symmetric={d['symmetric']!r}; allowed: True, False")
        changes["symmetric"] = d["symmetric"]
    if "dtype" in d:
        if d["dtype"] not in _DTYPES[section]:
            raise ValueError(f"{where}.dtype={d['dtype']!r}; allowed: {_allowed(_DTYPES[section])}")
        changes["dtype"] = d["dtype"]
    if "group_size" in d:
        gs = d["group_size"]
        if not _is_int(gs) or not (gs == -1 or gs > 0):
            raise ValueError(f"{where}.group_size={gs!r}; allowed: a positive integer, or -1 (whole row)")
        changes["group_size"] = gs
    if "granularity" in d:
        g = d["granularity"]
        if g not in _GRANULARITIES[section]:
            raise ValueError(f"{where}.granularity={g!r}; allowed: {_allowed(_GRANULARITIES[section])}")
        changes["granularity"] = g
        if g in ("per_channel", "per_tensor") and "group_size" not in d:
            changes["group_size"] = -1
    return tuple(changes.items())


def _resolve_section(base: QuantArgs, changes: tuple[tuple[str, Any], ...], where: str) -> QuantArgs:
    """`base` refined by a section's changes (an act section in INT is symmetric unless told)."""
    c = {**dict(changes), "zero_point": None}  # follows dtype and symmetric (llmc has no key for it)
    if base.target == "activation" and "symmetric" not in c and c.get("dtype", base.dtype) == "int" \
            and base.dtype != "int":
        c["symmetric"] = True
    try:
        return base.replace(**c)
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from None


@dataclass(frozen=True)
class _RawSetting:
    """A checked setting whose weight / act still wait for their base (the global section)."""

    name: str
    targets: tuple[LayerTarget, ...]
    do_quant: bool
    weight: tuple[tuple[str, Any], ...] | None
    act: tuple[tuple[str, Any], ...] | None
    k_bits: int | None
    v_bits: int | None

    def resolve(self, w: QuantArgs, a: QuantArgs, where: str) -> MixSetting:
        bases = {s: g if g.enabled else _LLMC_BASE[s] for s, g in (("weight", w), ("act", a))}
        return MixSetting(
            name=self.name, targets=self.targets, do_quant=self.do_quant,
            w=None if self.weight is None else _resolve_section(bases["weight"], self.weight, f"{where}.weight"),
            a=None if self.act is None else _resolve_section(bases["act"], self.act, f"{where}.act"),
            k_bits=self.k_bits, v_bits=self.v_bits,
        )


def _parse_setting(name: Any, value: Any, where: str) -> _RawSetting:
    d = _mapping(value, where, _SETTING_KEYS)
    if "layer_name" not in d:
        raise ValueError(f"{where}: 'layer_name' is required (a list such as [down_proj#0-1, o_proj])")
    names = d["layer_name"]
    if not isinstance(names, list) or not names:
        raise ValueError(f"{where}.layer_name={names!r}: must be a non-empty list such as [down_proj#0-1, o_proj]")
    targets = []
    for entry in names:
        try:
            targets.append(LayerTarget.parse(entry))
        except ValueError as err:
            raise ValueError(f"{where}.layer_name entry {entry!r}: {err}") from None
    do_quant = d.get("do_quant", True)
    if not isinstance(do_quant, bool):
        raise ValueError(f"{where}.do_quant={do_quant!r}; allowed: True, False")
    kv = {k: d.get(k) for k in ("k_bits", "v_bits")}
    for k, v in kv.items():
        if v is not None and not (_is_int(v) and 1 <= v <= FULL_PRECISION_BITS):
            raise ValueError(f"{where}.{k}={v!r}; allowed: 1..15 (asymmetric INT) or 16 (full precision)")
    raw = _RawSetting(
        name=str(name), targets=tuple(targets), do_quant=do_quant,
        weight=_section_changes(d["weight"], f"{where}.weight", "weight") if "weight" in d else None,
        act=_section_changes(d["act"], f"{where}.act", "act") if "act" in d else None, **kv,
    )
    why = structure_error(do_quant, raw.weight is not None, raw.act is not None, raw.k_bits, raw.v_bits)
    if why:
        raise ValueError(f"{where}: {why}")
    return raw


@dataclass(frozen=True)
class LlmcQuant:
    """A checked llmc `quant:` section.

    source: the file (for messages). method: RTN | Awq | Gptq (llmc's spelling).
    weight / act: the global sections (None when absent: the flags decide).
    """

    source: str
    method: str
    weight: QuantArgs | None
    act: QuantArgs | None
    settings: tuple[_RawSetting, ...]

    def apply(self, plan: QuantPlan, explicit: Mapping[str, Any] | None = None,
              flags: Mapping[str, str] | None = None) -> QuantPlan:
        """`plan` (built from flags) refined by this file. `explicit`: the flags given on the command
        line (dest -> value); one that contradicts the global `weight` / `act` section is an error.
        `flags`: the front end's spelling of a plan field's flag where it is not P3-LLM's (plan.FLAGS)."""
        names = {**FLAGS, **(flags or {})}
        for dest, value in (explicit or {}).items():
            if dest not in _FLAG_KEYS:
                continue
            section, key, attr = _FLAG_KEYS[dest]
            args = self.weight if section == "weight" else self.act
            if args is not None and getattr(args, attr) != value:
                flag = names.get(f"{'w' if section == 'weight' else 'a'}.{attr}", "--" + dest)
                raise ValueError(f"{flag} {value} contradicts quant.{section}.{key}: {getattr(args, attr)} in "
                                 f"{self.source}; allowed: {flag} {getattr(args, attr)}, or leave {flag} out")
        w = self.weight or plan.w
        a = self.act or plan.a
        settings = tuple(s.resolve(w, a, f"{self.source}: quant.mix_bits.{s.name}") for s in self.settings)
        try:
            out = dataclasses.replace(plan, w=w, a=a, layers=LayerMap(settings) if settings else None)
        except FieldError as err:
            raise ValueError(f"{self.source}: {err.for_flags(names)}") from None
        except ValueError as err:
            raise ValueError(f"{self.source}: {err}") from None
        return out


def parse_quant_config(data: Any, source: str = "<yaml>") -> LlmcQuant:
    """Check a loaded YAML document (see the module docstring); every error names the key."""
    top = _mapping(data, f"{source}: the document", _TOP_KEYS)
    if "quant" not in top:
        raise ValueError(f"{source}: no 'quant' section (model, data and evaluation are chosen with flags)")
    q = _mapping(top["quant"], f"{source}: quant", _QUANT_KEYS)
    method = q.get("method", "RTN")
    by_lower = {m.lower(): m for m in METHODS}
    if not isinstance(method, str) or method.lower() not in by_lower:
        raise ValueError(f"{source}: quant.method={method!r}; allowed: {_allowed(METHODS)}")
    globals_: dict[str, QuantArgs | None] = {}
    for section in ("weight", "act"):
        where = f"{source}: quant.{section}"
        globals_[section] = None if section not in q else _resolve_section(
            _LLMC_BASE[section], _section_changes(q[section], where, section), where)
    settings = []
    mix = q.get("mix_bits")
    if "mix_bits" in q:
        if not isinstance(mix, dict) or not mix:
            raise ValueError(f"{source}: quant.mix_bits must be a non-empty mapping of settings "
                             f"(setting_0: {{layer_name: [...], ...}}), got {mix!r}")
        settings = [_parse_setting(name, value, f"{source}: quant.mix_bits.{name}") for name, value in mix.items()]
    return LlmcQuant(source=source, method=by_lower[method.lower()], weight=globals_["weight"],
                     act=globals_["act"], settings=tuple(settings))


def load_quant_config(path: str | Path) -> LlmcQuant:
    """Read and check an llmc-style YAML file (`--config`)."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"--config {path}: no such file")
    if p.stat().st_size > MAX_YAML_BYTES:
        raise ValueError(f"--config {path}: {p.stat().st_size} bytes; allowed: at most {MAX_YAML_BYTES} "
                         f"(an llmc quant config is a few KB)")
    with reading(path, "--config"):
        try:
            data = yaml.load(p.read_bytes().decode("utf-8"), Loader=_StrictLoader)
        except (yaml.YAMLError, ValueError) as err:
            raise ValueError(f"--config {path}: not valid YAML: {short(err)}") from None
        return parse_quant_config(data, str(path))
