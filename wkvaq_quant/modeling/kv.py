"""Tensor-level Q / K / V transforms of a plan (no model code here).

Layouts: heads `[B, H, T, d]` (what the attention function sees) and tokens `[B, T, H*d]`
(what k_proj / v_proj produce). K and V are always quantized in the tokens layout, so
per-token groups run over the flattened heads*head_dim (group = head_dim is per token-head)
and KCVT's per-channel groups run along T (handled by `fake_quantize`'s per_channel layout).
"""

from __future__ import annotations

import torch
from torch import Tensor

from wkvaq_quant.config import QuantArgs

from wkvaq_quant.plan import QuantPlan
from wkvaq_quant.formats import SCALE_FLOOR
from wkvaq_quant.quantize import fake_quantize, quantize

__all__ = [
    "heads_to_tokens",
    "key_stats",
    "quantize_keys",
    "quantize_query",
    "quantize_tokens",
    "quantize_values",
    "tokens_to_heads",
]


def heads_to_tokens(x: Tensor) -> Tensor:
    """[B, H, T, d] -> [B, T, H*d]."""
    b, h, t, d = x.shape
    return x.transpose(1, 2).reshape(b, t, h * d)


def tokens_to_heads(x: Tensor, n_heads: int) -> Tensor:
    """[B, T, H*d] -> [B, H, T, d]."""
    b, t, c = x.shape
    return x.view(b, t, n_heads, c // n_heads).transpose(1, 2)


def quantize_tokens(x: Tensor, args: QuantArgs, residual_len: int = 0) -> Tensor:
    """Fake-quantize x [B, T, C] per `args`; the last `residual_len` tokens stay as they are."""
    if not args.enabled:
        return x
    t_q = max(x.shape[1] - residual_len, 0)
    if t_q == x.shape[1]:
        return fake_quantize(x, args)
    if t_q == 0:  # every token is recent
        return x
    # x [B, T, C] -> quantized [B, :T-R, C] ++ full-precision [B, T-R:, C]
    return torch.cat([fake_quantize(x[:, :t_q], args), x[:, t_q:]], dim=1)


K_SCALE_BIAS_POWER = 0.6
"""With k-bias, P3-LLM's k-scale is max |K - mu| ** 0.6 per channel (a softened smoothing)."""


def key_stats(k: Tensor, plan: QuantPlan) -> tuple[Tensor | None, Tensor | None]:
    """Per channel of keys [B, T, C] (each [B, 1, C], None when off): k-bias mu = mean over the
    tokens; k-scale s = max over the tokens of |K|, or, with the k-bias, P3-LLM's
    max |K - mu| ** 0.6 (floored at SCALE_FLOOR)."""
    mu = k.mean(dim=1, keepdim=True) if plan.kv.k_bias else None
    s = None
    if plan.kv.k_scale:
        s = k.abs().amax(dim=1, keepdim=True) if mu is None \
            else (k - mu).abs().amax(dim=1, keepdim=True).pow_(K_SCALE_BIAS_POWER)
        s = s.clamp_min_(SCALE_FLOOR)
    return s, mu


def quantize_keys(k: Tensor, plan: QuantPlan, stats: tuple[Tensor | None, Tensor | None] | None = None,
                  residual_len: int | None = None) -> tuple[Tensor, Tensor | None]:
    """Keys [B, T, C] -> (K', s).

    s [B, 1, C] is the k-scale or None; with the k-bias mu [B, 1, C] the quantized part is
    Q((K - mu) / s) + mu / s and the residual (the last `residual_len` tokens, default the
    plan's) is K / s, so K' * s equals K up to quantization error: the caller multiplies either
    K' (pre-RoPE) or the query (post-RoPE) by s. `stats` = (s, mu) frozen at the prompt; None
    computes them from `k`.
    """
    kv = plan.kv
    r = kv.residual_len if residual_len is None else residual_len
    if not (kv.k_scale or kv.k_bias):
        return quantize_tokens(k, plan.k, r), None
    s, mu = key_stats(k, plan) if stats is None else stats
    x = k
    if mu is not None:
        x = x - mu
    if s is not None:
        x = x / s
    t_q = max(k.shape[1] - r, 0)
    old = fake_quantize(x[:, :t_q], plan.k) if t_q else x[:, :0]
    if mu is not None:
        old = old + (mu / s if s is not None else mu)
    res = k[:, t_q:] if s is None else k[:, t_q:] / s
    return torch.cat([old, res], dim=1), s


def quantize_query(q: Tensor, plan: QuantPlan, k_scale: Tensor | None = None) -> Tensor:
    """Query [B, H, T, d] after RoPE: multiply by the k-scale (repeated over the GQA groups),
    then FP8 per (token, head) with groups over d."""
    if k_scale is not None:
        b, h, _, d = q.shape
        s = k_scale.view(b, -1, 1, d)  # [B, 1, Hkv*d] -> [B, Hkv, 1, d]
        q = q * s.repeat_interleave(h // s.shape[1], dim=1)
    return fake_quantize(q, plan.q)


def quantize_values(v: Tensor, plan: QuantPlan, with_scale: bool = False) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Values [B, Hkv, T, d] -> (V_hat, U, s), all in the heads layout.

    With `with_scale`, s [B, Hkv, T] is each token's V scale for each head and U = V_hat / s
    (the integer-domain values of the quantized tokens; the residual tokens keep s = 1, U = V),
    so that P . V_hat = (P * s) . U. Needs every head inside one scale group.
    """
    if not plan.v.enabled:
        return v, None, None
    b, h, t, d = v.shape
    x = heads_to_tokens(v)  # [B, T, Hkv*d]
    if not with_scale:
        return tokens_to_heads(quantize_tokens(x, plan.v, plan.kv.residual_len), h), None, None
    t_q = max(t - plan.kv.residual_len, 0)
    s = torch.ones(b, h, t, dtype=torch.float32, device=v.device)
    v_hat = x
    if t_q:
        res = quantize(x[:, :t_q], plan.v)
        scale = res.scale.view(b, t_q, -1)  # [B*t_q, n_groups] -> [B, t_q, n_groups]
        group_of_head = torch.arange(h, device=v.device) * d // res.group_size  # [Hkv]
        s[:, :, :t_q] = scale[:, :, group_of_head].transpose(1, 2)
        v_hat = torch.cat([res.x_hat, x[:, t_q:]], dim=1)
    v_hat = tokens_to_heads(v_hat, h)
    u = (v_hat / s[..., None]).to(v.dtype)
    return v_hat, u, s
