"""Attention functions registered with transformers' `AttentionInterface`.

`wkvaq_sdpa` quantizes Q / K / V and calls transformers' own SDPA function; `wkvaq_eager`
does the same around an eager attention (the same ops as Llama's `eager_attention_forward`),
and quantizes the probabilities P after softmax. Each is registered with the mask function
of its base (`sdpa_mask` / `eager_mask`) so causality and sliding windows are kept. The
per-module settings live on the attention module (`module._wkvaq`, set by `attach`); a
module without them runs unquantized.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor, nn

from wkvaq_quant.config import QuantPlan
from wkvaq_quant.modeling.kv import heads_to_tokens, key_stats, quantize_keys, quantize_query, quantize_values, tokens_to_heads
from wkvaq_quant.quantize import fake_quantize

__all__ = ["EAGER", "SDPA", "LayerState", "register_attention_functions"]

SDPA = "wkvaq_sdpa"
EAGER = "wkvaq_eager"
STATE_ATTR = "_wkvaq"


@dataclass
class LayerState:
    """What one attention module applies, and what it remembers between decoding steps.

    past_len: tokens already in the KV cache when the current forward started (0: a prompt,
              or a forward without cache); set by a pre-hook on the attention module.
    k_stats:  (k-scale, k-bias) of the prompt, frozen for the decoding steps after it.
    """

    plan: QuantPlan
    past_len: int = 0
    k_stats: Optional[tuple] = None

    @property
    def prefill(self) -> bool:
        return self.past_len == 0


def _repeat_kv(x: Tensor, n_rep: int) -> Tensor:
    """[B, Hkv, T, d] -> [B, Hkv*n_rep, T, d] (each KV head repeated for its query heads)."""
    b, h, t, d = x.shape
    if n_rep == 1:
        return x
    return x[:, :, None].expand(b, h, n_rep, t, d).reshape(b, h * n_rep, t, d)


def quantize_qkv(module: nn.Module, query: Tensor, key: Tensor, value: Tensor,
                 fold: bool = False) -> tuple[Tensor, Tensor, Tensor, Tensor | None, Tensor | None]:
    """Post-RoPE Q / K and V of one attention call, per the module's plan (identity without one).

    Returns (Q, K, V_hat, U, s_v); U and s_v [B, Hkv, T] only with `fold` (see kv.quantize_values).
    """
    state: LayerState | None = getattr(module, STATE_ATTR, None)
    if state is None:
        return query, key, value, None, None
    plan = state.plan
    s = None
    if plan.kv.post_attn and state.prefill:  # the prompt attends in full precision; only the cache is quantized
        if plan.kv.k_scale or plan.kv.k_bias:
            state.k_stats = key_stats(heads_to_tokens(key), plan)
        return quantize_query(query, plan), key, value, None, None
    if plan.kv.k_post_rope and (plan.k.enabled or plan.kv.k_scale or plan.kv.k_bias):
        k_tok = heads_to_tokens(key)
        if state.prefill:
            state.k_stats = key_stats(k_tok, plan)
        k_tok, s = quantize_keys(k_tok, plan, state.k_stats)
        key = tokens_to_heads(k_tok, key.shape[1])
    value, u, s_v = quantize_values(value, plan, with_scale=fold)
    query = quantize_query(query, plan, s)
    return query, key, value, u, s_v


def wkvaq_sdpa_attention(module: nn.Module, query: Tensor, key: Tensor, value: Tensor,
                         attention_mask: Tensor | None, **kwargs) -> tuple[Tensor, None]:
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    query, key, value, _, _ = quantize_qkv(module, query, key, value)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def _recent_mask(plan: QuantPlan, t_q: int, t_k: int, device: torch.device) -> Tensor:
    """[Tq, T] bool: key j is among query i's `residual_len` newest tokens (the last query is
    the last key). KCVT keys: a token stays full precision until its whole token group is old."""
    pos_q = torch.arange(t_k - t_q, t_k, device=device)[:, None]
    j = torch.arange(t_k, device=device)[None, :]
    if plan.kv.method == "KCVT" and plan.k.enabled and plan.k.group_size != -1:
        g = plan.k.group_size
        j = (j // g + 1) * g - 1  # the last token of j's group
    return j > pos_q - plan.kv.residual_len


def _per_query_attention(module: nn.Module, state: LayerState, query: Tensor, key: Tensor, value: Tensor,
                         attention_mask: Tensor | None, scaling: float, dropout: float) -> tuple[Tensor, Tensor]:
    """Eager attention where every query reads its newest R tokens in full precision.

    Scores and outputs are computed from both the quantized and the full-precision K / V and
    selected per (query, key): S = where(recent, Q.K_fp, Q.K_q), out = P_recent.V_fp + P_old.V_q.
    """
    plan, n_rep, n_kv = state.plan, module.num_key_value_groups, key.shape[1]
    all_q = dataclasses.replace(plan, kv=dataclasses.replace(plan.kv, residual_len=0))  # every token quantized
    s = None
    key_q = key_fp = key
    if plan.k.enabled or plan.kv.k_scale or plan.kv.k_bias:  # post-RoPE keys (checked by QuantPlan)
        k_tok = heads_to_tokens(key)
        if state.prefill:
            state.k_stats = key_stats(k_tok, plan)
        k_q, s = quantize_keys(k_tok, all_q, state.k_stats)
        k_fp, _ = quantize_keys(k_tok, plan, state.k_stats, residual_len=k_tok.shape[1])
        key_q, key_fp = tokens_to_heads(k_q, n_kv), tokens_to_heads(k_fp, n_kv)
    fold = plan.folds_v_scale
    value_q, u, s_v = quantize_values(value, all_q, with_scale=fold)
    query = quantize_query(query, plan, s)
    recent = _recent_mask(plan, query.shape[2], key.shape[2], query.device)  # [Tq, T]

    scores_fp = torch.matmul(query, _repeat_kv(key_fp, n_rep).transpose(2, 3))
    scores_q = torch.matmul(query, _repeat_kv(key_q, n_rep).transpose(2, 3))
    attn_weights = torch.where(recent, scores_fp, scores_q) * scaling
    if attention_mask is not None:
        attn_weights = attn_weights + attention_mask
    attn_weights = nn.functional.softmax(attn_weights, dim=-1, dtype=torch.float32).to(query.dtype)
    if fold:  # old tokens: P * s_v against U; recent tokens: P against V
        s_q = _repeat_kv(s_v[..., None], n_rep).transpose(2, 3)  # [B, Hkv, T, 1] -> [B, H, 1, T]
        attn_weights = torch.where(recent, attn_weights, (attn_weights * s_q).to(query.dtype))
        value_q = u
    if plan.p.enabled:
        attn_weights = fake_quantize(attn_weights, plan.p)
    attn_weights = nn.functional.dropout(attn_weights, p=dropout, training=module.training)
    zero = torch.zeros((), dtype=attn_weights.dtype, device=attn_weights.device)
    attn_output = (torch.matmul(torch.where(recent, attn_weights, zero), _repeat_kv(value, n_rep))
                   + torch.matmul(torch.where(recent, zero, attn_weights), _repeat_kv(value_q, n_rep)))
    return attn_output.transpose(1, 2).contiguous(), attn_weights


def wkvaq_eager_attention(module: nn.Module, query: Tensor, key: Tensor, value: Tensor,
                          attention_mask: Tensor | None, scaling: float, dropout: float = 0.0,
                          **kwargs) -> tuple[Tensor, Tensor]:
    state: LayerState | None = getattr(module, STATE_ATTR, None)
    plan = state.plan if state is not None else None
    if plan is not None and plan.kv.per_query_residual and not (plan.kv.post_attn and state.prefill):
        return _per_query_attention(module, state, query, key, value, attention_mask, scaling, dropout)
    fold = plan is not None and plan.folds_v_scale
    query, key, value, u, s_v = quantize_qkv(module, query, key, value, fold=fold)
    fold = u is not None  # no fold while a prompt attends in full precision (--kv_quant_post_attn)
    n_rep = module.num_key_value_groups
    key_states, value_states = _repeat_kv(key, n_rep), _repeat_kv(u if fold else value, n_rep)

    attn_weights = torch.matmul(query, key_states.transpose(2, 3)) * scaling
    if attention_mask is not None:
        attn_weights = attn_weights + attention_mask
    attn_weights = nn.functional.softmax(attn_weights, dim=-1, dtype=torch.float32).to(query.dtype)
    if fold:  # P' = P * s_v (s_v of each key token, repeated over the GQA groups); out = Q(P') . U
        s_q = _repeat_kv(s_v[..., None], n_rep).transpose(2, 3)  # [B, Hkv, T, 1] -> [B, H, 1, T]
        attn_weights = fake_quantize((attn_weights * s_q).to(query.dtype), plan.p)
    elif plan is not None and plan.p.enabled:
        attn_weights = fake_quantize(attn_weights, plan.p)
    attn_weights = nn.functional.dropout(attn_weights, p=dropout, training=module.training)
    attn_output = torch.matmul(attn_weights, value_states)
    attn_output = attn_output.transpose(1, 2).contiguous()
    return attn_output, attn_weights


def register_attention_functions() -> None:
    """Register `wkvaq_sdpa` / `wkvaq_eager` and their mask functions (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask, sdpa_mask

    AttentionInterface.register(SDPA, wkvaq_sdpa_attention)
    AttentionInterface.register(EAGER, wkvaq_eager_attention)
    AttentionMaskInterface.register(SDPA, sdpa_mask)
    AttentionMaskInterface.register(EAGER, eager_mask)
