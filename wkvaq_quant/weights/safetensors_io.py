"""Streaming safetensors I/O: read a tensor (or some of its rows) with plain file reads, and write a
shard tensor by tensor (or chunk by chunk), so no more than one piece is in memory at a time.

`safetensors.safe_open` maps the whole file and `save_file` needs every tensor of the file at
once; for a checkpoint larger than memory, the layer-wise quantizer needs neither. The format is
the one `safetensors` documents: 8 bytes little-endian header length, a JSON header
{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}} padded with
spaces to a multiple of 8, then the tensors' bytes back to back (little-endian, C order).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from torch import Tensor

__all__ = ["CHUNK_BYTES", "DTYPE_CODES", "ShardWriter", "TensorEntry", "check_shard", "file_sha256", "read_entries",
           "read_rows", "read_tensor", "row_chunks", "tmp_target"]

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


def _read_header(path: Path) -> tuple[int, dict]:
    """(header length, parsed header) of a safetensors file; ValueError when it cannot be read."""
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise ValueError(f"{path} is truncated or not a safetensors file ({size} bytes, no header length)")
        header_len = int.from_bytes(head, "little")
        if header_len > size - 8:
            raise ValueError(f"{path} is truncated or not a safetensors file (header of {header_len} bytes, "
                             f"file of {size})")
        raw = fh.read(header_len)
    try:
        header = json.loads(raw)
    except ValueError as err:  # also UnicodeDecodeError
        raise ValueError(f"{path}: unreadable safetensors header ({err.__class__.__name__})") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path}: unreadable safetensors header (not a JSON object)")
    return header_len, header


def read_entries(path: str | Path) -> dict[str, TensorEntry]:
    """The tensors of a safetensors file, from its header alone."""
    path = Path(path)
    return _entries(path, *_read_header(path))


def _entries(path: Path, header_len: int, header: dict) -> dict[str, TensorEntry]:
    header.pop("__metadata__", None)
    out = {}
    for name, e in header.items():
        if e["dtype"] not in _DTYPES:
            raise ValueError(f"{path}: tensor {name} has dtype {e['dtype']}; readable: {', '.join(_DTYPES)}")
        begin, end = e["data_offsets"]
        out[name] = TensorEntry(name, _DTYPES[e["dtype"]], tuple(e["shape"]), path, 8 + header_len + begin,
                                end - begin)
    return out


def check_shard(path: str | Path) -> dict[str, TensorEntry]:
    """The tensors of a safetensors file whose header is readable and whose size is exactly what the
    header declares (8 + header + data: no tensor cut off, nothing appended); ValueError otherwise."""
    path = Path(path)
    header_len, header = _read_header(path)
    try:
        entries = _entries(path, header_len, header)
    except (KeyError, TypeError, ValueError) as err:  # e.g. an entry without dtype / data_offsets
        raise ValueError(f"{path}: unreadable safetensors header ({err})") from None
    data_end = max((e.offset + e.nbytes for e in entries.values()), default=8 + header_len)
    size = path.stat().st_size
    if size != data_end:
        raise ValueError(f"{path} has {size} bytes, its header declares {data_end}"
                         + (" (truncated)" if size < data_end else ""))
    for e in entries.values():
        if e.nbytes != math.prod(e.shape) * torch.empty((), dtype=e.dtype).element_size():
            raise ValueError(f"{path}: tensor {e.name} has {e.nbytes} bytes for shape {e.shape} ({e.dtype})")
    return entries


_TMP = re.compile(r"^\.(?P<target>.+)\.[A-Za-z0-9_]+\.tmp$")


def tmp_target(name: str) -> str | None:
    """The file a temporary file named `name` was to become, if it has the pattern of ShardWriter's
    (`.NAME.PID.tmp`) and results.atomic_write_text's (`.NAME.RANDOM.tmp`) temporary files; else None."""
    m = _TMP.match(name)
    return m["target"] if m else None


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file's bytes, read in pieces of CHUNK_BYTES."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while piece := fh.read(CHUNK_BYTES):
            h.update(piece)
    return h.hexdigest()


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
    an error. Once the file is in place, `nbytes` and `sha256` are its size and the hex sha256 of
    its bytes (hashed while writing). The temporary file is `.NAME.PID.tmp` next to `path`; one
    left by a killed writer is stale (`tmp_name` recognises the pattern).
    """

    def __init__(self, path: str | Path, specs: list[tuple[str, torch.dtype, tuple[int, ...]]],
                 metadata: dict[str, str] | None = None) -> None:
        self.path = Path(path)
        self._tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        self._hash = hashlib.sha256()
        self.nbytes = 0
        self.sha256: str | None = None
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
        self._put(len(raw).to_bytes(8, "little") + raw)

    def _put(self, data) -> None:
        self._fh.write(data)
        self._hash.update(data)
        self.nbytes += len(data)

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
        self._put(data.numpy().data)
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
        self.sha256 = self._hash.hexdigest()
