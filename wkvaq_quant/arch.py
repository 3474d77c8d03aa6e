"""The architecture registry: what the project knows about each supported model family.

One `Arch` per family, keyed by the transformers classes of its decoder (the model's
`PreTrainedModel` base and its decoder-layer class, resolved lazily from the family's modeling
module) and, before any weight loads, by `config.model_type`. Everything that depends on the
architecture reads it from here: attach (which modules are blocks, attention, Linears, where
pre-RoPE keys are tapped), GPTQ (true-sequential groups), AWQ (scale groups with their previous
ops, Linears that are not clipped), layer-wise quantization and mix_bits (Linear names). A model
without an entry is refused, naming the supported families, never handled by a guess.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

from torch import nn

__all__ = ["ARCHS", "Arch", "ModelDims", "ScaleGroupSpec", "UnsupportedModelError", "arch_for_config", "arch_of",
           "linear_names", "register_arch", "supported_families"]


class UnsupportedModelError(ValueError):
    """A model family the registry has no entry for."""


@dataclass(frozen=True)
class ScaleGroupSpec:
    """AWQ: the op before `layers` (relative to the block) whose output the per-channel scale is
    folded into, the Linears (short names) it feeds, and what the search measures the error on:
    "attention", "mlp" or the short name of a Linear (its own output)."""

    prev: str
    layers: tuple[str, ...]
    inspect: str


KEY_LAYOUTS = ("tokens", "token_heads", "heads")
"""Layouts of the pre-RoPE key tap's output: "tokens" [B, T, Hkv*d] (a Linear's output),
"token_heads" [B, T, Hkv, d] (Qwen3's k_norm, before the transpose), "heads" [B, Hkv, T, d]
(Gemma-3's k_norm, after it)."""


@dataclass(frozen=True)
class Arch:
    """One model family.

    model_types: `config.model_type` values of the family. modeling: transformers' modeling
    module; prefix: its class-name prefix ("Llama" -> LlamaPreTrainedModel, LlamaDecoderLayer,
    LlamaAttention). attention / mlp: their names inside a decoder block. linears: short name ->
    path inside the block, in the order of the block's computation. sequential: GPTQ's
    true-sequential groups. scale_groups / clip_skip: AWQ's. pre_rope_key: path inside the
    attention module of the module whose output is the key just before RoPE (k_proj, or k_norm
    where a per-head norm follows it), in the layout pre_rope_key_layout (see KEY_LAYOUTS).
    norm_offset: the family's RMSNorm computes x_hat * (norm_offset + weight) (Gemma: 1), which
    folding an AWQ scale into a norm must respect.
    """

    name: str
    model_types: tuple[str, ...]
    modeling: str
    prefix: str
    linears: tuple[tuple[str, str], ...]
    sequential: tuple[tuple[str, ...], ...]
    scale_groups: tuple[ScaleGroupSpec, ...]
    clip_skip: tuple[str, ...]
    pre_rope_key: str
    attention: str = "self_attn"
    mlp: str = "mlp"
    linear_inputs: tuple[tuple[str, str], ...] = ()
    """short name -> what its input width is: "hidden", "attention" (heads x head_dim) or "intermediate"."""
    pre_rope_key_layout: str = "tokens"
    norm_offset: float = 0.0

    def __post_init__(self) -> None:
        names = self.linear_names
        if self.pre_rope_key_layout not in KEY_LAYOUTS:
            raise ValueError(f"Arch {self.name!r}: pre_rope_key_layout {self.pre_rope_key_layout!r}; allowed: "
                             f"{', '.join(KEY_LAYOUTS)}")
        if sorted(n for n, _ in self.linear_inputs) != sorted(names):
            raise ValueError(f"Arch {self.name!r}: linear_inputs must give every Linear's input width")
        for group in (*self.sequential, *(g.layers for g in self.scale_groups), self.clip_skip):
            unknown = [n for n in group if n not in names]
            if unknown:
                raise ValueError(f"Arch {self.name!r}: {unknown} are not among its Linears {names}")

    @property
    def linear_names(self) -> tuple[str, ...]:
        return tuple(short for short, _ in self.linears)

    def linear_path(self, short: str) -> str:
        return dict(self.linears)[short]

    def dims(self, config: Any) -> ModelDims:
        """The widths a plan's group sizes are checked against, from a config (object or dict)."""
        get = config.get if isinstance(config, dict) else lambda k, d=None: getattr(config, k, d)
        text = get("text_config")
        if text is not None:
            get = text.get if isinstance(text, dict) else lambda k, d=None: getattr(text, k, d)
        hidden, heads = get("hidden_size"), get("num_attention_heads")
        head_dim = get("head_dim") or (hidden // heads if hidden and heads else None)
        kv_heads = get("num_key_value_heads") or heads
        widths = {"hidden": hidden, "attention": heads * head_dim if heads and head_dim else None,
                  "intermediate": get("intermediate_size")}
        inputs = {short: widths[kind] for short, kind in self.linear_inputs}
        if not all(isinstance(v, int) and v > 0 for v in (*inputs.values(), head_dim, kv_heads)):
            raise UnsupportedModelError(f"{self.name}: the config lacks the sizes the checks need (hidden_size, "
                                        f"num_attention_heads, num_key_value_heads, head_dim, intermediate_size)")
        return ModelDims(linear_inputs=inputs, head_dim=head_dim, kv_width=kv_heads * head_dim)

    def _class(self, suffix: str) -> type:
        module = importlib.import_module(self.modeling)
        cls = getattr(module, f"{self.prefix}{suffix}", None)
        if cls is None:  # transformers renamed or removed it: fail loudly, never match by structure
            raise RuntimeError(f"{self.modeling} has no {self.prefix}{suffix}: this transformers version is not "
                               f"supported for {self.name}; use the versions in constraints.txt")
        return cls

    @property
    def pretrained_class(self) -> type:
        return self._class("PreTrainedModel")

    @property
    def decoder_layer_class(self) -> type:
        return self._class("DecoderLayer")

    @property
    def attention_class(self) -> type:
        return self._class("Attention")

    def matches(self, module: nn.Module) -> bool:
        return isinstance(module, (self.pretrained_class, self.decoder_layer_class, self.attention_class))

    def check_model_type(self, module: nn.Module) -> None:
        """A whole model of the family's classes must also be one of its model types: Gemma3PreTrainedModel
        covers the multimodal Gemma3ForConditionalGeneration (model_type gemma3), which has no entry."""
        model_type = getattr(getattr(module, "config", None), "model_type", None)
        if isinstance(module, self.pretrained_class) and model_type not in self.model_types:
            raise UnsupportedModelError(f"{type(module).__name__} (model_type {model_type!r}) is not supported: the "
                                        f"{self.name} entry covers model_type {'/'.join(self.model_types)}; "
                                        f"supported families: {supported_families()}")

    @property
    def eager_attention(self):  # noqa: ANN201 (transformers' function)
        """The family's own eager attention function (transformers' `eager_attention_forward`)."""
        fn = getattr(importlib.import_module(self.modeling), "eager_attention_forward", None)
        if fn is None:
            raise RuntimeError(f"{self.modeling} has no eager_attention_forward: this transformers version is not "
                               f"supported for {self.name}; use the versions in constraints.txt")
        return fn

    def decoder_blocks(self, model: nn.Module) -> list[nn.Module]:
        """The decoder blocks in order (by their attention's `layer_idx`)."""
        layer_cls = self.decoder_layer_class
        blocks = [m for m in model.modules() if isinstance(m, layer_cls)]
        return sorted(blocks, key=lambda b: self.attention_of(b).layer_idx)

    def attention_of(self, block: nn.Module) -> nn.Module:
        attn = getattr(block, self.attention, None)
        if not isinstance(attn, self.attention_class):
            raise UnsupportedModelError(f"{type(block).__name__}.{self.attention} is {type(attn).__name__}, not "
                                        f"{self.prefix}Attention: not a {self.name} block")
        return attn

    def block_linears(self, block: nn.Module) -> list[tuple[str, str, nn.Linear]]:
        """(short name, path inside the block, Linear) of each Linear of one block, in order."""
        out = []
        for short, path in self.linears:
            lin = block.get_submodule(path)
            if not isinstance(lin, nn.Linear):
                raise UnsupportedModelError(f"{type(block).__name__}.{path} is {type(lin).__name__}, not a Linear")
            out.append((short, path, lin))
        return out


@dataclass(frozen=True)
class ModelDims:
    """linear_inputs: each Linear's input width by short name; head_dim; kv_width: K / V width per
    token (KV heads x head_dim)."""

    linear_inputs: dict[str, int]
    head_dim: int
    kv_width: int


ARCHS: dict[str, Arch] = {}


def register_arch(arch: Arch) -> Arch:
    """Add a family (idempotent for the same entry; a different entry under a taken name is refused)."""
    old = ARCHS.get(arch.name)
    if old is not None and old != arch:
        raise ValueError(f"architecture {arch.name!r} is already registered with other settings")
    ARCHS[arch.name] = arch
    return arch


def supported_families() -> str:
    return ", ".join(f"{a.name} (model_type {'/'.join(a.model_types)})" for a in ARCHS.values())


def arch_of(module: nn.Module) -> Arch:
    """The entry of a model (any `PreTrainedModel` of the family), one of its decoder blocks or attention
    modules."""
    for arch in ARCHS.values():
        if arch.matches(module):
            arch.check_model_type(module)
            return arch
    raise UnsupportedModelError(f"{type(module).__name__} is not supported: no architecture entry for it; "
                                f"supported families: {supported_families()}")


def arch_for_config(config: Any, what: str = "--model") -> Arch:
    """The entry of a checkpoint's config (before any weight loads), by `model_type`."""
    model_type = getattr(config, "model_type", None)
    if model_type is None and isinstance(config, dict):
        model_type = config.get("model_type")
    for arch in ARCHS.values():
        if model_type in arch.model_types:
            return arch
    raise UnsupportedModelError(f"{what}: model_type {model_type!r} is not supported (no architecture entry); "
                                f"supported families: {supported_families()}")


def linear_names() -> tuple[str, ...]:
    """Every Linear short name some registered family has (what a mix_bits layer name may be
    before the model is known; `LayerMap.check_model` checks it against the model's family)."""
    seen: dict[str, None] = {}
    for arch in ARCHS.values():
        seen.update(dict.fromkeys(arch.linear_names))
    return tuple(seen)


_LLAMA_LINEARS = (("q_proj", "self_attn.q_proj"), ("k_proj", "self_attn.k_proj"), ("v_proj", "self_attn.v_proj"),
                  ("o_proj", "self_attn.o_proj"), ("gate_proj", "mlp.gate_proj"), ("up_proj", "mlp.up_proj"),
                  ("down_proj", "mlp.down_proj"))
_LLAMA_INPUTS = (("q_proj", "hidden"), ("k_proj", "hidden"), ("v_proj", "hidden"), ("o_proj", "attention"),
                 ("gate_proj", "hidden"), ("up_proj", "hidden"), ("down_proj", "intermediate"))
_LLAMA_SEQUENTIAL = (("q_proj", "k_proj", "v_proj"), ("o_proj",), ("gate_proj", "up_proj"), ("down_proj",))
# v_proj -> o_proj only where v_proj's output width equals o_proj's input width (not with GQA):
# weights/awq/structure.py drops a Linear-fed group whose widths differ, for any family
_LLAMA_SCALE_GROUPS = (
    ScaleGroupSpec("input_layernorm", ("q_proj", "k_proj", "v_proj"), "attention"),
    ScaleGroupSpec("self_attn.v_proj", ("o_proj",), "o_proj"),
    ScaleGroupSpec("post_attention_layernorm", ("gate_proj", "up_proj"), "mlp"),
    ScaleGroupSpec("mlp.up_proj", ("down_proj",), "down_proj"),
)

# Qwen2 has the same blocks (q/k/v with biases, which a fold into v_proj divides as well)
for _name, _types, _prefix in (("llama", ("llama",), "Llama"), ("mistral", ("mistral",), "Mistral"),
                               ("qwen2", ("qwen2",), "Qwen2")):
    register_arch(Arch(name=_name, model_types=_types, modeling=f"transformers.models.{_name}.modeling_{_name}",
                       prefix=_prefix, linears=_LLAMA_LINEARS, sequential=_LLAMA_SEQUENTIAL,
                       scale_groups=_LLAMA_SCALE_GROUPS, clip_skip=("q_proj", "k_proj"), pre_rope_key="k_proj",
                       linear_inputs=_LLAMA_INPUTS))

# Qwen3: a per-head RMSNorm (k_norm) between k_proj and RoPE; the key is tapped after it,
# on [B, T, Hkv, d] (its output before the transpose to heads)
register_arch(Arch(name="qwen3", model_types=("qwen3",), modeling="transformers.models.qwen3.modeling_qwen3",
                   prefix="Qwen3", linears=_LLAMA_LINEARS, sequential=_LLAMA_SEQUENTIAL,
                   scale_groups=_LLAMA_SCALE_GROUPS, clip_skip=("q_proj", "k_proj"), pre_rope_key="k_norm",
                   pre_rope_key_layout="token_heads", linear_inputs=_LLAMA_INPUTS))

# Gemma-3 (text): post_attention_layernorm normalizes o_proj's *output*; the MLP is fed by
# pre_feedforward_layernorm. Its RMSNorms compute x_hat * (1 + w). k_norm runs on [B, Hkv, T, d].
register_arch(Arch(
    name="gemma3", model_types=("gemma3_text",), modeling="transformers.models.gemma3.modeling_gemma3",
    prefix="Gemma3", linears=_LLAMA_LINEARS, sequential=_LLAMA_SEQUENTIAL,
    scale_groups=(ScaleGroupSpec("input_layernorm", ("q_proj", "k_proj", "v_proj"), "attention"),
                  ScaleGroupSpec("self_attn.v_proj", ("o_proj",), "o_proj"),
                  ScaleGroupSpec("pre_feedforward_layernorm", ("gate_proj", "up_proj"), "mlp"),
                  ScaleGroupSpec("mlp.up_proj", ("down_proj",), "down_proj")),
    clip_skip=("q_proj", "k_proj"), pre_rope_key="k_norm", pre_rope_key_layout="heads",
    linear_inputs=_LLAMA_INPUTS, norm_offset=1.0))
