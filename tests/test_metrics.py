"""Paper-protocol metrics checked against independent computations: Fréchet distance (explicit
eigen-decomposition square roots, 2×2 closed form), precision/recall on point sets with known
answers and a brute-force float64 reference, KID against a direct unbiased MMD, streaming
statistics, the DINOv2 ViT forward against a float64 numpy forward, reference files (eval ref,
EDM2 .pkl read without running code), on-the-fly generation with seed sets, offline messages.

No real detector weights are used: a stand-in TorchScript detector (4×4 average pool + fixed
random projection) and a small random ViT saved with DINOv2's key names, all under tmp_path.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import socket
import urllib.request
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.special import erf

from _cli import Payload, assert_one_line_error, run as run_cli
from scmctl.data.imageio import write_png
from scmctl.metrics import detectors as det_mod
from scmctl.metrics import (DINOV2_FILE, DINOV2_URL, INCEPTION_FILE, INCEPTION_URL, StreamingStats,
                            frechet_distance, kid_subsets, knn_radii_sq, polynomial_mmd2, precision_recall)
from scmctl.metrics.dinov2 import IMAGENET_MEAN, IMAGENET_STD, DINOv2Detector, DinoViT, preprocess
from scmctl.metrics.reference import compute_reference
from scmctl.metrics.sources import parse_seeds, seed_sets

D = 16  # stand-in feature dimension


# ------------------------------------------------------------------ helpers

class _StandIn(torch.nn.Module):
    """uint8 NCHW -> tanh(4x4 average pool of x/255 @ W)."""

    def __init__(self, w: torch.Tensor):
        super().__init__()
        self.register_buffer("w", w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(F.adaptive_avg_pool2d(x.float() / 255.0, 4).flatten(1) @ self.w)


def standin_weights(seed: int = 123) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((48, D)).astype(np.float32)


def numpy_features(images: np.ndarray, seed: int = 123) -> np.ndarray:
    """The stand-in's features in float64 numpy from uint8 NHWC images (grayscale repeated)."""
    x = images.astype(np.float64) / 255.0
    if x.shape[3] == 1:
        x = np.repeat(x, 3, axis=3)
    n, h, w, c = x.shape
    pooled = x.reshape(n, 4, h // 4, 4, w // 4, c).mean(axis=(2, 4)).transpose(0, 3, 1, 2).reshape(n, 48)
    return np.tanh(pooled @ standin_weights(seed).astype(np.float64))


def fd_eig(mu1, s1, mu2, s2) -> float:
    """FD with explicit matrix square roots (numpy eigh): √Σ1, then √(√Σ1 Σ2 √Σ1), then its trace."""
    def sqrtm_psd(a):
        w, v = np.linalg.eigh((a + a.T) / 2)
        return (v * np.sqrt(np.clip(w, 0, None))) @ v.T

    r1 = sqrtm_psd(s1)
    covmean = sqrtm_psd(r1 @ s2 @ r1)
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def fd_stats(f1, f2) -> float:
    return fd_eig(f1.mean(0), np.cov(f1, rowvar=False), f2.mean(0), np.cov(f2, rowvar=False))


def ok_json(capsys, *args) -> dict:
    code, out, err = run_cli(capsys, *args)
    assert code == 0, err
    lines = out.strip().splitlines()
    assert len(lines) == 1, out
    return json.loads(lines[0])


def sha256(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def write_folder(folder: Path, images: np.ndarray) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, im in enumerate(images):
        write_png(folder / f"{i:06d}.png", im)
    return folder


def save_standin(path: Path, seed: int = 123) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.script(_StandIn(torch.from_numpy(standin_weights(seed)))).save(str(path))
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("metrics")
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (1, 16, 16, 3))
    a = np.clip(base + rng.integers(-60, 61, (48, 16, 16, 3)), 0, 255).astype(np.uint8)
    b = np.clip(a.astype(int) + np.array([40, 0, -25]) + rng.integers(-20, 21, a.shape), 0, 255).astype(np.uint8)
    return dict(root=root, det=save_standin(root / "det.pt"), det2=save_standin(root / "det2.pt", seed=7),
                a=a, b=b, A=write_folder(root / "A", a), B=write_folder(root / "B", b))


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(urllib.request, "urlopen", refuse)


# ------------------------------------------------------------------ Fréchet distance

def test_frechet_distance_vs_explicit_eigen_square_roots():
    rng = np.random.default_rng(10)
    for d in (3, 40, 200):
        a, b = rng.standard_normal((d, d + 5)), rng.standard_normal((d, 2 * d))
        s1, s2 = a @ a.T / d, b @ b.T / d + np.diag(rng.uniform(0, 1, d))
        mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
        assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(fd_eig(mu1, s1, mu2, s2), rel=1e-10)


def test_frechet_distance_closed_forms():
    rng = np.random.default_rng(11)
    # 1-d: (m1 − m2)² + (σ1 − σ2)²
    assert frechet_distance([1.0], [[4.0]], [3.0], [[9.0]]) == pytest.approx(4.0 + 1.0, rel=1e-14)
    # 2×2: tr √(Σ1Σ2) = √(tr(Σ1Σ2) + 2√det(Σ1Σ2)) (Σ1Σ2 has non-negative eigenvalues)
    for _ in range(5):
        a, b = rng.standard_normal((2, 2)), rng.standard_normal((2, 2))
        s1, s2 = a @ a.T + 0.1 * np.eye(2), b @ b.T + 0.1 * np.eye(2)
        p = s1 @ s2
        tr_sqrt = np.sqrt(np.trace(p) + 2 * np.sqrt(np.linalg.det(p)))
        mu1, mu2 = rng.standard_normal(2), rng.standard_normal(2)
        expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt
        assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-10, abs=1e-12)
    # commuting (shared eigenvectors): Σ (√a_i − √b_i)²
    d = 30
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    ea, eb = rng.uniform(0, 4, d), rng.uniform(0, 4, d)
    expected = np.sum((np.sqrt(ea) - np.sqrt(eb)) ** 2)
    assert frechet_distance(np.zeros(d), q @ np.diag(ea) @ q.T, np.zeros(d), q @ np.diag(eb) @ q.T) == \
        pytest.approx(expected, rel=1e-9)
    assert frechet_distance(np.zeros(d), np.diag(ea), np.zeros(d), np.diag(eb)) == pytest.approx(expected, rel=1e-12)


# ------------------------------------------------------------------ streaming statistics

def test_streaming_stats_uneven_chunks_match_numpy():
    rng = np.random.default_rng(12)
    x = rng.standard_normal((1000, 24)) @ rng.standard_normal((24, 24)) + rng.uniform(-500, 500, 24)
    cuts = np.sort(rng.choice(np.arange(1, 1000), 17, replace=False))
    cuts = np.concatenate([[0, 1, 2], cuts[cuts > 2], [999, 1000]])  # 1-row chunks included
    s = StreamingStats()
    for lo, hi in zip(cuts[:-1], cuts[1:]):
        s.update(x[lo:hi])
    assert s.n == 1000
    np.testing.assert_allclose(s.mu, x.mean(0), rtol=1e-13, atol=1e-10)
    np.testing.assert_allclose(s.sigma, np.cov(x, rowvar=False), rtol=1e-10, atol=1e-9)


def test_compute_reference_streams_stats_and_keeps_a_seeded_subset(data):
    from scmctl.metrics import load_detector, open_images

    det = load_detector(str(data["det"]), device="cpu")
    stats, kept = compute_reference(open_images(data["A"]), det, batch_size=5, keep_features=10, seed=3,
                                    show_progress=False)
    f = numpy_features(data["a"])
    np.testing.assert_allclose(stats.mu, f.mean(0), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(stats.sigma, np.cov(f, rowvar=False), rtol=1e-5, atol=1e-7)
    idx = np.sort(np.random.default_rng(3).choice(48, 10, replace=False))  # the documented subset
    np.testing.assert_allclose(kept, f[idx], rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ precision / recall

def brute_force_pr(gen, ref, k=3):
    def radii(x):
        d = np.sqrt(((x[:, None] - x[None]) ** 2).sum(-1))
        np.fill_diagonal(d, np.inf)
        return np.sort(d, axis=1)[:, k - 1]

    d = np.sqrt(((gen[:, None] - ref[None]) ** 2).sum(-1))  # (G, R)
    precision = (d <= radii(ref)[None, :]).any(1).mean()
    recall = (d.T <= radii(gen)[None, :]).any(1).mean()
    return precision, recall


def test_precision_recall_known_answers():
    rng = np.random.default_rng(13)
    x = rng.standard_normal((40, 8))
    assert precision_recall(x, x.copy()) == (1.0, 1.0)
    assert precision_recall(x + 1000.0, x) == (0.0, 0.0)  # far apart clusters

    # Reference: points 0..9 on a line (k = 3 radii: 3 at the ends, 2 inside, so the union of balls
    # is [-3, 12]); generated: a tight cluster at 0..0.3 (radii 0.3, 0.2, 0.2, 0.3) and one at 50.
    # precision = 4/8 (the first cluster), recall = 1/10 (only reference point 0 is in a ball).
    line_ref = np.arange(10.0)
    line_gen = np.array([0.0, 0.1, 0.2, 0.3, 50.0, 50.1, 50.2, 50.3])
    q, _ = np.linalg.qr(rng.standard_normal((6, 6)))
    embed = lambda t: np.outer(t, q[0]) + 3.0  # noqa: E731 (a line in 6-d, off the origin)
    for block in (4096, 3):  # 3: blocks cut through the self-exclusion diagonal and the sets
        p, r = precision_recall(embed(line_gen), embed(line_ref), k=3, block=block)
        assert (p, r) == (0.5, 0.1)
    radii = np.sqrt(knn_radii_sq(torch.from_numpy(line_ref[:, None]), 3, block=4).numpy())
    np.testing.assert_allclose(radii, [3, 2, 2, 2, 2, 2, 2, 2, 2, 3])


def test_precision_recall_matches_brute_force_float64():
    rng = np.random.default_rng(14)
    ref = rng.standard_normal((120, 10))
    gen = 0.8 * rng.standard_normal((90, 10)) + 0.6
    expected = brute_force_pr(gen, ref)
    assert 0.05 < expected[0] < 0.95 and 0.05 < expected[1] < 0.95  # a non-trivial case
    assert precision_recall(gen, ref, block=7) == pytest.approx(expected, abs=1e-12)
    assert precision_recall(gen, ref) == pytest.approx(expected, abs=1e-12)


# ------------------------------------------------------------------ KID

def direct_mmd2(x, y) -> float:
    """Unbiased MMD² with k(a, b) = (aᵀb/d + 1)³, summing pairs explicitly in float64."""
    m, d = x.shape
    k = lambda a, b: (a @ b / d + 1.0) ** 3  # noqa: E731
    kxx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    kyy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    kxy = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / (m * m)
    return kxx + kyy - 2 * kxy


def test_kid_equals_direct_mmd_and_is_deterministic_under_a_seed():
    rng = np.random.default_rng(15)
    gen = rng.standard_normal((30, 6)).astype(np.float32)
    ref = (rng.standard_normal((25, 6)) + 0.3).astype(np.float32)
    v = kid_subsets(gen, ref, num_subsets=4, subset_size=12, seed=5)
    draw = np.random.default_rng(5)  # the documented subset protocol
    for s in range(4):
        ix, iy = draw.choice(30, 12, replace=False), draw.choice(25, 12, replace=False)
        assert v[s] == pytest.approx(direct_mmd2(gen[ix].astype(np.float64), ref[iy].astype(np.float64)),
                                     rel=1e-5, abs=1e-7)
    np.testing.assert_array_equal(v, kid_subsets(gen, ref, num_subsets=4, subset_size=12, seed=5))
    assert not np.array_equal(v, kid_subsets(gen, ref, num_subsets=4, subset_size=12, seed=6))
    # subsets as large as the smaller set: every subset of the 25 refs is all of them
    full = direct_mmd2(gen[:25].astype(np.float64), ref.astype(np.float64))
    assert polynomial_mmd2(torch.from_numpy(gen[:25]), torch.from_numpy(ref)) == pytest.approx(full, rel=1e-5)


def test_kid_matches_cleanfid_kernel_distance_on_full_subsets():
    from cleanfid.fid import kernel_distance

    rng = np.random.default_rng(16)
    gen = rng.standard_normal((20, 5))
    ref = rng.standard_normal((20, 5)) * 1.2
    ours = kid_subsets(gen, ref, num_subsets=3, subset_size=20, seed=0)
    np.testing.assert_allclose(ours, kernel_distance(gen, ref, num_subsets=1), rtol=1e-5)


# ------------------------------------------------------------------ DINOv2

def _small_vit_state(dim=128, depth=2, patch=14, grid=5, seed=0) -> dict:
    """A random state dict with DINOv2's key names (and a mask_token, as the official file has)."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s, scale=1.0: torch.randn(*s, generator=g) * scale  # noqa: E731
    sd = {"cls_token": r(1, 1, dim), "pos_embed": r(1, grid * grid + 1, dim, scale=0.5),
          "mask_token": r(1, dim), "patch_embed.proj.weight": r(dim, 3, patch, patch, scale=0.05),
          "patch_embed.proj.bias": r(dim, scale=0.1), "norm.weight": 1 + r(dim, scale=0.1),
          "norm.bias": r(dim, scale=0.1)}
    for i in range(depth):
        p = f"blocks.{i}."
        sd.update({p + "norm1.weight": 1 + r(dim, scale=0.1), p + "norm1.bias": r(dim, scale=0.1),
                   p + "attn.qkv.weight": r(3 * dim, dim, scale=dim ** -0.5), p + "attn.qkv.bias": r(3 * dim, scale=0.1),
                   p + "attn.proj.weight": r(dim, dim, scale=dim ** -0.5), p + "attn.proj.bias": r(dim, scale=0.1),
                   p + "ls1.gamma": 0.5 + r(dim).abs(), p + "norm2.weight": 1 + r(dim, scale=0.1),
                   p + "norm2.bias": r(dim, scale=0.1), p + "mlp.fc1.weight": r(4 * dim, dim, scale=dim ** -0.5),
                   p + "mlp.fc1.bias": r(4 * dim, scale=0.1), p + "mlp.fc2.weight": r(dim, 4 * dim, scale=(4 * dim) ** -0.5),
                   p + "mlp.fc2.bias": r(dim, scale=0.1), p + "ls2.gamma": 0.5 + r(dim).abs()})
    return sd


def bicubic_matrix(n_in: int, n_out: int, scale: float) -> np.ndarray:
    """(n_out, n_in) weights of 1-d cubic convolution (A = −0.75, half-pixel centres, source
    coordinate (i + ½)/scale − ½, border indices clamped): DINOv2's position-grid resize."""
    a = -0.75
    cubic = lambda x: np.where(x <= 1, ((a + 2) * x - (a + 3)) * x * x + 1,  # noqa: E731
                               ((a * x - 5 * a) * x + 8 * a) * x - 4 * a)
    w = np.zeros((n_out, n_in))
    for i in range(n_out):
        src = (i + 0.5) / scale - 0.5
        i0 = int(np.floor(src))
        for j in range(i0 - 1, i0 + 3):
            w[i, min(max(j, 0), n_in - 1)] += cubic(np.array(abs(src - j)))
    return w


def reference_vit(sd: dict, x: np.ndarray, heads: int, offset: float = 0.1) -> np.ndarray:
    """DINOv2 ViT forward in float64 numpy: normalized images (B, 3, H, W) -> CLS after the norm."""
    sd = {k: v.double().numpy() for k, v in sd.items()}
    wp = sd["patch_embed.proj.weight"]
    dim, _, p, _ = wp.shape
    b, _, h, w = x.shape
    gh, gw = h // p, w // p
    patches = x.reshape(b, 3, gh, p, gw, p).transpose(0, 2, 4, 1, 3, 5).reshape(b, gh * gw, 3 * p * p)
    tok = patches @ wp.reshape(dim, -1).T + sd["patch_embed.proj.bias"]
    m = int(round(np.sqrt(sd["pos_embed"].shape[1] - 1)))
    grid = sd["pos_embed"][0, 1:].reshape(m, m, dim)
    wy, wx = bicubic_matrix(m, gh, (gh + offset) / m), bicubic_matrix(m, gw, (gw + offset) / m)
    pos = np.einsum("ym,xn,mnd->yxd", wy, wx, grid).reshape(gh * gw, dim)
    z = np.concatenate([np.broadcast_to(sd["cls_token"], (b, 1, dim)), tok], 1)
    z = z + np.concatenate([sd["pos_embed"][0, :1], pos])[None]

    def ln(t, name):
        mu, var = t.mean(-1, keepdims=True), t.var(-1, keepdims=True)
        return (t - mu) / np.sqrt(var + 1e-6) * sd[name + ".weight"] + sd[name + ".bias"]

    depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    hd = dim // heads
    for i in range(depth):
        q = f"blocks.{i}."
        qkv = ln(z, q + "norm1") @ sd[q + "attn.qkv.weight"].T + sd[q + "attn.qkv.bias"]
        qkv = qkv.reshape(b, -1, 3, heads, hd).transpose(2, 0, 3, 1, 4)
        s = qkv[0] @ qkv[1].transpose(0, 1, 3, 2) / np.sqrt(hd)
        s = np.exp(s - s.max(-1, keepdims=True))
        att = (s / s.sum(-1, keepdims=True)) @ qkv[2]
        att = att.transpose(0, 2, 1, 3).reshape(b, -1, dim) @ sd[q + "attn.proj.weight"].T + sd[q + "attn.proj.bias"]
        z = z + sd[q + "ls1.gamma"] * att
        hdn = ln(z, q + "norm2") @ sd[q + "mlp.fc1.weight"].T + sd[q + "mlp.fc1.bias"]
        hdn = 0.5 * hdn * (1 + erf(hdn / np.sqrt(2)))
        z = z + sd[q + "ls2.gamma"] * (hdn @ sd[q + "mlp.fc2.weight"].T + sd[q + "mlp.fc2.bias"])
    return ln(z, "norm")[:, 0]


@pytest.fixture(scope="module")
def vit_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("dinov2") / DINOV2_FILE
    sd = _small_vit_state()
    torch.save(sd, path)
    return path, sd


def test_dinov2_forward_matches_float64_reference(vit_file):
    path, sd = vit_file
    det = DINOv2Detector(path, device="cpu")
    assert det.feature_dim == 128 and det.net.blocks[0].attn.num_heads == 2  # dim // 64 heads
    rng = np.random.default_rng(17)
    images = rng.integers(0, 256, (3, 224, 224, 3)).astype(np.uint8)
    ours = det.features(torch.from_numpy(images).permute(0, 3, 1, 2)).numpy()
    x = images.astype(np.float64).transpose(0, 3, 1, 2) / 255
    x = (x - np.array(IMAGENET_MEAN)[:, None, None]) / np.array(IMAGENET_STD)[:, None, None]
    expected = reference_vit(sd, x, heads=2)
    assert np.abs(expected).max() > 0.5
    np.testing.assert_allclose(ours, expected, rtol=1e-4, atol=2e-4)
    # the "+0.1" position-grid resize is not the plain size=16 one: the check above would notice
    assert np.abs(reference_vit(sd, x, heads=2, offset=0.0) - expected).max() > 1e-2
    # chunked-block key names (FSDP checkpoints) load to the same network
    chunked = {k.replace("blocks.", "blocks.0.", 1) if k.startswith("blocks.") else k: v for k, v in sd.items()}
    net = DinoViT.from_state_dict(chunked)
    torch.testing.assert_close(net.pos_embed, det.net.pos_embed)


def test_dinov2_preprocessing_matches_pil_bicubic():
    from PIL import Image

    rng = np.random.default_rng(18)
    for side in (32, 300):
        img = rng.integers(0, 256, (1, 3, side, side)).astype(np.uint8)
        ours = preprocess(torch.from_numpy(img))[0].numpy()
        pil = np.stack([np.asarray(Image.fromarray(img[0, c].astype(np.float32), mode="F")
                                   .resize((224, 224), Image.BICUBIC)) for c in range(3)])
        pil = (pil / 255 - np.array(IMAGENET_MEAN)[:, None, None]) / np.array(IMAGENET_STD)[:, None, None]
        np.testing.assert_allclose(ours, pil, atol=5e-3 / 255 / 0.224)


def test_fd_dinov2_cli_with_edm2_pickle_entry(capsys, data, vit_file, tmp_path):
    path, _ = vit_file
    det = DINOv2Detector(path, device="cpu")
    fa = det.features(torch.from_numpy(data["a"][:12]).permute(0, 3, 1, 2)).double().numpy()
    fb = det.features(torch.from_numpy(data["b"][:12]).permute(0, 3, 1, 2)).double().numpy()
    pkl = tmp_path / "img16.pkl"
    zeros = {"mu": np.zeros(2048), "sigma": np.eye(2048)}  # the Inception entry must not be used
    pkl.write_bytes(pickle.dumps({"fid": zeros, "fd_dinov2": {"mu": fb.mean(0), "sigma": np.cov(fb, rowvar=False)},
                                  "num_images": 12}))
    write_folder(tmp_path / "A12", data["a"][:12])
    r = ok_json(capsys, "eval", "fd-dinov2", tmp_path / "A12", "--ref", pkl, "--dinov2", path, "--allow-small",
                "--json", "--device", "cpu")
    assert (r["metric"], r["detector"], r["mode"], r["n"], r["n_ref"]) == ("fd_dinov2", "dinov2", "bicubic-224", 12, 12)
    assert r["detector_sha256"] == sha256(path) and r["ref_sha256"] == sha256(pkl)
    assert r["value"] == pytest.approx(fd_stats(fa, fb), rel=1e-4)


# ------------------------------------------------------------------ references: eval ref, npz, pkl

def test_eval_ref_then_fid_equals_direct_computation(capsys, data, tmp_path):
    ref = tmp_path / "refB.npz"
    s = ok_json(capsys, "eval", "ref", data["B"], "--out", ref, "--detector", data["det"], "--features", 20,
                "--batch", 7, "--json", "--device", "cpu")
    assert (s["count"], s["dim"], s["features"], s["mode"]) == (48, D, 20, "native")
    assert s["detector_sha256"] == sha256(data["det"])
    with np.load(ref, allow_pickle=False) as z:
        fb = numpy_features(data["b"])
        np.testing.assert_allclose(z["mu"], fb.mean(0), rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(z["sigma"], np.cov(fb, rowvar=False), rtol=1e-5, atol=1e-7)
        assert z["mu"].dtype == np.float64 and int(z["count"]) == 48 and z["features"].shape == (20, D)
        assert str(z["detector_sha256"]) == sha256(data["det"]) and str(z["data"]) == str(data["B"])
        assert str(z["format"]) == "scmctl-ref-v1" and str(z["mode"]) == "native" and str(z["scmctl_version"])

    expected = fd_stats(numpy_features(data["a"]), numpy_features(data["b"]))
    r = ok_json(capsys, "eval", "fid", data["A"], "--ref", ref, "--detector", data["det"], "--allow-small",
                "--json", "--device", "cpu")
    assert r["value"] == pytest.approx(expected, rel=1e-4)
    assert r["ref_sha256"] == sha256(ref) and r["detector_sha256"] == sha256(data["det"]) and r["n_ref"] == 48
    # the same number when the reference folder is given directly
    r2 = ok_json(capsys, "eval", "fid", data["A"], "--ref", data["B"], "--detector", data["det"], "--allow-small",
                 "--json", "--device", "cpu")
    # features of the folder at the default batch vs --batch 7 for the reference: float32 features
    # differ with the batch shape on some CPUs (observed 4.8e-8 relative), so compare at 1e-6
    assert r2["value"] == pytest.approx(r["value"], rel=1e-6)

    # KID from the stored features = KID computed directly on those features
    k = ok_json(capsys, "eval", "kid", data["A"], "--ref", ref, "--detector", data["det"], "--subsets", 5,
                "--subset-size", 15, "--seed", 2, "--json", "--device", "cpu")
    with np.load(ref, allow_pickle=False) as z:
        v = kid_subsets(numpy_features(data["a"]), z["features"], 5, 15, seed=2)
    assert (k["metric"], k["n_ref"], k["subset_size"]) == ("kid", 20, 15)
    assert k["value"] == pytest.approx(v.mean(), rel=1e-4, abs=1e-8) and k["std"][0] == pytest.approx(v.std(), rel=1e-3)

    # statistics of another detector are refused, before any extraction
    code, _, err = run_cli(capsys, "eval", "fid", data["A"], "--ref", ref, "--detector", data["det2"],
                           "--allow-small", "--device", "cpu")
    assert_one_line_error(code, err, str(ref), "recompute")


def test_eval_ref_from_a_dataset_array_and_latents_refused(capsys, data, tmp_path, monkeypatch):
    nchw = tmp_path / "train.npz"  # channels-first, key 'x': what load_dataset accepts
    np.savez(nchw, x=data["b"].transpose(0, 3, 1, 2), y=np.arange(48) % 3)
    ref = tmp_path / "ref.npz"
    ok_json(capsys, "eval", "ref", nchw, "--out", ref, "--detector", data["det"], "--json", "--device", "cpu")
    with np.load(ref, allow_pickle=False) as z:
        np.testing.assert_allclose(z["mu"], numpy_features(data["b"]).mean(0), rtol=1e-6, atol=1e-7)

    import scmctl.data.datasets as ds

    class Latents:
        kind, encoder = "latents", "stabilityai/sd-vae-ft-mse"

        def __len__(self):
            return 4

    monkeypatch.setattr(ds, "load_dataset", lambda *a, **k: Latents())
    code, out, err = run_cli(capsys, "eval", "ref", nchw, "--out", tmp_path / "r2.npz", "--detector", data["det"])
    assert_one_line_error(code, err, "latent", "images")
    assert not (tmp_path / "r2.npz").exists()


def test_edm2_pickle_loaded_safely_and_code_payload_refused(capsys, data, tmp_path):
    fb = numpy_features(data["b"])
    good = {"fid": {"mu": fb.mean(0), "sigma": np.cov(fb, rowvar=False)}, "num_images": 48}
    expected = fd_stats(numpy_features(data["a"]), fb)
    for protocol in (2, 4, 5):
        pkl = tmp_path / f"ref{protocol}.pkl"
        pkl.write_bytes(pickle.dumps(good, protocol=protocol))
        r = ok_json(capsys, "eval", "fid", data["A"], "--ref", pkl, "--detector", data["det"], "--allow-small",
                    "--json", "--device", "cpu")
        assert r["value"] == pytest.approx(expected, rel=1e-4) and r["n_ref"] == 48 and r["ref_sha256"] == sha256(pkl)

    marker = tmp_path / "executed"
    payloads = {  # hand-written protocol-0 pickles whose REDUCE would run a command
        "os.system": b"cos\nsystem\n(S'touch " + str(marker).encode() + b"'\ntR.",
        "posix.system": b"cposix\nsystem\n(S'touch " + str(marker).encode() + b"'\ntR.",
        "builtins.eval": b"cbuiltins\neval\n(S'open(\"" + str(marker).encode() + b"\", \"w\")'\ntR.",
        "nested": b"(dp0\nS'fid'\np1\ncbuiltins\nexec\n(S'x=1'\ntRs.",
    }
    for name, blob in payloads.items():
        bad = tmp_path / f"{name}.pkl"
        bad.write_bytes(blob)
        code, out, err = run_cli(capsys, "eval", "fid", data["A"], "--ref", bad, "--detector", data["det"],
                                 "--allow-small", "--device", "cpu")
        assert_one_line_error(code, err, str(bad), "refusing to unpickle")
        assert out == ""
    bad = tmp_path / "object.pkl"
    bad.write_bytes(pickle.dumps({"fid": {"mu": Payload(open, str(marker), "w"), "sigma": np.eye(D)}}))
    code, _, err = run_cli(capsys, "eval", "fid", data["A"], "--ref", bad, "--detector", data["det"], "--allow-small")
    assert_one_line_error(code, err, "refusing to unpickle")
    assert not marker.exists()

    nostats = tmp_path / "other.pkl"
    nostats.write_bytes(pickle.dumps({"fd_dinov2": good["fid"]}))
    code, _, err = run_cli(capsys, "eval", "fid", data["A"], "--ref", nostats, "--detector", data["det"], "--allow-small")
    assert_one_line_error(code, err, "'fid'", "fd_dinov2")


def test_kid_and_pr_cli_against_direct_computation(capsys, data):
    fa, fb = numpy_features(data["a"]), numpy_features(data["b"])
    k = ok_json(capsys, "eval", "kid", data["A"], "--ref", data["B"], "--detector", data["det"], "--subsets", 4,
                "--subset-size", 20, "--seed", 9, "--json", "--device", "cpu")
    v = kid_subsets(fa, fb, 4, 20, seed=9)
    assert k["value"] == pytest.approx(v.mean(), rel=1e-4, abs=1e-8)
    assert k["values"] == [k["value"]] and k["n"] == 48 and k["n_ref"] == 48
    k2 = ok_json(capsys, "eval", "kid", data["A"], "--ref", data["B"], "--detector", data["det"], "--subsets", 4,
                 "--subset-size", 20, "--seed", 9, "--json", "--device", "cpu")
    assert k2["value"] == k["value"]  # deterministic under a seed

    p = ok_json(capsys, "eval", "pr", data["A"], "--ref", data["B"], "--detector", data["det"], "--json",
                "--device", "cpu")
    exp_p, exp_r = brute_force_pr(fa, fb)
    assert p["metric"] == "pr" and p["k"] == 3 and p["n_ref"] == 48  # the 10,000 default caps a smaller set
    assert p["precision"]["value"] == pytest.approx(exp_p) and p["recall"]["value"] == pytest.approx(exp_r)
    code, out, err = run_cli(capsys, "eval", "pr", data["A"], "--ref", data["B"], "--detector", data["det"],
                             "--n-ref", 30, "--device", "cpu")
    assert code == 0, err
    idx = np.sort(np.random.default_rng(0).choice(48, 30, replace=False))
    exp_p, exp_r = brute_force_pr(fa, fb[idx])
    words = out.split()
    assert words[0] == "precision" and float(words[1]) == pytest.approx(exp_p, abs=1e-4)
    assert words[2] == "recall" and float(words[3]) == pytest.approx(exp_r, abs=1e-4)


# ------------------------------------------------------------------ generated sources, seed sets

def test_parse_seeds_and_seed_sets():
    assert parse_seeds("0-4") == [0, 1, 2, 3, 4] and parse_seeds("3, 7-8") == [3, 7, 8]
    sets = seed_sets(list(range(50000)), 3)
    assert [(s[0], s[-1], len(s)) for s in sets] == [(0, 49999, 50000), (50000, 99999, 50000), (100000, 149999, 50000)]
    assert seed_sets([3, 7, 8], 2) == [[3, 7, 8], [9, 13, 14]]
    for bad in ("5-2", "a", "1,1", ""):
        with pytest.raises(Exception, match="--seeds"):
            parse_seeds(bad)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A randomly initialized tiny consistency model saved as an scmctl checkpoint (no training)."""
    from scmctl.config import Config
    from scmctl.nn.unet import build_network
    from scmctl.training import checkpoint as ck

    cfg = Config()
    n = cfg.network
    n.resolution, n.channels, n.num_classes, n.model_channels = 8, 3, 0, 16
    n.channel_mult, n.num_blocks, n.attn_resolutions, n.head_channels = [1, 2], 1, [4], 16
    torch.manual_seed(0)
    net = build_network(n)
    run = tmp_path_factory.mktemp("run")
    sd = net.state_dict()
    torch.save({"format": ck.FORMAT, "version": ck.VERSION, "kind": "consistency", "step": 1,
                "config": cfg.to_dict(), "net": sd, "ema": sd}, run / "checkpoint-0000001.pt")
    return run


def test_fid_of_a_checkpoint_over_seed_sets(capsys, data, checkpoint, tmp_path):
    from scmctl.generation import open_generator

    gen = open_generator(checkpoint, steps=2, t_mid=1.0, device="cpu")
    images = np.concatenate(list(gen.batches(range(12), 4)))
    fb = numpy_features(data["b"])
    ref = tmp_path / "ref.npz"
    np.savez(ref, mu=fb.mean(0), sigma=np.cov(fb, rowvar=False))
    r = ok_json(capsys, "eval", "fid", checkpoint, "--ref", ref, "--detector", data["det"], "--seeds", "0-3",
                "--repeat", 3, "--steps", 2, "--t-mid", 1.0, "--batch", 4, "--allow-small", "--json",
                "--device", "cpu")
    expected = [fd_stats(numpy_features(images[4 * k:4 * k + 4]), fb) for k in range(3)]
    assert r["seeds"] == ["0-3", "4-7", "8-11"] and (r["n"], r["repeat"]) == (4, 3)
    np.testing.assert_allclose(r["values"], expected, rtol=1e-4)
    assert r["value"] == r["min"] == min(r["values"]) and r["mean"] == pytest.approx(np.mean(r["values"]))
    info = r["generator"]
    assert (info["steps"], info["nfe"], info["t_mid"], info["kind"]) == (2, 2, 1.0, "consistency")
    assert info["checkpoint_sha256"] == sha256(checkpoint / "checkpoint-0000001.pt")
    assert len(set(r["values"])) == 3  # three different seed sets

    # -n N with --repeat: sets 0..N-1, N..2N-1 (the EDM/EDM2 rule); a folder refuses generator options
    r = ok_json(capsys, "eval", "fid", checkpoint, "--ref", ref, "--detector", data["det"], "-n", 4, "--repeat", 2,
                "--steps", 2, "--t-mid", 1.0, "--batch", 4, "--allow-small", "--json", "--device", "cpu")
    assert r["seeds"] == ["0-3", "4-7"]
    np.testing.assert_allclose(r["values"], expected[:2], rtol=1e-4)
    code, _, err = run_cli(capsys, "eval", "fid", data["A"], "--ref", ref, "--detector", data["det"], "--steps", 2,
                           "--allow-small")
    assert_one_line_error(code, err, "--steps", "checkpoint")
    code, _, err = run_cli(capsys, "eval", "fid", checkpoint, "--ref", ref, "--detector", data["det"], "-n", 5,
                           "--seeds", "0-3", "--allow-small")
    assert_one_line_error(code, err, "-n 5", "--seeds")
    code, _, err = run_cli(capsys, "eval", "fid", checkpoint, "--ref", ref, "--detector", data["det"], "-n", 4)
    assert_one_line_error(code, err, "50,000", "--allow-small")


def test_repeat_on_image_files_uses_consecutive_blocks(capsys, data):
    fb = numpy_features(data["b"])
    r = ok_json(capsys, "eval", "fid", data["A"], "--ref", data["B"], "--detector", data["det"], "--repeat", 3,
                "--allow-small", "--json", "--device", "cpu")
    expected = [fd_stats(numpy_features(data["a"][16 * k:16 * k + 16]), fb) for k in range(3)]
    assert (r["n"], r["repeat"], r["seeds"]) == (16, 3, None)
    np.testing.assert_allclose(r["values"], expected, rtol=1e-4)
    code, out, err = run_cli(capsys, "eval", "fid", data["A"], "--ref", data["B"], "--detector", data["det"],
                             "--repeat", 2, "-n", 20, "--allow-small", "--device", "cpu")
    assert code == 0, err
    line = out.strip()
    assert line.startswith("FID ") and "min of 2 sets" in line and "\n" not in line


# ------------------------------------------------------------------ offline-first weights

@pytest.mark.parametrize("env", ["SCMCTL_OFFLINE", "HF_HUB_OFFLINE"])
def test_offline_missing_weights_are_one_line_with_url(capsys, data, tmp_path, monkeypatch, no_network, env):
    cache = tmp_path / "cache"
    cache.mkdir()
    monkeypatch.setenv("SCMCTL_CACHE", str(cache))
    monkeypatch.setenv(env, "1")
    monkeypatch.setattr(det_mod, "CLEANFID_WEIGHT_DIRS", ())
    monkeypatch.setattr(det_mod, "DINOV2_WEIGHT_DIRS", ())
    for args, file, url in ((["fid"], INCEPTION_FILE, INCEPTION_URL), (["fd-dinov2"], DINOV2_FILE, DINOV2_URL),
                            (["kid"], INCEPTION_FILE, INCEPTION_URL), (["pr"], INCEPTION_FILE, INCEPTION_URL)):
        for extra in ([], ["--download"]):  # --download never reaches the network when offline
            code, out, err = run_cli(capsys, "eval", *args, data["A"], "--ref", data["B"], "--allow-small"
                                     if args[0] in ("fid", "fd-dinov2") else "--json", *extra)
            assert_one_line_error(code, err, file, url, str(cache), "offline")
            assert out == ""
    code, _, err = run_cli(capsys, "eval", "ref", data["B"], "--out", tmp_path / "r.npz", "--detector", "dinov2",
                           "--download")
    assert_one_line_error(code, err, DINOV2_FILE, DINOV2_URL)
    code, _, err = run_cli(capsys, "eval", "fd-dinov2", data["A"], "--ref", data["B"], "--allow-small",
                           "--dinov2", tmp_path / "nowhere.pth")
    assert_one_line_error(code, err, "--dinov2", "nowhere.pth", DINOV2_URL)
    code, _, err = run_cli(capsys, "eval", "fid", data["A"], "--ref", data["B"], "--allow-small",
                           "--inception", tmp_path / "nowhere.pt")
    assert_one_line_error(code, err, "--inception", "nowhere.pt", INCEPTION_URL)
    assert list(cache.iterdir()) == [] and not (tmp_path / "r.npz").exists()


def test_dinov2_found_in_cache_and_bad_files_refused(capsys, data, vit_file, tmp_path, monkeypatch, no_network):
    path, _ = vit_file
    monkeypatch.setenv("SCMCTL_CACHE", str(path.parent))
    monkeypatch.setattr(det_mod, "DINOV2_WEIGHT_DIRS", ())
    ref = tmp_path / "d.npz"
    s = ok_json(capsys, "eval", "ref", data["B"], "--out", ref, "--detector", "dinov2", "-n", 8, "--json",
                "--device", "cpu")
    assert (s["count"], s["dim"], s["detector_sha256"]) == (8, 128, sha256(path))
    marker = tmp_path / "executed"
    evil = tmp_path / "evil.pth"
    torch.save({"cls_token": Payload(open, str(marker), "w")}, evil)
    code, _, err = run_cli(capsys, "eval", "fd-dinov2", data["A"], "--ref", ref, "--dinov2", evil, "--allow-small")
    assert_one_line_error(code, err, str(evil), "refused")
    assert not marker.exists()
    notvit = tmp_path / "notvit.pth"
    torch.save({"w": torch.zeros(3)}, notvit)
    code, _, err = run_cli(capsys, "eval", "fd-dinov2", data["A"], "--ref", ref, "--dinov2", notvit, "--allow-small")
    assert_one_line_error(code, err, "not a DINOv2 ViT")
