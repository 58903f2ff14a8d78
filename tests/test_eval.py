"""`scmctl eval fid` and the metric pieces, checked against independent float64 computations.

No real Inception weights are used: a stand-in TorchScript detector (downsample + fixed random
projection) for the CLI, and a stand-in with Inception's TorchScript interface (written to tmp_path
only) to check that both clean-fid modes reproduce clean-fid's own pipeline.
"""

from __future__ import annotations

import hashlib
import json
import socket
import subprocess
import sys
import urllib.request
import warnings
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn.functional as F

from _cli import Payload, assert_one_line_error, run as run_cli
from scmctl.data.imageio import list_image_files, read_image, write_png
from scmctl.metrics import detectors as det_mod
from scmctl.metrics import (INCEPTION_FILE, INCEPTION_URL, InceptionDetector, StreamingStats,
                            compute_stats, find_inception_weights, frechet_distance)

REPO = Path(__file__).resolve().parents[1]
D = 16  # stand-in feature dimension


# ------------------------------------------------------------------ independent references

def fid_sqrtm(mu1, s1, mu2, s2) -> float:
    """Textbook FID with scipy's sqrtm (the computation scmctl deliberately avoids)."""
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean).real)


def fid_from_features_lowrank(f1, f2) -> float:
    """FID of two feature sets via the nuclear norm: with centred X_i and Σ_i = X_iᵀX_i/(n_i-1),
    tr √(Σ1Σ2) = ‖X1 X2ᵀ‖_* / √((n1-1)(n2-1)). Exact, and cheap when n << D."""
    x1, x2 = f1 - f1.mean(0), f2 - f2.mean(0)
    k1, k2 = len(f1) - 1, len(f2) - 1
    tr_covmean = np.linalg.svd(x1 @ x2.T, compute_uv=False).sum() / np.sqrt(k1 * k2)
    diff = f1.mean(0) - f2.mean(0)
    return float(diff @ diff + (x1 ** 2).sum() / k1 + (x2 ** 2).sum() / k2 - 2 * tr_covmean)


def random_spd(rng, d, rank=None):
    a = rng.standard_normal((d, rank or d))
    return a @ a.T + (1e-3 * np.eye(d) if rank is None else 0)


def test_frechet_distance_matches_sqrtm_on_random_spd():
    rng = np.random.default_rng(0)
    for d in (1, 5, 32):
        mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
        s1, s2 = random_spd(rng, d), random_spd(rng, d)
        ref = fid_sqrtm(mu1, s1, mu2, s2)
        assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(ref, rel=1e-9, abs=1e-9)
        # symmetric in its two arguments
        assert frechet_distance(mu2, s2, mu1, s1) == pytest.approx(ref, rel=1e-9, abs=1e-9)


def test_frechet_distance_closed_form_commuting_and_singular():
    rng = np.random.default_rng(1)
    d = 24
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    a, b = rng.uniform(0, 3, d), rng.uniform(0, 3, d)
    a[:5] = 0.0  # singular covariance: commuting closed form still holds
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    s1, s2 = q @ np.diag(a) @ q.T, q @ np.diag(b) @ q.T
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-9)
    # diagonal covariances
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-12)
    # identical rank-deficient sample covariance (10 points in 64-d): distance 0, never negative
    x = rng.standard_normal((10, 64)) * 3
    mu, s = x.mean(0), np.cov(x, rowvar=False)
    fd = frechet_distance(mu, s, mu, s)
    assert 0.0 <= fd < 1e-9 * np.trace(s)


def test_frechet_distance_low_rank_sample_covariances():
    # fewer samples than dimensions (singular Σ), as with small --allow-small runs at 2048-d
    rng = np.random.default_rng(3)
    f1 = rng.standard_normal((12, 300)) * rng.uniform(0.5, 2, 300)
    f2 = rng.standard_normal((9, 300)) + 0.3
    expected = fid_from_features_lowrank(f1, f2)
    fd = frechet_distance(f1.mean(0), np.cov(f1, rowvar=False), f2.mean(0), np.cov(f2, rowvar=False))
    assert fd == pytest.approx(expected, rel=1e-9)


def test_streaming_stats_match_numpy_one_shot():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((503, 12)) * rng.uniform(0.1, 5, 12) + 1e3  # large offset: no cancellation
    s = StreamingStats()
    for lo, hi in ((0, 1), (1, 64), (64, 65), (65, 300), (300, 503)):
        s.update(x[lo:hi].astype(np.float32) if lo == 64 else x[lo:hi])
    x[64:65] = x[64:65].astype(np.float32)  # the float32 batch as seen
    assert s.n == 503
    np.testing.assert_allclose(s.mu, x.mean(0), rtol=1e-13)
    np.testing.assert_allclose(s.sigma, np.cov(x, rowvar=False), rtol=1e-9, atol=1e-12)
    mu, sigma = compute_stats(torch.from_numpy(x))
    np.testing.assert_allclose(mu, x.mean(0), rtol=1e-13)
    np.testing.assert_allclose(sigma, np.cov(x, rowvar=False), rtol=1e-9, atol=1e-12)
    assert mu.dtype == np.float64 and sigma.dtype == np.float64


# ------------------------------------------------------------------ stand-in detector and data

class _StandIn(torch.nn.Module):
    """uint8 NCHW -> tanh(4x4 average pool of x/255 @ W): any size divisible by 4."""

    def __init__(self, w: torch.Tensor):
        super().__init__()
        self.register_buffer("w", w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = F.adaptive_avg_pool2d(x.float() / 255.0, 4).flatten(1)
        return torch.tanh(f @ self.w)


def standin_weights() -> np.ndarray:
    return np.random.default_rng(123).standard_normal((48, D)).astype(np.float32)


def numpy_features(images: np.ndarray) -> np.ndarray:
    """The stand-in's features in float64 numpy, from uint8 NHWC images (grayscale repeated)."""
    x = images.astype(np.float64) / 255.0
    if x.shape[3] == 1:
        x = np.repeat(x, 3, axis=3)
    n, h, w, c = x.shape
    pooled = x.reshape(n, 4, h // 4, 4, w // 4, c).mean(axis=(2, 4))  # (n, 4, 4, c)
    flat = pooled.transpose(0, 3, 1, 2).reshape(n, 48)  # C, H, W order like torch's flatten
    return np.tanh(flat @ standin_weights().astype(np.float64))


def numpy_fid(a: np.ndarray, b: np.ndarray) -> float:
    fa, fb = numpy_features(a), numpy_features(b)
    return fid_sqrtm(fa.mean(0), np.cov(fa, rowvar=False), fb.mean(0), np.cov(fb, rowvar=False))


def write_folder(folder: Path, images: np.ndarray) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, im in enumerate(images):
        write_png(folder / f"{i:06d}.png", im)
    return folder


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("fid")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        det = torch.jit.script(_StandIn(torch.from_numpy(standin_weights())))
        det.save(str(root / "det.pt"))
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (1, 16, 16, 3))
    a = np.clip(base + rng.integers(-60, 61, (64, 16, 16, 3)), 0, 255).astype(np.uint8)
    b = np.clip(a.astype(int) + np.array([40, 0, -25]), 0, 255).astype(np.uint8)  # shifted colour
    g = rng.integers(0, 256, (40, 16, 16, 1)).astype(np.uint8)
    return dict(root=root, det=str(root / "det.pt"), a=a, b=b, g=g,
                A=write_folder(root / "A", a), B=write_folder(root / "B", b), G=write_folder(root / "G", g))


def fid_json(capsys, samples, ref, det, *extra):
    code, out, err = run_cli(capsys, "eval", "fid", samples, "--ref", ref, "--detector", det,
                             "--allow-small", "--json", "--device", "cpu", *extra)
    assert code == 0, err
    lines = out.strip().splitlines()
    assert len(lines) == 1, out  # exactly one JSON object on stdout
    return json.loads(lines[0])


# ------------------------------------------------------------------ CLI end to end

def test_fid_folder_vs_itself_and_shifted(capsys, data):
    r = fid_json(capsys, data["A"], data["A"], data["det"])
    assert set(r) == {"metric", "value", "min", "mean", "values", "n", "repeat", "seeds", "mode", "detector",
                      "detector_sha256", "ref", "ref_sha256", "n_ref", "samples"}
    assert (r["metric"], r["n"], r["n_ref"], r["detector"], r["mode"]) == ("fid", 64, 64, data["det"], "native")
    assert (r["ref"], r["samples"], r["repeat"], r["seeds"]) == (str(data["A"]), str(data["A"]), 1, None)
    assert r["detector_sha256"] == hashlib.sha256(Path(data["det"]).read_bytes()).hexdigest()
    assert r["ref_sha256"] is None  # a folder, not a file
    assert 0.0 <= r["value"] < 1e-9 and r["values"] == [r["value"]] == [r["min"]] == [r["mean"]]

    r = fid_json(capsys, data["A"], data["B"], data["det"], "--batch", "7")  # ragged batches
    expected = numpy_fid(data["a"], data["b"])
    assert expected > 0.05
    assert r["value"] == pytest.approx(expected, rel=1e-4)


def test_fid_first_n_and_npz_reference(capsys, data, tmp_path):
    expected = numpy_fid(data["a"][:40], data["b"])
    r = fid_json(capsys, data["A"], data["B"], data["det"], "-n", "40")
    assert r["n"] == 40 and r["value"] == pytest.approx(expected, rel=1e-4)

    fb = numpy_features(data["b"])
    ref = tmp_path / "ref.npz"
    np.savez(ref, mu=fb.mean(0), sigma=np.cov(fb, rowvar=False))
    r = fid_json(capsys, data["A"], ref, data["det"], "-n", "40")
    assert "n_ref" not in r and r["ref"] == str(ref)
    assert r["value"] == pytest.approx(expected, rel=1e-4)


def test_fid_samples_as_npz_and_run_directory(capsys, data, tmp_path):
    folder = fid_json(capsys, data["A"], data["B"], data["det"])["value"]
    np.savez(tmp_path / "named.npz", images=data["a"])
    np.savez(tmp_path / "positional.npz", data["a"])  # key arr_0
    run = tmp_path / "run"
    write_folder(run / "samples", data["a"])
    (run / "config.yaml").write_text("seed: 0\n")
    for samples in (tmp_path / "named.npz", tmp_path / "positional.npz", run):
        assert fid_json(capsys, samples, data["B"], data["det"])["value"] == pytest.approx(folder, rel=1e-6)


def test_grayscale_is_repeated_to_rgb(capsys, data, tmp_path):
    rgb = tmp_path / "rgb.npz"
    np.savez(rgb, images=np.repeat(data["g"], 3, axis=3))
    r = fid_json(capsys, data["G"], rgb, data["det"])
    assert 0.0 <= r["value"] < 1e-9
    r = fid_json(capsys, data["G"], data["A"], data["det"])
    assert r["value"] == pytest.approx(numpy_fid(data["g"], data["a"]), rel=1e-4)


def test_mixed_sizes_are_batched_by_shape(capsys, data, tmp_path):
    big = np.repeat(np.repeat(data["a"][:8], 2, axis=1), 2, axis=2)  # 32x32: same pooled features
    folder = tmp_path / "mixed"
    write_folder(folder, data["a"][:24])
    for i, im in enumerate(big):
        write_png(folder / f"{24 + i:06d}b.png", im)
    r = fid_json(capsys, folder, data["B"], data["det"], "--batch", "5")
    assert r["n"] == 32
    expected = numpy_fid(np.concatenate([data["a"][:24], data["a"][:8]]), data["b"])
    assert r["value"] == pytest.approx(expected, rel=1e-4)


def test_human_output(capsys, data):
    code, out, err = run_cli(capsys, "eval", "fid", data["A"], "--ref", data["B"], "--detector",
                             data["det"], "--allow-small", "--device", "cpu")
    assert code == 0, err
    expected = numpy_fid(data["a"], data["b"])
    line = out.strip()
    assert line.startswith("FID ") and "\n" not in line
    assert float(line.split()[1]) == pytest.approx(expected, rel=1e-3)
    assert "50,000" in err  # the small-sample note


def test_json_via_python_m_scmctl(data):
    proc = subprocess.run([sys.executable, "-m", "scmctl", "eval", "fid", str(data["A"]), "--ref",
                           str(data["B"]), "--detector", data["det"], "--allow-small", "--json",
                           "--device", "cpu"], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stderr
    (line,) = proc.stdout.strip().splitlines()
    assert json.loads(line)["value"] == pytest.approx(numpy_fid(data["a"], data["b"]), rel=1e-4)


# ------------------------------------------------------------------ bad input: exit 2, one line

def test_fewer_than_50k_refused(capsys, data):
    code, out, err = run_cli(capsys, "eval", "fid", data["A"], "--ref", data["B"], "--detector", data["det"])
    assert_one_line_error(code, err, "50,000", "--allow-small", "64")
    assert out == ""
    code, out, err = run_cli(capsys, "eval", "fid", data["A"], "--ref", data["B"], "--detector",
                             data["det"], "--allow-small", "-n", "65")
    assert_one_line_error(code, err, "-n 65")


def test_missing_ref_option_is_exit_2(capsys, data):
    code, out, err = run_cli(capsys, "eval", "fid", data["A"], "--detector", data["det"], "--allow-small")
    assert_one_line_error(code, err, "--ref")
    assert out == ""


def test_non_torchscript_detector_refused(capsys, data, tmp_path):
    sd = tmp_path / "state_dict.pt"
    torch.save({"w": torch.zeros(3)}, sd)
    txt = tmp_path / "notes.pt"
    txt.write_text("not a model")
    for bad in (sd, txt):
        code, _, err = run_cli(capsys, "eval", "fid", data["A"], "--ref", data["B"], "--detector", bad,
                               "--allow-small")
        assert_one_line_error(code, err, "not a TorchScript module", str(bad))
    code, _, err = run_cli(capsys, "eval", "fid", data["A"], "--ref", data["B"], "--detector",
                           tmp_path / "missing.pt", "--allow-small")
    assert_one_line_error(code, err, "no such file")
    code, _, err = run_cli(capsys, "eval", "fid", data["A"], "--ref", data["B"], "--detector",
                           data["det"], "--mode", "clean", "--allow-small")
    assert_one_line_error(code, err, "--mode")


def test_pickled_reference_refused(capsys, data, tmp_path):
    marker = tmp_path / "executed"
    bad = tmp_path / "pickled.npz"
    obj = np.empty(1, dtype=object)
    obj[0] = Payload(open, str(marker), "w")
    np.savez(bad, mu=obj, sigma=np.eye(D))
    pkl = tmp_path / "img64.pkl"
    import pickle

    pkl.write_bytes(pickle.dumps({"mu": Payload(open, str(marker), "w")}))
    for ref, needle in ((bad, "pickled"), (pkl, "unpickle")):
        code, _, err = run_cli(capsys, "eval", "fid", data["A"], "--ref", ref, "--detector", data["det"],
                               "--allow-small")
        assert_one_line_error(code, err, str(ref), needle)
    assert not marker.exists()


def test_reference_of_another_detector_refused(capsys, data, tmp_path):
    ref = tmp_path / "ref2048.npz"
    np.savez(ref, mu=np.zeros(8), sigma=np.eye(8))
    code, _, err = run_cli(capsys, "eval", "fid", data["A"], "--ref", ref, "--detector", data["det"],
                           "--allow-small", "--device", "cpu")
    assert code == 2 and "8-d" in err.strip().splitlines()[-1] and "Traceback" not in err


# ------------------------------------------------------------------ Inception: offline lookup, modes

@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(urllib.request, "urlopen", refuse)


def test_missing_inception_weights_one_line_no_network(capsys, data, tmp_path, monkeypatch, no_network):
    cache = tmp_path / "cache"
    cache.mkdir()
    monkeypatch.setenv("SCMCTL_CACHE", str(cache))
    code, out, err = run_cli(capsys, "eval", "fid", data["A"], "--ref", data["B"], "--allow-small", "--json")
    assert_one_line_error(code, err, INCEPTION_FILE, INCEPTION_URL, str(cache))
    assert out == "" and list(cache.iterdir()) == []
    code, out, err = run_cli(capsys, "eval", "fid", data["A"], "--ref", data["B"], "--allow-small",
                             "--inception-weights", tmp_path / "nowhere.pt")
    assert_one_line_error(code, err, "nowhere.pt", INCEPTION_URL)


class _FakeLayers(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("w", torch.from_numpy(
            np.random.default_rng(7).standard_normal((48, 2048)).astype(np.float32)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(F.adaptive_avg_pool2d(x, 4).flatten(1) @ self.w)


class _FakeInception(torch.nn.Module):
    """Inception's TorchScript interface: forward(img 0..255, return_features) resizes inside;
    `layers` takes normalized 299x299 input."""

    def __init__(self):
        super().__init__()
        self.layers = _FakeLayers()

    def forward(self, img: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        x = F.interpolate(img.float(), size=(299, 299), mode="bilinear", align_corners=False)
        return self.layers((x - 128) / 128)


@pytest.fixture(scope="module")
def fake_inception(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fake-inception")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.script(_FakeInception()).save(str(folder / INCEPTION_FILE))
    return folder / INCEPTION_FILE


def cleanfid_features(files, weights_dir, mode):
    """clean-fid's own pipeline (its dataset, resizer and InceptionV3W) on the stand-in weights."""
    from cleanfid.fid import get_files_features
    from cleanfid.inception_torchscript import InceptionV3W

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = InceptionV3W(str(weights_dir), download=False, resize_inside=(mode == "legacy_tensorflow"))
    return get_files_features([str(f) for f in files], model=model, num_workers=0, batch_size=5,
                              device=torch.device("cpu"), mode=mode, verbose=False)


def test_inception_modes_reproduce_cleanfid(capsys, data, fake_inception, monkeypatch, no_network):
    files = list_image_files(data["A"])[:6] + list_image_files(data["G"])[:4]  # RGB and grayscale
    images = [torch.from_numpy(read_image(f).copy()).permute(2, 0, 1)[None] for f in files]
    feats = {}
    for mode in ("legacy_tensorflow", "clean"):
        det = InceptionDetector(fake_inception, mode=mode, device="cpu")
        ours = np.concatenate([det.features(im).numpy() for im in images])
        theirs = cleanfid_features(files, fake_inception.parent, mode)
        assert ours.shape == (10, 2048)
        np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-5)
        feats[mode] = ours
    assert np.abs(feats["clean"] - feats["legacy_tensorflow"]).max() > 1e-3  # the modes differ

    # The CLI on the same stand-in, found through SCMCTL_CACHE, against a numpy/sqrtm FID of
    # clean-fid's features; the reported mode is the one used.
    monkeypatch.setenv("SCMCTL_CACHE", str(fake_inception.parent))
    monkeypatch.setattr(det_mod, "INCEPTION_SHA256", det_mod.sha256_file(fake_inception))  # pin the stand-in
    assert find_inception_weights() == fake_inception
    a_files, b_files = list_image_files(data["A"])[:12], list_image_files(data["B"])[:12]
    sub_a, sub_b = data["root"] / "A12", data["root"] / "B12"
    write_folder(sub_a, data["a"][:12])
    write_folder(sub_b, data["b"][:12])
    fa = cleanfid_features(a_files, fake_inception.parent, "clean").astype(np.float64)
    fb = cleanfid_features(b_files, fake_inception.parent, "clean").astype(np.float64)
    expected = fid_from_features_lowrank(fa, fb)  # 12 samples in 2048-d: rank 11
    code, out, err = run_cli(capsys, "eval", "fid", sub_a, "--ref", sub_b, "--mode", "clean",
                             "--allow-small", "--json", "--device", "cpu")
    assert code == 0, err
    r = json.loads(out)
    assert (r["detector"], r["mode"], r["n"], r["n_ref"]) == ("inception", "clean", 12, 12)
    assert r["value"] == pytest.approx(expected, rel=1e-3)


def test_inception_weights_option_accepts_other_file_names(data, fake_inception, tmp_path):
    other = tmp_path / "my-inception.pt"
    other.write_bytes(fake_inception.read_bytes())
    assert find_inception_weights(other) == other
    assert find_inception_weights(fake_inception.parent) == fake_inception
    det = InceptionDetector(find_inception_weights(other), mode="legacy_tensorflow", device="cpu")
    x = torch.from_numpy(data["a"][:3]).permute(0, 3, 1, 2)
    ref = InceptionDetector(fake_inception, mode="legacy_tensorflow", device="cpu").features(x)
    torch.testing.assert_close(det.features(x), ref)
    truncated = tmp_path / "truncated" / INCEPTION_FILE
    truncated.parent.mkdir()
    truncated.write_bytes(fake_inception.read_bytes()[:1000])
    with pytest.raises(Exception, match="truncated"):
        InceptionDetector(truncated, device="cpu")
