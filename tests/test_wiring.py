"""Tests that fail when a piece is wired to the wrong thing: class-conditional training and guided
sampling end to end, EMA vs raw weights, refine, the sCD teacher's weights.

Each test compares what the CLI wrote with an independent computation from the checkpoint's own
weights (a few lines of TrigFlow, not the sampler under test), so a swapped argument, a dropped
label or the wrong weight set changes a number that is checked.
"""

import json
import math

import numpy as np
import pytest
import torch
import yaml

from _cli import run
from scmctl import losses, trigflow
from scmctl.sampling import per_image_draws, teacher_times
from scmctl.training import checkpoint as ckpt_io
from scmctl.training.ema import EMA, sigma_rel_to_gamma

SD = 0.5
# A classic EMA with a half-life of 8 steps: after 4 steps the EMA and raw weights differ clearly
# (the power-function EMA at step 4 is ~99% the raw weights).
SLOW_EMA = ["--set", "train.ema_sigma_rel=0", "--set", "train.ema_halflife_images=64"]
# The tiny preset on the conditional digits at 8x8 with a small network: seconds per run.
COND = ["--set", "data.resolution=8", "--set", "data.conditional=true",
        "--set", "network.model_channels=16", "--set", "network.attn_resolutions=[4]",
        "--set", "network.head_channels=16", "--set", "network.label_dropout=0.25",
        "--set", "train.checkpoint_every=4", "--set", "train.grid_every=0",
        "--set", "train.device=cpu", "--batch", "8", "--steps", "4"]


def _npz(path):
    with np.load(path, allow_pickle=False) as z:
        return z["arr_0"]


def _uint8(x):
    return (x.float() * 127.5 + 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def _net(ckpt, weights):
    return ckpt_io.network_from_checkpoint(ckpt, weights)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A conditional diffusion teacher (label dropout 0.25) and a guided sCD student
    (loss.max_guidance=3) trained through the CLI, with the calls the loss saw recorded."""
    root = tmp_path_factory.mktemp("wiring")
    mp = pytest.MonkeyPatch()
    seen = {"drop": [], "tangent": []}
    drop, tangent = losses.drop_labels, losses.consistency_tangent

    def spy_drop(labels, num_classes, p):
        out = drop(labels, num_classes, p)
        seen["drop"].append((None if labels is None else labels.clone(), num_classes, p,
                             None if out is None else out.clone()))
        return out

    def spy_tangent(net, x_t, t, dxdt, sigma_data, warmup_r, labels=None, guidance=None, keep_graph=False, s=None):
        seen["tangent"].append({k: (v.detach().clone() if torch.is_tensor(v) else v) for k, v in
                                dict(x_t=x_t, t=t, dxdt=dxdt, labels=labels, guidance=guidance).items()})
        return tangent(net, x_t, t, dxdt, sigma_data, warmup_r, labels, guidance, keep_graph, s)

    mp.setattr(losses, "drop_labels", spy_drop)
    mp.setattr(losses, "consistency_tangent", spy_tangent)
    cap = _Capsys()
    try:
        code, _, err = run(cap, "train", "--objective", "diffusion", "--run-dir", root / "teacher", *COND)
        assert code == 0, err
        teacher_drops = list(seen["drop"])
        seen["drop"].clear()
        code, _, err = run(cap, "distill", "--teacher", root / "teacher", "--run-dir", root / "student",
                           *COND, "--set", "loss.max_guidance=3", *SLOW_EMA)
        assert code == 0, err
    finally:
        mp.undo()
    return {"root": root, "teacher_drops": teacher_drops, "tangent": seen["tangent"],
            "teacher": ckpt_io.load(root / "teacher"), "student": ckpt_io.load(root / "student")}


class _Capsys:
    """capsys for a module-scoped fixture: run() only needs readouterr()."""

    def readouterr(self):
        return "", ""


def test_label_dropout_reaches_the_loss(runs):
    drops = runs["teacher_drops"]
    assert len(drops) == 4  # one micro-batch per step
    for labels, ncls, p, onehot in drops:
        assert labels is not None and labels.shape == (8,) and ncls == 10 and p == 0.25
        kept = onehot.sum(1)
        assert set(kept.tolist()) <= {0.0, 1.0}
        assert torch.equal(onehot.argmax(1)[kept == 1], labels[kept == 1])
    dropped = sum(int((o.sum(1) == 0).sum()) for *_, o in drops)
    # 32 labels at p = 0.25: 8 expected; with this seed 0 < dropped < 32 (deterministic)
    assert 0 < dropped < 32


def test_guided_scd_teacher_target_and_student_guidance_input(runs):
    """The sCD target uses F_u + s·(F_c − F_u) of the teacher's EMA with s ~ U[1, 3], and the
    student receives the same s as its guidance input (network.guidance_input is switched on)."""
    cfg = runs["student"]["config"]
    assert cfg["network"]["guidance_input"] is True and cfg["loss"]["max_guidance"] == 3
    teacher = _net(runs["teacher"], "ema")
    calls = runs["tangent"]
    assert len(calls) == 4
    all_s = torch.cat([c["guidance"] for c in calls])
    assert all_s.min() >= 1 and all_s.max() <= 3 and all_s.std() > 0.2
    for c in calls:
        x = c["x_t"] / SD
        with torch.no_grad():
            F_c = teacher(x, c["t"], c["labels"])
            F_u = teacher(x, c["t"], torch.zeros_like(c["labels"]))
        want = SD * (F_u + c["guidance"][:, None, None, None] * (F_c - F_u))
        torch.testing.assert_close(c["dxdt"], want, rtol=1e-5, atol=1e-6)


def test_guided_teacher_sampling_values_and_nfe(runs, capsys, tmp_path):
    """A CFG teacher sampled with --guidance 2 (Euler, 3 steps): two network evaluations per step,
    images equal to an Euler loop written here from the EMA weights."""
    teacher_dir = runs["root"] / "teacher"
    outs = {}
    for g in (1, 2):
        out = tmp_path / f"g{g}.npz"
        code, o, err = run(capsys, "sample", teacher_dir, "-n", 5, "--steps", 3, "--solver", "euler",
                           "--guidance", g, "--out", out, "--device", "cpu", "--json")
        assert code == 0, err
        info = json.loads(o)
        assert info["nfe"] == 3 * g, info  # guided: F_c and F_u per step
        outs[g] = _npz(out)
    net = _net(runs["teacher"], "ema")
    tmax = trigflow.t_max(SD)
    z, labels = per_image_draws(range(5), (1, 8, 8), 1, 10, "cpu")
    x = z[0] * SD * math.sin(tmax)
    times = teacher_times(3, SD).tolist()
    with torch.no_grad():
        for s, t in zip(times[:-1], times[1:]):
            ts = torch.full((5,), s)
            F_c, F_u = net(x / SD, ts, labels), net(x / SD, ts, torch.zeros(5, 10))
            F = F_u + 2 * (F_c - F_u)
            x = math.cos(s - t) * x - math.sin(s - t) * SD * F
    want = _uint8(x).astype(int)
    assert np.abs(outs[2].astype(int) - want).max() <= 1
    assert np.abs(outs[2].astype(int) - outs[1].astype(int)).max() > 0


def test_guided_student_sampling_uses_its_guidance_input(runs, capsys, tmp_path):
    """A 1-step sCD student: x0 = cos t_max·σ_d z − sin t_max·σ_d·F(z, t_max, c, s), one
    evaluation, s given to the network (not two CFG evaluations)."""
    out = tmp_path / "s.npz"
    code, o, err = run(capsys, "sample", runs["root"] / "student", "-n", 6, "--steps", 1, "--guidance", 2.5,
                       "--out", out, "--device", "cpu", "--json")
    assert code == 0, err
    assert json.loads(o)["nfe"] == 1
    net = _net(runs["student"], "ema")
    assert float(net.guidance_gain) != 0.0  # trained: the guidance input changes the output
    tmax = trigflow.t_max(SD)
    z, labels = per_image_draws(range(6), (1, 8, 8), 1, 10, "cpu")
    t = torch.full((6,), tmax)
    with torch.no_grad():
        F = net(z[0], t, labels, torch.full((6,), 2.5))
        F1 = net(z[0], t, labels, torch.ones(6))
    assert (F - F1).abs().max() > 1e-6
    want = math.cos(tmax) * SD * z[0] - math.sin(tmax) * SD * F
    assert np.abs(_npz(out).astype(int) - _uint8(want).astype(int)).max() <= 1


def test_sampling_with_raw_weights_uses_the_raw_weights(runs, capsys, tmp_path):
    """EMA and raw weights of a trained student differ; --weights picks the set asked for."""
    ckpt = runs["student"]
    diff = max(float((ckpt["net"][k].float() - ckpt["ema"][k].float()).abs().max()) for k in ckpt["net"])
    assert diff > 1e-4
    tmax = trigflow.t_max(SD)
    z, labels = per_image_draws(range(6), (1, 8, 8), 1, 10, "cpu")
    t = torch.full((6,), tmax)
    got = {}
    for w in ("ema", "raw"):
        out = tmp_path / f"{w}.npz"
        code, _, err = run(capsys, "sample", runs["root"] / "student", "-n", 6, "--steps", 1,
                           "--weights", w, "--out", out, "--device", "cpu", "--json")
        assert code == 0, err
        net = _net(ckpt, w)
        with torch.no_grad():
            want = math.cos(tmax) * SD * z[0] - math.sin(tmax) * SD * net(z[0], t, labels, torch.ones(6))
        got[w] = _npz(out).astype(int)
        assert np.abs(got[w] - _uint8(want).astype(int)).max() <= 1, w
    assert np.abs(got["ema"] - got["raw"]).max() > 1


def test_sigma_rel_to_gamma_against_the_profile_std():
    """σ_rel is the standard deviation of the power-function EMA profile p(x) = (γ+1)·x^γ on [0, 1]
    (EDM2 Sec. 3.1); measured here by numerical integration in float64."""
    x = np.linspace(0.0, 1.0, 2_000_001)
    for sigma_rel in (0.01, 0.05, 0.1, 0.2):
        gamma = sigma_rel_to_gamma(sigma_rel)
        p = (gamma + 1) * x ** gamma
        mean = np.trapezoid(x * p, x)
        std = math.sqrt(np.trapezoid((x - mean) ** 2 * p, x))
        assert std == pytest.approx(sigma_rel, rel=1e-6), sigma_rel
    assert sigma_rel_to_gamma(0.10) == pytest.approx(6.94, abs=0.01)  # EDM2's γ for σ_rel = 0.10


def test_ema_update_is_the_power_function_average():
    """After steps 1..T, the power-function EMA is Σ_i w_i θ_i with w_i = (i^(γ+1) − (i−1)^(γ+1))/T^(γ+1)
    (the product of β_j = (1 − 1/j)^(γ+1) telescopes); and the classic EMA after T steps is
    Σ_i (1−β)β^(T−i) θ_i + β^T θ_0."""
    torch.manual_seed(0)
    thetas = torch.randn(40, 3, dtype=torch.float64)
    net = torch.nn.Linear(3, 1, bias=False).double()
    ema = EMA(net, sigma_rel=0.1)
    g = ema.gamma
    for i, th in enumerate(thetas, start=1):
        net.weight.data.copy_(th[None])
        ema.update(net, i)
    T = len(thetas)
    i = np.arange(1, T + 1, dtype=np.float64)
    w = (i ** (g + 1) - (i - 1) ** (g + 1)) / T ** (g + 1)
    want = (torch.from_numpy(w)[:, None] * thetas).sum(0)
    torch.testing.assert_close(ema.net.weight.data[0], want, rtol=1e-12, atol=1e-12)

    net.weight.data.zero_()
    classic = EMA(net, sigma_rel=0.0, halflife_images=20.0, batch=4)
    beta = 0.5 ** (4 / 20.0)
    for k, th in enumerate(thetas[:10], start=1):
        net.weight.data.copy_(th[None])
        classic.update(net, k)
    want = sum((1 - beta) * beta ** (10 - k) * thetas[k - 1] for k in range(1, 11))
    torch.testing.assert_close(classic.net.weight.data[0], want, rtol=1e-12, atol=1e-12)


class _Gaussian(torch.nn.Module):
    """The exact TrigFlow networks for data N(μ, s²) per coordinate (s ≠ σ_d, so F ≠ 0). The PF-ODE
    keeps each point's standardized value ξ = (x_t − cos t·μ)/√V(t), V(t) = cos²t·s² + sin²t·σ_d²:
    consistency: f(x_t, t) = μ + s·ξ and F = (cos t·x_t − f)/(σ_d sin t) (x0 = cos t·x_t − sin t·σ_d·F);
    diffusion: σ_d·F = dx_t/dt = −sin t·μ + ξ·d√V/dt = −sin t·μ + ξ·sin t cos t (σ_d² − s²)/√V."""

    num_classes = 0

    def __init__(self, mu, s, kind="consistency"):
        super().__init__()
        self.mu, self.s, self.kind = mu, s, kind

    def f(self, x_t, t):
        t = t.reshape(-1, *([1] * (x_t.ndim - 1)))
        std = torch.sqrt(torch.cos(t) ** 2 * self.s ** 2 + torch.sin(t) ** 2 * SD ** 2)
        return self.mu + self.s * (x_t - torch.cos(t) * self.mu) / std

    def forward(self, x, t, labels=None, guidance=None):
        x_t = x * SD
        tt = t.reshape(-1, *([1] * (x.ndim - 1))).to(x.dtype)
        if self.kind == "diffusion":
            V = torch.cos(tt) ** 2 * self.s ** 2 + torch.sin(tt) ** 2 * SD ** 2
            xi = (x_t - torch.cos(tt) * self.mu) / V.sqrt()
            return (-torch.sin(tt) * self.mu + xi * torch.sin(tt) * torch.cos(tt) * (SD ** 2 - self.s ** 2) / V.sqrt()) / SD
        return (torch.cos(tt) * x_t - self.f(x_t, t)) / (SD * torch.sin(tt))


def test_refine_with_a_non_zero_exact_network():
    """refine re-noises with the per-seed noise and denoises: one step of the exact consistency
    function for N(0.3, 0.2²) data gives the closed form, keeps the distribution, and the ODE
    path (diffusion kind, Heun 40 steps) agrees with it."""
    from scmctl.sampling import refine

    mu, s = 0.3, 0.2
    net = _Gaussian(mu, s).double()
    n = 4000
    x0 = (mu + s * torch.randn(n, 1, 2, 2, generator=torch.Generator().manual_seed(5))).double()
    seeds = list(range(100, 100 + n))
    t = 0.9
    y = refine(net, "consistency", x0, seeds, [t], SD)
    noise, _ = per_image_draws(seeds, (1, 2, 2), 1, 0, "cpu")
    x_t = math.cos(t) * x0 + math.sin(t) * SD * noise[0].double()
    want = mu + s * (x_t - math.cos(t) * mu) / math.sqrt(math.cos(t) ** 2 * s ** 2 + math.sin(t) ** 2 * SD ** 2)
    torch.testing.assert_close(y, want, rtol=0, atol=1e-6)  # t enters as float32
    assert (y - x0).abs().mean() > 0.05  # not the input back
    assert float(y.mean()) == pytest.approx(mu, abs=0.01)  # 4·4000 values: std error 0.0016
    assert float(y.std()) == pytest.approx(s, rel=0.03)
    y_ode = refine(_Gaussian(mu, s, "diffusion").double(), "diffusion", x0[:64], seeds[:64], [t], SD, solver="heun", solver_steps=40)
    torch.testing.assert_close(y_ode, want[:64], rtol=0, atol=2e-3)


def test_cli_refine_matches_an_independent_renoise_denoise(runs, capsys, tmp_path):
    """`scmctl refine --t 0.7` on a trained student: image k is f(cos t·x + sin t·σ_d·z_k, t)
    computed here from the EMA weights (z_k, label_k from seed k)."""
    from scmctl.data.imageio import write_png

    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, (4, 8, 8, 1), dtype=np.uint8)
    src = tmp_path / "in"
    src.mkdir()
    for k, im in enumerate(imgs):
        write_png(src / f"{k}.png", im)
    code, _, err = run(capsys, "refine", runs["root"] / "student", src, "--t", 0.7, "--out", tmp_path / "out",
                       "--device", "cpu", "--json")
    assert code == 0, err
    from scmctl.data.imageio import read_image

    got = np.stack([read_image(tmp_path / "out" / f"{k}.png") for k in range(4)]).astype(int)
    net = _net(runs["student"], "ema")
    x = torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 127.5 - 1
    z, labels = per_image_draws(range(4), (1, 8, 8), 1, 10, "cpu")
    t = 0.7
    x_t = math.cos(t) * x + math.sin(t) * SD * z[0]
    with torch.no_grad():
        F = net(x_t / SD, torch.full((4,), t), labels, torch.ones(4))
    want = _uint8(math.cos(t) * x_t - math.sin(t) * SD * F).astype(int)
    assert np.abs(got - want).max() <= 1
    assert np.abs(got - imgs.astype(int)).max() > 10


def test_distill_targets_come_from_the_teachers_ema(runs, capsys, tmp_path):
    """Same student start (--init), teachers that differ only in their raw weights give the same
    first-step loss; a teacher whose EMA differs gives another one."""
    base = dict(runs["teacher"])
    base.pop("path", None)
    garbage_raw = dict(base, net={k: v * 0 + 0.123 for k, v in base["net"].items()})
    ema_is_raw = dict(base, ema=base["net"])
    paths = {}
    for name, ck in (("orig", base), ("garbage_raw", garbage_raw), ("ema_is_raw", ema_is_raw)):
        paths[name] = tmp_path / f"{name}.pt"
        torch.save(ck, paths[name])
    first = {}
    for name, p in paths.items():
        rd = tmp_path / f"run-{name}"
        code, _, err = run(capsys, "distill", "--teacher", p, "--init", runs["root"] / "teacher",
                           "--run-dir", rd, *COND, "--steps", 1, "--set", "loss.max_guidance=3")
        assert code == 0, err
        first[name] = json.loads((rd / "stats.jsonl").read_text().splitlines()[0])["loss"]
    assert first["garbage_raw"] == first["orig"]
    assert abs(first["ema_is_raw"] - first["orig"]) > 1e-6 * abs(first["orig"])


def test_config_yaml_of_the_conditional_runs(runs):
    t = yaml.safe_load((runs["root"] / "teacher" / "config.yaml").read_text())
    assert t["network"]["num_classes"] == 10 and t["network"]["label_dropout"] == 0.25
    assert t["network"]["guidance_input"] is False
