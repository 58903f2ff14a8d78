"""Training objectives: the TrigFlow diffusion loss (teacher) and the sCM loss (sCT / sCD).

The sCM loss follows Algorithm 1 of Lu & Song (ICLR 2025); see SCM_NOTES §2. One step:

    x0 ~ data; z ~ N(0, σ_d² I); τ ~ N(P_mean, P_std²); t = arctan(e^τ/σ_d)
    x_t = cos t·x0 + sin t·z
    dx_t/dt = cos t·z − sin t·x0   (sCT)   |   σ_d·F_teacher(x_t/σ_d, t[, s])   (sCD)
    r = min(1, step/H)                                                    (tangent warmup, Sec. 4.2)
    F⁻, J = jvp(F_θ⁻, (x_t/σ_d, t), (cos t·sin t·dx_t/dt, cos t·sin t·σ_d))   ⇒ J = σ_d cos t sin t dF⁻/dt
    g = −cos²t·(σ_d·F⁻ − dx_t/dt) − r·(cos t·sin t·x_t + J)               (= cos t·df⁻/dt, Eq. 8 rearranged)
    g ← g/(‖g‖ + c)                                                       (tangent normalization)
    L = e^{w_φ(t)}/D·‖F_θ(x_t/σ_d, t) − F⁻ − g‖² − w_φ(t)                 (adaptive weighting)

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

from scmctl import trigflow
from scmctl.config import LossConfig

# Bins of t for the per-bin stability diagnostics in stats.jsonl.
T_BINS = (0.0, math.pi / 8, math.pi / 4, 3 * math.pi / 8, math.pi / 2 + 1e-6)


@dataclass
class LossOutput:
    loss: torch.Tensor                                # scalar to backpropagate
    stats: dict = field(default_factory=dict)         # plain floats for stats.jsonl


def _flat_norm(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(1).double().norm(dim=1)


def _bc(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return v.reshape(-1, *([1] * (x.ndim - 1))).to(x.dtype)


class _RNGFork:
    """Remember the RNG state now; `restore()` rewinds to it (same dropout mask in both passes)."""

    def __init__(self, device: torch.device):
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
        self.device = device

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state(self.cuda, self.device)


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
                        keep_graph: bool = False):
    """F and the unnormalized tangent g = −cos²t(σ_d F − dx/dt) − r(cos t sin t x_t + J), with
    J = σ_d cos t sin t dF/dt from one forward with dual tensors.

    keep_graph=False: the paper's no-grad jvp (F is F⁻). keep_graph=True ("dual" mode): F keeps its
    autograd graph for the gradient while the tangent rides along and is detached; this saves the
    separate gradient forward (≈4/3 of a diffusion step instead of ≈5/3). g never has a graph.
    """
    cos, sin = _bc(torch.cos(t), x_t), _bc(torch.sin(t), x_t)
    with (contextlib.nullcontext() if keep_graph else torch.no_grad()), fwAD.dual_level():
        x_d = fwAD.make_dual(x_t / sigma_data, cos * sin * dxdt)
        t_d = fwAD.make_dual(t, torch.cos(t) * torch.sin(t) * sigma_data)
        F, J = fwAD.unpack_dual(net(x_d, t_d, labels, guidance))
        J = J.detach()
    g = -cos.square() * (sigma_data * F.detach() - dxdt) - warmup_r * (cos * sin * x_t + J)
    return F, g


def consistency_loss(net, x0: torch.Tensor, labels: Optional[torch.Tensor], cfg: LossConfig,
                     sigma_data: float, step: int, teacher: Optional[Callable] = None,
                     train_net=None) -> LossOutput:
    """The sCM loss (Algorithm 1) for sCT (teacher None) or sCD (teacher = F_teacher module).

    `net`: the unwrapped student (jvp and w_φ); `train_net`: what the gradient forward goes
    through (a DDP/FSDP wrapper), default `net`. `labels`: one-hot rows (zero row =
    unconditional) or None.
    """
    train_net = train_net if train_net is not None else net
    n = x0.shape[0]
    d = x0[0].numel()
    z = torch.randn_like(x0) * sigma_data
    t = trigflow.sample_time(n, cfg.P_mean, cfg.P_std, sigma_data, device=x0.device)
    x_t = trigflow.add_noise(x0, z, t)
    guidance = None
    if teacher is None:
        dxdt = trigflow.velocity(x0, z, t)
    else:
        with torch.no_grad():
            F_c = teacher(x_t / sigma_data, t, labels)
            if cfg.max_guidance > 1 and labels is not None:
                guidance = 1 + torch.rand(n, device=x0.device) * (cfg.max_guidance - 1)
                F_u = teacher(x_t / sigma_data, t, torch.zeros_like(labels))
                F_c = F_u + _bc(guidance, F_u) * (F_c - F_u)
            dxdt = sigma_data * F_c.to(x0.dtype)
    r = min(1.0, step / cfg.tangent_warmup_steps) if cfg.tangent_warmup_steps > 0 else 1.0

    if cfg.jvp_mode == "dual":
        if cfg.nan_masking:  # non-finite inputs would reach the weight gradients through 0·NaN
            ok = (torch.isfinite(x_t) & torch.isfinite(dxdt)).flatten(1).all(dim=1).reshape(-1, *([1] * (x_t.ndim - 1)))
            x_t = torch.where(ok, x_t, torch.zeros_like(x_t))
            dxdt = torch.where(ok, dxdt, torch.full_like(dxdt, float("nan")))
        F_theta, g = consistency_tangent(train_net, x_t, t, dxdt, sigma_data, r, labels, guidance,
                                         keep_graph=True)
        F_minus = F_theta.detach()
    else:
        rng = _RNGFork(x0.device)
        F_minus, g = consistency_tangent(net, x_t, t, dxdt, sigma_data, r, labels, guidance)
        rng.restore()  # the gradient pass draws the same dropout mask as the jvp pass

    ld = torch.promote_types(x0.dtype, torch.float32)  # loss math in >= fp32 (fp64 for g)
    g = g.double()
    g_rms = g.flatten(1).norm(dim=1) / math.sqrt(d)
    finite = torch.isfinite(g).flatten(1).all(dim=1) & torch.isfinite(F_minus).flatten(1).all(dim=1)
    if cfg.nan_masking:
        keep = finite.reshape(-1, *([1] * (g.ndim - 1)))
        g = torch.where(keep, g, torch.zeros_like(g))
        F_minus = torch.where(keep, F_minus, torch.zeros_like(F_minus))
    if cfg.tangent_norm != "none":
        norm = g.flatten(1).norm(dim=1)
        if cfg.tangent_norm == "rms":
            norm = norm / math.sqrt(d)
        g = g / _bc(norm + cfg.tangent_norm_c, g)
    if cfg.jvp_mode != "dual":
        x_in = x_t / sigma_data
        if cfg.nan_masking:  # masked samples must not put NaN into the gradient through 0·NaN
            x_in = torch.where(finite.reshape(-1, *([1] * (x_in.ndim - 1))), x_in, torch.zeros_like(x_in))
        F_theta = train_net(x_in, t, labels, guidance)
        # F⁻ = stopgrad(F_θ) taken from this forward, as in the dual mode: equal to the tangent
        # pass's primal in exact arithmetic, and F_θ − F⁻ stays exactly 0 when the two passes run
        # in different precisions (bf16 gradient forward, fp32 tangent: loss.jvp_fp32).
        F_minus = F_theta.detach()
        if cfg.nan_masking:
            F_minus = torch.where(finite.reshape(-1, *([1] * (F_minus.ndim - 1))), F_minus, torch.zeros_like(F_minus))
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
