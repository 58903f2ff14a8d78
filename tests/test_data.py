"""Datasets: every format round-trips exactly, bad input is one clear UsageError, CIFAR-10 pickles
are read without running code, resizing matches a float64 bicubic reference, and the data order of
a step depends on (seed, step) only."""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from scmctl.data import datasets
from scmctl.data.imageio import from_uint8
from scmctl.data.datasets import ImageData, batch_indices, load_dataset, resize_images
from scmctl.errors import UsageError
from _cli import Payload

# sklearn.datasets.load_digits() (scikit-learn 1.6.1): images as uint8 0..16, labels as int64
DIGITS_IMAGES_SHA256 = "8f26b2bd9d135c256808f68f14fdabddde6d9c7f869ae419704b051f0f14b3b3"
DIGITS_LABELS_SHA256 = "a3c91c262eddcf7ba8f0e37507c30284493c9b20412ffe4af30d536401f7ba21"
# class counts of the UCI optdigits test set (optdigits.names)
DIGITS_CLASS_COUNTS = [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]
DIGITS_FIRST = [[0, 0, 5, 13, 9, 1, 0, 0], [0, 0, 13, 15, 10, 15, 5, 0], [0, 3, 15, 2, 0, 11, 8, 0],
                [0, 4, 12, 0, 0, 8, 8, 0], [0, 5, 8, 0, 0, 9, 8, 0], [0, 4, 11, 0, 1, 12, 7, 0],
                [0, 2, 14, 5, 10, 12, 0, 0], [0, 0, 6, 13, 10, 0, 0, 0]]


# --- an independent float64 reference for the resize filter ---------------------------------------

def _cubic(x, a=-0.5):
    x = np.abs(x)
    return np.where(x < 1, (a + 2) * x**3 - (a + 3) * x**2 + 1,
                    np.where(x < 2, a * x**3 - 5 * a * x**2 + 8 * a * x - 4 * a, 0.0))


def _weights(n_in, n_out):
    """PIL-style antialiased bicubic: kernel widened by the scale when downsampling, normalized."""
    scale = n_in / n_out
    support = max(scale, 1.0)
    j = np.arange(n_in)
    w = np.stack([_cubic((j + 0.5 - (i + 0.5) * scale) / support) for i in range(n_out)])
    return w / w.sum(1, keepdims=True)


def _resize_ref(x: np.ndarray, res: int) -> np.ndarray:
    y = np.einsum("ih,nchw,jw->ncij", _weights(x.shape[2], res), x.astype(np.float64),
                  _weights(x.shape[3], res))
    return np.clip(np.round(y), 0, 255)


def _assert_close_to_ref(got: torch.Tensor, x: np.ndarray, res: int):
    ref = _resize_ref(x, res)
    assert got.dtype == torch.uint8 and tuple(got.shape) == ref.shape
    diff = np.abs(got.numpy().astype(np.float64) - ref)
    assert diff.max() <= 1           # float32 vs float64 rounding at exact .5 boundaries only
    assert (diff > 0).mean() < 1e-3


# --- the built-in digits --------------------------------------------------------------------------

def test_digits_match_scikit_learn_original():
    raw = load_dataset("digits", resolution=8)
    assert raw.images.shape == (1797, 1, 8, 8) and raw.images.dtype == torch.uint8
    stored = raw.images[:, 0].numpy()
    v = np.round(stored.astype(np.float64) * 16 / 255).astype(np.uint8)
    assert np.array_equal(np.round(v * 255.0 / 16).astype(np.uint8), stored)   # exactly 17 levels
    assert hashlib.sha256(v.tobytes()).hexdigest() == DIGITS_IMAGES_SHA256
    assert v[0].tolist() == DIGITS_FIRST
    assert raw.labels.dtype == torch.int64
    assert hashlib.sha256(raw.labels.numpy().tobytes()).hexdigest() == DIGITS_LABELS_SHA256
    assert np.bincount(raw.labels.numpy()).tolist() == DIGITS_CLASS_COUNTS
    assert raw.num_classes == 10 and raw.class_names == [str(i) for i in range(10)]


def test_digits_default_resolution_and_upsampling():
    raw = load_dataset(None, resolution=8).images.numpy()
    d = load_dataset(None)
    assert d.images.shape == (1797, 1, 16, 16) and d.channels == 1
    assert torch.equal(d.images, load_dataset("digits").images)
    _assert_close_to_ref(d.images, raw, 16)
    d32 = load_dataset("digits", resolution=32)
    _assert_close_to_ref(d32.images, raw, 32)
    d5 = load_dataset("digits", resolution=5)                  # downsampling works too
    _assert_close_to_ref(d5.images, raw, 5)
    assert torch.equal(d.labels, d32.labels)


def test_resize_matches_reference_and_pil_on_smooth_images():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (6, 3, 20, 20), dtype=np.uint8)
    for res in (7, 10, 33):
        _assert_close_to_ref(resize_images(torch.from_numpy(x), res), x, res)
    # smooth data (no overshoot, so PIL's integer intermediate clamp never bites): PIL agrees
    yy, xx = np.mgrid[0:24, 0:24]
    smooth = (127 + 60 * np.sin(xx / 5.0) * np.cos(yy / 7.0)).astype(np.uint8)
    got = resize_images(torch.from_numpy(smooth[None, None]), 12)[0, 0].numpy().astype(int)
    pil = np.asarray(Image.fromarray(smooth).resize((12, 12), Image.BICUBIC)).astype(int)
    assert np.abs(got - pil).max() <= 1


def test_batch_gives_float_in_unit_range():
    d = load_dataset(None, resolution=8)
    idx = torch.tensor([5, 0, 1796])
    x, y = d.batch(idx)
    assert x.dtype == torch.float32 and x.shape == (3, 1, 8, 8)
    ref = d.images[idx].double() / 127.5 - 1                  # float64 reference
    assert (x.double() - ref).abs().max() < 1.2e-7
    assert torch.equal(x, from_uint8(d.images[idx].permute(0, 2, 3, 1).numpy()))   # one convention
    assert y.tolist() == d.labels[idx].tolist()
    assert x.min() >= -1 and x.max() <= 1


# --- image folders --------------------------------------------------------------------------------

def _save(path, arr, mode=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr, mode).save(path)


def test_class_folders_round_trip(tmp_path):
    rng = np.random.default_rng(1)
    root = tmp_path / "imgs"
    # created out of order: labels follow the sorted subfolder names
    layout = {"n02": ["a.png", "deep/b.png"], "n01": ["z.bmp"], "b": ["c.png", "d.png"]}
    written = {}
    for cls, names in layout.items():
        for name in names:
            arr = rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)
            _save(root / cls / name, arr)
            written[f"{cls}/{name}"] = arr
    (root / "n01" / "notes.txt").write_text("not an image")
    d = load_dataset(str(root))
    assert d.class_names == ["b", "n01", "n02"] and d.num_classes == 3
    order = ["b/c.png", "b/d.png", "n01/z.bmp", "n02/a.png", "n02/deep/b.png"]
    assert d.labels.tolist() == [0, 0, 1, 2, 2] and d.labels.dtype == torch.int64
    assert d.images.shape == (5, 3, 6, 6) and d.images.dtype == torch.uint8
    for i, key in enumerate(order):
        assert np.array_equal(d.images[i].permute(1, 2, 0).numpy(), written[key])


def test_unlabeled_gray_and_rgba_folders(tmp_path):
    rng = np.random.default_rng(2)
    gray = [rng.integers(0, 256, (5, 7), dtype=np.uint8) for _ in range(3)]
    for i, g in enumerate(gray):
        _save(tmp_path / "gray" / f"{i}.png", g)
    d = load_dataset(tmp_path / "gray")
    assert d.labels is None and d.num_classes == 0 and d.class_names == []
    assert d.images.shape == (3, 1, 5, 7)                       # H=5, W=7: not transposed
    assert all(np.array_equal(d.images[i, 0].numpy(), g) for i, g in enumerate(gray))

    rgba = rng.integers(0, 256, (2, 4, 4, 4), dtype=np.uint8)
    for i, a in enumerate(rgba):
        _save(tmp_path / "rgba" / f"{i}.png", a, "RGBA")
    d = load_dataset(tmp_path / "rgba")
    assert d.images.shape == (2, 3, 4, 4)
    assert np.array_equal(d.images.permute(0, 2, 3, 1).numpy(), rgba[..., :3])


def test_folder_errors(tmp_path):
    rng = np.random.default_rng(3)
    mixed = tmp_path / "mixed"
    _save(mixed / "a.png", rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
    _save(mixed / "b.png", rng.integers(0, 256, (16, 8, 3), dtype=np.uint8))
    with pytest.raises(UsageError, match=r"b\.png: size 8x16 with 3 channels differs from "
                                         r".*a\.png's 8x8 with 3 channels"):
        load_dataset(mixed)

    chans = tmp_path / "chans"
    _save(chans / "a.png", rng.integers(0, 256, (8, 8), dtype=np.uint8))
    _save(chans / "b.png", rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
    with pytest.raises(UsageError, match=r"b\.png: size 8x8 with 3 channels differs .* 1 channel"):
        load_dataset(chans)

    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match="empty: no image files"):
        load_dataset(tmp_path / "empty")

    _save(tmp_path / "emptyclass" / "cat" / "a.png", rng.integers(0, 256, (4, 4), dtype=np.uint8))
    (tmp_path / "emptyclass" / "dog").mkdir()
    with pytest.raises(UsageError, match="dog: no image files"):
        load_dataset(tmp_path / "emptyclass")

    bad = tmp_path / "bad"
    _save(bad / "a.png", rng.integers(0, 256, (4, 4), dtype=np.uint8))
    (bad / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nthis is not a png")
    with pytest.raises(UsageError, match=r"broken\.png: cannot read image"):
        load_dataset(bad)

    both = tmp_path / "both"
    _save(both / "loose.png", rng.integers(0, 256, (4, 4), dtype=np.uint8))
    _save(both / "cls" / "a.png", rng.integers(0, 256, (4, 4), dtype=np.uint8))
    with pytest.raises(UsageError, match="both images"):
        load_dataset(both)


def test_unknown_paths_and_formats(tmp_path):
    with pytest.raises(UsageError, match="nope: no such file or directory"):
        load_dataset(str(tmp_path / "nope"))
    (tmp_path / "data.csv").write_text("1,2,3\n")
    with pytest.raises(UsageError, match="unsupported dataset format"):
        load_dataset(tmp_path / "data.csv")
    _save(tmp_path / "one.png", np.zeros((4, 4), np.uint8))
    with pytest.raises(UsageError, match="unsupported dataset format"):
        load_dataset(tmp_path / "one.png")
    np.save(tmp_path / "a.npy", np.zeros((2, 4, 4), np.uint8))
    with pytest.raises(UsageError, match="only applies to the CIFAR-10"):
        load_dataset(f"{tmp_path / 'a.npy'}:test")
    for bad in (0, -3, 2.5, True):
        with pytest.raises(UsageError, match="resolution"):
            load_dataset(None, resolution=bad)


# --- arrays ---------------------------------------------------------------------------------------

def test_npz_and_npy_round_trip(tmp_path):
    rng = np.random.default_rng(4)
    nhwc = rng.integers(0, 256, (5, 6, 6, 3), dtype=np.uint8)
    labels = np.array([3, 0, 1, 3, 2], dtype=np.int32)
    np.savez(tmp_path / "nhwc.npz", images=nhwc, labels=labels)
    d = load_dataset(tmp_path / "nhwc.npz")
    assert np.array_equal(d.images.numpy(), nhwc.transpose(0, 3, 1, 2))
    assert d.labels.dtype == torch.int64 and d.labels.tolist() == labels.tolist()
    assert d.num_classes == 4 and d.class_names == ["0", "1", "2", "3"]

    nchw = rng.integers(0, 256, (4, 1, 5, 5), dtype=np.uint8)
    np.savez_compressed(tmp_path / "nchw.npz", x=nchw, y=np.arange(4, dtype=np.uint8))
    d = load_dataset(tmp_path / "nchw.npz")
    assert np.array_equal(d.images.numpy(), nchw) and d.labels.tolist() == [0, 1, 2, 3]

    nhw = rng.integers(0, 256, (3, 4, 5), dtype=np.uint8)
    np.savez(tmp_path / "pos.npz", nhw)                     # arr_0, unlabeled
    d = load_dataset(tmp_path / "pos.npz")
    assert np.array_equal(d.images.numpy(), nhw[:, None])
    assert d.labels is None and d.num_classes == 0

    np.save(tmp_path / "imgs.npy", nhwc)
    d = load_dataset(tmp_path / "imgs.npy")
    assert np.array_equal(d.images.numpy(), nhwc.transpose(0, 3, 1, 2)) and d.labels is None


def test_array_errors(tmp_path):
    np.savez(tmp_path / "f.npz", images=np.zeros((2, 4, 4, 3), np.float32))
    with pytest.raises(UsageError, match="must be uint8.*float32"):
        load_dataset(tmp_path / "f.npz")
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    with pytest.raises(UsageError, match="obj.npy: cannot read"):
        load_dataset(tmp_path / "obj.npy")
    np.savez(tmp_path / "keys.npz", pixels=np.zeros((2, 4, 4), np.uint8))
    with pytest.raises(UsageError, match="no images array.*found pixels"):
        load_dataset(tmp_path / "keys.npz")
    np.savez(tmp_path / "shape.npz", images=np.zeros((2, 4, 4, 5), np.uint8))
    with pytest.raises(UsageError, match=r"got \(2, 4, 4, 5\)"):
        load_dataset(tmp_path / "shape.npz")
    np.savez(tmp_path / "lab.npz", images=np.zeros((2, 4, 4), np.uint8),
             labels=np.zeros(3, np.int64))
    with pytest.raises(UsageError, match=r"labels must be 2 integers"):
        load_dataset(tmp_path / "lab.npz")
    np.savez(tmp_path / "neg.npz", images=np.zeros((2, 4, 4), np.uint8), labels=np.array([0, -1]))
    with pytest.raises(UsageError, match=">= 0"):
        load_dataset(tmp_path / "neg.npz")
    np.savez(tmp_path / "fl.npz", images=np.zeros((2, 4, 4), np.uint8), labels=np.array([0.0, 1.0]))
    with pytest.raises(UsageError, match="labels must be"):
        load_dataset(tmp_path / "fl.npz")
    np.savez(tmp_path / "none.npz", images=np.zeros((0, 4, 4), np.uint8))
    with pytest.raises(UsageError, match="no images"):
        load_dataset(tmp_path / "none.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip file at all")
    with pytest.raises(UsageError, match="junk.npz: cannot read"):
        load_dataset(tmp_path / "junk.npz")


def test_resolution_for_other_data(tmp_path):
    rng = np.random.default_rng(5)
    x = rng.integers(0, 256, (3, 3, 12, 12), dtype=np.uint8)
    np.savez(tmp_path / "sq.npz", images=x)
    assert np.array_equal(load_dataset(tmp_path / "sq.npz", resolution=12).images.numpy(), x)
    d = load_dataset(tmp_path / "sq.npz", resolution=6)
    _assert_close_to_ref(d.images, x, 6)
    assert "resized 12x12 -> 6x6" in d.source
    np.savez(tmp_path / "rect.npz", images=rng.integers(0, 256, (2, 8, 12), dtype=np.uint8))
    assert load_dataset(tmp_path / "rect.npz").images.shape == (2, 1, 8, 12)
    with pytest.raises(UsageError, match="12x8, not square"):
        load_dataset(tmp_path / "rect.npz", resolution=8)


# --- CIFAR-10 -------------------------------------------------------------------------------------

CIFAR_NAMES = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse",
               b"ship", b"truck"]


def _fake_cifar(rng, counts=(3, 2, 4, 1, 2), test_count=3, protocol=2, batches=None):
    """Pickled batches with the real layout: {b'data': uint8 (n, 3072), b'labels': [int], ...}."""
    out = {}
    for name, n in [(f"data_batch_{i + 1}", c) for i, c in enumerate(counts)] + [("test_batch",
                                                                                  test_count)]:
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, n)]
        out[name] = {b"batch_label": name.encode(), b"labels": labels, b"data": data,
                     b"filenames": [f"{k}.png".encode() for k in range(n)]}
    out["batches.meta"] = {b"num_cases_per_batch": 10000, b"label_names": CIFAR_NAMES,
                           b"num_vis": 3072}
    blobs = {k: pickle.dumps(v, protocol=protocol) for k, v in out.items()}
    blobs.update(batches or {})
    return out, blobs


def _write_tar(path, blobs, prefix="cifar-10-batches-py/"):
    with tarfile.open(path, "w:gz") as tar:
        info = tarfile.TarInfo(prefix.rstrip("/"))
        info.type = tarfile.DIRTYPE
        tar.addfile(info)
        for name, blob in list(blobs.items()) + [("readme.html", b"<html></html>")]:
            info = tarfile.TarInfo(prefix + name)
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))


def _expected(batches, names):
    """Pixel (c, y, x) of image i is row i's byte c*1024 + y*32 + x (the CIFAR-10 layout)."""
    rows = np.concatenate([batches[n][b"data"] for n in names])
    c, y, x = np.meshgrid(np.arange(3), np.arange(32), np.arange(32), indexing="ij")
    imgs = rows[:, c * 1024 + y * 32 + x]
    labels = sum((batches[n][b"labels"] for n in names), [])
    return imgs, labels


TRAIN = [f"data_batch_{i}" for i in range(1, 6)]


def _py2_meta_pickle() -> bytes:
    """batches.meta as Python 2's cPickle writes it (protocol 2, keys and names as 8-bit str)."""
    def s(b):
        return b"U" + bytes([len(b)]) + b
    items = b"".join(s(n) for n in CIFAR_NAMES)
    return (b"\x80\x02}q\x00(" + s(b"num_cases_per_batch") + b"M\x10'"
            + s(b"label_names") + b"](" + items + b"e" + s(b"num_vis") + b"M\x00\x0c" + b"u.")


def _legacy_numpy_names(blob: bytes) -> bytes:
    """Name numpy's reconstructor as numpy 1.x and the real archive do: numpy.core.multiarray."""
    assert b"numpy._core.multiarray\n" in blob
    return blob.replace(b"numpy._core.multiarray\n", b"numpy.core.multiarray\n")


@pytest.mark.parametrize("protocol", [0, 2, 4, 5, "legacy"])
def test_cifar_tar_round_trip(tmp_path, protocol):
    legacy = protocol == "legacy"
    batches, blobs = _fake_cifar(np.random.default_rng(6), protocol=2 if legacy else protocol)
    if legacy:                              # as in the real archive: py2 pickles, numpy.core names
        blobs = {k: _legacy_numpy_names(v) for k, v in blobs.items() if k != "batches.meta"}
        blobs["batches.meta"] = _py2_meta_pickle()
        assert pickle.loads(blobs["batches.meta"], encoding="bytes")[b"label_names"] == CIFAR_NAMES
    tar = tmp_path / "cifar-10-python.tar.gz"
    _write_tar(tar, blobs)
    d = load_dataset(str(tar))
    imgs, labels = _expected(batches, TRAIN)
    assert d.images.shape == (12, 3, 32, 32) and d.images.dtype == torch.uint8
    assert np.array_equal(d.images.numpy(), imgs)
    assert d.labels.dtype == torch.int64 and d.labels.tolist() == labels
    assert d.num_classes == 10 and d.class_names[0] == "airplane" and d.class_names[9] == "truck"
    assert "train" in d.source
    t = load_dataset(f"{tar}:test")
    imgs, labels = _expected(batches, ["test_batch"])
    assert np.array_equal(t.images.numpy(), imgs) and t.labels.tolist() == labels
    assert torch.equal(load_dataset(f"{tar}:train").images, d.images)


def test_cifar_folder_round_trip(tmp_path):
    batches, blobs = _fake_cifar(np.random.default_rng(7))
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for name, blob in blobs.items():
        (folder / name).write_bytes(blob)
    d = load_dataset(folder)
    imgs, labels = _expected(batches, TRAIN)
    assert np.array_equal(d.images.numpy(), imgs) and d.labels.tolist() == labels
    t = load_dataset(f"{folder}:test", resolution=16)
    imgs, _ = _expected(batches, ["test_batch"])
    _assert_close_to_ref(t.images, imgs, 16)
    (folder / "data_batch_4").unlink()
    with pytest.raises(UsageError, match="missing data_batch_4"):
        load_dataset(folder)


@pytest.mark.parametrize("where", ["data_batch_3", "batches.meta"])
@pytest.mark.parametrize("kind", ["system", "exec"])
def test_cifar_pickle_payload_is_refused_not_run(tmp_path, where, kind):
    marker = tmp_path / "pwned"
    if kind == "system":
        payload = Payload(os.system, f"touch '{marker}'")
    else:
        payload = Payload(exec, f"open({str(marker)!r}, 'w').close()")
    batch = {b"batch_label": b"x", b"labels": [1], b"data": payload}
    if where == "batches.meta":
        batch = {b"label_names": payload}
    blob = pickle.dumps(batch, protocol=2)

    pickle.loads(blob)                      # the payload is live: plain pickle runs it ...
    assert marker.exists()
    marker.unlink()

    _, blobs = _fake_cifar(np.random.default_rng(8), batches={where: blob})
    tar = tmp_path / "cifar-10-python.tar.gz"
    _write_tar(tar, blobs)
    with pytest.raises(UsageError, match=rf"{where}: not a CIFAR-10 batch \(refusing to load "):
        load_dataset(tar)                   # ... scmctl refuses it
    assert not marker.exists()


def test_cifar_archive_errors(tmp_path):
    with pytest.raises(UsageError, match="no such file"):
        load_dataset(f"{tmp_path / 'cifar-10-python.tar.gz'}:test")
    other = tmp_path / "other.tar.gz"
    _write_tar(other, {"train": b"x", "meta": b"y"}, prefix="cifar-100-python/")
    with pytest.raises(UsageError, match="not the CIFAR-10 python archive"):
        load_dataset(other)
    broken = tmp_path / "broken.tar.gz"
    broken.write_bytes(b"\x1f\x8b\x08\x00garbage" * 10)
    with pytest.raises(UsageError, match="broken.tar.gz: cannot read the archive"):
        load_dataset(broken)
    _, blobs = _fake_cifar(np.random.default_rng(9), batches={
        "data_batch_2": pickle.dumps({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}),
        "test_batch": pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 10]})})
    tar = tmp_path / "cifar-10-python.tar.gz"
    _write_tar(tar, blobs)
    with pytest.raises(UsageError, match=r"data_batch_2: 'data' is not a uint8 \(N, 3072\)"):
        load_dataset(tar)
    with pytest.raises(UsageError, match=r"test_batch: 'labels' must be 2 integers in 0..9"):
        load_dataset(f"{tar}:test")


# --- data order -----------------------------------------------------------------------------------

def test_batch_indices_depend_on_seed_and_step_only():
    n, batch, seed = 10, 4, 123
    forward = [batch_indices(n, batch, s, seed) for s in range(12)]
    datasets._epoch_permutation.cache_clear()
    backward = [batch_indices(n, batch, s, seed) for s in reversed(range(12))][::-1]
    for a, b in zip(forward, backward):
        assert a.dtype == torch.int64 and a.shape == (batch,)
        assert torch.equal(a, b)
    assert torch.equal(batch_indices(n, batch, 7, seed), forward[7])     # alone, out of order
    flat = torch.cat(forward)                                            # 48 = 4.8 epochs
    for e in range(4):
        assert sorted(flat[e * n:(e + 1) * n].tolist()) == list(range(n))
    epochs = {tuple(flat[e * n:(e + 1) * n].tolist()) for e in range(4)}
    assert len(epochs) > 1                                               # reshuffled each epoch
    other = torch.cat([batch_indices(n, batch, s, seed + 1) for s in range(12)])
    assert not torch.equal(flat, other)


def test_batch_indices_batch_larger_than_dataset():
    n, batch = 3, 7
    flat = torch.cat([batch_indices(n, batch, s, seed=0) for s in range(3)])   # 21 = 7 epochs
    for e in range(7):
        assert sorted(flat[e * n:(e + 1) * n].tolist()) == [0, 1, 2]
    assert torch.equal(batch_indices(n, batch, 2, 0), flat[14:21])
    halves = torch.cat([batch_indices(50, 25, 0, 5), batch_indices(50, 25, 1, 5)])
    assert torch.equal(batch_indices(50, 50, 0, 5), halves)     # the order is independent of batch
    with pytest.raises(UsageError):
        batch_indices(n, 0, 0, 0)


def test_image_data_is_a_plain_record():
    d = ImageData(images=torch.zeros(2, 3, 4, 5, dtype=torch.uint8), labels=None, num_classes=0,
                  class_names=[], source="x")
    assert len(d) == 2 and (d.channels, d.height, d.width) == (3, 4, 5)
