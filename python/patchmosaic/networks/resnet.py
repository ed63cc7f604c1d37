"""The paper's ResNet: no down-sampling, every layer a 3x3 convolution (receptive field 2 depth + 5)."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn
from torch.nn import functional as F

from .embedding import TimeEmbedding, check_padding


class ResNet(nn.Module):
    """``eps = net(t, x, labels)``.

    ``conv_in`` (C -> width), then ``depth`` residual blocks ``h += relu(conv(h + proj(emb)))``, then
    ``conv_out(relu(h + proj_out(emb)))`` (width -> C). All convolutions are 3x3 with ``padding``
    ``'zeros'`` or ``'circular'``, so the network is local (receptive field ``2 depth + 5`` pixels) and
    translation-equivariant (exactly so with circular padding). ``num_classes > 0`` adds a class embedding.
    """

    def __init__(self, channels: int = 1, width: int = 128, depth: int = 6, padding: str = "zeros",
                 num_classes: int = 0, emb_dim: Optional[int] = None):
        super().__init__()
        if channels < 1 or width < 1 or depth < 0:
            raise ValueError(f"need channels >= 1, width >= 1, depth >= 0; got {channels}, {width}, {depth}")
        check_padding(padding)
        self.config = dict(arch="resnet", channels=channels, width=width, depth=depth, padding=padding,
                           num_classes=num_classes, emb_dim=emb_dim)
        emb_dim = emb_dim or width
        self.embed = TimeEmbedding(emb_dim, num_classes)

        def conv(i, o):
            return nn.Conv2d(i, o, 3, padding=1, padding_mode=padding)

        self.conv_in = conv(channels, width)
        self.convs = nn.ModuleList(conv(width, width) for _ in range(depth))
        self.projs = nn.ModuleList(nn.Linear(emb_dim, width) for _ in range(depth))
        self.proj_out = nn.Linear(emb_dim, width)
        self.conv_out = conv(width, channels)

    @property
    def receptive_field(self) -> int:
        """Pixels (per side) of input that one output pixel sees."""
        return 2 * len(self.convs) + 5

    def forward(self, t: torch.Tensor, x: torch.Tensor, labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``t`` ``(B,)``, ``x`` ``(B, C, H, W)``, ``labels`` ``(B,)`` int64 or None -> ``eps`` ``(B, C, H, W)``."""
        emb = F.silu(self.embed(t, labels))
        h = self.conv_in(x)
        for conv, proj in zip(self.convs, self.projs):
            h = h + F.relu(conv(h + proj(emb)[:, :, None, None]))
        h = h + self.proj_out(emb)[:, :, None, None]
        return self.conv_out(F.relu(h))
