"""Training data: the built-in digits, image folders, the CIFAR-10 python archive, arrays.

:func:`load_dataset` turns a ``--data`` value into a dataset: an :class:`ImageData` (uint8 NCHW
images in memory, optional labels), or for prepared folders a :class:`MappedImageData` or
:class:`LatentData`. All three have ``len()``, ``channels``/``height``/``width`` (of x0 in model
space), ``num_classes``, ``class_names``, ``source``, ``kind`` ("pixels" or "latents") and
``batch(indices) -> (float32 NCHW x0 in model space, int64 labels or None)``.
:func:`batch_indices` gives the data order of a training step, derived from (seed, step) alone so
that a resumed run sees exactly the batches an uninterrupted one would.

Accepted ``path`` values
------------------------
- ``None`` or ``"digits"``: the built-in handwritten digits (scikit-learn's copy of the UCI
  optdigits test set, 1797 images of 8x8, labels 0..9, see DIGITS_LICENSE.txt), 1 channel,
  upsampled to ``resolution`` (default 16). Pass a folder that happens to be called ``digits`` as
  ``./digits``.
- An image folder (.png, .jpg, ...). With subfolders, each subfolder is a class (labels 0..K-1 in
  the subfolders' sorted name order, e.g. ImageNet synsets; images inside a class may be nested
  further); with images directly in it and no subfolders, the data is unlabeled. Every image must
  have the same size and channel count. Grayscale stays 1 channel, everything else becomes RGB
  (alpha is dropped).
- The CIFAR-10 python archive ``cifar-10-python.tar.gz`` (read inside the tar, nothing extracted) or
  its extracted folder ``cifar-10-batches-py``. The training split (50,000 images) by default;
  append ``:test`` for the test split (``cifar-10-python.tar.gz:test``) or ``:train`` to be
  explicit. Its pickled batches are read by a restricted unpickler that only rebuilds containers,
  numbers, strings and numpy arrays: a batch that asks for anything else is refused, never run.
- A prepared dataset folder written by ``scmctl data`` (it holds ``dataset.json``): pixels
  (``images.npy``, uint8 N x H x W x C) as a :class:`MappedImageData`, or VAE latents
  (``latents.npy``, the posterior mean and std) as a :class:`LatentData`. Arrays are memory-mapped,
  never read whole (ImageNet-64 is 15.7 GB); labels are held in memory. ``resolution`` must be
  None or the prepared size (latents: the latent side or the image side).
- ``.npz``: images under ``images``, ``x`` or ``arr_0``; optional integer labels under ``labels``,
  ``y`` or ``arr_1`` (K = max label + 1 classes, named "0".."K-1"). ``.npy``: images only. Arrays
  must be uint8 (0..255) and shaped (N, H, W), (N, C, H, W) or (N, H, W, C) with C = 1 or 3
  (channels-first when axis 1 has size 1 or 3, else channels-last). Float arrays are refused
  rather than guessed at (is it [0, 1] or [-1, 1]?). Pickled (object) arrays are never loaded.

``resolution``: for the digits, the side they are upsampled to. For other data, ``None`` or the
data's own size keeps the pixels untouched; another value resizes square images to
resolution x resolution with a bicubic filter with antialiasing (PIL's BICUBIC kernel, computed in
float32 and rounded back to uint8). Non-square images with a ``resolution`` are an error: crop them
first, scmctl does not choose a crop for you. Whether the size suits the network is the caller's
check.
"""

from __future__ import annotations

import functools
import os
import pickle
import posixpath
import tarfile
import zipfile
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np
import torch

from scmctl import safe_pickle
from scmctl.data.imageio import list_class_tree, read_image
from scmctl.errors import UsageError

DIGITS_RESOLUTION = 16          # default side of the built-in digits (stored as 8x8)
CIFAR_TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR_TEST_BATCHES = ("test_batch",)
CIFAR_META = "batches.meta"
_SPLITS = ("train", "test")
_NPZ_IMAGE_KEYS = ("images", "x", "arr_0")
_NPZ_LABEL_KEYS = ("labels", "y", "arr_1")
_RESIZE_CHUNK = 2048            # images per interpolate call: bounds the float32 copy's memory
DATASET_JSON = "dataset.json"   # prepared folders (scmctl data ...): metadata, format, version
DATASET_FORMAT = "scmctl-dataset"
DATASET_VERSION = 1


@dataclass
class ImageData:
    """A dataset in memory: uint8 images (N, C, H, W), optional int64 labels (N,)."""

    kind = "pixels"                                      # class attribute, not a field

    images: torch.Tensor
    labels: torch.Tensor | None
    num_classes: int                                     # 0 when unlabeled
    class_names: list[str] = field(default_factory=list)
    source: str = ""                                     # human description, for logs and stats

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def channels(self) -> int:
        return int(self.images.shape[1])

    @property
    def height(self) -> int:
        return int(self.images.shape[2])

    @property
    def width(self) -> int:
        return int(self.images.shape[3])

    def batch(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Images ``indices`` as float32 NCHW in [-1, 1] (x/127.5 - 1, as from_uint8), labels."""
        x = self.images[indices].float() / 127.5 - 1.0
        y = self.labels[indices] if self.labels is not None else None
        return x, y

    def uint8(self, indices) -> np.ndarray:
        """Images ``indices`` as uint8 NHWC (for reference statistics, previews)."""
        return self.images[torch.as_tensor(indices)].permute(0, 2, 3, 1).numpy()


class _Prepared:
    """Shared part of the prepared-folder datasets: metadata, labels, a lazily opened memmap
    (dropped when pickled, e.g. into DataLoader workers, and reopened there)."""

    kind = ""
    _file_key = ""

    def __init__(self, root: Path, meta: dict):
        self.root = Path(root)
        self.meta = meta
        self.class_names: list[str] = list(meta.get("class_names") or [])
        self.num_classes = len(self.class_names)
        self._array: np.ndarray | None = None
        arr = self.array                                  # validates the file now, not mid-training
        if arr.shape[0] != meta["count"]:
            raise UsageError(f"{self.root / meta['files'][self._file_key]}: holds {arr.shape[0]} "
                             f"entries but {DATASET_JSON} says {meta['count']}")
        self.labels = None
        if meta["files"].get("labels"):
            lab_path = self.root / meta["files"]["labels"]
            lab = _np_load(lab_path, mmap=False)
            if lab.dtype.kind not in "iu" or lab.shape != (arr.shape[0],):
                raise UsageError(f"{lab_path}: expected {arr.shape[0]} integer labels, got "
                                 f"{lab.dtype} {tuple(lab.shape)}")
            if lab.size and (lab.min() < 0 or lab.max() >= max(self.num_classes, 1)):
                raise UsageError(f"{lab_path}: labels outside 0..{self.num_classes - 1}")
            self.labels = torch.from_numpy(lab.astype(np.int64))
        elif self.num_classes:
            raise UsageError(f"{self.root / DATASET_JSON}: names classes but no labels file")

    @property
    def array(self) -> np.ndarray:
        if self._array is None:
            self._array = _np_load(self.root / self.meta["files"][self._file_key], mmap=True)
        return self._array

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_array"] = None
        return state

    def __len__(self) -> int:
        return int(self.meta["count"])

    def _rows(self, indices) -> np.ndarray:
        """Rows ``indices`` of the memmap, read in sorted order (sequential on disk), in the given order."""
        idx = np.asarray(torch.as_tensor(indices).cpu().numpy(), dtype=np.int64).reshape(-1)
        if idx.size and (idx.min() < 0 or idx.max() >= len(self)):
            raise IndexError(f"index out of range for a dataset of {len(self)}")
        uniq, inverse = np.unique(idx, return_inverse=True)
        return np.asarray(self.array[uniq])[inverse.reshape(-1)]

    def _labels(self, indices) -> torch.Tensor | None:
        return self.labels[torch.as_tensor(indices).cpu()] if self.labels is not None else None


class MappedImageData(_Prepared):
    """A prepared pixel dataset: ``images.npy`` uint8 (N, H, W, C), memory-mapped."""

    kind = "pixels"
    _file_key = "images"

    def __init__(self, root: Path, meta: dict):
        super().__init__(root, meta)
        a = self.array
        if a.dtype != np.uint8 or a.ndim != 4 or a.shape[3] not in (1, 3):
            raise UsageError(f"{self.root / meta['files']['images']}: expected uint8 (N, H, W, C) "
                             f"with C = 1 or 3, got {a.dtype} {tuple(a.shape)}")
        self.source = (f"prepared dataset {self.root} ({len(self)} images {self.height}x{self.width}, "
                       + (f"{self.num_classes} classes)" if self.num_classes else "unlabeled)"))

    @property
    def channels(self) -> int:
        return int(self.array.shape[3])

    @property
    def height(self) -> int:
        return int(self.array.shape[1])

    @property
    def width(self) -> int:
        return int(self.array.shape[2])

    def uint8(self, indices) -> np.ndarray:
        return self._rows(indices)

    def batch(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Images ``indices`` as float32 NCHW in [-1, 1] (x/127.5 - 1), labels."""
        x = torch.from_numpy(self._rows(indices)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        return x.contiguous(), self._labels(indices)


class LatentData(_Prepared):
    """A prepared latent dataset: ``latents.npy`` (N, 2, C, h, w) float16/32 holding the VAE
    posterior's mean ([:, 0]) and std ([:, 1]) of each image's raw latents, memory-mapped.

    :meth:`batch` samples z = mean + std·ε (ε ~ N(0, I) from torch's global RNG, which the training
    loop seeds per step) and returns z_norm = (z − latent_mean)·sigma_data/latent_std with the
    statistics recorded in ``dataset.json`` (Lu & Song 2025, App. G).
    """

    kind = "latents"
    _file_key = "latents"

    def __init__(self, root: Path, meta: dict):
        super().__init__(root, meta)
        a = self.array
        where = self.root / meta["files"]["latents"]
        if a.dtype not in (np.float16, np.float32) or a.ndim != 5 or a.shape[1] != 2:
            raise UsageError(f"{where}: expected float16/float32 (N, 2, C, h, w), got {a.dtype} "
                             f"{tuple(a.shape)}")
        self.encoder: str = meta["encoder"]
        self.latent_mean = [float(v) for v in meta["latent_mean"]]
        self.latent_std = [float(v) for v in meta["latent_std"]]
        self.sigma_data = float(meta["sigma_data"])
        if len(self.latent_mean) != a.shape[2] or len(self.latent_std) != a.shape[2]:
            raise UsageError(f"{self.root / DATASET_JSON}: latent_mean/latent_std need {a.shape[2]} "
                             f"values (one per latent channel)")
        if min(self.latent_std) <= 0 or self.sigma_data <= 0:
            raise UsageError(f"{self.root / DATASET_JSON}: latent_std and sigma_data must be > 0")
        self.image_resolution = int(meta["image_resolution"])
        self.source = (f"latent dataset {self.root} ({len(self)} images {self.image_resolution}x"
                       f"{self.image_resolution} as {self.channels}x{self.height}x{self.width} "
                       f"latents of {self.encoder}, "
                       + (f"{self.num_classes} classes)" if self.num_classes else "unlabeled)"))

    @property
    def channels(self) -> int:
        return int(self.array.shape[2])

    @property
    def height(self) -> int:
        return int(self.array.shape[3])

    @property
    def width(self) -> int:
        return int(self.array.shape[4])

    def posterior(self, indices) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw posterior (mean, std) of ``indices``, float32 (N, C, h, w)."""
        rows = torch.from_numpy(self._rows(indices).astype(np.float32, copy=False))
        return rows[:, 0], rows[:, 1]

    def batch(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        mean, std = self.posterior(indices)
        z = mean + std * torch.randn(mean.shape, dtype=torch.float32)
        from scmctl.data.latents import normalize

        return normalize(z, self.latent_mean, self.latent_std, self.sigma_data), self._labels(indices)


def _np_load(path: Path, mmap: bool) -> np.ndarray:
    try:
        arr = np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise UsageError(f"{path}: cannot read ({e.__class__.__name__}: {e}); prepare the dataset "
                         f"again") from None
    if not isinstance(arr, np.ndarray):
        raise UsageError(f"{path}: not an .npy array")
    return arr


def read_metadata(root: str | os.PathLike) -> dict:
    """``dataset.json`` of a prepared folder, checked; a UsageError names what is wrong."""
    import json

    path = Path(root) / DATASET_JSON
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        raise UsageError(f"{root}: not a prepared dataset (no {DATASET_JSON}); make one with "
                         f"scmctl data cifar10|imagenet|latents") from None
    except (OSError, ValueError) as e:
        raise UsageError(f"{path}: unreadable ({e.__class__.__name__})") from None
    if not isinstance(meta, dict) or meta.get("format") != DATASET_FORMAT:
        raise UsageError(f"{path}: not an scmctl dataset description (format != {DATASET_FORMAT})")
    if meta.get("version") != DATASET_VERSION:
        raise UsageError(f"{path}: dataset format version {meta.get('version')} is not supported "
                         f"(this scmctl reads version {DATASET_VERSION}); prepare it again")
    need = {"pixels": ("count", "files"), "latents": ("count", "files", "encoder", "latent_mean",
                                                      "latent_std", "sigma_data", "image_resolution")}
    kind = meta.get("kind")
    if kind not in need:
        raise UsageError(f"{path}: unknown dataset kind {kind!r} (pixels or latents)")
    missing = [k for k in need[kind] if k not in meta]
    key = "images" if kind == "pixels" else "latents"
    if missing or not isinstance(meta["files"], dict) or key not in meta["files"]:
        raise UsageError(f"{path}: incomplete ({', '.join(missing) or 'files.' + key} missing)")
    for name in meta["files"].values():          # file names only: never a path out of the folder
        if name is not None and (not isinstance(name, str) or Path(name).name != name):
            raise UsageError(f"{path}: bad file name {name!r} in 'files'")
    return meta


def is_prepared(path: str | os.PathLike) -> bool:
    p = Path(path)
    return p.is_dir() and (p / DATASET_JSON).is_file()


def _load_prepared(p: Path, resolution: int | None):
    meta = read_metadata(p)
    ds = MappedImageData(p, meta) if meta["kind"] == "pixels" else LatentData(p, meta)
    ok = {ds.height} | ({ds.image_resolution} if ds.kind == "latents" else set())
    if resolution is not None and (ds.height != ds.width or resolution not in ok):
        raise UsageError(f"{p}: prepared at {ds.height}x{ds.width}"
                         + (f" (latents of {ds.image_resolution}x{ds.image_resolution} images)"
                            if ds.kind == "latents" else "")
                         + f", not {resolution}; prepare it again at that resolution or leave "
                           f"data.resolution unset")
    return ds


def load_dataset(path: str | os.PathLike | None, resolution: int | None = None):
    """Load the dataset named by ``path`` (the module docstring lists formats, ``resolution``)."""
    if resolution is not None and (isinstance(resolution, bool) or not isinstance(resolution, int)
                                   or resolution < 1):
        raise UsageError(f"resolution must be a positive integer, got {resolution!r}")
    if path is None or str(path) == "digits":
        return load_digits(DIGITS_RESOLUTION if resolution is None else resolution)

    spec = os.fspath(path)
    p, split = _split_suffix(spec)
    if not p.exists():
        raise UsageError(f"{spec}: no such file or directory")
    name = p.name.lower()
    is_tar = name.endswith((".tar.gz", ".tgz", ".tar"))
    if split is None and is_prepared(p):
        return _load_prepared(p, resolution)
    if p.is_dir() and _is_cifar_folder(p):
        data = _load_cifar(p, split or "train", from_tar=False)
    elif p.is_file() and is_tar:
        data = _load_cifar(p, split or "train", from_tar=True)
    elif split is not None:
        raise UsageError(f"{spec}: a ':{split}' suffix only applies to the CIFAR-10 archive or its "
                         f"cifar-10-batches-py folder")
    elif p.is_dir():
        data = _load_image_folder(p)
    elif name.endswith(".npz"):
        data = _load_npz(p)
    elif name.endswith(".npy"):
        data = _load_npy(p)
    else:
        raise UsageError(f"{spec}: unsupported dataset format (expected an image folder, "
                         f"cifar-10-python.tar.gz or its cifar-10-batches-py folder, .npz or .npy)")
    return _apply_resolution(data, resolution)


def load_digits(resolution: int = DIGITS_RESOLUTION) -> ImageData:
    """The built-in 1797 digits (1 channel, labels 0..9), resized from 8x8 to ``resolution``."""
    raw, labels = _digits_arrays()
    images = torch.tensor(raw).unsqueeze(1)              # a copy: (1797, 1, 8, 8)
    if resolution != images.shape[-1]:
        images = resize_images(images, resolution)
    return ImageData(images=images, labels=torch.tensor(labels), num_classes=10,
                     class_names=[str(i) for i in range(10)],
                     source=f"built-in digits (UCI optdigits via scikit-learn, 1797 images, "
                            f"8x8 -> {resolution}x{resolution} bicubic)")


def resize_images(images: torch.Tensor, resolution: int) -> torch.Tensor:
    """uint8 NCHW -> uint8 (N, C, resolution, resolution): bicubic with antialias, round, clamp.

    ``torch.nn.functional.interpolate(mode="bicubic", antialias=True)`` uses PIL's bicubic kernel
    (a = -0.5) widened by the scale factor when downsampling, so it agrees with ``PIL.Image.resize(
    BICUBIC)`` up to PIL's integer intermediate rounding. Computed in float32, chunked.
    """
    n, c = images.shape[:2]
    out = torch.empty((n, c, resolution, resolution), dtype=torch.uint8)
    for i in range(0, n, _RESIZE_CHUNK):
        x = images[i:i + _RESIZE_CHUNK].float()
        y = torch.nn.functional.interpolate(x, size=(resolution, resolution), mode="bicubic",
                                            antialias=True, align_corners=False)
        out[i:i + _RESIZE_CHUNK] = y.round_().clamp_(0, 255).to(torch.uint8)
    return out


def batch_indices(n: int, batch: int, step: int, seed: int) -> torch.Tensor:
    """Dataset indices (int64, shape (batch,)) of training step ``step``.

    The data order is the concatenation of one random permutation of range(n) per epoch, the
    permutation of epoch e depending only on (seed, e); step s takes positions
    [s*batch, (s+1)*batch) of that sequence, crossing epoch boundaries where it must. So a step's
    indices never depend on what ran before it (bit-exact resume) and every epoch visits each
    image exactly once.
    """
    if n < 1:
        raise UsageError(f"the dataset is empty (n = {n})")
    if batch < 1:
        raise UsageError(f"batch size must be a positive integer, got {batch}")
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    start = step * batch
    end = start + batch
    parts = []
    pos = start
    while pos < end:
        epoch, offset = divmod(pos, n)
        take = min(n - offset, end - pos)
        parts.append(_epoch_permutation(n, seed, epoch)[offset:offset + take])
        pos += take
    return torch.cat(parts) if len(parts) > 1 else parts[0].clone()


@functools.lru_cache(maxsize=4)
def _epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    # SeedSequence mixes (seed, epoch) into a well-spread 64-bit generator seed; its algorithm is
    # fixed by specification, so the order is stable across numpy versions and machines.
    mixed = np.random.SeedSequence([seed % 2**64, epoch, 0x5C3]).generate_state(1, np.uint64)[0]
    g = torch.Generator(device="cpu").manual_seed(int(mixed))
    return torch.randperm(n, generator=g, dtype=torch.int64)


# --- built-in digits ------------------------------------------------------------------------------

@functools.lru_cache(maxsize=1)
def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    with resources.files("scmctl.data").joinpath("digits.npz").open("rb") as f:
        with np.load(f, allow_pickle=False) as z:
            images, labels = z["images"], z["labels"]
    images.setflags(write=False)
    labels.setflags(write=False)
    return images, labels


# --- image folders --------------------------------------------------------------------------------

def _load_image_folder(root: Path) -> ImageData:
    files, label_list, class_names = list_class_tree(root)
    labels = torch.tensor(label_list, dtype=torch.int64) if label_list is not None else None
    images = _read_same_size(files)
    kind = f"{len(class_names)} classes" if labels is not None else "unlabeled"
    return ImageData(images=images, labels=labels, num_classes=len(class_names),
                     class_names=class_names,
                     source=f"image folder {root} ({len(files)} images, {kind})")


def _read_same_size(files: list[Path]) -> torch.Tensor:
    """Decode ``files`` (threads: PIL releases the GIL) into one uint8 NCHW tensor."""
    out = None
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        # map() yields in order, so the first bad file in sorted order is the one reported
        for i, img in enumerate(pool.map(read_image, files)):
            if out is None:
                out = np.empty((len(files),) + img.shape, dtype=np.uint8)
            elif img.shape != out.shape[1:]:
                raise UsageError(f"{files[i]}: size {_hwc(img.shape)} differs from {files[0]}'s "
                                 f"{_hwc(out.shape[1:])}; all images must have the same size and "
                                 f"channel count")
            out[i] = img
    return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()


def _hwc(shape) -> str:
    h, w, c = shape
    return f"{w}x{h} with {c} channel{'s' if c != 1 else ''}"


# --- CIFAR-10 -------------------------------------------------------------------------------------

def _split_suffix(spec: str) -> tuple[Path, str | None]:
    for split in _SPLITS:
        if spec.endswith(":" + split) and len(spec) > len(split) + 1:
            return Path(spec[:-len(split) - 1]), split
    return Path(spec), None


def _is_cifar_folder(p: Path) -> bool:
    return (p / CIFAR_META).is_file() and any(
        (p / b).is_file() for b in CIFAR_TRAIN_BATCHES + CIFAR_TEST_BATCHES)


def _load_cifar(p: Path, split: str, from_tar: bool) -> ImageData:
    names = CIFAR_TRAIN_BATCHES if split == "train" else CIFAR_TEST_BATCHES
    wanted = set(names) | {CIFAR_META}
    blobs: dict[str, bytes] = {}
    if from_tar:
        try:
            with tarfile.open(p, "r:*") as tar:
                for member in tar:          # one pass in stream order: no seeking in the gzip
                    base = posixpath.basename(member.name)
                    if member.isfile() and base in wanted and base not in blobs:
                        blobs[base] = tar.extractfile(member).read()
        except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
            raise UsageError(f"{p}: cannot read the archive ({type(e).__name__}: "
                             f"{str(e).strip().splitlines()[0] if str(e).strip() else 'unreadable'})") from None
        if not any(b in blobs for b in CIFAR_TRAIN_BATCHES + CIFAR_TEST_BATCHES):
            raise UsageError(f"{p}: not the CIFAR-10 python archive (no data_batch_1..5 or "
                             f"test_batch inside); expected cifar-10-python.tar.gz")
    else:
        for b in wanted:
            if (p / b).is_file():
                try:
                    blobs[b] = (p / b).read_bytes()
                except OSError as e:
                    raise UsageError(f"{p / b}: cannot read ({e.__class__.__name__})") from None
    missing = [b for b in sorted(wanted) if b not in blobs]
    if missing:
        raise UsageError(f"{p}: incomplete CIFAR-10 data, missing {', '.join(missing)}")

    meta = _cifar_unpickle(blobs[CIFAR_META], f"{p}/{CIFAR_META}")
    raw_names = _cifar_field(meta, "label_names", f"{p}/{CIFAR_META}")
    try:
        class_names = [n.decode("utf-8") if isinstance(n, bytes) else str(n) for n in raw_names]
    except (TypeError, UnicodeDecodeError):
        raise UsageError(f"{p}/{CIFAR_META}: label_names is not a list of names") from None

    images, labels = [], []
    for b in names:
        where = f"{p}/{b}"
        batch = _cifar_unpickle(blobs[b], where)
        data = _cifar_field(batch, "data", where)
        lab = _cifar_field(batch, "labels", where)
        if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2
                and data.shape[1] == 3 * 32 * 32):
            raise UsageError(f"{where}: 'data' is not a uint8 (N, 3072) array")
        try:
            lab = np.asarray(lab, dtype=np.int64)
        except (TypeError, ValueError, OverflowError):
            raise UsageError(f"{where}: 'labels' is not a list of integers") from None
        if lab.shape != (data.shape[0],) or (lab.size and (lab.min() < 0
                                                           or lab.max() >= len(class_names))):
            raise UsageError(f"{where}: 'labels' must be {data.shape[0]} integers in "
                             f"0..{len(class_names) - 1}")
        images.append(data.reshape(-1, 3, 32, 32))     # rows are 1024 R, then G, then B values
        labels.append(lab)
    return ImageData(images=torch.from_numpy(np.concatenate(images)),
                     labels=torch.from_numpy(np.concatenate(labels)),
                     num_classes=len(class_names), class_names=class_names,
                     source=f"CIFAR-10 {split} split from {p}")


def _cifar_field(d, key: str, where: str):
    if not isinstance(d, dict):
        raise UsageError(f"{where}: not a CIFAR-10 batch (expected a pickled dict)")
    for k in (key.encode(), key):
        if k in d:
            return d[k]
    raise UsageError(f"{where}: not a CIFAR-10 batch (no '{key}' entry)")


def _cifar_unpickle(blob: bytes, where: str):
    try:
        return safe_pickle.loads(blob, encoding="bytes")
    except pickle.UnpicklingError as e:
        raise UsageError(f"{where}: not a CIFAR-10 batch ({e}); nothing in it was run") from None
    except safe_pickle.MALFORMED as e:
        raise UsageError(f"{where}: not a readable CIFAR-10 batch ({type(e).__name__})") from None


# --- arrays ---------------------------------------------------------------------------------------

def _load_npz(p: Path) -> ImageData:
    try:
        with np.load(p, allow_pickle=False) as z:
            if not isinstance(z, np.lib.npyio.NpzFile):
                raise UsageError(f"{p}: not an .npz archive")
            img_key = next((k for k in _NPZ_IMAGE_KEYS if k in z.files), None)
            if img_key is None:
                raise UsageError(f"{p}: no images array (looked for {', '.join(_NPZ_IMAGE_KEYS)}; "
                                 f"found {', '.join(z.files) or 'nothing'})")
            arr = z[img_key]
            lab_key = next((k for k in _NPZ_LABEL_KEYS if k in z.files), None)
            lab = z[lab_key] if lab_key is not None else None
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error) as e:
        raise UsageError(f"{p}: cannot read the .npz ({e.__class__.__name__}: {e})") from None
    images = _array_to_nchw(arr, f"{p}[{img_key}]")
    labels, num_classes = None, 0
    if lab is not None:
        labels, num_classes = _check_labels(lab, images.shape[0], f"{p}[{lab_key}]")
    kind = f"{num_classes} classes" if labels is not None else "unlabeled"
    return ImageData(images=images, labels=labels, num_classes=num_classes,
                     class_names=[str(i) for i in range(num_classes)],
                     source=f"array file {p} ({images.shape[0]} images, {kind})")


def _load_npy(p: Path) -> ImageData:
    try:
        arr = np.load(p, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise UsageError(f"{p}: cannot read the .npy ({e.__class__.__name__}: {e})") from None
    if not isinstance(arr, np.ndarray):
        raise UsageError(f"{p}: not an .npy array")
    images = _array_to_nchw(arr, str(p))
    return ImageData(images=images, labels=None, num_classes=0, class_names=[],
                     source=f"array file {p} ({images.shape[0]} images, unlabeled)")


def _array_to_nchw(arr: np.ndarray, where: str) -> torch.Tensor:
    if arr.dtype != np.uint8:
        raise UsageError(f"{where}: images must be uint8 in 0..255, got {arr.dtype}; convert "
                         f"first, e.g. (x * 127.5 + 127.5).round().clip(0, 255).astype(np.uint8) "
                         f"for data in [-1, 1]")
    if arr.ndim == 3:
        arr = arr[:, None]
    elif arr.ndim == 4 and arr.shape[1] in (1, 3):
        pass
    elif arr.ndim == 4 and arr.shape[3] in (1, 3):
        arr = arr.transpose(0, 3, 1, 2)
    else:
        raise UsageError(f"{where}: expected images shaped (N, H, W), (N, C, H, W) or (N, H, W, C) "
                         f"with C = 1 or 3, got {tuple(arr.shape)}")
    if arr.shape[0] == 0 or arr.shape[2] == 0 or arr.shape[3] == 0:
        raise UsageError(f"{where}: no images (shape {tuple(arr.shape)})")
    return torch.from_numpy(np.ascontiguousarray(arr))


def _check_labels(lab: np.ndarray, n: int, where: str) -> tuple[torch.Tensor, int]:
    if lab.dtype.kind not in "iu" or lab.shape != (n,):
        raise UsageError(f"{where}: labels must be {n} integers (shape ({n},)), got "
                         f"{lab.dtype} {tuple(lab.shape)}")
    if lab.min() < 0:
        raise UsageError(f"{where}: labels must be >= 0, found {int(lab.min())}")
    return torch.from_numpy(lab.astype(np.int64)), int(lab.max()) + 1


# --- resolution -----------------------------------------------------------------------------------

def _apply_resolution(data: ImageData, resolution: int | None) -> ImageData:
    if resolution is None or (data.height == resolution and data.width == resolution):
        return data
    if data.height != data.width:
        raise UsageError(f"{data.source}: images are {data.width}x{data.height}, not square; crop "
                         f"them to squares first, or leave the resolution unset")
    side = data.height
    data.images = resize_images(data.images, resolution)
    data.source += f", resized {side}x{side} -> {resolution}x{resolution} bicubic"
    return data
