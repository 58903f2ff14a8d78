"""sCD + adaptive VSD (Lu & Song 2025, App. C): the generator term's gradient against a float64 closed
form on linear networks, its stop-gradients, the config rules and preset variant, the CLI run's
checkpoint and bit-exact resume."""

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from _cli import run
from scmctl import config, losses_vsd, trigflow
from scmctl.config import LossConfig
from scmctl.errors import UsageError

SD = 0.5
N, C, H = 5, 2, 3           # micro-batch of 5 images 2x3x3
D = C * H * H
K = 4                       # classes


class Linear(nn.Module):
    """F(x, t, labels, guidance) = A·x + t·b + labels·E + s·u (per image, x flattened): a network whose
    gradients have a closed form."""

    def __init__(self, seed):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.A = nn.Parameter(torch.randn(D, D, generator=g, dtype=torch.float64) * 0.3)
        self.b = nn.Parameter(torch.randn(D, generator=g, dtype=torch.float64))
        self.E = nn.Parameter(torch.randn(K, D, generator=g, dtype=torch.float64))
        self.u = nn.Parameter(torch.randn(D, generator=g, dtype=torch.float64))

    def forward(self, x, t, labels=None, guidance=None):
        y = x.flatten(1) @ self.A.T + t.reshape(-1, 1).double() * self.b
        if labels is not None:
            y = y + labels.double() @ self.E
        if guidance is not None:
            y = y + guidance.reshape(-1, 1).double() * self.u
        return y.reshape(x.shape)


class Head(nn.Module):
    """w(t) = a·t + c."""

    def __init__(self):
        super().__init__()
        self.a = nn.Parameter(torch.tensor(0.3, dtype=torch.float64))
        self.c = nn.Parameter(torch.tensor(-0.2, dtype=torch.float64))

    def forward(self, t):
        return self.a * t.double() + self.c


@pytest.fixture
def float64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # the draws z', n in float64 (t stays float32, as trained)
    yield
    torch.set_default_dtype(old)


@pytest.mark.parametrize("guided,norm", [(False, "l2"), (True, "l2"), (False, "none"), (True, "rms")])
def test_vsd_gradient_matches_the_closed_form_float64(guided, norm, float64):
    """∇_θ and ∇_ψ of L_VSD = mean_i e^{w(t_i)}/D·‖g_θ,i − g⁻_i + R_i‖² − w(t_i) equal the closed
    form: with R_i = F_pre,i − F_φ,i normalized (loss.vsd_norm: l2 R/(‖R‖ + c), rms R/(‖R‖/√D + c),
    none R; the value of the residual, with no gradient) and g_i = cos(T)·z_i −
    sin(T)·σ_d·F_θ(z_i/σ_d, T), ∂L/∂g_i = 2e^{w_i}/(nD)·R_i, so ∂L/∂A = −sin(T)·Σ_i 2e^{w_i}/(nD)·R_i z_iᵀ
    (z_i/σ_d times σ_d), ∂L/∂b = −sin(T)σ_d·T·Σ_i 2e^{w_i}/(nD)·R_i, ∂L/∂w_i = (e^{w_i}‖R_i‖²/D − 1)/n;
    the teacher and F_φ get no gradient. Guided: F_pre = F_u + s(F_c − F_u) with the student's s."""
    student, teacher, fake, head = Linear(0), Linear(1), Linear(2), Head()
    teacher.requires_grad_(False)
    labels = torch.nn.functional.one_hot(torch.arange(N) % K, K).double()
    cfg = LossConfig(max_guidance=3.0 if guided else 1.0, vsd_norm=norm, tangent_norm_c=0.3)
    torch.manual_seed(7)
    out, g_minus = losses_vsd.vsd_loss(student, teacher, fake, fake, head, (N, C, H, H), labels, cfg, SD, "cpu")
    out.loss.backward()

    # the draws, repeated in the order vsd_loss makes them: z', s, t, n
    torch.manual_seed(7)
    z = torch.randn(N, C, H, H) * SD
    s = 1 + torch.rand(N) * 2.0 if guided else None
    t = trigflow.sample_time(N, cfg.vsd_P_mean, cfg.vsd_P_std, SD)
    noise = torch.randn(N, C, H, H) * SD
    T = trigflow.t_max(SD)
    with torch.no_grad():
        zf, td = z.flatten(1).double(), t.double()
        F_g = zf / SD @ student.A.T + T * student.b + labels @ student.E + (s.double()[:, None] * student.u if guided else 0)
        g = torch.cos(torch.tensor(T, dtype=torch.float64)) * zf - torch.sin(torch.tensor(T, dtype=torch.float64)) * SD * F_g
        assert torch.allclose(g, g_minus.flatten(1).double(), rtol=1e-6, atol=1e-6)
        x = (torch.cos(td)[:, None] * g_minus.flatten(1).double() + torch.sin(td)[:, None] * noise.flatten(1).double()) / SD
        F_u = x @ teacher.A.T + td[:, None] * teacher.b
        F_c = F_u + labels @ teacher.E
        F_pre = F_u + s.double()[:, None] * (F_c - F_u) if guided else F_c
        F_phi = x @ fake.A.T + td[:, None] * fake.b + labels @ fake.E
        R = F_pre - F_phi
        scale = {"l2": R.norm(dim=1) + 0.3, "rms": R.norm(dim=1) / D ** 0.5 + 0.3, "none": torch.ones(N)}[norm]
        R = R / scale[:, None]
        w = 0.3 * td - 0.2
        coef = 2 * torch.exp(w) / (N * D)                       # ∂L/∂g_i = coef_i·R_i
        sinT = torch.sin(torch.tensor(T, dtype=torch.float64))
        dA = -sinT * (coef[:, None] * R).T @ (zf / SD) * SD
        db = -sinT * SD * T * (coef[:, None] * R).sum(0)
        dE = -sinT * SD * labels.T @ (coef[:, None] * R)
        dw = (torch.exp(w) * R.square().sum(1) / D - 1) / N
        loss = (torch.exp(w) * R.square().sum(1) / D - w).mean()
    assert abs(out.loss.item() - loss.item()) < 1e-9 * max(1, abs(loss.item()))
    for got, want in ((student.A.grad, dA), (student.b.grad, db), (student.E.grad, dE),
                      (head.a.grad, (dw * td).sum()), (head.c.grad, dw.sum())):
        assert torch.allclose(got, want, rtol=1e-9, atol=1e-12), (got, want)
    if guided:
        du = -sinT * SD * (coef[:, None] * R * s.double()[:, None]).sum(0)
        assert torch.allclose(student.u.grad, du, rtol=1e-9, atol=1e-12)
    # stop-gradients: nothing reaches the teacher or F_φ from L_VSD
    assert all(p.grad is None for p in list(teacher.parameters()) + list(fake.parameters()))
    # a descent step on the samples moves them along D_pre − D_φ = sin t·σ_d·(F_φ − F_pre)
    step = -(coef[:, None] * R)
    assert torch.allclose(step, coef[:, None] / scale[:, None] * (F_phi - F_pre))
    if norm != "none":  # the normalized residual is bounded: ‖R‖ < 1 (l2) or < √D (rms)
        assert float(R.norm(dim=1).max()) < (1 if norm == "l2" else D ** 0.5)


def test_fake_loss_reaches_only_the_fake_model(float64):
    """The fake score model's diffusion loss on g⁻ gives F_φ a gradient and nothing to θ or w_ψ;
    with_vsd's student loss is sCD + λ·L_VSD and its auxiliary loss is the fake loss."""
    student, teacher, fake, head = Linear(0), Linear(1), Linear(2), Head()
    teacher.requires_grad_(False)
    fake.adaptive_weight = lambda t: torch.zeros_like(t, dtype=torch.float64)
    cfg = LossConfig(vsd_weight=0.25)
    scd = losses_vsd.LossOutput(torch.tensor(1.5, dtype=torch.float64), {"loss_raw": 0.1})
    torch.manual_seed(3)
    out = losses_vsd.with_vsd(scd, student, teacher, fake, fake, head, (N, C, H, H), None, cfg, SD, "cpu")
    assert abs(out.loss.item() - (1.5 + 0.25 * out.stats["loss_vsd"])) < 1e-12 and out.stats["loss_scd"] == 1.5
    aux = out.then()
    assert aux.stats["loss_fake"] == aux.loss.item()
    aux.loss.backward()
    assert all(p.grad is None for p in list(student.parameters()) + list(head.parameters()))
    assert fake.A.grad is not None and float(fake.A.grad.abs().sum()) > 0


def test_vsd_weight_config_rules_and_the_imagenet512_variant():
    cfg = config.resolve("tiny", "scd", [])
    assert cfg.loss.vsd_weight == 0 and not config.uses_vsd(cfg)
    assert (cfg.loss.vsd_P_mean, cfg.loss.vsd_P_std, cfg.loss.vsd_fake_P_mean, cfg.loss.vsd_fake_P_std) == (0.4, 2.0, -0.8, 1.6)
    for method in ("sct", "diffusion"):
        with pytest.raises(UsageError, match="loss.vsd_weight"):
            config.resolve("tiny", method, ["loss.vsd_weight=1"])
    with pytest.raises(UsageError, match="loss.vsd_P_std"):
        config.resolve("tiny", "scd", ["loss.vsd_weight=1", "loss.vsd_P_std=0"])
    with pytest.raises(UsageError, match="loss.vsd_weight"):
        config.resolve("tiny", "scd", ["loss.vsd_weight=-1"])
    assert cfg.loss.vsd_norm == "l2"
    with pytest.raises(UsageError, match="loss.vsd_norm"):
        config.resolve("tiny", "scd", ["loss.vsd_weight=1", "loss.vsd_norm=max"])
    # ImageNet-512: sCD + aVSD runs 20k iterations (Table 5), everything else as sCD (guidance too)
    for name in ("imagenet512", "imagenet512-s", "imagenet512-xxl"):
        scd = config.resolve(name, "scd", [])
        avsd = config.resolve(name, "scd", ["loss.vsd_weight=1.0"])
        assert scd.train.steps == 200000 and avsd.train.steps == 20000
        assert config.diff(scd, avsd) == ["train.steps", "loss.vsd_weight"]
        assert avsd.loss.max_guidance == 2.0
        assert config.resolve(name, "scd", ["loss.vsd_weight=1.0", "train.steps=7"]).train.steps == 7


SMALL = ["--set", "data.resolution=8", "--set", "network.model_channels=16",
         "--set", "network.attn_resolutions=[4]", "--set", "network.head_channels=16",
         "--set", "train.checkpoint_every=2", "--set", "train.grid_every=0",
         "--set", "train.keep_checkpoints=0", "--batch", "8"]


def _stats(run_dir):
    return [{k: v for k, v in json.loads(ln).items() if k != "images_per_s"}
            for ln in (Path(run_dir) / "stats.jsonl").read_text().splitlines()]


def test_avsd_distill_logs_checkpoints_and_resumes_bit_exact(tmp_path, capsys):
    """`scmctl distill --set loss.vsd_weight=1.0`: stats.jsonl has loss_vsd and loss_fake; the
    checkpoint holds F_φ, w_ψ and their optimizers; 2 + 2 steps equal 4 uninterrupted steps bit for
    bit (student, EMA, F_φ, w_ψ, all optimizers, stats); a checkpoint without the aVSD entries is
    one UsageError line."""
    teacher = tmp_path / "teacher"
    assert run(capsys, "train", "--objective", "diffusion", "--run-dir", teacher, *SMALL, "--steps", 1)[0] == 0
    args = ["distill", "--teacher", teacher, *SMALL, "--set", "loss.vsd_weight=1.0"]
    full, part = tmp_path / "full", tmp_path / "part"
    assert run(capsys, *args, "--run-dir", full, "--steps", 4)[0] == 0
    assert run(capsys, *args, "--run-dir", part, "--steps", 2)[0] == 0
    assert run(capsys, *args, "--run-dir", part, "--steps", 4)[0] == 0
    stats = _stats(full)
    assert stats == _stats(part)
    assert all(k in r for r in stats for k in ("loss_vsd", "loss_fake", "loss_scd", "grad_norm_fake"))
    a = torch.load(full / "checkpoint-0000004.pt", weights_only=True)
    b = torch.load(part / "checkpoint-0000004.pt", weights_only=True)
    for key in ("net", "ema", "vsd_fake", "vsd_weight_head"):
        assert a[key].keys() == b[key].keys() and all(torch.equal(a[key][k], b[key][k]) for k in a[key]), key
    for key in ("optimizer", "vsd_fake_optimizer", "vsd_weight_head_optimizer"):
        sa, sb = a[key]["state"], b[key]["state"]
        assert sa.keys() == sb.keys() and all(torch.equal(sa[i][m], sb[i][m]) for i in sa for m in sa[i]), key
    # F_φ moved away from the teacher it started from
    t = torch.load(teacher / "checkpoint-0000001.pt", weights_only=True)["ema"]
    assert any(not torch.equal(t[k], a["vsd_fake"][k]) for k in t)

    ck = part / "checkpoint-0000004.pt"
    bad = torch.load(ck, weights_only=True)
    del bad["vsd_fake"]
    torch.save(bad, ck)
    for p in sorted(part.glob("checkpoint-*.pt"))[:-1]:
        p.unlink()
    code, out, err = run(capsys, *args, "--run-dir", part, "--steps", 6)
    assert code == 2 and "Traceback" not in err and "vsd_fake" in err.strip().splitlines()[-1], err
