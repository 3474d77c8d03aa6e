"""The number-format interface and registry (formats register themselves by name)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, TypeVar

import torch
from torch import Tensor

if TYPE_CHECKING:
    from wkvaq_quant.config import QuantArgs

__all__ = [
    "NumberFormat",
    "QParams",
    "Scratch",
    "available_formats",
    "get_format",
    "register_format",
]


@dataclass
class QParams:
    """Per-group quantization parameters, each [rows, n_groups, 1] (None when unused).

    scale: fp32 step (int) or max-magnitude scale (fp, bitmod).
    zero:  int zero point (integral fp32 values) or float zero point (the group minimum).
    grid:  bitmod: int8 index of the grid each group chose (see formats.bitmod.BITMOD_GRIDS).
    """

    scale: Tensor | None = None
    zero: Tensor | None = None
    grid: Tensor | None = None

    @staticmethod
    def cat(parts: list[QParams], dim: int) -> QParams:
        def _cat(name: str) -> Tensor | None:
            vals = [getattr(p, name) for p in parts]
            return None if vals[0] is None else torch.cat(vals, dim=dim)

        return QParams(scale=_cat("scale"), zero=_cat("zero"), grid=_cat("grid"))

    def narrow(self, dim: int, start: int, length: int) -> QParams:
        def _n(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.narrow(dim, start, length)

        return QParams(scale=_n(self.scale), zero=_n(self.zero), grid=_n(self.grid))


class Scratch:
    """Temporaries reused across the row chunks of one quantize call.

    A fresh multi-MiB temporary per chunk costs page faults (the allocator returns large blocks
    to the OS); handing out views of buffers kept here avoids that. Without a Scratch (None),
    `Scratch.like` allocates.
    """

    def __init__(self) -> None:
        self._bufs: dict[str, Tensor] = {}

    def get(self, name: str, ref: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
        n = ref.numel()
        buf = self._bufs.get(name)
        if buf is None or buf.numel() < n or buf.dtype != dtype or buf.device != ref.device:
            buf = torch.empty(n, dtype=dtype, device=ref.device)
            self._bufs[name] = buf
        return buf[:n].view(ref.shape)

    @staticmethod
    def like(scratch: Scratch | None, name: str, ref: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
        """A buffer shaped like `ref` (contents undefined): from `scratch`, or newly allocated."""
        if scratch is None:
            return torch.empty(ref.shape, dtype=dtype, device=ref.device)
        return scratch.get(name, ref, dtype)


class NumberFormat:
    """A number format. Subclasses set the class attributes and implement the two steps.

    Both steps see `g`: fp32 [rows, n_groups, group_size] (read-only, may be a strided view).
    `choose_qparams` reduces each group to its parameters; `apply` writes the fake-quantized
    values into `out` (same shape, fp32) using possibly modified (double-quantized) parameters.
    `scratch` (optional) lends reusable temporaries.
    """

    name: str = ""
    bits: tuple[int, ...] = ()
    scaled: bool = True
    symmetric_modes: tuple[bool, ...] = (True,)
    default_symmetric: bool = True

    def choose_qparams(self, g: Tensor, args: QuantArgs, scratch: Scratch | None = None) -> QParams:
        raise NotImplementedError

    def apply(self, g: Tensor, qp: QParams, args: QuantArgs, out: Tensor, scratch: Scratch | None = None) -> None:
        raise NotImplementedError

    def bind(self, qp: QParams, args: QuantArgs) -> Callable[[Tensor, Tensor], None]:
        """`apply` with fixed parameters, for many calls on small slices (GPTQ quantizes one column
        at a time with its group's parameters): returns f(g, out) writing what apply writes.
        Formats override it to do once what depends only on the parameters."""
        scratch = Scratch()
        return lambda g, out: self.apply(g, qp, args, out, scratch)


_REGISTRY: dict[str, NumberFormat] = {}
F = TypeVar("F", bound=type)


def register_format(name: str) -> Callable[[F], F]:
    """Class decorator: instantiate a NumberFormat subclass and register it under `name`."""

    def deco(cls: F) -> F:
        if name in _REGISTRY:
            raise ValueError(f"number format {name!r} is already registered")
        inst = cls()
        inst.name = name
        _REGISTRY[name] = inst
        return cls

    return deco


def get_format(name: str) -> NumberFormat:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown number format {name!r}; registered: {', '.join(sorted(_REGISTRY))}") from None


def available_formats() -> tuple[str, ...]:
    return tuple(sorted(_REGISTRY))
