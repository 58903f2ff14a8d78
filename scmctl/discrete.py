"""Discrete-time sCM (Lu & Song 2025, App. E and the Fig. 5c ablation): with loss.discrete_steps =
N > 0 a finite difference of f_θ⁻ on EDM's time grid replaces the JVP of Algorithm 1. Nothing here
needs forward-mode AD, so it trains networks whose layers have no jvp rule.

Grid. EDM's ρ = 7 σ grid of N steps (Karras et al. 2022, Eq. 5: σ_max = 80, σ_min = 0.002) mapped
to TrigFlow times t = arctan(σ/σ_d), with t = 0 appended (:func:`scmctl.trigflow.edm_time_grid`),
rounded to float32 (the times the network sees): N + 1 points

    t_0 = arctan(80/σ_d) > t_1 > … > t_{N−1} = arctan(0.002/σ_d) > t_N = 0.

A training pair is (t, t') = (t_i, t_{i+1}), i ∈ {0, …, N−1}; the last pair ends at t' = 0, where
f⁻(x, 0) = x (the boundary condition).

Proposal. The categorical that discretizes the log-normal τ = log(σ_d tan t) ~ N(P_mean, P_std²)
as iCT does (Song & Dhariwal 2023, Sec. 3.5): pair i gets the normal mass of the log σ interval it
spans, Φ = the standard normal CDF,

    p_i ∝ Φ((log σ_i − P_mean)/P_std) − Φ((log σ_{i+1} − P_mean)/P_std),   σ_N = 0 (Φ(−∞) = 0),

normalized over σ ≤ σ_max (the mass above σ_max = 80, 6·10⁻⁵ for P = (−1.0, 1.4), is dropped).

Reference point. One DDIM step from t to t' along Algorithm 1's direction dx_t/dt:
x_{t'} = cos(t − t')·x_t − sin(t − t')·dx_t/dt. For sCT (dx_t/dt = cos t·z − sin t·x0) this is
exact, x_{t'} = cos t'·x0 + sin t'·z; for sCD it is the teacher's DDIM step, with the guided
F_teacher when the teacher is guided.

Tangent. With f⁻(x, t) = cos t·x − sin t·σ_d·F_θ⁻(x/σ_d, t) and Δ = t − t',

    g_N = cos t·(f⁻(x_t, t) − f⁻(x_{t'}, t'))/Δ  →  cos t·df⁻/dt (Δ → 0), the tangent of Alg. 1.

It is the discrete CM loss's gradient direction: ∇_θ ‖f_θ(x_t, t) − f⁻(x_{t'}, t')‖²/2 at θ⁻ is
−sin t·σ_d·(∂F_θ/∂θ)ᵀ(f⁻(x_t, t) − f⁻(x_{t'}, t')), and ∇_θ ‖F_θ − F⁻ − g_N‖²/2 at θ⁻ is
−(∂F_θ/∂θ)ᵀ g_N: the same direction, weighted by σ_d tan t·Δ. Tangent warmup (Sec. 4.2) splits
g_N = A + B, A = −cos²t·(σ_d F⁻(x_t, t) − (x_t − x_{t'})/Δ), the part the continuous tangent keeps
at r = 0 (dx_t/dt by its finite difference), and B = g_N − A → −(cos t sin t·x_t + σ_d cos t sin t
dF⁻/dt), the part r scales: g = A + r·B. Normalization, NaN masking and adaptive weighting follow
as for the continuous tangent (:func:`scmctl.losses.consistency_loss`).
"""

from __future__ import annotations

import functools
from typing import Callable

import torch

from scmctl import trigflow
from scmctl.devices import fork_rng
from scmctl.errors import UsageError
from scmctl.trigflow import per_sample


@functools.lru_cache(maxsize=8)
def time_grid(steps: int, sigma_data: float) -> torch.Tensor:
    """The N + 1 times t_0 = t_max > … > t_{N−1} > t_N = 0 (float64 values of float32 numbers)."""
    grid = trigflow.edm_time_grid(steps, sigma_data).float().double()
    if not bool((grid[:-1] > grid[1:]).all()):
        raise UsageError(f"loss.discrete_steps={steps}: neighbouring grid times coincide in float32; "
                         "use fewer steps")
    return grid


def proposal(grid: torch.Tensor, P_mean: float, P_std: float, sigma_data: float) -> torch.Tensor:
    """p_i (i = 0 … N−1): the normal mass of log σ on [log σ_{i+1}, log σ_i], normalized."""
    log_sigma = torch.log(trigflow.t_to_edm_sigma(grid, sigma_data))  # t_N = 0: −∞
    cdf = torch.special.ndtr((log_sigma - P_mean) / P_std)
    mass = cdf[:-1] - cdf[1:]
    return mass / mass.sum()


@functools.lru_cache(maxsize=8)
def _grid_and_cdf(steps: int, P_mean: float, P_std: float, sigma_data: float):
    grid = time_grid(steps, sigma_data)
    return grid, torch.cumsum(proposal(grid, P_mean, P_std, sigma_data), 0)


def sample_time_pair(n: int, steps: int, P_mean: float, P_std: float, sigma_data: float,
                     device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(t, t') = (t_i, t_{i+1}) with i ~ p (inverse CDF of one uniform per sample), float32."""
    grid, cdf = _grid_and_cdf(steps, P_mean, P_std, sigma_data)
    u = torch.rand(n, dtype=torch.float64, device=device)
    i = torch.searchsorted(cdf.to(u.device), u, right=True).clamp_(max=steps - 1)
    grid = grid.to(u.device)
    return grid[i].float(), grid[i + 1].float()


def reference_point(x_t: torch.Tensor, t: torch.Tensor, t_ref: torch.Tensor,
                    dxdt: torch.Tensor) -> torch.Tensor:
    """x_{t'} = cos(t − t')·x_t − sin(t − t')·dx_t/dt in float64 (exact for sCT, DDIM for sCD)."""
    return trigflow.ddim_step(x_t.double(), t.double(), t_ref.double(), dxdt.double(), 1.0)


def tangent(x_t: torch.Tensor, t: torch.Tensor, F: torch.Tensor, x_ref: torch.Tensor,
            t_ref: torch.Tensor, F_ref: torch.Tensor, sigma_data: float, warmup_r: float) -> torch.Tensor:
    """g = A + r·(g_N − A) in float64: g_N = cos t·(f⁻(x_t, t) − f⁻(x_{t'}, t'))/(t − t'),
    A = −cos²t·(σ_d F − (x_t − x_{t'})/(t − t')); F = F⁻(x_t, t), F_ref = F⁻(x_{t'}, t')."""
    x_t, F, x_ref, F_ref = x_t.double(), F.double(), x_ref.double(), F_ref.double()
    t, t_ref = t.double(), t_ref.double()
    cos, dt = torch.cos(per_sample(t, x_t)), per_sample(t - t_ref, x_t)
    g_full = cos * (trigflow.denoise(x_t, t, F, sigma_data) - trigflow.denoise(x_ref, t_ref, F_ref, sigma_data)) / dt
    kept = -cos.square() * (sigma_data * F - (x_t - x_ref) / dt)
    return kept + warmup_r * (g_full - kept)


def finite_difference_tangent(net: Callable, x_t: torch.Tensor, t: torch.Tensor, t_ref: torch.Tensor,
                              dxdt: torch.Tensor, sigma_data: float, warmup_r: float, labels=None,
                              guidance=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(F⁻(x_t, t), the float64 tangent g): the discrete-time counterpart of
    :func:`scmctl.losses.consistency_tangent`, from two no-grad forwards of `net` (same labels,
    guidance and dropout mask: the RNG is forked around the first) at (x_t, t) and (x_{t'}, t')."""
    x_ref = reference_point(x_t, t, t_ref, dxdt)
    with torch.no_grad():
        with fork_rng(x_t.device):
            F = net(x_t / sigma_data, t, labels, guidance)
        F_ref = net(x_ref.to(x_t.dtype) / sigma_data, t_ref.to(t.dtype), labels, guidance)
    return F, tangent(x_t, t, F, x_ref, t_ref, F_ref, sigma_data, warmup_r)

