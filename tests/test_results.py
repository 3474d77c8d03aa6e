import signal
import subprocess
import sys
import textwrap

import pytest

from wkvaq_quant import results
from wkvaq_quant.results import atomic_write_json, read_result


def test_atomic_write_roundtrip(tmp_path):
    path = tmp_path / "a" / "b.json"
    atomic_write_json(path, {"x": 1.5, "y": [1, 2]})
    assert read_result(path) == {"x": 1.5, "y": [1, 2]}
    assert [p.name for p in path.parent.iterdir()] == ["b.json"]


@pytest.mark.parametrize("existing", [False, True])
def test_crash_mid_write_leaves_old_or_nothing(tmp_path, monkeypatch, existing):
    path = tmp_path / "r.json"
    if existing:
        atomic_write_json(path, {"old": True})

    def crash(_fd):  # the data is partly on disk in the temp file when the process "dies"
        raise OSError("simulated crash during fsync")

    monkeypatch.setattr(results.os, "fsync", crash)
    with pytest.raises(OSError, match="simulated crash"):
        atomic_write_json(path, {"new": "x" * 100_000})
    if existing:
        assert read_result(path) == {"old": True}
    else:
        assert not path.exists()
    assert [p.name for p in tmp_path.iterdir()] == (["r.json"] if existing else [])


def test_nan_is_refused_not_written(tmp_path):
    path = tmp_path / "r.json"
    with pytest.raises(ValueError):
        atomic_write_json(path, {"ppl": float("nan")})
    assert not path.exists()


def test_killed_writer_leaves_complete_or_absent_file(tmp_path):
    """SIGKILL a process that rewrites a large result in a loop: the file always parses."""
    path = tmp_path / "r.json"
    script = textwrap.dedent(f"""
        import sys
        from wkvaq_quant.results import atomic_write_json
        i = 0
        while True:
            atomic_write_json({str(path)!r}, {{"i": i, "pad": "x" * 2_000_000}})
            i += 1
            if i == 3:
                print("ready", flush=True)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    record = read_result(path)
    assert record["i"] >= 2 and len(record["pad"]) == 2_000_000


def test_environment_versions_lists_packages():
    v = results.environment_versions()
    for key in ("wkvaq", "python", "torch", "transformers", "datasets", "platform"):
        assert v[key], key
