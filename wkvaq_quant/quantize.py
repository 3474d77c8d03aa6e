"""`fake_quantize(x, args)`: the one quantize-dequantize primitive every caller uses.

The tensor is viewed as rows, each row split into groups along its last axis, and the
format registered under `args.dtype` is applied per group:

    per_tensor                       x -> [1, 1, numel]
    per_channel (weight), per_token,
    per_group, per_head              x [..., D] -> [rows, n_groups, group_size], rows = numel / D
    per_channel (activation/q/k/v)   x [..., T, D] -> x^T [..., D, T]: one row per channel,
                                     grouped along the token axis T (KIVI / KCVT keys)

group_size -1 is the whole row. When group_size does not divide the row, the last group of
every row is shorter (D % group_size elements) and gets its own statistics; nothing is padded.
Computation is in fp32 on the input's device; the result has the input's dtype and shape.
On CPU the rows are processed in chunks of about CHUNK_ELEMS elements so that temporaries
stay in cache. No gradient flows through (post-training quantization).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from wkvaq_quant.config import QuantArgs
from wkvaq_quant.formats import QParams, Scratch, double_quantize_scales, get_format

__all__ = ["CHUNK_ELEMS", "QuantResult", "fake_quantize", "quantize"]

CHUNK_ELEMS = 1 << 19
"""Target elements per row chunk on CPU (2 MiB of fp32; a chunk holds at least one row).
Measured on 2 cores: smaller chunks pay per-op dispatch, larger ones spill the caches."""


@dataclass
class QuantResult:
    """Fake-quantized tensor plus the parameters used (None where the format has none).

    Parameters are 2-D [rows, n_groups] in the row layout described in the module docstring
    (for a weight [out, in]: rows = out). `scale` is the scale actually applied (after double
    quantization when enabled: scale = scale_code * scale2).
    """

    x_hat: Tensor
    scale: Tensor | None = None
    zero: Tensor | None = None
    grid: Tensor | None = None
    scale2: Tensor | None = None
    scale_code: Tensor | None = None
    group_size: int = -1


def fake_quantize(x: Tensor, args: QuantArgs) -> Tensor:
    """Quantize and dequantize `x` per `args`; identity (returns `x` itself) when bits >= 16."""
    if not args.enabled:
        return x
    return quantize(x, args).x_hat


def _row_layout(x: Tensor, args: QuantArgs, scaled: bool) -> tuple[Tensor, Callable[[Tensor], Tensor]]:
    """x -> [rows, D] and the function mapping a [rows, D] result back to x's layout."""
    shape = x.shape
    if scaled and args.granularity == "per_tensor":
        return x.reshape(1, -1), lambda y: y.view(shape)
    if scaled and args.granularity == "per_channel" and args.target != "weight":
        if x.dim() < 2:
            raise ValueError(
                f"granularity='per_channel' for target={args.target!r} reduces over the token axis (dim -2); "
                f"got a tensor of shape {tuple(shape)} (needs at least 2 dims)"
            )
        xt = x.transpose(-1, -2)  # [..., T, D] -> [..., D, T]: one row per channel
        tshape = xt.shape
        return xt.reshape(-1, tshape[-1]), lambda y: y.view(tshape).transpose(-1, -2).contiguous()
    # row-wise along the last axis (also every unscaled format: no statistics, any rows work)
    return x.reshape(-1, shape[-1] if x.dim() > 0 else 1), lambda y: y.view(shape)


@torch.no_grad()
def quantize(x: Tensor, args: QuantArgs) -> QuantResult:
    """Fake-quantize `x` and return the quantization parameters as well."""
    if not args.enabled:
        return QuantResult(x_hat=x)
    if not x.is_floating_point():
        raise TypeError(f"fake_quantize expects a floating-point tensor, got {x.dtype}")
    fmt = get_format(args.dtype)
    x2, restore = _row_layout(x, args, fmt.scaled)
    rows, d = x2.shape
    gs = d if (args.group_size == -1 or not fmt.scaled or args.granularity == "per_tensor") else args.group_size
    if x.numel() == 0:
        return QuantResult(x_hat=x.clone(), group_size=gs)
    n_full, rem = divmod(d, gs)
    x2 = x2.contiguous()
    is_fp32 = x2.dtype == torch.float32
    out2 = torch.empty_like(x2)
    chunk = rows if x2.device.type != "cpu" else max(1, CHUNK_ELEMS // d)

    scratch = Scratch()  # temporaries shared by all chunks
    qps: list[QParams] = []
    dq_parts: list[tuple[Tensor, Tensor]] = []
    for r0 in range(0, rows, chunk):
        xc = x2[r0 : r0 + chunk]
        gc = xc if is_fp32 else torch.empty(xc.shape, dtype=torch.float32, device=xc.device).copy_(xc)
        oc = out2[r0 : r0 + chunk] if is_fp32 else scratch.get("out32", gc)
        r = gc.shape[0]
        # [r, D] -> [r, n_full, gs] (+ [r, 1, rem]: the shorter last group)
        parts = []
        if n_full:
            parts.append((gc[:, : n_full * gs].view(r, n_full, gs), oc[:, : n_full * gs].view(r, n_full, gs)))
        if rem:
            parts.append((gc[:, n_full * gs :].view(r, 1, rem), oc[:, n_full * gs :].view(r, 1, rem)))
        qp_list = [fmt.choose_qparams(g, args, scratch) for g, _ in parts]
        qp = qp_list[0] if len(qp_list) == 1 else QParams.cat(qp_list, dim=1)
        if args.double_quant:
            dq = double_quantize_scales(qp.scale)
            qp.scale = dq.scale_hat
            dq_parts.append((dq.code, dq.scale2))
        start = 0
        for g, o in parts:
            fmt.apply(g, qp.narrow(1, start, g.shape[1]), args, o, scratch)
            start += g.shape[1]
        if not is_fp32:
            out2[r0 : r0 + chunk].copy_(oc)
        qps.append(qp)

    res = QuantResult(x_hat=restore(out2), group_size=gs)
    if fmt.scaled:
        qp = QParams.cat(qps, dim=0) if len(qps) > 1 else qps[0]
        res.scale = qp.scale.squeeze(-1)
        res.zero = None if qp.zero is None else qp.zero.squeeze(-1)
        res.grid = None if qp.grid is None else qp.grid.squeeze(-1)
    if dq_parts:
        res.scale_code = torch.cat([c for c, _ in dq_parts]).squeeze(-1)
        res.scale2 = torch.cat([s for _, s in dq_parts])
    return res
