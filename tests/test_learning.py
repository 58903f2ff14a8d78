"""Real learning on 2-D toy data: sCT and sCD reach a stated sliced-Wasserstein distance to the data
in a bounded number of steps, with 1-step and 2-step sampling.

Distances are sliced Wasserstein-1 (256 fixed random directions, 4000 samples). For reference: the
untrained model is at ≈0.45 and two independent draws of the data at ≈0.005 (ring) / 0.014 (grid).

2-step vs 1-step: on these 2-D toys the 2-step samples were NOT reliably better than the 1-step
ones in any setting tried (t_mid 0.1-1.1, MLP widths 128/256, 2000-4000 steps, time-embedding
scales 1-10); the sign of the difference changed with the seed. The toy tests therefore assert
that both reach the target, and the ordering is tested on images (the built-in digits), where
2-step sampling pays off once the model is trained long enough (at 500-600 steps it was a tie).
The digits tests train through the CLI at 8x8 and score the pixel-space Fréchet distance: sCT from
scratch, and sCT from a diffusion teacher's EMA (issue 10's setting; the full-size measurement is
benchmarks/digits_fd.py).
"""

import copy
import functools
import math

import pytest
import torch

from scmctl import losses, losses_vsd, sampling, segments
from scmctl.config import LossConfig
from scmctl.nn.layers import TimeEmbedding
from scmctl.nn.toy import ToyMLP

SD = 0.5


def ring(n, g=None):
    """8 Gaussians (std 0.04) on a circle of radius 0.7: per-coordinate std ≈ σ_d = 0.5."""
    k = torch.randint(8, (n,), generator=g)
    ang = k.float() * 2 * math.pi / 8
    return torch.stack([ang.cos(), ang.sin()], 1) * 0.7 + 0.04 * torch.randn(n, 2, generator=g)


def grid(n, g=None):
    """25 Gaussians (std 0.03) on a 5x5 grid in [-0.75, 0.75]²."""
    c = torch.cartesian_prod(*(torch.linspace(-0.75, 0.75, 5),) * 2)
    k = torch.randint(len(c), (n,), generator=g)
    return c[k] + 0.03 * torch.randn(n, 2, generator=g)


def swd(a, b, nproj=256):
    d = torch.randn(2, nproj, generator=torch.Generator().manual_seed(0))
    d = d / d.norm(dim=0)
    return ((a @ d).sort(0)[0] - (b @ d).sort(0)[0]).abs().mean().item()


def train(method, data, steps, teacher=None, hidden=128, depth=3, lr=3e-3, batch=512, from_teacher=False, seed=0,
          **loss):
    """The same Algorithm-1 loss the CLI trains with, on a small MLP; EMA weights returned.
    `loss`: more LossConfig fields of the consistency loss (e.g. segments=4). vsd_weight > 0 (sCD): + adaptive VSD with a fake score model copied from the teacher and a
    weighting head w_ψ, each with its own Adam at the same learning rate (as the CLI's loop).
    from_teacher: the student (and its EMA) start from the teacher's weights, as in `scmctl distill`;
    seed: the torch seed of the run (initialization and all draws)."""
    vsd_weight = loss.get("vsd_weight", 0.0)
    torch.manual_seed(seed)
    net = ToyMLP(hidden=hidden, depth=depth)
    if from_teacher:
        net.load_state_dict(teacher.state_dict())
    ema = copy.deepcopy(net)
    params = [list(net.parameters())]
    cm = LossConfig(P_mean=-1.0, P_std=1.4, tangent_warmup_steps=500, **loss)
    dm = LossConfig(P_mean=-0.8, P_std=1.6, adaptive_weighting=False)
    if vsd_weight > 0:
        fake = copy.deepcopy(teacher).train().requires_grad_(True)
        head = torch.nn.Sequential(TimeEmbedding(32), torch.nn.Linear(32, 1))
        params += [list(fake.parameters()), list(head.parameters())]
    opts = [torch.optim.Adam(p, lr=lr, betas=(0.9, 0.99)) for p in params]
    for step in range(steps):
        for opt in opts:
            for g in opt.param_groups:
                g["lr"] = lr / math.sqrt(max(step / 500, 1))
        x0 = data(batch)
        if method == "diffusion":
            out = losses.diffusion_loss(net, x0, None, dm, SD)
        else:
            out = losses.consistency_loss(net, x0, None, cm, SD, step, teacher=teacher)
        if vsd_weight > 0:
            out = losses_vsd.with_vsd(out, net, teacher, fake, fake, lambda t: head(t).reshape(-1),
                                      tuple(x0.shape), None, cm, SD, x0.device)
        for opt in opts:
            opt.zero_grad()
        out.loss.backward()
        if out.then is not None:
            out.then().loss.backward()
        for opt in opts:
            opt.step()
        with torch.no_grad():
            for pe, p in zip(ema.parameters(), net.parameters()):
                pe.lerp_(p, 0.005)
    return ema.eval()


def quality(net, kind, data, steps, t_mid=1.1):
    x, _, _ = sampling.generate(net, kind, list(range(4000)), (2,), SD, steps, t_mid)
    return swd(x, data(4000, torch.Generator().manual_seed(1)))


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # deterministic reductions whatever the machine
    yield
    torch.set_num_threads(n)


def test_sct_learns_from_scratch():
    untrained = quality(ToyMLP(hidden=256, depth=4).eval(), "consistency", ring, 1)
    net = train("sct", ring, 3000, hidden=256, depth=4)
    one, two = quality(net, "consistency", ring, 1), quality(net, "consistency", ring, 2)
    print(f"sCT ring: untrained {untrained:.4f}, 1-step {one:.4f}, 2-step {two:.4f}")
    assert untrained > 0.3
    assert one < 0.04 and two < 0.04


@pytest.fixture(scope="module")
def grid_teacher():
    """The diffusion teacher on the grid (2000 steps), shared by the sCD tests; one thread."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return train("diffusion", grid, 2000)
    finally:
        torch.set_num_threads(n)


def test_scd_from_a_trained_teacher(grid_teacher):
    teacher = grid_teacher
    t18 = quality(teacher, "diffusion", grid, 18)
    student = train("scd", grid, 2000, teacher=teacher)
    one, two = quality(student, "consistency", grid, 1), quality(student, "consistency", grid, 2)
    print(f"teacher (DPM-Solver-2S, 18 steps) {t18:.4f}; sCD 1-step {one:.4f}, 2-step {two:.4f}")
    assert t18 < 0.035
    assert one < 0.05 and two < 0.05
    untrained_student = quality(ToyMLP().eval(), "consistency", grid, 1)
    assert untrained_student > 0.3


def test_multistep_scd_four_steps_beat_one(grid_teacher):
    """Multistep sCD (Heek et al. 2024) with M = 4 segments on the default boundaries (uniform in t:
    0, 0.391, 0.782, 1.173, t_max): sampled along all 4 boundaries it reaches the teacher's
    quality; its 1-step sample (one DDIM jump t_max → 0 with the top segment's F) does not."""
    student = train("scd", grid, 1000, teacher=grid_teacher, segments=4)
    bounds = segments.default_boundaries(4, SD)
    ref = grid(4000, torch.Generator().manual_seed(1))
    swd_of = {k: swd(sampling.generate(student, "consistency", list(range(4000)), (2,), SD, k,
                                       boundaries=bounds)[0], ref) for k in (1, 2, 4)}
    print(f"multistep sCD (M = 4, 1000 steps) on the grid: 1-step {swd_of[1]:.4f}, 2-step {swd_of[2]:.4f}, "
          f"4-step {swd_of[4]:.4f}")
    # Observed (this machine, one thread; deterministic): 1-step 0.3479, 2-step 0.1025, 4-step 0.0240
    # (the teacher: 0.0245). Margins: 4-step under 0.05 (the sCD test's target; 2.1x the observed),
    # 4-step under half the 1-step value (observed 0.069x), and 2 steps between the two (observed
    # 0.29x of 1-step). With loss.segment_spacing=edm: 0.3551 / 0.1310 / 0.0340.
    assert swd_of[4] < 0.05
    assert swd_of[4] < 0.5 * swd_of[1]
    assert swd_of[4] < swd_of[2] < swd_of[1]


def test_scd_with_adaptive_vsd_from_the_teacher_is_not_worse_than_scd(grid_teacher):
    """The user's setting: `scmctl distill` starts the student at the teacher's weights. sCD + aVSD
    with the README's λ_VSD = 0.5 and the default residual normalization (loss.vsd_norm = l2)
    against sCD alone, same teacher, seed and 1000 steps: the 1-step samples' distance to the grid.
    The plain formulation (vsd_norm = none) runs away in this setting (λ 0.1: e^{w_ψ} climbs to ≈300
    while F_pre − F_φ ≈ 0, and sCD's own loss spike near step 800 then sets off a feedback loop);
    the normalized one does not. Other seeds: scmctl/losses_vsd.py's docstring."""
    teacher = grid_teacher

    def swd1(**kw):
        return quality(train("scd", grid, 1000, teacher=teacher, from_teacher=True, **kw), "consistency", grid, 1)

    scd, avsd, plain = swd1(), swd1(vsd_weight=0.5), swd1(vsd_weight=0.1, vsd_norm="none")
    print(f"grid 1-step SWD after 1000 steps from the teacher's weights: sCD {scd:.4f}, "
          f"sCD + aVSD (λ 0.5, l2) {avsd:.4f}, plain aVSD (λ 0.1, none) {plain:.4f}")
    # Observed (1 thread, deterministic): sCD 0.0494, aVSD 0.0336 (0.68x), plain 2.26. Margins: aVSD
    # within 1.1x of sCD and under 0.045 (1.34x the observed); the plain run above 1 (an untrained
    # student is at ≈0.45), so the test tells the two formulations apart.
    assert avsd < 1.1 * scd and avsd < 0.045
    assert plain > 1.0


# The built-in digits at 8x8 with a small U-Net, trained through the CLI (the commands users run).
SMALL_DIGITS = ["--batch", "64", "--set", "data.resolution=8", "--set", "network.model_channels=16",
                "--set", "network.attn_resolutions=[4]", "--set", "network.head_channels=16",
                "--set", "train.grid_every=0", "--set", "train.lr_ref_steps=500",
                "--set", "loss.tangent_warmup_steps=500"]


def cli_run(run, command: list[str], steps: int):
    """`scmctl COMMAND --run-dir RUN --steps STEPS` on the small digits; returns RUN."""
    from scmctl.cli import main

    main([*command, "--run-dir", str(run), "--steps", str(steps),
          "--set", f"train.checkpoint_every={steps}", *SMALL_DIGITS])
    return run


@functools.cache
def digits_ref_stats():
    """Mean and covariance of the 1797 training digits at 8x8 in [-1, 1] (64-d, float64)."""
    import numpy as np

    from scmctl.data.datasets import load_dataset

    ref = load_dataset("digits", 8).images.flatten(1).double().numpy() / 127.5 - 1
    return ref.mean(0), np.cov(ref, rowvar=False)


def digits_fd(model, kind: str, steps: int) -> float:
    """Fréchet distance of 2000 samples (seeds 0..1999, quantized to 8 bits) to the 1797 training
    digits in pixel space (64-d, float64). Consistency models: t_mid 1.1; teachers: DPM-Solver-2S."""
    import numpy as np

    from scmctl.metrics.fid import frechet_distance

    x, _, _ = sampling.generate(model, kind, list(range(2000)), (1, 8, 8), SD, steps, 1.1)
    x = ((x.clamp(-1, 1) * 127.5 + 127.5).round() / 127.5 - 1).flatten(1).double().numpy()
    return frechet_distance(x.mean(0), np.cov(x, rowvar=False), *digits_ref_stats())


def ema_of(run):
    from scmctl.cli.sample import load_for_sampling

    return load_for_sampling(str(run), "ema", "cpu")[:2]


def test_two_steps_beat_one_on_digits(tmp_path):
    """sCT from scratch on the built-in digits at 8x8 (the CLI's training loop, 1500 steps): the
    Fréchet distance to the 1797 training images in pixel space (64-d, float64) is smaller for
    2-step than for 1-step samples, and both are far below the untrained model's."""
    torch.set_num_threads(2)  # convolutions here give the same numbers on 1 or 2 threads
    net, cfg = ema_of(cli_run(tmp_path / "run", ["train"], 1500))

    from scmctl.nn.unet import UNet
    untrained = UNet(cfg.network).eval()
    with torch.no_grad():
        untrained.out_gain.fill_(1.0)
    base = digits_fd(untrained, "consistency", 1)
    one, two = digits_fd(net, "consistency", 1), digits_fd(net, "consistency", 2)
    print(f"digits 8x8 pixel FD: untrained {base:.3f}, 1-step {one:.4f}, 2-step {two:.4f}")
    # Observed (this machine, 2 threads; the run is deterministic): untrained 41.577, 1-step 0.5843,
    # 2-step 0.5619, i.e. 1-step = 0.014·untrained and 2-step = 0.962·1-step. Margins: 1-step under
    # 0.05·untrained (3.5x), 2-step at least 1.5% better than 1-step (the observed gain is 3.8%).
    assert one < 0.05 * base
    assert two < 0.985 * one


def test_sct_from_a_digits_teacher_two_steps_near_the_teacher(tmp_path):
    """Issue 10's setting at CI scale: sCT from a trained diffusion teacher's EMA (`scmctl train
    --init`, which applies the preset's sct_init variant: lr 1e-3 and the batch-averaged velocity
    with 960 more reference digits) on the 8x8 digits. Teacher 1000 steps, students 500 steps; pixel
    FD as above, the teacher at 18 DPM-Solver-2S steps (35 NFE). The student lands near the teacher,
    its second step pays off, and the batch velocity beats the paper's conditional one (same run
    with loss.sct_velocity=conditional, which leaves the references unused)."""
    torch.set_num_threads(2)
    teacher_run = cli_run(tmp_path / "teacher", ["train", "--objective", "diffusion"], 1000)
    ref = digits_fd(ema_of(teacher_run)[0], "diffusion", 18)
    fd = {}
    for velocity, extra in [("batch", []), ("conditional", ["--set", "loss.sct_velocity=conditional"])]:
        student, cfg = ema_of(cli_run(tmp_path / velocity, ["train", "--init", str(teacher_run), *extra], 500))
        assert cfg.train.lr == pytest.approx(1e-3) and cfg.loss.sct_velocity == velocity  # sct_init
        assert cfg.loss.sct_references == (960 if velocity == "batch" else 0)
        fd[velocity] = digits_fd(student, "consistency", 1), digits_fd(student, "consistency", 2)
        print(f"digits 8x8 pixel FD: teacher (35 NFE) {ref:.4f}; sCT ({velocity} velocity) from it, 1-step "
              f"{fd[velocity][0]:.4f} ({fd[velocity][0] / ref:.2f}x), 2-step {fd[velocity][1]:.4f} "
              f"({fd[velocity][1] / ref:.2f}x)")
    (one, two), (one_c, two_c) = fd["batch"], fd["conditional"]
    # Observed (2 threads; deterministic): teacher 0.3661; batch velocity + 960 references, 1-step
    # 0.4743 (1.30x), 2-step 0.3763 (1.03x the teacher, 0.79x the 1-step); train.seed 1 / 2: 1.26x /
    # 1.00x, 1.28x / 1.03x. Conditional 0.6997 (1.91x) / 0.4448 (1.21x, 0.64x). Earlier: the batch
    # velocity without references 0.5103 (1.39x) / 0.3888 (1.06x); the conditional student at the
    # teacher's lr 1e-2: 0.5854 / 0.5546 (2-step 1.51x); sCD (distill, lr 1e-3): 0.5411 / 0.4391.
    # Margins: issue 10's goals, 2-step within 1.1x of the teacher (the observed 1.03x, 7% under;
    # the seeds spread 3%), 1-step within 1.4x (observed 1.30x); 2-step under 0.85x the 1-step (the
    # paper's CIFAR-10 ratio is 0.72x); the batch velocity at least 20% better at 1 step (observed
    # 32%) and 10% at 2 steps (observed 15%).
    assert two < 1.1 * ref and one < 1.4 * ref
    assert two < 0.85 * one and two_c < 0.85 * one_c
    assert one < 0.8 * one_c and two < 0.9 * two_c


def test_discrete_time_scm_approaches_continuous_as_n_grows():
    """Lu & Song 2025, Fig. 5c: discrete-time sCM (finite-difference tangent on EDM's grid of N
    steps) approaches continuous-time sCM as N grows. sCT on the ring, same seed and 1000 steps."""
    dist = {n: quality(train("sct", ring, 1000, batch=256, discrete_steps=n), "consistency", ring, 1)
            for n in (0, 1024, 8)}
    print("sCT ring 1-step, continuous / N=1024 / N=8: " + " / ".join(f"{v:.4f}" for v in dist.values()))
    # Observed (one thread, deterministic): continuous 0.0450, N=1024 0.0483 (1.07x), N=8 0.1649
    # (3.7x); other N: 2048 0.0512, 256 0.0526, 64 0.0649. On the grid toy: continuous 0.0579,
    # N=1024 0.0501, N=8 0.1550. Margins: N=1024 within 1.25x of continuous; N=8 at least 2x worse.
    assert dist[1024] < 1.25 * dist[0]
    assert dist[8] > 2 * dist[0]
    assert dist[0] < 0.06
