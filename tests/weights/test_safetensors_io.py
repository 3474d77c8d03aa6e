"""Streaming safetensors reader / writer: byte-compatible with the `safetensors` library both ways."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from wkvaq_quant.weights import safetensors_io as sio

TENSORS = {
    "a.weight": torch.randn(7, 5, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16),
    "b.bias": torch.randn(3, generator=torch.Generator().manual_seed(1)),
    "c.ids": torch.arange(12, dtype=torch.int64).reshape(3, 4),
    "d.mask": torch.tensor([True, False, True]),
    "e.scalar": torch.tensor(2.5, dtype=torch.float16),
}


def _specs(tensors):
    return [(k, v.dtype, tuple(v.shape)) for k, v in tensors.items()]


def test_written_file_loads_in_safetensors(tmp_path):
    path = tmp_path / "x.safetensors"
    with sio.ShardWriter(path, _specs(TENSORS)) as w:
        for k, v in TENSORS.items():
            rows = v.reshape(-1) if v.dim() == 0 else v
            step = 2 if v.dim() > 0 else 1
            for start in range(0, max(1, rows.shape[0]), step):  # several pieces per tensor
                w.write(k, rows[start: start + step] if v.dim() > 0 else v)
    with safe_open(path, "pt") as fh:
        assert set(fh.keys()) == set(TENSORS)
        for k, v in TENSORS.items():
            got = fh.get_tensor(k)
            assert got.dtype == v.dtype and got.shape == v.shape and torch.equal(got, v), k
    assert not list(tmp_path.glob(".*.tmp"))


def test_reads_what_safetensors_wrote(tmp_path):
    path = tmp_path / "y.safetensors"
    save_file(TENSORS, str(path))
    entries = sio.read_entries(path)
    assert set(entries) == set(TENSORS)
    for k, v in TENSORS.items():
        assert torch.equal(sio.read_tensor(entries[k]), v), k
    a = entries["a.weight"]
    assert [c for c in sio.row_chunks(a, max_bytes=2 * a.row_bytes)] == [(0, 2), (2, 4), (4, 6), (6, 7)]
    assert torch.equal(sio.read_rows(a, 2, 5), TENSORS["a.weight"][2:5])
    with pytest.raises(ValueError, match=r"rows \[5, 9\) of a.weight with 7 rows"):
        sio.read_rows(a, 5, 9)


def test_writer_refuses_wrong_order_dtype_and_short_tensors(tmp_path):
    path = tmp_path / "z.safetensors"
    specs = _specs({k: TENSORS[k] for k in ("a.weight", "b.bias")})
    with pytest.raises(ValueError, match="got rows of b.bias, expected a.weight"):
        with sio.ShardWriter(path, specs) as w:
            w.write("b.bias", TENSORS["b.bias"])
    with pytest.raises(ValueError, match="a.weight declared torch.bfloat16, got torch.float32"):
        with sio.ShardWriter(path, specs) as w:
            w.write("a.weight", TENSORS["a.weight"].float())
    with pytest.raises(ValueError, match=r"tensor\(s\) b.bias not written in full"):
        with sio.ShardWriter(path, specs) as w:
            w.write("a.weight", TENSORS["a.weight"])
            w.write("b.bias", TENSORS["b.bias"][:2])
    with pytest.raises(ValueError, match="more bytes for a.weight"):
        with sio.ShardWriter(path, specs) as w:
            w.write("a.weight", torch.cat([TENSORS["a.weight"]] * 2))
    assert not path.exists() and not list(tmp_path.iterdir())  # nothing half-written is left


def test_writer_records_size_and_sha256_and_check_shard_finds_damage(tmp_path):
    """ShardWriter hashes what it writes (the file's sha256 and size); check_shard accepts the file
    and refuses it cut short, grown, with a broken header, or with a header length past its end."""
    import hashlib

    path = tmp_path / "x.safetensors"
    with sio.ShardWriter(path, _specs(TENSORS)) as w:
        for k, v in TENSORS.items():
            w.write(k, v)
    data = path.read_bytes()
    assert (w.nbytes, w.sha256) == (len(data), hashlib.sha256(data).hexdigest())
    assert sio.file_sha256(path) == w.sha256
    assert set(sio.check_shard(path)) == set(TENSORS)
    bad = tmp_path / "bad.safetensors"
    header_len = int.from_bytes(data[:8], "little")
    for damaged, why in [(data[:-3], r"has \d+ bytes, its header declares \d+ \(truncated\)"),
                         (data + b"\0", r"has \d+ bytes, its header declares \d+$"),
                         (data[:8 + header_len // 2], "truncated or not a safetensors file"),
                         (data[:5], "no header length"),
                         (data[:8] + b"\xff" * header_len + data[8 + header_len:], "unreadable safetensors header"),
                         ((1 << 62).to_bytes(8, "little") + data[8:], "truncated or not a safetensors file")]:
        bad.write_bytes(damaged)
        with pytest.raises(ValueError, match=why):
            sio.check_shard(bad)
    bad.write_bytes(data[:8 + header_len // 2])
    with pytest.raises(ValueError, match="truncated or not a safetensors file"):  # no huge read either
        sio.read_entries(bad)


def test_tmp_target_knows_the_writers_temporary_names(tmp_path):
    path = tmp_path / "m.safetensors"
    w = sio.ShardWriter(path, _specs({"b.bias": TENSORS["b.bias"]}))
    tmp_name = next(tmp_path.iterdir()).name
    w.write("b.bias", TENSORS["b.bias"])
    w.__exit__(None, None, None)
    assert sio.tmp_target(tmp_name) == "m.safetensors"
    assert sio.tmp_target(".state.json.k3j_x9q.tmp") == "state.json"  # results.atomic_write_text's
    assert sio.tmp_target("state.json.tmp") is None and sio.tmp_target(".x.tmp") is None
