"""Which Linears AWQ scales together in a decoder block, from the architecture registry.

A scale group is (previous op -> Linears it feeds, module whose output error is measured); for
Llama and Mistral:
    input_layernorm          -> self_attn.q/k/v_proj   measured on the attention output
    self_attn.v_proj         -> self_attn.o_proj        measured on o_proj's output
    post_attention_layernorm -> mlp.gate/up_proj        measured on the MLP output
    mlp.up_proj              -> mlp.down_proj           measured on down_proj's output
A group fed by a Linear is kept only when that Linear's output width equals the input width of
the Linears it feeds: with GQA, v_proj emits n_kv_heads*head_dim channels while o_proj reads
n_heads*head_dim, and a per-channel scale cannot be folded.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from wkvaq_quant.arch import arch_of

__all__ = ["ScaleGroup", "block_parts", "clip_skip", "scale_groups"]


@dataclass(frozen=True)
class ScaleGroup:
    """Names are relative to the decoder block ("self_attn.q_proj")."""

    prev: str
    layers: tuple[str, ...]
    inspect: str

    def __post_init__(self) -> None:
        if not self.layers:
            raise ValueError(f"ScaleGroup {self.prev!r}: no linears to scale")


def block_parts(block: nn.Module) -> tuple[str, str]:
    """(attention module name, MLP module name) inside a decoder block."""
    arch = arch_of(block)
    return arch.attention, arch.mlp


def clip_skip(block: nn.Module) -> tuple[str, ...]:
    """Short names of the Linears the clip search leaves alone (q/k: their error meets in the scores)."""
    return arch_of(block).clip_skip


def scale_groups(block: nn.Module) -> list[ScaleGroup]:
    """The scale groups of one decoder block, in the order the block computes them."""
    arch = arch_of(block)
    inspect = {"attention": arch.attention, "mlp": arch.mlp}
    groups = []
    for spec in arch.scale_groups:
        layers = tuple(arch.linear_path(n) for n in spec.layers)
        prev = block.get_submodule(spec.prev)
        if isinstance(prev, nn.Linear):
            if any(block.get_submodule(n).in_features != prev.out_features for n in layers):
                continue  # e.g. v_proj -> o_proj under GQA
        elif not isinstance(getattr(prev, "weight", None), nn.Parameter):
            raise ValueError(f"{type(block).__name__}.{spec.prev} has no weight to fold AWQ scales into")
        target = inspect.get(spec.inspect) or arch.linear_path(spec.inspect)
        groups.append(ScaleGroup(spec.prev, layers, target))
    return groups
