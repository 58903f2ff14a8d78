"""Magnitude-preserving layers (EDM2, Karras et al. 2024) with the sCM changes (Lu & Song 2025 §4.1).

Everything here is written with plain tensor ops (no nn.GroupNorm/LayerNorm) so that
``torch.func.jvp`` and ``torch.compile`` work through it, and weight normalization is functional:
forward never modifies a parameter in place (the network is called twice per sCM step). The
"forced" weight normalization of EDM2 is a separate step, :meth:`MPConv.renormalize_`, that the
training loop runs after each optimizer update.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch import nn


def _at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.promote_types(x.dtype, torch.float32))


def pixel_norm(x: torch.Tensor, dim: int = 1, eps: float = 1e-4) -> torch.Tensor:
    """x / √(mean(x², dim) + eps): unit RMS along `dim` (channels), statistics in >= fp32.

    Under forward-mode AD the tangent is written out (tx·r − x·r³·mean(x·tx)) and computed
    without an autograd graph: sCM never differentiates through the tangent.
    """
    p, tx = fwAD.unpack_dual(x)
    pf = _at_least_fp32(p)
    r = torch.rsqrt(pf.square().mean(dim=dim, keepdim=True) + eps)
    y = p * r.to(p.dtype)
    if tx is None:
        return y
    with torch.no_grad():
        pd, rd = pf.detach(), r.detach()
        ty = tx * rd.to(tx.dtype) - (pd * rd.pow(3) * (pd * tx).mean(dim=dim, keepdim=True)).to(tx.dtype)
    return fwAD.make_dual(y, ty)


def mp_silu(x: torch.Tensor) -> torch.Tensor:
    """SiLU scaled to preserve unit magnitude for unit-Gaussian inputs (tangent written out)."""
    p, tx = fwAD.unpack_dual(x)
    if tx is None:
        return F.silu(x) / 0.596
    y = F.silu(p) / 0.596
    with torch.no_grad():
        sg = torch.sigmoid(p.detach())
        ty = tx * (sg * (1 + p.detach() * (1 - sg)) / 0.596)
    return fwAD.make_dual(y, ty)


def _linear(fn, *xs: torch.Tensor) -> torch.Tensor:
    """Apply `fn`, linear in its tensor arguments, to primals and (graph-free) tangents apart.
    Under forward-mode AD PyTorch routes scalar mul/div through slow Python decompositions."""
    parts = [fwAD.unpack_dual(x) for x in xs]
    if all(t is None for _, t in parts):
        return fn(*xs)
    y = fn(*(p for p, _ in parts))
    with torch.no_grad():
        ty = fn(*(torch.zeros_like(p) if t is None else t for p, t in parts))
    return fwAD.make_dual(y, ty)


def mp_sum(a: torch.Tensor, b: torch.Tensor, t: float = 0.5) -> torch.Tensor:
    """Magnitude-preserving interpolation ((1−t)·a + t·b)/√((1−t)² + t²)."""
    s = math.sqrt((1 - t) ** 2 + t ** 2)
    return _linear(lambda a, b: a * ((1 - t) / s) + b * (t / s), a, b)


def mp_cat(a: torch.Tensor, b: torch.Tensor, dim: int = 1, t: float = 0.5) -> torch.Tensor:
    """Magnitude-preserving concatenation with relative weight t for b."""
    na, nb = a.shape[dim], b.shape[dim]
    c = math.sqrt((na + nb) / ((1 - t) ** 2 + t ** 2))
    wa, wb = c / math.sqrt(na) * (1 - t), c / math.sqrt(nb) * t
    return _linear(lambda a, b: torch.cat([a * wa, b * wb], dim=dim), a, b)


def resample(x: torch.Tensor, mode: str) -> torch.Tensor:
    """'down': 2×2 box filter; 'up': nearest-neighbour ×2; 'keep': identity."""
    if mode == "down":
        return _linear(lambda a: F.avg_pool2d(a, 2), x)
    if mode == "up":
        return _linear(lambda a: F.interpolate(a, scale_factor=2.0, mode="nearest"), x)
    return x


def modulate(y: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """y·scale + shift, with a graph-free tangent under forward-mode AD."""
    (p, ty), (ps, ts), (pb, tb) = (fwAD.unpack_dual(a) for a in (y, scale, shift))
    out = p * ps + pb
    if ty is None and ts is None and tb is None:
        return out
    with torch.no_grad():
        t_out = torch.zeros_like(out)
        if ty is not None:
            t_out += ty * ps.detach()
        if ts is not None:
            t_out += p.detach() * ts
        if tb is not None:
            t_out += tb
    return fwAD.make_dual(out, t_out)


def clamp(x: torch.Tensor, limit: float) -> torch.Tensor:
    """Clamp to [−limit, limit], with a graph-free tangent under forward-mode AD."""
    p, tx = fwAD.unpack_dual(x)
    out = p.clamp(-limit, limit)
    if tx is None:
        return out
    with torch.no_grad():
        t_out = tx * (p.detach().abs() <= limit).to(tx.dtype)
    return fwAD.make_dual(out, t_out)


class MPConv(nn.Module):
    """Convolution (kernel k) or linear layer (k = 0) with weights normalized to unit norm per
    output unit on every forward (functionally), so the layer preserves magnitude."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int = 0):
        super().__init__()
        self.out_channels = out_channels
        shape = (out_channels, in_channels) + ((kernel, kernel) if kernel else ())
        self.weight = nn.Parameter(torch.randn(shape))

    def forward(self, x: torch.Tensor, gain: float | torch.Tensor = 1.0) -> torch.Tensor:
        w = _at_least_fp32(self.weight)
        fan_in = w[0].numel()
        w = w / (w.flatten(1).norm(dim=1).reshape(-1, *([1] * (w.ndim - 1))) + 1e-4 * math.sqrt(fan_in))
        w = (w * gain).to(x.dtype)
        primal, tangent = fwAD.unpack_dual(x)
        if tangent is not None:
            # Forward-mode AD: the layer is linear in x and the weights carry no tangent, so the
            # tangent is the same operator on tx. PyTorch's generic rule would also run a third
            # convolution against a materialized zero weight tangent.
            with torch.no_grad():
                t_out = self._op(tangent, w.detach())
            return fwAD.make_dual(self._op(primal, w), t_out)
        return self._op(x, w)

    @staticmethod
    def _op(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        if w.ndim == 2:
            return x @ w.t()
        return F.conv2d(x, w, padding=w.shape[-1] // 2)

    @torch.no_grad()
    def renormalize_(self) -> None:
        """EDM2's forced weight normalization: rescale each output unit to RMS 1 in place.
        Under FSDP2 the weight is a DTensor sharded along dim 0 (output units): every local row is
        a whole unit, so normalizing the local shard is exact."""
        w = self.weight
        if hasattr(w, "to_local"):
            w = w.to_local()
        rms = w.float().flatten(1).square().mean(dim=1).sqrt().reshape(-1, *([1] * (w.ndim - 1)))
        w.copy_((_at_least_fp32(w) / (rms + 1e-4)).to(w.dtype))


class TimeEmbedding(nn.Module):
    """Embedding of c_noise(t) = t, computed in float32 even under autocast (Lu & Song 2025, Sec. 4.1).

    'positional': sinusoids at frequencies scale·10000^(−i/half) (Transformer/DDPM style);
    'fourier': random Fourier features cos(2π·scale·f·t + φ), f ~ N(0, 1) (fixed buffers).
    Output has unit RMS per sample.
    """

    def __init__(self, channels: int, kind: str = "positional", scale: float = 1.0, seed: int = 0):
        super().__init__()
        self.kind, self.scale, self.channels = kind, float(scale), channels
        if kind == "positional":
            half = channels // 2
            freqs = scale * (1.0 / 10000) ** (torch.arange(half, dtype=torch.float64) / half)
            self.register_buffer("freqs", freqs.float(), persistent=False)
        else:
            g = np.random.RandomState(seed)  # fixed features, same on every process
            self.register_buffer("freqs", torch.from_numpy(2 * np.pi * scale * g.randn(channels)).float(),
                                 persistent=False)
            self.register_buffer("phases", torch.from_numpy(2 * np.pi * g.rand(channels)).float(),
                                 persistent=False)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=t.device.type, enabled=False):
            t = _at_least_fp32(t).reshape(-1, 1)
            if self.kind == "positional":
                a = t * self.freqs.to(t.dtype)
                return torch.cat([a.cos(), a.sin()], dim=1) * math.sqrt(2)
            return (t * self.freqs.to(t.dtype) + self.phases.to(t.dtype)).cos() * math.sqrt(2)
