"""Which linears AWQ scales together, found by structure inside a decoder block.

A scale group is (previous op -> linears it feeds, module whose output error is measured):
    input_layernorm          -> self_attn.q/k/v_proj   measured on the attention output
    self_attn.v_proj         -> self_attn.o_proj        measured on o_proj's output
                                (only when v_proj's output width equals o_proj's input width:
                                with GQA, v_proj emits n_kv_heads*head_dim channels while o_proj
                                reads n_heads*head_dim, and a per-channel scale cannot be folded)
    post_attention_layernorm -> mlp.gate/up_proj        measured on the MLP output
    mlp.up_proj              -> mlp.down_proj           measured on down_proj's output
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from wkvaq_quant.modeling.attach import ATTN_PROJ, MLP_PROJ

__all__ = ["ScaleGroup", "block_parts", "scale_groups"]


@dataclass(frozen=True)
class ScaleGroup:
    """Names are relative to the decoder block ("self_attn.q_proj")."""

    prev: str
    layers: tuple[str, ...]
    inspect: str

    def __post_init__(self) -> None:
        if not self.layers:
            raise ValueError(f"ScaleGroup {self.prev!r}: no linears to scale")


def _find(block: nn.Module, names: tuple[str, ...], what: str) -> str:
    for rel, m in block.named_modules():
        if all(isinstance(getattr(m, n, None), nn.Linear) for n in names):
            return rel
    raise ValueError(f"{type(block).__name__}: no {what} module with {'/'.join(names)} Linears (AWQ supports "
                     f"Llama, Mistral and models with the same block structure)")


def block_parts(block: nn.Module) -> tuple[str, str]:
    """(attention module name, MLP module name) inside a decoder block."""
    return _find(block, ATTN_PROJ, "attention"), _find(block, MLP_PROJ, "MLP")


def scale_groups(block: nn.Module) -> list[ScaleGroup]:
    """The scale groups of one decoder block, in the order the block computes them."""
    attn, mlp = block_parts(block)
    for norm in ("input_layernorm", "post_attention_layernorm"):
        if not hasattr(getattr(block, norm, None), "weight"):
            raise ValueError(f"{type(block).__name__}: no {norm} with a weight to fold AWQ scales into")
    groups = [ScaleGroup("input_layernorm", tuple(f"{attn}.{n}" for n in ("q_proj", "k_proj", "v_proj")), attn)]
    v, o = block.get_submodule(f"{attn}.v_proj"), block.get_submodule(f"{attn}.o_proj")
    if v.out_features == o.in_features:
        groups.append(ScaleGroup(f"{attn}.v_proj", (f"{attn}.o_proj",), f"{attn}.o_proj"))
    groups.append(ScaleGroup("post_attention_layernorm", (f"{mlp}.gate_proj", f"{mlp}.up_proj"), mlp))
    groups.append(ScaleGroup(f"{mlp}.up_proj", (f"{mlp}.down_proj",), f"{mlp}.down_proj"))
    return groups
