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


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """A tiny consistency checkpoint, images, a stand-in detector and reference statistics."""
    root = tmp_path_factory.mktemp("rel")
    make_checkpoint(root / "good.pt", 0)
    images = root / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        write_png(images / f"{i:02d}.png", rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))

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
    p = {"R": str(root), "bomb": str(_bomb(root)), "pair": str(_refine_pair(root)), "nested": str(_nested(root))}
    for kind in ("negative", "asymmetric"):
        p[f"sigma-{kind}"] = str(_bad_sigma(kind)(root))
    for name, change in CKPT_CASES.items():
        p[f"ckpt-{name}"] = str(edit_checkpoint(root / "good.pt", root / f"ckpt-{name}.pt", change))
    return p


def _listing(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.mark.parametrize("case,argv,needle", BAD, ids=[c for c, _, _ in BAD])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(case, argv, needle, root, places, capsys):
    before = _listing(root)
    args = [a.format(**places) if "{" in a and "[[" not in a else a for a in argv]
    if args[0] in ("sample", "eval", "refine"):
        args += ["--device", "cpu"]
    code, out, err = run(capsys, *args)
    if case in FOUND_DURING_WORK:  # earlier complete stderr lines (notes, a finished bar) may precede
        assert code == 2 and "Traceback" not in err and err.endswith("\n"), err
        assert err.strip().splitlines()[-1].startswith("error:") and needle in err.strip().splitlines()[-1], err
    else:
        assert_one_line_error(code, err, needle)
        assert _listing(root) == before, case  # validated before anything was written
    assert out == ""


def test_bad_input_table_has_at_least_60_cases():
    assert len(BAD) >= 60, len(BAD)
