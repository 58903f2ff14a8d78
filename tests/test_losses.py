"""The sCM loss's gradient against an independent computation of the continuous-time objective's
gradient on a model with an analytic time derivative (Lu & Song 2025, Sec. 4, Algorithm 1)."""

import math

import pytest
import torch

from scmctl import trigflow
from scmctl.config import LossConfig
from scmctl.losses import consistency_loss, diffusion_loss

SD = 0.5


class Affine(torch.nn.Module):
    """F_θ(x, t) = W x + t·u + c(t) with analytic dF/dt; adaptive weight w_φ(t) = a + b·t."""

    def __init__(self, d):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.W = torch.nn.Parameter(torch.randn(d, d, generator=g, dtype=torch.float64) / math.sqrt(d))
        self.u = torch.nn.Parameter(torch.randn(d, generator=g, dtype=torch.float64))
        self.a = torch.nn.Parameter(torch.tensor(0.3, dtype=torch.float64))
        self.b = torch.nn.Parameter(torch.tensor(-0.2, dtype=torch.float64))
        self.num_classes = 0

    def forward(self, x, t, labels=None, guidance=None):
        return x @ self.W.T + t[:, None] * self.u + torch.sin(t)[:, None]

    def dFdt(self, x, dxdt, t):  # total derivative along x(t), x = x_t/σ_d
        return (dxdt / SD) @ self.W.T + self.u + torch.cos(t)[:, None]

    def adaptive_weight(self, t):
        return self.a + self.b * t


def _replay_draws(x0, cfg, seed):
    """The random draws consistency_loss makes, in the same order."""
    torch.manual_seed(seed)
    z = torch.randn_like(x0) * SD
    t = trigflow.sample_time(x0.shape[0], cfg.P_mean, cfg.P_std, SD).double()
    return z, t


def _analytic(model, x0, cfg, seed, step, teacher_W=None, velocity=None):
    z, t = _replay_draws(x0, cfg, seed)
    # the loss computes t in float32; replay it the same way
    t = t.float().double()
    c, s = torch.cos(t)[:, None], torch.sin(t)[:, None]
    x_t = c * x0 + s * z
    dxdt = c * z - s * x0 if teacher_W is None else SD * (x_t / SD) @ teacher_W.T
    if velocity is not None:
        dxdt = velocity(x0, x_t, t)
    with torch.no_grad():
        F = model(x_t / SD, t)
        dF = model.dFdt(x_t / SD, dxdt, t)
    r = min(1.0, step / cfg.tangent_warmup_steps) if cfg.tangent_warmup_steps else 1.0
    g = -c ** 2 * (SD * F - dxdt) - r * (c * s * x_t + SD * c * s * dF)
    if cfg.tangent_norm == "l2":
        g = g / (g.norm(dim=1, keepdim=True) + cfg.tangent_norm_c)
    elif cfg.tangent_norm == "rms":
        g = g / (g.norm(dim=1, keepdim=True) / math.sqrt(x0.shape[1]) + cfg.tangent_norm_c)
    d, n = x0.shape[1], x0.shape[0]
    w = model.adaptive_weight(t).detach() if cfg.adaptive_weighting else torch.zeros(n, dtype=torch.float64)
    ew = torch.exp(w)
    # ∇θ of E[e^w/D ‖F_θ − sg(F_θ + g)‖² − w] at θ: −2/D·E[e^w g·∂F/∂θ]
    xin = x_t / SD
    gW = -(2 / d) * ((ew[:, None] * g).T @ xin) / n
    gu = -(2 / d) * (ew[:, None] * g * t[:, None]).sum(0) / n
    # ∂/∂w: e^w‖g‖²/D − 1
    dw = (ew * g.square().sum(1) / d - 1) if cfg.adaptive_weighting else torch.zeros(n, dtype=torch.float64)
    ga, gb = dw.mean(), (dw * t).mean()
    return gW, gu, ga, gb


@pytest.mark.parametrize("jvp_mode", ["dual", "separate"])
@pytest.mark.parametrize("norm", ["l2", "rms", "none"])
@pytest.mark.parametrize("adaptive", [True, False])
@pytest.mark.parametrize("step", [0, 250, 2000])
def test_sct_gradient_matches_analytic_objective(norm, adaptive, step, jvp_mode):
    d, n = 6, 16
    model = Affine(d)
    x0 = torch.randn(n, d, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * SD
    cfg = LossConfig(P_mean=-1.0, P_std=1.4, tangent_warmup_steps=1000, tangent_norm=norm,
                     adaptive_weighting=adaptive, jvp_mode=jvp_mode)
    torch.manual_seed(123)
    out = consistency_loss(model, x0, None, cfg, SD, step)
    out.loss.backward()
    gW, gu, ga, gb = _analytic(model, x0, cfg, 123, step)
    assert torch.allclose(model.W.grad, gW, rtol=1e-5, atol=1e-7)
    assert torch.allclose(model.u.grad, gu, rtol=1e-5, atol=1e-7)
    if adaptive:
        assert torch.allclose(model.a.grad, ga, rtol=1e-5, atol=1e-7)
        assert torch.allclose(model.b.grad, gb, rtol=1e-5, atol=1e-7)
    assert out.stats["tangent_warmup"] == min(1.0, step / 1000)


def _posterior_velocity(x0, x_t, t):
    """The stable-target-field velocity, written out per sample: Gaussian densities of x_t under
    every x0_j of the reference set x0, normalized, and the velocity (cos t·x_t − E[x0 | x_t])/sin t."""
    v = torch.empty_like(x_t)
    for i in range(x_t.shape[0]):
        c, s = math.cos(float(t[i])), math.sin(float(t[i]))
        logp = torch.stack([-(x_t[i] - c * x0j).square().sum() / (2 * SD**2 * s**2) for x0j in x0])
        w = torch.softmax(logp, dim=0)
        v[i] = (c * x_t[i] - (w[:, None] * x0).sum(0)) / s
    return v


@pytest.mark.parametrize("jvp_mode,extra", [("dual", 0), ("separate", 0), ("dual", 24)])
def test_sct_batch_velocity_gradient_matches_analytic_objective(jvp_mode, extra):
    """Against the objective written out with a per-sample brute-force posterior over the batch
    (and `extra` further reference examples, loss.sct_references)."""
    from scmctl.batch_velocity import References

    d, n = 6, 16
    model = Affine(d)
    # a spread-out batch so that the posterior weights are neither one-hot nor uniform at most t
    pool = torch.randn(n + extra, d, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 0.3
    x0 = pool[:n]
    refs = References(pool[n:]) if extra else None
    cfg = LossConfig(P_mean=0.0, P_std=1.0, tangent_warmup_steps=0, sct_velocity="batch", jvp_mode=jvp_mode)
    torch.manual_seed(11)
    consistency_loss(model, x0, None, cfg, SD, 0, references=refs).loss.backward()
    gW, gu, ga, gb = _analytic(model, x0, cfg, 11, 0,
                               velocity=lambda x0_, x_t, t: _posterior_velocity(pool, x_t, t))
    assert torch.allclose(model.W.grad, gW, rtol=1e-5, atol=1e-7)
    assert torch.allclose(model.u.grad, gu, rtol=1e-5, atol=1e-7)
    assert torch.allclose(model.a.grad, ga, rtol=1e-5, atol=1e-7)
    # and it differs from the conditional velocity's gradient (the option is wired in)
    gW_cond, *_ = _analytic(model, x0, cfg, 11, 0)
    assert not torch.allclose(gW, gW_cond, rtol=1e-2)


@pytest.mark.parametrize("jvp_mode", ["dual", "separate"])
def test_scd_gradient_uses_teacher_velocity(jvp_mode):
    d, n = 5, 12
    model = Affine(d)
    Wt = torch.randn(d, d, generator=torch.Generator().manual_seed(7), dtype=torch.float64) * 0.3

    def teacher(x, t, labels=None):
        return x @ Wt.T

    x0 = torch.randn(n, d, generator=torch.Generator().manual_seed(2), dtype=torch.float64) * SD
    cfg = LossConfig(tangent_warmup_steps=0, tangent_norm="l2", adaptive_weighting=False, jvp_mode=jvp_mode)
    torch.manual_seed(5)
    consistency_loss(model, x0, None, cfg, SD, 10, teacher=teacher).loss.backward()
    gW, gu, _, _ = _analytic(model, x0, cfg, 5, 10, teacher_W=Wt)
    assert torch.allclose(model.W.grad, gW, rtol=1e-5, atol=1e-7)
    assert torch.allclose(model.u.grad, gu, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("jvp_mode", ["dual", "separate"])
def test_nonfinite_samples_are_masked_and_counted(jvp_mode):
    d, n = 4, 8
    model = Affine(d)
    x0 = torch.randn(n, d, dtype=torch.float64) * SD
    x0[3] = float("nan")
    cfg = LossConfig(tangent_warmup_steps=0, jvp_mode=jvp_mode)
    torch.manual_seed(0)
    out = consistency_loss(model, x0, None, cfg, SD, 0)
    out.loss.backward()
    assert out.stats["masked"] == 1
    assert torch.isfinite(out.loss) and torch.isfinite(model.W.grad).all()
    cfg.nan_masking = False
    torch.manual_seed(0)
    assert not torch.isfinite(consistency_loss(model, x0, None, cfg, SD, 0).loss)


def test_dropout_mask_is_identical_in_both_passes():
    """With dropout, F⁻ from the jvp pass equals F_θ from the gradient pass (same mask)."""
    seen = []

    class Drop(Affine):
        def forward(self, x, t, labels=None, guidance=None):
            y = torch.nn.functional.dropout(super().forward(x, t), p=0.5, training=True)
            seen.append(y.detach().clone())
            return y

    model = Drop(4)
    x0 = torch.randn(8, 4, dtype=torch.float64) * SD
    torch.manual_seed(3)
    consistency_loss(model, x0, None, LossConfig(tangent_warmup_steps=0, jvp_mode="separate"), SD, 0)
    assert len(seen) == 2 and torch.equal(seen[0], seen[1])
    assert (seen[0] == 0).any()


def test_diffusion_loss_is_zero_for_the_exact_velocity():
    """With F = v_t/σ_d (known x0, z) the TrigFlow diffusion loss is exactly 0."""
    x0 = torch.randn(8, 3, dtype=torch.float64) * SD
    cfg = LossConfig(P_mean=-0.8, P_std=1.6, adaptive_weighting=False)
    torch.manual_seed(9)
    z, t = _replay_draws(x0, cfg, 9)
    t = t.float().double()

    class Oracle(torch.nn.Module):
        def forward(self, x, tt, labels=None):
            return trigflow.velocity(x0, z, t) / SD

    torch.manual_seed(9)
    out = diffusion_loss(Oracle(), x0, None, cfg, SD)
    assert out.loss.item() < 1e-12


def test_dual_and_separate_jvp_modes_agree_on_the_unet(tiny_net_cfg):
    """Same loss and gradients from the one-forward dual mode and the paper's separate jvp,
    through the real U-Net (attention included) in float64."""
    from scmctl.nn.unet import UNet

    torch.manual_seed(0)
    net = UNet(tiny_net_cfg).double()
    with torch.no_grad():
        net.out_gain.fill_(1.0)
    x0 = torch.randn(4, 1, 8, 8, dtype=torch.float64) * SD
    grads = {}
    for mode in ("dual", "separate"):
        net.zero_grad()
        torch.manual_seed(11)
        out = consistency_loss(net, x0, None, LossConfig(tangent_warmup_steps=0, jvp_mode=mode), SD, 5)
        out.loss.backward()
        grads[mode] = (out.loss.detach(), [p.grad.clone() for p in net.parameters()])
    assert torch.allclose(grads["dual"][0], grads["separate"][0], rtol=1e-8)
    for a, b in zip(grads["dual"][1], grads["separate"][1]):
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-12)  # fp32 time draw and attention stats


@pytest.mark.parametrize("jvp_mode", ["dual", "separate"])
def test_per_t_bin_stats_match_the_replayed_samples(jvp_mode):
    """stats' loss_t{i} (unweighted loss) and tangent_rms_t{i} are the means over the samples whose t
    falls in bin i (a masked sample is left out of the loss bins), recomputed from replayed draws."""
    from scmctl.losses import T_BINS

    d, n = 6, 64
    model = Affine(d)
    x0 = torch.randn(n, d, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * SD
    x0[5] = float("nan")
    cfg = LossConfig(tangent_warmup_steps=0, tangent_norm="l2", jvp_mode=jvp_mode)
    torch.manual_seed(9)
    stats = consistency_loss(model, x0, None, cfg, SD, 0).stats
    z, t = _replay_draws(x0, cfg, 9)
    t = t.float().double()
    c, s = torch.cos(t)[:, None], torch.sin(t)[:, None]
    x_t = c * x0 + s * z
    with torch.no_grad():
        g = -c ** 2 * (SD * model(x_t / SD, t) - (c * z - s * x0)) - (c * s * x_t + SD * c * s * model.dFdt(
            x_t / SD, c * z - s * x0, t))
    rms = g.norm(dim=1) / math.sqrt(d)
    raw = (g / (g.norm(dim=1, keepdim=True) + cfg.tangent_norm_c)).square().sum(1) / d
    ok = torch.isfinite(raw)
    seen = 0
    for i in range(len(T_BINS) - 1):
        m = (t >= T_BINS[i]) & (t < T_BINS[i + 1])
        if (m & ok).any():
            seen += 1
            assert stats[f"loss_t{i}"] == pytest.approx(float(raw[m & ok].mean()), rel=1e-6)
            assert stats[f"tangent_rms_t{i}"] == pytest.approx(float(torch.where(ok, rms, 0)[m].mean()), rel=1e-6)
    assert seen >= 3 and not ok[5]
