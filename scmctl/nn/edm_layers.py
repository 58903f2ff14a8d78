"""The layers of EDM's DDPM++/NCSN++ networks (Karras et al. 2022, App. F.2; Song et al. 2021), written
for forward-mode AD.

Written from the EDM paper's architecture description; parameter and buffer names and shapes follow
EDM's published snapshots so their state dicts load (see :mod:`scmctl.nn.songunet`). Every layer
writes its tangent out and computes it without an autograd graph (sCM never differentiates through
the tangent): the affine layers apply their linear part to the tangent, GroupNorm is written with
mean/var by hand (``torch.compile`` of a jvp over ``nn.GroupNorm`` fails) with its tangent
r·(tx − mean(tx) − n·mean(n·tx)), statistics in ≥ fp32.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch import nn

from scmctl.errors import UsageError
from scmctl.nn.layers import _at_least_fp32


def xavier_uniform(shape: tuple[int, ...], fan_in: int, fan_out: int, gain: float = 1.0) -> torch.Tensor:
    """U(−a, a) with a = gain·√(6/(fan_in + fan_out)) (Glorot & Bengio 2010; EDM's DDPM++/NCSN++ init)."""
    return (torch.rand(shape) * 2 - 1) * (gain * math.sqrt(6 / (fan_in + fan_out)))


def _affine(op, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """op(x) + bias for `op` linear in x; under forward-mode AD the tangent is op(tx), graph-free."""
    p, tx = fwAD.unpack_dual(x)
    y = op(p)
    if bias is not None:
        y = y + bias.to(y.dtype).reshape(1, -1, *([1] * (y.ndim - 2)))
    if tx is None:
        return y
    with torch.no_grad():
        ty = op(tx)
    return fwAD.make_dual(y, ty)


class Linear(nn.Module):
    """y = x·Wᵀ + b (keys ``weight`` (out, in), ``bias`` (out))."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, init_gain: float = 1.0):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(xavier_uniform((out_features, in_features), in_features, out_features, init_gain))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        return _affine(lambda a: a @ w.to(a.dtype).t(), x, self.bias)


class Conv2d(nn.Module):
    """Convolution (kernel k; k = 0: none) with optional ×2 up- or downsampling by a separable FIR
    filter f⊗f/(Σf)² (``resample_filter``: [1, 1] = box/nearest, DDPM++; [1, 3, 3, 1], NCSN++).

    Downsampling filters then convolves (``fused``: convolves, then filters with stride 2 — EDM's
    fused variant, used by NCSN++'s residual encoder); upsampling is a stride-2 transposed depthwise
    convolution by 4·f⊗f, then the convolution. Keys: ``weight`` (out, in, k, k), ``bias`` (out),
    ``resample_filter`` (1, 1, len f, len f; a buffer, only when resampling).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel: int, bias: bool = True,
                 resample: str = "keep", resample_filter=(1, 1), fused: bool = False, init_gain: float = 1.0):
        super().__init__()
        if fused and resample != "down":
            raise ValueError("fused resampling is only implemented for downsampling")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.resample, self.fused = resample, fused
        k2 = kernel * kernel
        self.weight = (nn.Parameter(xavier_uniform((out_channels, in_channels, kernel, kernel),
                                                   in_channels * k2, out_channels * k2, init_gain))
                       if kernel else None)
        self.bias = nn.Parameter(torch.zeros(out_channels)) if kernel and bias else None
        if resample != "keep":
            f = torch.as_tensor(resample_filter, dtype=torch.float32)
            self.register_buffer("resample_filter", torch.outer(f, f)[None, None] / f.sum().square())
        else:
            self.resample_filter = None

    def _op(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.to(x.dtype) if self.weight is not None else None
        w_pad = w.shape[-1] // 2 if w is not None else 0
        if self.resample == "keep":
            return F.conv2d(x, w, padding=w_pad)
        f = self.resample_filter.to(x.dtype)
        f_pad = (f.shape[-1] - 1) // 2
        if self.fused:
            x = F.conv2d(x, w, padding=w_pad + f_pad)
            return F.conv2d(x, f.tile(self.out_channels, 1, 1, 1), groups=self.out_channels, stride=2)
        c = x.shape[1]
        if self.resample == "up":
            x = F.conv_transpose2d(x, (f * 4).tile(c, 1, 1, 1), groups=c, stride=2, padding=f_pad)
        else:
            x = F.conv2d(x, f.tile(c, 1, 1, 1), groups=c, stride=2, padding=f_pad)
        return F.conv2d(x, w, padding=w_pad) if w is not None else x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _affine(self._op, x, self.bias)


class GroupNorm(nn.Module):
    """Group normalization (Wu & He 2018) with min(32, C/4) groups, written by hand (keys ``weight``,
    ``bias`` (C,)). Statistics in ≥ fp32; under forward-mode AD the tangent of n = (x − μ)·r,
    r = (var + eps)^(−1/2) over each group, is r·(tx − mean(tx) − n·mean(n·tx)), times the weight."""

    def __init__(self, num_channels: int, num_groups: int = 32, min_channels_per_group: int = 4, eps: float = 1e-5):
        super().__init__()
        self.num_groups = min(num_groups, num_channels // min_channels_per_group)
        if self.num_groups < 1 or num_channels % self.num_groups:
            raise UsageError(f"GroupNorm: {num_channels} channels do not split into min(32, C/4) = "
                             f"{self.num_groups} equal groups; choose network.model_channels·channel_mult "
                             "a multiple of 4 (≤ 128) or of 32")
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p, tx = fwAD.unpack_dual(x)
        n_, c = p.shape[:2]
        shape = (1, c) + (1,) * (p.ndim - 2)
        g = _at_least_fp32(p).reshape(n_, self.num_groups, -1)
        mean = g.mean(dim=2, keepdim=True)
        r = torch.rsqrt(g.var(dim=2, unbiased=False, keepdim=True) + self.eps)
        n = (g - mean) * r
        w = self.weight.to(n.dtype).reshape(shape)
        y = (n.reshape(p.shape) * w + self.bias.to(n.dtype).reshape(shape)).to(p.dtype)
        if tx is None:
            return y
        with torch.no_grad():
            nd, rd = n.detach(), r.detach()
            tg = tx.to(nd.dtype).reshape(n_, self.num_groups, -1)
            tn = rd * (tg - tg.mean(dim=2, keepdim=True) - nd * (nd * tg).mean(dim=2, keepdim=True))
            ty = (tn.reshape(p.shape) * w.detach()).to(tx.dtype)
        return fwAD.make_dual(y, ty)


class PositionalEmbedding(nn.Module):
    """[sin(c·f_i), cos(c·f_i)], f_i = scale·(1/10000)^(i/(C/2 − 1)), i = 0..C/2−1 (Transformer
    sinusoids with the endpoint included, DDPM++; EDM computes [cos, sin] and swaps the halves)."""

    def __init__(self, num_channels: int, scale: float = 1.0, max_positions: int = 10000):
        super().__init__()
        half = num_channels // 2
        freqs = scale * (1.0 / max_positions) ** (torch.arange(half, dtype=torch.float64) / max(half - 1, 1))
        self.register_buffer("freqs", freqs.float(), persistent=False)

    def forward(self, c: torch.Tensor) -> torch.Tensor:
        a = c.reshape(-1, 1) * self.freqs.to(c.dtype)
        return torch.cat([a.sin(), a.cos()], dim=1)


class FourierEmbedding(nn.Module):
    """[sin(2π·f_i·c), cos(2π·f_i·c)] with random frequencies f ~ N(0, scale²) (NCSN++; EDM: scale
    16). The frequencies are a persistent buffer ``freqs`` (C/2,), as in EDM's snapshots."""

    def __init__(self, num_channels: int, scale: float = 16.0):
        super().__init__()
        self.register_buffer("freqs", torch.randn(num_channels // 2) * scale)

    def forward(self, c: torch.Tensor) -> torch.Tensor:
        a = c.reshape(-1, 1) * (2 * np.pi * self.freqs).to(c.dtype)
        return torch.cat([a.sin(), a.cos()], dim=1)
