"""Time (and class) embedding shared by both network families."""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn


class TimeEmbedding(nn.Module):
    """Sinusoidal features of ``1000 t`` through a two-layer MLP, plus a learned vector per class.

    ``forward(t, labels)`` with ``t`` of shape ``(B,)``; ``labels`` ``(B,)`` int64 or None (no class term). The
    result has the dtype of the MLP's weights (a network cast with ``net.to(torch.float64)`` runs in float64).
    """

    def __init__(self, dim: int, num_classes: int = 0):
        super().__init__()
        if dim % 2:
            raise ValueError(f"embedding width must be even, got {dim}")
        self.dim = dim
        self.num_classes = num_classes
        self.mlp = nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.classes = nn.Embedding(num_classes, dim) if num_classes > 0 else None

    def forward(self, t: torch.Tensor, labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        half = self.dim // 2
        dtype = self.mlp[0].weight.dtype  # the features in float64 for a float64 network, else in float32
        work = torch.promote_types(dtype, torch.float32)
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=work) / half)
        args = t.to(work)[:, None] * 1000.0 * freqs[None]
        emb = self.mlp(torch.cat([torch.sin(args), torch.cos(args)], 1).to(dtype))
        if self.classes is not None and labels is not None:
            emb = emb + self.classes(labels)
        return emb


def check_padding(padding: str) -> str:
    if padding not in ("zeros", "circular"):
        raise ValueError(f"padding must be 'zeros' or 'circular', got {padding!r}")
    return padding


def network_classes(net) -> Optional[int]:
    """The number of classes of an eps network's class embedding: 0 for an unconditional network, None when
    it cannot be told. Read from ``net.embed.num_classes``, which this package's ResNet and UNet and the
    TorchScript reference networks (``shared/models``, scripted from the same code) have, else from
    ``net.config["num_classes"]``; any other callable gives None."""
    n = getattr(getattr(net, "embed", None), "num_classes", None)
    if n is None:
        config = getattr(net, "config", None)
        n = config.get("num_classes") if isinstance(config, dict) else None
    if isinstance(n, bool) or not isinstance(n, int):
        return None
    return max(n, 0)


def network_channels(net) -> Optional[int]:
    """The number of image channels an eps network takes, None when it cannot be told: ``net.config["channels"]``
    (this package's ResNet and UNet), else the input channels of the first convolution of the two families as the
    TorchScript reference networks (``shared/models``) hold it (``conv_in`` of a ResNet, ``downs.0.conv1`` of a UNet),
    checked against the output convolution ``conv_out`` (an eps network returns as many channels as it takes)."""
    config = getattr(net, "config", None)
    n = config.get("channels") if isinstance(config, dict) else None
    if isinstance(n, int) and not isinstance(n, bool):
        return n
    named = getattr(net, "named_parameters", None)
    if named is None:
        return None
    try:
        params = dict(named())
    except Exception:  # not a torch module after all
        return None
    first = params.get("conv_in.weight", params.get("downs.0.conv1.weight"))
    out = params.get("conv_out.weight")
    if first is None or out is None or first.dim() != 4 or out.dim() != 4 or int(first.shape[1]) != int(out.shape[0]):
        return None
    return int(first.shape[1])
