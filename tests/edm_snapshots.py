"""Test helpers: small EDM2 networks written here from the EDM2 paper's equations (an independent
float64 reference of its U-Net, preconditioning and uncertainty head), pickled in the exact format
of EDM/EDM2's ``torch_utils.persistence`` (a ``_reconstruct_persistent_obj(meta)`` call per object,
meta = dict(type, version, module_src, class_name, state), tensors as plain pickle stores them).

The ``module_src`` the pickle carries is a payload: running it (as EDM's own unpickler does, and as
:func:`plain_load` here does to prove the payload is live) writes a marker file.
"""

from __future__ import annotations

import math
import pickle
import sys
import types

import numpy as np
import torch
from torch import nn


# --- the persistence format -----------------------------------------------------------------------

def _reconstruct_persistent_obj(meta):
    """EDM's behaviour: execute the embedded module source, then build the object from the state.
    Here the source only writes the marker; the object is rebuilt as a plain record."""
    exec(compile(meta["module_src"], "<snapshot module_src>", "exec"), {})  # noqa: S102
    return ("rebuilt", meta["class_name"], meta["state"])


class EasyDict(dict):
    """Stand-in for dnnlib.util.EasyDict (pickled under that name)."""


def _install_modules() -> None:
    """Register torch_utils.persistence and dnnlib.util so pickle can name them when dumping."""
    if "torch_utils.persistence" in sys.modules and sys.modules["torch_utils.persistence"]._reconstruct_persistent_obj is _reconstruct_persistent_obj:
        return
    tu, pers = types.ModuleType("torch_utils"), types.ModuleType("torch_utils.persistence")
    pers._reconstruct_persistent_obj = _reconstruct_persistent_obj
    _reconstruct_persistent_obj.__module__ = "torch_utils.persistence"
    tu.persistence = pers
    dn, util = types.ModuleType("dnnlib"), types.ModuleType("dnnlib.util")
    util.EasyDict = EasyDict
    EasyDict.__module__, EasyDict.__qualname__ = "dnnlib.util", "EasyDict"
    dn.util = util
    sys.modules.update({"torch_utils": tu, "torch_utils.persistence": pers, "dnnlib": dn, "dnnlib.util": util})


def marker_source(marker) -> str:
    return f"import pathlib\npathlib.Path({str(marker)!r}).write_text('the snapshot code ran')\n"


class Persistent:
    """Mixin: pickled by :func:`dump` as EDM's persistent_class does (its __dict__ travels as
    meta['state'], with the module source)."""
    module_src = "pass\n"


class _SnapshotPickler(pickle.Pickler):
    def reducer_override(self, obj):
        if isinstance(obj, Persistent):
            meta = dict(type="class", version=6, module_src=type(obj).module_src,
                        class_name=type(obj).__name__, state=dict(obj.__dict__))
            return _reconstruct_persistent_obj, (meta,), None
        return NotImplemented


def dump(obj, protocol: int = 4) -> bytes:
    import io

    _install_modules()
    buf = io.BytesIO()
    _SnapshotPickler(buf, protocol=protocol).dump(obj)
    return buf.getvalue()


def plain_load(blob: bytes):
    _install_modules()
    return pickle.loads(blob)


# --- EDM2's layers, float64 reference (Karras et al. 2024, App. B) ------------------------------

def normalize(x, dim, eps=1e-4):
    """x / (eps + ‖x‖/√N) over `dim` (EDM2 Eq. 66's normalization, also its pixel norm)."""
    n = torch.linalg.vector_norm(x, dim=dim, keepdim=True)
    count = np.prod([x.shape[d] for d in (dim if isinstance(dim, (list, tuple)) else [dim])])
    return x / (eps + n / math.sqrt(count))


def mp_silu(x):
    return torch.nn.functional.silu(x) / 0.596


def mp_sum(a, b, t):
    return ((1 - t) * a + t * b) / math.sqrt((1 - t) ** 2 + t ** 2)


def mp_cat(a, b, t=0.5):
    na, nb = a.shape[1], b.shape[1]
    c = math.sqrt((na + nb) / ((1 - t) ** 2 + t ** 2))
    return torch.cat([a * (c / math.sqrt(na) * (1 - t)), b * (c / math.sqrt(nb) * t)], dim=1)


class MPFourier(Persistent, nn.Module):
    def __init__(self, n):
        super().__init__()
        self.register_buffer("freqs", 2 * math.pi * torch.randn(n))
        self.register_buffer("phases", 2 * math.pi * torch.rand(n))

    def forward(self, c):
        return torch.cos(c.double()[:, None] * self.freqs.double() + self.phases.double()) * math.sqrt(2)


class MPConv(Persistent, nn.Module):
    def __init__(self, cin, cout, kernel):
        super().__init__()
        self.out_channels = cout
        self.weight = nn.Parameter(torch.randn(cout, cin, *kernel))

    def forward(self, x, gain=1.0):
        w = self.weight.double()
        fan_in = w[0].numel()
        w = normalize(w, dim=list(range(1, w.ndim))) * (gain / math.sqrt(fan_in))
        if w.ndim == 2:
            return x @ w.t()
        return torch.nn.functional.conv2d(x, w, padding=w.shape[-1] // 2)


class Block(Persistent, nn.Module):
    def __init__(self, cin, cout, cemb, flavor, resample="keep", attention=False, channels_per_head=8):
        super().__init__()
        self.flavor, self.resample, self.out_channels = flavor, resample, cout
        self.num_heads = cout // channels_per_head if attention else 0
        self.emb_gain = nn.Parameter(torch.randn([]) * 0.5)   # trained nets have nonzero gains
        self.conv_res0 = MPConv(cout if flavor == "enc" else cin, cout, [3, 3])
        self.emb_linear = MPConv(cemb, cout, [])
        self.conv_res1 = MPConv(cout, cout, [3, 3])
        self.conv_skip = MPConv(cin, cout, [1, 1]) if cin != cout else None
        self.attn_qkv = MPConv(cout, cout * 3, [1, 1]) if self.num_heads else None
        self.attn_proj = MPConv(cout, cout, [1, 1]) if self.num_heads else None

    def forward(self, x, emb):
        if self.resample == "down":
            x = torch.nn.functional.avg_pool2d(x, 2)
        elif self.resample == "up":
            x = x.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
        if self.flavor == "enc":
            if self.conv_skip is not None:
                x = self.conv_skip(x)
            x = normalize(x, dim=1)
        y = self.conv_res0(mp_silu(x))
        y = mp_silu(y * (self.emb_linear(emb, gain=self.emb_gain) + 1)[:, :, None, None])
        y = self.conv_res1(y)
        if self.flavor == "dec" and self.conv_skip is not None:
            x = self.conv_skip(x)
        x = mp_sum(x, y, 0.3)
        if self.num_heads:
            n, c, h, w = x.shape
            qkv = self.attn_qkv(x).reshape(n, self.num_heads, c // self.num_heads, 3, h * w)
            q, k, v = normalize(qkv, dim=2).unbind(3)
            a = torch.softmax(torch.einsum("nhcq,nhck->nhqk", q, k) / math.sqrt(q.shape[2]), dim=3)
            y = torch.einsum("nhqk,nhck->nhcq", a, v).reshape(n, c, h, w)
            x = mp_sum(x, self.attn_proj(y), 0.3)
        return x.clamp(-256, 256)


class UNet(Persistent, nn.Module):
    def __init__(self, img_resolution, img_channels, label_dim, model_channels, channel_mult,
                 num_blocks, attn_resolutions, channels_per_head):
        super().__init__()
        cblock = [model_channels * m for m in channel_mult]
        cnoise, cemb = cblock[0], max(cblock)
        self.out_gain = nn.Parameter(torch.randn([]) * 0.5)
        self.emb_fourier = MPFourier(cnoise)
        self.emb_noise = MPConv(cnoise, cemb, [])
        self.emb_label = MPConv(label_dim, cemb, []) if label_dim else None
        kw = dict(channels_per_head=channels_per_head)
        self.enc = nn.ModuleDict()
        cout = img_channels + 1
        for level, ch in enumerate(cblock):
            res = img_resolution >> level
            if level == 0:
                cin, cout = cout, ch
                self.enc[f"{res}x{res}_conv"] = MPConv(cin, cout, [3, 3])
            else:
                self.enc[f"{res}x{res}_down"] = Block(cout, cout, cemb, "enc", "down", **kw)
            for i in range(num_blocks):
                cin, cout = cout, ch
                self.enc[f"{res}x{res}_block{i}"] = Block(cin, cout, cemb, "enc", attention=res in attn_resolutions, **kw)
        self.dec = nn.ModuleDict()
        skips = [b.out_channels for b in self.enc.values()]
        for level, ch in reversed(list(enumerate(cblock))):
            res = img_resolution >> level
            if level == len(cblock) - 1:
                self.dec[f"{res}x{res}_in0"] = Block(cout, cout, cemb, "dec", attention=True, **kw)
                self.dec[f"{res}x{res}_in1"] = Block(cout, cout, cemb, "dec", **kw)
            else:
                self.dec[f"{res}x{res}_up"] = Block(cout, cout, cemb, "dec", "up", **kw)
            for i in range(num_blocks + 1):
                cin, cout = cout + skips.pop(), ch
                self.dec[f"{res}x{res}_block{i}"] = Block(cin, cout, cemb, "dec", attention=res in attn_resolutions, **kw)
        self.out_conv = MPConv(cout, img_channels, [3, 3])

    def forward(self, x, c_noise, labels):
        emb = self.emb_noise(self.emb_fourier(c_noise))
        if self.emb_label is not None:
            emb = mp_sum(emb, self.emb_label(labels * math.sqrt(labels.shape[1])), 0.5)
        emb = mp_silu(emb)
        x = torch.cat([x, torch.ones_like(x[:, :1])], dim=1)
        skips = []
        for name, b in self.enc.items():
            x = b(x) if name.endswith("_conv") else b(x, emb)
            skips.append(x)
        for name, b in self.dec.items():
            if "block" in name:
                x = mp_cat(x, skips.pop())
            x = b(x, emb)
        return self.out_conv(x, gain=self.out_gain)


class Precond(Persistent, nn.Module):
    def __init__(self, img_resolution, img_channels, label_dim, sigma_data=0.5, logvar_channels=16,
                 **unet_kwargs):
        super().__init__()
        self.img_resolution, self.img_channels, self.label_dim = img_resolution, img_channels, label_dim
        self.sigma_data, self.use_fp16 = sigma_data, True
        self.unet = UNet(img_resolution, img_channels, label_dim, **unet_kwargs)
        self.logvar_fourier = MPFourier(logvar_channels)
        self.logvar_linear = MPConv(logvar_channels, 1, [])
        self._init_args = ()
        self._init_kwargs = EasyDict(img_resolution=img_resolution, img_channels=img_channels,
                                     label_dim=label_dim, sigma_data=sigma_data,
                                     logvar_channels=logvar_channels, use_fp16=True, **unet_kwargs)

    def forward(self, x, sigma, labels=None):
        """D(x_σ; σ) and u(σ) in float64 (EDM2's Precond, Karras et al. 2024 Eq. 7 & 21)."""
        x, s = x.double(), sigma.double().reshape(-1, 1, 1, 1)
        sd = self.sigma_data
        c_skip = sd ** 2 / (s ** 2 + sd ** 2)
        c_out = s * sd / (s ** 2 + sd ** 2).sqrt()
        c_in = 1 / (sd ** 2 + s ** 2).sqrt()
        c_noise = s.flatten().log() / 4
        if self.label_dim and labels is None:
            labels = torch.zeros(x.shape[0], self.label_dim, dtype=torch.float64)
        F = self.unet(c_in * x, c_noise, None if labels is None else labels.double())
        logvar = self.logvar_linear(self.logvar_fourier(c_noise)).reshape(-1)
        return c_skip * x + c_out * F, logvar


class RGBEncoder(Persistent):
    pass


class VAEEncoder(Persistent):
    def __init__(self, raw_mean, raw_std, final_mean=0.0, final_std=0.5):
        self.vae_name = "stabilityai/sd-vae-ft-mse"
        self.scale = np.float32(final_std) / np.float32(raw_std)
        self.bias = np.float32(final_mean) - np.float32(raw_mean) * self.scale
        self.batch_size = 8
        self._vae = None


RGBEncoder.__name__ = RGBEncoder.__qualname__ = "StandardRGBEncoder"
VAEEncoder.__name__ = VAEEncoder.__qualname__ = "StabilityVAEEncoder"


def small_edm2(label_dim=0, img_channels=3, resolution=8, seed=0, **kw) -> Precond:
    torch.manual_seed(seed)
    args = dict(model_channels=8, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4],
                channels_per_head=8)
    args.update(kw)
    net = Precond(resolution, img_channels, label_dim, **args).double().eval()
    with torch.no_grad():                   # trained EDM2 weights have unit RMS per output (Eq. 66)
        for m in net.modules():
            if isinstance(m, MPConv):
                m.weight.copy_(normalize(m.weight, dim=list(range(1, m.weight.ndim))))
    return net


def edm2_snapshot(net: Precond, encoder=None, fp16: bool = True, marker=None, protocol: int = 4) -> bytes:
    """Pickle `net` as an EDM2 post-hoc snapshot: EasyDict(encoder, dataset_kwargs, loss_fn, ema)."""
    import copy

    ema = copy.deepcopy(net).to(torch.float16 if fp16 else torch.float32)
    src = marker_source(marker) if marker is not None else "pass\n"
    for cls in (MPFourier, MPConv, Block, UNet, Precond, RGBEncoder, VAEEncoder):
        cls.module_src = src
    data = EasyDict(encoder=encoder if encoder is not None else RGBEncoder(),
                    dataset_kwargs=EasyDict(class_name="training.dataset.ImageFolderDataset",
                                            path="img.zip", use_labels=bool(net.label_dim)),
                    loss_fn=None, ema=ema)
    return dump(data, protocol)


def rounded_like_snapshot(net: nn.Module, fp16: bool = True) -> nn.Module:
    """The reference network with the weights the snapshot stores (rounded to fp16 or fp32), in
    float64."""
    import copy

    out = copy.deepcopy(net)
    with torch.no_grad():
        for t in list(out.parameters()) + list(out.buffers()):
            t.copy_(t.to(torch.float16 if fp16 else torch.float32).double())
    return out.double()


# --- EDM's DDPM++ (SongUNet with EDMPrecond), float64 reference (Karras et al. 2022, App. F.2) -----

class Linear(Persistent, nn.Module):
    def __init__(self, cin, cout, bias=True):
        super().__init__()
        self.in_features = cin
        self.weight = nn.Parameter(torch.randn(cout, cin) / math.sqrt(cin))
        self.bias = nn.Parameter(torch.randn(cout) * 0.1) if bias else None

    def forward(self, x):
        y = x @ self.weight.t()
        return y + self.bias if self.bias is not None else y


class Conv2d(Persistent, nn.Module):
    """k×k convolution (k = 0: none) after a ×2 FIR up-/downsampling by f⊗f/(Σf)² (upsampling: a
    stride-2 transposed convolution by 4·f⊗f); `fused`: convolve first, then filter with stride 2."""

    def __init__(self, cin, cout, kernel, up=False, down=False, fir=(1, 1), fused=False):
        super().__init__()
        self.in_channels, self.out_channels, self.up, self.down, self.fused = cin, cout, up, down, fused
        self.weight = nn.Parameter(torch.randn(cout, cin, kernel, kernel) / math.sqrt(cin * kernel ** 2)) if kernel else None
        self.bias = nn.Parameter(torch.randn(cout) * 0.1) if kernel else None
        f = torch.tensor(fir, dtype=torch.float64)
        self.register_buffer("resample_filter", (torch.outer(f, f) / f.sum() ** 2)[None, None] if up or down else None)

    def forward(self, x):
        w = self.weight
        pad = w.shape[-1] // 2 if w is not None else 0
        if self.up or self.down:
            f = self.resample_filter.double()
            fp = (f.shape[-1] - 1) // 2
        if self.fused:
            x = torch.nn.functional.conv2d(x, w, padding=pad + fp)
            x = torch.nn.functional.conv2d(x, f.repeat(x.shape[1], 1, 1, 1), groups=x.shape[1], stride=2)
            return x + self.bias.reshape(1, -1, 1, 1)
        if self.up:
            x = torch.nn.functional.conv_transpose2d(x, 4 * f.repeat(x.shape[1], 1, 1, 1), groups=x.shape[1],
                                                     stride=2, padding=fp)
        if self.down:
            x = torch.nn.functional.conv2d(x, f.repeat(x.shape[1], 1, 1, 1), groups=x.shape[1], stride=2, padding=fp)
        if w is not None:
            x = torch.nn.functional.conv2d(x, w, padding=pad) + self.bias.reshape(1, -1, 1, 1)
        return x


class GroupNorm(Persistent, nn.Module):
    def __init__(self, c, eps=1e-6):
        super().__init__()
        self.groups, self.eps = min(32, c // 4), eps
        self.weight = nn.Parameter(1 + 0.1 * torch.randn(c))
        self.bias = nn.Parameter(0.1 * torch.randn(c))

    def forward(self, x):
        g = x.reshape(x.shape[0], self.groups, -1)
        g = (g - g.mean(2, keepdim=True)) / torch.sqrt(g.var(2, unbiased=False, keepdim=True) + self.eps)
        return g.reshape(x.shape) * self.weight.reshape(1, -1, 1, 1) + self.bias.reshape(1, -1, 1, 1)


class FourierEmbedding(Persistent, nn.Module):
    def __init__(self, c, scale=16):
        super().__init__()
        self.register_buffer("freqs", torch.randn(c // 2) * scale)


class UNetBlock(Persistent, nn.Module):
    def __init__(self, cin, cout, cemb, up=False, down=False, attention=False, fir=(1, 1)):
        super().__init__()
        self.in_channels, self.out_channels, self.attention = cin, cout, attention
        self.norm0 = GroupNorm(cin)
        self.conv0 = Conv2d(cin, cout, 3, up=up, down=down, fir=fir)
        self.affine = Linear(cemb, cout)
        self.norm1 = GroupNorm(cout)
        self.conv1 = Conv2d(cout, cout, 3)
        self.skip = Conv2d(cin, cout, 1, up=up, down=down, fir=fir) if cin != cout or up or down else None
        if attention:
            self.norm2 = GroupNorm(cout)
            self.qkv = Conv2d(cout, cout * 3, 1)
            self.proj = Conv2d(cout, cout, 1)

    def forward(self, x, emb):
        silu = torch.nn.functional.silu
        y = self.conv0(silu(self.norm0(x)))
        y = silu(self.norm1(y + self.affine(emb)[:, :, None, None]))
        y = self.conv1(y)
        x = (y + (self.skip(x) if self.skip is not None else x)) / math.sqrt(2)
        if self.attention:
            n, c, h, w = x.shape
            q, k, v = self.qkv(self.norm2(x)).reshape(n, c, 3, h * w).unbind(2)
            a = torch.softmax(torch.einsum("ncq,nck->nqk", q, k) / math.sqrt(c), dim=2)
            x = (self.proj(torch.einsum("nqk,nck->ncq", a, v).reshape(n, c, h, w)) + x) / math.sqrt(2)
        return x


class SongUNet(Persistent, nn.Module):
    """DDPM++: positional embedding of c_noise (endpoint included, [sin, cos]), standard encoder,
    box filter. NCSN++ (ncsnpp=True): Fourier features [sin, cos](2π·f·c_noise), f ~ N(0, 16²),
    2C noise channels, a residual encoder (an FIR-downsampled conv path added to the skips, /√2)
    and the [1, 3, 3, 1] filter. Both: the standard decoder."""

    def __init__(self, img_resolution, in_channels, out_channels, label_dim, augment_dim, model_channels,
                 channel_mult, num_blocks, attn_resolutions, channel_mult_emb=4, ncsnpp=False):
        super().__init__()
        cemb, cnoise = model_channels * channel_mult_emb, model_channels * (2 if ncsnpp else 1)
        self.cnoise, self.ncsnpp = cnoise, ncsnpp
        fir = (1, 3, 3, 1) if ncsnpp else (1, 1)
        if ncsnpp:
            self.map_noise = FourierEmbedding(cnoise)
        self.map_label = Linear(label_dim, cnoise) if label_dim else None
        self.map_augment = Linear(augment_dim, cnoise, bias=False) if augment_dim else None
        self.map_layer0 = Linear(cnoise, cemb)
        self.map_layer1 = Linear(cemb, cemb)
        self.enc = nn.ModuleDict()
        cout = caux = in_channels
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            if level == 0:
                self.enc[f"{res}x{res}_conv"] = Conv2d(cout, model_channels, 3)
                cout = model_channels
            else:
                self.enc[f"{res}x{res}_down"] = UNetBlock(cout, cout, cemb, down=True, fir=fir)
                if ncsnpp:
                    self.enc[f"{res}x{res}_aux_residual"] = Conv2d(caux, cout, 3, down=True, fir=fir, fused=True)
                    caux = cout
            for i in range(num_blocks):
                self.enc[f"{res}x{res}_block{i}"] = UNetBlock(cout, model_channels * mult, cemb,
                                                              attention=res in attn_resolutions, fir=fir)
                cout = model_channels * mult
        skips = [m.out_channels for name, m in self.enc.items() if "aux" not in name]
        self.dec = nn.ModuleDict()
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = img_resolution >> level
            if level == len(channel_mult) - 1:
                self.dec[f"{res}x{res}_in0"] = UNetBlock(cout, cout, cemb, attention=True)
                self.dec[f"{res}x{res}_in1"] = UNetBlock(cout, cout, cemb)
            else:
                self.dec[f"{res}x{res}_up"] = UNetBlock(cout, cout, cemb, up=True, fir=fir)
            for i in range(num_blocks + 1):
                cin, cout = cout + skips.pop(), model_channels * mult
                self.dec[f"{res}x{res}_block{i}"] = UNetBlock(
                    cin, cout, cemb, attention=i == num_blocks and res in attn_resolutions, fir=fir)
            if level == 0:
                self.dec[f"{res}x{res}_aux_norm"] = GroupNorm(cout)
                self.dec[f"{res}x{res}_aux_conv"] = Conv2d(cout, out_channels, 3)

    def forward(self, x, c_noise, labels, augment_labels=None):
        half = self.cnoise // 2
        if self.ncsnpp:
            freqs = 2 * math.pi * self.map_noise.freqs.double()
        else:
            freqs = (1 / 10000) ** (torch.arange(half, dtype=torch.float64) / (half - 1))
        a = c_noise.double()[:, None] * freqs
        emb = torch.cat([a.sin(), a.cos()], dim=1)
        if self.map_label is not None:
            emb = emb + self.map_label(labels * math.sqrt(labels.shape[1]))
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels)
        silu = torch.nn.functional.silu
        emb = silu(self.map_layer1(silu(self.map_layer0(emb))))
        skips, aux = [], x
        for name, m in self.enc.items():
            if name.endswith("_aux_residual"):
                x = skips[-1] = aux = (x + m(aux)) / math.sqrt(2)
                continue
            x = m(x) if name.endswith("_conv") else m(x, emb)
            skips.append(x)
        for m in (m for name, m in self.dec.items() if "_aux_" not in name):
            if x.shape[1] != m.in_channels:               # a block that takes a skip connection
                x = torch.cat([x, skips.pop()], dim=1)
            x = m(x, emb)
        res = x.shape[-1]                                  # the standard decoder's output layers
        return self.dec[f"{res}x{res}_aux_conv"](silu(self.dec[f"{res}x{res}_aux_norm"](x)))


class EDMPrecond(Persistent, nn.Module):
    def __init__(self, img_resolution, img_channels, label_dim=0, sigma_data=0.5, **model_kwargs):
        super().__init__()
        self.img_resolution, self.img_channels, self.label_dim = img_resolution, img_channels, label_dim
        self.sigma_data, self.sigma_min, self.sigma_max, self.use_fp16 = sigma_data, 0.0, float("inf"), False
        ncsnpp = model_kwargs.pop("ncsnpp", False)
        self.model = SongUNet(img_resolution, img_channels, img_channels, label_dim, ncsnpp=ncsnpp, **model_kwargs)
        family = (dict(embedding_type="fourier", encoder_type="residual", channel_mult_noise=2,
                       resample_filter=[1, 3, 3, 1]) if ncsnpp else
                  dict(embedding_type="positional", encoder_type="standard", channel_mult_noise=1,
                       resample_filter=[1, 1]))
        self.model._init_kwargs = EasyDict(img_resolution=img_resolution, in_channels=img_channels,
                                           out_channels=img_channels, label_dim=label_dim,
                                           decoder_type="standard", dropout=0.13, **family, **model_kwargs)

    def forward(self, x, sigma, labels=None, augment_labels=None):
        """D(x_σ; σ) in float64 (EDM Table 1, EDMPrecond)."""
        x, s = x.double(), sigma.double().reshape(-1, 1, 1, 1)
        sd = self.sigma_data
        if self.label_dim and labels is None:
            labels = torch.zeros(x.shape[0], self.label_dim, dtype=torch.float64)
        F = self.model(x / (sd ** 2 + s ** 2).sqrt(), s.flatten().log() / 4, labels, augment_labels)
        return sd ** 2 / (s ** 2 + sd ** 2) * x + s * sd / (s ** 2 + sd ** 2).sqrt() * F


def small_edm(label_dim=0, img_channels=3, resolution=8, seed=0, **kw) -> EDMPrecond:
    torch.manual_seed(seed)
    args = dict(augment_dim=9, model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4])
    args.update(kw)
    return EDMPrecond(resolution, img_channels, label_dim, **args).double().eval()


def edm_snapshot(net: EDMPrecond, marker=None, protocol: int = 4) -> bytes:
    """Pickle `net` as EDM's training loop does: dict(ema, loss_fn, augment_pipe, dataset_kwargs)."""
    import copy

    src = marker_source(marker) if marker is not None else "pass\n"
    for cls in (Linear, Conv2d, GroupNorm, FourierEmbedding, UNetBlock, SongUNet, EDMPrecond):
        cls.module_src = src
    data = dict(ema=copy.deepcopy(net).float(), loss_fn=None, augment_pipe=None,
                dataset_kwargs=dict(class_name="training.dataset.ImageFolderDataset", path="cifar10.zip"))
    return dump(data, protocol)
