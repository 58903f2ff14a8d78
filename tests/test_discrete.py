"""Discrete-time sCM (loss.discrete_steps = N > 0; Lu & Song 2025, App. E): the grid, the categorical
time proposal against a numerical integration, the reference point against the exact trajectory and
a hand DDIM step, the finite-difference tangent's O(Δt) convergence to the JVP tangent, the loss's
gradient against an independent computation, and training a network that has no forward-mode AD."""

import json
import math
from pathlib import Path

import pytest
import torch
import yaml

from _cli import run
from scmctl import discrete, losses, trigflow
from scmctl.config import Config, LossConfig, validate
from scmctl.errors import UsageError
from scmctl.training.parallel import effective_jvp_mode
from scmctl.training.run_config import DISCRETE_BF16_WARNING, resolve_for_run
from test_losses import Affine

SD = 0.5


def test_grid_is_edms_rho7_sigmas_mapped_to_t_with_zero_appended():
    n = 10
    grid = discrete.time_grid(n, SD)
    assert grid.shape == (n + 1,) and grid[-1] == 0 and bool((grid[:-1] > grid[1:]).all())
    # EDM (Karras et al. 2022, Eq. 5): σ_i = (σ_max^(1/ρ) + i/(N−1)·(σ_min^(1/ρ) − σ_max^(1/ρ)))^ρ
    for i in range(n):
        sigma = (80 ** (1 / 7) + i / (n - 1) * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7
        assert abs(float(grid[i]) - math.atan(sigma / SD)) < 1e-7  # float32 rounding of t
    assert abs(float(grid[0]) - trigflow.t_max(SD)) < 1e-7


@pytest.mark.parametrize("P_mean,P_std,n", [(-1.0, 1.4, 8), (-0.8, 1.6, 40), (0.4, 2.0, 1024)])
def test_proposal_is_the_normal_mass_of_each_log_sigma_interval(P_mean, P_std, n):
    grid = discrete.time_grid(n, SD)
    p = discrete.proposal(grid, P_mean, P_std, SD)
    # independent: Simpson's rule on the normal density of log σ over [log σ_{i+1}, log σ_i]
    log_sigma = [math.log(SD * math.tan(float(t))) for t in grid[:-1]] + [P_mean - 12 * P_std]
    dens = lambda y: torch.exp(-0.5 * ((y - P_mean) / P_std) ** 2) / (P_std * math.sqrt(2 * math.pi))  # noqa: E731
    ls = torch.tensor(log_sigma, dtype=torch.float64)
    hi, lo = ls[:-1, None], ls[1:, None]
    y = lo + (hi - lo) * torch.linspace(0, 1, 2001, dtype=torch.float64)
    w = torch.ones(2001, dtype=torch.float64)
    w[1:-1:2], w[2:-1:2] = 4, 2
    mass = (w * dens(y)).sum(1) * (hi - lo)[:, 0] / 6000
    assert torch.allclose(p, mass / mass.sum(), rtol=1e-9, atol=1e-13)
    # the mass above σ_max that is dropped: 6e-5, 6e-4, 2.3% for these three proposals
    assert 1 - float(mass.sum()) < 0.03


def test_sampled_pairs_follow_the_proposal_and_are_grid_neighbours():
    n, draws = 16, 200_000
    grid = discrete.time_grid(n, SD)
    p = discrete.proposal(grid, -1.0, 1.4, SD)
    torch.manual_seed(0)
    t, t_ref = discrete.sample_time_pair(draws, n, -1.0, 1.4, SD)
    i = torch.searchsorted(-grid.float(), -t)  # index of t on the (decreasing) grid
    assert torch.equal(grid.float()[i], t) and torch.equal(grid.float()[i + 1], t_ref)
    freq = torch.bincount(i, minlength=n).double() / draws
    assert bool(((freq - p).abs() <= 5 * (p * (1 - p) / draws).sqrt() + 1e-12).all())


class Smooth(Affine):
    """A smooth nonlinear F(x, t) in float64 with a forward-mode AD rule (torch ops only)."""

    def forward(self, x, t, labels=None, guidance=None):
        return torch.tanh(x @ self.W.T + torch.sin(3 * t)[:, None] * self.u) + t[:, None] ** 2


@pytest.mark.parametrize("r", [1.0, 0.3])
@pytest.mark.parametrize("distill", [False, True])
def test_finite_difference_tangent_converges_to_the_jvp_tangent_like_dt(r, distill):
    d, n = 6, 5
    net = Smooth(d)
    gen = torch.Generator().manual_seed(4)
    x0 = torch.randn(n, d, generator=gen, dtype=torch.float64) * SD
    z = torch.randn(n, d, generator=gen, dtype=torch.float64) * SD
    t = torch.tensor([0.05, 0.3, 0.8, 1.2, 1.5], dtype=torch.float64)
    x_t = trigflow.add_noise(x0, z, t)
    Wt = torch.randn(d, d, generator=gen, dtype=torch.float64) * 0.3
    dxdt = SD * torch.tanh(x_t / SD @ Wt.T) if distill else trigflow.velocity(x0, z, t)
    with torch.no_grad():
        _, g_cont = losses.consistency_tangent(net, x_t, t, dxdt, SD, r)
    errs = []
    for dt in (4e-3, 2e-3, 1e-3, 5e-4):
        _, g = discrete.finite_difference_tangent(net, x_t, t, t - dt, dxdt, SD, r)
        errs.append(float((g - g_cont).norm() / g_cont.norm()))
    print("relative error per halving of Δt:", [f"{e:.3e}" for e in errs])
    # first order: each halving of Δt halves the error (observed ratios 1.99-2.01)
    for a, b in zip(errs, errs[1:]):
        assert 1.9 < a / b < 2.1
    assert errs[-1] < 5e-3


def test_reference_point_is_exact_for_sct_and_a_teacher_ddim_step_for_scd():
    d, n = 4, 6
    gen = torch.Generator().manual_seed(5)
    x0 = torch.randn(n, d, generator=gen, dtype=torch.float64) * SD
    z = torch.randn(n, d, generator=gen, dtype=torch.float64) * SD
    t = torch.rand(n, generator=gen, dtype=torch.float64) * 1.5 + 0.05
    t_ref = t * torch.rand(n, generator=gen, dtype=torch.float64)
    x_t = trigflow.add_noise(x0, z, t)
    exact = torch.cos(t_ref)[:, None] * x0 + torch.sin(t_ref)[:, None] * z
    x_ref = discrete.reference_point(x_t, t, t_ref, trigflow.velocity(x0, z, t))
    assert torch.allclose(x_ref, exact, rtol=0, atol=1e-14)


def test_scd_reference_point_takes_the_guided_teachers_ddim_step():
    """consistency_loss's second no-grad forward sees x_{t'} = cos(t − t')·x_t − sin(t − t')·σ_d·F,
    F = F_u + s·(F_c − F_u) the guided teacher, replayed by hand from the same draws."""
    d, n, ncls, N = 4, 8, 3, 32
    Wt = torch.randn(d, d, generator=torch.Generator().manual_seed(6), dtype=torch.float64) * 0.3

    def teacher(x, t, labels=None):
        return torch.tanh(x @ Wt.T) + labels.sum(1, keepdim=True) * 0.5 + t[:, None]

    calls = []

    class Spy(Affine):
        def forward(self, x, t, labels=None, guidance=None):
            calls.append((x.detach().clone(), t.clone(), guidance))
            return super().forward(x, t)

    x0 = torch.randn(n, d, generator=torch.Generator().manual_seed(7), dtype=torch.float64) * SD
    labels = torch.nn.functional.one_hot(torch.arange(n) % ncls, ncls).double()
    cfg = LossConfig(max_guidance=2.0, discrete_steps=N, tangent_warmup_steps=0)
    torch.manual_seed(11)
    losses.consistency_loss(Spy(d), x0, labels, cfg, SD, 0, teacher=teacher)
    # replay the draws: z, (t, t'), the guidance scales
    torch.manual_seed(11)
    z = torch.randn_like(x0) * SD
    t, t_ref = discrete.sample_time_pair(n, N, cfg.P_mean, cfg.P_std, SD)
    s = 1 + torch.rand(n) * (cfg.max_guidance - 1)
    x_t = trigflow.add_noise(x0, z, t)
    F_c, F_u = teacher(x_t / SD, t, labels), teacher(x_t / SD, t, torch.zeros_like(labels))
    F = F_u + s.double()[:, None] * (F_c - F_u)
    dt = (t.double() - t_ref.double())[:, None]
    hand = torch.cos(dt) * x_t - torch.sin(dt) * SD * F
    (x_a, t_a, s_a), (x_b, t_b, s_b), _ = calls
    assert torch.equal(t_a, t) and torch.equal(t_b, t_ref) and torch.equal(s_b, s)
    assert torch.allclose(x_b, hand / SD, rtol=0, atol=1e-12)


@pytest.mark.parametrize("step", [0, 300, 2000])
def test_discrete_loss_gradient_matches_an_independent_computation(step):
    """∇θ of E[e^w/D‖F_θ − sg(F_θ + ĝ)‖² − w] = −2/D·E[e^w ĝ·∂F/∂θ] with ĝ the normalized tangent
    of Eq. written out here: g = −cos²t(σ_d F − (x_t − x')/Δ) + r·(cos t(f(x_t,t) − f(x',t'))/Δ − that)."""
    d, n, N = 6, 16, 64
    model = Affine(d)
    x0 = torch.randn(n, d, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * SD
    cfg = LossConfig(tangent_warmup_steps=1000, discrete_steps=N)
    torch.manual_seed(9)
    out = losses.consistency_loss(model, x0, None, cfg, SD, step)
    out.loss.backward()
    torch.manual_seed(9)
    z = torch.randn_like(x0) * SD
    t32, tr32 = discrete.sample_time_pair(n, N, cfg.P_mean, cfg.P_std, SD)
    t, tr = t32.double(), tr32.double()
    c, s, cr, sr = (v[:, None] for v in (torch.cos(t), torch.sin(t), torch.cos(tr), torch.sin(tr)))
    x_t = c * x0 + s * z
    x_r = cr * x0 + sr * z  # sCT: the exact point of the same trajectory
    with torch.no_grad():
        F, F_r = model(x_t / SD, t32), model(x_r / SD, tr32)
    dt = (t - tr)[:, None]
    r = min(1.0, step / 1000)
    kept = -c ** 2 * (SD * F - (x_t - x_r) / dt)
    full = c * ((c * x_t - s * SD * F) - (cr * x_r - sr * SD * F_r)) / dt
    g = kept + r * (full - kept)
    g = g / (g.norm(dim=1, keepdim=True) + cfg.tangent_norm_c)
    ew = torch.exp(model.adaptive_weight(t32).detach())
    gW = -(2 / d) * ((ew[:, None] * g).T @ (x_t / SD)) / n
    gu = -(2 / d) * (ew[:, None] * g * t32[:, None]).sum(0) / n
    dw = ew * g.square().sum(1) / d - 1
    assert torch.allclose(model.W.grad, gW, rtol=1e-6, atol=1e-9)
    assert torch.allclose(model.u.grad, gu, rtol=1e-6, atol=1e-9)
    assert torch.allclose(model.a.grad, dw.mean(), rtol=1e-6, atol=1e-9)
    assert torch.allclose(model.b.grad, (dw * t32).mean(), rtol=1e-6, atol=1e-9)
    assert set(out.stats) >= {"loss_raw", "tangent_warmup", "masked"}


def test_all_three_forwards_see_one_dropout_mask():
    seen = []

    class Drop(Affine):
        def forward(self, x, t, labels=None, guidance=None):
            keep = torch.nn.functional.dropout(torch.ones_like(x), p=0.5, training=True)
            seen.append(keep)
            return super().forward(x, t) * keep

    x0 = torch.randn(8, 4, dtype=torch.float64) * SD
    torch.manual_seed(3)
    losses.consistency_loss(Drop(4), x0, None, LossConfig(discrete_steps=16), SD, 0)
    assert len(seen) == 3 and torch.equal(seen[0], seen[1]) and torch.equal(seen[0], seen[2])
    assert (seen[0] == 0).any()


def test_nonfinite_samples_are_masked_and_counted():
    """A NaN data sample (non-finite x_t) and a NaN teacher output (non-finite x_{t'}) are dropped."""
    model, x0 = Affine(4), torch.randn(8, 4, dtype=torch.float64) * SD
    x0[3] = float("nan")

    def teacher(x, t, labels=None):  # non-finite for sample 5 only
        return torch.where(torch.arange(len(x))[:, None] == 5, float("inf"), x)

    cfg = LossConfig(discrete_steps=32)
    for tch, masked in ((None, 1), (teacher, 2)):
        model.zero_grad()
        out = losses.consistency_loss(model, x0, None, cfg, SD, 0, teacher=tch)
        out.loss.backward()
        assert out.stats["masked"] == masked
        assert torch.isfinite(out.loss) and torch.isfinite(model.W.grad).all()


class _NoJvp(torch.autograd.Function):
    """y = x³ with a backward but no forward-mode rule: torch.func.jvp / dual tensors raise."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x ** 3

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return 3 * x ** 2 * grad


class NoJvpNet(Affine):
    def forward(self, x, t, labels=None, guidance=None):
        return _NoJvp.apply(super().forward(x, t))


def test_a_network_without_a_jvp_rule_trains_with_discrete_steps():
    net = NoJvpNet(4)
    x0 = torch.randn(16, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64) * SD
    with pytest.raises(RuntimeError, match="(?i)forward AD|jvp"):
        losses.consistency_loss(net, x0, None, LossConfig(jvp_mode="separate"), SD, 0)
    opt = torch.optim.SGD(net.parameters(), lr=1e-2)
    before = net.W.detach().clone()
    out = losses.consistency_loss(net, x0, None, LossConfig(discrete_steps=128), SD, 0)
    out.loss.backward()
    assert torch.isfinite(out.loss) and out.stats["masked"] == 0
    assert float(net.W.grad.abs().sum()) > 0
    opt.step()
    assert not torch.equal(net.W, before)


def test_config_checks_and_the_recorded_jvp_mode():
    cfg = Config()
    cfg.loss.discrete_steps = 1024
    validate(cfg)
    assert effective_jvp_mode(cfg) == ("separate", "loss.discrete_steps > 0: a finite-difference tangent "
                                                   "from two no-grad forwards, no forward-mode AD")
    cfg.network.resolution, cfg.network.channels, cfg.network.num_classes = 8, 1, 0
    cfg.train.precision = "bf16"
    run_cfg, notes = resolve_for_run(cfg)
    assert run_cfg.loss.jvp_mode == "separate" and DISCRETE_BF16_WARNING in notes
    cfg.loss.jvp_fp32 = True
    assert DISCRETE_BF16_WARNING not in resolve_for_run(cfg)[1]
    for method, steps, msg in (("sct", -1, ">= 0"), ("diffusion", 8, "consistency models"),
                               ("sct", 10 ** 6, "float32")):
        cfg.method, cfg.loss.discrete_steps = method, steps
        with pytest.raises(UsageError, match=msg):
            validate(cfg)


def test_cli_run_records_discrete_steps_and_resumes_bit_exact(tmp_path, capsys):
    from test_cli import SMALL

    args = [*SMALL, "--set", "loss.discrete_steps=64", "--set", "train.grid_every=0",
            "--set", "train.keep_checkpoints=0"]
    full, part = tmp_path / "full", tmp_path / "part"
    code, _, err = run(capsys, "train", "--run-dir", full, *args, "--steps", 3)
    assert code == 0, err
    assert "loss.jvp_mode=dual runs as separate: loss.discrete_steps > 0" in err
    cfg = yaml.safe_load((full / "config.yaml").read_text())
    assert cfg["loss"]["discrete_steps"] == 64 and cfg["loss"]["jvp_mode"] == "separate"
    assert run(capsys, "train", "--run-dir", part, *args, "--steps", 2)[0] == 0
    assert run(capsys, "train", "--run-dir", part, *args, "--steps", 3)[0] == 0
    stats = [[{k: v for k, v in json.loads(ln).items() if k != "images_per_s"}
              for ln in (p / "stats.jsonl").read_text().splitlines()] for p in (full, part)]
    assert stats[0] == stats[1]
    assert any(k.startswith("tangent_rms_t") for k in stats[0][-1])
    a, b = (torch.load(Path(p) / "checkpoint-0000003.pt", weights_only=True) for p in (full, part))
    assert all(torch.equal(a["net"][k], b["net"][k]) for k in a["net"])
