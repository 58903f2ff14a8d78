"""Adaptive variational score distillation (aVSD) for sCD (Lu & Song 2025, App. C; Table 6 "sCD + aVSD").

Besides the sCD student F_θ and the frozen teacher F_pre, a fake score model F_φ (initialized from
the teacher) learns the distribution of the student's one-step samples. Per micro-batch:

    z' ~ N(0, σ_d² I)
    g_θ = f_θ(z', t_max) = cos(t_max)·z' − sin(t_max)·σ_d·F_θ(z'/σ_d, t_max)   (one-step sample)
    g⁻ = stopgrad(g_θ); t: log(σ_d tan t) ~ N(vsd_P_mean, vsd_P_std²); n ~ N(0, σ_d² I)
    x_t = cos t·g⁻ + sin t·n
    r = F_pre(x_t/σ_d, t) − F_φ(x_t/σ_d, t);  r ← r/(‖r‖ + c)   (loss.vsd_norm = l2, the default)
    L_VSD = e^{w_ψ(t)}/D·‖g_θ − g⁻ + r‖² − w_ψ(t)   (student, w_ψ)
    L_fake = the TrigFlow diffusion loss of F_φ on g⁻, log(σ_d tan t) ~ N(vsd_fake_P_mean, ·²)   (φ)

The student minimizes the sCD loss + λ_VSD·L_VSD; F_pre and F_φ run without gradient, so L_VSD
reaches θ only through g_θ (and w_ψ through its head), and L_fake reaches only φ (g⁻ is detached).
L_fake's graph is built after the student's backward (:attr:`LossOutput.then`).

Residual normalization (loss.vsd_norm: l2 | rms | none, c = loss.tangent_norm_c). The residual r
plays the part of the sCM tangent g in the sCM loss e^{w}/D·‖F_θ − F⁻ − g‖² − w, and is normalized
the same way (g/(‖g‖ + c), Lu & Song 2025 Sec. 4.2). Without it (none, the plain formula), the
adaptive weight divides by the residual's own scale: e^{w_ψ} ≈ 1/E[‖r‖²/D], so the student's gradient
2e^{w_ψ}/D·r grows like 1/‖r‖ as ‖r‖ → 0. `scmctl distill` starts the student and F_φ at the
teacher, where r ≈ 0: on the 2-D toy (λ 0.1, seeds 0, 1) e^{w_ψ} climbs to ≈300 by step 750; when the
student then moves (an sCD loss spike near step 800 that sCD alone recovers from), the amplified
push and F_φ chasing the moved samples feed each other (‖r‖²/D reached 10⁷). With l2, ‖r‖ < 1 per
sample, e^{w_ψ} stayed under ≈16 (λ 0.3, seed 3) and the same spike passed. Measured on the grid toy of
tests/test_learning.py (student from the teacher's weights, 1000 steps, EMA 1-step SWD, seeds
0/1/2/3; an untrained student is at ≈0.45): sCD alone 0.049/0.198/0.227/0.034; none λ 0.1:
2.26/43.6/0.046/0.090, λ 0.3: 0.033/0.175/0.033/0.077, λ 1: 0.47/0.39/0.41/0.32; l2 λ 0.1:
0.033/0.42/0.18/0.33, λ 0.3: 0.038/0.040/0.035/0.47, λ 0.5: 0.034/0.034/0.060/0.033, λ 1:
0.097/0.21/0.150/0.074. The end points scatter with where sCD's spikes fall; l2 with λ 0.5 was the
best row (every seed ≤ 0.06; the README's example); λ 1 no longer blows up but is not better than sCD.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from scmctl import trigflow
from scmctl.config import LossConfig
from scmctl.losses import LossOutput, diffusion_loss, guidance_scales, guided_teacher, normalize_tangent


def one_step_sample(net, z: torch.Tensor, labels: Optional[torch.Tensor], guidance: Optional[torch.Tensor],
                    sigma_data: float) -> torch.Tensor:
    """g_θ(z') = f_θ(z', t_max) = cos(t_max)·z' − sin(t_max)·σ_d·F_θ(z'/σ_d, t_max), the consistency
    model's one-step sample (Lu & Song 2025, Eq. 6 at t = t_max), with the graph of `net`."""
    t_max = trigflow.t_max(sigma_data)
    t = torch.full((z.shape[0],), t_max, device=z.device)
    F = net(z / sigma_data, t, labels, guidance)
    return trigflow.denoise(z, t, F.to(z.dtype), sigma_data)


@torch.no_grad()
def _evaluated(forward, module, x: torch.Tensor, t: torch.Tensor, labels: Optional[torch.Tensor]) -> torch.Tensor:
    """forward(x, t, labels) without gradient with `module` in eval mode (no dropout: F_φ is
    compared with the eval-mode teacher), its training mode restored afterwards."""
    was = module.training
    module.eval()
    try:
        return forward(x, t, labels)
    finally:
        module.train(was)


def vsd_loss(student, teacher, fake_forward, fake_net, weight_head, shape: tuple[int, ...],
             labels: Optional[torch.Tensor], cfg: LossConfig, sigma_data: float, device) -> tuple[LossOutput, torch.Tensor]:
    """The aVSD generator term L_VSD of one micro-batch (its mean over samples) and the detached
    samples g⁻ it was computed on (the fake score model's training data).

    `student`: the student's gradient forward; `teacher`: F_pre (eval mode); `fake_forward`: F_φ's
    forward, called without gradient with its module `fake_net` in eval mode; `weight_head`: w_ψ(t). `shape`: the
    micro-batch's (n, C, H, W); `labels`: one-hot rows or None. With a guided teacher
    (loss.max_guidance > 1, conditional) s ~ U[1, max_guidance] per sample is the student's
    guidance input and F_pre = F_u + s·(F_c − F_u), as in sCD (:func:`scmctl.losses.teacher_velocity`);
    F_φ, a copy of the unguided teacher, sees the labels only.

    Sign. ∇_{g_θ} L_VSD = 2e^{w}/D·r with r ∝ F_pre − F_φ (a positive per-sample factor
    1/(‖F_pre − F_φ‖ + c) under loss.vsd_norm = l2; the residual's g_θ − g⁻ is 0 in value), so a
    descent step moves each sample along F_φ − F_pre. With the denoiser D(x_t) = cos t·x_t −
    sin t·σ_d·F (TrigFlow, Lu & Song 2025 Eq. 2), D_pre − D_φ = sin t·σ_d·(F_φ − F_pre): the step
    is along D_real − D_fake, toward the data and away from the student's own distribution (the
    VSD gradient, Wang et al. 2023; Yin et al. 2024), with a positive factor sin t·σ_d.
    """
    n, d = shape[0], int(torch.Size(shape[1:]).numel())
    z = torch.randn(shape, device=device) * sigma_data
    guidance = guidance_scales(n, labels, cfg, device)
    g = one_step_sample(student, z, labels, guidance, sigma_data)
    g_minus = g.detach()
    t = trigflow.sample_time(n, cfg.vsd_P_mean, cfg.vsd_P_std, sigma_data, device=device)
    x_t = trigflow.add_noise(g_minus, torch.randn_like(g_minus) * sigma_data, t)
    F_pre = guided_teacher(teacher, x_t / sigma_data, t, labels, guidance)
    F_fake = _evaluated(fake_forward, fake_net, x_t / sigma_data, t, labels)
    ld = torch.promote_types(g.dtype, torch.float32)
    # the residual's value F_pre − F_φ, normalized like the sCM tangent (loss.vsd_norm; Sec. 4.2)
    r = normalize_tangent(F_pre.to(ld) - F_fake.to(ld), dataclasses.replace(cfg, tangent_norm=cfg.vsd_norm))
    residual = g.to(ld) - g_minus.to(ld) + r
    per = residual.flatten(1).square().sum(dim=1) / d
    raw = per.detach()
    if cfg.adaptive_weighting:
        w = weight_head(t)
        per = torch.exp(w) * per - w
    return LossOutput(per.mean(), {"loss_vsd_raw": float(raw.mean())}), g_minus


def fake_score_loss(fake_forward, fake_net, g_minus: torch.Tensor, labels: Optional[torch.Tensor],
                    cfg: LossConfig, sigma_data: float) -> LossOutput:
    """The fake score model's TrigFlow diffusion loss on the student's detached samples g⁻, with the
    proposal log(σ_d tan t) ~ N(vsd_fake_P_mean, vsd_fake_P_std²) and F_φ's own w_φ head
    (loss.adaptive_weighting). `fake_forward`: F_φ's gradient forward (a DDP/FSDP wrapper);
    `fake_net`: the unwrapped module (its w_φ)."""
    fake_cfg = dataclasses.replace(cfg, P_mean=cfg.vsd_fake_P_mean, P_std=cfg.vsd_fake_P_std)
    return diffusion_loss(fake_forward, g_minus.detach(), labels, fake_cfg, sigma_data, weight_net=fake_net)


def with_vsd(out: LossOutput, student, teacher, fake_forward, fake_net, weight_head, shape,
             labels: Optional[torch.Tensor], cfg: LossConfig, sigma_data: float, device) -> LossOutput:
    """sCD + aVSD for one micro-batch: `out` (the sCD loss) + λ_VSD·L_VSD as the student's loss;
    its `then` computes the fake score model's diffusion loss on g⁻ (after the student's backward:
    the two graphs never coexist). stats: loss_scd, loss_vsd (L_VSD, unweighted by λ),
    loss_vsd_raw (‖·‖²/D), and from `then` loss_fake."""
    vsd, g_minus = vsd_loss(student, teacher, fake_forward, fake_net, weight_head, shape, labels, cfg, sigma_data,
                            device)

    def then() -> LossOutput:
        fake = fake_score_loss(fake_forward, fake_net, g_minus, labels, cfg, sigma_data)
        return LossOutput(fake.loss, {"loss_fake": float(fake.loss.detach())})

    stats = {**out.stats, **vsd.stats, "loss_scd": float(out.loss.detach()), "loss_vsd": float(vsd.loss.detach())}
    return LossOutput(out.loss + cfg.vsd_weight * vsd.loss, stats, then=then)
