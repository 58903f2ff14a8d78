"""A small MLP with the same interface as the U-Net, for low-dimensional toy data (tests,
learning checks, ablations): F_θ(x, t[, labels, guidance]) and w_φ(t)."""

from __future__ import annotations

import torch
from torch import nn

from scmctl.nn.layers import TimeEmbedding


class ToyMLP(nn.Module):
    def __init__(self, dim: int = 2, hidden: int = 128, depth: int = 3, emb: int = 32,
                 time_embedding_scale: float = 1.0):
        super().__init__()
        self.num_classes = 0
        self.emb_guidance = None
        self.time_embed = TimeEmbedding(emb, "positional", time_embedding_scale)
        layers, d = [], dim + emb
        for _ in range(depth):
            layers += [nn.Linear(d, hidden), nn.SiLU()]
            d = hidden
        layers.append(nn.Linear(d, dim))
        self.mlp = nn.Sequential(*layers)
        self.weight_head = nn.Sequential(TimeEmbedding(emb, "positional", time_embedding_scale),
                                         nn.Linear(emb, 1))

    def forward(self, x, t, labels=None, guidance=None):
        t = t.reshape(-1).expand(x.shape[0]) if t.numel() == 1 else t.reshape(-1)
        return self.mlp(torch.cat([x, self.time_embed(t).to(x.dtype)], dim=1))

    def adaptive_weight(self, t):
        return self.weight_head(t.reshape(-1)).reshape(-1).float()
