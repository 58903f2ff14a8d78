"""The U-Net's forward-mode JVP against float64 central finite differences (SCM_NOTES §2–3)."""

import math

import torch

from scmctl.losses import consistency_tangent
from scmctl.nn.unet import UNet, count_parameters


def _net(cfg, **kw):
    for k, v in kw.items():
        setattr(cfg, k, v)
    torch.manual_seed(0)
    net = UNet(cfg).double().eval()
    with torch.no_grad():  # trained-looking gains (out_gain and EDM2's emb_gain start at 0)
        for name, p in net.named_parameters():
            if name.endswith(("out_gain", "emb_gain", "guidance_gain")):
                p.fill_(1.0)
    return net


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def test_jvp_matches_finite_differences_in_x_and_t(tiny_net_cfg):
    net = _net(tiny_net_cfg)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 1, 8, 8, generator=g, dtype=torch.float64)
    t = torch.tensor([0.2, 0.9, 1.5], dtype=torch.float64)
    tx = torch.randn(3, 1, 8, 8, generator=g, dtype=torch.float64)
    f = lambda x, t: net(x, t)  # noqa: E731
    with torch.no_grad():
        # x direction
        _, jx = torch.func.jvp(f, (x, t), (tx, torch.zeros_like(t)))
        h = 1e-5
        fd_x = (f(x + h * tx, t) - f(x - h * tx, t)) / (2 * h)
        # t direction
        _, jt = torch.func.jvp(f, (x, t), (torch.zeros_like(x), torch.ones_like(t)))
        fd_t = (f(x, t + h) - f(x, t - h)) / (2 * h)
    assert _rel(jx, fd_x) < 1e-7
    assert _rel(jt, fd_t) < 1e-7
    assert jt.abs().max() > 1e-3  # the time embedding really feeds the output


def test_jvp_with_classes_and_guidance_input(tiny_net_cfg):
    net = _net(tiny_net_cfg, num_classes=3, guidance_input=True, adaptive_double_norm=False)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 1, 8, 8, generator=g, dtype=torch.float64)
    t = torch.tensor([0.4, 1.2], dtype=torch.float64)
    labels = torch.tensor([0, 2])
    s = torch.tensor([1.0, 1.7], dtype=torch.float64)
    f = lambda x, t: net(x, t, labels, s)  # noqa: E731
    tx = torch.randn_like(x)
    with torch.no_grad():
        _, j = torch.func.jvp(f, (x, t), (tx, torch.ones_like(t)))
        h = 1e-5
        fd = (f(x + h * tx, t + h) - f(x - h * tx, t - h)) / (2 * h)
        # labels and guidance change the output
        assert (net(x, t, torch.tensor([1, 1]), s) - f(x, t)).abs().max() > 1e-4
        assert (net(x, t, labels, s + 0.5) - f(x, t)).abs().max() > 1e-4
    assert _rel(j, fd) < 1e-7


def test_rearranged_tangent_is_sigma_cos_sin_total_derivative(tiny_net_cfg):
    """J from the jvp with tangents (cos t sin t dx/dt, cos t sin t σ_d) equals
    σ_d cos t sin t · dF(x_t/σ_d, t)/dt along the trajectory x_t = cos t x0 + sin t z."""
    net = _net(tiny_net_cfg)
    sd = 0.5
    g = torch.Generator().manual_seed(3)
    x0 = torch.randn(3, 1, 8, 8, generator=g, dtype=torch.float64) * sd
    z = torch.randn(3, 1, 8, 8, generator=g, dtype=torch.float64) * sd
    t = torch.tensor([0.3, 0.8, 1.3], dtype=torch.float64)
    b = lambda v: v.reshape(-1, 1, 1, 1)  # noqa: E731
    x_of = lambda tt: torch.cos(b(tt)) * x0 + torch.sin(b(tt)) * z  # noqa: E731
    dxdt = torch.cos(b(t)) * z - torch.sin(b(t)) * x0
    F_minus, gvec = consistency_tangent(net, x_of(t), t, dxdt, sd, warmup_r=1.0)
    h = 1e-5
    with torch.no_grad():
        dFdt = (net(x_of(t + h) / sd, t + h) - net(x_of(t - h) / sd, t - h)) / (2 * h)
        F = net(x_of(t) / sd, t)
    cs = b(torch.cos(t) * torch.sin(t))
    J_fd = sd * cs * dFdt
    # g = −cos²t(σ_d F − dx/dt) − (cos t sin t x_t + J)
    g_fd = -b(torch.cos(t)) ** 2 * (sd * F - dxdt) - (cs * x_of(t) + J_fd)
    assert _rel(F_minus, F) < 1e-12
    assert _rel(gvec, g_fd) < 1e-7
    # and g equals cos t · df/dt for f(x_t, t) = cos t x_t − sin t σ_d F (Eq. 8 rearranged)
    f_of = lambda tt: torch.cos(b(tt)) * x_of(tt) - torch.sin(b(tt)) * sd * net(x_of(tt) / sd, tt)  # noqa: E731
    with torch.no_grad():
        dfdt = (f_of(t + h) - f_of(t - h)) / (2 * h)
    assert _rel(gvec, b(torch.cos(t)) * dfdt) < 1e-7


def test_same_output_for_any_batch_composition(tiny_net_cfg):
    net = _net(tiny_net_cfg).float()
    with torch.no_grad():
        net.out_gain.fill_(1.0)  # a zero-initialized gain would make every output 0
    x = torch.randn(5, 1, 8, 8)
    t = torch.rand(5)
    with torch.no_grad():
        full = net(x, t)
        parts = torch.cat([net(x[:2], t[:2]), net(x[2:], t[2:])])
        other = net(x[:1] + 1, t[:1])
    assert full.abs().mean() > 0.1 and (other - full[:1]).abs().max() > 1e-3  # outputs are not flat
    # float32 across batch shapes: kernels may sum in another order (observed <= 1e-6)
    torch.testing.assert_close(full, parts, rtol=1e-5, atol=1e-5)


def test_parameter_count_on_meta_matches_real(tiny_net_cfg):
    net = UNet(tiny_net_cfg)
    assert count_parameters(tiny_net_cfg) == sum(p.numel() for p in net.parameters())


def test_forward_leaves_weights_untouched_and_renormalize_is_separate(tiny_net_cfg):
    net = UNet(tiny_net_cfg).train()
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(3.0)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    net(torch.randn(2, 1, 8, 8), torch.rand(2)).sum().backward()
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    net.renormalize_()
    w = net.conv_in.weight
    rms = w.flatten(1).square().mean(1).sqrt()
    assert torch.allclose(rms, torch.ones_like(rms), atol=1e-3)


def test_bad_resolution_is_a_clear_error(tiny_net_cfg):
    import pytest

    from scmctl.errors import UsageError

    tiny_net_cfg.resolution = 6
    tiny_net_cfg.channel_mult = [1, 2, 2]
    with pytest.raises(UsageError, match="not divisible"):
        UNet(tiny_net_cfg)


def test_student_with_guidance_input_starts_as_its_teacher(tiny_net_cfg):
    """An sCD student gets a guidance input; initialized from the teacher it computes the same F."""
    import copy

    from scmctl.training.checkpoint import load_state

    teacher = UNet(tiny_net_cfg).eval()
    with torch.no_grad():
        teacher.out_gain.fill_(1.0)
    scfg = copy.deepcopy(tiny_net_cfg)
    scfg.guidance_input = True
    student = UNet(scfg).eval()
    load_state(student, teacher.state_dict(), "teacher", allow_missing=("emb_guidance.", "guidance_gain"))
    x, t = torch.randn(3, 1, 8, 8), torch.rand(3)
    with torch.no_grad():
        assert torch.allclose(student(x, t, None, torch.tensor([1.0, 1.5, 2.0])), teacher(x, t), atol=1e-6)
