"""Load a fake-quantized checkpoint's weights into a loaded model (`--awq_model_path_lp`)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from wkvaq_quant.userfiles import reading

__all__ = ["check_checkpoint", "check_torch_files", "load_checkpoint_weights"]

_FILE_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors")


def _files(path: str) -> list[Path]:
    p = Path(path)
    if p.is_file() and p.suffix in _FILE_SUFFIXES:
        return [p]
    if p.is_dir():
        files = sorted(p.glob("*.safetensors")) or sorted(p.glob("*.bin"))
        if files:
            return files
    raise ValueError(f"--awq_model_path_lp {path!r}: no checkpoint there; allowed: a state-dict file "
                     f"({', '.join(_FILE_SUFFIXES)}) or a directory with *.safetensors or *.bin files")


def check_checkpoint(path: str) -> list[Path]:
    """The tensor files of `path` (a state-dict file or a directory of *.safetensors / *.bin), each
    checked before any model loads: a safetensors header that matches the file's size, or a torch
    file that loads (memory-mapped) with weights_only and holds a mapping of tensors. Anything else
    is a ValueError naming the flag and the file."""
    files = _files(path)
    for f in files:
        with reading(f, "--awq_model_path_lp"):
            if f.suffix == ".safetensors":
                from wkvaq_quant.weights.safetensors_io import check_shard

                check_shard(f)
            else:
                _state_dict(f, mmap=True)
    return files


def check_torch_files(files: list[Path], what: str) -> None:
    """Refuse (naming `what` and the file) a torch weight file that does not load with weights_only:
    pickled code, a truncated or foreign file, something other than a mapping of tensors."""
    for f in files:
        with reading(f, what):
            _state_dict(f, mmap=True)


def _state_dict(f: Path, mmap: bool = False) -> dict[str, torch.Tensor]:
    """A torch file's tensors by name (a bare state dict, or one under "state_dict"); weights_only,
    so no pickled code runs."""
    try:
        sd = torch.load(f, map_location="cpu", weights_only=True, mmap=mmap)
    except RuntimeError as err:  # an old (non-zip) torch file cannot be memory-mapped: read it
        if not mmap or "mmap" not in str(err):
            raise
        sd = torch.load(f, map_location="cpu", weights_only=True)
    sd = sd.get("state_dict", sd) if isinstance(sd, dict) else sd
    if not isinstance(sd, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in sd.items()):
        raise ValueError(f"holds a {type(sd).__name__}, not a mapping of tensor names to tensors")
    return sd


def _read(f: Path) -> dict[str, torch.Tensor]:
    with reading(f, "--awq_model_path_lp"):
        if f.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(f))
        return _state_dict(f)


@torch.no_grad()
def load_checkpoint_weights(model: nn.Module, path: str) -> int:
    """Copy every tensor of the checkpoint into the model's parameter of the same name (and shape).

    Returns the number of tensors copied. Names the model does not have, or shapes that differ,
    are errors (a checkpoint of another model must not load silently).
    """
    params = dict(model.state_dict())
    n = 0
    for f in _files(path):
        for name, t in _read(f).items():
            if name not in params:
                raise ValueError(f"--awq_model_path_lp {path!r}: tensor {name!r} is not a parameter of the model")
            if params[name].shape != t.shape:
                raise ValueError(f"--awq_model_path_lp {path!r}: {name!r} has shape {tuple(t.shape)}, the model's "
                                 f"is {tuple(params[name].shape)}")
            params[name].copy_(t)
            n += 1
    if n == 0:
        raise ValueError(f"--awq_model_path_lp {path!r}: the checkpoint holds no tensors")
    return n
