"""Streaming safetensors I/O: read a tensor (or some of its rows) with plain file reads, and write a
shard tensor by tensor (or chunk by chunk), so no more than one piece is in memory at a time.

`safetensors.safe_open` maps the whole file and `save_file` needs every tensor of the file at
once; for a checkpoint larger than memory, the layer-wise quantizer needs neither. The format is
the one `safetensors` documents: 8 bytes little-endian header length, a JSON header
{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}} padded with
spaces to a multiple of 8, then the tensors' bytes back to back (little-endian, C order).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from torch import Tensor

__all__ = ["CHUNK_BYTES", "DTYPE_CODES", "ShardWriter", "TensorEntry", "read_entries", "read_rows", "read_tensor",
           "row_chunks"]

DTYPE_CODES: dict[torch.dtype, str] = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2", torch.int64: "I64", torch.int32: "I32",
    torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL"}
_DTYPES = {code: dtype for dtype, code in DTYPE_CODES.items()}

CHUNK_BYTES = 8 << 20
"""Row chunks of a tensor read, converted or quantized and written at a time (about this size)."""


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor lies: `file`, its data at bytes [offset, offset + nbytes)."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    file: Path
    offset: int
    nbytes: int

    @property
    def rows(self) -> int:
        """Length of dim 0 (1 for a scalar)."""
        return self.shape[0] if self.shape else 1

    @property
    def row_bytes(self) -> int:
        return self.nbytes // self.rows if self.rows else 0


def read_entries(path: str | Path) -> dict[str, TensorEntry]:
    """The tensors of a safetensors file, from its header alone."""
    path = Path(path)
    with open(path, "rb") as fh:
        header_len = int.from_bytes(fh.read(8), "little")
        header = json.loads(fh.read(header_len))
    header.pop("__metadata__", None)
    out = {}
    for name, e in header.items():
        if e["dtype"] not in _DTYPES:
            raise ValueError(f"{path}: tensor {name} has dtype {e['dtype']}; readable: {', '.join(_DTYPES)}")
        begin, end = e["data_offsets"]
        out[name] = TensorEntry(name, _DTYPES[e["dtype"]], tuple(e["shape"]), path, 8 + header_len + begin,
                                end - begin)
    return out


def read_rows(entry: TensorEntry, start: int = 0, stop: int | None = None) -> Tensor:
    """Rows [start, stop) of the tensor (all of it by default) as a new CPU tensor."""
    stop = entry.rows if stop is None else stop
    if not 0 <= start <= stop <= entry.rows:
        raise ValueError(f"rows [{start}, {stop}) of {entry.name} with {entry.rows} rows")
    nbytes = (stop - start) * entry.row_bytes
    buf = torch.empty(nbytes, dtype=torch.uint8)
    with open(entry.file, "rb") as fh:
        fh.seek(entry.offset + start * entry.row_bytes)
        if nbytes and fh.readinto(buf.numpy()) != nbytes:
            raise ValueError(f"{entry.file} is truncated (tensor {entry.name})")
    shape = (stop - start, *entry.shape[1:]) if entry.shape else ()
    return buf.view(entry.dtype).reshape(shape)


def read_tensor(entry: TensorEntry) -> Tensor:
    return read_rows(entry)


def row_chunks(entry: TensorEntry, max_bytes: int | None = None) -> Iterator[tuple[int, int]]:
    """[start, stop) row ranges of about `max_bytes` (CHUNK_BYTES by default) each, at least one row."""
    step = max(1, (CHUNK_BYTES if max_bytes is None else max_bytes) // max(1, entry.row_bytes))
    for start in range(0, entry.rows, step):
        yield start, min(entry.rows, start + step)


class ShardWriter:
    """Write one safetensors file piece by piece, atomically (a temporary file renamed at the end).

        with ShardWriter(path, [(name, dtype, shape), ...]) as w:
            w.write(name, rows)   # in the declared order, each tensor's rows in order

    Leaving the block with an exception removes the temporary file; a tensor left incomplete is
    an error.
    """

    def __init__(self, path: str | Path, specs: list[tuple[str, torch.dtype, tuple[int, ...]]],
                 metadata: dict[str, str] | None = None) -> None:
        self.path = Path(path)
        self._tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        header: dict[str, object] = {"__metadata__": metadata or {"format": "pt"}}
        self._left: dict[str, int] = {}
        self._dtype: dict[str, torch.dtype] = {}
        offset = 0
        for name, dtype, shape in specs:
            if dtype not in DTYPE_CODES:
                raise ValueError(f"tensor {name}: dtype {dtype} cannot be written; allowed: "
                                 f"{', '.join(str(d) for d in DTYPE_CODES)}")
            if name in self._left:
                raise ValueError(f"tensor {name} declared twice")
            nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
            header[name] = {"dtype": DTYPE_CODES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            self._left[name], self._dtype[name] = nbytes, dtype
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self._order = [name for name, _, _ in specs]
        self._fh = open(self._tmp, "wb")
        self._fh.write(len(raw).to_bytes(8, "little") + raw)

    def write(self, name: str, rows: Tensor) -> None:
        """Append `rows` (the next rows of tensor `name`, its declared dtype) to the file."""
        current = next((n for n in self._order if self._left[n] > 0), None)
        if name != current:
            raise ValueError(f"ShardWriter: got rows of {name}, expected {current} (declared order, each in full)")
        if rows.dtype != self._dtype[name]:
            raise ValueError(f"ShardWriter: {name} declared {self._dtype[name]}, got {rows.dtype}")
        data = rows.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
        if data.numel() > self._left[name]:
            raise ValueError(f"ShardWriter: more bytes for {name} than its declared shape holds")
        self._fh.write(data.numpy().data)
        self._left[name] -= data.numel()

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self._fh.close()
        if exc_type is not None:
            self._tmp.unlink(missing_ok=True)
            return
        short = [n for n in self._order if self._left[n]]
        if short:
            self._tmp.unlink(missing_ok=True)
            raise ValueError(f"ShardWriter: tensor(s) {', '.join(short[:3])} not written in full")
        os.replace(self._tmp, self.path)
