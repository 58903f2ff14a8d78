"""The DDPM++ and NCSN++ U-Nets (Song et al. 2021, as configured by EDM, Karras et al. 2022 App. F.2)
with the sCM changes (Lu & Song 2025, Sec. 4.1) — the paper's CIFAR-10 network (App. G).

``network.arch`` picks the family; the other ``network.*`` options configure one network:

| | DDPM++ (``ddpmpp``) | NCSN++ (``ncsnpp``) |
|---|---|---|
| noise embedding (EDM) | positional, C channels | Fourier (scale 16), 2C channels |
| encoder | standard | residual (an FIR-downsampled 3×3 conv path beside the blocks) |
| resampling filter | [1, 1] | [1, 3, 3, 1] |

Both: GroupNorm (min(32, C/4) groups, eps 1e-6), SiLU, dropout, skip connections scaled by 1/√2,
a 1×1 projection on resampling skips, single-head attention at ``attn_resolutions`` (in the decoder
only in the last block of a level), the standard decoder (GroupNorm, SiLU, 3×3 conv at the end).
EDM's CIFAR-10 configuration: model_channels 128, channel_mult [2, 2, 2], 4 blocks per resolution,
attention at 16×16, channel_mult_emb 4, dropout 0.13: 55.7M parameters (DDPM++), 56.4M (NCSN++).

The sCM changes (the defaults) and the EDM options (for EDM's snapshots):

- time conditioning: the second argument of :meth:`SongUNet.forward` is the TrigFlow time t,
  embedded as ``network.time_embedding`` says (``time_embedding_scale`` as frequency multiplier)
  after :meth:`~scmctl.nn.base.ImageNetwork.c_noise`: c_noise(t) = t with a positional embedding
  (Lu & Song 2025 Sec. 4.1), or for ``time_embedding: edm`` (imported EDM snapshots) EDM's
  c_noise = ln(σ_d tan t)/4 (EDM Table 1) with the family's EDM embedding (DDPM++: positional,
  scale 1; NCSN++: Fourier, scale 16);
- ``adaptive_double_norm: true``: adaptive double normalization, y = GN(x)·pnorm(s(emb)) +
  pnorm(b(emb)), where s, b come from one linear layer (``affine``, 2C outputs);
  ``false``: EDM's additive conditioning y = GN(x + b(emb)) (``affine``, C outputs);
- the output is F_θ(x_t/σ_d, t), the TrigFlow velocity (Lu & Song 2025 Eq. 5–6); for an EDM
  snapshot it is −F_x, EDM's raw output with the sign folded into the last layer at import
  (scmctl.importers.edm);
- ``augment_dim``: EDM's augmentation-label input (9 for its CIFAR-10 pipeline), added to the noise
  embedding by a bias-free linear layer; zero (or None) at sampling;
- ``guidance_input`` (sCD students): the guidance scale s embedded like c_noise through a zero-
  initialized linear layer (``emb_guidance``), so a student initialized from its teacher starts as it;
- the adaptive-weighting head w_φ(t) (``weight_linear``; :class:`scmctl.nn.base.ImageNetwork`).

State-dict correspondence with EDM's ``SongUNet`` (the ``model.`` submodule of its EDMPrecond/
VPPrecond/VEPrecond): the same names and shapes — ``map_noise.freqs`` (NCSN++), ``map_label``,
``map_augment``, ``map_layer0``, ``map_layer1``, ``enc.{R}x{R}_conv``, ``enc.{R}x{R}_down``,
``enc.{R}x{R}_aux_residual`` (NCSN++), ``enc.{R}x{R}_block{i}``, ``dec.{R}x{R}_in0/in1``,
``dec.{R}x{R}_up``, ``dec.{R}x{R}_block{i}``, ``dec.{R}x{R}_aux_norm/aux_conv``; each block
``norm0, conv0, affine, norm1, conv1, skip, norm2, qkv, proj`` and the ``resample_filter`` buffers
of resampling convolutions. With ``adaptive_double_norm: false`` and the EDM embedding an EDM state
dict loads after the mechanical mapping: strip the ``model.`` prefix and add ``weight_linear.weight``
(scmctl's w_φ head, which EDM does not have). With adaptive double normalization each ``affine`` has
2C outputs (EDM's ``adaptive_scale`` layout: scale first, then shift).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from scmctl.attention import attention
from scmctl.config import NetworkConfig
from scmctl.errors import UsageError
from scmctl.nn.base import ImageNetwork, class_input, per_sample
from scmctl.nn.edm_layers import Conv2d, FourierEmbedding, GroupNorm, Linear, PositionalEmbedding
from scmctl.nn.layers import linear_map, modulate, pixel_norm, silu

# What the family name fixes (EDM's train.py options for --arch ddpmpp / ncsnpp).
FAMILIES = {
    "ddpmpp": {"encoder": "standard", "resample_filter": (1, 1), "channel_mult_noise": 1,
               "edm_embedding": "positional"},
    "ncsnpp": {"encoder": "residual", "resample_filter": (1, 3, 3, 1), "channel_mult_noise": 2,
               "edm_embedding": "fourier"},
}
SKIP_SCALE = math.sqrt(0.5)   # residual sums scaled by 1/√2 (Song et al. 2021)
NORM_EPS = 1e-6
ZERO_INIT = 1e-5              # last conv of each residual branch, attention output, output conv
ATTN_INIT = math.sqrt(0.2)    # qkv projection


def _scale(x: torch.Tensor, c: float) -> torch.Tensor:
    return linear_map(lambda a: a * c, x)


class SongBlock(nn.Module):
    """A residual block, optionally resampling (``up``/``down``), optionally followed by attention."""

    def __init__(self, in_channels: int, out_channels: int, emb_channels: int, resample: str = "keep",
                 attn: bool = False, dropout: float = 0.0, resample_filter=(1, 1), double_norm: bool = True,
                 attention_backend: str = "auto", attention_jvp: str = "auto"):
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.dropout, self.double_norm, self.attn = dropout, double_norm, attn
        self.attention_backend, self.attention_jvp = attention_backend, attention_jvp
        self.norm0 = GroupNorm(in_channels, eps=NORM_EPS)
        self.conv0 = Conv2d(in_channels, out_channels, 3, resample=resample, resample_filter=resample_filter)
        self.affine = Linear(emb_channels, out_channels * (2 if double_norm else 1))
        self.norm1 = GroupNorm(out_channels, eps=NORM_EPS)
        self.conv1 = Conv2d(out_channels, out_channels, 3, init_gain=ZERO_INIT)
        self.skip = None
        if in_channels != out_channels or resample != "keep":
            self.skip = Conv2d(in_channels, out_channels, 1, resample=resample, resample_filter=resample_filter)
        if attn:
            self.norm2 = GroupNorm(out_channels, eps=NORM_EPS)
            self.qkv = Conv2d(out_channels, out_channels * 3, 1, init_gain=ATTN_INIT)
            self.proj = Conv2d(out_channels, out_channels, 1, init_gain=ZERO_INIT)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        orig = x
        x = self.conv0(silu(self.norm0(x)))
        params = self.affine(emb)[:, :, None, None].to(x.dtype)
        if self.double_norm:  # Lu & Song 2025 Sec. 4.1: norm(x)·pnorm(s(t)) + pnorm(b(t))
            scale, shift = params.chunk(2, dim=1)
            x = silu(modulate(self.norm1(x), pixel_norm(scale), pixel_norm(shift)))
        else:                 # EDM's DDPM++/NCSN++: GN(x + b(emb))
            x = silu(self.norm1(x + params))
        if self.training and self.dropout > 0:
            x = F.dropout(x, p=self.dropout)
        x = self.conv1(x)
        x = _scale(x + (self.skip(orig) if self.skip is not None else orig), SKIP_SCALE)
        if self.attn:
            n, c, h, w = x.shape
            q, k, v = self.qkv(self.norm2(x)).reshape(n, 1, c, 3, h * w).unbind(3)   # one head
            q, k, v = (a.transpose(-1, -2) for a in (q, k, v))                         # (N, 1, HW, C)
            # outside autocast: attention keeps q/k/v's dtype and its own fp32 softmax/JVP accumulators
            with torch.autocast(x.device.type, enabled=False):
                a = attention(q, k, v, backend=self.attention_backend, jvp_impl=self.attention_jvp)
            x = _scale(self.proj(a.transpose(-1, -2).reshape(n, c, h, w)) + x, SKIP_SCALE)
        return x


class SongUNet(ImageNetwork):
    """F_θ(x, t[, labels, guidance, augment_labels]) for square images of side `resolution`."""

    def __init__(self, cfg: NetworkConfig):
        super().__init__()
        if cfg.arch not in FAMILIES:
            raise UsageError(f"SongUNet builds network.arch {' or '.join(FAMILIES)}, not '{cfg.arch}'")
        family = FAMILIES[cfg.arch]
        res, img_ch, ncls = cfg.resolution, cfg.channels, cfg.num_classes or 0
        levels = len(cfg.channel_mult)
        if not res or not img_ch:
            raise UsageError("network.resolution and network.channels must be set (or come from data)")
        if res % (2 ** (levels - 1)) != 0:
            raise UsageError(f"image size {res} is not divisible by 2^{levels - 1} "
                             f"(network.channel_mult has {levels} levels)")
        self.cfg = cfg
        self.num_classes = ncls
        cemb = cfg.model_channels * cfg.channel_mult_emb
        cnoise = cfg.model_channels * family["channel_mult_noise"]
        fir = family["resample_filter"]

        # Mapping: noise label (+ guidance, class, augmentation labels) -> embedding.
        # time_embedding "edm": the family's EDM embedding (DDPM++ positional, NCSN++ Fourier) of
        # c_noise = ln(σ)/4 (ImageNetwork.c_noise)
        kind = cfg.time_embedding if cfg.time_embedding != "edm" else family["edm_embedding"]
        if kind == "positional":
            self.map_noise = PositionalEmbedding(cnoise, cfg.time_embedding_scale)
        else:
            self.map_noise = FourierEmbedding(cnoise, cfg.time_embedding_scale)
        self.map_label = Linear(ncls, cnoise) if ncls else None
        self.map_augment = Linear(cfg.augment_dim, cnoise, bias=False) if cfg.augment_dim else None
        self.map_layer0 = Linear(cnoise, cemb)
        self.map_layer1 = Linear(cemb, cemb)

        def block(cin, cout, level, resample="keep", attn=False):
            r = res >> level
            p = cfg.dropout if (cfg.dropout_max_resolution == 0 or r <= cfg.dropout_max_resolution) else 0.0
            return SongBlock(cin, cout, cemb, resample, attn, p, fir, cfg.adaptive_double_norm,
                             cfg.attention_backend, cfg.attention_jvp)

        # Encoder.
        self.enc = nn.ModuleDict()
        cout = caux = img_ch
        for level, mult in enumerate(cfg.channel_mult):
            r = res >> level
            if level == 0:
                cout = cfg.model_channels
                self.enc[f"{r}x{r}_conv"] = Conv2d(img_ch, cout, 3)
            else:
                self.enc[f"{r}x{r}_down"] = block(cout, cout, level, "down")
                if family["encoder"] == "residual":
                    self.enc[f"{r}x{r}_aux_residual"] = Conv2d(caux, cout, 3, resample="down",
                                                               resample_filter=fir, fused=True)
                    caux = cout
            for i in range(cfg.num_blocks):
                cin, cout = cout, cfg.model_channels * mult
                self.enc[f"{r}x{r}_block{i}"] = block(cin, cout, level, attn=r in cfg.attn_resolutions)
        skips = [m.out_channels for name, m in self.enc.items() if "aux" not in name]

        # Decoder.
        self.dec = nn.ModuleDict()
        self.dec_takes_skip: dict[str, bool] = {}
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            r = res >> level
            if level == levels - 1:
                self.dec[f"{r}x{r}_in0"] = block(cout, cout, level, attn=True)
                self.dec[f"{r}x{r}_in1"] = block(cout, cout, level)
            else:
                self.dec[f"{r}x{r}_up"] = block(cout, cout, level, "up")
            for i in range(cfg.num_blocks + 1):
                cin, cout = cout + skips.pop(), cfg.model_channels * mult
                attn = i == cfg.num_blocks and r in cfg.attn_resolutions
                self.dec[f"{r}x{r}_block{i}"] = block(cin, cout, level, attn=attn)
                self.dec_takes_skip[f"{r}x{r}_block{i}"] = True
        self.dec[f"{res}x{res}_aux_norm"] = GroupNorm(cout, eps=NORM_EPS)
        self.dec[f"{res}x{res}_aux_conv"] = Conv2d(cout, img_ch, 3, init_gain=ZERO_INIT)

        self.emb_guidance = Linear(cnoise, cnoise, bias=False) if cfg.guidance_input else None
        if self.emb_guidance is not None:
            nn.init.zeros_(self.emb_guidance.weight)
        self.init_weight_head(cfg)

    def embedding(self, c_noise: torch.Tensor, labels: torch.Tensor | None, guidance: torch.Tensor | None,
                  augment_labels: torch.Tensor | None) -> torch.Tensor:
        """The mapping network, in float32 even under autocast."""
        with torch.autocast(device_type=c_noise.device.type, enabled=False):
            c = c_noise if c_noise.dtype == torch.float64 else c_noise.float()
            emb = self.map_noise(c)
            if self.emb_guidance is not None:
                g = torch.ones_like(c) if guidance is None else guidance.to(c.dtype).expand_as(c)
                emb = emb + self.emb_guidance(self.map_noise(g))
            if self.map_label is not None:
                onehot = class_input(labels, c.shape[0], self.num_classes, c.device).to(c.dtype)
                emb = emb + self.map_label(onehot * math.sqrt(self.num_classes))
            if self.map_augment is not None and augment_labels is not None:
                emb = emb + self.map_augment(augment_labels.to(c.dtype))
            emb = silu(self.map_layer0(emb))
            return silu(self.map_layer1(emb))

    def forward(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None = None,
                guidance: torch.Tensor | None = None, augment_labels: torch.Tensor | None = None) -> torch.Tensor:
        """F_θ(x, t): x = x_t/σ_d (N, C, H, W); t (N,) TrigFlow times (embedded through c_noise(t))."""
        emb = self.embedding(self.c_noise(per_sample(t, x.shape[0])), labels, guidance, augment_labels).to(x.dtype)
        skips = []
        aux = x
        for name, m in self.enc.items():
            if name.endswith("_aux_residual"):  # NCSN++: x ← (x + conv↓(aux))/√2, and aux follows x
                x = skips[-1] = aux = _scale(x + m(aux), SKIP_SCALE)
            else:
                x = m(x, emb) if isinstance(m, SongBlock) else m(x)
                skips.append(x)
        out = None
        for name, m in self.dec.items():
            if name.endswith("_aux_norm"):
                out = m(x)
            elif name.endswith("_aux_conv"):
                out = m(silu(out))
            else:
                if self.dec_takes_skip.get(name, False):
                    x = torch.cat([x, skips.pop()], dim=1)
                x = m(x, emb)
        return out

    def blocks(self) -> list[nn.Module]:
        return [m for m in (*self.enc.values(), *self.dec.values()) if isinstance(m, SongBlock)]


def load_edm_state_dict(net: SongUNet, state: dict[str, torch.Tensor], prefix: str = "model.") -> None:
    """Load the state dict of an EDM preconditioner (EDMPrecond/VPPrecond/VEPrecond around SongUNet)
    into `net`, built with the EDM options (``adaptive_double_norm: false``, EDM's embedding): the
    mapping strips `prefix` and keeps the layers EDM does not have (w_φ, a guidance input) as they
    are; everything else must match by name and shape (``load_state_dict(strict=True)``)."""
    mapped = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    own = net.state_dict()
    for k in own:
        if k.startswith(("weight_linear.", "emb_guidance.")):
            mapped.setdefault(k, own[k])
    net.load_state_dict(mapped, strict=True)
