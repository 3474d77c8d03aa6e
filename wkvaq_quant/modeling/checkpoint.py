"""Load a fake-quantized checkpoint's weights into a loaded model (`--awq_model_path_lp`)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

__all__ = ["check_checkpoint", "load_checkpoint_weights"]

_FILE_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors")


def check_checkpoint(path: str) -> list[Path]:
    """The tensor files of `path` (a state-dict file or a directory of *.safetensors / *.bin);
    raises ValueError naming the flag when there are none."""
    p = Path(path)
    if p.is_file() and p.suffix in _FILE_SUFFIXES:
        return [p]
    if p.is_dir():
        files = sorted(p.glob("*.safetensors")) or sorted(p.glob("*.bin"))
        if files:
            return files
    raise ValueError(f"--awq_model_path_lp {path!r}: no checkpoint there; allowed: a state-dict file "
                     f"({', '.join(_FILE_SUFFIXES)}) or a directory with *.safetensors or *.bin files")


def _read(f: Path) -> dict[str, torch.Tensor]:
    if f.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(f))
    sd = torch.load(f, map_location="cpu", weights_only=True)
    return sd.get("state_dict", sd) if isinstance(sd, dict) else sd


@torch.no_grad()
def load_checkpoint_weights(model: nn.Module, path: str) -> int:
    """Copy every tensor of the checkpoint into the model's parameter of the same name (and shape).

    Returns the number of tensors copied. Names the model does not have, or shapes that differ,
    are errors (a checkpoint of another model must not load silently).
    """
    params = dict(model.state_dict())
    n = 0
    for f in check_checkpoint(path):
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
