"""Opening any network the package knows: a checkpoint, a TorchScript file or a preset's name (kept apart from
checkpoint.py, which presets and convert build on, so that the imports run one way)."""

from __future__ import annotations

import os

from torch import nn

from ..ops.checks import check_cuda_inputs
from .checkpoint import load
from .convert import load_torchscript
from .presets import resolve_network_path


def load_network(path: str, *, device="cpu", ema: bool = True) -> nn.Module:
    """An eps network from a patchmosaic checkpoint (directory or ``.safetensors``), a TorchScript file or a
    preset's shipped network (none ships at present).

    TorchScript files (such as the reference networks in ``shared/models``) are loaded with
    ``torch.jit.load``, which runs TorchScript, not Python pickles (TorchScript is deprecated in torch;
    :func:`patchmosaic.networks.convert` turns such a file into a checkpoint of this package).

    Args:
        path: a checkpoint directory, a ``.safetensors`` file, a TorchScript file (e.g. ``model.pt``), or
            ``preset:NAME``: the trained network of that preset where one ships with the package (none does at
            present: a ValueError says to train it with ``patchmosaic train --preset NAME --out DIR`` and use DIR).
        device: the device to put the network on (default ``"cpu"``); a CUDA device on a torch without
            CUDA is refused (RuntimeError) before anything is read.
        ema: for a checkpoint: its EMA weights when it has them (default True), else the raw weights.
    """
    check_cuda_inputs(device=device)
    path = resolve_network_path(os.fspath(path))
    if os.path.isdir(path) or path.endswith(".safetensors"):
        return load(path, ema=ema, device=device)[0]
    if not os.path.exists(path):
        raise ValueError(f"no network at {path}")
    return load_torchscript(path, device)
