"""The optimizer, its learning-rate schedule and the update that follows a backward pass."""

from __future__ import annotations

import math

import torch

from scmctl.config import Config


def make_optimizer(cfg: Config, params) -> torch.optim.Optimizer:
    tc = cfg.train
    cls = torch.optim.RAdam if tc.optimizer == "radam" else torch.optim.Adam
    return cls(params, lr=tc.lr, betas=tuple(tc.betas), eps=tc.eps)


def learning_rate(cfg: Config, step: int) -> float:
    """α(step) = α_ref/√max(step/t_ref, 1), the inverse square-root decay of EDM2 (Karras et al.
    2024) that the paper's ImageNet runs use (Lu & Song 2025, App. G), times EDM/EDM2's linear
    ramp-up min(1, images seen/train.lr_rampup_images) (both use 10 Mimg). Further terms multiply
    in here."""
    tc = cfg.train
    lr = tc.lr
    if tc.lr_ref_steps > 0:
        lr /= math.sqrt(max(step / tc.lr_ref_steps, 1.0))
    if tc.lr_rampup_images > 0:
        lr *= min(step * tc.batch / tc.lr_rampup_images, 1.0)
    return lr


def apply_update(cfg: Config, model, opt: torch.optim.Optimizer, lr: float) -> tuple[torch.Tensor, bool]:
    """Clip, step (unless the gradient norm is not finite), renormalize the weights (EDM2's forced
    weight normalization). `model`: a :class:`~scmctl.training.parallel.Model`.
    Returns (gradient norm, skipped)."""
    return step_network(cfg, model.net, opt, lr)


def step_network(cfg: Config, net, opt: torch.optim.Optimizer, lr: float) -> tuple[torch.Tensor, bool]:
    """:func:`apply_update` for one module `net` (parameters(), renormalize_()) and its optimizer:
    the student, aVSD's fake score model or its weighting head."""
    for g in opt.param_groups:
        g["lr"] = lr
    clip = cfg.train.grad_clip if cfg.train.grad_clip > 0 else float("inf")
    grad_norm = torch.nn.utils.clip_grad_norm_(net.parameters(), clip)
    if hasattr(grad_norm, "full_tensor"):  # FSDP2: a DTensor, the same on every process
        grad_norm = grad_norm.full_tensor()
    skipped = not bool(torch.isfinite(grad_norm))
    if not skipped:
        opt.step()
        net.renormalize_()
    return grad_norm, skipped
