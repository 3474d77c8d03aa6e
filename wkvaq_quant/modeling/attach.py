"""`attach(model, plan)`: apply a QuantPlan to a Hugging Face decoder, removably.

- W: RTN fake quantization of every decoder Linear (q/k/v/o_proj, gate/up/down_proj), once.
- A: forward pre-hooks fake-quantize the inputs of those Linears per token.
- K before RoPE: a forward hook on the output of the module that makes the key just before
  RoPE (k_proj, or k_norm in Qwen3 / Gemma-3; default); after RoPE: in the attention function
  (`--k_quant_post_rope`).
- Q, V, P: inside the registered attention function (see attention.py), selected through
  `model.set_attn_implementation`.

Which modules are blocks, attention modules and Linears, and where pre-RoPE keys are tapped,
comes from the architecture registry (modeling.arch); a family without an entry is refused.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from wkvaq_quant.plan import QuantPlan
from wkvaq_quant.arch import arch_of
from wkvaq_quant.modeling.attention import EAGER, SDPA, STATE_ATTR, LayerState, register_attention_functions
from wkvaq_quant.modeling.kv import heads_to_tokens, key_stats, quantize_keys, tokens_to_heads
from wkvaq_quant.quantize import fake_quantize

__all__ = ["AttachHandle", "attach", "quantize_block_weights", "find_cache", "block_linears", "decoder_blocks", "decoder_linears", "find_attention_modules"]

HANDLE_ATTR = "_wkvaq_handle"


def find_attention_modules(model: nn.Module) -> list[nn.Module]:
    """The attention module of every decoder block, in block order (see modeling.arch)."""
    arch = arch_of(model)
    return [arch.attention_of(b) for b in arch.decoder_blocks(model)]


def decoder_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """Every decoder Linear (the family's attention and MLP Linears) by its module name."""
    return {name: lin for _, _, name, lin in block_linears(model)}


def decoder_blocks(model: nn.Module) -> list[nn.Module]:
    """Decoder blocks in order (the family's decoder-layer modules, by their attention's `layer_idx`)."""
    return arch_of(model).decoder_blocks(model)


def block_linears(model: nn.Module) -> list[tuple[int, str, str, nn.Linear]]:
    """(block index, short name e.g. "down_proj", full module name, Linear) of every decoder Linear."""
    arch = arch_of(model)
    names = {id(m): n for n, m in model.named_modules()}
    out = []
    for i, block in enumerate(arch.decoder_blocks(model)):
        prefix = names[id(block)]
        out += [(i, short, f"{prefix}.{path}" if prefix else path, lin) for short, path, lin in arch.block_linears(block)]
    return out


@dataclass
class AttachHandle:
    """Returned by `attach`; `remove()` restores the model exactly (weights, hooks, attention)."""

    model: nn.Module
    plan: QuantPlan
    attn_implementation: str | None = None  # the model's implementation before attaching
    _hooks: list = field(default_factory=list)
    _weights: dict[str, Tensor] = field(default_factory=dict)
    _input_memo: _InputQuantizer | None = None
    _attn_modules: list = field(default_factory=list)
    removed: bool = False

    def remove(self) -> None:
        if self.removed:
            return
        for h in self._hooks:
            h.remove()
        lin = decoder_linears(self.model)
        with torch.no_grad():
            for name, w in self._weights.items():
                lin[name].weight.copy_(w)
        for m in self._attn_modules:
            if hasattr(m, STATE_ATTR):
                delattr(m, STATE_ATTR)
        if self.attn_implementation is not None:
            self.model.set_attn_implementation(self.attn_implementation)
        if getattr(self.model, HANDLE_ATTR, None) is self:
            delattr(self.model, HANDLE_ATTR)
        self._hooks, self._weights, self._input_memo, self.removed = [], {}, None, True


def _choose_attention(current: str, plan: QuantPlan) -> str | None:
    """The registered function to select, or None to keep the current implementation."""
    if plan.needs_eager or current == "eager":
        return EAGER
    if current == "sdpa":
        return SDPA
    return SDPA if plan.quantizes_attention else None


def find_cache(module: nn.Module, args: tuple, kwargs: dict):
    """The KV cache object of one attention call, found by type among its arguments (whatever the
    keyword: transformers 5.0-5.23 pass `past_key_values=`, 5.24 `cache=`); None without one.

    Raises when more than one argument is a cache, or when a cache lacks `get_seq_length`, rather
    than guess which one the attention updates."""
    from transformers.cache_utils import Cache

    found = [v for v in (*args, *kwargs.values()) if isinstance(v, Cache)]
    if len(found) > 1:
        raise RuntimeError(f"{type(module).__name__}.forward got {len(found)} KV cache objects; the project "
                           f"cannot tell which one holds this layer's keys (transformers "
                           f"{_transformers_version()} is not supported)")
    if found and not callable(getattr(found[0], "get_seq_length", None)):
        raise RuntimeError(f"{type(found[0]).__name__} has no get_seq_length(layer_idx): this transformers "
                           f"version ({_transformers_version()}) changed the cache interface the project relies on")
    return found[0] if found else None


def _transformers_version() -> str:
    import transformers

    return transformers.__version__


def _track_cache(module: nn.Module, args: tuple, kwargs: dict) -> None:
    """Record how many tokens the cache holds before this call (and whether a cache came at all:
    the attention function checks that against the key length it receives)."""
    cache = find_cache(module, args, kwargs)
    state = getattr(module, STATE_ATTR)
    state.cache_seen = cache is not None
    state.past_len = int(cache.get_seq_length(module.layer_idx)) if cache is not None else 0


def _to_tokens(x: Tensor, layout: str) -> Tensor:
    """The pre-RoPE key tap's output in its layout (arch.KEY_LAYOUTS) -> [B, T, Hkv*d]."""
    if layout == "tokens":
        return x
    if layout == "token_heads":  # [B, T, Hkv, d]
        return x.flatten(2)
    return heads_to_tokens(x)  # [B, Hkv, T, d]


def _from_tokens(x: Tensor, like: Tensor, layout: str) -> Tensor:
    """[B, T, Hkv*d] -> the layout and shape of `like` (inverse of _to_tokens)."""
    if layout == "tokens":
        return x
    if layout == "token_heads":
        return x.view(like.shape)
    return tokens_to_heads(x, like.shape[1])


def _pre_rope_key_hook(state: LayerState, layout: str = "tokens"):
    plan = state.plan

    def hook(_mod: nn.Module, _inputs: tuple, raw: Tensor) -> Tensor:
        out = _to_tokens(raw, layout)
        if state.prefill:
            state.k_stats = key_stats(out, plan)
        elif plan.k.enabled and (plan.kv.residual_len or plan.kv.method == "KCVT"):
            raise ValueError(
                "decoding with a KV cache: keys quantized before RoPE are fixed once cached, so "
                f"--kv_residual_len {plan.kv.residual_len} / --kv_quant_method {plan.kv.method} cannot be kept "
                "as tokens age; add --k_quant_post_rope (or use --kv_residual_len 0 with KTVT)"
            )
        k, s = quantize_keys(out, plan, state.k_stats)
        return _from_tokens(k if s is None else k * s, raw, layout)

    return hook


class _InputQuantizer:
    """Forward pre-hook fake-quantizing a Linear's input. q/k/v_proj (and gate/up_proj) receive
    the same tensor: the last result is remembered with the input's identity, version and
    settings, and reused instead of being computed again."""

    def __init__(self) -> None:
        self.last: tuple | None = None  # (input, input._version, args, result)

    def hook(self, args):
        def quant_input(_mod: nn.Module, inputs: tuple) -> tuple:
            x = inputs[0]
            last = self.last
            if last is not None and last[0] is x and last[1] == x._version and last[2] == args:
                return (last[3], *inputs[1:])
            y = fake_quantize(x, args)
            self.last = (x, x._version, args, y)
            return (y, *inputs[1:])

        return quant_input


def quantize_block_weights(model: nn.Module, plan: QuantPlan, index: int | None = None,
                           keep: dict[str, Tensor] | None = None) -> None:
    """RTN fake quantization of the decoder Linears' weights in place (of block `index` only, when
    given), each with its plan settings; `keep` receives a copy of every original weight changed."""
    for block, short, name, lin in block_linears(model):
        if index is not None and block != index:
            continue
        w_args = plan.linear_args(block, short)[0]
        if w_args.enabled:
            if lin.weight.is_meta:
                raise ValueError(f"{name}: its weight is not loaded (meta device), so it cannot be quantized")
            with torch.no_grad():
                if keep is not None:
                    keep[name] = lin.weight.detach().clone()
                lin.weight.copy_(fake_quantize(lin.weight, w_args))


def attach(model: nn.Module, plan: QuantPlan, keep_originals: bool = True, weights: bool = True) -> AttachHandle:
    """Apply `plan` to `model`. Attaching the same plan again returns the existing handle.

    keep_originals: keep a copy of the original weights so that `remove()` restores them
    (False saves memory when the model is used once, as in a perplexity run; `remove()` then
    restores everything but the weights).
    weights: quantize the weights now (False: the caller quantizes each block's weights with
    `quantize_block_weights` once they are loaded, as block-streamed evaluation does; the model's
    blocks may then be on the meta device).
    """
    old: AttachHandle | None = getattr(model, HANDLE_ATTR, None)
    if old is not None:
        if old.plan == plan:
            return old
        raise ValueError("the model already has a different QuantPlan attached; call handle.remove() first")
    attn_modules = find_attention_modules(model)
    if plan.layers is not None:
        plan.layers.check_depth(len(decoder_blocks(model)))
    config = getattr(model, "config", None)
    current = getattr(config, "_attn_implementation", None)
    target = _choose_attention(current, plan) if current is not None else None
    if plan.quantizes_attention and (current is None or not type(model)._can_set_attn_implementation()):
        raise ValueError(f"{type(model).__name__} is not supported for Q/K/V/P quantization: its attention does "
                         f"not dispatch through transformers' AttentionInterface")

    head_dim = attn_modules[0].head_dim
    for bp in {plan.block_plan(m.layer_idx) for m in attn_modules}:
        if bp.folds_v_scale and bp.v.group_size != -1 and bp.v.group_size % head_dim:
            raise ValueError(f"--p_bits {bp.p.bits} with the V-scale fold needs every head inside one V scale group: "
                             f"--v_group_size {bp.v.group_size} does not cover whole heads (head_dim {head_dim}); "
                             f"allowed: -1 or a multiple of {head_dim}, or --no_fold_v_scale")
    handle = AttachHandle(model=model, plan=plan, attn_implementation=current if target else None)
    # W: RTN once; A: inputs of every decoder Linear (settings per block and layer)
    memo = handle._input_memo = _InputQuantizer()
    if weights:
        quantize_block_weights(model, plan, keep=handle._weights if keep_originals else None)
    for block, short, name, lin in block_linears(model):
        a_args = plan.linear_args(block, short)[1]
        if a_args.enabled:
            handle._hooks.append(lin.register_forward_pre_hook(memo.hook(a_args)))
    # per-module state; a pre-hook records how many tokens the KV cache already holds
    for m in attn_modules:
        setattr(m, STATE_ATTR, LayerState(plan=plan.block_plan(m.layer_idx)))
        handle._hooks.append(m.register_forward_pre_hook(_track_cache, with_kwargs=True))
    # K before RoPE: on the output of the module that makes the key just before RoPE (k_proj, k_norm)
    arch = arch_of(model)
    for m in attn_modules:
        bp = getattr(m, STATE_ATTR).plan
        if not bp.kv.k_post_rope and (bp.k.enabled or bp.kv.k_scale or bp.kv.k_bias):
            hook = _pre_rope_key_hook(getattr(m, STATE_ATTR), arch.pre_rope_key_layout)
            handle._hooks.append(m.get_submodule(arch.pre_rope_key).register_forward_hook(hook))
    handle._attn_modules = attn_modules
    if target is not None:
        register_attention_functions()
        model.set_attn_implementation(target)
    setattr(model, HANDLE_ATTR, handle)
    return handle
