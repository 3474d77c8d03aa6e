"""Block-by-block runner: capture the inputs of decoder block 0, then visit the blocks in
order with one block on the compute device at a time (GPTQ's `llama_sequential`, modern form).

The inputs of block 0 are captured by a forward pre-hook registered with `with_kwargs=True`
on the real block, so every keyword the model passes (`position_embeddings`,
`attention_mask`, `position_ids`, `cache_position`, ...) is kept as given; the forward stops
there, so later blocks and the head never run. A decoder block returns a Tensor in
transformers 5 (a tuple in older versions; its first element is taken).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from wkvaq_quant.modeling.attach import decoder_blocks

__all__ = ["NEXT_INPUTS", "BlockInputs", "block_output", "capture_block_inputs", "for_each_block", "move_tensors",
           "run_block"]

NEXT_INPUTS = ("quantized", "fp")
"""What block i+1 sees: the outputs of block i after `process` changed it ("quantized", errors
propagate as in llm-compressor) or before ("fp", every block sees full-precision inputs)."""


class _Captured(Exception):
    """Raised by the capture hook to end the forward pass once block 0's inputs are recorded."""


def move_tensors(obj: Any, device: torch.device | str) -> Any:
    """`obj` with every tensor inside (tuples, lists, dicts) moved to `device`."""
    if isinstance(obj, Tensor):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(move_tensors(o, device) for o in obj)
    if isinstance(obj, list):
        return [move_tensors(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: move_tensors(v, device) for k, v in obj.items()}
    return obj


@dataclass
class BlockInputs:
    """Inputs of one decoder block for every calibration batch.

    hidden: per batch the hidden states [b, T, D] (kept on `store_device`).
    kwargs: per batch the keyword arguments the model passed to the block (masks,
            position embeddings, ...), unchanged from block to block.
    """

    hidden: list[Tensor]
    kwargs: list[dict[str, Any]]
    store_device: torch.device

    def __post_init__(self) -> None:
        if len(self.hidden) != len(self.kwargs):
            raise ValueError(f"BlockInputs: {len(self.hidden)} hidden batches but {len(self.kwargs)} kwargs")

    def batches(self, device: torch.device | str) -> Iterator[tuple[Tensor, dict[str, Any]]]:
        """(hidden, kwargs) per batch, on `device`."""
        for h, kw in zip(self.hidden, self.kwargs):
            yield h.to(device), move_tensors(kw, device)

    def with_hidden(self, hidden: list[Tensor]) -> BlockInputs:
        return BlockInputs([h.to(self.store_device) for h in hidden], self.kwargs, self.store_device)

    @property
    def n_tokens(self) -> int:
        return sum(h.shape[0] * h.shape[1] for h in self.hidden)


def block_output(out: Any) -> Tensor:
    """The hidden states a decoder block returned (a Tensor, or the first element of a tuple)."""
    return out[0] if isinstance(out, (tuple, list)) else out


def _non_block_modules(model: nn.Module, blocks: list[nn.Module]) -> list[nn.Module]:
    """Leaf-most modules holding parameters or buffers outside the decoder blocks (embeddings,
    rotary embedding, final norm, head)."""
    in_blocks = {id(m) for b in blocks for m in b.modules()}
    out = []
    for m in model.modules():
        if id(m) in in_blocks:
            continue
        direct = list(m.parameters(recurse=False)) + list(m.buffers(recurse=False))
        if direct:
            out.append(m)
    return out


@torch.no_grad()
def capture_block_inputs(model: nn.Module, input_ids: Tensor, device: torch.device | str = "cpu",
                         batch_size: int = 1, store_device: torch.device | str | None = None) -> BlockInputs:
    """Run the model on `input_ids` [n, T] in batches up to decoder block 0 and record its inputs.

    Only the modules outside the decoder blocks (embeddings, rotary embedding) move to `device`;
    they go back to where they were afterwards.
    """
    if input_ids.dim() != 2 or input_ids.shape[0] == 0:
        raise ValueError(f"input_ids must be [n_samples, seq_len] with n_samples > 0, got {tuple(input_ids.shape)}")
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    device = torch.device(device)
    store = torch.device(store_device) if store_device is not None else device
    blocks = decoder_blocks(model)
    outside = _non_block_modules(model, blocks)
    homes = [next(iter(list(m.parameters(recurse=False)) + list(m.buffers(recurse=False)))).device for m in outside]
    hidden: list[Tensor] = []
    kwargs: list[dict[str, Any]] = []

    def hook(_mod: nn.Module, args: tuple, kw: dict) -> None:
        kw = dict(kw)
        h = args[0] if args else kw.pop("hidden_states")
        hidden.append(h.detach().to(store))
        kwargs.append(move_tensors({k: v for k, v in kw.items()}, store))
        raise _Captured

    for m in outside:
        m.to(device)
    handle = blocks[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for i in range(0, input_ids.shape[0], batch_size):
            try:
                model(input_ids[i: i + batch_size].to(device), use_cache=False)
            except _Captured:
                continue
            raise RuntimeError("the forward pass never reached decoder block 0")
    finally:
        handle.remove()
        for m, home in zip(outside, homes):
            m.to(home)
    return BlockInputs(hidden, kwargs, store)


@torch.no_grad()
def run_block(block: nn.Module, inputs: BlockInputs, device: torch.device | str) -> list[Tensor]:
    """The block's outputs for every batch of `inputs` (on `inputs.store_device`)."""
    return [block_output(block(h, **kw)).to(inputs.store_device) for h, kw in inputs.batches(device)]


def _device_of(module: nn.Module) -> torch.device:
    p = next(module.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


@torch.no_grad()
def for_each_block(model: nn.Module, inputs: BlockInputs, process: Callable[[int, nn.Module, BlockInputs], None],
                   device: torch.device | str = "cpu", next_inputs: str = "quantized", progress: bool = True,
                   desc: str = "blocks") -> BlockInputs:
    """Call `process(i, block, inputs_of_block_i)` for every decoder block in order, with that block
    (alone) moved to `device`; returns the inputs the block after the last would see.

    `process` may change the block in place (quantize, scale, clip). `next_inputs` picks what the
    following block sees (see NEXT_INPUTS).
    """
    if next_inputs not in NEXT_INPUTS:
        raise ValueError(f"next_inputs={next_inputs!r}: allowed: {', '.join(NEXT_INPUTS)}")
    for i, block in enumerate(tqdm(decoder_blocks(model), desc=desc, disable=not progress)):
        home = _device_of(block)
        block.to(device)
        fp_out = run_block(block, inputs, device) if next_inputs == "fp" else None
        process(i, block, inputs)
        out = fp_out if fp_out is not None else run_block(block, inputs, device)
        block.to(home)
        inputs = inputs.with_hidden(out)
    return inputs
