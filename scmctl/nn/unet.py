"""EDM2-style magnitude-preserving U-Net (Karras et al. 2024, "config G") with the sCM changes.

Written from the EDM2 and sCM papers' descriptions. The changes for continuous-time consistency
training (Lu & Song 2025, §4.1):
- c_noise(t) = t with a positional (not large-scale Fourier) time embedding, in float32;
- adaptive double normalization in every block: y = pnorm(y)·pnorm(s(emb)) + pnorm(b(emb))
  (``adaptive_double_norm: false`` gives EDM2's multiplicative gain instead);
- hand-written norms and functional weight normalization, so torch.func.jvp and torch.compile work;
- an optional guidance-scale input (sCD students), embedded like t and summed into the embedding;
- the adaptive-weighting head w_φ(t) (:meth:`UNet.adaptive_weight`).

The network maps (x_t/σ_d, t) to F_θ, the TrigFlow velocity prediction.

With ``adaptive_double_norm: false``, ``norm_eps_outside: true`` and ``time_embedding: edm`` the
network is EDM2's U-Net exactly (Karras et al. 2024, App. B.7, "config G"), seen in TrigFlow
terms: c_noise(t) = ln(σ_d·tan t)/4 = ln(σ)/4 feeds stored Fourier features, and with EDM2's
preconditioning (c_in x_σ = x_t/σ_d, c_skip = cos²t, c_out = σ_d sin t) its denoiser
c_skip·x_σ + c_out·F_edm = cos t·x_t − sin t·σ_d·F_θ holds with F_θ = −F_edm; the sign lives in
the weights (out_gain and the weighting head negated at import, scmctl.importers).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from scmctl.attention import attention
from scmctl.config import NetworkConfig
from scmctl.errors import UsageError
from scmctl.nn.base import ImageNetwork, class_input, per_sample
from scmctl.nn.layers import (MPConv, TimeEmbedding, clamp, modulate, mp_cat, mp_silu, mp_sum,
                              pixel_norm, resample)

RES_BALANCE = 0.3
ATTN_BALANCE = 0.3
CONCAT_BALANCE = 0.5
EMB_BALANCE = 0.5
CLIP_ACT = 256.0


class Block(nn.Module):
    """A residual U-Net block ('enc' or 'dec'), optionally resampling, optionally with attention."""

    def __init__(self, in_channels: int, out_channels: int, emb_channels: int, flavor: str,
                 resample_mode: str = "keep", attn: bool = False, dropout: float = 0.0,
                 head_channels: int = 64, double_norm: bool = True, attention_backend: str = "auto",
                 attention_jvp: str = "auto", norm_eps_outside: bool = False):
        super().__init__()
        self.flavor, self.resample_mode, self.dropout = flavor, resample_mode, dropout
        self.double_norm, self.norm_eps_outside = double_norm, norm_eps_outside
        self.num_heads = max(1, out_channels // head_channels) if attn else 0
        self.attention_backend, self.attention_jvp = attention_backend, attention_jvp
        self.conv_res0 = MPConv(out_channels if flavor == "enc" else in_channels, out_channels, 3)
        self.emb_scale = MPConv(emb_channels, out_channels)
        if double_norm:
            self.emb_shift = MPConv(emb_channels, out_channels)
        else:
            self.emb_gain = nn.Parameter(torch.zeros([]))
        self.conv_res1 = MPConv(out_channels, out_channels, 3)
        self.conv_skip = MPConv(in_channels, out_channels, 1) if in_channels != out_channels else None
        if attn:
            self.attn_qkv = MPConv(out_channels, out_channels * 3, 1)
            self.attn_proj = MPConv(out_channels, out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        x = resample(x, self.resample_mode)
        if self.flavor == "enc":
            if self.conv_skip is not None:
                x = self.conv_skip(x)
            x = pixel_norm(x, eps_outside=self.norm_eps_outside)
        y = self.conv_res0(mp_silu(x))
        if self.double_norm:
            s = pixel_norm(self.emb_scale(emb))[:, :, None, None]
            b = pixel_norm(self.emb_shift(emb))[:, :, None, None]
            y = modulate(pixel_norm(y), s.to(y.dtype), b.to(y.dtype))
        else:
            y = y * (self.emb_scale(emb, gain=self.emb_gain) + 1)[:, :, None, None].to(y.dtype)
        y = mp_silu(y)
        if self.training and self.dropout > 0:
            y = F.dropout(y, p=self.dropout)
        y = self.conv_res1(y)
        if self.flavor == "dec" and self.conv_skip is not None:
            x = self.conv_skip(x)
        x = mp_sum(x, y, RES_BALANCE)
        if self.num_heads:
            n, c, h, w = x.shape
            qkv = self.attn_qkv(x).reshape(n, self.num_heads, c // self.num_heads, 3, h * w)
            q, k, v = pixel_norm(qkv, dim=2, eps_outside=self.norm_eps_outside).unbind(3)   # cosine attention (EDM2)
            q, k, v = (a.transpose(-1, -2) for a in (q, k, v))      # (N, heads, HW, head_dim)
            # outside autocast: attention keeps q/k/v's dtype and its own fp32 softmax/JVP accumulators
            with torch.autocast(x.device.type, enabled=False):
                y = attention(q, k, v, backend=self.attention_backend, jvp_impl=self.attention_jvp)
            y = y.transpose(-1, -2).reshape(n, c, h, w)
            x = mp_sum(x, self.attn_proj(y), ATTN_BALANCE)
        return clamp(x, CLIP_ACT)


class UNet(ImageNetwork):
    """F_θ(x_t/σ_d, t[, labels, guidance]) for square images of side `resolution`."""

    def __init__(self, cfg: NetworkConfig):
        super().__init__()
        res, img_ch, ncls = cfg.resolution, cfg.channels, cfg.num_classes or 0
        levels = len(cfg.channel_mult)
        if not res or not img_ch:
            raise UsageError("network.resolution and network.channels must be set (or come from data)")
        if res % (2 ** (levels - 1)) != 0 or (res >> (levels - 1)) < 1:
            raise UsageError(f"image size {res} is not divisible by 2^{levels - 1} "
                             f"(network.channel_mult has {levels} levels)")
        self.cfg = cfg
        self.num_classes = ncls
        cblock = [cfg.model_channels * m for m in cfg.channel_mult]
        cnoise = cblock[0]
        cemb = cfg.model_channels * cfg.channel_mult_emb

        self.time_embed = TimeEmbedding(cnoise, cfg.time_embedding, cfg.time_embedding_scale)
        self.emb_noise = MPConv(cnoise, cemb)
        self.emb_guidance = MPConv(cnoise, cemb) if cfg.guidance_input else None
        self.guidance_gain = nn.Parameter(torch.zeros([])) if cfg.guidance_input else None
        self.emb_label = MPConv(ncls, cemb) if ncls else None
        # EDM's augment label (scmctl.data.augment), zero-initialized like the guidance input
        self.emb_augment = MPConv(cfg.augment_dim, cemb) if cfg.augment_dim else None
        self.augment_gain = nn.Parameter(torch.zeros([])) if cfg.augment_dim else None
        self.init_weight_head(cfg)

        def block(cin, cout, flavor, level, mode="keep", attn=False):
            r = res >> level
            p = cfg.dropout if (cfg.dropout_max_resolution == 0 or r <= cfg.dropout_max_resolution) else 0.0
            return Block(cin, cout, cemb, flavor, mode, attn, p, cfg.head_channels,
                         cfg.adaptive_double_norm, cfg.attention_backend, cfg.attention_jvp,
                         cfg.norm_eps_outside)

        self.conv_in = MPConv(img_ch + 1, cblock[0], 3)
        self.enc = nn.ModuleList()
        skips = [cblock[0]]
        cout = cblock[0]
        for level, ch in enumerate(cblock):
            r = res >> level
            if level > 0:
                self.enc.append(block(cout, cout, "enc", level, "down"))
                skips.append(cout)
            for _ in range(cfg.num_blocks):
                cin, cout = cout, ch
                self.enc.append(block(cin, cout, "enc", level, attn=r in cfg.attn_resolutions))
                skips.append(cout)
        self.dec = nn.ModuleList()
        self.dec_takes_skip: list[bool] = []
        for level in reversed(range(levels)):
            r = res >> level
            ch = cblock[level]
            if level == levels - 1:
                self.dec.append(block(cout, cout, "dec", level, attn=True))
                self.dec.append(block(cout, cout, "dec", level))
                self.dec_takes_skip += [False, False]
            else:
                self.dec.append(block(cout, cout, "dec", level, "up"))
                self.dec_takes_skip.append(False)
            for _ in range(cfg.num_blocks + 1):
                cin, cout = cout + skips.pop(), ch
                self.dec.append(block(cin, cout, "dec", level, attn=r in cfg.attn_resolutions))
                self.dec_takes_skip.append(True)
        self.conv_out = MPConv(cout, img_ch, 3)
        self.out_gain = nn.Parameter(torch.zeros([]))
        self.renormalize_()

    def embedding(self, t: torch.Tensor, labels: torch.Tensor | None,
                  guidance: torch.Tensor | None, augment_labels: torch.Tensor | None = None) -> torch.Tensor:
        emb = self.emb_noise(self.time_embed(self.c_noise(t)))
        if self.emb_augment is not None and augment_labels is not None:  # None = zero (sampling)
            emb = emb + self.emb_augment(augment_labels.float(), gain=self.augment_gain)
        if self.emb_guidance is not None:
            # zero-initialized gain: a student initialized from its teacher starts as the teacher
            g = torch.ones_like(t) if guidance is None else guidance.expand_as(t)
            emb = emb + self.emb_guidance(self.time_embed(g), gain=self.guidance_gain)
        if self.emb_label is not None:
            onehot = class_input(labels, t.shape[0], self.num_classes, t.device)
            # one-hot scaled by √num_classes has unit magnitude; an all-zero row = unconditional
            emb = mp_sum(emb, self.emb_label(onehot * self.num_classes ** 0.5), EMB_BALANCE)
        return mp_silu(emb)

    def forward(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None = None,
                guidance: torch.Tensor | None = None, augment_labels: torch.Tensor | None = None) -> torch.Tensor:
        """F_θ(x, t): x = x_t/σ_d (N, C, H, W), t (N,) TrigFlow times in [0, π/2]; augment_labels
        (N, network.augment_dim): what the augmentation did to x's clean image (None = nothing)."""
        t = per_sample(t, x.shape[0])
        emb = self.embedding(t, labels, guidance, augment_labels).to(x.dtype)
        h = torch.cat([x, torch.ones_like(x[:, :1])], dim=1)
        h = self.conv_in(h)
        skips = [h]
        for blk in self.enc:
            h = blk(h, emb)
            skips.append(h)
        for blk, takes in zip(self.dec, self.dec_takes_skip):
            if takes:
                h = mp_cat(h, skips.pop(), t=CONCAT_BALANCE)
            h = blk(h, emb)
        return self.conv_out(h, gain=self.out_gain)
