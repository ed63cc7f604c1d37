"""The paper's three-level UNet, optionally with self-attention at the coarsest level."""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from .embedding import TimeEmbedding, check_padding


EMBED_AT = ("hidden", "input")  # where a block adds the time/class embedding


class Block(nn.Module):
    """Two 3x3 convolutions with ReLU; the time/class embedding is added after the first (``embed_at="hidden"``)
    or to the block's input (``"input"``: ``relu(conv2(relu(conv1(x + proj(emb)))))``, the reference networks'
    layout)."""

    def __init__(self, cin: int, cout: int, emb_dim: int, padding: str, embed_at: str = "hidden"):
        super().__init__()
        self.embed_at = embed_at
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1, padding_mode=padding)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, padding_mode=padding)
        self.proj = nn.Linear(emb_dim, cin if embed_at == "input" else cout)

    def forward(self, x, emb):
        e = self.proj(emb)[:, :, None, None]
        if self.embed_at == "input":
            return F.relu(self.conv2(F.relu(self.conv1(x + e))))
        return F.relu(self.conv2(F.relu(self.conv1(x) + e)))


class SelfAttention(nn.Module):
    """Multi-head self-attention over all pixels (GroupNorm first, residual): a global, non-local layer."""

    def __init__(self, ch: int, heads: int = 4):
        super().__init__()
        self.norm = nn.GroupNorm(min(8, ch), ch)
        self.attn = nn.MultiheadAttention(ch, heads, batch_first=True)

    def forward(self, x):
        B, C, H, W = x.shape
        h = self.norm(x).reshape(B, C, H * W).transpose(1, 2)
        h, _ = self.attn(h, h, h, need_weights=False)
        return x + h.transpose(1, 2).reshape(B, C, H, W)


class UNet(nn.Module):
    """``eps = net(t, x, labels)``; widths per level (default 64/128/256), max-pool down, transposed
    convolutions up, skip connections by concatenation. ``attention=True`` inserts 4-head self-attention
    after the coarsest block (the paper's "attention breaks locality" experiment). ``embed_at``: where each
    block adds the time/class embedding, after its first convolution (``"hidden"``, the default) or to its
    input (``"input"``, as the reference networks in ``shared/models`` do). H and W must be divisible by
    ``2 ** (levels - 1)``.
    """

    def __init__(self, channels: int = 1, widths: Sequence[int] = (64, 128, 256), padding: str = "zeros",
                 num_classes: int = 0, attention: bool = False, heads: int = 4, emb_dim: Optional[int] = None,
                 embed_at: str = "hidden"):
        super().__init__()
        widths = [int(w) for w in widths]
        if len(widths) < 2 or min(widths) < 1:
            raise ValueError(f"widths must list at least two positive widths, got {widths}")
        check_padding(padding)
        if attention and (widths[-1] % heads or widths[-1] % min(8, widths[-1])):  # (SelfAttention's GroupNorm)
            raise ValueError(f"widths: with attention the last width must be a multiple of the {heads} attention heads "
                             f"and, above 8, of the 8 GroupNorm groups (e.g. {math.lcm(heads, 8)}), got widths "
                             f"{widths}")
        if embed_at not in EMBED_AT:
            raise ValueError(f"embed_at must be one of {EMBED_AT}, got {embed_at!r}")
        self.config = dict(arch="unet", channels=channels, widths=widths, padding=padding,
                           num_classes=num_classes, attention=attention, heads=heads, emb_dim=emb_dim)
        if embed_at != "hidden":  # only then: configs (and checkpoints) of the default layout stay as they were
            self.config["embed_at"] = embed_at
        emb_dim = emb_dim or widths[-1]
        self.embed = TimeEmbedding(emb_dim, num_classes)
        ins = [channels] + widths[:-2]
        self.downs = nn.ModuleList(Block(i, o, emb_dim, padding, embed_at) for i, o in zip(ins, widths[:-1]))
        self.mid = Block(widths[-2], widths[-1], emb_dim, padding, embed_at)
        self.attn = SelfAttention(widths[-1], heads) if attention else nn.Identity()
        rev = widths[::-1]
        self.ups = nn.ModuleList(nn.ConvTranspose2d(i, o, 2, stride=2) for i, o in zip(rev[:-1], rev[1:]))
        self.outs = nn.ModuleList(Block(2 * o, o, emb_dim, padding, embed_at) for o in rev[1:])
        self.last = nn.Linear(emb_dim, widths[0])
        self.conv_out = nn.Conv2d(widths[0], channels, 3, padding=1, padding_mode=padding)

    def forward(self, t: torch.Tensor, x: torch.Tensor, labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``t`` ``(B,)``, ``x`` ``(B, C, H, W)``, ``labels`` ``(B,)`` int64 or None -> ``eps`` ``(B, C, H, W)``."""
        f = 2 ** (len(self.downs))
        if x.shape[-1] % f or x.shape[-2] % f:
            raise ValueError("UNet needs H and W divisible by " + str(f) + ", got " + str(x.shape[-2]) + "x"
                             + str(x.shape[-1]))
        emb = F.silu(self.embed(t, labels))
        skips = []
        h = x
        for block in self.downs:
            h = block(h, emb)
            skips.append(h)
            h = F.max_pool2d(h, 2)
        h = self.attn(self.mid(h, emb))
        for up, block in zip(self.ups, self.outs):
            h = block(torch.cat([skips.pop(), up(h)], 1), emb)
        return self.conv_out(h + self.last(emb)[:, :, None, None])
