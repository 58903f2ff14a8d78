"""Adaptive variational score distillation (aVSD) for sCD (Lu & Song 2025, App. C; Table 6 "sCD + aVSD").

Besides the sCD student F_θ and the frozen teacher F_pre, a fake score model F_φ (initialized from
the teacher) learns the distribution of the student's one-step samples. Per micro-batch:

    z' ~ N(0, σ_d² I)
    g_θ = f_θ(z', t_max) = cos(t_max)·z' − sin(t_max)·σ_d·F_θ(z'/σ_d, t_max)   (one-step sample)
    g⁻ = stopgrad(g_θ); t: log(σ_d tan t) ~ N(vsd_P_mean, vsd_P_std²); n ~ N(0, σ_d² I)
    x_t = cos t·g⁻ + sin t·n
    L_VSD = e^{w_ψ(t)}/D·‖g_θ − g⁻ + F_pre(x_t/σ_d, t) − F_φ(x_t/σ_d, t)‖² − w_ψ(t)   (student, w_ψ)
    L_fake = the TrigFlow diffusion loss of F_φ on g⁻, log(σ_d tan t) ~ N(vsd_fake_P_mean, ·²)   (φ)

The student minimizes the sCD loss + λ_VSD·L_VSD; F_pre and F_φ run without gradient, so L_VSD
reaches θ only through g_θ (and w_ψ through its head), and L_fake reaches only φ (g⁻ is detached).
L_fake's graph is built after the student's backward (:attr:`LossOutput.then`).
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from scmctl import trigflow
from scmctl.config import LossConfig
from scmctl.losses import LossOutput, diffusion_loss, guidance_scales, guided_teacher


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

    Sign. ∇_{g_θ} L_VSD = 2e^{w}/D·(F_pre − F_φ) (the residual's g_θ − g⁻ is 0 in value), so a
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
    residual = g.to(ld) - g_minus.to(ld) + (F_pre.to(ld) - F_fake.to(ld))
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
