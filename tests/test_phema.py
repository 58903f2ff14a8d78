"""Post-hoc EMA (EDM2 App. C): the profile algebra against numerical integration and brute-force
EMAs, the least-squares solve, and the reconstruction of an EMA that was never stored."""

from __future__ import annotations

import json

import numpy as np
import pytest
import scipy.integrate
import torch

from _cli import assert_one_line_error, run as run_cli
from test_cli import assert_bad_input  # training prints its setup line before a resume error
from scmctl.training import phema
from scmctl.training.ema import EMA, sigma_rel_to_gamma


class Vector(torch.nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(d, dtype=torch.float64))


def continuous_profile(t, gamma):
    return lambda tau: (gamma + 1) * tau ** gamma / t ** (gamma + 1) if 0 <= tau <= t else 0.0


@pytest.mark.parametrize("ta,sa,tb,sb", [(300, 0.05, 300, 0.05), (200, 0.05, 500, 0.10),
                                         (700, 0.10, 250, 0.03), (1000, 0.2, 999, 0.15)])
def test_profile_inner_product_matches_numerical_integration(ta, sa, tb, sb):
    ga, gb = sigma_rel_to_gamma(sa), sigma_rel_to_gamma(sb)
    pa, pb = continuous_profile(ta, ga), continuous_profile(tb, gb)
    ref, _ = scipy.integrate.quad(lambda x: pa(x) * pb(x), 0, min(ta, tb), epsabs=0, epsrel=1e-12, limit=200)
    assert phema.profile_inner_product(ta, ga, tb, gb) == pytest.approx(ref, rel=1e-9)
    assert phema.profile_inner_product(tb, gb, ta, ga) == pytest.approx(ref, rel=1e-9)


@pytest.mark.parametrize("sigma_rel", [0.01, 0.05, 0.1, 0.2, phema.MAX_SIGMA_REL])
def test_sigma_rel_is_the_relative_std_of_the_profile(sigma_rel):
    """σ_rel = the profile's std relative to its length t (here t = 1; EDM2 Sec. 3.1)."""
    gamma = sigma_rel_to_gamma(sigma_rel)
    assert phema.gamma_to_sigma_rel(gamma) == pytest.approx(sigma_rel, rel=1e-12)
    p = continuous_profile(1.0, gamma)
    mean = scipy.integrate.quad(lambda x: x * p(x), 0, 1, epsrel=1e-12)[0]
    var = scipy.integrate.quad(lambda x: (x - mean) ** 2 * p(x), 0, 1, epsrel=1e-12)[0]
    assert np.sqrt(var) == pytest.approx(sigma_rel, rel=1e-8)


def test_discrete_profile_is_what_the_ema_class_computes():
    """Brute force: θ_i = e_i (one-hot), so the EMA after t steps is its weight vector w."""
    t = 60
    for sigma_rel in (0.05, 0.1, 0.25):
        net = Vector(t)
        ema = EMA(net, sigma_rel)
        for i in range(1, t + 1):
            with torch.no_grad():
                net.w.zero_()
                net.w[i - 1] = 1.0
            ema.update(net, i)
        w = phema.discrete_profile(t, sigma_rel_to_gamma(sigma_rel))
        np.testing.assert_allclose(ema.net.w.numpy(), w, rtol=1e-12, atol=1e-15)
        assert w.sum() == pytest.approx(1.0, abs=1e-12)
        # the mass of the continuous profile on (i-1, i]
        p = continuous_profile(t, sigma_rel_to_gamma(sigma_rel))
        for i in (1, t // 2, t):
            assert w[i - 1] == pytest.approx(scipy.integrate.quad(p, i - 1, i, epsabs=0, epsrel=1e-12, limit=200)[0], rel=1e-7)


def test_solve_reproduces_a_stored_profile_exactly():
    steps = [s for s in range(100, 1001, 100) for _ in (0, 1)]
    gammas = [sigma_rel_to_gamma(s) for _ in range(10) for s in (0.05, 0.10)]
    for k in (0, 7, 19):
        c = phema.solve_coefficients(steps, gammas, steps[k], gammas[k])
        expected = np.eye(len(steps))[k]
        np.testing.assert_allclose(c, expected, atol=1e-7)
        assert phema.profile_error(steps, gammas, c, steps[k], gammas[k]) < 1e-6
    # an unstored target: coefficients sum to 1 and beat the best single stored profile
    g = sigma_rel_to_gamma(0.07)
    c = phema.solve_coefficients(steps, gammas, 1000, g)
    assert c.sum() == pytest.approx(1.0)
    best_single = min(phema.profile_error(steps, gammas, np.eye(len(steps))[k], 1000, g) for k in range(len(steps)))
    assert phema.profile_error(steps, gammas, c, 1000, g) < 0.1 * best_single


def test_reconstruction_of_an_untracked_ema_from_snapshot_files(tmp_path):
    """A random-walk 'training run' of T steps tracks σ_rel 0.05 and 0.10 (snapshots every 50 steps)
    and, directly, the target 0.07. Post-hoc EMA from the files matches the directly tracked EMA
    (relative error measured 4.0e-5, vs 4.9e-2 for the nearest stored profile; asserted < 1e-3,
    a 25x margin, and < 1/10 of the nearest stored profile's)."""
    T, every, d = 1000, 50, 4000
    torch.manual_seed(0)
    net = Vector(d)
    tracked = phema.PowerEMAs(net, [0.05, 0.10])
    target = EMA(net, 0.07)
    velocity = torch.zeros(d, dtype=torch.float64)
    for step in range(1, T + 1):
        with torch.no_grad():  # a drifting, noisy trajectory, like weights under Adam
            velocity.mul_(0.9).add_(torch.randn(d, dtype=torch.float64), alpha=0.1)
            net.w.add_(velocity + 0.3 * torch.randn(d, dtype=torch.float64), alpha=0.01)
        tracked.update(net, step)
        target.update(net, step)
        if phema.snapshot_due(step, 1, every):
            phema.save_snapshots(tmp_path, step, step / 1000, "consistency", {}, tracked.sigma_rels,
                                 [e.state_dict() for e in tracked.emas])
    assert len(phema.snapshots(tmp_path)) == 2 * T // every
    (rec,) = phema.reconstruct(tmp_path, [0.07])
    assert rec.step == T
    direct = target.net.w.detach()
    err = float((rec.state["w"] - direct).norm() / direct.norm())
    nearest = min(float((e.net.w - direct).norm() / direct.norm()) for e in tracked.emas)
    assert err < 1e-3 and err < 0.1 * nearest
    # the solve is exact for a stored profile: σ_rel 0.10 at step 600 is the snapshot itself
    (same,) = phema.reconstruct(tmp_path, [0.10], at=600)
    stored = torch.load(phema.snapshot_path(tmp_path, 600, 0.10), weights_only=True)["ema"]["w"]
    torch.testing.assert_close(same.state["w"], stored, rtol=1e-9, atol=1e-12)


# ------------------------------------------------------------------ through training and the CLI

def test_posthoc_ema_of_a_training_run_matches_the_directly_tracked_ema(tiny_run, tmp_path, capsys):
    """The run tracked σ_rel 0.07 itself (its "current EMA") and stored only 0.05 and 0.10.
    `scmctl ema --sigma-rel 0.07` from the 32 snapshots matches the tracked one: measured
    ‖recon − direct‖ = 3.3e-3 = 9.7e-4 × ‖EMA_0.05 − direct‖ (and 7e-6 × ‖direct‖); asserted
    < 0.02 × ‖EMA_0.05 − direct‖ (a 20x margin). (With snapshots every 20 steps: 1.5e-2, every 40:
    0.13; at step 240 with every 20: 3.4e-3.) A stored profile comes back exactly; the output is a
    checkpoint `sample` loads."""
    run_dir = tiny_run
    snaps = phema.snapshots(run_dir)
    assert [(s.step, s.sigma_rel) for s in snaps[:2]] == [(10, 0.05), (10, 0.1)] and len(snaps) == 32
    code, out, err = run_cli(capsys, "ema", run_dir, "--sigma-rel", "0.07", "--out", tmp_path / "e.pt", "--json")
    assert code == 0, err
    info = json.loads(out)
    assert info["step"] == 160 and info["outputs"][0]["snapshots"] == 32
    ckpt = torch.load(run_dir / "checkpoint-0000160.pt", weights_only=True)
    recon = torch.load(tmp_path / "e.pt", weights_only=True)
    assert "net" not in recon and recon["posthoc_ema"]["sigma_rel"] == 0.07
    direct, ema05 = ckpt["ema"], ckpt["phema"]["emas"][0]
    keys = [k for k, v in direct.items() if v.is_floating_point() and not torch.equal(v, ema05[k])]

    def dist(a, b):
        return float(torch.sqrt(sum(((a[k].double() - b[k].double()) ** 2).sum() for k in keys)))

    rel = dist(recon["ema"], direct) / dist(ema05, direct)
    assert rel < 0.02, (dist(recon["ema"], direct), dist(ema05, direct))
    # a stored profile (σ_rel 0.10 at step 160) is reproduced: the checkpoint's tracked 0.10 EMA
    code, out, err = run_cli(capsys, "ema", run_dir, "--sigma-rel", "0.1,0.05", "--at", 160, "--out", tmp_path / "o",
                             "--json")
    assert code == 0, err
    outs = json.loads(out)["outputs"]
    same = torch.load(outs[0]["out"], weights_only=True)["ema"]
    assert dist(same, ckpt["phema"]["emas"][1]) < 1e-6 * dist(ema05, direct) + 1e-12
    # every command loads it; it has no raw weights
    code, out, err = run_cli(capsys, "sample", tmp_path / "e.pt", "-n", 2, "--steps", 1, "--out", tmp_path / "s",
                             "--json")
    assert code == 0, err
    code, _, err = run_cli(capsys, "sample", tmp_path / "e.pt", "-n", 2, "--weights", "raw", "--out", tmp_path / "r")
    assert_one_line_error(code, err, "EMA weights only")


def test_ema_command_bad_input(tiny_run, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    for args, needle in [((empty, "--sigma-rel", "0.05"), "no post-hoc EMA snapshots"),
                         ((tiny_run, "--sigma-rel", "0.05,x"), "expected numbers"),
                         ((tiny_run, "--sigma-rel", "0.5"), "must be in (0, 0.2887]"),
                         ((tiny_run, "--sigma-rel", "0.05,0.06", "--out", tmp_path / "a.pt"), "give a folder"),
                         ((tiny_run, "--sigma-rel", "0.05", "--at", 5), "first snapshot"),
                         ((tiny_run, "--sigma-rel", "0.05", "--at", 170), "last snapshot"),
                         ((tmp_path / "nope", "--sigma-rel", "0.05"), "not a run directory")]:
        code, _, err = run_cli(capsys, "ema", *args)
        assert_one_line_error(code, err, needle)


def test_resume_changes_to_the_tracked_profiles(tmp_path, capsys):
    """A checkpoint without profiles (tracking off, or an older scmctl) resumes only with tracking
    off; tracking may stop on resume; another list than the checkpoint's is refused with the fix."""
    small = ["train", "--preset", "tiny", "--batch", "4", "--set", "data.resolution=8",
             "--set", "network.model_channels=8", "--set", "network.attn_resolutions=[]",
             "--set", "train.grid_every=0", "--set", "train.checkpoint_every=1", "--run-dir", tmp_path / "r"]
    assert run_cli(capsys, *small, "--steps", 1, "--set", "train.phema_sigma_rels=[]")[0] == 0
    code, _, err = run_cli(capsys, *small, "--steps", 2)
    assert_bad_input(code, err, "no post-hoc EMA profiles", "train.phema_sigma_rels=[]")
    assert run_cli(capsys, *small, "--steps", 2, "--set", "train.phema_sigma_rels=[]")[0] == 0
    other = ["--run-dir", tmp_path / "s"]
    assert run_cli(capsys, *small, *other, "--steps", 1)[0] == 0
    assert sorted(p.name for p in (tmp_path / "s" / "phema").iterdir()) == ["phema-0000001-0.0500.pt",
                                                                         "phema-0000001-0.1000.pt"]
    code, _, err = run_cli(capsys, *small, *other, "--steps", 2, "--set", "train.phema_sigma_rels=[0.05]")
    assert_bad_input(code, err, "σ_rel [0.05, 0.1]", "train.phema_sigma_rels=[0.05,0.1]")
    assert run_cli(capsys, *small, *other, "--steps", 2, "--set", "train.phema_sigma_rels=[]")[0] == 0
    assert "phema" not in torch.load(tmp_path / "s" / "checkpoint-0000002.pt", weights_only=True)
