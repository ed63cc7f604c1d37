"""Checkpoints as one safetensors file: weights (plus EMA weights and optimiser state when training)
and, in its metadata, the JSON config that rebuilds the network. Nothing is ever unpickled.

A ``config.json`` copy is written beside it for people to read (:func:`side_file`: ``NAME.config.json`` beside a
``NAME.safetensors`` file); loading uses the safetensors metadata.
"""

from __future__ import annotations

import json
import os
from typing import Dict, Optional, Tuple

import torch
from torch import nn

from ..io.files import write_with
from ..io.runstate import write_json
from ..ops.checks import check_cuda_inputs
from .resnet import ResNet
from .unet import UNet

WEIGHTS = "model.safetensors"
ARCHES = {"resnet": ResNet, "unet": UNet}


def build(config: dict) -> nn.Module:
    """A fresh network from its config (``{"arch": "resnet" | "unet", ...constructor arguments}``)."""
    cfg = dict(config)
    arch = cfg.pop("arch", None)
    if arch not in ARCHES:
        raise ValueError(f"unknown network architecture {arch!r}; known: {sorted(ARCHES)}")
    try:
        return ARCHES[arch](**cfg)
    except TypeError as e:
        raise ValueError(f"bad {arch} config {config}: {e}") from None


def save(path: str, net: nn.Module, *, extra: Optional[Dict[str, torch.Tensor]] = None,
         info: Optional[dict] = None) -> None:
    """Write ``net`` (built by :func:`build`) and ``extra`` tensors atomically to ``path`` (a directory
    or a ``.safetensors`` file); ``info`` (JSON-able) is stored next to the network config."""
    from safetensors.torch import save_file

    if not hasattr(net, "config"):
        raise TypeError("save() writes networks of this package (ResNet, UNet); another module's weights go to "
                        "safetensors.torch.save_file(net.state_dict(), path)")
    file = _weights_file(path, create=True)
    tensors = {f"net.{k}": v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    for k, v in (extra or {}).items():
        tensors[k] = v.detach().cpu().contiguous()
    meta = {"config": json.dumps(net.config), "info": json.dumps(info or {}), "format": "patchmosaic-1"}
    write_with(file, lambda tmp: save_file(tensors, tmp, metadata=meta))
    write_json(side_file(file, "config.json"), {"network": net.config, "info": info or {}})


def load(path: str, *, ema: bool = True, device="cpu") -> Tuple[nn.Module, dict, Dict[str, torch.Tensor]]:
    """``(network, info, extra tensors)`` from a checkpoint written by :func:`save`.

    Args:
        path: the checkpoint: a directory holding ``model.safetensors``, or the ``.safetensors`` file.
        ema: use the EMA weights when the checkpoint has them (default True), else the raw weights.
        device: the device to put the network on (default ``"cpu"``); a CUDA device on a torch without
            CUDA is refused (RuntimeError) before anything is read.
    """
    from safetensors import safe_open

    check_cuda_inputs(device=device)
    file = _weights_file(path)
    try:
        with safe_open(file, framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors' own error types: a truncated or foreign file
        raise ValueError(f"{file} is not a readable safetensors checkpoint ({type(e).__name__}: "
                         f"{str(e).splitlines()[0][:200]})") from None
    if "config" not in meta:
        raise ValueError(f"{file} has no patchmosaic network config in its metadata")
    try:
        config = json.loads(meta["config"])
    except ValueError as e:
        raise ValueError(f"{file} has an unreadable network config: {e}") from None
    if not isinstance(config, dict):
        raise ValueError(f"{file} has an unreadable network config: a JSON object was expected, got "
                         f"{meta['config'][:80]!r}")
    try:
        info = json.loads(meta.get("info", "{}"))
    except ValueError as e:
        raise ValueError(f"{file} has unreadable training information in its metadata: {e}") from None
    try:
        net = build(config)
    except ValueError as e:
        raise ValueError(f"{file}: {e}") from None
    prefix = "ema." if ema and any(k.startswith("ema.") for k in tensors) else "net."
    state = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    try:
        missing, unexpected = net.load_state_dict(state, strict=False)
    except RuntimeError as e:  # torch's message: a header line, then one line per mismatched tensor
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        raise ValueError(f"{file} does not match its config {config}: {lines[1] if len(lines) > 1 else lines[0]}"
                         f"{f' (and {len(lines) - 2} more)' if len(lines) > 2 else ''}") from None
    if missing or unexpected:
        raise ValueError(f"{file} does not match its config: missing {missing[:3]}, unexpected {unexpected[:3]}")
    net.to(device).eval()
    extra = {k: v for k, v in tensors.items() if not k.startswith("net.")}
    return net, info, extra


def side_file(path: str, name: str) -> str:
    """The file ``name`` (``config.json``, ``ddim20_samples.npz``) that belongs to the network at ``path``: inside a
    checkpoint folder (whose weights are ``model.safetensors``); beside a ``.safetensors`` file under its name
    (``runs/a.safetensors`` -> ``runs/a.config.json``), so that checkpoints in one folder keep their own; beside any
    other network file (a TorchScript ``model.pt``) as ``name``."""
    if path.endswith(".safetensors") and os.path.basename(path) != WEIGHTS:
        return path[:-len(".safetensors")] + "." + name
    folder = os.path.dirname(path) if path.endswith(".safetensors") or os.path.isfile(path) else path
    return os.path.join(folder, name)


def _weights_file(path: str, create: bool = False) -> str:
    if path.endswith(".safetensors"):
        if not create and not os.path.exists(path):
            raise ValueError(f"no checkpoint at {path}")
        return path
    if create:
        os.makedirs(path, exist_ok=True)
    file = os.path.join(path, WEIGHTS)
    if not create and not os.path.exists(file):
        raise ValueError(f"no checkpoint at {path} (expected {WEIGHTS} inside)")
    return file

