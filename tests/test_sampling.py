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


# Each teacher solver's order of accuracy (a new solver must be added here with its order).
ORDERS = {"euler": 1, "heun": 2, "heun-t": 2, "dpm2s": 2}


def test_every_solver_has_an_order_test():
    assert set(ORDERS) == set(sampling.SOLVERS)
    assert all(sampling.SOLVERS[name].order == order for name, order in ORDERS.items())


@pytest.mark.parametrize("solver", sorted(ORDERS))
def test_ode_solvers_converge_at_their_order(solver):
    """Error at t = 0 against the closed form, halving the step on a uniform t grid from t = 1.2:
    log2(error ratio) must be within 0.3 of the order. Observed rates (16→32, 32→64 steps):
    euler 0.97/0.99, heun 2.00/2.00, heun-t 1.99/2.00, dpm2s 1.80/1.83 (its last step, the DDIM
    step to t = 0, is first order)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 3, generator=g, dtype=torch.float64) * SD
    t0 = 1.2
    errs = []
    for n in (16, 32, 64):
        times = torch.linspace(t0, 0, n + 1, dtype=torch.float64)
        out = sampling.ode_sample(sampling.Velocity(Oracle(), SD, None), x, times, solver)
        errs.append((out - exact_solution(x, t0)).abs().max().item())
    rates = [math.log2(a / b) for a, b in zip(errs, errs[1:])]
    assert all(abs(r - ORDERS[solver]) < 0.3 for r in rates), (errs, rates)
    assert errs[2] < (0.02 if ORDERS[solver] == 1 else 2e-3), errs


def test_heun_is_edms_algorithm_1_in_sigma():
    """`heun` against EDM's deterministic sampler (Karras et al. 2022, Alg. 1) written directly in
    σ with the exact denoiser of Gaussian data, D(x; σ) = a²/(a² + σ²)·x, on the ρ = 7 grid."""
    g = torch.Generator().manual_seed(1)
    n = 18
    z = torch.randn(64, 3, generator=g, dtype=torch.float64)
    ts = sampling.teacher_times(n, SD)
    sig = [SD * math.tan(float(t)) for t in ts]           # σ_0 = 80 > ... > σ_{N−1} = 0.002, σ_N = 0
    x = z * sig[0]
    for i in range(n):
        d = (x - A ** 2 / (A ** 2 + sig[i] ** 2) * x) / sig[i]
        x_next = x + (sig[i + 1] - sig[i]) * d
        if sig[i + 1] != 0:
            d2 = (x_next - A ** 2 / (A ** 2 + sig[i + 1] ** 2) * x_next) / sig[i + 1]
            x_next = x + (sig[i + 1] - sig[i]) * 0.5 * (d + d2)
        x = x_next
    x_t0 = z * sig[0] * math.cos(float(ts[0]))            # the same start as TrigFlow x_t
    ours = sampling.ode_sample(sampling.Velocity(Oracle(), SD, None), x_t0, ts, "heun")
    # float64 round-off of the σ ↔ t conversions near σ_max = 80: observed 6e-9
    assert (ours - x).abs().max() < 1e-7, (ours - x).abs().max()
    # and it differs from the t-space trapezoid (a different method, same order)
    other = sampling.ode_sample(sampling.Velocity(Oracle(), SD, None), x_t0, ts, "heun-t")
    assert (other - x).abs().max() > 1e-4, (other - x).abs().max()


class Conditional(Oracle):
    """The Gaussian oracle as a class-conditional teacher without a guidance input."""
    num_classes = 3


@pytest.mark.parametrize("solver,calls", [("heun", 35), ("heun-t", 35), ("dpm2s", 35), ("euler", 18)])
def test_nfe_counts(solver, calls):
    x = torch.zeros(2, 1, dtype=torch.float64)
    labels = torch.nn.functional.one_hot(torch.tensor([0, 2]), 3).double()
    for net, guidance, evals in ((Oracle(), 1.0, calls), (Oracle(), 1.5, calls),
                                 (Conditional(), 1.0, calls), (Conditional(), 1.5, 2 * calls)):
        vel = sampling.Velocity(net, SD, labels if net.num_classes else None, guidance)
        sampling.ode_sample(vel, x, sampling.teacher_times(18, SD), solver)
        assert vel.nfe == evals == sampling.SOLVERS[solver].calls(18) * sampling.evaluations_per_call(net, guidance)


def test_unknown_solver_is_a_usage_error():
    from scmctl.errors import UsageError

    with pytest.raises(UsageError, match="choose from dpm2s, heun, heun-t, euler"):
        sampling.ode_sample(sampling.Velocity(Oracle(), SD, None), torch.zeros(1, 1), [1.0, 0.0], "rk4")


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
                              solver="dpm2s", solver_steps=18)
    assert abs(out_ode.std().item() - A) < 0.03
