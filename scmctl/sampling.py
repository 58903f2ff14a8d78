"""Samplers in TrigFlow: consistency 1/2/K-step (multistep consistency sampling, Song et al. 2023
Alg. 1, in TrigFlow as Lu & Song 2025 sample with t_mid = 1.1), the deterministic walk of a
multistep consistency model along its segment boundaries (Heek et al. 2024), refine, and the
teacher ODE solvers (:data:`SOLVERS`).

Image k of a sampling run uses its own generator seeded with `seed + k` (EDM's "seeds 0-49999"),
from which it draws, in this order, its class label (conditional models) and then one noise image
per sampling step (one in all for an ODE solve or a multistep model). So an image depends only on
the seed and k, never on the batch size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from scmctl import segments, trigflow
from scmctl.errors import UsageError, check_float


def per_image_draws(seeds: Sequence[int], shape: tuple[int, ...], num_noises: int,
                    num_classes: int, device) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Noises (num_noises, B, *shape) ~ N(0, I) and labels (B,) drawn from per-image generators."""
    noises, labels = [], []
    for s in seeds:
        g = torch.Generator().manual_seed(int(s))
        if num_classes:
            labels.append(int(torch.randint(num_classes, (1,), generator=g)))
        noises.append(torch.randn((num_noises, *shape), generator=g))
    z = torch.stack(noises, dim=1).to(device)
    lab = torch.tensor(labels, dtype=torch.long, device=device) if num_classes else None
    return z, lab


def evaluations_per_call(net, guidance: float, conditional: bool = True) -> int:
    """Network evaluations per velocity call: 2 for classifier-free guidance of a conditional
    model without a guidance input (F_c and F_u), else 1."""
    takes_guidance = getattr(net, "emb_guidance", None) is not None
    guided = conditional and bool(getattr(net, "num_classes", 0)) and float(guidance) != 1.0
    return 2 if (guided and not takes_guidance) else 1


class Velocity:
    """F(x_t/σ_d, t) for sampling, with classifier-free guidance where the model takes it:
    a student with a guidance input gets s directly; a conditional teacher gets
    F_u + s·(F_c − F_u) (2 evaluations); unconditional models ignore s. `nfe` counts network
    evaluations (2 per guided call)."""

    def __init__(self, net, sigma_data: float, labels: Optional[torch.Tensor], guidance: float = 1.0):
        self.net, self.sigma_data, self.labels, self.guidance = net, sigma_data, labels, guidance
        self.nfe = 0  # network evaluations so far (a guided call of a conditional teacher is 2)
        self.takes_guidance = getattr(net, "emb_guidance", None) is not None
        self.evaluations = evaluations_per_call(net, guidance, labels is not None)

    @torch.no_grad()
    def __call__(self, x_t: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
        n = x_t.shape[0]
        t = torch.as_tensor(t, dtype=torch.float32, device=x_t.device).reshape(-1).expand(n)
        x = x_t / self.sigma_data
        self.nfe += self.evaluations
        if self.takes_guidance:
            g = torch.full((n,), float(self.guidance), device=x_t.device)
            return self.net(x, t, self.labels, g)
        F_c = self.net(x, t, self.labels)
        if self.guidance == 1.0 or self.labels is None:
            return F_c
        F_u = self.net(x, t, torch.zeros(n, self.net.num_classes, device=x_t.device))
        return F_u + self.guidance * (F_c - F_u)


def consistency_times(steps: int, t_max: float, t_mid: float = 1.1,
                      ts: Optional[Sequence[float]] = None) -> list[float]:
    """The times of a K-step consistency sampler: [t_max] (1 step), [t_max, t_mid] (2 steps), or
    t_max followed by an explicit decreasing list."""
    if ts:
        times = [check_float(x, "--ts", 0.0, open_lo=True) for x in ts]
        if times[0] > t_max + 1e-6:
            raise UsageError(f"--ts: times must be <= t_max = {t_max:.4f}")
        if any(b >= a for a, b in zip(times, times[1:])) or times[-1] <= 0:
            raise UsageError("--ts: times must be positive and strictly decreasing")
        return times
    if steps == 1:
        return [t_max]
    if steps == 2:
        return [t_max, t_mid]
    # K > 2 without an explicit list: t_max, then K−1 times evenly spaced in (0, t_mid]
    return [t_max] + [t_mid * (steps - 1 - i) / (steps - 1) for i in range(steps - 1)]


@torch.no_grad()
def consistency_sample(vel: Velocity, noises: torch.Tensor, times: Sequence[float],
                       sigma_data: float) -> torch.Tensor:
    """x0 = f(σ_d z₀, t₁); then for each later t: x = cos t·x0 + sin t·σ_d z_i, x0 = f(x, t)."""
    x = noises[0] * sigma_data
    x0 = None
    for i, t in enumerate(times):
        if i > 0:
            x = math.cos(t) * x0 + math.sin(t) * sigma_data * noises[i]
        x0 = trigflow.denoise(x, torch.full((x.shape[0],), t, device=x.device), vel(x, t), sigma_data)
    return x0


@torch.no_grad()
def multistep_sample(vel: Velocity, noise: torch.Tensor, times: Sequence[float],
                     sigma_data: float) -> torch.Tensor:
    """A multistep consistency model's sample (Heek et al. 2024; :mod:`scmctl.segments`): x = σ_d z
    at times[0] = t_max, then for each later time s, x_s = f_θ(x_t, t) = cos(t−s)·x_t −
    sin(t−s)·σ_d·F(x_t/σ_d, t) (the TrigFlow DDIM jump); one velocity call per jump, no new noise."""
    x = noise * sigma_data
    for t, s in zip(times[:-1], times[1:]):
        x = trigflow.ddim_step(x, t, s, vel(x, t), sigma_data)
    return x


def _denoised(vel: Velocity, x_t: torch.Tensor, t: float) -> torch.Tensor:
    """D(x_t, t) = cos t·x_t − sin t·σ_d·F(x_t/σ_d, t): one velocity call."""
    tt = torch.full((x_t.shape[0],), t, dtype=x_t.dtype, device=x_t.device)
    return trigflow.denoise(x_t, tt, vel(x_t, t), vel.sigma_data)


def heun_sigma_step(vel: Velocity, x: torch.Tensor, s: float, t: float) -> torch.Tensor:
    """EDM's deterministic Heun step in σ (Karras et al. 2022, Alg. 1 with S_churn = 0), run on
    x_σ = x_t/cos t, σ = σ_d·tan t: d_s = (x_σ − D(x_σ; σ_s))/σ_s, an Euler step to σ_t, then
    the second-order correction with the slope at σ_t, except on the last step to σ = 0."""
    sig_s, sig_t = vel.sigma_data * math.tan(s), vel.sigma_data * math.tan(t)
    x_sig = x / math.cos(s)
    d_s = (x_sig - _denoised(vel, x, s)) / sig_s
    x_next = x_sig + (sig_t - sig_s) * d_s
    if t > 0:
        d_t = (x_next - _denoised(vel, math.cos(t) * x_next, t)) / sig_t
        x_next = x_sig + (sig_t - sig_s) * 0.5 * (d_s + d_t)
    return math.cos(t) * x_next


def heun_t_step(vel: Velocity, x: torch.Tensor, s: float, t: float) -> torch.Tensor:
    """The trapezoidal (Heun) step on the TrigFlow ODE in t, dx/dt = σ_d·F(x/σ_d, t); the last
    step to t = 0 is an Euler step in t."""
    d_s = vel.sigma_data * vel(x, s)
    x_next = x + (t - s) * d_s
    if t > 0:
        x_next = x + (t - s) * 0.5 * (d_s + vel.sigma_data * vel(x_next, t))
    return x_next


def dpm2s_step(vel: Velocity, x: torch.Tensor, s: float, t: float) -> torch.Tensor:
    """DPM-Solver++(2S) (Lu et al. 2022, Alg. 1 with r = 1/2) in TrigFlow, where α = cos t,
    σ = sin t and λ = log cot t: a DDIM step to the λ-midpoint m, then the data-prediction step
    x_t = (sin t/sin s)·x_s + (sin(s−t)/sin s)·D(x_m, m). λ is infinite at t = 0: the last step
    is the DDIM step (exact for a constant D)."""
    F_s = vel(x, s)
    if t <= 0:
        return trigflow.ddim_step(x, s, t, F_s, vel.sigma_data)
    m = math.atan(math.exp(-0.5 * (math.log(1 / math.tan(s)) + math.log(1 / math.tan(t)))))
    x_m = trigflow.ddim_step(x, s, m, F_s, vel.sigma_data)
    return (math.sin(t) / math.sin(s)) * x + (math.sin(s - t) / math.sin(s)) * _denoised(vel, x_m, m)


def euler_step(vel: Velocity, x: torch.Tensor, s: float, t: float) -> torch.Tensor:
    """The TrigFlow DDIM step x_t = cos(s−t)·x_s − sin(s−t)·σ_d·F(x_s/σ_d, s), exact for a
    constant F; in σ it is EDM's Euler step x_σt = x_σs + (σ_t − σ_s)·(x_σs − D)/σ_s."""
    return trigflow.ddim_step(x, s, t, vel(x, s), vel.sigma_data)


@dataclass(frozen=True)
class Solver:
    """A teacher ODE solver: `step(vel, x_s, s, t)` advances x_s to x_t (s > t >= 0) with
    `evals_per_step` velocity calls, one on the last step (to t = 0)."""
    step: Callable[[Velocity, torch.Tensor, float, float], torch.Tensor]
    order: int
    evals_per_step: int
    summary: str

    def calls(self, steps: int) -> int:
        """Velocity calls of a `steps`-step solve ending at t = 0."""
        return (steps - 1) * self.evals_per_step + 1


# The one list of teacher solvers: config validation, the CLI's help and error messages derive from it.
SOLVERS: dict[str, Solver] = {
    "dpm2s": Solver(dpm2s_step, 2, 2, "DPM-Solver++(2S), the paper's teacher sampler; 2N−1 evaluations"),
    "heun": Solver(heun_sigma_step, 2, 2, "EDM's Heun in σ (EDM Alg. 1); 2N−1 evaluations"),
    "heun-t": Solver(heun_t_step, 2, 2, "Heun (trapezoid) in TrigFlow t; 2N−1 evaluations"),
    "euler": Solver(euler_step, 1, 1, "TrigFlow DDIM = EDM's Euler in σ; N evaluations"),
}


def solver_named(name: str) -> Solver:
    """The solver called `name`, or a one-line UsageError listing the choices."""
    if name not in SOLVERS:
        raise UsageError(f"unknown solver '{name}' (choose from {', '.join(SOLVERS)})")
    return SOLVERS[name]


@torch.no_grad()
def ode_sample(vel: Velocity, x: torch.Tensor, times: torch.Tensor, solver: str = "dpm2s") -> torch.Tensor:
    """Solve the PF-ODE dx/dt = σ_d·F(x/σ_d, t) along decreasing `times` (ending at 0) with one
    of :data:`SOLVERS`."""
    step = solver_named(solver).step
    times = [float(t) for t in times]
    for s, t in zip(times[:-1], times[1:]):
        x = step(vel, x, s, t)
    return x


def teacher_times(steps: int, sigma_data: float, t_start: Optional[float] = None) -> torch.Tensor:
    """EDM's ρ=7 σ grid (σ_max = 80, or σ_d·tan(t_start) for refinement) mapped to TrigFlow t,
    ending at 0."""
    sigma_max = trigflow.SIGMA_MAX_EDM if t_start is None else sigma_data * math.tan(t_start)
    return trigflow.edm_time_grid(steps, sigma_data, sigma_max=sigma_max, sigma_min=min(0.002, sigma_max))


def num_draws(kind: str, steps: int, t_max: float, t_mid: float = 1.1,
              ts: Optional[Sequence[float]] = None, boundaries: Optional[Sequence[float]] = None) -> int:
    """Noise images drawn per seed: one per consistency step, one for an ODE solve or a multistep
    consistency model (`boundaries`: its segment boundaries)."""
    if kind != "consistency" or boundaries is not None:
        return 1
    return len(consistency_times(steps, t_max, t_mid, ts))


@torch.no_grad()
def generate(net, kind: str, seeds: Sequence[int], shape: tuple[int, ...], sigma_data: float,
             steps: int, t_mid: float = 1.1, ts: Optional[Sequence[float]] = None,
             solver: str = "dpm2s", labels: Optional[torch.Tensor] = None, guidance: float = 1.0,
             device="cpu", draws: Optional[tuple[torch.Tensor, Optional[torch.Tensor]]] = None,
             boundaries: Optional[Sequence[float]] = None,
             ) -> tuple[torch.Tensor, torch.Tensor | None, int]:
    """Images (float, data space) for `seeds`; returns (x0, labels, network evaluations per batch).

    `draws`: the result of :func:`per_image_draws` for these seeds (with :func:`num_draws` noises),
    when drawn ahead of time (e.g. on another thread while the previous batch runs); moved to
    `device` here. `boundaries`: a multistep consistency model's segment boundaries
    (:func:`scmctl.segments.of_model`): `steps` jumps along them, `t_mid`/`ts` unused."""
    num_classes = getattr(net, "num_classes", 0)
    tmax = trigflow.t_max(sigma_data)
    if kind == "consistency":
        times = (segments.sampling_times(steps, boundaries) if boundaries is not None
                 else consistency_times(steps, tmax, t_mid, ts))
    if draws is None:
        draws = per_image_draws(seeds, shape, num_draws(kind, steps, tmax, t_mid, ts, boundaries), num_classes,
                                device)
    noises, drawn = draws[0].to(device), (draws[1].to(device) if draws[1] is not None else None)
    lab = labels if labels is not None else drawn
    vel = Velocity(net, sigma_data, lab, guidance)
    if kind == "consistency" and boundaries is not None:
        x0 = multistep_sample(vel, noises[0], times, sigma_data)
    elif kind == "consistency":
        x0 = consistency_sample(vel, noises, times, sigma_data)
    else:
        times_t = teacher_times(steps, sigma_data)
        x0 = ode_sample(vel, noises[0] * sigma_data * math.sin(tmax), times_t, solver)
    return x0, lab, vel.nfe


@torch.no_grad()
def refine(net, kind: str, x0: torch.Tensor, seeds: Sequence[int], times: Sequence[float],
           sigma_data: float, solver: str = "dpm2s", solver_steps: int = 18,
           labels: Optional[torch.Tensor] = None, guidance: float = 1.0) -> torch.Tensor:
    """Re-noise given images to each t in `times` in turn and denoise them: one consistency step
    (consistency models) or an ODE solve from t to 0 (diffusion models). Noise per image from
    `seeds` as in :func:`generate`."""
    num_classes = getattr(net, "num_classes", 0)
    noises, drawn = per_image_draws(seeds, tuple(x0.shape[1:]), len(times), num_classes, x0.device)
    lab = labels if labels is not None else (drawn if num_classes else None)
    vel = Velocity(net, sigma_data, lab, guidance)
    for i, t in enumerate(times):
        x = math.cos(t) * x0 + math.sin(t) * sigma_data * noises[i]
        if kind == "consistency":
            x0 = trigflow.denoise(x, torch.full((x.shape[0],), t, device=x.device), vel(x, t), sigma_data)
        else:
            x0 = ode_sample(vel, x, teacher_times(solver_steps, sigma_data, t_start=t), solver)
    return x0
