"""FID: image sources, streaming feature statistics, reference statistics and the Fréchet distance.

The pieces are shared with the other metrics (KID, precision/recall, FD_DINOv2):
:func:`open_images` reads a folder / ``.npz`` / ``.npy`` / run directory as uint8 NHWC batches,
:func:`iter_features` runs a :class:`~scmctl.metrics.detectors.Detector` over any source with a
``batches(batch_size)`` method, :class:`StreamingStats` accumulates mean and covariance in float64.
Reference statistics live in :mod:`scmctl.metrics.reference`.
"""

from __future__ import annotations

import os
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator

import numpy as np

from scmctl.data.imageio import list_image_files, read_image
from scmctl.errors import UsageError

MIN_SAMPLES = 50_000  # the protocol of the papers (SCM_NOTES §7)
ARRAY_KEYS = ("images", "arr_0")  # keys tried, in order, in an .npz of images


# --------------------------------------------------------------------------------------------
# Statistics
# --------------------------------------------------------------------------------------------

class StreamingStats:
    """Mean and (unbiased) covariance of features seen in batches, accumulated in float64.

    Batches are merged with Chan et al.'s pairwise update (mean and centred scatter matrix), which
    equals the one-shot ``np.mean`` / ``np.cov`` without the cancellation of raw second moments.
    """

    def __init__(self) -> None:
        self.n = 0
        self.mean: np.ndarray | None = None
        self.scatter: np.ndarray | None = None  # sum of outer products of deviations from the mean

    def update(self, features) -> None:
        x = np.asarray(features.numpy() if hasattr(features, "numpy") else features, dtype=np.float64)
        if x.ndim != 2:
            raise ValueError(f"features must be (N, D); got shape {x.shape}")
        nb = x.shape[0]
        if nb == 0:
            return
        mb = x.mean(axis=0)
        xc = x - mb
        sb = xc.T @ xc
        if self.n == 0:
            self.n, self.mean, self.scatter = nb, mb, sb
            return
        if x.shape[1] != self.mean.shape[0]:
            raise ValueError(f"features are {x.shape[1]}-d after {self.mean.shape[0]}-d ones")
        n = self.n + nb
        delta = mb - self.mean
        self.mean = self.mean + delta * (nb / n)
        self.scatter = self.scatter + sb + np.outer(delta, delta) * (self.n * nb / n)
        self.n = n

    @property
    def mu(self) -> np.ndarray:
        if self.n == 0:
            raise ValueError("no features seen")
        return self.mean

    @property
    def sigma(self) -> np.ndarray:
        if self.n < 2:
            raise ValueError("the covariance needs at least 2 feature vectors")
        return self.scatter / (self.n - 1)


def compute_stats(features) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) of (N, D) features in float64; sigma is unbiased like ``np.cov(rowvar=False)``."""
    s = StreamingStats()
    s.update(features)
    return s.mu, s.sigma


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2), in float64, without sqrtm.

    FD = |mu1 - mu2|² + tr Σ1 + tr Σ2 - 2 tr √(Σ1 Σ2), and tr √(Σ1 Σ2) = Σ_i √λ_i with λ_i the
    eigenvalues of the symmetric PSD matrix √Σ1 Σ2 √Σ1 (similar to Σ1 Σ2), all by ``eigh``; tiny
    eigenvalues below round-off (d·eps·max|λ|, as in ``matrix_rank``) count as 0, since √ would
    magnify their noise; a round-off negative result is clipped to 0.
    """
    import torch  # its float64 eigh is several times faster than numpy's on 2048-d covariances

    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    d = mu1.shape[0]
    if mu1.shape != (d,) or mu2.shape != (d,) or s1.shape != (d, d) or s2.shape != (d, d):
        raise ValueError(f"shape mismatch: mu {mu1.shape}/{mu2.shape}, sigma {s1.shape}/{s2.shape}")
    s1 = (s1 + s1.T) / 2
    s2 = (s2 + s2.T) / 2
    w, v = (t.numpy() for t in torch.linalg.eigh(torch.from_numpy(s1)))
    root1 = (v * np.sqrt(_clip_round_off(w))) @ v.T
    m = root1 @ s2 @ root1
    lam = torch.linalg.eigvalsh(torch.from_numpy((m + m.T) / 2)).numpy()
    tr_covmean = np.sqrt(_clip_round_off(lam)).sum()
    diff = mu1 - mu2
    fd = diff @ diff + np.trace(s1) + np.trace(s2) - 2 * tr_covmean
    return float(max(fd, 0.0))


def _clip_round_off(w: np.ndarray) -> np.ndarray:
    tol = w.shape[0] * np.finfo(np.float64).eps * max(np.abs(w).max(initial=0.0), np.finfo(np.float64).tiny)
    return np.where(w > tol, w, 0.0)


# --------------------------------------------------------------------------------------------
# Image sources
# --------------------------------------------------------------------------------------------

class ImageSource:
    """uint8 images from a folder (sorted file order) or an NHWC array, read in batches."""

    def __init__(self, path: Path, files: list[Path] | None = None, array=None):
        self.path = path
        self.files = files
        self.array = array

    def __len__(self) -> int:
        return len(self.files) if self.files is not None else int(self.array.shape[0])

    def first(self, n: int) -> "ImageSource":
        """The first ``n`` images (sorted file order / array order)."""
        return self.slice(0, n)

    def slice(self, start: int, stop: int) -> "ImageSource":
        """Images ``start .. stop-1`` (sorted file order / array order)."""
        if self.files is not None:
            return ImageSource(self.path, files=self.files[start:stop])
        return ImageSource(self.path, array=self.array[start:stop])

    def subset(self, indices) -> "ImageSource":
        """The images at ``indices`` (in that order)."""
        if self.files is not None:
            return ImageSource(self.path, files=[self.files[i] for i in indices])
        return ImageSource(self.path, array=self.array[np.asarray(indices, dtype=np.int64)])

    def batches(self, batch_size: int, workers: int | None = None) -> Iterator[np.ndarray]:
        """uint8 NHWC batches; a batch is split where the image shape changes (mixed sizes)."""
        if self.array is not None:
            for i in range(0, len(self), batch_size):
                yield np.array(self.array[i:i + batch_size])  # a writable copy (memmaps are read-only)
            return
        chunks = [self.files[i:i + batch_size] for i in range(0, len(self.files), batch_size)]
        workers = workers or min(8, os.cpu_count() or 1)
        with ThreadPoolExecutor(max_workers=workers) as pool:
            def submit(chunk):
                return [pool.submit(read_image, f) for f in chunk]

            queue = [submit(chunks[0])] if chunks else []
            for k in range(len(chunks)):
                if k + 1 < len(chunks):  # decode the next batch while this one is being processed
                    queue.append(submit(chunks[k + 1]))
                yield from _same_shape_runs([f.result() for f in queue.pop(0)])


def _same_shape_runs(images: list[np.ndarray]) -> Iterator[np.ndarray]:
    start = 0
    for i in range(1, len(images) + 1):
        if i == len(images) or images[i].shape != images[start].shape:
            yield np.stack(images[start:i])
            start = i


def _load_npz(path: Path) -> dict[str, np.ndarray]:
    """An .npz/.npy as a dict of arrays (an .npy is ``arr_0``), never unpickling: UsageError else."""
    try:
        if path.suffix.lower() == ".npy":
            return {"arr_0": np.load(path, mmap_mode="r", allow_pickle=False)}
        z = np.load(path, allow_pickle=False)
        if not isinstance(z, np.lib.npyio.NpzFile):  # an .npy under an .npz name
            return {"arr_0": z}
        with z:
            return {k: z[k] for k in z.files}
    except ValueError as e:
        if "pickle" in str(e).lower():
            raise UsageError(f"{path}: not an .npz/.npy of plain arrays (pickled data and object arrays "
                             "are refused); store numeric arrays: uint8 images or float mu/sigma") from None
        raise UsageError(f"{path}: cannot read as .npz/.npy ({e})") from None
    except (OSError, EOFError, zipfile.BadZipFile) as e:
        raise UsageError(f"{path}: cannot read as .npz/.npy ({e.__class__.__name__})") from None


def _images_from_arrays(path: Path, arrays: dict[str, np.ndarray]) -> np.ndarray:
    key = next((k for k in ARRAY_KEYS if k in arrays), None)
    if key is None:
        raise UsageError(f"{path}: no image array (looked for keys {', '.join(ARRAY_KEYS)}; found "
                         f"{', '.join(arrays) or 'none'})")
    a = arrays[key]
    if a.dtype != np.uint8:
        raise UsageError(f"{path}: images must be uint8 NHWC (0..255), got {a.dtype}")
    if a.ndim == 3:
        a = a[:, :, :, None]
    if a.ndim != 4 or a.shape[3] not in (1, 3):
        hint = " (looks like NCHW: transpose to NHWC)" if a.ndim == 4 and a.shape[1] in (1, 3) else ""
        raise UsageError(f"{path}: images must be uint8 NHWC with 1 or 3 channels, got shape "
                         f"{tuple(a.shape)}{hint}")
    return a


def open_images(path: str | os.PathLike) -> ImageSource:
    """A folder of images, a run directory (its ``samples/``), or an ``.npz``/``.npy`` uint8 array.

    An ``.npz`` holds NHWC uint8 images under ``images`` or ``arr_0`` (what ``np.savez(f, x)``
    writes); NHW arrays are grayscale. Pickled contents are refused.
    """
    p = Path(path)
    if not p.exists():
        raise UsageError(f"{path}: no such file or directory")
    if p.is_dir():
        if (p / "config.yaml").is_file():  # a run directory: `scmctl sample RUN_DIR` writes samples/
            samples = p / "samples"
            if not samples.is_dir():
                raise UsageError(f"{path} is a run directory without samples/: run "
                                 f"`scmctl sample {path} -n 50000` first")
            return ImageSource(samples, files=list_image_files(samples))
        return ImageSource(p, files=list_image_files(p))
    if p.suffix.lower() in (".npz", ".npy"):
        arrays = _load_npz(p)
        if "mu" in arrays and "sigma" in arrays and not any(k in arrays for k in ARRAY_KEYS):
            raise UsageError(f"{path} holds statistics (mu, sigma), not images; pass it as --ref")
        return ImageSource(p, array=_images_from_arrays(p, arrays))
    if p.suffix.lower() in (".pkl", ".pickle"):
        raise UsageError(f"{path}: refusing to unpickle; convert it to an .npz with mu and sigma arrays")
    raise UsageError(f"{path}: expected a folder of images, a run directory, or an .npz/.npy array")


# --------------------------------------------------------------------------------------------
# Features
# --------------------------------------------------------------------------------------------

def iter_features(source: ImageSource, detector, batch_size: int = 64, description: str = "features",
                  show_progress: bool = True) -> Iterator[np.ndarray]:
    """float32 (B, D) feature batches of ``source`` in order, reported to :mod:`scmctl.progress`."""
    import torch

    from scmctl import progress

    with progress.bar(description, len(source), info=detector.describe(), enabled=show_progress) as bar:
        for batch in source.batches(batch_size):
            f = detector.features(torch.from_numpy(batch).permute(0, 3, 1, 2))
            bar.update(advance=batch.shape[0])
            yield f.numpy()


def extract_stats(source: ImageSource, detector, batch_size: int = 64, description: str = "features",
                  show_progress: bool = True) -> StreamingStats:
    """Streaming float64 statistics of the detector's features over ``source``."""
    if len(source) < 2:
        raise UsageError(f"{source.path}: {len(source)} image(s); statistics need at least 2")
    stats = StreamingStats()
    for f in iter_features(source, detector, batch_size, description, show_progress):
        stats.update(f)
    return stats


def extract_features(source, detector, batch_size: int = 64, description: str = "features",
                     show_progress: bool = True) -> np.ndarray:
    """All float32 (N, D) features of ``source`` (for KID and precision/recall)."""
    parts = list(iter_features(source, detector, batch_size, description, show_progress))
    if not parts:
        raise UsageError(f"{source.path}: no images")
    return np.concatenate(parts)
