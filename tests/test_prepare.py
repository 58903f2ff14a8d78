"""Dataset preparation (`scmctl data`): the ADM crop against exact and float64 references, prepared
folders that load memory-mapped with the right labels, atomic and resumable writing, CIFAR-10, and
SD-VAE latents with a tiny randomly initialized AutoencoderKL (no download): encode -> store ->
load -> normalize -> denormalize -> decode, the recorded metadata, config checks and offline errors.

Nothing here touches the network or a real cache: HF_HOME, HF_HUB_CACHE and SCMCTL_CACHE point
into tmp folders and SCMCTL_OFFLINE=1 for every test.
"""

from __future__ import annotations

import hashlib
import json
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from scmctl.cli import main
from scmctl.data import prepare
from scmctl.data.datasets import LatentData, MappedImageData, load_dataset
from scmctl.data.imageio import center_crop_adm, to_uint8
from scmctl.errors import UsageError

from test_data import _fake_cifar, _write_tar  # the official CIFAR-10 pickle layout
from _cli import run

SCM_MEAN = [1.56, -0.695, 0.483, 0.729]
SCM_STD = [5.27, 5.91, 4.21, 4.31]
RES = 16            # pixel side in these tests; the tiny VAE downsamples by 2 -> 8x8 latents


@pytest.fixture(autouse=True)
def _no_real_caches(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf_home" / "hub"))
    monkeypatch.setenv("SCMCTL_CACHE", str(tmp_path / "scmctl_cache"))
    monkeypatch.setenv("SCMCTL_OFFLINE", "1")




def one_line_error(code, err, *needles):
    assert code == 2, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in err, err
    for n in needles:
        assert n in lines[0], lines[0]


# --- references for the ADM crop ------------------------------------------------------------------

def _adm_reference(im: Image.Image, res: int) -> np.ndarray:
    """The ADM recipe written out step by step with PIL (what guided-diffusion's paper code does)."""
    im = im.convert("RGB")
    w, h = im.size
    while min(w, h) >= 2 * res:
        w, h = w // 2, h // 2
        im = im.resize((w, h), Image.BOX)
    s = res / min(w, h)
    im = im.resize((round(w * s), round(h * s)), Image.BICUBIC)
    a = np.array(im)
    top, left = (a.shape[0] - res) // 2, (a.shape[1] - res) // 2
    return a[top:top + res, left:left + res]


def _filter_weights(n_in: int, n_out: int, kind: str) -> np.ndarray:
    """PIL's separable resampling weights in float64: output pixel i is centred at
    (i + 0.5)·scale in input coordinates, the kernel widened by the scale when downsampling,
    normalized to sum 1. BOX: 1 on (-0.5, 0.5]; BICUBIC: Keys' cubic with a = -0.5."""
    scale = n_in / n_out
    fscale = max(scale, 1.0)
    x = (np.arange(n_in)[None, :] + 0.5 - (np.arange(n_out)[:, None] + 0.5) * scale) / fscale
    if kind == "box":
        w = ((x > -0.5) & (x <= 0.5)).astype(np.float64)
    else:
        a, ax = -0.5, np.abs(x)
        w = np.where(ax < 1, (a + 2) * ax**3 - (a + 3) * ax**2 + 1,
                     np.where(ax < 2, a * ax**3 - 5 * a * ax**2 + 8 * a * ax - 4 * a, 0.0))
    return w / w.sum(1, keepdims=True)


def _resize64(a: np.ndarray, size: tuple[int, int], kind: str) -> np.ndarray:
    """Horizontal pass, round to uint8, vertical pass, round (PIL's two-pass order; PIL rounds
    halves up, which matters at the exact .5 ties that a 2x2 box mean makes)."""
    (w, h), (h0, w0) = size, a.shape[:2]
    out = a.astype(np.float64)
    if w != w0:
        out = np.clip(np.floor(np.einsum("jw,hwc->hjc", _filter_weights(w0, w, kind), out) + 0.5), 0, 255)
    if h != h0:
        out = np.clip(np.floor(np.einsum("ih,hwc->iwc", _filter_weights(h0, h, kind), out) + 0.5), 0, 255)
    return out


def _adm_float64(a: np.ndarray, res: int) -> np.ndarray:
    h, w = a.shape[:2]
    x = a
    while min(w, h) >= 2 * res:
        w, h = w // 2, h // 2
        x = _resize64(x, (w, h), "box")
    s = res / min(w, h)
    x = _resize64(x, (round(w * s), round(h * s)), "bicubic")
    top, left = (x.shape[0] - res) // 2, (x.shape[1] - res) // 2
    return x[top:top + res, left:left + res]


# --- the ADM crop ---------------------------------------------------------------------------------

def test_adm_crop_exact_cases_and_no_flip():
    rng = np.random.default_rng(0)
    # 2x2 constant blocks, 32x48: one BOX halving gives the block values exactly, the bicubic step
    # is the identity (scale 1), and the crop takes block columns 4..19.
    blocks = rng.integers(0, 256, (16, 24, 3), dtype=np.uint8)
    img = np.repeat(np.repeat(blocks, 2, axis=0), 2, axis=1)
    got = center_crop_adm(Image.fromarray(img), RES)
    assert got.shape == (RES, RES, 3) and got.dtype == np.uint8
    assert np.array_equal(got, blocks[:, 4:20])
    assert not np.array_equal(got, blocks[:, 4:20][:, ::-1])          # no flip
    # short side already RES: untouched pixels, centred crop; a portrait image crops rows
    wide = rng.integers(0, 256, (RES, 21, 3), dtype=np.uint8)
    assert np.array_equal(center_crop_adm(Image.fromarray(wide), RES), wide[:, 2:18])
    tall = rng.integers(0, 256, (23, RES, 3), dtype=np.uint8)
    assert np.array_equal(center_crop_adm(Image.fromarray(tall), RES), tall[3:19])
    square = rng.integers(0, 256, (RES, RES, 3), dtype=np.uint8)
    assert np.array_equal(center_crop_adm(Image.fromarray(square), RES), square)


@pytest.mark.parametrize("h, w, res", [(50, 70, 32), (13, 20, 16), (200, 300, 32), (150, 97, 16),
                                       (64, 64, 16)])
def test_adm_crop_matches_float64_resampling_and_pil_recipe(h, w, res):
    yy, xx = np.mgrid[0:h, 0:w]
    # smooth content (bicubic never overshoots the uint8 range), not symmetric in either axis
    img = np.stack([120 + 90 * np.sin(xx / 7.0 + yy / 11.0), 128 + 100 * np.cos(yy / 5.0) * np.sin(xx / 13.0),
                    60 + 150 * xx / w * (yy / h)], axis=-1).round().astype(np.uint8)
    got = center_crop_adm(Image.fromarray(img), res)
    assert got.shape == (res, res, 3)
    assert np.array_equal(got, _adm_reference(Image.fromarray(img), res))
    diff = np.abs(got.astype(np.float64) - _adm_float64(img, res))
    assert diff.max() <= 1                      # PIL's fixed-point weights vs float64 at .5 ties
    assert (diff > 0).mean() < 0.01


# --- image-folder trees -> prepared pixel datasets ------------------------------------------------

def _write_tree(root):
    """A synset-style tree created out of order: JPEG and PNG, RGB, grayscale and RGBA, sizes and
    aspect ratios of all kinds, one image nested deeper. Returns {relative path: PIL image}."""
    rng = np.random.default_rng(1)
    layout = {"n03000000": [("a.JPEG", (40, 30), "RGB"), ("b.png", (9, 14), "L")],
              "n01000000": [("x.png", (64, 64), "RGBA"), ("sub/y.jpg", (100, 37), "RGB")],
              "n02000000": [("c.png", (33, 70), "RGB")]}
    written = {}
    for cls, items in layout.items():
        for name, (w, h), mode in items:
            ch = {"RGB": 3, "L": 1, "RGBA": 4}[mode]
            arr = rng.integers(0, 256, (h, w, ch), dtype=np.uint8)
            im = Image.fromarray(arr[..., 0] if ch == 1 else arr, mode)
            path = root / cls / name
            path.parent.mkdir(parents=True, exist_ok=True)
            im.save(path, quality=95) if name.lower().endswith((".jpg", ".jpeg")) else im.save(path)
            written[f"{cls}/{name}"] = path
    return written


def _ref_crops(files) -> np.ndarray:
    """Reference crops of the tree's images in dataset order (sorted class, then sorted path)."""
    crops = []
    for k in ORDER:
        with Image.open(files[k]) as im:
            crops.append(_adm_reference(im, RES))
    return np.stack(crops)


ORDER = ["n01000000/sub/y.jpg", "n01000000/x.png", "n02000000/c.png", "n03000000/a.JPEG",
         "n03000000/b.png"]
LABELS = [0, 0, 1, 2, 2]


def test_imagenet_tree_to_prepared_memmapped_dataset(tmp_path, capsys):
    files = _write_tree(tmp_path / "train")
    out = tmp_path / "in16"
    code, stdout, err = run(capsys, "data", "imagenet", tmp_path / "train", "--out", out,
                            "--resolution", RES, "--workers", 2, "--json")
    assert code == 0, err
    meta = json.loads(stdout)
    assert meta["kind"] == "pixels" and meta["count"] == 5 and meta["resolution"] == RES
    assert meta["class_names"] == ["n01000000", "n02000000", "n03000000"]
    assert not (tmp_path / "in16.partial").exists()

    ds = load_dataset(out)
    assert isinstance(ds, MappedImageData) and isinstance(ds.array, np.memmap)   # not read into RAM
    assert (len(ds), ds.channels, ds.height, ds.width, ds.num_classes) == (5, 3, RES, RES, 3)
    assert ds.labels.tolist() == LABELS and ds.labels.dtype == torch.int64
    ref = _ref_crops(files)
    assert np.array_equal(ds.uint8(range(5)), ref)
    idx = torch.tensor([4, 0, 4, 2])                                 # unsorted, repeated
    x, y = ds.batch(idx)
    assert x.dtype == torch.float32 and x.shape == (4, 3, RES, RES)
    expect = torch.from_numpy(ref[idx.numpy()]).permute(0, 3, 1, 2).double() / 127.5 - 1
    assert (x.double() - expect).abs().max() < 1.2e-7
    assert y.tolist() == [LABELS[i] for i in idx.tolist()]
    clone = pickle.loads(pickle.dumps(ds))                           # DataLoader workers reopen
    assert torch.equal(clone.batch(idx)[0], x)

    for res, ok in ((None, True), (RES, True), (8, False)):
        if ok:
            assert load_dataset(out, res).height == RES
        else:
            with pytest.raises(UsageError, match="prepared at 16x16, not 8"):
                load_dataset(out, res)
    before = (out / "images.npy").read_bytes()
    code, _, err = run(capsys, "data", "imagenet", tmp_path / "train", "--out", out, "--resolution", RES)
    assert code == 0 and (out / "images.npy").read_bytes() == before, err  # the same job: already done
    code, _, err = run(capsys, "data", "imagenet", tmp_path / "train", "--out", out, "--resolution", 8)
    one_line_error(code, err, "already holds a prepared dataset")
    code, _, err = run(capsys, "data", "imagenet", tmp_path / "nope", "--out", tmp_path / "o")
    one_line_error(code, err, "nope: no such folder")
    code, stdout, err = run(capsys, "data", "info", out, "--json")
    assert code == 0 and json.loads(stdout) == {k: v for k, v in meta.items() if k != "out"}


def test_interrupted_preparation_never_looks_complete_and_resumes(tmp_path, capsys, monkeypatch):
    _write_tree(tmp_path / "train")
    monkeypatch.setattr(prepare, "PIXEL_CHUNK", 2)
    calls = []
    real = prepare.read_image_adm

    def crashing(path, res):
        calls.append(path)
        if len(calls) == 4:
            raise KeyboardInterrupt("simulated interruption")
        return real(path, res)

    monkeypatch.setattr(prepare, "read_image_adm", crashing)
    out = tmp_path / "ds"
    with pytest.raises(KeyboardInterrupt):
        prepare.prepare_images(tmp_path / "train", out, RES, workers=1)
    assert not out.exists()
    partial = json.loads((tmp_path / "ds.partial" / "progress.json").read_text())
    assert partial["done"] == 2                       # chunk 1 flushed; chunk 2 died mid-way
    with pytest.raises(UsageError, match="no such file"):
        load_dataset(out)

    calls.clear()
    monkeypatch.setattr(prepare, "read_image_adm", lambda p, r: (calls.append(p), real(p, r))[1])
    meta = prepare.prepare_images(tmp_path / "train", out, RES, workers=1)
    assert len(calls) == 3 and meta["count"] == 5     # only the images after the last flush
    assert not (tmp_path / "ds.partial").exists()
    fresh = prepare.prepare_images(tmp_path / "train", tmp_path / "fresh", RES, workers=2)
    assert fresh["count"] == 5
    assert np.array_equal(load_dataset(out).uint8(range(5)), load_dataset(tmp_path / "fresh").uint8(range(5)))

    # a .partial of another job (other resolution) is discarded, not mixed in
    monkeypatch.setattr(prepare, "read_image_adm", crashing)
    calls.clear()
    with pytest.raises(KeyboardInterrupt):
        prepare.prepare_images(tmp_path / "train", tmp_path / "other", 8, workers=1)
    monkeypatch.setattr(prepare, "read_image_adm", real)
    prepare.prepare_images(tmp_path / "train", tmp_path / "other", RES, workers=1)
    assert np.array_equal(load_dataset(tmp_path / "other").uint8(range(5)), load_dataset(out).uint8(range(5)))


def test_cifar10_archive_to_prepared_dataset(tmp_path, capsys):
    batches, blobs = _fake_cifar(np.random.default_rng(6))
    tar = tmp_path / "cifar-10-python.tar.gz"
    _write_tar(tar, blobs)
    for split, n in (("train", 12), ("test", 3)):
        out = tmp_path / f"c10-{split}"
        code, stdout, err = run(capsys, "data", "cifar10", tar, "--out", out, "--split", split, "--json")
        assert code == 0, err
        meta = json.loads(stdout)
        assert meta["count"] == n and meta["split"] == split and meta["class_names"][9] == "truck"
        ref = load_dataset(f"{tar}:{split}")
        ds = load_dataset(out)
        assert isinstance(ds, MappedImageData)
        assert np.array_equal(ds.uint8(range(n)), ref.images.permute(0, 2, 3, 1).numpy())
        assert torch.equal(ds.labels, ref.labels)
        idx = torch.tensor([n - 1, 0])
        assert torch.equal(ds.batch(idx)[0], ref.batch(idx)[0])
    code, _, err = run(capsys, "data", "cifar10", tar, "--out", tmp_path / "x", "--split", "val")
    one_line_error(code, err, "--split must be train or test")


def test_prepared_folder_errors(tmp_path):
    out = tmp_path / "d"
    rng = np.random.default_rng(2)
    prepare.prepare_cifar10(_cifar_tar(tmp_path, rng), out, "test")
    meta = json.loads((out / "dataset.json").read_text())

    def with_meta(**kw):
        (out / "dataset.json").write_text(json.dumps({**meta, **kw}))

    with_meta(version=99)
    with pytest.raises(UsageError, match="version 99 is not supported"):
        load_dataset(out)
    with_meta(files={"images": "../images.npy", "labels": "labels.npy"})
    with pytest.raises(UsageError, match="bad file name"):
        load_dataset(out)
    with_meta(count=4)
    with pytest.raises(UsageError, match="holds 3 entries but dataset.json says 4"):
        load_dataset(out)
    with_meta(kind="voxels")
    with pytest.raises(UsageError, match="unknown dataset kind"):
        load_dataset(out)


def _cifar_tar(tmp_path, rng):
    _, blobs = _fake_cifar(rng)
    tar = tmp_path / "cifar-10-python.tar.gz"
    _write_tar(tar, blobs)
    return tar


# --- SD-VAE latents with a tiny AutoencoderKL ---------------------------------------------------

@pytest.fixture(scope="module")
def tiny_vae(tmp_path_factory):
    """A randomly initialized AutoencoderKL (2 levels: downsampling 2, 4 latent channels), saved
    with save_pretrained into a tmp folder; returns (folder, model in fp32 eval mode)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16),
                        down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, norm_num_groups=4)
    folder = tmp_path_factory.mktemp("vae") / "tiny-vae"
    vae.save_pretrained(folder)
    return folder, vae.eval()


@pytest.fixture(scope="module")
def latent_set(tmp_path_factory, tiny_vae):
    """The tree encoded by `scmctl data latents` (float32 storage) + the reference crops."""
    root = tmp_path_factory.mktemp("lat")
    files = _write_tree(root / "train")
    out = root / "lat16"
    import io
    import contextlib

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        main(["data", "latents", str(root / "train"), "--out", str(out), "--vae", str(tiny_vae[0]),
              "--resolution", str(RES), "--dtype", "float32", "--device", "cpu", "--batch", "2",
              "--json"])
    crops = _ref_crops(files)
    return out, json.loads(buf.getvalue()), crops, root


def _vae_posterior(vae, crops: np.ndarray):
    x = torch.from_numpy(crops).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        d = vae.encode(x).latent_dist
    return d.mean, d.std


def test_latents_store_the_vae_posterior_and_record_metadata(latent_set, tiny_vae):
    out, meta, crops, _ = latent_set
    folder, vae = tiny_vae
    stored = np.load(out / "latents.npy")
    assert stored.dtype == np.float32 and stored.shape == (5, 2, 4, RES // 2, RES // 2)
    mean, std = _vae_posterior(vae, crops)
    assert np.abs(stored[:, 0] - mean.numpy()).max() < 1e-5
    assert np.abs(stored[:, 1] - std.numpy()).max() < 1e-6
    assert np.load(out / "labels.npy").tolist() == LABELS

    weights = folder / "diffusion_pytorch_model.safetensors"
    assert meta["encoder"] == str(folder.resolve()) and meta["encoder_weights"] == weights.name
    assert meta["encoder_sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert meta["latent_mean"] == SCM_MEAN and meta["latent_std"] == SCM_STD
    assert meta["latent_stats"] == "scm-paper" and meta["sigma_data"] == 0.5
    assert meta["vae_scaling_factor"] == pytest.approx(0.18215) and "not applied" in meta["scaling"]
    assert (meta["image_resolution"], meta["latent_resolution"], meta["latent_channels"]) == (RES, 8, 4)
    m, s = stored[:, 0].astype(np.float64), stored[:, 1].astype(np.float64)
    mu = m.mean(axis=(0, 2, 3))                         # E[z], z = mean + std·ε
    sd = np.sqrt((m**2 + s**2).mean(axis=(0, 2, 3)) - mu**2)
    assert np.allclose(meta["measured_mean"], mu, rtol=1e-9, atol=1e-12)
    assert np.allclose(meta["measured_std"], sd, rtol=1e-9)


def test_latent_batch_normalizes_posterior_samples_exactly(latent_set):
    out, meta, _, _ = latent_set
    ds = load_dataset(out)
    assert isinstance(ds, LatentData) and isinstance(ds.array, np.memmap)
    assert (len(ds), ds.channels, ds.height, ds.width, ds.kind) == (5, 4, 8, 8, "latents")
    stored = np.load(out / "latents.npy").astype(np.float64)
    idx = torch.tensor([3, 1, 3])
    torch.manual_seed(123)
    z, y = ds.batch(idx)
    torch.manual_seed(123)
    eps = torch.randn(3, 4, 8, 8, dtype=torch.float32).double().numpy()
    mu, sig = np.array(SCM_MEAN)[None, :, None, None], np.array(SCM_STD)[None, :, None, None]
    rows = stored[idx.numpy()]
    ref = ((rows[:, 0] + rows[:, 1] * eps) - mu) * 0.5 / sig
    assert z.dtype == torch.float32 and np.abs(z.double().numpy() - ref).max() < 1e-6
    assert y.tolist() == [LABELS[i] for i in idx.tolist()]
    torch.manual_seed(124)
    assert not torch.equal(ds.batch(idx)[0], z)          # fresh ε per seed ...
    torch.manual_seed(123)
    assert torch.equal(ds.batch(idx)[0], z)              # ... and reproducible per seed

    from scmctl.data.latents import denormalize, normalize

    zz = torch.from_numpy(rows[:, 0])                    # the algebra in float64
    zn = normalize(zz, SCM_MEAN, SCM_STD, 0.5)
    assert torch.allclose(zn, torch.from_numpy((rows[:, 0] - mu) * 0.5 / sig), rtol=0, atol=1e-14)
    assert torch.allclose(denormalize(zn, SCM_MEAN, SCM_STD, 0.5), zz, rtol=0, atol=1e-13)


def test_latent_batch_statistics_from_known_posteriors(tmp_path):
    """A latent folder written by hand (the format, not the writer): constant posterior mean m_c and
    std s_c per channel -> z_norm has mean (m_c − μ_c)·σ_d/σ_c and std s_c·σ_d/σ_c."""
    n, c, h = 64, 4, 8
    m = np.array([3.0, -2.0, 0.5, 1.0])
    s = np.array([0.5, 2.0, 1.0, 4.0])
    lat = np.empty((n, 2, c, h, h), np.float16)
    lat[:, 0] = m[None, :, None, None]
    lat[:, 1] = s[None, :, None, None]
    np.save(tmp_path / "latents.npy", lat)
    meta = {"format": "scmctl-dataset", "version": 1, "kind": "latents", "count": n,
            "class_names": [], "encoder": "stabilityai/sd-vae-ft-mse", "latent_mean": SCM_MEAN,
            "latent_std": SCM_STD, "sigma_data": 0.5, "image_resolution": 64,
            "files": {"latents": "latents.npy", "labels": None}}
    (tmp_path / "dataset.json").write_text(json.dumps(meta))
    ds = load_dataset(tmp_path)
    torch.manual_seed(0)
    z, y = ds.batch(torch.arange(n))
    assert y is None and z.shape == (n, c, h, h)
    per = z.double().permute(1, 0, 2, 3).reshape(c, -1)          # 4096 draws per channel
    want_mean = (m - SCM_MEAN) * 0.5 / np.array(SCM_STD)
    want_std = s * 0.5 / np.array(SCM_STD)
    se = want_std / np.sqrt(per.shape[1])
    assert np.all(np.abs(per.mean(1).numpy() - want_mean) < 5 * se)
    assert np.all(np.abs(per.std(1).numpy() / want_std - 1) < 0.05)
    assert load_dataset(tmp_path, 64).height == 8 and load_dataset(tmp_path, 8).height == 8


def test_decode_and_encode_round_trip_through_model_space(latent_set, tiny_vae):
    from scmctl.config import DataConfig
    from scmctl.data.latents import decode_to_uint8, encode_from_uint8, pixel_resolution

    out, meta, crops, _ = latent_set
    _, vae = tiny_vae
    cfg = DataConfig(encoder=meta["encoder"], latent_mean=SCM_MEAN, latent_std=SCM_STD)
    stored_mean = torch.from_numpy(np.load(out / "latents.npy")[:, 0])
    mu, sig = torch.tensor(SCM_MEAN).view(1, 4, 1, 1), torch.tensor(SCM_STD).view(1, 4, 1, 1)
    z_norm = ((stored_mean.double() - mu.double()) * 0.5 / sig.double()).float()
    got = decode_to_uint8(cfg, z_norm, "cpu")
    mean, _ = _vae_posterior(vae, crops)                 # the VAE's own encode of the same images
    with torch.no_grad():
        want = to_uint8(vae.decode(mean).sample)
    assert got.shape == (5, RES, RES, 3) and got.dtype == np.uint8
    diff = np.abs(got.astype(int) - want.astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 0.01
    enc = encode_from_uint8(cfg, crops, "cpu")
    assert enc.dtype == torch.float32 and enc.shape == (5, 4, 8, 8)
    assert (enc.double() - (mean.double() - mu) * 0.5 / sig).abs().max() < 1e-5
    assert pixel_resolution(cfg, 8) == RES
    pixels = DataConfig()
    assert np.array_equal(decode_to_uint8(pixels, torch.zeros(1, 3, 2, 2)), np.full((1, 2, 2, 3), 128, np.uint8))


def test_latents_from_a_prepared_pixel_dataset_in_float16(latent_set, tiny_vae, tmp_path):
    out32, _, _, root = latent_set
    px = tmp_path / "px"
    prepare.prepare_images(root / "train", px, RES, workers=2)
    meta = prepare.prepare_latents(px, tmp_path / "lat", str(tiny_vae[0]), resolution=RES, batch=5,
                                   device="cpu", latent_mean="measured", latent_std="measured")
    a16 = np.load(tmp_path / "lat" / "latents.npy")
    a32 = np.load(out32 / "latents.npy")
    assert a16.dtype == np.float16
    assert np.allclose(a16.astype(np.float32), a32, rtol=2e-3, atol=1e-4)
    assert meta["latent_stats"] == "measured"
    assert meta["latent_mean"] == meta["measured_mean"] and meta["latent_std"] == meta["measured_std"]
    with pytest.raises(UsageError, match="not --resolution 32"):
        prepare.prepare_latents(px, tmp_path / "lat32", str(tiny_vae[0]), resolution=32, device="cpu")


def test_train_takes_latent_settings_from_the_data_and_refuses_mismatches(latent_set, tmp_path, capsys):
    out, meta, _, root = latent_set
    base = ["train", "--data", out, "--dry-run", "--json", "--set", "data.resolution=null"]
    code, stdout, err = run(capsys, *base)
    assert code == 0, err
    cfg = json.loads(stdout)["config"]
    assert cfg["data"]["encoder"] == meta["encoder"]
    assert cfg["data"]["latent_mean"] == SCM_MEAN and cfg["data"]["latent_std"] == SCM_STD
    assert (cfg["network"]["channels"], cfg["network"]["resolution"]) == (4, 8)
    code, _, err = run(capsys, *base, "--set", f"data.latent_mean={SCM_MEAN}", "--set",
                       f"data.latent_std={[v * 1.0000001 for v in SCM_STD]}")
    assert code == 0, err                                            # within the tolerance
    code, _, err = run(capsys, *base, "--set", f"data.latent_mean={SCM_MEAN}",
                       "--set", f"data.latent_std={[5.27, 5.91, 4.21, 4.32]}")
    one_line_error(code, err, "data.latent_std is", "normalized with")
    code, _, err = run(capsys, *base, "--set", "data.encoder=stabilityai/sd-vae-ft-mse")
    one_line_error(code, err, "was encoded with", meta["encoder"])
    code, _, err = run(capsys, *base, "--set", "data.sigma_data=1.0")
    one_line_error(code, err, "sigma_data")
    code, _, err = run(capsys, "train", "--data", root / "train", "--dry-run", "--set",
                       "data.encoder=stabilityai/sd-vae-ft-mse")
    one_line_error(code, err, "scmctl data latents")


def test_missing_vae_offline_is_one_line_with_the_url(tmp_path, capsys, monkeypatch):
    from scmctl.config import DataConfig
    from scmctl.data.latents import decode_to_uint8

    _write_tree(tmp_path / "train")
    code, _, err = run(capsys, "data", "latents", tmp_path / "train", "--out", tmp_path / "o",
                       "--resolution", RES)
    one_line_error(code, err, "stabilityai/sd-vae-ft-mse", "https://huggingface.co/stabilityai/sd-vae-ft-mse",
                   str(tmp_path / "hf_home" / "hub"))
    assert not (tmp_path / "o").exists() and not (tmp_path / "hf_home").exists()   # nothing written
    monkeypatch.delenv("SCMCTL_OFFLINE")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = DataConfig(encoder="stabilityai/sd-vae-ft-mse", latent_mean=SCM_MEAN, latent_std=SCM_STD)
    with pytest.raises(UsageError, match="https://huggingface.co/stabilityai/sd-vae-ft-mse"):
        decode_to_uint8(cfg, torch.zeros(1, 4, 8, 8))
    code, _, err = run(capsys, "data", "latents", tmp_path / "train", "--out", tmp_path / "o",
                       "--vae", tmp_path / "no-such-folder")
    one_line_error(code, err, "no such VAE folder")


def test_vae_from_the_hub_cache_offline(tiny_vae, tmp_path):
    """A Hugging Face cache laid out as the hub client writes it (refs/main -> snapshots/<commit>)."""
    import shutil

    from scmctl.data.latents import load_vae

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hf_home" / "hub" / "models--acme--tiny-vae"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(tiny_vae[0], repo / "snapshots" / commit)
    vae = load_vae("acme/tiny-vae", "cpu")
    assert vae.path == repo / "snapshots" / commit and vae.revision == commit
    assert (vae.downsampling, vae.latent_channels) == (2, 4)


def test_refine_a_latent_model_encodes_crops_and_decodes(latent_set, tiny_vae, tmp_path, capsys):
    """refine on a latent checkpoint = decode(refine(normalize(encode(ADM crop)))), computed here
    with the diffusers model and the sampler directly."""
    from scmctl import config as config_mod
    from scmctl.nn.networks import build_network
    from scmctl.sampling import refine
    from scmctl.training import checkpoint as ckpt_io

    _, meta, _, root = latent_set
    _, vae = tiny_vae
    cfg = config_mod.resolve("tiny", "sct", [
        "network.resolution=8", "network.channels=4", "network.num_classes=0",
        "network.model_channels=16", "network.attn_resolutions=[4]", "network.head_channels=16",
        f"data.encoder={meta['encoder']}", f"data.latent_mean={SCM_MEAN}", f"data.latent_std={SCM_STD}"])
    torch.manual_seed(0)
    net = build_network(cfg.network, "cpu")
    sd = net.state_dict()
    ckpt = tmp_path / "checkpoint-0000001.pt"
    ckpt_io.save_atomic({"format": ckpt_io.FORMAT, "version": ckpt_io.VERSION, "kind": "consistency",
                         "step": 1, "config": cfg.to_dict(), "net": sd, "ema": sd}, ckpt)
    imgs = tmp_path / "imgs"
    files = _write_tree(imgs)                            # any sizes: ADM-cropped to 16x16
    code, stdout, err = run(capsys, "refine", ckpt, imgs, "--t", 0.7, "--out", tmp_path / "ref",
                            "--device", "cpu", "--json", "--seed", 5)
    assert code == 0, err
    assert json.loads(stdout)["resolution"] == RES

    crops = _ref_crops(files)
    mean, _ = _vae_posterior(vae, crops)
    mu, sig = torch.tensor(SCM_MEAN).view(1, 4, 1, 1), torch.tensor(SCM_STD).view(1, 4, 1, 1)
    net.eval().requires_grad_(False)
    with torch.no_grad():
        y = refine(net, "consistency", (mean - mu) * 0.5 / sig, list(range(5, 10)), [0.7], 0.5)
        want = to_uint8(vae.decode(y * sig / 0.5 + mu).sample)
    for k, w in zip(ORDER, want):
        got = np.asarray(Image.open((tmp_path / "ref" / k).with_suffix(".png")))
        assert got.shape == (RES, RES, 3)
        assert np.abs(got.astype(int) - w.astype(int)).max() <= 1


def test_vae_pixel_range_unit_is_edm2s_convention(latent_set, tiny_vae, tmp_path, capsys):
    """--vae-pixel-range unit: the VAE sees x/255 and decodes to [0, 1] (EDM2's StabilityVAEEncoder);
    the dataset records it and a config with the other range is refused."""
    from scmctl.config import DataConfig
    from scmctl.data.datasets import load_dataset
    from scmctl.data.latents import decode_to_uint8, fill_from_latent_data

    _, _, crops, root = latent_set
    folder, vae = tiny_vae
    out = tmp_path / "unit"
    code, stdout, err = run(capsys, "data", "latents", root / "train", "--out", out, "--vae", folder,
                                "--resolution", RES, "--dtype", "float32", "--device", "cpu",
                                "--vae-pixel-range", "unit", "--json")
    assert code == 0, err
    assert json.loads(stdout)["vae_pixel_range"] == "unit"
    x01 = torch.from_numpy(crops).permute(0, 3, 1, 2).float() / 255
    with torch.no_grad():
        want = vae.encode(x01).latent_dist.mean
    assert (torch.from_numpy(np.load(out / "latents.npy")[:, 0]) - want).abs().max() < 1e-5
    cfg = DataConfig(encoder=str(folder), latent_mean=SCM_MEAN, latent_std=SCM_STD, vae_pixel_range="unit")
    z = (want.double() - torch.tensor(SCM_MEAN).view(1, 4, 1, 1)) * 0.5 / torch.tensor(SCM_STD).view(1, 4, 1, 1)
    with torch.no_grad():
        dec = vae.decode(want).sample
    ref = (dec * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    diff = np.abs(decode_to_uint8(cfg, z.float(), "cpu").astype(int) - ref.astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 0.01
    ds = load_dataset(str(out))
    with pytest.raises(UsageError, match="--vae-pixel-range signed"):
        fill_from_latent_data(DataConfig(), ds)
    fill_from_latent_data(DataConfig(vae_pixel_range="unit"), ds)
