"""EDM snapshots (Karras et al. 2022) onto scmctl's DDPM++/NCSN++ family, preconditioning as TrigFlow.

An EDM ``network-snapshot-*.pkl`` is ``dict(ema=..., loss_fn=..., augment_pipe=..., dataset_kwargs=...)``
with ``ema`` an ``EDMPrecond`` around ``SongUNet`` (``model``); the published CIFAR-10 / ImageNet-64
snapshots use ``EDMPrecond`` (the -vp/-ve suffix of their names is the DDPM++/NCSN++ architecture).
EDMPrecond (EDM Table 1, with its own σ_data):

    D(x_σ; σ) = c_skip·x_σ + c_out·F_x(c_in·x_σ; c_noise, class_labels, augment_labels),
    c_skip = σ_d²/(σ² + σ_d²), c_out = σ·σ_d/√(σ² + σ_d²), c_in = 1/√(σ² + σ_d²), c_noise = ln(σ)/4,

the same preconditioning as EDM2's (see :mod:`scmctl.importers.edm2` for the derivation), so with
σ = σ_d·tan t, x_σ = x_t/cos t and TrigFlow's σ_d set to the snapshot's σ_data:

    F_θ(x_t/σ_d, t) = −F_x(x_t/σ_d; ln(σ_d·tan t)/4)     exactly.

scmctl's SongUNet with ``time_embedding: edm`` computes c_noise from t; the sign goes into the
last layer (``dec.{R}x{R}_aux_conv`` weight and bias negated: the output is linear in them).
EDM's augmentation-label input (``augment_dim``, 9 for its CIFAR-10 pipeline) is kept and fed
nothing (zero) at sampling, as EDM does. EDM has no uncertainty head: scmctl's adaptive weighting
head w_φ starts at its initialization. VPPrecond/VEPrecond (c_noise = 999·t_VP, resp. ln(σ/2))
are not supported; DhariwalUNet (ADM, EDM's ImageNet-64) is not mapped yet.
"""

from __future__ import annotations

import torch

from scmctl.config import Config
from scmctl.errors import UsageError
from scmctl.importers import snapshot
from scmctl.safe_pickle import PersistentObject

# EDM's SongUNet constructor defaults (networks.py) and what each scmctl family fixes.
SONGUNET_DEFAULTS = dict(augment_dim=0, model_channels=128, channel_mult=[1, 2, 2, 2], channel_mult_emb=4,
                         num_blocks=4, attn_resolutions=[16], dropout=0.10, label_dropout=0.0,
                         embedding_type="positional", channel_mult_noise=1, encoder_type="standard",
                         decoder_type="standard", resample_filter=[1, 1])
FAMILIES = {
    "ddpmpp": dict(embedding_type="positional", channel_mult_noise=1, encoder_type="standard",
                   resample_filter=[1, 1], time_embedding_scale=1.0),
    "ncsnpp": dict(embedding_type="fourier", channel_mult_noise=2, encoder_type="residual",
                   resample_filter=[1, 3, 3, 1], time_embedding_scale=16.0),
}
OTHER_PRECONDS = ("VPPrecond", "VEPrecond", "iDDPMPrecond")


def is_edm(net: PersistentObject) -> bool:
    if net.class_name in OTHER_PRECONDS:
        raise UsageError(f"EDM {net.class_name} snapshots are not supported (their c_noise differs from "
                         "EDMPrecond's ln(σ)/4); EDM's published snapshots use EDMPrecond")
    return net.class_name == "EDMPrecond" and "model" in snapshot.children(net)


def _model(net: PersistentObject) -> PersistentObject:
    model = snapshot.children(net)["model"]
    if not isinstance(model, PersistentObject) or model.class_name != "SongUNet":
        name = getattr(model, "class_name", type(model).__name__)
        raise UsageError(f"EDM snapshot: unsupported network {name} (supported: SongUNet DDPM++/NCSN++)")
    return model


def config(top: dict, net: PersistentObject) -> Config:
    """The scmctl config of the snapshot's EDMPrecond + SongUNet (DDPM++ or NCSN++)."""
    model = _model(net)
    kw = {**SONGUNET_DEFAULTS, **snapshot.init_kwargs(model)}
    arch = next((name for name, fam in FAMILIES.items()
                 if all(_same(kw[k], v) for k, v in fam.items() if k in kw)), None)
    if arch is None or kw["decoder_type"] != "standard":
        raise UsageError(f"EDM snapshot: SongUNet with embedding_type={kw['embedding_type']}, "
                         f"encoder_type={kw['encoder_type']}, decoder_type={kw['decoder_type']}, "
                         f"resample_filter={kw['resample_filter']} is neither DDPM++ nor NCSN++")
    cfg = snapshot.diffusion_config(net, kw)
    n = cfg.network
    n.arch = arch
    n.channel_mult_emb = int(kw["channel_mult_emb"])
    n.label_dropout = float(kw["label_dropout"])
    n.augment_dim = int(kw["augment_dim"])
    n.time_embedding_scale = FAMILIES[arch]["time_embedding_scale"]
    return cfg


def state_dict(net: PersistentObject, fresh: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The snapshot's weights under scmctl's SongUNet names (float32, output sign flipped); the
    layers EDM does not have (the w_φ head) are taken from `fresh`, the new network's own state."""
    out = snapshot.tensors(_model(net))
    for k in [k for k in out if k.startswith("dec.") and "_aux_conv." in k]:
        out[k] = -out[k]                                            # F_θ = −F_x
    for k, v in fresh.items():
        if k.startswith("weight_embed.") or k.startswith("weight_linear."):
            out.setdefault(k, v)
    return out


def _same(a, b) -> bool:
    return list(a) == list(b) if isinstance(b, list) else a == b
