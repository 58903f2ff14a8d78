"""TrigFlow identities and conversions against closed forms (Lu & Song 2025, Sec. 3 and App. B)."""

import math

import torch

from scmctl import trigflow


def test_boundaries_and_velocity_is_time_derivative():
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(5, 3, 4, 4, generator=g, dtype=torch.float64)
    z = 0.5 * torch.randn(5, 3, 4, 4, generator=g, dtype=torch.float64)
    assert torch.equal(trigflow.add_noise(x0, z, torch.zeros(5, dtype=torch.float64)), x0)
    assert torch.allclose(trigflow.add_noise(x0, z, torch.full((5,), math.pi / 2, dtype=torch.float64)), z)
    t = torch.rand(5, generator=g, dtype=torch.float64) * 1.5
    h = 1e-6
    fd = (trigflow.add_noise(x0, z, t + h) - trigflow.add_noise(x0, z, t - h)) / (2 * h)
    assert torch.allclose(trigflow.velocity(x0, z, t), fd, atol=1e-8)


def test_denoiser_boundary_and_exact_velocity_recovers_data():
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(4, 2, generator=g, dtype=torch.float64)
    z = 0.5 * torch.randn(4, 2, generator=g, dtype=torch.float64)
    t = torch.rand(4, generator=g, dtype=torch.float64)
    F = torch.randn(4, 2, generator=g, dtype=torch.float64)
    # f(x, 0) = x for any F
    assert torch.equal(trigflow.denoise(x0, torch.zeros(4, dtype=torch.float64), F, 0.5), x0)
    # with the true velocity F = v_t/σ_d the consistency function returns x0 exactly
    x_t = trigflow.add_noise(x0, z, t)
    F_true = trigflow.velocity(x0, z, t) / 0.5
    assert torch.allclose(trigflow.denoise(x_t, t, F_true, 0.5), x0, atol=1e-12)
    # and the DDIM step with the true velocity lands exactly on x_s for any s < t (same x0, z)
    s = t * 0.3
    assert torch.allclose(trigflow.ddim_step(x_t, t, s, F_true, 0.5), trigflow.add_noise(x0, z, s), atol=1e-12)


def test_edm_conversion_round_trip_and_closed_form():
    sigma = torch.tensor([0.002, 0.1, 1.0, 80.0], dtype=torch.float64)
    t = trigflow.edm_sigma_to_t(sigma, 0.5)
    assert torch.allclose(trigflow.t_to_edm_sigma(t, 0.5), sigma, rtol=1e-12)
    assert abs(trigflow.t_max(0.5) - math.atan(160.0)) < 1e-15
    assert abs(trigflow.t_max(0.5) - 1.5645) < 1e-4
    # EDM x_σ = x0 + σ ε  maps to TrigFlow x_t = cos t·x0 + sin t·σ_d ε
    g = torch.Generator().manual_seed(2)
    x0 = torch.randn(4, 3, generator=g, dtype=torch.float64)
    eps = torch.randn(4, 3, generator=g, dtype=torch.float64)
    x_sigma = x0 + sigma[:, None] * eps
    x_t = trigflow.edm_x_to_trigflow(x_sigma, sigma, 0.5)
    expect = torch.cos(t)[:, None] * x0 + torch.sin(t)[:, None] * 0.5 * eps
    assert torch.allclose(x_t, expect, atol=1e-12)
    assert torch.allclose(trigflow.trigflow_x_to_edm(x_t, t, 0.5), x_sigma, atol=1e-9)


def test_general_process_and_rectified_flow_conversion():
    g = torch.Generator().manual_seed(3)
    x0 = torch.randn(6, 2, generator=g, dtype=torch.float64)
    eps = torch.randn(6, 2, generator=g, dtype=torch.float64)
    tau = torch.linspace(0.05, 0.95, 6, dtype=torch.float64)
    # rectified flow on data scaled to σ_d: x = (1−τ)·x0 + τ·σ_d ε
    x_rf = (1 - tau)[:, None] * x0 + tau[:, None] * 0.5 * eps
    x_t, t = trigflow.general_to_trigflow(x_rf / 0.5, (1 - tau) / 0.5, tau, 0.5)
    expect = torch.cos(t)[:, None] * x0 + torch.sin(t)[:, None] * 0.5 * eps
    assert torch.allclose(x_t, expect, atol=1e-12)
    assert torch.allclose(trigflow.flow_time_to_t(tau), t, atol=1e-12)
    assert torch.allclose(trigflow.t_to_flow_time(t), tau, atol=1e-12)
    assert torch.allclose(torch.sin(t) / (torch.sin(t) + torch.cos(t)), tau, atol=1e-12)


def test_time_proposal_is_lognormal_sigma():
    g = torch.Generator().manual_seed(4)
    t = trigflow.sample_time(200000, -1.0, 1.4, 0.5, generator=g)
    log_sigma = torch.log(0.5 * torch.tan(t.double()))
    assert abs(log_sigma.mean().item() + 1.0) < 0.02
    assert abs(log_sigma.std().item() - 1.4) < 0.02
    assert (t > 0).all() and (t < math.pi / 2).all()


def test_edm_grid_endpoints():
    grid = trigflow.edm_time_grid(18, 0.5)
    assert grid.shape == (19,)
    assert abs(grid[0].item() - math.atan(80 / 0.5)) < 1e-12
    assert abs(grid[-2].item() - math.atan(0.002 / 0.5)) < 1e-12
    assert grid[-1].item() == 0 and (grid[1:] < grid[:-1]).all()
