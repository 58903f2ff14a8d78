"""Prepared datasets: decode, crop (and VAE-encode) once, memory-map at training time.

A prepared dataset is a folder (read back by :func:`scmctl.data.datasets.load_dataset`):

    dataset.json   metadata: format "scmctl-dataset", version 1, kind "pixels" | "latents", count,
                   sizes, class names, source, transform, and for latents the VAE (id/path, sha256
                   of its weights file), latent_mean/latent_std/sigma_data and the measured stats
    images.npy     pixels: uint8 (N, H, W, C)
    latents.npy    latents: float16|float32 (N, 2, C, h, w): [:, 0] posterior mean, [:, 1] std of
                   the raw AutoencoderKL latents (no scaling_factor; normalization at load time)
    labels.npy     int64 (N,), absent for unlabeled data

Writing is atomic and resumable: everything goes to the sibling folder ``OUT.partial`` (arrays
preallocated as .npy memmaps, ``job.json`` = what is being made, ``progress.json`` = how many
entries are on disk, updated after each flushed chunk) and is renamed to ``OUT`` only once
``dataset.json`` is written, so ``OUT`` never exists half-written. Running the same command
again after an interruption continues from ``progress.json``; a ``.partial`` folder of a
different job is discarded and started over. A finished folder keeps the job as ``.job.json``, so
the same command run once more (say, after a kill that landed just after the rename) reports the
dataset and exits 0.

Image folders: class subfolders (ImageNet synsets n01440764/...) give labels 0..K-1 in sorted
folder-name order, images may be nested inside a class; a folder of images alone is unlabeled.
Every image is converted to RGB and ADM center-cropped
(:func:`scmctl.data.imageio.center_crop_adm`), decoded by a thread pool (PIL releases the GIL).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

from scmctl.data.datasets import (DATASET_FORMAT, DATASET_JSON, DATASET_VERSION, is_prepared,
                                  load_dataset, read_metadata)
from scmctl.fileio import remove_stale_temps, write_json_atomic
from scmctl.data import imageio
from scmctl.data.imageio import read_image_adm
from scmctl.errors import UsageError

PIXEL_CHUNK = 1024          # images per flushed chunk (the unit of resuming) ...
CHUNK_BYTES = 64 << 20      # ... at most this many bytes of images per chunk (512x512: 85 images)
Progress = Optional[Callable[[int, int], None]]          # (done, total)


# --- public entry points --------------------------------------------------------------------------

def prepare_cifar10(archive: str | os.PathLike, out: str | os.PathLike, split: str = "train",
                    on_progress: Progress = None) -> dict:
    """The CIFAR-10 python archive (or its cifar-10-batches-py folder) -> a prepared pixel dataset
    of the split (32x32 RGB, labels 0..9 with the archive's class names, images unchanged)."""
    if split not in ("train", "test"):
        raise UsageError(f"--split must be train or test, got '{split}'")
    src = Path(archive)
    if is_prepared(src) or not (src.is_file() or (src / "batches.meta").is_file()):
        raise UsageError(f"{archive}: expected cifar-10-python.tar.gz or its cifar-10-batches-py "
                         f"folder")
    data = load_dataset(f"{archive}:{split}")           # the restricted CIFAR reader
    images = data.images.permute(0, 2, 3, 1).numpy()
    job = {"kind": "pixels", "what": "cifar10", "split": split, "source": _fingerprint_file(src)}
    n = images.shape[0]
    w = _Writer(Path(out), job, {"images": (images.shape, "uint8")}, data.labels.numpy())
    for i in range(w.done, n, PIXEL_CHUNK):
        w.arrays["images"][i:i + PIXEL_CHUNK] = images[i:i + PIXEL_CHUNK]
        w.commit(min(i + PIXEL_CHUNK, n))
        _report(on_progress, min(i + PIXEL_CHUNK, n), n)
    meta = _pixel_meta(images.shape, data.class_names, str(src.resolve()),
                       transform="none (CIFAR-10 32x32 as stored)", split=split)
    return w.finish(meta)


def prepare_images(src: str | os.PathLike, out: str | os.PathLike, resolution: int,
                   workers: int | None = None, on_progress: Progress = None) -> dict:
    """An image-folder tree (ImageNet train: synset subfolders) -> ADM center crops at
    ``resolution``, uint8 RGB, labels from the class folders."""
    _check_resolution(resolution)
    files, labels, class_names = list_class_tree(src)
    n = len(files)
    job = {"kind": "pixels", "what": "images", "resolution": resolution,
           "source": _fingerprint_files(src, files, labels)}
    shape = (n, resolution, resolution, 3)
    w = _Writer(Path(out), job, {"images": (shape, "uint8")}, labels)
    chunk = max(1, min(PIXEL_CHUNK, CHUNK_BYTES // (3 * resolution * resolution)))
    with _pool(workers) as pool:
        for i0, crops in _chunks(pool, lambda f: read_image_adm(f, resolution), files, w.done,
                                 chunk):
            w.arrays["images"][i0:i0 + len(crops)] = np.stack(crops)
            w.commit(i0 + len(crops))
            _report(on_progress, i0 + len(crops), n)
    meta = _pixel_meta(shape, class_names, str(Path(src).resolve()),
                       transform=f"ADM center crop to {resolution}x{resolution} (BOX halving, "
                                 f"BICUBIC, center crop, no flips), RGB")
    return w.finish(meta)


def prepare_latents(src: str | os.PathLike, out: str | os.PathLike, vae: str,
                    resolution: int = 512, batch: int = 32, device: str = "auto",
                    dtype: str = "float16", latent_mean: Sequence[float] | str | None = None,
                    latent_std: Sequence[float] | str | None = None, sigma_data: float = 0.5,
                    vae_pixel_range: str = "signed",
                    workers: int | None = None, on_progress: Progress = None) -> dict:
    """An image-folder tree (ADM center crop to ``resolution``) or a prepared RGB pixel dataset at
    ``resolution`` -> VAE posterior mean and std of every image, stored raw.

    ``latent_mean``/``latent_std``: the normalization recorded for training (default: the sCM
    paper's sd-vae-ft-mse statistics, Lu & Song 2025 App. G), or "measured" for both: the per-channel mean
    and std of z = mean + std·ε over this dataset (E[z] = avg mean, E[z²] = avg(mean² + std²)),
    which are recorded in any case as measured_mean/measured_std.
    """
    from scmctl.data import latents as lat

    _check_resolution(resolution)
    if batch < 1:
        raise UsageError(f"--batch must be >= 1, got {batch}")
    if dtype not in ("float16", "float32"):
        raise UsageError(f"--dtype must be float16 or float32, got '{dtype}'")
    if not sigma_data > 0:
        raise UsageError(f"--sigma-data must be > 0, got {sigma_data}")
    if vae_pixel_range not in ("signed", "unit"):
        raise UsageError(f"--vae-pixel-range must be signed or unit, got '{vae_pixel_range}'")
    stats_mode, latent_mean, latent_std = _stats_choice(latent_mean, latent_std)

    src_p = Path(src)
    if is_prepared(src_p):
        data = load_dataset(src_p)
        if data.kind != "pixels" or data.channels != 3 or data.height != data.width:
            raise UsageError(f"{src}: a latent dataset needs square RGB images; this prepared "
                             f"dataset is {data.kind} {data.channels}x{data.height}x{data.width}")
        if data.height != resolution:
            raise UsageError(f"{src}: prepared at {data.height}x{data.height}, not --resolution "
                             f"{resolution}; pass the image folder or a dataset at {resolution}")
        n = len(data)
        labels = data.labels.numpy() if data.labels is not None else None
        class_names = data.class_names
        fingerprint = {"prepared": str(src_p.resolve()),
                       "dataset_json": hashlib.sha256((src_p / DATASET_JSON).read_bytes()).hexdigest()}
        items: Sequence = range(n)
        load_one = lambda i: data.uint8([i])[0]                       # noqa: E731
        transform = f"from prepared dataset {src_p.resolve()} ({data.meta.get('transform', '')})"
    else:
        files, labels, class_names = list_class_tree(src)
        n = len(files)
        fingerprint = _fingerprint_files(src, files, labels)
        items = files
        load_one = lambda f: read_image_adm(f, resolution)             # noqa: E731
        transform = (f"ADM center crop to {resolution}x{resolution} (BOX halving, BICUBIC, center "
                     f"crop, no flips), RGB")

    vae_obj = lat.load_vae(vae, device)
    f = vae_obj.downsampling
    if resolution % f:
        raise UsageError(f"--resolution {resolution} is not a multiple of the VAE's downsampling "
                         f"factor {f}")
    c, h = vae_obj.latent_channels, resolution // f
    if stats_mode != "measured" and (len(latent_mean) != c or len(latent_std) != c):
        raise UsageError(f"--latent-mean/--latent-std need {c} values (the VAE's latent "
                         f"channels), got {len(latent_mean)}/{len(latent_std)}")
    job = {"kind": "latents", "resolution": resolution, "dtype": dtype, "source": fingerprint,
           "encoder_sha256": vae_obj.sha256, "vae_pixel_range": vae_pixel_range}
    shape = (n, 2, c, h, h)
    w = _Writer(Path(out), job, {"latents": (shape, dtype)}, labels,
                state={"sum": [0.0] * c, "sumsq": [0.0] * c})
    sums = np.array(w.state["sum"], dtype=np.float64)
    sumsqs = np.array(w.state["sumsq"], dtype=np.float64)
    with _pool(workers) as pool:
        for i0, crops in _chunks(pool, load_one, items, w.done, batch):
            mean, std = vae_obj.encode(np.stack(crops), batch=batch, pixel_range=vae_pixel_range)
            stored = np.stack([mean.numpy(), std.numpy()], axis=1).astype(dtype)
            w.arrays["latents"][i0:i0 + len(crops)] = stored
            m, s = stored[:, 0].astype(np.float64), stored[:, 1].astype(np.float64)
            sums += m.sum(axis=(0, 2, 3))
            sumsqs += (m * m + s * s).sum(axis=(0, 2, 3))
            w.commit(i0 + len(crops), {"sum": sums.tolist(), "sumsq": sumsqs.tolist()})
            _report(on_progress, i0 + len(crops), n)
    count = n * h * h
    measured_mean = sums / count
    measured_std = np.sqrt(np.maximum(sumsqs / count - measured_mean ** 2, 0.0))
    if stats_mode == "measured":
        latent_mean, latent_std = measured_mean.tolist(), measured_std.tolist()
        if min(latent_std) <= 0:
            raise UsageError("the measured latent std is 0 in some channel; pass --latent-std")
    meta = _base_meta("latents", n, class_names, str(src_p.resolve()), transform)
    meta.update({
        "image_resolution": resolution, "latent_channels": c, "latent_resolution": h,
        "dtype": dtype,
        "encoder": vae if not Path(vae).expanduser().is_dir() else str(Path(vae).expanduser().resolve()),
        "encoder_path": str(vae_obj.path), "encoder_weights": vae_obj.weights_file.name,
        "encoder_sha256": vae_obj.sha256, "encoder_revision": vae_obj.revision,
        "vae_scaling_factor": vae_obj.scaling_factor, "scaling": lat.SCALING_NOTE,
        "normalization": "z_norm = (z - latent_mean) * sigma_data / latent_std, "
                         "z = mean + std * eps, eps ~ N(0, I) per training step",
        "latent_mean": [float(v) for v in latent_mean],
        "latent_std": [float(v) for v in latent_std],
        "latent_stats": stats_mode, "sigma_data": float(sigma_data), "vae_pixel_range": vae_pixel_range,
        "measured_mean": measured_mean.tolist(), "measured_std": measured_std.tolist(),
        "files": {"latents": "latents.npy", "labels": "labels.npy" if labels is not None else None},
        "layout": "latents.npy: (N, 2, C, h, w), [:, 0] posterior mean, [:, 1] posterior std",
    })
    return w.finish(meta)


def list_class_tree(src: str | os.PathLike) -> tuple[list[Path], Optional[np.ndarray], list[str]]:
    """(files, labels or None, class names) of an image-folder tree: class subfolders in sorted
    name order (labels 0..K-1, images nested at any depth inside), or loose images (unlabeled)."""
    root = Path(src)
    if not root.is_dir():
        raise UsageError(f"{src}: " + ("no such folder" if not root.exists() else
                                       "expected a folder of class subfolders (ImageNet train)"))
    files, labels, class_names = imageio.list_class_tree(root)
    return files, (np.asarray(labels, dtype=np.int64) if labels is not None else None), class_names


# --- the atomic, resumable writer -----------------------------------------------------------------

# Kept (hidden) in a finished folder: what was made, so the same command run again is a no-op.
DONE_JOB = ".job.json"


class _Writer:
    """Preallocated .npy memmaps in ``OUT.partial``; :meth:`commit` after each flushed chunk,
    :meth:`finish` writes dataset.json and renames the folder to ``OUT``."""

    def __init__(self, out: Path, job: dict, arrays: dict, labels: Optional[np.ndarray],
                 state: Optional[dict] = None):
        self.out = out
        self.tmp = out.with_name(out.name + ".partial")
        job = {"format": DATASET_FORMAT, "version": DATASET_VERSION, **job,
               "arrays": {k: [list(s), d] for k, (s, d) in arrays.items()}}
        self.done, self.state = 0, dict(state or {})
        self.complete = False
        if out.exists():
            done_job = _read_json(out / DONE_JOB) if is_prepared(out) else None
            if isinstance(done_job, dict) and done_job.get("job") == json.loads(json.dumps(job)):
                # The same command already finished (e.g. killed after the rename): nothing to do.
                self.complete, self.arrays = True, {}
                self.done = next(iter(arrays.values()))[0][0]
                self.state.update(done_job.get("state", {}))
                return
            if is_prepared(out):
                raise UsageError(f"{out}: already holds a prepared dataset; delete it or choose "
                                 f"another --out")
            if not out.is_dir() or any(out.iterdir()):
                raise UsageError(f"{out}: exists and is not an empty folder; choose another --out")
        self._job = job
        if self.tmp.is_dir() and _read_json(self.tmp / "job.json") == json.loads(json.dumps(job)):
            remove_stale_temps(self.tmp)  # OUT.partial is this job's own: a killed write's left-overs go
            progress = _read_json(self.tmp / "progress.json") or {}
            self.done = int(progress.get("done", 0))
            self.state.update(progress.get("state", {}))
            self.resumed = self.done > 0
        else:
            if self.tmp.exists():
                shutil.rmtree(self.tmp) if self.tmp.is_dir() else self.tmp.unlink()
            self.tmp.mkdir(parents=True)
            self.resumed = False
        mode = "r+" if self.resumed else "w+"
        self.arrays = {k: np.lib.format.open_memmap(self.tmp / f"{k}.npy", mode=mode,
                                                    dtype=np.dtype(d), shape=tuple(s))
                       for k, (s, d) in arrays.items()}
        if labels is not None and not self.resumed:
            np.save(self.tmp / "labels.npy", np.asarray(labels, dtype=np.int64))
        if not self.resumed:
            write_json_atomic(self.tmp / "progress.json", {"done": 0, "state": self.state})
            write_json_atomic(self.tmp / "job.json", job)        # last: a job.json means a usable folder

    def commit(self, done: int, state: Optional[dict] = None) -> None:
        for a in self.arrays.values():
            a.flush()
        if state is not None:
            self.state = state
        self.done = done
        write_json_atomic(self.tmp / "progress.json", {"done": done, "state": self.state})

    def finish(self, meta: dict) -> dict:
        if self.complete:
            return read_metadata(self.out)
        for a in self.arrays.values():
            a.flush()
        self.arrays.clear()
        meta["created"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        write_json_atomic(self.tmp / DONE_JOB, {"job": self._job, "state": self.state})
        write_json_atomic(self.tmp / DATASET_JSON, meta)
        for name in ("job.json", "progress.json"):
            (self.tmp / name).unlink()
        if self.out.is_dir():                              # an empty folder (checked above)
            self.out.rmdir()
        os.replace(self.tmp, self.out)
        return read_metadata(self.out)


# --- helpers --------------------------------------------------------------------------------------

def _pool(workers: int | None) -> ThreadPoolExecutor:
    if workers is not None and workers < 1:
        raise UsageError(f"--workers must be >= 1, got {workers}")
    return ThreadPoolExecutor(max_workers=workers or min(32, os.cpu_count() or 1))


def _chunks(pool: ThreadPoolExecutor, fn, items: Sequence, start: int, size: int):
    """Yield (first index, results) chunk by chunk from ``start``, in order, the next chunk
    decoding in the pool while the caller stores (or encodes) the current one."""
    pending = None
    try:
        for i0 in range(start, len(items), size):
            futures = [pool.submit(fn, it) for it in items[i0:i0 + size]]
            if pending is not None:
                yield pending[0], [f.result() for f in pending[1]]
            pending = (i0, futures)
        if pending is not None:
            yield pending[0], [f.result() for f in pending[1]]
            pending = None
    finally:
        if pending is not None:
            for f in pending[1]:
                f.cancel()


def _report(cb: Progress, done: int, total: int) -> None:
    if cb is not None:
        cb(done, total)


def _check_resolution(resolution) -> None:
    if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution < 1:
        raise UsageError(f"--resolution must be a positive integer, got {resolution!r}")


def _stats_choice(mean, std):
    from scmctl.data.latents import SD_VAE_LATENT_MEAN, SD_VAE_LATENT_STD

    if (mean == "measured") != (std == "measured"):
        raise UsageError("--latent-mean and --latent-std: give 'measured' for both or for neither")
    if mean == "measured":
        return "measured", None, None
    if mean is None and std is None:
        return "scm-paper", list(SD_VAE_LATENT_MEAN), list(SD_VAE_LATENT_STD)
    if mean is None or std is None:
        raise UsageError("--latent-mean and --latent-std go together")
    mean, std = [float(v) for v in mean], [float(v) for v in std]
    if not all(math.isfinite(v) for v in mean + std) or min(std) <= 0:
        raise UsageError("--latent-std values must be > 0 and all values finite")
    return "given", mean, std


def _base_meta(kind: str, n: int, class_names: list[str], source: str, transform: str) -> dict:
    from scmctl import __version__

    return {"format": DATASET_FORMAT, "version": DATASET_VERSION, "kind": kind, "count": n,
            "num_classes": len(class_names), "class_names": list(class_names), "source": source,
            "transform": transform, "scmctl_version": __version__}


def _pixel_meta(shape, class_names, source, transform, split=None) -> dict:
    n, h, w, c = shape
    meta = _base_meta("pixels", n, class_names, source, transform)
    meta.update({"resolution": h, "height": h, "width": w, "channels": c,
                 "files": {"images": "images.npy", "labels": "labels.npy" if class_names else None},
                 "layout": "images.npy: uint8 (N, H, W, C)"})
    if split is not None:
        meta["split"] = split
    return meta


def _fingerprint_file(p: Path) -> dict:
    st = p.stat()
    return {"path": str(p.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _fingerprint_files(root, files: list[Path], labels) -> dict:
    """What a resumed run must find again: the same files (relative paths) with the same labels."""
    h = hashlib.sha256()
    root = Path(root)
    for i, f in enumerate(files):
        h.update(f"{f.relative_to(root)}\t{labels[i] if labels is not None else -1}\n".encode())
    return {"root": str(root.resolve()), "count": len(files), "sha256": h.hexdigest()}


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None
