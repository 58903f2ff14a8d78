"""Where evaluated images come from: files, datasets, or a checkpoint generating on the fly.

Every source has ``path``, ``len()`` and ``batches(batch_size)`` yielding uint8 NHWC arrays, so
:func:`~scmctl.metrics.fid.iter_features` runs the same on all of them:

- :class:`~scmctl.metrics.fid.ImageSource`: a folder of images, an ``.npz``/``.npy`` array, a run
  directory's ``samples/`` (:func:`~scmctl.metrics.fid.open_images`);
- :class:`DatasetSource`: anything :func:`scmctl.data.datasets.load_dataset` reads (the CIFAR-10
  archive, a prepared dataset folder, ...), for references;
- :class:`GeneratedSource`: a checkpoint or run directory, images generated per seed in memory
  (no PNGs written) through :func:`scmctl.generation.open_generator`.

Seed sets (``--seeds``, ``--repeat``): EDM/EDM2 report the minimum FID over three sets of 50,000
seeds, 0–49999, 50000–99999 and 100000–149999. :func:`seed_sets` gives set k as the base set
shifted by k × its span, which is exactly those three for the default base 0–49999.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np

from scmctl.data.imageio import IMAGE_EXTENSIONS
from scmctl.errors import UsageError
from scmctl.metrics.fid import open_images

MODEL_SUFFIXES = (".pt", ".pth", ".ckpt")


# --------------------------------------------------------------------------------------------
# Seeds
# --------------------------------------------------------------------------------------------

# Seeds per evaluated set: 200x the 50k protocol; a larger plan would only exhaust memory.
MAX_SET_SIZE = 10_000_000


def parse_seeds(text: str) -> list[int]:
    """``0-49999`` or ``1,2,10-19`` (inclusive ranges) -> a list of distinct seeds, in order
    (at most :data:`MAX_SET_SIZE`, counted before any list is built)."""
    from scmctl.generation import MAX_SEED

    ranges: list[range] = []
    for part in str(text).split(","):
        part = part.strip()
        m = re.fullmatch(r"(\d+)(?:\s*-\s*(\d+))?", part)
        if not m:
            raise UsageError(f"--seeds {text}: expected a range like 0-49999 or a list like 0,5,10-19")
        lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
        if hi < lo:
            raise UsageError(f"--seeds {text}: range {part} is empty (write it low-high)")
        if hi > MAX_SEED:
            raise UsageError(f"--seeds {text}: seeds must be below 2^63")
        ranges.append(range(lo, hi + 1))
        if sum(len(r) for r in ranges) > MAX_SET_SIZE:
            raise UsageError(f"--seeds {text}: more than {MAX_SET_SIZE:,} seeds in one set")
    seeds = [s for r in ranges for s in r]
    if len(set(seeds)) != len(seeds):
        raise UsageError(f"--seeds {text}: a seed is listed twice")
    return seeds


def seed_sets(base: list[int], repeat: int) -> list[list[int]]:
    """``repeat`` disjoint seed sets: set k = base + k·(max − min + 1)."""
    from scmctl.generation import MAX_SEED

    span = max(base) - min(base) + 1
    if len(base) * repeat > MAX_SET_SIZE or max(base) + (repeat - 1) * span > MAX_SEED:
        raise UsageError(f"--repeat {repeat} x {len(base)} seeds: more than {MAX_SET_SIZE:,} images or "
                         "seeds past 2^63")
    return [[s + k * span for s in base] for k in range(repeat)]


def describe_seeds(seeds: list[int]) -> str | list[int]:
    """``"a-b"`` for a contiguous range, else the list."""
    if seeds == list(range(seeds[0], seeds[0] + len(seeds))):
        return f"{seeds[0]}-{seeds[-1]}"
    return seeds


# --------------------------------------------------------------------------------------------
# Sources
# --------------------------------------------------------------------------------------------

class GeneratedSource:
    """Images of ``seeds`` from a :class:`scmctl.generation.Generator`, generated batch by batch."""

    def __init__(self, path: str, generator, seeds: list[int]):
        self.path = path
        self.generator = generator
        self.seeds = list(seeds)

    def __len__(self) -> int:
        return len(self.seeds)

    def batches(self, batch_size: int):
        yield from self.generator.batches(self.seeds, batch_size)


class DatasetSource:
    """uint8 NHWC batches of a pixel dataset from :func:`scmctl.data.datasets.load_dataset`."""

    def __init__(self, path, data, indices: np.ndarray | None = None):
        self.path = path
        self.data = data
        self.indices = np.arange(len(data)) if indices is None else np.asarray(indices, dtype=np.int64)

    def __len__(self) -> int:
        return int(self.indices.shape[0])

    def subset(self, indices) -> "DatasetSource":
        return DatasetSource(self.path, self.data, self.indices[np.asarray(indices, dtype=np.int64)])

    def first(self, n: int) -> "DatasetSource":
        return DatasetSource(self.path, self.data, self.indices[:n])

    def batches(self, batch_size: int):
        import torch

        for i in range(0, len(self), batch_size):
            idx = self.indices[i:i + batch_size]
            if hasattr(self.data, "uint8"):
                yield np.ascontiguousarray(self.data.uint8(idx))
            else:
                yield self.data.images[torch.as_tensor(idx)].permute(0, 2, 3, 1).numpy()


def is_model(path: str | os.PathLike) -> bool:
    """A checkpoint file, or a run directory holding ``checkpoint-*.pt`` files."""
    p = Path(path)
    if p.is_file():
        return p.suffix.lower() in MODEL_SUFFIXES
    return p.is_dir() and any(p.glob("checkpoint-*.pt"))


def _has_images(folder: Path) -> bool:
    return any(f.suffix.lower() in IMAGE_EXTENSIONS and f.is_file() for f in folder.rglob("*"))


def open_data_images(path: str | os.PathLike):
    """Reference images: an image folder (streamed from disk) or a pixel dataset.

    A folder with image files is read file by file (any size mix, nothing held in memory); anything
    else goes through :func:`scmctl.data.datasets.load_dataset` (``cifar-10-python.tar.gz[:test]``,
    ``cifar-10-batches-py``, a prepared dataset folder, ``.npz``/``.npy`` arrays). Latent datasets
    are refused: statistics must come from images.
    """
    spec = os.fspath(path)
    p = Path(spec)
    if p.is_dir() and not (p / "dataset.json").is_file() and ((p / "config.yaml").is_file() or _has_images(p)):
        return open_images(p)
    from scmctl.data.datasets import load_dataset

    data = load_dataset(spec)
    if getattr(data, "kind", "pixels") == "latents":
        raise UsageError(f"{spec} is a latent dataset ({getattr(data, 'encoder', 'VAE')} latents): reference "
                         "statistics must be computed from images; pass the images the latents were made "
                         "from (an image folder or a prepared pixel dataset)")
    return DatasetSource(spec, data)


def random_subset(source, n: int | None, seed: int, what: str = "--n-ref"):
    """``n`` images of ``source`` drawn without replacement under ``seed`` (kept in source order),
    since datasets are often sorted by class; all of them when ``n`` is None or covers the source."""
    total = len(source)
    if n is None or n == total:
        return source
    if n < 2:
        raise UsageError(f"{what} {n}: need at least 2 images")
    if n > total:
        raise UsageError(f"{what} {n}: {source.path} has only {total} images")
    idx = np.sort(np.random.default_rng(seed).choice(total, n, replace=False))
    return source.subset(idx)


def sample_sets(samples: str, *, n: int | None, seeds: str | None, repeat: int, default_n: int,
                generator_options: dict) -> tuple[list, object]:
    """The evaluated image sets and the generator (None for files).

    A checkpoint / run directory with checkpoints generates seed sets (:func:`seed_sets`; default
    base 0..n−1 with n = ``default_n``); a folder / array gives ``repeat`` consecutive blocks of
    ``n`` images in sorted order (default: all images split evenly).
    """
    if repeat < 1:
        raise UsageError(f"--repeat {repeat}: must be at least 1")
    if n is not None and n < 2:
        raise UsageError(f"-n {n}: need at least 2 samples")
    if is_model(samples):
        from scmctl.generation import open_generator

        if seeds is not None:
            base = parse_seeds(seeds)
            if n is not None and n != len(base):
                raise UsageError(f"-n {n} disagrees with --seeds {seeds} ({len(base)} seeds); give one of them")
            if len(base) < 2:
                raise UsageError(f"--seeds {seeds}: need at least 2 seeds")
        else:
            if n is not None and n > MAX_SET_SIZE:
                raise UsageError(f"-n {n}: at most {MAX_SET_SIZE:,} generated samples per set")
            base = list(range(n if n is not None else default_n))
        generator = open_generator(samples, **generator_options)
        return [GeneratedSource(samples, generator, s) for s in seed_sets(base, repeat)], generator

    given = [opt for opt, v in (("--seeds", seeds), ("--steps", generator_options.get("steps")),
                                ("--t-mid", generator_options.get("t_mid")),
                                ("--solver", generator_options.get("solver")),
                                ("--guidance", None if generator_options.get("guidance", 1.0) == 1.0 else 1))
             if v is not None]
    if given:
        raise UsageError(f"{given[0]} applies when SAMPLES is a checkpoint or a run directory with "
                         f"checkpoints; {samples} holds images")
    source = open_images(samples)
    total = len(source)
    if n is None:
        n = total // repeat
        if n < 2:
            raise UsageError(f"{samples}: {total} image(s) cannot make {repeat} set(s) of at least 2")
    elif n * repeat > total:
        need = f"{repeat} x {n}" if repeat > 1 else f"{n}"
        raise UsageError(f"-n {n}: {samples} has only {total} images (need {need})")
    return [source.slice(k * n, (k + 1) * n) for k in range(repeat)], None
