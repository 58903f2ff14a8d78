"""`scmctl sample` at scale: per-seed images, sharding over processes, resume, .npz output,
manifests, and the 2-step t_mid search, on a tiny random conditional U-Net built here (no training).

Independent references: a float64 per-image re-implementation of the 2-step sampler (seed ->
label -> noises -> two consistency steps), float64 numpy features of the stand-in detector, and
the textbook FID with scipy's sqrtm.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn.functional as F

from scmctl.data.imageio import read_image, write_png
from _cli import run

SD = 0.5
CLASSES = 4
RES = 8
FEAT = 6  # stand-in feature dimension


pytestmark = pytest.mark.usefixtures("one_thread")   # tests/conftest.py: tiny networks run faster on one thread


def _tiny_config():
    from scmctl import config

    return config.resolve("tiny", "sct", [
        "data.resolution=8", "network.resolution=8", "network.channels=3", f"network.num_classes={CLASSES}",
        "network.model_channels=8", "network.attn_resolutions=[4]", "network.head_channels=8",
        "network.adaptive_weight_channels=8"])


def make_checkpoint(path: Path, seed: int) -> Path:
    """A conditional consistency-model checkpoint with random weights (the output layer starts at
    zero gain in a fresh network, so every parameter is perturbed to make images non-trivial)."""
    from scmctl.nn.networks import build_network
    from scmctl.training import checkpoint as ck

    cfg = _tiny_config()
    torch.manual_seed(seed)
    net = build_network(cfg.network)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.5 * torch.randn_like(p))
    state = net.state_dict()
    ck.save_atomic({"format": ck.FORMAT, "version": ck.VERSION, "kind": "consistency", "step": 0,
                    "config": cfg.to_dict(), "net": state, "ema": state, "optimizer": {}}, path)
    return path


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    return make_checkpoint(root / "a.pt", 0), make_checkpoint(root / "b.pt", 1)




def sample_json(capsys, *args) -> dict:
    code, out, err = run(capsys, "sample", *args, "--device", "cpu", "--json")
    assert code == 0, err
    lines = [ln for ln in out.splitlines() if ln.strip()]
    assert len(lines) == 1, out
    return json.loads(lines[0])


def npz(path):
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def pngs(folder: Path) -> dict[str, np.ndarray]:
    return {p.name: read_image(p) for p in sorted(folder.glob("*.png"))}


def env1():
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


# ------------------------------------------------------------------ independent float64 sampler

def reference_2step(ckpt: Path, seeds, t_mid: float = 1.1):
    """(float64 images in uint8 units before rounding (N, H, W, C), labels): each image alone, in
    float64, from the 2-step formulas (multistep consistency sampling, Song et al. 2023 Alg. 1, in TrigFlow) and the documented per-seed draws
    (label first, then one noise image per step)."""
    from scmctl.config import from_dict
    from scmctl.nn.networks import build_network

    state = torch.load(ckpt, weights_only=True)
    net = build_network(from_dict(state["config"]).network)
    net.load_state_dict(state["ema"], strict=False)
    net = net.double().eval()
    t_max = math.atan(80 / SD)
    vals, labels = [], []
    with torch.no_grad():
        for s in seeds:
            g = torch.Generator().manual_seed(int(s))
            c = int(torch.randint(CLASSES, (1,), generator=g))
            z = torch.randn((2, 3, RES, RES), generator=g).double()
            lab = torch.tensor([c])
            x = SD * z[0:1]
            x0 = math.cos(t_max) * x - math.sin(t_max) * SD * net(x / SD, torch.tensor([t_max], dtype=torch.float64), lab)
            x = math.cos(t_mid) * x0 + math.sin(t_mid) * SD * z[1:2]
            x0 = math.cos(t_mid) * x - math.sin(t_mid) * SD * net(x / SD, torch.tensor([t_mid], dtype=torch.float64), lab)
            vals.append((x0 * 127.5 + 127.5)[0].permute(1, 2, 0).numpy())
            labels.append(c)
    return np.stack(vals), np.array(labels)


def assert_matches_reference(images: np.ndarray, ref_vals: np.ndarray, margin: float = 2e-3) -> np.ndarray:
    """uint8 images equal the rounded float64 reference wherever its value is not within `margin`
    of a rounding boundary (float32 round-off is ~1e-4 uint8 units). Returns the ambiguous mask."""
    expected = np.clip(np.round(ref_vals), 0, 255).astype(np.uint8)
    ambiguous = np.abs(ref_vals - np.floor(ref_vals) - 0.5) < margin
    assert images.dtype == np.uint8 and images.shape == expected.shape
    assert np.array_equal(images[~ambiguous], expected[~ambiguous])
    assert np.abs(images.astype(int) - expected.astype(int)).max() <= 1
    assert ambiguous.mean() < 0.02  # the check covers almost every pixel
    assert expected.std() > 20  # non-trivial images
    return ambiguous


# ------------------------------------------------------------------ per-seed images, npz layout

def test_image_k_is_its_seeds_image_for_batch_sizes_1_3_7(tmp_path, capsys, ckpts):
    a, _ = ckpts
    n, seed = 10, 5
    ref_vals, ref_labels = reference_2step(a, range(seed, seed + n))
    arrays = []
    for b in (1, 3, 7):
        out = tmp_path / f"b{b}.npz"
        s = sample_json(capsys, a, "-n", n, "--seed", seed, "--batch", b, "--out", out)
        assert s["count"] == n and s["generated"] == n and s["format"] == "npz" and s["nfe"] == 2
        assert s["seeds"] == [seed, seed + n - 1] and s["label"] == "random" and s["t_mid"] == 1.1
        z = npz(out)
        assert set(z) == {"arr_0", "labels"}
        assert z["arr_0"].shape == (n, RES, RES, 3) and z["arr_0"].dtype == np.uint8
        assert z["labels"].dtype == np.int64 and np.array_equal(z["labels"], ref_labels)
        ambiguous = assert_matches_reference(z["arr_0"], ref_vals)
        arrays.append((z["arr_0"], ambiguous))
        assert not out.with_name(out.name + ".parts").exists()  # chunks removed after the merge
        m = json.loads(out.with_name(out.name + ".json").read_text())
        assert m["checkpoint_sha256"] == s["checkpoint_sha256"] and m["n"] == n and m["batch"] == b
    # batch sizes change float32 results at round-off level only: bytes differ nowhere else
    for other, _ in arrays[1:]:
        differs = other != arrays[0][0]
        assert not (differs & ~arrays[0][1]).any()


def test_fixed_label_and_png_folder_match_npz(tmp_path, capsys, ckpts):
    a, _ = ckpts
    s = sample_json(capsys, a, "-n", 6, "--label", 2, "--batch", 4, "--out", tmp_path / "l2.npz")
    assert s["label"] == 2
    z = npz(tmp_path / "l2.npz")
    assert np.array_equal(z["labels"], np.full(6, 2))
    zr = npz(_sample_npz(capsys, a, tmp_path / "rnd.npz", 6, 4))
    assert not np.array_equal(z["arr_0"], zr["arr_0"])  # the label reaches the network
    sample_json(capsys, a, "-n", 6, "--batch", 4, "--out", tmp_path / "png")
    files = pngs(tmp_path / "png")
    assert list(files) == [f"{i:06d}.png" for i in range(6)]
    assert np.array_equal(np.stack(list(files.values())), zr["arr_0"])  # same batches, same bytes
    assert json.loads((tmp_path / "png" / "samples.json").read_text())["format"] == "png"


def _sample_npz(capsys, ckpt, out, n, batch):
    sample_json(capsys, ckpt, "-n", n, "--batch", batch, "--out", out)
    return out


# ------------------------------------------------------------------ 1 vs 2 processes (gloo)

def _torchrun(*args):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "scmctl", "sample", *map(str, args), "--device", "cpu", "--json"]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env1(), timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
    assert len(lines) == 1, p.stdout  # rank 0 alone reports
    return json.loads(lines[0])


def test_two_processes_equal_one_byte_for_byte(tmp_path, capsys, ckpts):
    a, _ = ckpts
    n, b = 11, 3  # 4 global batches, the last one partial: ranks take 2 each
    one_png, one_npz = tmp_path / "one", tmp_path / "one.npz"
    sample_json(capsys, a, "-n", n, "--batch", b, "--out", one_png)
    sample_json(capsys, a, "-n", n, "--batch", b, "--out", one_npz)
    s = _torchrun(a, "-n", n, "--batch", b, "--out", tmp_path / "two")
    assert s["world_size"] == 2 and s["count"] == n and s["generated"] == n
    s = _torchrun(a, "-n", n, "--batch", b, "--out", tmp_path / "two.npz")
    assert s["world_size"] == 2
    one, two = pngs(one_png), pngs(tmp_path / "two")
    assert list(one) == list(two) == [f"{i:06d}.png" for i in range(n)]
    assert all(np.array_equal(one[k], two[k]) for k in one)
    z1, z2 = npz(one_npz), npz(tmp_path / "two.npz")
    assert np.array_equal(z1["arr_0"], z2["arr_0"]) and np.array_equal(z1["labels"], z2["labels"])


# ------------------------------------------------------------------ resume

def test_killed_npz_run_resumes_to_the_uninterrupted_result(tmp_path, capsys, ckpts):
    a, _ = ckpts
    n, b = 300, 2
    out = tmp_path / "killed.npz"
    parts = tmp_path / "killed.npz.parts"
    cmd = [sys.executable, "-m", "scmctl", "sample", str(a), "-n", str(n), "--batch", str(b),
           "--out", str(out), "--device", "cpu"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env1())
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if parts.is_dir() and len(list(parts.glob("batch-*[0-9].npy"))) >= 3:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL and not out.exists()
    done_before = len(list(parts.glob("batch-*[0-9].npy")))
    assert 3 <= done_before < n // b
    (parts / ".tmp-half-written.npy").write_bytes(b"\x93NUMPY garbage")
    s = sample_json(capsys, a, "-n", n, "--batch", b, "--out", out)
    assert s["generated"] == n - done_before * b
    full = npz(_sample_npz(capsys, a, tmp_path / "full.npz", n, b))
    resumed = npz(out)
    assert np.array_equal(resumed["arr_0"], full["arr_0"]) and np.array_equal(resumed["labels"], full["labels"])
    assert len({im.tobytes() for im in resumed["arr_0"]}) == n  # n distinct images
    assert not parts.exists()
    # the complete output is left alone by a re-run
    s = sample_json(capsys, a, "-n", n, "--batch", b, "--out", out)
    assert s["generated"] == 0 and np.array_equal(npz(out)["arr_0"], full["arr_0"])


def test_png_folder_resume_after_lost_files_and_a_stray_temp_file(tmp_path, capsys, ckpts):
    a, _ = ckpts
    n, b = 13, 4
    out = tmp_path / "png"
    sample_json(capsys, a, "-n", n, "--batch", b, "--out", out)
    full = pngs(out)
    for k in (1, 2, 9, 12):  # batch 0 loses two images, batches 2 and 3 one each
        (out / f"{k:06d}.png").unlink()
    (out / ".tmp-000001.png.abc12345").write_bytes(b"\x89PNG half")  # a killed writer's temp file
    (out / ".tmp-notes.txt.abc12345").write_bytes(b"someone else's")    # not ours: kept
    s = sample_json(capsys, a, "-n", n, "--batch", b, "--out", out)
    assert s["generated"] == 4 + 4 + 1  # the three affected batches are recomputed whole
    again = pngs(out)
    assert list(again) == list(full) and all(np.array_equal(again[k], full[k]) for k in full)
    assert [p.name for p in out.glob(".tmp-*")] == [".tmp-notes.txt.abc12345"]
    assert len({im.tobytes() for im in again.values()}) == n
    # growing -n continues the same folder
    s = sample_json(capsys, a, "-n", n + 3, "--batch", b, "--out", out)
    assert s["generated"] == 4 and len(pngs(out)) == n + 3


# ------------------------------------------------------------------ refusals

def _bad(capsys, *args):
    code, out, err = run(capsys, "sample", *args, "--device", "cpu")
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert code == 2 and lines and lines[-1].startswith("error:") and "Traceback" not in err, err
    return lines[-1]


def test_resume_with_other_settings_or_checkpoint_is_refused(tmp_path, capsys, ckpts):
    a, b = ckpts
    for out in (tmp_path / "p", tmp_path / "p.npz"):
        sample_json(capsys, a, "-n", 4, "--batch", 2, "--out", out)
        before = sorted(p.name for p in tmp_path.rglob("*"))
        assert "steps=2" in _bad(capsys, a, "-n", 4, "--batch", 2, "--out", out, "--steps", 1)
        assert "checkpoint_sha256" in _bad(capsys, b, "-n", 4, "--batch", 2, "--out", out)
        assert "t_mid=1.1" in _bad(capsys, a, "-n", 4, "--batch", 2, "--out", out, "--t-mid", 0.8)
        assert "guidance" in _bad(capsys, a, "-n", 4, "--batch", 2, "--out", out, "--guidance", 1.5)
        assert sorted(p.name for p in tmp_path.rglob("*")) == before  # nothing touched
    assert "-n 4" in _bad(capsys, a, "-n", 6, "--batch", 2, "--out", tmp_path / "p.npz")
    assert "would leave" in _bad(capsys, a, "-n", 2, "--batch", 2, "--out", tmp_path / "p")
    assert ".npz" in _bad(capsys, a, "-n", 2, "--format", "npz", "--out", tmp_path / "x")
    assert "--format" in _bad(capsys, a, "-n", 2, "--format", "jpg")
    assert "-n is required" in _bad(capsys, a)
    assert "--search-tmid" in _bad(capsys, a, "-n", 2, "--tmid-grid", "1.0")
    (tmp_path / "foreign").mkdir()
    write_png(tmp_path / "foreign" / "000000.png", np.zeros((8, 8, 3), np.uint8))
    assert "samples.json" in _bad(capsys, a, "-n", 2, "--out", tmp_path / "foreign")


# ------------------------------------------------------------------ t_mid search

class _StandIn(torch.nn.Module):
    """uint8 NCHW -> tanh(2x2 average pool of x/255 @ W): (N, FEAT) features."""

    def __init__(self, w: torch.Tensor):
        super().__init__()
        self.register_buffer("w", w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(F.adaptive_avg_pool2d(x.float() / 255.0, 2).flatten(1) @ self.w)


def _standin_w() -> np.ndarray:
    return np.random.default_rng(7).standard_normal((12, FEAT)).astype(np.float32) * 2


def numpy_features(images: np.ndarray) -> np.ndarray:
    x = images.astype(np.float64) / 255.0
    n, h, w, c = x.shape
    pooled = x.reshape(n, 2, h // 2, 2, w // 2, c).mean(axis=(2, 4)).transpose(0, 3, 1, 2).reshape(n, 12)
    return np.tanh(pooled @ _standin_w().astype(np.float64))


def fid_sqrtm(f1: np.ndarray, mu2, s2) -> float:
    mu1, s1 = f1.mean(0), np.cov(f1, rowvar=False)
    d = mu1 - mu2
    return float(d @ d + np.trace(s1) + np.trace(s2) - 2 * np.trace(scipy.linalg.sqrtm(s1 @ s2)).real)


def test_tmid_search_grid_and_ternary_equal_independent_fids(tmp_path, capsys, ckpts):
    a, _ = ckpts
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.script(_StandIn(torch.from_numpy(_standin_w()))).save(str(tmp_path / "det.pt"))
    rng = np.random.default_rng(0)
    real = rng.integers(0, 256, (60, RES, RES, 3)).astype(np.uint8)
    fr = numpy_features(real)
    mu_r, s_r = fr.mean(0), np.cov(fr, rowvar=False)
    np.savez(tmp_path / "ref.npz", mu=mu_r, sigma=s_r)
    n, seed = 24, 3
    common = ["--ref", tmp_path / "ref.npz", "--detector", tmp_path / "det.pt", "-n", n, "--seed", seed, "--batch", 8]
    r = sample_json(capsys, a, "--search-tmid", "--tmid-grid", "1.1,0.6", *common)
    assert r["search"] == "grid" and [p["t_mid"] for p in r["points"]] == [0.6, 1.1]
    assert r["n"] == n and r["seeds"] == [seed, seed + n - 1]
    for p in r["points"]:  # the same seeds (and batches) written out, then an independent FID
        out = tmp_path / f"t{p['t_mid']}.npz"
        sample_json(capsys, a, "--t-mid", p["t_mid"], "-n", n, "--seed", seed, "--batch", 8, "--out", out)
        expected = fid_sqrtm(numpy_features(npz(out)["arr_0"]), mu_r, s_r)
        assert p["fid"] == pytest.approx(expected, rel=1e-6, abs=1e-9)
    assert r["best"] == min(r["points"], key=lambda p: p["fid"])
    assert r["points"][0]["fid"] != r["points"][1]["fid"]
    # ternary search: 2 iterations = 4 distinct points, each an FID of the same kind
    t = sample_json(capsys, a, "--search-tmid", "--tmid-range", "0.3,1.5", "--iters", 2, *common)
    assert t["search"] == "ternary" and len(t["points"]) == 4
    by_t = {p["t_mid"]: p["fid"] for p in t["points"]}
    second = (0.5667, 0.8333) if by_t[0.7] <= by_t[1.1] else (0.9667, 1.2333)  # the kept two thirds
    assert sorted(by_t) == sorted((0.7, 1.1) + second)
    assert by_t[1.1] == pytest.approx(r["points"][1]["fid"], rel=1e-12)  # same seeds -> same value
    code, out, err = run(capsys, "sample", a, "--search-tmid", "--tmid-grid", "0.8", *common)
    assert code == 0 and "best t_mid = 0.8" in out and "t_mid" in out.splitlines()[0]


def test_ternary_search_on_a_known_function():
    from scmctl.generation import ternary_search

    calls = []

    def f(t):
        calls.append(t)
        return (t - 0.83) ** 2

    pts = ternary_search(f, 0.2, 1.5, iters=8)
    assert len(calls) == len(pts) == len(set(calls))  # cached: no point evaluated twice
    best = min(pts, key=pts.get)
    assert abs(best - 0.83) < 1.3 * (2 / 3) ** 7


def test_generator_api_prefetch_and_info(ckpts):
    from scmctl.generation import open_generator

    a, _ = ckpts
    gen = open_generator(a, steps=2, t_mid=0.9, device="cpu")
    info = gen.info
    assert info["kind"] == "consistency" and info["nfe"] == 2 and info["t_mid"] == 0.9
    assert info["resolution"] == RES and info["num_classes"] == CLASSES and len(info["checkpoint_sha256"]) == 64
    plain = list(gen.batches(range(9), 4))
    assert [len(x) for x in plain] == [4, 4, 1]
    gen.prefetch = True  # the accelerator path: noises for the next batch drawn on a thread
    ahead = list(gen.batches(range(9), 4))
    assert all(np.array_equal(x, y) for x, y in zip(plain, ahead))
    ref_vals, _ = reference_2step(a, range(9), t_mid=0.9)
    assert_matches_reference(np.concatenate(ahead), ref_vals)
    assert gen.with_t_mid(1.1).info["t_mid"] == 1.1 and gen.info["t_mid"] == 0.9
