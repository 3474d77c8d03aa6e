"""AWQ weight clipping search (llm-awq `auto_clip.py`).

Per linear and per (output row, input group), try max values m_i = amax * (1 - i / n_grid),
i = 0 .. max_shrink * n_grid - 1, clamp the group to [-m_i, m_i], quantize it with the linear's
own weight format, and keep the m_i whose group output sum_k x[t, k] * w_q[o, k] (over the
group's input channels k) has the lowest mean squared error over n_sample_token sampled tokens.
i = 0 is no clipping, so a group is never clipped unless that lowers its error.

The error is computed from the weight change d = w_q - w alone: mean_t (x_g[t] . d)^2 = d G_g d^T
with G_g = mean_t x_g[t]^T x_g[t], the group's [group_size, group_size] token Gram matrix, formed
once per Linear. That is the reference's error in exact arithmetic, in group_size / n_sample_token
of its multiply-adds per candidate, and without subtracting two nearly equal outputs.

As in the reference implementation, q_proj and k_proj are not clipped: their outputs meet in
the attention scores, which the per-linear output error does not see (the family's `clip_skip` in wkvaq_quant.arch).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from wkvaq_quant.weights.awq.apply import group_columns
from wkvaq_quant.config import QuantArgs
from wkvaq_quant.quantize import fake_quantize

__all__ = ["search_clip"]


@torch.no_grad()
def search_clip(weight: Tensor, xs: list[Tensor], args: QuantArgs, n_grid: int = 20, max_shrink: float = 0.5,
                n_sample_token: int = 512, oc_batch: int = 256, a_args: QuantArgs | None = None) -> Tensor:
    """Best clip value per (output row, group): [out, n_groups], fp32 on the weight's device.
    A group size that does not divide the row gives a shorter last group, as in fake_quantize.

    `a_args`: the Linear's input-activation setting (llmc with an `act` section): the candidate's
    group output is Q_a(x)_g . q_g against the full-precision x_g . w_g, i.e. with e = Q_a(x) - x and
    d = q - w, the error (Q_a(x)_g . d + e_g . w_g)^2 = d G d^T + 2 d (C w) + a constant per group,
    G and C the token Gram matrices of Q_a(x)_g with itself and with e_g. Q_a runs per token over
    the whole row, as at inference (llmc quantizes each weight group of the row on its own)."""
    co, ci = weight.shape
    ng = int(group_columns(ci, args.group_size)[-1]) + 1
    gs = ci if args.group_size == -1 else args.group_size
    pad = ng * gs - ci  # zero columns complete the last group; they add nothing to any output
    x = _sample_tokens([t.reshape(-1, ci) for t in xs], n_sample_token)
    cross = None
    if a_args is not None and a_args.enabled:
        xq = fake_quantize(x, a_args)
        e = F.pad((xq - x).float(), (0, pad)).view(-1, ng, gs).transpose(0, 1)
        x = xq
    # x [n_token, ci] -> [n_group, n_token, group_size]; per group the token Gram matrix / n_token
    x = F.pad(x.float(), (0, pad)).view(-1, ng, gs).transpose(0, 1)
    gram = torch.bmm(x.transpose(1, 2), x) / x.shape[1]  # [n_group, gs, gs]
    if a_args is not None and a_args.enabled:
        cross = torch.bmm(x.transpose(1, 2), e) / x.shape[1]  # [n_group, gs, gs]: Q_a(x)_g^T e_g / n
        del e
    del x
    best_all = []
    for o0 in range(0, co, oc_batch):
        # w [b, ci] -> [b, n_group, group_size], zero-padded; the clamps below keep the padding at 0
        w3 = F.pad(weight[o0: o0 + oc_batch].float(), (0, pad)).view(-1, ng, gs)
        b = w3.shape[0]
        org_max = w3.abs().amax(-1)  # [b, n_group]
        best = org_max.clone()
        min_err = torch.full_like(org_max, float("inf"))
        cur = torch.empty_like(w3)
        d = torch.zeros_like(w3)  # its padding stays 0
        cw = None if cross is None else torch.einsum("gjk,bgk->bgj", cross, w3)  # C w per (row, group)
        for i in range(int(max_shrink * n_grid)):
            max_val = org_max * (1 - i / n_grid)
            m = max_val.unsqueeze(-1)
            # clip_weight's clamp, per group through broadcasting
            torch.maximum(torch.minimum(w3, m, out=cur), m.neg(), out=cur)
            q = fake_quantize(cur.view(b, -1)[:, :ci].to(weight.dtype), args)
            # mean over tokens of (x_g . (q - w))^2 = d G d^T per (row, group): [n_group, b, gs]
            d.view(b, -1)[:, :ci].copy_(q)
            d.sub_(w3)
            dt = d.transpose(0, 1)
            err = (torch.bmm(dt, gram) * dt).sum(-1).T  # [b, n_group]
            if cross is not None:  # + 2 d (C w), the activation error's cross term
                err += 2 * (d * cw).sum(-1)
            better = err < min_err
            min_err = torch.where(better, err, min_err)
            best = torch.where(better, max_val, best)
        best_all.append(best)
    return torch.cat(best_all)


def _sample_tokens(xs: list[Tensor], n_sample_token: int) -> Tensor:
    """Every step-th row of the rows of `xs` taken in order (step = n_rows // n_sample_token, at
    least 1), without concatenating all of them first."""
    step = max(1, sum(x.shape[0] for x in xs) // n_sample_token)
    parts, offset = [], 0
    for x in xs:
        parts.append(x[(-offset) % step:: step])
        offset += x.shape[0]
    return torch.cat(parts)
