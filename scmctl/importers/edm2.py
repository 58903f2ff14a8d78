"""EDM2 snapshots (Karras et al. 2024) onto scmctl's U-Net, with the preconditioning in TrigFlow terms.

An EDM2 ``network-snapshot-*.pkl`` / post-hoc reconstruction is
``EasyDict(encoder=..., dataset_kwargs=..., loss_fn=..., ema=Precond(...))`` with the network in
float16. ``Precond`` wraps the magnitude-preserving ``UNet`` ("config G") and the uncertainty
head ``logvar_fourier``/``logvar_linear``:

    D(x_σ; σ) = c_skip·x_σ + c_out·F_edm(c_in·x_σ; c_noise),   c_skip = σ_d²/(σ² + σ_d²),
    c_out = σ·σ_d/√(σ² + σ_d²),   c_in = 1/√(σ² + σ_d²),   c_noise = ln(σ)/4.

**TrigFlow, exactly.** With σ = σ_d·tan t and x_σ = x_t/cos t (Lu & Song 2025, Sec. 3 / App. B):
√(σ² + σ_d²) = σ_d/cos t, so c_in·x_σ = x_t/σ_d, c_skip = cos²t, c_out = σ_d·sin t and

    D = cos t·x_t + σ_d·sin t·F_edm(x_t/σ_d; ln(σ_d tan t)/4).

TrigFlow's denoiser is cos t·x_t − sin t·σ_d·F_θ(x_t/σ_d, t), hence

    F_θ(x_t/σ_d, t) = −F_edm(x_t/σ_d; ln(σ_d·tan t)/4)

for every t in (0, π/2), with no approximation. scmctl's U-Net with ``time_embedding: edm``
computes c_noise from t itself (:meth:`scmctl.nn.unet.UNet.c_noise`), so the sign is all that
remains: it goes into the weights, ``out_gain ← −out_gain`` (the output layer is linear in it).

**The uncertainty head** u(σ) = logvar_linear(logvar_fourier(c_noise)) enters EDM2's loss per
element as e^{−u}·‖F_edm − F_target‖² + u (EDM2 Eq. 21 with λ(σ)·c_out² = 1); scmctl's diffusion
loss is e^{w}·mean‖F_θ − v_t/σ_d‖² − w with the same squared error (F_θ = −F_edm and
v_t/σ_d = −F_target), so w_φ(t) = −u(σ_d tan t): the head's MP-linear weight is negated (an
MPConv's normalized weight changes sign with it). It is kept as the adaptive weighting head.

Labels: EDM2 feeds one-hot rows scaled by √label_dim, as scmctl's U-Net does (a zero row is
unconditional). fp16 weights become float32. The encoder is recorded: StandardRGBEncoder = pixels
in [−1, 1]; StabilityVAEEncoder = SD-VAE latents with raw_mean/raw_std recovered from its stored
scale/bias (final = raw·scale + bias, scale = final_std/raw_std, bias = final_mean − raw_mean·scale)
and ``data.vae_pixel_range: unit`` (EDM2's VAE sees pixels in [0, 1]).
"""

from __future__ import annotations

import numpy as np
import torch

from scmctl.config import Config
from scmctl.errors import UsageError
from scmctl.importers import snapshot
from scmctl.safe_pickle import PersistentObject

# EDM2 UNet/Block constructor defaults (networks_edm2.py); scmctl's U-Net fixes the balances.
UNET_DEFAULTS = dict(model_channels=192, channel_mult=[1, 2, 3, 4], channel_mult_noise=None,
                     channel_mult_emb=None, num_blocks=3, attn_resolutions=[16, 8],
                     label_balance=0.5, concat_balance=0.5, resample_filter=[1, 1],
                     channels_per_head=64, dropout=0.0, res_balance=0.3, attn_balance=0.3,
                     clip_act=256, logvar_channels=128)
FIXED = ("label_balance", "concat_balance", "resample_filter", "res_balance", "attn_balance", "clip_act")
BLOCK_RENAMES = {"emb_linear.": "emb_scale."}


def is_edm2(net: PersistentObject) -> bool:
    return net.class_name == "Precond" and "unet" in snapshot.children(net)


def config(top: dict, net: PersistentObject) -> Config:
    """The scmctl config that reproduces the snapshot's network (pixels or SD-VAE latents)."""
    kw = {**UNET_DEFAULTS, **snapshot.init_kwargs(net)}
    for k in FIXED:
        if kw[k] != UNET_DEFAULTS[k]:
            raise UsageError(f"EDM2 snapshot uses {k}={kw[k]!r}; scmctl's U-Net supports only "
                             f"EDM2's default {UNET_DEFAULTS[k]!r}")
    mult = list(kw["channel_mult"])
    if kw["channel_mult_noise"] not in (None, mult[0]):
        raise UsageError(f"EDM2 snapshot uses channel_mult_noise={kw['channel_mult_noise']}; "
                         f"scmctl's U-Net embeds the noise with channel_mult[0]={mult[0]} channels")
    cfg = snapshot.diffusion_config(net, kw)
    n = cfg.network
    n.channel_mult_emb = int(kw["channel_mult_emb"] if kw["channel_mult_emb"] is not None else max(mult))
    n.head_channels = int(kw["channels_per_head"])
    n.norm_eps_outside = True
    n.adaptive_weight_channels = int(kw["logvar_channels"])
    _encoder(top.get("encoder"), cfg)
    cfg.sample.solver_steps = 32          # EDM2's sampler default (63 NFE with Heun)
    return cfg


def state_dict(net: PersistentObject) -> dict[str, torch.Tensor]:
    """The snapshot's weights under scmctl's U-Net names (float32; F and w_φ signs flipped)."""
    unet = snapshot.children(net)["unet"]
    parts = snapshot.children(unet)
    out: dict[str, torch.Tensor] = {}
    for name, t in snapshot.tensors(unet).items():
        top = name.split(".", 1)[0]
        if top in ("emb_fourier",):
            out["time_embed." + name.split(".", 1)[1]] = t
        elif top in ("emb_noise", "emb_label"):
            out[name] = t
        elif top == "out_gain":
            out["out_gain"] = -t                                     # F_θ = −F_edm
        elif top == "out_conv":
            out["conv_out." + name.split(".", 1)[1]] = t
    for side in ("enc", "dec"):
        blocks = list(snapshot.children(parts[side]).items())
        if side == "enc":
            (first, conv), blocks = blocks[0], blocks[1:]
            if not first.endswith("_conv"):
                raise UsageError(f"EDM2 snapshot: unexpected first encoder layer '{first}'")
            out.update({"conv_in." + k: v for k, v in snapshot.tensors(conv).items()})
        for i, (_, blk) in enumerate(blocks):
            for k, v in snapshot.tensors(blk).items():
                for old, new in BLOCK_RENAMES.items():
                    k = new + k[len(old):] if k.startswith(old) else k
                out[f"{side}.{i}.{k}"] = v
    head = snapshot.tensors(net)
    for k, v in head.items():
        if k.startswith("logvar_fourier."):
            out["weight_embed." + k.split(".", 1)[1]] = v
        elif k.startswith("logvar_linear."):
            out["weight_linear." + k.split(".", 1)[1]] = -v                # w_φ = −u
    return out


def _encoder(enc, cfg: Config) -> None:
    if enc is None or (isinstance(enc, PersistentObject) and enc.class_name == "StandardRGBEncoder"):
        return
    if not isinstance(enc, PersistentObject) or enc.class_name != "StabilityVAEEncoder":
        name = enc.class_name if isinstance(enc, PersistentObject) else type(enc).__name__
        raise UsageError(f"EDM2 snapshot: unknown encoder {name} (expected StandardRGBEncoder or "
                         "StabilityVAEEncoder)")
    scale = np.asarray(snapshot.attr(enc, "scale"), dtype=np.float64).reshape(-1)
    bias = np.asarray(snapshot.attr(enc, "bias"), dtype=np.float64).reshape(-1)
    if scale.shape != bias.shape or not scale.size or not np.all(np.isfinite(scale)) or np.any(scale <= 0):
        raise UsageError("EDM2 snapshot: the VAE encoder's scale/bias are not per-channel positive numbers")
    # EDM2: final = raw·scale + bias. scmctl: z_norm = (raw − latent_mean)·σ_d/latent_std. Equal for
    # latent_std = σ_d/scale and latent_mean = −bias/scale (= EDM2's raw_mean/raw_std when its
    # final_mean = 0 and final_std = σ_d, the defaults).
    cfg.data.encoder = str(snapshot.attr(enc, "vae_name", "stabilityai/sd-vae-ft-mse"))
    cfg.data.vae_pixel_range = "unit"       # EDM2 feeds the VAE x/255 and decodes to [0, 1]
    # 7 significant digits: EDM2 stores scale/bias in float32 (5.81 comes back as 5.8099999)
    cfg.data.latent_mean = [float(f"{v:.7g}") for v in -bias / scale]
    cfg.data.latent_std = [float(f"{v:.7g}") for v in cfg.data.sigma_data / scale]
