"""A lower-variance sCT velocity: the posterior-weighted average over a reference batch.

sCT's tangent follows dx_t/dt = cos t·z − sin t·x0 of the sample's own pair (x0, z): an unbiased
but noisy stand-in for the probability-flow velocity E[cos t·z − sin t·x0 | x_t], and its variance
is what separates consistency training from distillation at large t (Lu & Song 2025, Sec. 4 and
5). The stable target field estimator (Xu et al., "Stable Target Field for Reduced Variance Score
Estimation in Diffusion Models", ICLR 2023) replaces the one pair by a self-normalized posterior
average over a reference batch {x0_j} that contains the sample's own x0:

    w_ij ∝ N(x_t,i; cos t_i·x0_j, σ_d² sin² t_i I)          (softmax over j, same class only)
    x̂0_i = Σ_j w_ij x0_j
    v̂_i = (cos t_i·x_t,i − x̂0_i)/sin t_i = (cos t_i·z_i − sin t_i·x0_i) + (x0_i − x̂0_i)/sin t_i

(z_j = (x_t − cos t·x0_j)/sin t makes each term cos t·z_j − sin t·x0_j.) At small t the weights
collapse onto the sample's own x0 and v̂ is the conditional velocity; near t = π/2 they spread over
the whole reference batch and v̂ tends to the marginal velocity. The estimate is consistent in the
size of the reference batch, biased towards the own pair by O(1/R). Not part of the sCM paper:
`loss.sct_velocity: batch` turns it on, `conditional` (the paper's Algorithm 1) is the default.
"""

from __future__ import annotations

from typing import Optional

import torch

from scmctl import trigflow


def same_class(labels: Optional[torch.Tensor], n_ref: int) -> Optional[torch.Tensor]:
    """(n, R) mask of the references each sample may average over: the rows of the first n
    references with the same one-hot label; a sample without a label (zero row: unconditional or
    dropped for guidance) may use all. None = no labels, every pair allowed."""
    if labels is None:
        return None
    n = labels.shape[0]
    if n_ref != n:
        raise ValueError("a labelled reference batch must be the samples' own batch")
    lab = labels.flatten(1).to(torch.float64)
    same = (lab @ lab.T) > 0.5
    unlabelled = lab.abs().sum(dim=1) == 0
    return same | unlabelled[:, None]


def batch_velocity(x_t: torch.Tensor, t: torch.Tensor, x0: torch.Tensor, z: torch.Tensor,
                   sigma_data: float, x0_ref: Optional[torch.Tensor] = None,
                   labels: Optional[torch.Tensor] = None) -> torch.Tensor:
    """v̂ for samples x_t = cos t·x0 + sin t·z (z of std σ_d), averaged over the references x0_ref
    (R, ...) whose first n rows are x0 itself (default: the batch x0). Computed in float64,
    returned in x_t's dtype."""
    x0_ref = x0 if x0_ref is None else x0_ref
    n = x_t.shape[0]
    if x0_ref.shape[0] < n or x0_ref.shape[1:] != x0.shape[1:]:
        raise ValueError(f"x0_ref must hold the batch's own x0 first: got {tuple(x0_ref.shape)} for {tuple(x0.shape)}")
    xt64, ref = x_t.flatten(1).double(), x0_ref.flatten(1).double()
    t64 = t.double()
    c, s = torch.cos(t64)[:, None], torch.sin(t64)[:, None]
    # log N(x_t,i; c_i x0_j, σ_d² s_i²) up to terms constant in j: (2 c ⟨x_t, x0_j⟩ − c² ‖x0_j‖²)/(2 σ_d² s²)
    logits = (2 * c * (xt64 @ ref.T) - c * c * ref.square().sum(dim=1)[None, :]) / (2 * sigma_data**2 * s * s)
    mask = same_class(labels, ref.shape[0])
    if mask is not None:
        logits = logits.masked_fill(~mask, float("-inf"))
    w = torch.softmax(logits, dim=1)
    # x0_i − x̂0_i = Σ_j w_ij (x0_i − x0_j): exactly 0 once the weights have collapsed onto j = i
    own = ref[:n]
    correction = own - w @ ref
    v = trigflow.velocity(x0, z, t)
    return (v.double() + (correction / s).view_as(v)).to(x_t.dtype)
