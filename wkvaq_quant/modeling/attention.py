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

from wkvaq_quant.arch import arch_of
from wkvaq_quant.plan import QuantPlan
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
    cache_seen: bool = False  # the current call came with a KV cache object

    @property
    def prefill(self) -> bool:
        return self.past_len == 0

    def check_call(self, query: Tensor, key: Tensor) -> None:
        """Fail loudly when the cache seen by the pre-hook contradicts what attention receives: keys
        longer than the queries without a cache object mean transformers passed the cache in a way
        the project did not find (every decoding step would be taken for a prompt); a cache that
        already held tokens must yield more keys than queries."""
        t_q, t_k = query.shape[-2], key.shape[-2]
        if not self.cache_seen and t_k != t_q:
            raise RuntimeError(
                f"attention received {t_k} keys for {t_q} queries, but no KV cache object was found among the "
                f"attention module's arguments: this transformers version passes its cache in a way the "
                f"project does not recognize, and quantized decoding would be wrong; use the versions in "
                f"constraints.txt")
        if self.cache_seen and self.past_len > 0 and t_k <= t_q:
            raise RuntimeError(
                f"the KV cache reported {self.past_len} cached tokens but attention received {t_k} keys for "
                f"{t_q} queries: this transformers version's cache interface is not supported; use the versions "
                f"in constraints.txt")


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
    state.check_call(query, key)
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


def _check_no_softcap(module: nn.Module, kwargs: dict) -> None:
    """Attention-logit soft-capping (tanh(S / c) * c; Gemma-2's, a Gemma-3 config field its 5.24 attention
    does not pass) is not computed by the quantized attention: refuse it rather than drop it."""
    if kwargs.get("softcap") is not None:
        raise ValueError(f"{type(module).__name__} passes attention-logit soft-capping (softcap={kwargs['softcap']}), "
                         f"which the quantized attention does not compute; allowed: a model without it "
                         f"(attn_logit_softcapping null), or --q/k/v/p_bits 16")


def wkvaq_sdpa_attention(module: nn.Module, query: Tensor, key: Tensor, value: Tensor,
                         attention_mask: Tensor | None, **kwargs) -> tuple[Tensor, None]:
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    _check_no_softcap(module, kwargs)
    query, key, value, _, _ = quantize_qkv(module, query, key, value)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


EAGER_BLOCK_ROWS = 64
"""Query rows per block of the eager attention. One block's scores, softmax and P
quantization stay in cache, and keys that the mask hides from a whole block (the future, under
a causal mask; outside a sliding window) are skipped, which halves the work of a causal prompt.
The probabilities of all rows are never materialized at once, so `wkvaq_eager` returns no
attention weights (`output_attentions` gives None)."""


def _key_range(mask_rows: Tensor | None, t_k: int) -> tuple[int, int]:
    """[lo, hi): the keys that at least one of these query rows may see (all keys without a mask,
    or when no key is visible at all, so that fully masked rows behave as in eager attention)."""
    if mask_rows is None:
        return 0, t_k
    visible = mask_rows if mask_rows.dtype == torch.bool else mask_rows > torch.finfo(mask_rows.dtype).min
    cols = visible.reshape(-1, t_k).any(dim=0).nonzero()
    if cols.numel() == 0:
        return 0, t_k
    return int(cols[0]), int(cols[-1]) + 1


def _blocked(query: Tensor, t_k: int, attention_mask: Tensor | None, block_fn) -> Tensor:
    """Run `block_fn(i0, i1, lo, hi, mask)` -> [B, H, i1-i0, d] over blocks of query rows and
    return the output in transformers' layout [B, Tq, H, d]."""
    b, h, t_q, _ = query.shape
    if attention_mask is not None:
        attention_mask = attention_mask[:, :, :, :t_k]
    out = None
    for i0 in range(0, t_q, EAGER_BLOCK_ROWS):
        i1 = min(i0 + EAGER_BLOCK_ROWS, t_q)
        m = None if attention_mask is None else attention_mask[:, :, i0:i1]
        lo, hi = _key_range(m, t_k)
        o = block_fn(i0, i1, lo, hi, None if m is None else m[..., lo:hi])
        if out is None:
            out = o.new_empty(b, t_q, h, o.shape[-1])
        out[:, i0:i1] = o.transpose(1, 2)
    return out


def _softmax(scores: Tensor, mask: Tensor | None, dtype: torch.dtype) -> Tensor:
    if mask is not None:
        scores = scores + mask if mask.dtype != torch.bool else scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    return nn.functional.softmax(scores, dim=-1, dtype=torch.float32).to(dtype)


def _recent_mask(plan: QuantPlan, t_q: int, t_k: int, device: torch.device) -> Tensor:
    """[Tq, T] bool: key j is among query i's `residual_len` newest tokens (the last query is
    the last key). KCVT keys: a token stays full precision until its whole token group is old."""
    pos_q = torch.arange(t_k - t_q, t_k, device=device)[:, None]
    j = torch.arange(t_k, device=device)[None, :]
    if plan.kv.method == "KCVT" and plan.k.enabled and plan.k.group_size != -1:
        g = plan.k.group_size
        j = (j // g + 1) * g - 1  # the last token of j's group
    return j > pos_q - plan.kv.residual_len


def _residual_attention(module: nn.Module, state: LayerState, query: Tensor, key: Tensor, value: Tensor,
                        attention_mask: Tensor | None, scaling: float, dropout: float) -> tuple[Tensor, None]:
    """Eager attention with `residual_len` full-precision tokens, as P3-LLM computes it: against a
    recent token the score uses the full-precision query and key, and its probability stays
    unquantized and meets the full-precision value; against the other tokens the query, key, P and
    value are quantized (and V's scale folded into P).

    Recent tokens: the last R keys for every query ("last", P3-LLM's one forward), or each query's
    own R newest ("per_query", what a decoder with a full-precision buffer sees), where every token
    is also quantized and the pair (query, key) picks: S = where(recent, Q.K, Q_q.K_q).
    """
    plan, n_rep, n_kv = state.plan, module.num_key_value_groups, key.shape[1]
    per_query = plan.kv.per_query_residual
    quant = dataclasses.replace(plan, kv=dataclasses.replace(plan.kv, residual_len=0)) if per_query else plan
    s = None
    key_q = key  # keys quantized before RoPE arrive quantized (the residual tokens as they were)
    if plan.kv.k_post_rope and (plan.k.enabled or plan.kv.k_scale or plan.kv.k_bias):
        k_tok = heads_to_tokens(key)
        if state.prefill:
            state.k_stats = key_stats(k_tok, plan)
        k_q, s = quantize_keys(k_tok, quant, state.k_stats)
        key_q = tokens_to_heads(k_q, n_kv)
    fold = plan.folds_v_scale
    value_q, u, s_v = quantize_values(value, quant, with_scale=fold)
    query_q = quantize_query(query, plan, s)
    t_q, t_k = query.shape[2], key.shape[2]
    key_fp, key_q = _repeat_kv(key, n_rep), _repeat_kv(key_q, n_rep)
    value_fp, value_q = _repeat_kv(value, n_rep), _repeat_kv(u if fold else value_q, n_rep)
    s_q = _repeat_kv(s_v[..., None], n_rep).transpose(2, 3) if fold else None  # [B, Hkv, T, 1] -> [B, H, 1, T]

    def old_p(p: Tensor, lo: int, hi: int) -> Tensor:
        """P against quantized tokens lo..hi: V's scale folded in, then P quantized."""
        if fold:
            p = (p * s_q[..., lo:hi]).to(query.dtype)
        return fake_quantize(p, plan.p) if plan.p.enabled else p

    def drop(p: Tensor) -> Tensor:
        return nn.functional.dropout(p, p=dropout, training=module.training)

    if per_query:
        recent = _recent_mask(plan, t_q, t_k, query.device)  # [Tq, T]

        def block(i0: int, i1: int, lo: int, hi: int, mask: Tensor | None) -> Tensor:
            rec = recent[i0:i1, lo:hi]
            scores = torch.where(rec, torch.matmul(query[:, :, i0:i1], key_fp[:, :, lo:hi].transpose(2, 3)),
                                 torch.matmul(query_q[:, :, i0:i1], key_q[:, :, lo:hi].transpose(2, 3))) * scaling
            p = _softmax(scores, mask, query.dtype)
            p = drop(torch.where(rec, p, old_p(p, lo, hi)))
            zero = torch.zeros((), dtype=p.dtype, device=p.device)
            return (torch.matmul(torch.where(rec, p, zero), value_fp[:, :, lo:hi])
                    + torch.matmul(torch.where(rec, zero, p), value_q[:, :, lo:hi]))

        return _blocked(query, t_k, attention_mask, block), None

    first_recent = max(t_k - plan.kv.residual_len, 0)  # keys first_recent.. are full precision for every query

    def block(i0: int, i1: int, lo: int, hi: int, mask: Tensor | None) -> Tensor:
        c = min(max(first_recent, lo), hi)  # keys lo..c quantized, c..hi full precision
        parts = []
        if c > lo:
            parts.append(torch.matmul(query_q[:, :, i0:i1], key_q[:, :, lo:c].transpose(2, 3)))
        if hi > c:
            parts.append(torch.matmul(query[:, :, i0:i1], key_fp[:, :, c:hi].transpose(2, 3)))
        scores = (parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)) * scaling
        p = _softmax(scores, mask, query.dtype)
        out = 0
        if c > lo:
            out = torch.matmul(drop(old_p(p[..., : c - lo], lo, c)), value_q[:, :, lo:c])
        if hi > c:
            out = out + torch.matmul(drop(p[..., c - lo:]), value_fp[:, :, c:hi])
        return out

    return _blocked(query, t_k, attention_mask, block), None


def wkvaq_eager_attention(module: nn.Module, query: Tensor, key: Tensor, value: Tensor,
                          attention_mask: Tensor | None, scaling: float, dropout: float = 0.0,
                          **kwargs) -> tuple[Tensor, None]:
    """Eager attention (Llama's `eager_attention_forward` math) in blocks of query rows, with
    the module's Q / K / V / P quantization; see EAGER_BLOCK_ROWS."""
    state: LayerState | None = getattr(module, STATE_ATTR, None)
    plan = state.plan if state is not None else None
    if plan is None or not plan.quantizes_attention:  # nothing to quantize: the family's own eager math
        return arch_of(module).eager_attention(module, query, key, value, attention_mask, scaling=scaling,
                                               dropout=dropout, **kwargs)
    _check_no_softcap(module, kwargs)
    if plan.kv.residual_len and not (plan.kv.post_attn and state.prefill):
        state.check_call(query, key)
        return _residual_attention(module, state, query, key, value, attention_mask, scaling, dropout)
    query, key, value, u, s_v = quantize_qkv(module, query, key, value, fold=plan.folds_v_scale)
    fold = u is not None  # no fold while a prompt attends in full precision (--kv_quant_post_attn)
    quant_p = plan.p.enabled
    n_rep = module.num_key_value_groups
    key_states, value_states = _repeat_kv(key, n_rep), _repeat_kv(u if fold else value, n_rep)
    s_q = _repeat_kv(s_v[..., None], n_rep).transpose(2, 3) if fold else None  # [B, Hkv, T, 1] -> [B, H, 1, T]

    def block(i0: int, i1: int, lo: int, hi: int, mask: Tensor | None) -> Tensor:
        scores = torch.matmul(query[:, :, i0:i1], key_states[:, :, lo:hi].transpose(2, 3)) * scaling
        p = _softmax(scores, mask, query.dtype)
        if fold:  # P' = P * s_v (s_v of each key token, repeated over the GQA groups); out = Q(P') . U
            p = (p * s_q[..., lo:hi]).to(query.dtype)
        if quant_p:
            p = fake_quantize(p, plan.p)
        p = nn.functional.dropout(p, p=dropout, training=module.training)
        return torch.matmul(p, value_states[:, :, lo:hi])

    return _blocked(query, key_states.shape[2], attention_mask, block), None


def register_attention_functions() -> None:
    """Register `wkvaq_sdpa` / `wkvaq_eager` and their mask functions (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask, sdpa_mask

    AttentionInterface.register(SDPA, wkvaq_sdpa_attention)
    AttentionInterface.register(EAGER, wkvaq_eager_attention)
    AttentionMaskInterface.register(SDPA, sdpa_mask)
    AttentionMaskInterface.register(EAGER, eager_mask)
