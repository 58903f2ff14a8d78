"""Exponential moving averages of the weights.

Power-function EMA (EDM2, Karras et al. 2024): β(t) = (1 − 1/t)^(γ+1) at step t, where γ follows
from the relative width σ_rel by σ_rel² = (γ+1)/((γ+2)²(γ+3)). Or a classic EMA with a half-life
in training images (β = 0.5^(batch/half-life); CIFAR-10 in the sCM paper: 0.5 Mimg).
"""

from __future__ import annotations

import copy

import numpy as np
import torch


def sigma_rel_to_gamma(sigma_rel: float) -> float:
    """Solve σ_rel² = (γ+1)/((γ+2)²(γ+3)) for γ (the real root of a cubic, > −1)."""
    t = sigma_rel ** -2
    roots = np.roots([1, 7, 16 - t, 12 - t])
    gamma = roots[np.isreal(roots)].real.max()
    return float(gamma)


def _local(t: torch.Tensor) -> torch.Tensor:
    """This process's shard of an FSDP2 (DTensor) parameter; a plain tensor itself."""
    return t.to_local() if hasattr(t, "to_local") else t


class EMA:
    def __init__(self, net: torch.nn.Module, sigma_rel: float = 0.05, halflife_images: float = 0.0,
                 batch: int = 1):
        self.net = copy.deepcopy(net).eval().requires_grad_(False)
        self.sigma_rel, self.halflife_images, self.batch = sigma_rel, halflife_images, batch
        self.gamma = sigma_rel_to_gamma(sigma_rel) if sigma_rel > 0 else None

    def beta(self, step: int) -> float:
        """Decay after `step` completed steps (step >= 1)."""
        if self.gamma is not None:
            return (1 - 1 / step) ** (self.gamma + 1)
        if self.halflife_images > 0:
            return 0.5 ** (self.batch / self.halflife_images)
        return 0.0

    @torch.no_grad()
    def update(self, net: torch.nn.Module, step: int) -> None:
        """Average `net`'s weights in. Under FSDP2 both networks are sharded alike and each process
        averages its own shard (the EMA is elementwise)."""
        beta = self.beta(step)
        for p_ema, p in zip(self.net.parameters(), net.parameters()):
            _local(p_ema).lerp_(_local(p).detach().to(p_ema.dtype), 1 - beta)
        for b_ema, b in zip(self.net.buffers(), net.buffers()):
            b_ema.copy_(b)

    def state_dict(self) -> dict:
        return self.net.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.net.load_state_dict(state)
