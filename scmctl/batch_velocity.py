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
size of the reference batch, biased towards the own pair by O(1/R). Xu et al. draw the reference
batch larger than the training batch; `loss.sct_references` adds that many data examples per
micro-batch (data only, no network evaluations): on small data the batch alone leaves the weights
one-hot up to t ≈ 1.2, where the two-step sampler's second step lands. Not part of the sCM paper:
`loss.sct_velocity: batch` turns it on, `conditional` (the paper's Algorithm 1) is the default.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from scmctl import trigflow


class References(NamedTuple):
    """Extra reference examples for the posterior average, drawn from the data beside the
    micro-batch (loss.sct_references): x0 in model space, their one-hot labels (never dropped) and
    augment labels, or None where the run has none."""
    x0: torch.Tensor
    labels: Optional[torch.Tensor] = None
    augment_labels: Optional[torch.Tensor] = None


def _same_rows(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(n, R): row i of `a` equals row j of `b` exactly."""
    return (a.flatten(1)[:, None, :] == b.flatten(1)[None, :, :]).all(dim=2)


def allowed_pairs(labels: Optional[torch.Tensor], ref_labels: Optional[torch.Tensor],
                  augment_labels: Optional[torch.Tensor] = None,
                  ref_augment_labels: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
    """(n, R) mask of the references each sample may average over, or None (every pair).

    Labels: the references of the sample's class (one-hot rows); a sample without a label (zero
    row: unconditional or dropped for guidance) may use all of them. Augment labels (EDM's
    non-leaking augmentation): only references that went through the same transformation, the
    network being conditioned on it."""
    mask = None
    if labels is not None:
        lab, ref = labels.flatten(1).to(torch.float64), ref_labels.flatten(1).to(torch.float64)
        unlabelled = lab.abs().sum(dim=1) == 0
        mask = ((lab @ ref.T) > 0.5) | unlabelled[:, None]
    if augment_labels is not None:
        same = _same_rows(augment_labels, ref_augment_labels)
        mask = same if mask is None else mask & same
    return mask


def _cat(own: Optional[torch.Tensor], extra: Optional[torch.Tensor], what: str) -> Optional[torch.Tensor]:
    if own is None:
        return None
    if extra is None:
        raise ValueError(f"the references need {what} like the batch")
    return torch.cat([own, extra.to(own.device, own.dtype)])


def batch_velocity(x_t: torch.Tensor, t: torch.Tensor, x0: torch.Tensor, z: torch.Tensor,
                   sigma_data: float, labels: Optional[torch.Tensor] = None,
                   augment_labels: Optional[torch.Tensor] = None,
                   references: Optional[References] = None) -> torch.Tensor:
    """v̂ for samples x_t = cos t·x0 + sin t·z (z of std σ_d), averaged over the batch's own x0
    and the extra `references` (their labels and augment labels must be given where the batch
    has them). Computed in float64, returned in x_t's dtype."""
    n = x_t.shape[0]
    if references is None:
        x0_ref, ref_labels, ref_augment = x0, labels, augment_labels
    else:
        if references.x0.shape[1:] != x0.shape[1:]:
            raise ValueError(f"references of shape {tuple(references.x0.shape[1:])} for a batch of {tuple(x0.shape[1:])}")
        x0_ref = torch.cat([x0, references.x0.to(x0.device, x0.dtype)])
        ref_labels = _cat(labels, references.labels, "labels")
        ref_augment = _cat(augment_labels, references.augment_labels, "augment labels")
    xt64, ref = x_t.flatten(1).double(), x0_ref.flatten(1).double()
    t64 = t.double()
    c, s = torch.cos(t64)[:, None], torch.sin(t64)[:, None]
    # log N(x_t,i; c_i x0_j, σ_d² s_i²) up to terms constant in j: (2 c ⟨x_t, x0_j⟩ − c² ‖x0_j‖²)/(2 σ_d² s²)
    logits = (2 * c * (xt64 @ ref.T) - c * c * ref.square().sum(dim=1)[None, :]) / (2 * sigma_data**2 * s * s)
    mask = allowed_pairs(labels, ref_labels, augment_labels, ref_augment)
    if mask is not None:
        logits = logits.masked_fill(~mask, float("-inf"))
    w = torch.softmax(logits, dim=1)
    # x0_i − x̂0_i = Σ_j w_ij (x0_i − x0_j): exactly 0 once the weights have collapsed onto j = i
    own = ref[:n]
    correction = own - w @ ref
    v = trigflow.velocity(x0, z, t)
    return (v.double() + (correction / s).view_as(v)).to(x_t.dtype)
