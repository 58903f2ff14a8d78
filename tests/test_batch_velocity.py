"""The batch (stable target field) sCT velocity against closed forms: Gaussian data, where the
marginal velocity E[cos t·z − sin t·x0 | x_t] is linear in x_t; the collapse onto the own pair at
small t; class-restricted averages; and the variance it removes at large t."""

import math

import pytest
import torch

from scmctl import config as config_mod
from scmctl import trigflow
from scmctl.batch_velocity import References, batch_velocity
from scmctl.errors import UsageError

SD = 0.5


def _gaussian_marginal_velocity(x_t, t, s_data):
    """x0 ~ N(0, s² I), z ~ N(0, σ_d² I): E[x0 | x_t] = c s²/(c² s² + s_t² σ_d²)·x_t, and the
    velocity is (c·x_t − E[x0 | x_t])/s_t."""
    c, s = math.cos(t), math.sin(t)
    return (c - c * s_data**2 / (c * c * s_data**2 + s * s * SD**2)) * x_t / s


@pytest.mark.parametrize("t", [0.3, 0.8, 1.2, 1.5])
def test_large_reference_gives_the_gaussian_marginal_velocity(t):
    g = torch.Generator().manual_seed(0)
    s_data, d, n, R = 0.7, 2, 8, 400_000
    ref = torch.randn(R, d, generator=g, dtype=torch.float64) * s_data
    x0 = ref[:n]
    z = torch.randn(n, d, generator=g, dtype=torch.float64) * SD
    tt = torch.full((n,), t, dtype=torch.float64)
    x_t = trigflow.add_noise(x0, z, tt)
    v = batch_velocity(x_t, tt, x0, z, SD, references=References(ref[n:]))
    exact = _gaussian_marginal_velocity(x_t, t, s_data)
    cond = trigflow.velocity(x0, z, tt)
    err, err_cond = (v - exact).norm() / exact.norm(), (cond - exact).norm() / exact.norm()
    # observed (R = 400k, this seed): 0.038 / 0.007 / 0.006 / 0.015 at t = 0.3 / 0.8 / 1.2 / 1.5,
    # shrinking as 1/√R (0.074 at R = 100k, 0.013 at 1.6M at t = 0.3); the own pair's: 1.6–4.4
    assert err < 0.06, (float(err), float(err_cond))
    assert err < 0.05 * err_cond


def test_small_t_is_the_conditional_velocity():
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(32, 3, 4, 4, generator=g) * SD
    z = torch.randn(32, 3, 4, 4, generator=g) * SD
    t = torch.full((32,), 1e-3)
    x_t = trigflow.add_noise(x0, z, t)
    v = batch_velocity(x_t, t, x0, z, SD)
    assert v.dtype == x_t.dtype and v.shape == x0.shape
    assert torch.equal(v, trigflow.velocity(x0, z, t))  # the weights collapse exactly onto the own pair


def test_labels_restrict_the_average_to_the_class():
    # two classes at ±3, t = π/2 − 1e-4: the weights are uniform over whom each sample may use
    g = torch.Generator().manual_seed(2)
    n, d = 40, 8
    cls = torch.arange(n) % 2
    x0 = (cls[:, None].double() * 6 - 3) + 0.05 * torch.randn(n, d, generator=g, dtype=torch.float64)
    labels = torch.nn.functional.one_hot(cls, 2).double()
    labels[:4] = 0  # dropped labels (guidance training): average over everyone
    z = torch.randn(n, d, generator=g, dtype=torch.float64) * SD
    tm = math.pi / 2 - 1e-4
    t = torch.full((n,), tm, dtype=torch.float64)
    x_t = trigflow.add_noise(x0, z, t)
    v = batch_velocity(x_t, t, x0, z, SD, labels=labels)
    x0_hat = math.cos(tm) * x_t - math.sin(tm) * v  # = the weighted mean of the references
    for i in range(n):
        # unlabelled: everyone; labelled: the rows with the same (not dropped) label
        pool = x0 if i < 4 else x0[labels[:, cls[i]] == 1]
        assert torch.allclose(x0_hat[i], pool.mean(0), atol=0.02), i


def test_extra_references_join_the_average_by_class_and_augmentation():
    """References beside the batch: unlabelled they join the posterior over the pool; with labels only
    the sample's class counts (a dropped label: all); with augment labels only references that
    went through the same transformation."""
    g = torch.Generator().manual_seed(4)
    n, r, d = 6, 30, 5
    x0 = torch.randn(n, d, generator=g, dtype=torch.float64)
    extra = torch.randn(r, d, generator=g, dtype=torch.float64) * 3
    z = torch.randn(n, d, generator=g, dtype=torch.float64) * SD
    t = torch.full((n,), 1.4, dtype=torch.float64)
    x_t = trigflow.add_noise(x0, z, t)

    def posterior_mean(pool, xt, tt):  # brute force, one sample at a time
        logp = -((xt - math.cos(tt) * pool) ** 2).sum(1) / (2 * SD**2 * math.sin(tt) ** 2)
        return (torch.softmax(logp, 0)[:, None] * pool).sum(0)

    v = batch_velocity(x_t, t, x0, z, SD, references=References(extra))
    x0_hat = math.cos(1.4) * x_t - math.sin(1.4) * v
    for i in range(n):
        assert torch.allclose(x0_hat[i], posterior_mean(torch.cat([x0, extra]), x_t[i], 1.4), atol=1e-10), i
    with pytest.raises(ValueError, match="references of shape"):
        batch_velocity(x_t, t, x0, z, SD, references=References(extra[:, :3]))

    cls, ref_cls = torch.arange(n) % 3, torch.arange(r) % 3
    labels = torch.nn.functional.one_hot(cls, 3).double()
    labels[0] = 0  # dropped for guidance: every reference
    aug, ref_aug = torch.zeros(n, 2), torch.zeros(r, 2)
    aug[1, 0], ref_aug[::2, 0] = 1.0, 1.0  # sample 1 and every other reference flipped
    refs = References(extra, torch.nn.functional.one_hot(ref_cls, 3).double(), ref_aug)
    v = batch_velocity(x_t, t, x0, z, SD, labels=labels, augment_labels=aug, references=refs)
    x0_hat = math.cos(1.4) * x_t - math.sin(1.4) * v
    all_x0, all_lab = torch.cat([x0, extra]), torch.cat([labels, refs.labels])
    all_aug = torch.cat([aug, ref_aug])
    for i in range(n):
        ok = (all_aug == aug[i]).all(1)
        if labels[i].any():
            ok &= all_lab[:, cls[i]] == 1
        assert ok[i]
        assert torch.allclose(x0_hat[i], posterior_mean(all_x0[ok], x_t[i], 1.4), atol=1e-10), i
    with pytest.raises(ValueError, match="references need labels"):
        batch_velocity(x_t, t, x0, z, SD, labels=labels, references=References(extra))


def test_a_larger_reference_set_moves_the_estimate_towards_the_marginal():
    """Gaussian data at t = 1.1, a batch of 64: 64 → 1024 references cut the mean squared error
    against the marginal velocity several-fold (Xu et al.'s reason for a reference batch larger
    than the training batch)."""
    g = torch.Generator().manual_seed(5)
    s_data, d, n = 0.5, 16, 64
    se = {0: 0.0, 960: 0.0}
    for _ in range(10):
        x0 = torch.randn(n, d, generator=g, dtype=torch.float64) * s_data
        extra = torch.randn(960, d, generator=g, dtype=torch.float64) * s_data
        z = torch.randn(n, d, generator=g, dtype=torch.float64) * SD
        t = torch.full((n,), 1.1, dtype=torch.float64)
        x_t = trigflow.add_noise(x0, z, t)
        exact = _gaussian_marginal_velocity(x_t, 1.1, s_data)
        se[0] += float((batch_velocity(x_t, t, x0, z, SD) - exact).square().sum())
        se[960] += float((batch_velocity(x_t, t, x0, z, SD, references=References(extra)) - exact).square().sum())
    assert se[960] < 0.3 * se[0], se


def test_variance_at_large_t_is_a_fraction_of_the_conditional():
    """Redraws of a 64-sample batch of Gaussian data at t = 1.3: the batch estimate's mean squared
    error against the marginal velocity is < 0.1× the conditional velocity's."""
    g = torch.Generator().manual_seed(3)
    s_data, d, n = 0.5, 16, 64
    se_batch = se_cond = 0.0
    for _ in range(20):
        x0 = torch.randn(n, d, generator=g, dtype=torch.float64) * s_data
        z = torch.randn(n, d, generator=g, dtype=torch.float64) * SD
        t = torch.full((n,), 1.3, dtype=torch.float64)
        x_t = trigflow.add_noise(x0, z, t)
        exact = _gaussian_marginal_velocity(x_t, 1.3, s_data)
        se_batch += float((batch_velocity(x_t, t, x0, z, SD) - exact).square().sum())
        se_cond += float((trigflow.velocity(x0, z, t) - exact).square().sum())
    assert se_batch < 0.1 * se_cond, (se_batch, se_cond)


@pytest.mark.parametrize("method", ["scd", "diffusion"])
def test_batch_velocity_is_for_sct_only(method):
    with pytest.raises(UsageError, match="sct_velocity=batch applies to sCT"):
        config_mod.resolve(method=method, preset="tiny", overrides=["loss.sct_velocity=batch"])


def test_references_without_the_batch_velocity_are_unused_and_said_so():
    """The conditional velocity averages nothing: the run records loss.sct_references 0 and says so
    (the tiny preset's sct_init asks for references; a user may pick the conditional velocity)."""
    from scmctl.data.datasets import load_dataset
    from scmctl.training.run_config import resolve_for_run

    digits = load_dataset("digits", 8)
    for method, init, velocity, used in [("sct", "t.pt", "batch", True), ("sct", "t.pt", "conditional", False),
                                         ("sct", None, "conditional", False), ("scd", None, "conditional", False)]:
        cfg = config_mod.resolve(method=method, preset="tiny", init=init, overrides=[
            "data.resolution=8", "loss.sct_references=100", f"loss.sct_velocity={velocity}"])
        ran, notes = resolve_for_run(cfg, dataset=digits)
        assert ran.loss.sct_references == (100 if used else 0), (method, init, velocity)
        assert any("loss.sct_references=100 unused" in n for n in notes) != used
    with pytest.raises(UsageError, match="'loss.sct_references' must be >= 0"):
        config_mod.resolve(method="sct", preset="tiny", init="t.pt", overrides=["loss.sct_references=-1"])


def test_micro_batches_draw_the_references_reproducibly():
    """loss.sct_references examples per micro-batch, distinct, from the step's seed (a resumed run
    draws the same), capped at the dataset; with 0 the micro-batches are bit-identical to a run
    without the option (the references are drawn after the batch's own examples)."""
    from scmctl.data.datasets import load_dataset
    from scmctl.training.batches import micro_batches
    from scmctl.training.parallel import batch_layout

    digits = load_dataset("digits", 8)
    cfg = config_mod.resolve(method="sct", preset="tiny", init="t.pt",
                             overrides=["data.resolution=8", "train.batch=16", "loss.sct_references=40"])
    layout = batch_layout(16, 8, 1)
    cpu = torch.device("cpu")
    first = list(micro_batches(cfg, digits, layout, 0, 7, cpu))
    again = list(micro_batches(cfg, digits, layout, 0, 7, cpu))
    assert len(first) == 2
    for (x0, _, _, refs), (x0b, _, _, refs_b) in zip(first, again):
        assert refs.x0.shape == (40, 1, 8, 8) and torch.equal(refs.x0, refs_b.x0) and torch.equal(x0, x0b)
        assert torch.unique(refs.x0.flatten(1), dim=0).shape[0] == 40
    assert not torch.equal(first[0][3].x0, first[1][3].x0)
    cfg.loss.sct_references = 5000
    assert next(micro_batches(cfg, digits, layout, 0, 7, cpu))[3].x0.shape[0] == len(digits)
    cfg.loss.sct_references = 0
    plain = list(micro_batches(cfg, digits, layout, 0, 7, cpu))
    assert all(m[3] is None for m in plain) and torch.equal(plain[0][0], first[0][0])


def test_discrete_time_sct_runs_the_conditional_velocity_and_says_so():
    """The tiny preset's sCT from a teacher asks for the batch velocity; discrete-time sCT takes each
    pair's exact x_t' instead, so the run's config records conditional and the user is told."""
    from scmctl.data.datasets import load_dataset
    from scmctl.training.run_config import resolve_for_run

    cfg = config_mod.resolve(method="sct", preset="tiny", overrides=["loss.discrete_steps=64"], init="t.pt")
    assert cfg.loss.sct_velocity == "batch"
    digits = load_dataset("digits", 16)
    ran, notes = resolve_for_run(cfg, dataset=digits)
    assert ran.loss.sct_velocity == "conditional"
    assert any("loss.sct_velocity=batch runs as conditional" in n for n in notes)
    cfg = config_mod.resolve(method="sct", preset="tiny", init="t.pt",
                             overrides=["loss.discrete_steps=64", "loss.sct_references=32"])
    ran, notes = resolve_for_run(cfg, dataset=digits)
    assert ran.loss.sct_references == 0 and any("loss.sct_references=32 unused" in n for n in notes)
    continuous, notes = resolve_for_run(config_mod.resolve(method="sct", preset="tiny", init="t.pt"),
                                        dataset=digits)
    assert continuous.loss.sct_velocity == "batch" and not any("sct_velocity" in n for n in notes)


def test_the_default_is_algorithm_1():
    """The schema's default, the paper presets and the tiny preset's sCT from scratch: the
    conditional velocity; the tiny preset's sCT from a teacher (sct_init): batch."""
    assert config_mod.LossConfig().sct_velocity == "conditional"
    for preset in ("cifar10", "imagenet64", "imagenet512"):
        assert config_mod.resolve(method="sct", preset=preset).loss.sct_velocity == "conditional"
    assert config_mod.resolve(method="sct", preset="tiny").loss.sct_velocity == "conditional"
    assert config_mod.resolve(method="sct", preset="tiny", init="t.pt").loss.sct_velocity == "batch"
    with pytest.raises(UsageError, match="must be one of conditional, batch"):
        config_mod.resolve(method="sct", preset="tiny", overrides=["loss.sct_velocity=stf"])
