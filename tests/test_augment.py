"""EDM's non-leaking augmentation (scmctl.data.augment) against brute-force pixel operations."""

import math

import pytest
import torch

from scmctl.data import augment as aug


def images(n=6, c=3, h=12, w=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, c, h, w, generator=g) * 2 - 1


def only(n, i, **params):
    """Transforms that do nothing except `params` on image i."""
    tf = aug.Transforms.identity(n)
    for k, v in params.items():
        getattr(tf, k)[i] = v
    return tf


def test_p_zero_is_the_identity_with_zero_labels():
    x = images()
    out, labels = aug.augment(x, 0.0)
    assert torch.equal(out, x) and labels.shape == (6, aug.AUGMENT_DIM) and not labels.any()


def test_images_stay_in_range_and_labels_match_the_draws():
    x = images(n=64, h=16, w=16)
    g = torch.Generator().manual_seed(1)
    tf = aug.draw(64, 1.0, g)
    out = aug.apply(x, tf)
    # bilinear interpolation with reflection padding is a convex combination of input pixels
    assert out.min() >= x.min() - 1e-6 and out.max() <= x.max() + 1e-6
    assert (out - x).abs().amax(dim=(1, 2, 3)).min() > 0  # p = 1: every image is moved
    lab = tf.labels()
    assert lab.shape == (64, 9)
    expect = torch.stack([tf.xflip, tf.yflip, tf.scale, tf.rotate.cos() - 1, tf.rotate.sin(),
                          tf.aniso * tf.aniso_angle.cos(), tf.aniso * tf.aniso_angle.sin(),
                          tf.translate_x, tf.translate_y], 1).float()
    assert torch.equal(lab, expect)
    # the same generator seed gives the same augmentation; another seed another
    out2, lab2 = aug.augment(x, 1.0, torch.Generator().manual_seed(1))
    assert torch.equal(out2, out) and torch.equal(lab2, lab)
    out3, _ = aug.augment(x, 1.0, torch.Generator().manual_seed(2))
    assert not torch.equal(out3, out)


def test_flips_are_mirrors_and_say_so():
    x = images(n=3)
    out = aug.apply(x, only(3, 1, xflip=1.0))
    assert torch.equal(out[1], x[1].flip(2)) and torch.equal(out[0], x[0]) and torch.equal(out[2], x[2])
    assert only(3, 1, xflip=1.0).labels()[1].tolist() == [1, 0, 0, 0, 0, 0, 0, 0, 0]
    out = aug.apply(x, only(3, 2, yflip=1.0))
    assert torch.equal(out[2], x[2].flip(1)) and torch.equal(out[:2], x[:2])
    assert only(3, 2, yflip=1.0).labels()[2].tolist() == [0, 1, 0, 0, 0, 0, 0, 0, 0]


@pytest.mark.parametrize("k", [1, 2, 3])
def test_rotation_by_quarter_turns_is_rot90(k):
    """θ = k·π/2 maps the pixel grid onto itself: the bilinear resampling is exact up to float32
    rounding of the sample positions (observed < 1e-6)."""
    x = images(n=2, h=10, w=10)
    theta = k * math.pi / 2 if k < 3 else -math.pi / 2
    tf = only(2, 0, rotate=theta)
    out = aug.apply(x, tf)
    assert torch.allclose(out[0], torch.rot90(x[0], k, dims=(1, 2)), atol=1e-5)
    assert torch.equal(out[1], x[1])
    lab = tf.labels()[0]
    assert lab[3].item() == pytest.approx(math.cos(theta) - 1, abs=1e-6)
    assert lab[4].item() == pytest.approx(math.sin(theta), abs=1e-6)


@pytest.mark.parametrize("shift", [1, 3, -2])
def test_integer_translation_is_a_shift_with_reflection_padding(shift):
    """w_x = shift/(0.125·W) moves the image by `shift` pixels to the right; the uncovered border
    reads the image reflected about its edge pixel (brute force: reflect-pad, then crop)."""
    x = images(n=1, h=8, w=16)
    w = x.shape[3]
    out = aug.apply(x, only(1, 0, translate_x=shift / (aug.TRANSLATE_STD * w)))
    pad = abs(shift)
    padded = torch.nn.functional.pad(x, (pad, pad, 0, 0), mode="reflect")
    expect = padded[..., pad - shift: pad - shift + w]
    assert torch.allclose(out, expect, atol=1e-5)


def test_isotropic_scale_by_two_samples_halfway_points():
    """w = 5 gives s = 2^(0.2·5) = 2: output pixel x (centred) reads the input at x/2; on an image
    that is linear in x and y, bilinear interpolation reproduces the linear function exactly."""
    h = w = 9
    ys, xs = torch.meshgrid(torch.arange(h) - 4.0, torch.arange(w) - 4.0, indexing="ij")
    x = (0.1 * xs - 0.05 * ys)[None, None]
    out = aug.apply(x, only(1, 0, scale=5.0))
    assert torch.allclose(out[0, 0], 0.1 * xs / 2 - 0.05 * ys / 2, atol=1e-6)
    # anisotropic scaling along the axes: x stretched by 2, y squeezed by 2 (reads y·2 within range
    # only for |y| <= 2; check those rows)
    out = aug.apply(x, only(1, 0, aniso=5.0))
    rows = slice(2, 7)
    assert torch.allclose(out[0, 0, rows], (0.1 * xs / 2 - 0.05 * ys * 2)[rows], atol=1e-6)


def test_probabilities_are_edms():
    """x-flip always enabled then 1/2; y-flip p·1/2; scale, rotation, anisotropy, translation each p."""
    n, p = 40000, 0.12
    tf = aug.draw(n, p, torch.Generator().manual_seed(0))

    def near(freq, expect):
        return abs(freq - expect) < 4 * math.sqrt(expect * (1 - expect) / n)

    assert near(tf.xflip.mean().item(), 0.5)
    assert near(tf.yflip.mean().item(), p / 2)
    for v in (tf.scale, tf.rotate, tf.aniso, tf.translate_x):
        assert near((v != 0).double().mean().item(), p)
    assert torch.equal(tf.translate_x != 0, tf.translate_y != 0)
    assert near((tf.aniso_angle != 0).double().mean().item(), p / 2)
    # p = 0 draws the same stream (the transforms just don't happen)
    assert not aug.draw(n, 0.0, torch.Generator().manual_seed(0)).labels().any()


def test_config_validation_of_augmentation():
    from scmctl import config
    from scmctl.errors import UsageError

    cfg = config.resolve("tiny", "diffusion", ["data.augment_p=0.12", "network.augment_dim=9"])
    assert (cfg.data.augment_p, cfg.network.augment_dim) == (0.12, 9)
    with pytest.raises(UsageError, match="augment_dim"):
        config.resolve("tiny", "diffusion", ["data.augment_p=0.12"])  # labels nowhere to go: leaks
    with pytest.raises(UsageError, match="augment_dim"):
        config.resolve("tiny", "diffusion", ["network.augment_dim=4"])
    with pytest.raises(UsageError, match="augment_p"):
        config.resolve("tiny", "diffusion", ["data.augment_p=1.5", "network.augment_dim=9"])


def test_unet_augment_input_is_zero_initialized_and_used():
    """The EDM2-style U-Net's augment input: a zero-gain linear map added to the embedding, so a
    fresh network (or a student initialized from a teacher) ignores it until trained, and labels
    of None are the zero label (sampling)."""
    from scmctl import config
    from scmctl.nn.unet import UNet

    cfg = config.resolve("tiny", "diffusion", ["network.augment_dim=9", "network.resolution=8",
                                                "network.channels=1", "network.num_classes=0"])
    torch.manual_seed(0)
    net = UNet(cfg.network).eval()
    with torch.no_grad():
        net.out_gain.fill_(1.0)
        x, t = torch.randn(4, 1, 8, 8), torch.full((4,), 0.7)
        lab = aug.draw(4, 1.0, torch.Generator().manual_seed(0)).labels()
        base = net(x, t)
        assert torch.equal(net(x, t, augment_labels=lab), base)
        net.augment_gain.fill_(1.0)
        assert torch.equal(net(x, t, augment_labels=torch.zeros(4, 9)), base)
        assert (net(x, t, augment_labels=lab) - base).abs().max() > 1e-3


def test_augmented_training_resumes_bit_exactly_and_feeds_the_labels(tmp_path, capsys):
    """The loop augments each micro-batch from its seed, so a resumed sCT run recomputes the same
    transforms (bit-identical weights), and passes the labels to the network: the zero-initialized
    augment gain gets a gradient only through them (it stays exactly 0 if they never arrive), in
    the consistency loss and in the diffusion loss."""
    from _cli import run

    small = ["--preset", "tiny", "--set", "data.resolution=8", "--set", "network.model_channels=16",
             "--set", "network.attn_resolutions=[4]", "--set", "network.head_channels=16",
             "--set", "train.checkpoint_every=2", "--set", "train.grid_every=0",
             "--set", "train.keep_checkpoints=0", "--set", "network.augment_dim=9",
             "--set", "data.augment_p=0.5", "--batch", "8"]
    full, part, teacher = tmp_path / "full", tmp_path / "part", tmp_path / "teacher"
    assert run(capsys, "train", "--run-dir", full, *small, "--steps", 4)[0] == 0
    assert run(capsys, "train", "--run-dir", part, *small, "--steps", 2)[0] == 0
    assert run(capsys, "train", "--run-dir", part, *small, "--steps", 4)[0] == 0
    a = torch.load(full / "checkpoint-0000004.pt", weights_only=True)
    b = torch.load(part / "checkpoint-0000004.pt", weights_only=True)
    for key in ("net", "ema"):
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key]), key
    assert a["net"]["augment_gain"].abs().item() > 0
    assert run(capsys, "train", "--run-dir", teacher, *small, "--objective", "diffusion", "--steps", 2)[0] == 0
    assert torch.load(teacher / "checkpoint-0000002.pt", weights_only=True)["net"]["augment_gain"].abs().item() > 0


@pytest.mark.parametrize("method,jvp_mode", [("diffusion", "dual"), ("sct", "dual"), ("sct", "separate"),
                                             ("scd", "separate")])
def test_every_network_call_of_a_micro_batch_gets_its_augment_labels(method, jvp_mode):
    """Gradient forward, tangent pass and sCD teacher all see the micro-batch's augment labels."""
    from scmctl import config
    from scmctl.nn.unet import UNet
    from scmctl.training.parallel import plain_model
    from scmctl.training.step import micro_batch_loss

    class Recorder(torch.nn.Module):
        def __init__(self, net):
            super().__init__()
            self.net, self.seen = net, []

        def forward(self, *args, **kwargs):
            self.seen.append(kwargs.get("augment_labels"))
            return self.net(*args, **kwargs)

        def adaptive_weight(self, t):
            return self.net.adaptive_weight(t)

    cfg = config.resolve("tiny", method, ["network.augment_dim=9", "data.augment_p=0.5", "network.resolution=8",
                                          "network.channels=1", "network.num_classes=0",
                                          "network.attn_resolutions=[4]", f"loss.jvp_mode={jvp_mode}"])
    torch.manual_seed(0)
    student, teacher = Recorder(UNet(cfg.network)), Recorder(UNet(cfg.network).eval())
    x0 = torch.randn(4, 1, 8, 8) * 0.5
    x0, lab = aug.augment(x0, 0.5, torch.Generator().manual_seed(3))
    model = plain_model(student, teacher if method == "scd" else None)
    micro_batch_loss(cfg, model, x0, None, step=5, augment_labels=lab).loss.backward()
    calls = student.seen + teacher.seen
    assert len(student.seen) == (1 if method == "diffusion" or jvp_mode == "dual" else 2)
    assert len(teacher.seen) == (1 if method == "scd" else 0)
    assert all(seen is lab for seen in calls)
