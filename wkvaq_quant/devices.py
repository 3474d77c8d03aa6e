"""`--device_map` and `--max_memory`: a whole model across the GPUs (accelerate's dispatch through
`from_pretrained(device_map=...)`), checked before anything loads."""

from __future__ import annotations

import json
import re
from pathlib import Path

from wkvaq_quant.userfiles import reading

__all__ = ["DEVICE_MAPS", "parse_device_map", "parse_max_memory", "check_device_map"]

DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")
"""accelerate's placement strategies; a JSON object {module name: device} (inline or a .json file) too."""

_MEMORY = re.compile(r"^\d+(\.\d+)?\s*(B|KB|MB|GB|TB|KiB|MiB|GiB|TiB)$", re.IGNORECASE)


def _device(value, where: str):
    """A device of a map: a GPU index, "cpu" or "disk"."""
    if isinstance(value, bool) or not (isinstance(value, int) and value >= 0 or value in ("cpu", "disk")
                                       or isinstance(value, str) and re.fullmatch(r"(cuda:)?\d+", value)):
        raise ValueError(f"{where}: device {value!r}; allowed: a GPU index (0, 1, ...), \"cuda:N\", \"cpu\" or "
                         f"\"disk\"")
    return int(value.removeprefix("cuda:")) if isinstance(value, str) and value not in ("cpu", "disk") else value


def parse_device_map(text: str) -> str | dict:
    """`--device_map`: a strategy name, a JSON object, or a .json file holding one."""
    if text in DEVICE_MAPS:
        return text
    where = "--device_map"
    if text.lstrip().startswith("{"):
        raw = text
    elif text.endswith(".json"):
        with reading(Path(text), where):
            raw = Path(text).read_text()
        where = f"--device_map {text}"
    else:
        raise ValueError(f"--device_map {text!r}: allowed values are {', '.join(DEVICE_MAPS)}, a JSON object "
                         f"{{\"module name\": device}} or a .json file holding one")
    try:
        mapping = json.loads(raw)
    except json.JSONDecodeError as err:
        raise ValueError(f"{where}: not valid JSON ({err.msg} at character {err.pos})") from None
    if not isinstance(mapping, dict) or not mapping:
        raise ValueError(f"{where}: allowed: a non-empty JSON object {{\"module name\": device}}")
    return {str(k): _device(v, where) for k, v in mapping.items()}


def parse_max_memory(text: str) -> dict:
    """`--max_memory`: per device the memory accelerate may fill, "0=40GiB,1=40GiB,cpu=100GiB"."""
    out = {}
    for part in [p.strip() for p in text.split(",") if p.strip()]:
        key, sep, amount = part.partition("=")
        if not sep or not _MEMORY.match(amount.strip()):
            raise ValueError(f"--max_memory {text!r}: {part!r}; allowed: comma-separated DEVICE=AMOUNT, e.g. "
                             f"0=40GiB,1=40GiB,cpu=100GiB (amount units B, KB, MB, GB, TB, KiB, MiB, GiB, TiB)")
        out[_device(key.strip() if not key.strip().isdigit() else int(key), "--max_memory")] = amount.strip()
    if not out:
        raise ValueError(f"--max_memory {text!r}: allowed: comma-separated DEVICE=AMOUNT, e.g. 0=40GiB,cpu=100GiB")
    return out


def check_device_map(device_map: str | dict, max_memory: dict | None, device: str, gpus: int) -> None:
    """A device map needs --device cuda and the GPUs it names; checked before the model loads."""
    if device != "cuda":
        raise ValueError("--device_map places the model across GPUs: it needs --device cuda (and CUDA here)")
    if gpus == 0:
        raise ValueError("--device_map: no CUDA device is available here; allowed: without --device_map on CPU")
    for what, named in (("--device_map", device_map.values() if isinstance(device_map, dict) else ()),
                        ("--max_memory", max_memory or ())):
        gpu = max((d for d in named if isinstance(d, int)), default=-1)
        if gpu >= gpus:
            raise ValueError(f"{what} names GPU {gpu}, but only {gpus} GPU(s) are here (0-{gpus - 1})")
