"""Multistep consistency models (Heek et al. 2024) in TrigFlow: segment boundaries, the tangent of
f_θ(x_t, t) = cos(t−s)·x_t − sin(t−s)·σ_d·F_θ(x_t/σ_d, t) against central differences, the loss's
gradient against an independent computation, the sampler against hand-computed DDIM jumps, and
the configuration's checks."""

import math

import pytest
import torch

from scmctl import segments, trigflow
from scmctl.config import Config, LossConfig, validate
from scmctl.errors import UsageError
from scmctl.losses import consistency_loss, consistency_tangent
from scmctl.sampling import generate, per_image_draws
from scmctl.training.run_config import resolve_for_run

SD = 0.5
T_MAX = trigflow.t_max(SD)


def test_default_boundaries_are_uniform_in_t():
    for m in (1, 2, 4, 8, 16):
        got = segments.default_boundaries(m, SD)
        assert len(got) == m + 1 and got[0] == 0.0 and got[-1] == T_MAX
        assert all(abs(b - i * math.atan(80.0 / SD) / m) < 1e-12 for i, b in enumerate(got)), (m, got)


def test_edm_boundaries_are_the_rho7_sigma_grid_with_its_last_point_at_zero():
    for m in (1, 2, 4, 8, 16):
        lo, hi = 0.002 ** (1 / 7), 80.0 ** (1 / 7)
        sig = [(hi + i / m * (lo - hi)) ** 7 for i in range(1, m)]  # σ_1 .. σ_{M−1}, decreasing
        want = [0.0] + [math.atan(s / SD) for s in reversed(sig)] + [math.atan(80.0 / SD)]
        got = segments.default_boundaries(m, SD, "edm")
        assert len(got) == m + 1 and got[0] == 0.0 and got[-1] == T_MAX
        assert all(abs(a - b) < 1e-12 for a, b in zip(got, want)), (m, got, want)
    assert [round(b, 4) for b in segments.default_boundaries(4, SD, "edm")] == [0.0, 0.3273, 1.3746, 1.5423, 1.5645]


def test_segment_start_is_the_lower_boundary_of_the_segment_holding_t():
    b = segments.default_boundaries(4, SD)
    t = torch.tensor([1e-4, b[1], b[1] + 1e-3, 1.0, b[3], T_MAX, 1.57])
    bf = [torch.tensor(x, dtype=torch.float32).item() for x in b]
    want = [max(lo for lo in bf[:-1] if lo < tt) for tt in t.tolist()]  # (s_{i−1}, s_i]; t > t_max: last
    assert segments.segment_start(t, b).tolist() == want
    assert segments.segment_start(t, [0.0, T_MAX]).eq(0).all()


class MLP(torch.nn.Module):
    """A small float64 network F(x, t) with a nonlinear dependence on x and t."""

    def __init__(self, d, hidden=16):
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.W1 = torch.nn.Parameter(torch.randn(hidden, d + 1, generator=g, dtype=torch.float64) / math.sqrt(d))
        self.W2 = torch.nn.Parameter(torch.randn(d, hidden, generator=g, dtype=torch.float64) / math.sqrt(hidden))
        self.w = torch.nn.Parameter(torch.tensor([0.1, -0.3], dtype=torch.float64))
        self.num_classes = 0

    def forward(self, x, t, labels=None, guidance=None):
        h = torch.tanh(torch.cat([x, torch.sin(3 * t)[:, None]], 1) @ self.W1.T)
        return h @ self.W2.T + torch.cos(t)[:, None]

    def adaptive_weight(self, t):
        return self.w[0] + self.w[1] * t


def _path(n, d, seed):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(n, d, generator=g, dtype=torch.float64) * SD
    z = torch.randn(n, d, generator=g, dtype=torch.float64) * SD
    return x0, z


def _f_minus(net, x0, z, s):
    """t ↦ f(x_t, t) = cos(t−s)·x_t − sin(t−s)·σ_d·F(x_t/σ_d, t) along x_t = cos t·x0 + sin t·z, s fixed."""
    def f(tt):
        x = trigflow.add_noise(x0, z, tt)
        return torch.cos(tt - s)[:, None] * x - torch.sin(tt - s)[:, None] * SD * net(x / SD, tt)
    return f


@pytest.mark.parametrize("keep_graph", [False, True])
def test_tangent_is_cos_t_minus_s_times_the_central_difference_of_f(keep_graph):
    """g = cos(t − s)·df⁻/dt along the exact sCT path x_t = cos t·x0 + sin t·z with s fixed
    (r = 1), against central differences of f⁻ in float64; both jvp modes' tangent pass."""
    n, d = 12, 5
    net = MLP(d)
    x0, z = _path(n, d, 0)
    b = segments.default_boundaries(4, SD)
    t = torch.linspace(0.05, 1.56, n, dtype=torch.float64)
    s = segments.segment_start(t, b)
    assert len(set(s.tolist())) == 4  # every segment is visited

    f = _f_minus(net, x0, z, s)
    h = 1e-5
    with torch.no_grad():
        fd = torch.cos(t - s)[:, None] * (f(t + h) - f(t - h)) / (2 * h)
    x_t, dxdt = trigflow.add_noise(x0, z, t), trigflow.velocity(x0, z, t)
    _, g = consistency_tangent(net, x_t, t, dxdt, SD, 1.0, keep_graph=keep_graph, s=s)
    assert torch.allclose(g, fd, rtol=1e-7, atol=1e-9), (g - fd).abs().max()
    # the sCM tangent (s = 0) differs: the shift is not a no-op
    _, g0 = consistency_tangent(net, x_t, t, dxdt, SD, 1.0, keep_graph=keep_graph)
    assert (g0 - g).abs().max() > 1e-2


@pytest.mark.parametrize("keep_graph", [False, True])
def test_one_segment_is_todays_tangent_bit_for_bit(keep_graph):
    """s = 0 through the multistep path gives exactly the sCM tangent (no s), in float32."""
    n, d = 8, 4
    net = MLP(d).float()
    x0, z = (a.float() for a in _path(n, d, 1))
    t = trigflow.sample_time(n, -1.0, 1.4, SD, generator=torch.Generator().manual_seed(0))
    x_t, dxdt = trigflow.add_noise(x0, z, t), trigflow.velocity(x0, z, t)
    F0, g0 = consistency_tangent(net, x_t, t, dxdt, SD, 0.7, keep_graph=keep_graph)
    s = segments.segment_start(t, segments.resolved_boundaries(None, 1, SD))
    F1, g1 = consistency_tangent(net, x_t, t, dxdt, SD, 0.7, keep_graph=keep_graph, s=s)
    assert torch.equal(F0, F1) and torch.equal(g0, g1)


def _analytic_grad(net, x0, cfg, seed, bounds):
    """∇ of E[e^w/D ‖F_θ − sg(F_θ + g)‖² − w] at θ = −2/D·E[e^w g·∂F/∂θ] + the w terms, with g
    from central differences of f⁻ (r = 1, l2 normalization), by autograd through F only."""
    torch.manual_seed(seed)
    z = torch.randn_like(x0) * SD
    t = trigflow.sample_time(x0.shape[0], cfg.P_mean, cfg.P_std, SD).double()
    t = t.float().double()  # the loss computes t in float32
    s = segments.segment_start(t.float(), bounds).double()

    f = _f_minus(net, x0, z, s)
    h = 1e-6
    with torch.no_grad():
        g = torch.cos(t - s)[:, None] * (f(t + h) - f(t - h)) / (2 * h)
        g = g / (g.norm(dim=1, keepdim=True) + cfg.tangent_norm_c)
    d = x0.shape[1]
    w = net.adaptive_weight(t)
    F = net(trigflow.add_noise(x0, z, t) / SD, t)
    surrogate = (-(2 / d) * torch.exp(w.detach())[:, None] * g * F).sum(1)  # its gradient is the loss's
    surrogate = surrogate + torch.exp(w) * g.square().sum(1) / d - w
    return torch.autograd.grad(surrogate.mean(), list(net.parameters()))


@pytest.mark.parametrize("jvp_mode", ["dual", "separate"])
def test_multistep_loss_gradient_matches_the_central_difference_objective(jvp_mode):
    n, d = 32, 4
    net = MLP(d)
    x0 = _path(n, d, 2)[0]
    cfg = LossConfig(tangent_warmup_steps=0, jvp_mode=jvp_mode, segments=4)
    bounds = segments.resolved_boundaries(None, 4, SD)
    torch.manual_seed(11)
    out = consistency_loss(net, x0, None, cfg, SD, 0)
    grads = torch.autograd.grad(out.loss, list(net.parameters()))
    want = _analytic_grad(net, x0, cfg, 11, bounds)
    for a, b in zip(grads, want):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-8), (a - b).abs().max()
    # with one segment the same draws give another gradient: the boundaries are used
    torch.manual_seed(11)
    one = torch.autograd.grad(consistency_loss(net, x0, None, LossConfig(tangent_warmup_steps=0, jvp_mode=jvp_mode),
                                               SD, 0).loss, list(net.parameters()))
    assert max((a - b).abs().max() for a, b in zip(one, grads)) > 1e-3


def test_one_segment_loss_is_the_scm_loss_bit_for_bit():
    n, d = 16, 4
    net = MLP(d).float()
    x0 = _path(n, d, 3)[0].float()
    outs = []
    for extra in ({}, {"segments": 1, "segment_boundaries": [0.0, T_MAX]}):
        torch.manual_seed(5)
        out = consistency_loss(net, x0, None, LossConfig(tangent_warmup_steps=100, **extra), SD, 30)
        outs.append((out.loss, torch.autograd.grad(out.loss, list(net.parameters()))))
    assert torch.equal(outs[0][0], outs[1][0])
    assert all(torch.equal(a, b) for a, b in zip(outs[0][1], outs[1][1]))


class Known(torch.nn.Module):
    """F(x, t) = 0.3·x − t (per entry): a network whose jumps can be computed by hand."""
    num_classes = 0

    def forward(self, x, t, labels=None, guidance=None):
        return 0.3 * x - t.reshape(-1, *([1] * (x.ndim - 1)))


@pytest.mark.parametrize("steps,indices", [(4, [4, 3, 2, 1, 0]), (2, [4, 2, 0]), (3, [4, 3, 1, 0]), (1, [4, 0])])
def test_sampler_walks_the_boundaries_with_ddim_jumps(steps, indices):
    b = segments.default_boundaries(4, SD)
    seeds, shape = [3, 4, 5], (1, 2, 2)
    x0, _, nfe = generate(Known(), "consistency", seeds, shape, SD, steps, boundaries=b)
    assert nfe == steps
    (z,), _ = per_image_draws(seeds, shape, 1, 0, "cpu")
    x = SD * z.double()
    times = [b[i] for i in indices]
    for t, s in zip(times, times[1:]):  # x_s = cos(t−s)·x_t − sin(t−s)·σ_d·F(x_t/σ_d, t)
        F = 0.3 * (x / SD) - torch.tensor(t, dtype=torch.float32).double()
        x = math.cos(t - s) * x - math.sin(t - s) * SD * F
    assert torch.allclose(x0.double(), x, atol=1e-5)


def test_sampler_refuses_more_steps_than_segments():
    with pytest.raises(UsageError, match="1..4"):
        generate(Known(), "consistency", [0], (1, 2, 2), SD, 5, boundaries=segments.default_boundaries(4, SD))


@pytest.mark.parametrize("loss,needle", [
    ({"segments": 0}, "loss.segments"),
    ({"segments": 2, "segment_boundaries": [0.0, 1.0]}, "3 times"),
    ({"segments": 2, "segment_boundaries": [0.0, 1.6, 1.5645]}, "increasing"),
    ({"segments": 2, "segment_boundaries": [0.1, 1.0, 1.5645]}, "from 0 to t_max"),
    ({"segments": 2, "segment_boundaries": [0.0, 1.0, 1.5]}, "from 0 to t_max"),
])
def test_bad_segments_are_one_usage_error(loss, needle):
    cfg = Config()
    for k, v in loss.items():
        setattr(cfg.loss, k, v)
    with pytest.raises(UsageError, match=needle):
        validate(cfg)


def test_multistep_diffusion_model_is_refused():
    cfg = Config(method="diffusion")
    cfg.loss.segments = 4
    with pytest.raises(UsageError, match="sct/scd"):
        validate(cfg)


def test_run_config_records_the_boundaries():
    cfg = Config()
    cfg.network.resolution, cfg.network.channels, cfg.network.num_classes = 8, 1, 0
    cfg.loss.segments = 4
    run, _ = resolve_for_run(cfg)
    assert run.loss.segment_boundaries == segments.default_boundaries(4, SD)
    cfg.loss.segment_spacing = "edm"
    assert resolve_for_run(cfg)[0].loss.segment_boundaries == segments.default_boundaries(4, SD, "edm")
    cfg.loss.segment_spacing = "uniform"
    cfg.loss.segment_boundaries = [0, 0.5, 1.0, 1.4, 1.5645]  # typed with 4 decimals: the ends snap
    run, _ = resolve_for_run(cfg)
    assert run.loss.segment_boundaries == [0.0, 0.5, 1.0, 1.4, T_MAX]
    cfg.loss.segments, cfg.loss.segment_boundaries = 1, None  # sCM configs stay as they were
    assert resolve_for_run(cfg)[0].loss.segment_boundaries is None
