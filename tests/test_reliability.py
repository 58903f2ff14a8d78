"""Hostile input and faults: every bad input is one line with exit 2 and writes nothing; images of
every Pillow mode are read as they show; reference statistics, checkpoints and detector output are
checked; writes honour the umask and a full disk leaves nothing half-written under a final name.

Independent references: numpy's own arithmetic on the source arrays for the image modes, numpy's
eigvalsh for the covariance checks, os.stat for file modes.
"""

from __future__ import annotations

import errno
import io
import json
import os
import stat
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from _cli import assert_one_line_error, run
from test_sample_scale import make_checkpoint

from scmctl.data.imageio import read_image, read_image_adm, write_png
from scmctl.training import checkpoint as ck

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny networks: one thread (see conftest)


def write_random_pngs(folder: Path, n: int, seed: int = 0) -> Path:
    """`n` random 8x8 RGB PNGs named 000.png, 001.png, ..."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        write_png(folder / f"{i:03d}.png", rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
    return folder


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """A tiny consistency checkpoint, images, a stand-in detector and reference statistics."""
    root = tmp_path_factory.mktemp("rel")
    make_checkpoint(root / "good.pt", 0)
    write_random_pngs(root / "images", 6)

    class Feat(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("proj", torch.randn(3 * 4 * 4, 4, generator=torch.Generator().manual_seed(0)))

        def forward(self, x):
            print("detector chatter on stdout")  # TorchScript print: must never reach --json stdout
            return torch.nn.functional.adaptive_avg_pool2d(x.float() / 255.0, 4).flatten(1) @ self.proj

    torch.jit.script(Feat()).save(str(root / "det.pt"))
    return root


def edit_checkpoint(src: Path, dst: Path, change) -> Path:
    c = torch.load(src, weights_only=True)
    change(c)
    torch.save(c, dst)
    return dst


def _nan_first(c):
    k = next(iter(c["ema"]))
    c["ema"][k] = torch.full_like(c["ema"][k], float("nan"))


def _bad_sigma(kind):
    def make(root: Path) -> Path:
        rng = np.random.default_rng(1)
        a = rng.standard_normal((4, 4))
        sigma = {"negative": a @ a.T - 5 * np.eye(4), "asymmetric": a @ a.T + np.triu(np.ones((4, 4)), 1)}[kind]
        p = root / f"ref-{kind}.npz"
        np.savez(p, mu=np.zeros(4), sigma=sigma)
        return p
    return make


def _bomb(root: Path) -> Path:
    folder = root / "bomb"
    folder.mkdir(exist_ok=True)
    # 1-bit 30000x30000: 112 MB of pixels in a ~100 kB PNG, over Pillow's 2x MAX_IMAGE_PIXELS limit
    Image.new("1", (30000, 30000)).save(folder / "a-bomb.png", optimize=True)
    write_png(folder / "b-fine.png", np.zeros((8, 8, 3), np.uint8))
    return folder


def _refine_pair(root: Path) -> Path:
    folder = root / "pair"
    folder.mkdir(exist_ok=True)
    write_png(folder / "x.png", np.zeros((8, 8, 3), np.uint8))
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(folder / "x.jpg")
    return folder


def _nested(root: Path) -> Path:
    folder = root / "nested"
    (folder / "r").mkdir(parents=True, exist_ok=True)
    write_png(folder / "x.png", np.zeros((8, 8, 3), np.uint8))
    write_png(folder / "r" / "x.png", np.zeros((8, 8, 3), np.uint8))
    return folder


# (case, argv builder, needle). {R} = the module's folder. Every one: exit 2, one stderr line.
CKPT_CASES = {
    "kind-unknown": lambda c: c.update(kind="gan"),
    "missing-ema": lambda c: c.pop("ema"),
    "missing-config": lambda c: c.pop("config"),
    "step-is-text": lambda c: c.update(step="7"),
    "weight-not-tensor": lambda c: c["net"].update({next(iter(c["net"])): [1.0, 2.0]}),
    "nan-weights": _nan_first,
}
CKPT_NEEDLES = {"kind-unknown": "unknown checkpoint kind", "missing-ema": "no 'ema'", "missing-config": "no 'config'",
                "step-is-text": "'step'", "weight-not-tensor": "not a tensor", "nan-weights": "NaN or Inf"}

BAD = [
    # sample: floats, sizes, outputs
    ("sample --ts nan", ["sample", "{R}/good.pt", "-n", "2", "--ts", "nan", "--out", "{R}/s1"], "--ts"),
    ("sample --ts 1.0,nan", ["sample", "{R}/good.pt", "-n", "2", "--ts", "1.0,nan", "--out", "{R}/s1"], "--ts"),
    ("sample --ts 1.0,inf", ["sample", "{R}/good.pt", "-n", "2", "--ts", "1.0,inf", "--out", "{R}/s1"], "--ts"),
    ("sample --guidance nan", ["sample", "{R}/good.pt", "-n", "2", "--guidance", "nan", "--out", "{R}/s1"], "--guidance"),
    ("sample --guidance inf", ["sample", "{R}/good.pt", "-n", "2", "--guidance", "inf", "--out", "{R}/s1"], "--guidance"),
    ("sample --guidance -1", ["sample", "{R}/good.pt", "-n", "2", "--guidance", "-1", "--out", "{R}/s1"], "--guidance"),
    ("sample --t-mid nan", ["sample", "{R}/good.pt", "-n", "2", "--t-mid", "nan", "--out", "{R}/s1"], "--t-mid"),
    ("sample -n 1e12 png", ["sample", "{R}/good.pt", "-n", "1000000000000", "--out", "{R}/s1"], "-n 1000000000000"),
    ("sample -n 1e12 npz", ["sample", "{R}/good.pt", "-n", "1000000000000", "--out", "{R}/s1.npz"], "-n 1000000000000"),
    ("sample seeds past 2^63", ["sample", "{R}/good.pt", "-n", "2", "--seed", str(2**63 - 1), "--out", "{R}/s1"], "2^63"),
    ("sample --out under /proc", ["sample", "{R}/good.pt", "-n", "2", "--out", "/proc/scmctl/x"], "/proc"),
    ("sample --out is a file", ["sample", "{R}/good.pt", "-n", "2", "--out", "{R}/good.pt/x"], "not a folder"),
    ("sample --out npz under /proc", ["sample", "{R}/good.pt", "-n", "2", "--out", "/proc/x.npz"], "/proc"),
    ("sample --grid under /proc", ["sample", "{R}/good.pt", "-n", "2", "--out", "{R}/s1", "--grid", "/proc/g.png"], "--grid"),
    ("sample --batch 0", ["sample", "{R}/good.pt", "-n", "2", "--batch", "0"], "--batch"),
    ("sample -n 0", ["sample", "{R}/good.pt", "-n", "0"], "-n"),
    # eval
    ("eval --seeds 0-999999999999", ["eval", "fid", "{R}/good.pt", "--ref", "{R}/images", "--seeds", "0-999999999999",
                                     "--detector", "{R}/det.pt", "--allow-small"], "--seeds"),
    ("eval --seeds past 2^63", ["eval", "fid", "{R}/good.pt", "--ref", "{R}/images", "--seeds", f"1-{2**63}",
                                "--detector", "{R}/det.pt", "--allow-small"], "2^63"),
    ("eval -n 1e12", ["eval", "fid", "{R}/good.pt", "--ref", "{R}/images", "-n", "1000000000000",
                      "--detector", "{R}/det.pt", "--allow-small"], "-n"),
    ("eval --repeat past the seed range", ["eval", "fid", "{R}/good.pt", "--ref", "{R}/images", "--seeds", "0-9",
                                           "--repeat", "2000000", "--detector", "{R}/det.pt", "--allow-small"], "--repeat"),
    ("eval --guidance nan", ["eval", "fid", "{R}/good.pt", "--ref", "{R}/images", "-n", "4", "--guidance", "nan",
                             "--detector", "{R}/det.pt", "--allow-small"], "--guidance"),
    ("eval --t-mid nan", ["eval", "fid", "{R}/good.pt", "--ref", "{R}/images", "-n", "4", "--t-mid", "nan",
                          "--detector", "{R}/det.pt", "--allow-small"], "--t-mid"),
    ("eval ref --out under /proc", ["eval", "ref", "{R}/images", "--out", "/proc/scmctl/r.npz", "--detector", "{R}/det.pt"], "/proc"),
    ("eval ref --out under a file", ["eval", "ref", "{R}/images", "--out", "{R}/good.pt/r.npz", "--detector", "{R}/det.pt"],
     "not a folder"),
    ("eval ref of a decompression bomb", ["eval", "ref", "{bomb}", "--out", "{R}/r.npz", "--detector", "{R}/det.pt"],
     "decompression bomb"),
    ("eval fid of a decompression bomb", ["eval", "fid", "{bomb}", "--ref", "{R}/images", "--detector", "{R}/det.pt",
                                          "--allow-small", "-n", "2"], "bomb"),
    ("eval ref with negative eigenvalue", ["eval", "fid", "{R}/images", "--ref", "{sigma-negative}", "--detector",
                                           "{R}/det.pt", "--allow-small"], "negative eigenvalue"),
    ("eval ref with asymmetric sigma", ["eval", "fid", "{R}/images", "--ref", "{sigma-asymmetric}", "--detector",
                                        "{R}/det.pt", "--allow-small"], "not symmetric"),
    # refine
    ("refine --out = input", ["refine", "{R}/good.pt", "{R}/images", "--out", "{R}/images"], "input folder"),
    ("refine x.png + x.jpg", ["refine", "{R}/good.pt", "{pair}", "--out", "{R}/refined-pair"], "both be written"),
    ("refine output over an input", ["refine", "{R}/good.pt", "{nested}", "--out", "{nested}/r"], "overwrite the input"),
    ("refine --guidance nan", ["refine", "{R}/good.pt", "{R}/images", "--guidance", "nan", "--out", "{R}/rf"], "--guidance"),
    ("refine --t nan", ["refine", "{R}/good.pt", "{R}/images", "--t", "nan", "--out", "{R}/rf"], "--t"),
    ("refine --out under /proc", ["refine", "{R}/good.pt", "{R}/images", "--out", "/proc/scmctl"], "/proc"),
    ("refine a decompression bomb", ["refine", "{R}/good.pt", "{bomb}", "--out", "{R}/rf"], "bomb"),
    # config values (train --dry-run: nothing is allocated)
    *[(f"config {kv}", ["train", "--preset", "tiny", "--dry-run", "--set", kv], kv.split("=")[0]) for kv in (
        "train.lr=.nan", "loss.P_std=.nan", "loss.P_mean=.inf", "train.betas=[0.9,1.0]", "train.betas=[-0.1,0.9]",
        "train.betas=[0.9]", "train.device=gpu7", "network.head_channels=0", "network.channel_mult=[1,0]",
        "train.eps=0", "data.resolution=-8", "sample.t_mid=.nan", "train.grad_clip=-1", "loss.tangent_norm_c=.inf",
        "train.batch=0", "train.keep_checkpoints=-1", "network.dropout=.nan")],
    ("config --set 20k-deep value", ["train", "--preset", "tiny", "--dry-run", "--set", "train.lr=" + "[" * 20000],
     "nested too deeply"),
    ("preset not UTF-8", ["train", "--preset", "{R}/latin1.yaml", "--dry-run"], "not UTF-8"),
    ("preset 20k deep", ["train", "--preset", "{R}/deep.yaml", "--dry-run"], "nested too deeply"),
    # train: the run directory
    ("train --run-dir under /proc", ["train", "--preset", "tiny", "--steps", "1", "--run-dir", "/proc/scmctl/run"], "/proc"),
    ("train --run-dir is a file", ["train", "--preset", "tiny", "--steps", "1", "--run-dir", "{R}/good.pt"], "not a folder"),
    ("train config.yaml not UTF-8", ["train", "--preset", "tiny", "--steps", "1", "--run-dir", "{R}/run-latin1"],
     "unreadable"),
    ("train config.yaml 20k deep", ["train", "--preset", "tiny", "--steps", "1", "--run-dir", "{R}/run-deep"],
     "unreadable"),
    # data
    ("data cifar10 non-archive", ["data", "cifar10", "{R}/fake.tar.gz", "--out", "{R}/c10"], "cannot read the archive"),
    ("data cifar10 --out under /proc", ["data", "cifar10", "{R}/fake.tar.gz", "--out", "/proc/c10"], "/proc"),
    ("data imagenet --out under a file", ["data", "imagenet", "{R}/images", "--out", "{R}/good.pt/in"], "not a folder"),
    ("data imagenet of a decompression bomb", ["data", "imagenet", "{bomb}", "--out", "{R}/in-bomb", "--resolution", "8"],
     "bomb"),
    # checkpoints refused at load, through sample and eval
    *[(f"checkpoint {name} (sample)", ["sample", "{ckpt-" + name + "}", "-n", "2", "--out", "{R}/s2"], CKPT_NEEDLES[name])
      for name in CKPT_CASES],
    *[(f"checkpoint {name} (eval)", ["eval", "fid", "{ckpt-" + name + "}", "--ref", "{R}/images", "-n", "2",
                                     "--detector", "{R}/det.pt", "--allow-small"], CKPT_NEEDLES[name])
      for name in ("kind-unknown", "nan-weights")],
]


# Found only when the image is decoded: sample images are read as they are evaluated, and `data`
# writes its resumable OUT.partial as it goes.
FOUND_DURING_WORK = {"eval fid of a decompression bomb", "data imagenet of a decompression bomb"}


@pytest.fixture(scope="module")
def places(root):
    (root / "latin1.yaml").write_bytes(b"train:\n  lr: \xe9\xff\n")
    (root / "deep.yaml").write_text("a: " + "[" * 20000 + "\n")
    (root / "fake.tar.gz").write_text("not an archive\n")
    for name, text in (("run-latin1", b"train:\n  lr: \xe9\xff\n"), ("run-deep", b"a: " + b"[" * 20000 + b"\n")):
        (root / name).mkdir()
        (root / name / "config.yaml").write_bytes(text)
    p = {"R": str(root), "bomb": str(_bomb(root)), "pair": str(_refine_pair(root)), "nested": str(_nested(root))}
    for kind in ("negative", "asymmetric"):
        p[f"sigma-{kind}"] = str(_bad_sigma(kind)(root))
    for name, change in CKPT_CASES.items():
        p[f"ckpt-{name}"] = str(edit_checkpoint(root / "good.pt", root / f"ckpt-{name}.pt", change))
    return p


def assert_error_after_work(code, err, *needles):
    """An error found after some work: exit 2, no traceback, one 'error:' line and it is the last;
    earlier complete lines (notes, a finished progress bar) may precede it, never on its line."""
    lines = err.strip().splitlines()
    assert code == 2 and "Traceback" not in err and err.endswith("\n"), err
    assert lines[-1].startswith("error:") and sum(ln.startswith("error:") for ln in lines) == 1, err
    assert "error:" not in "".join(lines[:-1]), err
    for needle in needles:
        assert needle in lines[-1], lines[-1]


def _listing(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.mark.parametrize("case,argv,needle", BAD, ids=[c for c, _, _ in BAD])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(case, argv, needle, root, places, capsys):
    before = _listing(root)
    args = [a.format(**places) if "{" in a and "[[" not in a else a for a in argv]
    if args[0] in ("sample", "eval", "refine"):
        args += ["--device", "cpu"]
    code, out, err = run(capsys, *args)
    if case in FOUND_DURING_WORK:
        assert_error_after_work(code, err, needle)
    else:
        assert_one_line_error(code, err, needle)
        assert _listing(root) == before, case  # validated before anything was written
    assert out == ""


def test_bad_input_table_has_at_least_60_cases():
    assert len(BAD) >= 60, len(BAD)


# ------------------------------------------------------------------ images read as they show

def _saved(im: Image.Image, fmt: str = "PNG") -> io.BytesIO:
    b = io.BytesIO()
    im.save(b, format=fmt)
    b.seek(0)
    return b


def test_every_pillow_mode_is_read_as_it_shows(tmp_path):
    g16 = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 1040)         # 0 .. 65520
    want16 = np.round(g16 / 257.0).astype(np.uint8)
    p = tmp_path / "g16.png"
    p.write_bytes(_saved(Image.fromarray(g16)).getvalue())
    assert Image.open(p).mode == "I;16"
    assert np.array_equal(read_image(p)[:, :, 0], want16)              # was: 32768 -> 255 (white)
    assert read_image(p)[4, 0, 0] == round(32 * 1040 / 257)

    i32 = g16.astype(np.int32)
    p = tmp_path / "i32.tif"
    Image.fromarray(i32, mode="I").save(p)
    assert np.array_equal(read_image(p)[:, :, 0], want16)

    f = np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8)
    p = tmp_path / "f.tif"
    Image.fromarray(f, mode="F").save(p)
    assert np.array_equal(read_image(p)[:, :, 0], np.round(f.astype(np.float64) * 255).astype(np.uint8))

    rgb = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    p = tmp_path / "cmyk.jpg"
    cmyk = Image.fromarray(rgb).convert("CMYK")
    cmyk.save(p, quality=100)
    assert np.array_equal(read_image(p), np.asarray(Image.open(p).convert("RGB")))

    la = np.stack([g16.astype(np.uint8), np.full((8, 8), 7, np.uint8)], -1)
    p = tmp_path / "la.png"
    Image.fromarray(la, mode="LA").save(p)
    assert np.array_equal(read_image(p)[:, :, 0], la[:, :, 0])         # gray kept, alpha dropped

    pal = Image.fromarray(rgb[:, :, 0] // 64, mode="L").convert("P")
    pal.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * 756)
    pal.info["transparency"] = 0
    p = tmp_path / "pal.png"
    pal.save(p, transparency=0)
    lut = np.array([[0, 0, 0], [255, 0, 0], [0, 255, 0], [0, 0, 255]], np.uint8)
    assert np.array_equal(read_image(p), lut[rgb[:, :, 0] // 64])      # palette colours, no warning

    p = tmp_path / "bw.png"
    Image.fromarray(rgb[:, :, 0] > 127).save(p)
    assert set(np.unique(read_image(p))) <= {0, 255}
    # the ADM reader (data imagenet / latents, refine of latent models) shares the conversion
    assert np.array_equal(read_image_adm(tmp_path / "g16.png", 8), np.repeat(want16[:, :, None], 3, 2))


# ------------------------------------------------------------------ reference statistics

def test_covariance_check_matches_eigvalsh():
    from scmctl.errors import UsageError
    from scmctl.metrics.reference import COVARIANCE_RTOL, check_covariance

    rng = np.random.default_rng(0)
    a = rng.standard_normal((50, 6))
    sigma = np.cov(a, rowvar=False)
    check_covariance(sigma, "ok")                                   # a real covariance passes
    check_covariance(np.cov(a[:3], rowvar=False), "rank 2")       # singular PSD passes
    lam = np.linalg.eigvalsh(sigma)
    for shift, ok in ((0.5 * COVARIANCE_RTOL * lam[-1], True), (2 * COVARIANCE_RTOL * lam[-1], False)):
        s = sigma - (lam[0] + shift) * np.eye(6)                    # smallest eigenvalue = -shift
        if ok:
            check_covariance(s, "tiny round-off")
        else:
            with pytest.raises(UsageError, match="negative eigenvalue"):
                check_covariance(s, "bad")


# ------------------------------------------------------------------ files: umask, temps, full disk

@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_artifacts_honour_the_umask(tmp_path, capsys, root, umask):
    old = os.umask(umask)
    try:
        code, out, err = run(capsys, "sample", root / "good.pt", "-n", 3, "--batch", 2, "--out", tmp_path / "s.npz",
                             "--device", "cpu")
        assert code == 0, err
        code, out, err = run(capsys, "sample", root / "good.pt", "-n", 2, "--out", tmp_path / "png", "--device", "cpu")
        assert code == 0, err
        code, out, err = run(capsys, "eval", "ref", root / "images", "--out", tmp_path / "r.npz", "--detector",
                             root / "det.pt", "--device", "cpu")
        assert code == 0, err
    finally:
        os.umask(old)
    for p in (tmp_path / "s.npz", tmp_path / "s.npz.json", tmp_path / "png" / "000000.png",
              tmp_path / "png" / "samples.json", tmp_path / "r.npz"):
        assert stat.S_IMODE(p.stat().st_mode) == 0o666 & ~umask, p


def test_npz_output_removes_only_its_own_temp_files(tmp_path, capsys, root):
    theirs = [tmp_path / ".tmp-checkpoint-0000010.pt.1a2b3c4d", tmp_path / ".tmp-abc.npy"]
    mine = tmp_path / ".tmp-s.npz.deadbeef"
    for p in theirs + [mine]:
        p.write_bytes(b"half")
    code, out, err = run(capsys, "sample", root / "good.pt", "-n", 2, "--out", tmp_path / "s.npz", "--device", "cpu")
    assert code == 0, err
    assert all(p.exists() for p in theirs) and not mine.exists()


class Enospc:
    """Fail every os.replace onto a final name matching `match` with ENOSPC: the state a full disk
    leaves at the last step of an atomic write (the temp file written, the rename refused)."""

    def __init__(self, monkeypatch, match: str):
        real = os.replace

        def replace(src, dst, *a, **k):
            if Path(dst).match(match):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return real(src, dst, *a, **k)

        monkeypatch.setattr(os, "replace", replace)


@pytest.mark.parametrize("what,match,argv", [
    ("npz chunk", "batch-*.npy", ["sample", "{R}/good.pt", "-n", "4", "--batch", "2", "--out", "{T}/s.npz"]),
    ("png", "*.png", ["sample", "{R}/good.pt", "-n", "4", "--batch", "2", "--out", "{T}/png"]),
    ("merged npz", "s.npz", ["sample", "{R}/good.pt", "-n", "4", "--batch", "2", "--out", "{T}/s.npz"]),
    ("reference", "r.npz", ["eval", "ref", "{R}/images", "--out", "{T}/r.npz", "--detector", "{R}/det.pt"]),
    ("manifest", "samples.json", ["sample", "{R}/good.pt", "-n", "4", "--out", "{T}/png"]),
])
def test_full_disk_is_one_line_and_leaves_nothing_half_written(what, match, argv, tmp_path, capsys, root,
                                                               monkeypatch):
    Enospc(monkeypatch, match)
    args = [a.format(R=root, T=tmp_path) for a in argv] + ["--device", "cpu"]
    code, out, err = run(capsys, *args)
    assert_error_after_work(code, err, "No space left on device", "re-run the same command")
    assert not [p for p in tmp_path.rglob("*") if p.name.startswith(".tmp-")]   # no temp left behind
    assert not list(tmp_path.rglob(match))                                       # nothing under a final name
    monkeypatch.undo()
    code, out, err = run(capsys, *args)                                          # space freed: the rerun completes
    assert code == 0, err


# ------------------------------------------------------------------ detectors and weights

def test_detector_output_never_reaches_json_stdout(root, capsys):
    code, out, err = run(capsys, "eval", "fid", root / "images", "--ref", root / "images", "--detector",
                         root / "det.pt", "--allow-small", "--json", "--device", "cpu")
    assert code == 0, err
    assert json.loads(out)["metric"] == "fid" and len(out.splitlines()) == 1
    assert "detector chatter on stdout" in err


def test_inception_is_never_read_from_world_writable_or_unpinned_places(tmp_path, capsys, root, monkeypatch):
    from scmctl.metrics import detectors as det_mod

    assert all(not str(p).startswith("/tmp/") for p in det_mod.inception_weight_candidates()
               if not str(p).startswith(str(det_mod.cache_dir())))
    planted = tmp_path / "shared"
    planted.mkdir()
    (planted / det_mod.INCEPTION_FILE).write_bytes((root / "det.pt").read_bytes())  # runs code when loaded
    monkeypatch.setenv("SCMCTL_CACHE", str(planted))
    args = ("eval", "fid", root / "images", "--ref", root / "images", "--allow-small", "--device", "cpu")
    os.chmod(planted, 0o1777)                                     # like /tmp
    code, out, err = run(capsys, *args)
    assert_one_line_error(code, err, "writable by other users")
    os.chmod(planted, 0o700)                                      # private, but not the published file
    code, out, err = run(capsys, *args)
    assert_one_line_error(code, err, "sha256", det_mod.INCEPTION_SHA256[:12])
    assert "detector chatter" not in err                          # refused before it could run


def test_non_finite_samples_stop_with_the_first_bad_seed(tmp_path, capsys, root, monkeypatch):
    import scmctl.sampling as sampling

    real = sampling.generate

    def poisoned(*a, **k):
        x0, lab, extra = real(*a, **k)
        x0[1:] = float("nan")                                     # every image after the first of the batch
        return x0, lab, extra

    monkeypatch.setattr(sampling, "generate", poisoned)
    code, out, err = run(capsys, "sample", root / "good.pt", "-n", 4, "--batch", 4, "--seed", 10, "--out",
                         tmp_path / "s", "--device", "cpu")
    assert_one_line_error(code, err, "good.pt", "non-finite", "seed 11")
    assert not list((tmp_path / "s").glob("*.png"))


def test_png_that_never_reached_the_disk_is_regenerated_on_resume(tmp_path, capsys, root):
    out = tmp_path / "png"
    code, _, err = run(capsys, "sample", root / "good.pt", "-n", 4, "--batch", 2, "--out", out, "--device", "cpu")
    assert code == 0, err
    full = {p.name: p.read_bytes() for p in out.glob("*.png")}
    (out / "000001.png").write_bytes(b"")                           # a power loss before the data blocks
    (out / "000002.png").write_bytes(full["000002.png"][:40])       # a torn write
    code, out_json, err = run(capsys, "sample", root / "good.pt", "-n", 4, "--batch", 2, "--out", out,
                              "--device", "cpu", "--json")
    assert code == 0 and json.loads(out_json)["generated"] == 4, err
    assert {p.name: p.read_bytes() for p in out.glob("*.png")} == full


def test_downloaded_inception_with_another_sha256_is_not_kept(tmp_path, monkeypatch):
    import urllib.request

    from scmctl.errors import UsageError
    from scmctl.metrics import detectors as det_mod

    monkeypatch.setenv("SCMCTL_CACHE", str(tmp_path))
    monkeypatch.delenv("SCMCTL_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(urllib.request, "urlopen", lambda url, timeout=None: io.BytesIO(b"planted torchscript"))
    with pytest.raises(UsageError, match="not the published"):
        det_mod.download_weights(det_mod.INCEPTION_WEIGHTS)
    assert list(tmp_path.iterdir()) == []
