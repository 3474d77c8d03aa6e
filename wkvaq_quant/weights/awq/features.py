"""What AWQ records from one forward pass of a decoder block: the input of every decoder Linear,
the call arguments and outputs of the modules whose output error the scale search measures, and
the block's own outputs (the next block's inputs: one forward serves all three)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from wkvaq_quant.weights.blocks import BlockInputs, block_output

__all__ = ["BlockFeatures", "collect_features"]


@dataclass
class BlockFeatures:
    """inputs: per Linear (name relative to the block) its input per batch [b, T, in]; Linears fed
    by the same tensor (q/k/v, gate/up) share its memory.
    calls: per inspected non-Linear module (attention, MLP) the arguments it was called with per
    batch, without its hidden-states input: (other positional args, keyword args).
    outputs: per inspected non-Linear module its full-precision output per batch (the reference
    of the scale search).
    block_outputs: the block's output per batch.
    linear_outputs: per Linear its output per batch, when recorded (the search in a lower dtype)."""

    inputs: dict[str, list[Tensor]] = field(default_factory=dict)
    calls: dict[str, list[tuple[tuple, dict[str, Any]]]] = field(default_factory=dict)
    outputs: dict[str, list[Tensor]] = field(default_factory=dict)
    block_outputs: list[Tensor] = field(default_factory=list)
    linear_outputs: dict[str, list[Tensor]] = field(default_factory=dict)

    def call(self, module: nn.Module, name: str, batch: int, x: Tensor) -> Tensor:
        """Output of the inspected non-Linear `module` (named `name` in the block) on input `x` of
        batch `batch`."""
        rest, kw = self.calls[name][batch]
        return block_output(module(x, *rest, **kw))

    @torch.no_grad()
    def divide_inputs(self, layers: tuple[str, ...], scales: Tensor) -> None:
        """Divide the recorded inputs of `layers` by the per-channel `scales` (each tensor once)."""
        seen: set[int] = set()
        for name in layers:
            for t in self.inputs[name]:
                if t.data_ptr() not in seen:  # q/k/v (gate/up) inputs share their memory
                    seen.add(t.data_ptr())
                    t.div_(scales.to(t.device, t.dtype))


@torch.no_grad()
def collect_features(block: nn.Module, inputs: BlockInputs, device: torch.device | str,
                     linears: list[str], modules: list[str], linear_outputs: bool = False) -> BlockFeatures:
    """Run `block` (already on `device`) over every batch of `inputs`, recording the inputs of
    `linears` (and their outputs with `linear_outputs`), the call arguments and outputs of
    `modules` (names relative to the block) and the block's outputs."""
    feats = BlockFeatures({n: [] for n in linears}, {n: [] for n in modules}, {n: [] for n in modules},
                          linear_outputs={n: [] for n in linears} if linear_outputs else {})
    handles = []

    def linear_hook(name: str):
        def hook(_m: nn.Module, args: tuple) -> None:
            feats.inputs[name].append(args[0].detach())
        return hook

    def module_hook(name: str):
        def hook(_m: nn.Module, args: tuple, kw: dict) -> None:
            kw = dict(kw)
            rest = args[1:] if args else ()
            if not args:
                kw.pop("hidden_states")
            feats.calls[name].append((rest, kw))
        return hook

    def output_hook(record: dict[str, list[Tensor]], name: str):
        def hook(_m: nn.Module, _args: tuple, out: Any) -> None:
            record[name].append(block_output(out).detach())
        return hook

    try:
        for n in linears:
            handles.append(block.get_submodule(n).register_forward_pre_hook(linear_hook(n)))
            if linear_outputs:
                handles.append(block.get_submodule(n).register_forward_hook(output_hook(feats.linear_outputs, n)))
        for n in modules:
            handles.append(block.get_submodule(n).register_forward_pre_hook(module_hook(n), with_kwargs=True))
            handles.append(block.get_submodule(n).register_forward_hook(output_hook(feats.outputs, n)))
        for h, kw in inputs.batches(device):
            feats.block_outputs.append(block_output(block(h, **kw)).detach())
    finally:
        for h in handles:
            h.remove()
    return feats
