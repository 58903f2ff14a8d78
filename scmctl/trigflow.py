"""TrigFlow: the diffusion process sCM is built on (Lu & Song 2025, Sec. 3 and App. B).

    x_t = cos(t)·x0 + sin(t)·z,   z ~ N(0, σ_d² I),   t ∈ [0, π/2]
    v_t = dx_t/dt = cos(t)·z − sin(t)·x0
    PF-ODE:  dx_t/dt = σ_d·F_θ(x_t/σ_d, c_noise(t)),   c_noise(t) = t
    denoiser / consistency function:  f_θ(x_t, t) = cos(t)·x_t − sin(t)·σ_d·F_θ(x_t/σ_d, t)

In EDM's preconditioning terms: c_skip = cos t, c_out = −σ_d sin t, c_in = 1/σ_d, c_noise = t.
Conversions to EDM's σ and to rectified flow are computed in float64.
"""

from __future__ import annotations

import math

import torch

SIGMA_MAX_EDM = 80.0


def t_max(sigma_data: float = 0.5, sigma_max: float = SIGMA_MAX_EDM) -> float:
    """t_max = arctan(σ_max/σ_d): the largest time used for sampling (≈1.5645 for σ_d = 0.5)."""
    return math.atan(sigma_max / sigma_data)


def per_sample(v: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor:
    """A per-sample value (N,) as (N, 1, ..., 1) in x's dtype, to broadcast against x (N, ...);
    a scalar stays a scalar. Boolean masks keep their dtype."""
    v = torch.as_tensor(v, device=x.device)
    if v.dtype != torch.bool:
        v = v.to(x.dtype)
    return v.reshape(-1, *([1] * (x.ndim - 1))) if v.ndim == 1 else v


def add_noise(x0: torch.Tensor, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x_t = cos(t)·x0 + sin(t)·z (z already has std σ_d)."""
    tb = per_sample(t, x0)
    return torch.cos(tb) * x0 + torch.sin(tb) * z


def velocity(x0: torch.Tensor, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """v_t = dx_t/dt = cos(t)·z − sin(t)·x0."""
    tb = per_sample(t, x0)
    return torch.cos(tb) * z - torch.sin(tb) * x0


def denoise(x_t: torch.Tensor, t: torch.Tensor, F: torch.Tensor, sigma_data: float) -> torch.Tensor:
    """f(x_t, t) = cos(t)·x_t − sin(t)·σ_d·F: the consistency function / x0-prediction."""
    tb = per_sample(t, x_t)
    return torch.cos(tb) * x_t - torch.sin(tb) * sigma_data * F


def ddim_step(x_s: torch.Tensor, s: torch.Tensor, t: torch.Tensor, F: torch.Tensor,
              sigma_data: float) -> torch.Tensor:
    """Exact step of the PF-ODE from time s to t for a locally constant F (TrigFlow DDIM):
    x_t = cos(s−t)·x_s − sin(s−t)·σ_d·F(x_s/σ_d, s)."""
    d = per_sample(s, x_s) - per_sample(t, x_s)
    return torch.cos(d) * x_s - torch.sin(d) * sigma_data * F


def sample_time(n: int, P_mean: float, P_std: float, sigma_data: float,
                generator: torch.Generator | None = None, device=None) -> torch.Tensor:
    """Time proposal: τ ~ N(P_mean, P_std²), t = arctan(e^τ/σ_d) (EDM's log-normal σ = e^τ)."""
    tau = torch.randn(n, generator=generator, device=device, dtype=torch.float64) * P_std + P_mean
    return torch.atan(torch.exp(tau) / sigma_data).float()


# ---------------------------------------------------------------- conversions (float64) ---------

def edm_sigma_to_t(sigma, sigma_data: float = 0.5):
    """EDM noise level σ -> TrigFlow time t = arctan(σ/σ_d)."""
    return torch.atan(torch.as_tensor(sigma, dtype=torch.float64) / sigma_data)


def t_to_edm_sigma(t, sigma_data: float = 0.5):
    """TrigFlow time t -> EDM noise level σ = σ_d·tan(t)."""
    return sigma_data * torch.tan(torch.as_tensor(t, dtype=torch.float64))


def edm_x_to_trigflow(x_sigma: torch.Tensor, sigma, sigma_data: float = 0.5) -> torch.Tensor:
    """EDM x_σ = x0 + σ·ε  ->  TrigFlow x_t = cos(t)·x_σ with t = arctan(σ/σ_d)."""
    t = edm_sigma_to_t(sigma, sigma_data)
    return (torch.cos(per_sample(t, x_sigma.double())) * x_sigma.double()).to(x_sigma.dtype)


def trigflow_x_to_edm(x_t: torch.Tensor, t, sigma_data: float = 0.5) -> torch.Tensor:
    """TrigFlow x_t -> EDM x_σ = x_t / cos(t)."""
    tt = torch.as_tensor(t, dtype=torch.float64)
    return (x_t.double() / torch.cos(per_sample(tt, x_t.double()))).to(x_t.dtype)


def general_to_trigflow(x: torch.Tensor, alpha, sigma, sigma_data: float = 0.5):
    """A general process x' = α'·x0 + σ'·ε (ε ~ N(0, I)) -> (x_t, t) with
    t = arctan(σ'/(σ_d α')) and x_t = σ_d/√(α'²σ_d² + σ'²)·x'."""
    a = torch.as_tensor(alpha, dtype=torch.float64)
    s = torch.as_tensor(sigma, dtype=torch.float64)
    t = torch.atan2(s, sigma_data * a)
    scale = sigma_data / torch.sqrt(a ** 2 * sigma_data ** 2 + s ** 2)
    return (per_sample(scale, x.double()) * x.double()).to(x.dtype), t


def flow_time_to_t(tau):
    """Rectified-flow time τ (x = (1−τ)x0 + τε, with data scaled so σ_d matches) -> TrigFlow t:
    tan t = τ/(1−τ), i.e. τ = sin t/(sin t + cos t)."""
    tau = torch.as_tensor(tau, dtype=torch.float64)
    return torch.atan2(tau, 1.0 - tau)


def t_to_flow_time(t):
    """TrigFlow t -> rectified-flow time τ = sin t/(sin t + cos t)."""
    t = torch.as_tensor(t, dtype=torch.float64)
    return torch.sin(t) / (torch.sin(t) + torch.cos(t))


def edm_time_grid(num_steps: int, sigma_data: float = 0.5, sigma_min: float = 0.002,
                  sigma_max: float = SIGMA_MAX_EDM, rho: float = 7.0) -> torch.Tensor:
    """EDM's ρ-spaced σ grid (num_steps points, decreasing) mapped to TrigFlow times, then t=0
    appended: shape (num_steps + 1,), float64."""
    i = torch.arange(num_steps, dtype=torch.float64)
    inv = 1.0 / rho
    sig = (sigma_max ** inv + i / max(num_steps - 1, 1) * (sigma_min ** inv - sigma_max ** inv)) ** rho
    t = torch.atan(sig / sigma_data)
    return torch.cat([t, torch.zeros(1, dtype=torch.float64)])
