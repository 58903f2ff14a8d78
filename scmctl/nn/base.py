"""What every scmctl image network shares, whatever its architecture (``network.arch``).

The interface the losses, the training loop, the samplers and the checkpoints rely on:

- ``forward(x, t, labels=None, guidance=None, augment_labels=None)``: F_θ(x_t/σ_d, t), the TrigFlow
  velocity prediction (Lu & Song 2025, Sec. 3); forward-mode AD (``torch.func.jvp``) flows through
  it in x and t;
- ``adaptive_weight(t)``: the adaptive-weighting head w_φ(t) (Lu & Song 2025, Sec. 4.2);
- ``c_noise(t)``: the noise conditioning the embeddings see, t itself (Lu & Song 2025, Sec. 4.1) or,
  for ``time_embedding: edm`` (networks imported from EDM/EDM2 snapshots), EDM's ln(σ)/4;
- ``renormalize_()``: EDM2's forced weight normalization, run after each optimizer step;
- ``blocks()``: the submodules FSDP2 shards one by one;
- attributes ``num_classes`` and ``emb_guidance`` (None unless the network takes the sCD
  student's guidance-scale input).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from scmctl.config import NetworkConfig
from scmctl.nn.layers import MPConv, TimeEmbedding


def per_sample(t: torch.Tensor, n: int) -> torch.Tensor:
    """t as a vector of n entries (a single value is broadcast)."""
    return t.reshape(-1).expand(n) if t.numel() == 1 else t.reshape(-1)


def class_input(labels: torch.Tensor | None, n: int, num_classes: int, device) -> torch.Tensor:
    """Class labels as float rows (n, num_classes): integer labels one-hot, float rows as given
    (a zero row = unconditional, how classifier-free guidance drops labels), None = all zero."""
    if labels is None:
        return torch.zeros(n, num_classes, device=device)
    if labels.dtype in (torch.int64, torch.int32):
        return F.one_hot(labels.long(), num_classes).float()
    return labels.float()


class AdaptiveWeighting(nn.Module):
    """The adaptive-weighting head and the noise conditioning it sees; the base of every image
    network (its w_φ) and, alone, aVSD's w_ψ (:class:`AdaptiveWeightHead`)."""

    def init_weight_head(self, cfg: NetworkConfig) -> None:
        """w_φ(t): a positional/Fourier embedding of t and one magnitude-preserving linear layer to a
        scalar (EDM2's uncertainty head, Karras et al. 2024 Sec. 5)."""
        self.weight_embed = TimeEmbedding(cfg.adaptive_weight_channels, cfg.time_embedding, cfg.time_embedding_scale)
        self.weight_linear = MPConv(cfg.adaptive_weight_channels, 1)

    def adaptive_weight(self, t: torch.Tensor) -> torch.Tensor:
        """w_φ(t): the adaptive-weighting head, one scalar per sample (float32); the loss is
        e^{w_φ(t)}/D·‖·‖² − w_φ(t) (EDM2's learned uncertainty with w = −log-variance)."""
        return self.weight_linear(self.weight_embed(self.c_noise(t.reshape(-1)))).reshape(-1).float()

    def c_noise(self, t: torch.Tensor) -> torch.Tensor:
        """c_noise(t) = t (Lu & Song 2025, Sec. 4.1); with ``time_embedding: edm``, EDM's
        c_noise = ln(σ)/4 at σ = σ_d·tan t (Karras et al. 2022, Table 1), in ≥ fp32. The derivative
        dc_noise/dt = 1/(2 sin 2t) diverges at both ends: the instability sCM's c_noise = t removes."""
        if self.cfg.time_embedding != "edm":
            return t
        t = t.to(torch.promote_types(t.dtype, torch.float32))
        return torch.log(self.cfg.edm_sigma_data * torch.tan(t)) / 4

    @torch.no_grad()
    def renormalize_(self) -> None:
        """Forced weight normalization of every MPConv (run after each optimizer step)."""
        for m in self.modules():
            if isinstance(m, MPConv):
                m.renormalize_()


class AdaptiveWeightHead(AdaptiveWeighting):
    """A stand-alone adaptive-weighting head w(t) with a network's embedding settings: aVSD's w_ψ
    (Lu & Song 2025, App. C), which weights the VSD term as w_φ weights the sCM loss."""

    def __init__(self, cfg: NetworkConfig):
        super().__init__()
        self.cfg = cfg
        self.init_weight_head(cfg)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.adaptive_weight(t)


class ImageNetwork(AdaptiveWeighting):
    """Base class: the adaptive-weighting head, forced weight normalization and the FSDP units."""

    def blocks(self) -> list[nn.Module]:
        """The encoder and decoder blocks, each its own FSDP2 shard group."""
        return [*self.enc, *self.dec]
