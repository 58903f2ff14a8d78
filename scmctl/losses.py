"""Training objectives: the TrigFlow diffusion loss (teacher) and the sCM loss (sCT / sCD).

The sCM loss follows Algorithm 1 of Lu & Song (ICLR 2025), Sec. 4. One step:

    x0 ~ data; z ~ N(0, σ_d² I); τ ~ N(P_mean, P_std²); t = arctan(e^τ/σ_d)
    x_t = cos t·x0 + sin t·z
    dx_t/dt = cos t·z − sin t·x0   (sCT)   |   σ_d·F_teacher(x_t/σ_d, t[, s])   (sCD)
                 (sCT with loss.sct_velocity=batch: its posterior average over the batch, scmctl.batch_velocity)
    r = min(1, step/H)                                                    (tangent warmup, Sec. 4.2)
    F⁻, J = jvp(F_θ⁻, (x_t/σ_d, t), (cos t·sin t·dx_t/dt, cos t·sin t·σ_d))   ⇒ J = σ_d cos t sin t dF⁻/dt
    g = −cos²t·(σ_d·F⁻ − dx_t/dt) − r·(cos t·sin t·x_t + J)               (= cos t·df⁻/dt, Eq. 8 rearranged)
    g ← g/(‖g‖ + c)                                                       (tangent normalization)
    L = e^{w_φ(t)}/D·‖F_θ(x_t/σ_d, t) − F⁻ − g‖² − w_φ(t)                 (adaptive weighting)

Multistep (loss.segments = M > 1, Heek et al. 2024; :mod:`scmctl.segments`): f_θ maps t in
(s_{i−1}, s_i] to s = s_{i−1}, f_θ = cos(t−s)·x_t − sin(t−s)·σ_d·F_θ(x_t/σ_d, t), so along the
ODE (s fixed) df⁻/dt = −cos(t−s)(σ_d F⁻ − dx_t/dt) − sin(t−s)(x_t + σ_d dF⁻/dt): the tangent
above with t − s in the trigonometric factors (and in the jvp's tangents), F still at t.

loss.discrete_steps = N > 0 (discrete-time sCM, App. E): t and a reference time t' < t are
neighbours on EDM's grid of N steps and the finite difference cos t·(f⁻(x_t, t) − f⁻(x_{t'}, t'))/(t − t')
replaces the jvp (:mod:`scmctl.discrete`); everything after g is the same.

θ⁻ is the current weights without gradient (no EMA target). The jvp runs under no_grad on the
unwrapped module; the gradient flows only through the fresh forward F_θ (and w_φ). Both passes see
the same dropout mask (the RNG state is restored between them) and the same labels.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.autograd.forward_ad as fwAD

from scmctl import discrete, segments, trigflow
from scmctl.batch_velocity import References, batch_velocity
from scmctl.config import LossConfig, runs_batch_velocity
from scmctl.devices import fork_rng
from scmctl.trigflow import per_sample

# Bins of t for the per-bin stability diagnostics in stats.jsonl.
T_BINS = (0.0, math.pi / 8, math.pi / 4, 3 * math.pi / 8, math.pi / 2 + 1e-6)


@dataclass
class LossOutput:
    loss: torch.Tensor                                # scalar to backpropagate
    stats: dict = field(default_factory=dict)         # plain floats for stats.jsonl
    # a loss of other parameters, computed and backpropagated after `loss`'s backward so the two
    # graphs never coexist; not part of the logged "loss" (aVSD's fake score model: scmctl.losses_vsd)
    then: Optional[Callable[[], "LossOutput"]] = None


def drop_labels(labels: Optional[torch.Tensor], num_classes: int, p: float) -> Optional[torch.Tensor]:
    """One-hot labels with each row zeroed (= unconditional) with probability p (CFG training)."""
    if labels is None or num_classes == 0:
        return None
    onehot = torch.nn.functional.one_hot(labels.long(), num_classes).float()
    if p > 0:
        keep = (torch.rand(labels.shape[0], device=labels.device) >= p).float()
        onehot = onehot * keep[:, None]
    return onehot


def _t_bin_stats(prefix: str, t: torch.Tensor, values: torch.Tensor) -> dict:
    out = {}
    for i in range(len(T_BINS) - 1):
        m = (t >= T_BINS[i]) & (t < T_BINS[i + 1])
        if m.any():
            out[f"{prefix}_t{i}"] = float(values[m].mean())
    return out


def diffusion_loss(net, x0: torch.Tensor, labels: Optional[torch.Tensor], cfg: LossConfig,
                   sigma_data: float, weight_net=None) -> LossOutput:
    """TrigFlow diffusion (flow-matching) loss for the teacher:
    ‖σ_d F_θ(x_t/σ_d, t) − v_t‖²/(σ_d² D), optionally with EDM2's learned uncertainty weighting
    e^{w_φ(t)}·l − w_φ(t). `net` is called (possibly a DDP wrapper); `weight_net` provides
    `adaptive_weight` (the unwrapped module)."""
    n = x0.shape[0]
    weight_net = weight_net if weight_net is not None else net
    z = torch.randn_like(x0) * sigma_data
    t = trigflow.sample_time(n, cfg.P_mean, cfg.P_std, sigma_data, device=x0.device)
    x_t = trigflow.add_noise(x0, z, t)
    v = trigflow.velocity(x0, z, t)
    F = net(x_t / sigma_data, t, labels)
    per = (F.float() - v.float() / sigma_data).flatten(1).square().mean(dim=1)
    raw = per.detach()
    if cfg.adaptive_weighting:
        w = weight_net.adaptive_weight(t)
        per = torch.exp(w) * per - w
    stats = {"loss_raw": float(raw.mean())}
    stats.update(_t_bin_stats("loss", t, raw))
    return LossOutput(per.mean(), stats)


def consistency_tangent(net, x_t: torch.Tensor, t: torch.Tensor, dxdt: torch.Tensor,
                        sigma_data: float, warmup_r: float, labels=None, guidance=None,
                        keep_graph: bool = False, s: Optional[torch.Tensor] = None):
    """F and the unnormalized tangent g = −cos²t(σ_d F − dx/dt) − r(cos t sin t x_t + J), with
    J = σ_d cos t sin t dF/dt from one forward with dual tensors (Lu & Song 2025, Alg. 1).
    `s`: a multistep model's segment start per sample (None = 0, sCM): every cos t, sin t above
    becomes cos(t − s), sin(t − s), i.e. g = cos(t − s)·df⁻/dt (module docstring).

    keep_graph=False: the paper's no-grad jvp (F is F⁻). keep_graph=True ("dual" mode): F keeps its
    autograd graph for the gradient while the tangent rides along and is detached; this saves the
    separate gradient forward (≈4/3 of a diffusion step instead of ≈5/3). g never has a graph.
    """
    u = t if s is None else t - s  # the time left to the segment start
    cos, sin = torch.cos(per_sample(u, x_t)), torch.sin(per_sample(u, x_t))
    with (contextlib.nullcontext() if keep_graph else torch.no_grad()), fwAD.dual_level():
        x_d = fwAD.make_dual(x_t / sigma_data, cos * sin * dxdt)
        t_d = fwAD.make_dual(t, torch.cos(u) * torch.sin(u) * sigma_data)
        F, J = fwAD.unpack_dual(net(x_d, t_d, labels, guidance))
        J = J.detach()
    g = -cos.square() * (sigma_data * F.detach() - dxdt) - warmup_r * (cos * sin * x_t + J)
    return F, g


def guidance_scales(n: int, labels: Optional[torch.Tensor], cfg: LossConfig, device) -> Optional[torch.Tensor]:
    """sCD with a guided teacher (loss.max_guidance > 1, conditional): s ~ U[1, max_guidance] per
    sample (the student gets s as its input); else None."""
    if cfg.max_guidance > 1 and labels is not None:
        return 1 + torch.rand(n, device=device) * (cfg.max_guidance - 1)
    return None


@torch.no_grad()
def guided_teacher(teacher, x: torch.Tensor, t: torch.Tensor, labels: Optional[torch.Tensor],
                   guidance: Optional[torch.Tensor]) -> torch.Tensor:
    """F_teacher(x, t) (x = x_t/σ_d), with guidance scales s: F_u + s·(F_c − F_u)
    (classifier-free guidance)."""
    F = teacher(x, t, labels)
    if guidance is not None:
        F_u = teacher(x, t, torch.zeros_like(labels))
        F = F_u + per_sample(guidance, F_u) * (F - F_u)
    return F


def teacher_velocity(teacher, x_t: torch.Tensor, t: torch.Tensor, labels: Optional[torch.Tensor],
                     cfg: LossConfig, sigma_data: float) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """sCD: (dx_t/dt = σ_d·F_teacher(x_t/σ_d, t), the guidance scales s or None). With a guided
    teacher (loss.max_guidance > 1, conditional) s ~ U[1, max_guidance] per sample and
    F_teacher = F_u + s·(F_c − F_u) (classifier-free guidance; the student gets s as its input)."""
    guidance = guidance_scales(x_t.shape[0], labels, cfg, x_t.device)
    F = guided_teacher(teacher, x_t / sigma_data, t, labels, guidance)
    return sigma_data * F.to(x_t.dtype), guidance


def tangent_warmup(step: int, cfg: LossConfig) -> float:
    """r = min(1, step/H) (tangent warmup, Lu & Song 2025 Sec. 4.2); H = 0: r = 1."""
    return min(1.0, step / cfg.tangent_warmup_steps) if cfg.tangent_warmup_steps > 0 else 1.0


def _forward_and_tangent(net, train_net, x_t, t, dxdt, r, labels, guidance, cfg: LossConfig,
                         sigma_data: float, s=None, t_ref: Optional[torch.Tensor] = None):
    """(F_θ with its autograd graph, the float64 tangent g, finite: the samples whose g and F⁻ are
    finite). dual: one forward through `train_net` carries both. separate: the no-grad jvp on the
    unwrapped `net`, then the gradient forward on the same dropout mask (the RNG is forked around
    the jvp), its non-finite samples' inputs zeroed so no NaN reaches the weight gradients.
    t_ref (discrete-time sCM): the finite-difference tangent to the grid time t_ref < t replaces
    the jvp (:func:`scmctl.discrete.finite_difference_tangent`) and runs as the separate mode."""
    if cfg.jvp_mode == "dual" and t_ref is None:
        if cfg.nan_masking:  # non-finite inputs would reach the weight gradients through 0·NaN
            ok = per_sample(_all_finite(x_t) & _all_finite(dxdt), x_t)
            x_t = torch.where(ok, x_t, torch.zeros_like(x_t))
            dxdt = torch.where(ok, dxdt, torch.full_like(dxdt, float("nan")))
        F_theta, g = consistency_tangent(train_net, x_t, t, dxdt, sigma_data, r, labels, guidance,
                                         keep_graph=True, s=s)
        g = g.double()
        return F_theta, g, _all_finite(g) & _all_finite(F_theta.detach())
    with fork_rng(x_t.device):
        if t_ref is None:
            F_minus, g = consistency_tangent(net, x_t, t, dxdt, sigma_data, r, labels, guidance, s=s)
        else:
            F_minus, g = discrete.finite_difference_tangent(net, x_t, t, t_ref, dxdt, sigma_data, r, labels, guidance)
    g = g.double()
    finite = _all_finite(g) & _all_finite(F_minus)
    x_in = x_t / sigma_data
    if cfg.nan_masking:
        x_in = torch.where(per_sample(finite, x_in), x_in, torch.zeros_like(x_in))
    # F⁻ = stopgrad(F_θ) is taken from this forward, as in the dual mode: equal to the tangent
    # pass's primal in exact arithmetic, and F_θ − F⁻ stays exactly 0 when the two passes run
    # in different precisions (bf16 gradient forward, fp32 tangent: loss.jvp_fp32).
    return train_net(x_in, t, labels, guidance), g, finite


def segment_start(t: torch.Tensor, cfg: LossConfig, sigma_data: float) -> Optional[torch.Tensor]:
    """A multistep model's segment start s per sample (loss.segments > 1), None for sCM."""
    if cfg.segments == 1:
        return None
    bounds = segments.resolved_boundaries(cfg.segment_boundaries, cfg.segments, sigma_data, cfg.segment_spacing)
    return segments.segment_start(t, bounds)


def _all_finite(x: torch.Tensor) -> torch.Tensor:
    """Per sample: every entry finite."""
    return torch.isfinite(x).flatten(1).all(dim=1)


def normalize_tangent(g: torch.Tensor, cfg: LossConfig) -> torch.Tensor:
    """g ← g/(‖g‖ + c) (tangent normalization, Lu & Song 2025 Sec. 4.2); rms: ‖g‖/√D."""
    if cfg.tangent_norm == "none":
        return g
    norm = g.flatten(1).norm(dim=1)
    if cfg.tangent_norm == "rms":
        norm = norm / math.sqrt(g[0].numel())
    return g / per_sample(norm + cfg.tangent_norm_c, g)


def consistency_loss(net, x0: torch.Tensor, labels: Optional[torch.Tensor], cfg: LossConfig,
                     sigma_data: float, step: int, teacher: Optional[Callable] = None,
                     train_net=None, augment_labels: Optional[torch.Tensor] = None,
                     references: Optional[References] = None) -> LossOutput:
    """The sCM loss (Algorithm 1) for sCT (teacher None) or sCD (teacher = F_teacher module).

    `net`: the unwrapped student (jvp and w_φ); `train_net`: what the gradient forward goes
    through (a DDP/FSDP wrapper), default `net`. `labels`: one-hot rows (zero row =
    unconditional) or None. `augment_labels` and `references` (extra data examples) only serve
    sCT's batch velocity (loss.sct_velocity=batch): the posterior average pairs samples that went
    through the same augmentation.
    """
    train_net = train_net if train_net is not None else net
    n, d = x0.shape[0], x0[0].numel()
    # x_t and its direction dx_t/dt: the data's velocity (sCT) or the teacher's (sCD)
    z = torch.randn_like(x0) * sigma_data
    if cfg.discrete_steps:  # (t, t') = neighbours on EDM's grid (discrete-time sCM, App. E)
        t, t_ref = discrete.sample_time_pair(n, cfg.discrete_steps, cfg.P_mean, cfg.P_std, sigma_data, x0.device)
    else:
        t, t_ref = trigflow.sample_time(n, cfg.P_mean, cfg.P_std, sigma_data, device=x0.device), None
    x_t = trigflow.add_noise(x0, z, t)
    if teacher is None and runs_batch_velocity(cfg):  # posterior average
        dxdt = batch_velocity(x_t, t, x0, z, sigma_data, labels=labels, augment_labels=augment_labels,
                              references=references)
        guidance = None
    elif teacher is None:
        dxdt, guidance = trigflow.velocity(x0, z, t), None
    else:
        dxdt, guidance = teacher_velocity(teacher, x_t, t, labels, cfg, sigma_data)
    r = tangent_warmup(step, cfg)
    s = segment_start(t, cfg, sigma_data)

    # F_θ, the tangent g (Eq. 8 rearranged), and the samples it is finite for
    F_theta, g, finite = _forward_and_tangent(net, train_net, x_t, t, dxdt, r, labels, guidance, cfg, sigma_data,
                                              s=s, t_ref=t_ref)
    F_minus = F_theta.detach()
    g_rms = g.flatten(1).norm(dim=1) / math.sqrt(d)
    if cfg.nan_masking:  # drop samples whose tangent or F⁻ is not finite
        keep = per_sample(finite, g)
        g = torch.where(keep, g, torch.zeros_like(g))
        F_minus = torch.where(keep, F_minus, torch.zeros_like(F_minus))
    g = normalize_tangent(g, cfg)

    # L = e^{w_φ(t)}/D·‖F_θ − F⁻ − g‖² − w_φ(t), in >= fp32 (fp64 for g)
    ld = torch.promote_types(x0.dtype, torch.float32)
    target = (F_minus.double() + g).to(ld)
    per = (F_theta.to(ld) - target).flatten(1).square().sum(dim=1) / d
    raw = per.detach()
    if cfg.adaptive_weighting:
        w = net.adaptive_weight(t)
        per = torch.exp(w) * per - w
    if cfg.nan_masking:
        per = torch.where(finite, per, torch.zeros_like(per))
    stats = {"loss_raw": float(raw[finite].mean()) if finite.any() else float("nan"),
             "tangent_warmup": r,
             "masked": int((~finite).sum())}
    stats.update(_t_bin_stats("tangent_rms", t, torch.where(finite, g_rms, torch.zeros_like(g_rms))))
    stats.update(_t_bin_stats("loss", t[finite], raw[finite]))  # the unweighted loss per t-bin, as for diffusion
    return LossOutput(per.mean(), stats)
