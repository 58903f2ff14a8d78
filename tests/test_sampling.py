"""Samplers against the closed form of the PF-ODE for Gaussian data (TrigFlow, Lu & Song 2025 Sec. 3; multistep consistency sampling, Song et al. 2023 Alg. 1).

For x0 ~ N(0, a²I) and z ~ N(0, σ_d²I), x_t has std s_t = √(cos²t·a² + sin²t·σ_d²), the exact
velocity is E[v|x_t] = cos t·sin t·(σ_d² − a²)/s_t²·x_t, and the ODE maps x_t to x_0 = x_t·a/s_t.
"""

import math

import pytest
import torch

from scmctl import sampling, trigflow

SD, A = 0.5, 0.2


def s_t(t):
    return torch.sqrt(torch.cos(t) ** 2 * A ** 2 + torch.sin(t) ** 2 * SD ** 2)


class Oracle(torch.nn.Module):
    """F(x/σ_d, t) = E[v|x_t]/σ_d for Gaussian data: the exact teacher."""
    num_classes = 0
    emb_guidance = None

    def forward(self, x, t, labels=None, guidance=None):
        t = t.double().reshape(-1, *([1] * (x.ndim - 1)))
        xt = x.double() * SD
        v = torch.cos(t) * torch.sin(t) * (SD ** 2 - A ** 2) / s_t(t) ** 2 * xt
        return (v / SD).to(x.dtype)


def exact_solution(x, t_from):
    return x * A / s_t(torch.tensor(t_from, dtype=torch.float64))


@pytest.mark.parametrize("solver,order,tol", [("euler", 1, 0.02), ("heun", 2, 1e-3), ("dpm2s", 2, 2e-3)])
def test_ode_solvers_converge_at_their_order(solver, order, tol):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 3, generator=g, dtype=torch.float64) * SD
    t0 = 1.2
    errs = []
    for n in (16, 32, 64):
        times = torch.linspace(t0, 0, n + 1, dtype=torch.float64)
        out = sampling.ode_sample(sampling.Velocity(Oracle(), SD, None), x, times, SD, solver)
        errs.append((out - exact_solution(x, t0)).abs().max().item())
    rate = math.log2(errs[1] / errs[2])
    assert errs[2] < tol, errs
    # observed order (dpm2s: its last step to t = 0 is first order, so slightly below 2)
    assert rate > order - 0.3, (errs, rate)


def test_nfe_counts():
    x = torch.zeros(2, 1, dtype=torch.float64)
    for solver, nfe in (("heun", 2 * 18 - 1), ("dpm2s", 2 * 18 - 1), ("euler", 18)):
        vel = sampling.Velocity(Oracle(), SD, None)
        sampling.ode_sample(vel, x, sampling.teacher_times(18, SD), SD, solver)
        assert vel.nfe == nfe


class ExactCM(torch.nn.Module):
    """The exact consistency function of Gaussian data expressed as F: f(x_t, t) = x_t·a/s_t."""
    num_classes = 0
    emb_guidance = None

    def forward(self, x, t, labels=None, guidance=None):
        t = t.double().reshape(-1, *([1] * (x.ndim - 1)))
        xt = x.double() * SD
        f = xt * A / s_t(t)
        return ((torch.cos(t) * xt - f) / (torch.sin(t) * SD)).to(x.dtype)


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_consistency_sampler_with_the_exact_consistency_function(steps):
    seeds = list(range(4000))
    x0, _, nfe = sampling.generate(ExactCM(), "consistency", seeds, (2,), SD, steps, 1.1)
    assert nfe == steps
    # samples follow N(0, a²): std within sampling error
    assert abs(x0.double().std().item() - A) < 0.01
    # the first step is exactly x_tmax·a/s_tmax with x_tmax = σ_d z
    z, _ = sampling.per_image_draws(seeds[:3], (2,), steps, 0, "cpu")
    tm = torch.tensor(trigflow.t_max(SD), dtype=torch.float64)
    first, _, _ = sampling.generate(ExactCM(), "consistency", seeds[:3], (2,), SD, 1)
    assert torch.allclose(first.double(), (z[0].double() * SD) * A / s_t(tm), atol=1e-6)


def test_refine_with_the_exact_model_keeps_the_distribution():
    g = torch.Generator().manual_seed(3)
    x0 = torch.randn(4000, 2, generator=g) * A
    out = sampling.refine(ExactCM(), "consistency", x0, list(range(4000)), [1.1, 0.5], SD)
    assert abs(out.double().std().item() - A) < 0.01
    out_ode = sampling.refine(Oracle(), "diffusion", x0[:500].double(), list(range(500)), [0.8], SD,
                              solver="heun", solver_steps=18)
    assert abs(out_ode.std().item() - A) < 0.03
