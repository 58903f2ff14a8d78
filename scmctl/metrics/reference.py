"""Reference statistics: reading every supported format, writing scmctl's own with provenance.

``--ref`` accepts:

- an ``.npz`` written by ``scmctl eval ref``: ``mu`` (D,), ``sigma`` (D, D) in float64, ``count``,
  optional ``features`` (a seeded random subset of feature vectors, float32, for KID and
  precision/recall), and provenance as string entries (``format``, ``detector``,
  ``detector_sha256``, ``mode``, ``data``, ``scmctl_version``, ``created``); a detector or mode
  other than the one recorded is refused;
- a clean-fid / EDM ``.npz`` with ``mu`` and ``sigma`` (assumed to match the detector in use);
- an EDM2 ``.pkl`` (``img64.pkl``, ``img512.pkl``): a pickled dict ``{"fid": {"mu", "sigma"},
  "fd_dinov2": {"mu", "sigma"}, "num_images": N}``, read by a restricted unpickler that rebuilds
  only dicts, lists, numbers, strings and numpy arrays (any other global, e.g. ``os.system``, is
  refused before anything runs); the entry is chosen by the metric (``fid`` for Inception,
  ``fd_dinov2`` for DINOv2);
- reference images (a folder, an image array, a dataset), whose statistics are computed with the
  detector in use (:class:`PendingReference`).

All arrays are read with ``allow_pickle=False``.
"""

from __future__ import annotations

import os
import pickle
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from scmctl import safe_pickle
from scmctl.errors import UsageError
from scmctl.fileio import sha256_file, write_atomic
from scmctl.metrics.fid import StreamingStats, _load_npz, extract_features, extract_stats, iter_features

REF_FORMAT = "scmctl-ref-v1"
PROVENANCE_KEYS = ("format", "detector", "detector_sha256", "mode", "data", "scmctl_version", "created")
PICKLE_SUFFIXES = (".pkl", ".pickle")


@dataclass
class Reference:
    """Reference statistics (float64). ``n`` = image count when known; ``features`` = stored feature
    vectors (``eval ref --features``); ``sha256`` of the file (None for images computed here)."""

    path: Path
    mu: np.ndarray | None
    sigma: np.ndarray | None
    n: int | None = None
    features: np.ndarray | None = None
    provenance: dict = field(default_factory=dict)
    sha256: str | None = None


class PendingReference:
    """Reference images validated up front; statistics or features are extracted on demand."""

    def __init__(self, source):
        self.source = source
        self.path = Path(str(source.path))

    def compute(self, detector, batch_size: int = 64, show_progress: bool = True) -> Reference:
        s = extract_stats(self.source, detector, batch_size, "reference", show_progress)
        return Reference(self.path, s.mu, s.sigma, s.n)


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------

def open_reference(path: str | os.PathLike, entry: str = "fid") -> Reference | PendingReference:
    """Validate ``--ref`` cheaply: statistics files are read now, images are listed (computed later).

    ``entry`` picks the statistics of an EDM2 ``.pkl`` (``fid`` or ``fd_dinov2``).
    """
    from scmctl.metrics.sources import open_data_images

    p = Path(path)
    if p.is_file() and p.suffix.lower() in PICKLE_SUFFIXES:
        return _read_edm2_pickle(p, entry)
    if p.is_file() and p.suffix.lower() == ".npz":
        arrays = _load_npz(p)
        if "mu" in arrays or "sigma" in arrays or "features" in arrays:
            return _stats_from_arrays(p, arrays)
    return PendingReference(open_data_images(p))


def load_reference(path: str | os.PathLike, detector, batch_size: int = 64, show_progress: bool = True,
                   entry: str = "fid") -> Reference:
    """(mu, sigma) of ``--ref``: read from a statistics file, or computed with ``detector`` from
    images; a statistics file made with another detector or mode is refused."""
    ref = open_reference(path, entry)
    if isinstance(ref, PendingReference):
        return ref.compute(detector, batch_size, show_progress)
    check_provenance(ref, detector)
    return ref


def _str_entry(arrays: dict, key: str) -> str | None:
    a = arrays.get(key)
    if a is None or a.dtype.kind not in "US" or a.ndim != 0:
        return None
    return str(a[()])


def _stats_from_arrays(p: Path, arrays: dict) -> Reference:
    provenance = {k: v for k in PROVENANCE_KEYS if (v := _str_entry(arrays, k)) is not None}
    mu = sigma = None
    if "mu" in arrays or "sigma" in arrays:
        if not ("mu" in arrays and "sigma" in arrays):
            raise UsageError(f"{p}: reference statistics need both mu and sigma arrays")
        mu, sigma = _checked_stats(p, arrays["mu"], arrays["sigma"])
    features = None
    if "features" in arrays:
        features = np.asarray(arrays["features"])
        if features.ndim != 2 or features.dtype.kind != "f" or (mu is not None and features.shape[1] != mu.shape[0]):
            raise UsageError(f"{p}: 'features' must be a float (N, D) array matching mu; got "
                             f"{features.dtype} {features.shape}")
        if not np.isfinite(features).all():
            raise UsageError(f"{p}: features contain NaN or Inf")
    n = None
    if "count" in arrays and arrays["count"].ndim == 0 and arrays["count"].dtype.kind in "iu":
        n = int(arrays["count"])
    return Reference(p, mu, sigma, n, features, provenance, sha256_file(p))


def _checked_stats(p: Path, mu, sigma) -> tuple[np.ndarray, np.ndarray]:
    try:
        mu = np.asarray(mu, np.float64)
        sigma = np.asarray(sigma, np.float64)
    except (TypeError, ValueError):
        raise UsageError(f"{p}: mu/sigma are not numeric arrays") from None
    d = mu.shape[0] if mu.ndim == 1 else -1
    if mu.ndim != 1 or sigma.shape != (d, d):
        raise UsageError(f"{p}: expected mu (D,) and sigma (D, D); got {mu.shape} and {sigma.shape}")
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise UsageError(f"{p}: mu/sigma contain NaN or Inf")
    check_covariance(sigma, p)
    return mu, sigma


# Relative tolerance of the covariance checks: float32 feature sums leave asymmetries and negative
# eigenvalues around 1e-7 of the scale; a damaged or hand-made sigma is off by far more.
COVARIANCE_RTOL = 1e-5


def check_covariance(sigma: np.ndarray, where) -> None:
    """A covariance matrix is symmetric positive semi-definite: |Σ − Σᵀ| ≤ rtol·max|Σ| and every
    eigenvalue ≥ −rtol·λ_max. Anything else makes the Fréchet distance meaningless (a negative
    eigenvalue can even give FID 0)."""
    scale = float(np.abs(sigma).max()) if sigma.size else 0.0
    if scale == 0.0:
        return  # identical images: a valid (if useless) zero covariance
    if float(np.abs(sigma - sigma.T).max()) > COVARIANCE_RTOL * scale:
        raise UsageError(f"{where}: sigma is not symmetric; not a covariance matrix")
    eig = np.linalg.eigvalsh((sigma + sigma.T) / 2)
    if eig[0] < -COVARIANCE_RTOL * max(float(eig[-1]), scale):
        raise UsageError(f"{where}: sigma has a negative eigenvalue ({eig[0]:.3g}, largest {eig[-1]:.3g}); "
                         "not a covariance matrix")


def read_pickled_arrays(path: Path):
    """A pickle holding only dicts/lists/numbers/strings/numpy arrays; anything else is a UsageError."""
    try:
        blob = path.read_bytes()
    except OSError as e:
        raise UsageError(f"{path}: cannot read ({e.__class__.__name__})") from None
    try:
        return safe_pickle.loads(blob)
    except pickle.UnpicklingError as e:
        raise UsageError(f"{path}: refusing to unpickle ({e}): only dicts of numpy arrays (EDM2 reference "
                         "statistics) are loaded, and nothing in the file was run") from None
    except safe_pickle.MALFORMED as e:
        raise UsageError(f"{path}: not a readable pickle of numpy arrays ({e.__class__.__name__})") from None


def _read_edm2_pickle(p: Path, entry: str) -> Reference:
    obj = read_pickled_arrays(p)
    if not isinstance(obj, dict):
        raise UsageError(f"{p}: expected a dict of statistics (EDM2 layout), got {type(obj).__name__}")
    stats = obj.get(entry)
    if stats is None and "mu" in obj and "sigma" in obj:
        stats = obj
    if not isinstance(stats, dict) or "mu" not in stats or "sigma" not in stats:
        found = ", ".join(str(k) for k in obj) or "nothing"
        raise UsageError(f"{p}: no '{entry}' statistics with mu and sigma (found {found})")
    mu, sigma = _checked_stats(p, stats["mu"], stats["sigma"])
    n = obj.get("num_images")
    return Reference(p, mu, sigma, int(n) if isinstance(n, (int, np.integer)) else None, None,
                     {"entry": entry}, sha256_file(p))


def check_provenance(ref: Reference, detector) -> None:
    """A statistics file written by ``eval ref`` must come from the same detector weights and mode."""
    prov = ref.provenance
    want = prov.get("detector_sha256")
    if want and detector.sha256() and want != detector.sha256():
        raise UsageError(f"{ref.path} was computed with detector {prov.get('detector', '?')} (sha256 "
                         f"{want[:12]}...), not {detector.name} (sha256 {detector.sha256()[:12]}...): "
                         "recompute it with `scmctl eval ref` and this detector")
    if prov.get("mode") and prov["mode"] != detector.mode:
        raise UsageError(f"{ref.path} was computed in mode {prov['mode']}, not {detector.mode}: pass "
                         f"--mode {prov['mode']} or recompute it")


def check_dims(ref: Reference, dim: int, detector) -> None:
    """Reference statistics from another detector are a user error, not a crash in eigh."""
    d = ref.mu.shape[0] if ref.mu is not None else ref.features.shape[1]
    if d != dim:
        raise UsageError(f"{ref.path}: reference statistics are {d}-d but detector "
                         f"{detector.name} gives {dim}-d features (made with another detector?)")


def reference_features(path: str | os.PathLike, detector, batch_size: int = 64, n_ref: int | None = None,
                       seed: int = 0, show_progress: bool = True, entry: str = "fid",
                       at_most: bool = False) -> tuple[np.ndarray, Reference | PendingReference]:
    """Reference feature vectors for KID / precision-recall: a seeded random subset of ``n_ref``
    reference images (all when None; with ``at_most``, all when fewer exist), or the ``features``
    stored by ``eval ref --features``."""
    from scmctl.metrics.sources import random_subset

    ref = open_reference(path, entry)
    if isinstance(ref, PendingReference):
        if at_most and n_ref is not None:
            n_ref = min(n_ref, len(ref.source))
        source = random_subset(ref.source, n_ref, seed)
        return extract_features(source, detector, batch_size, "reference", show_progress), ref
    if ref.features is None:
        raise UsageError(f"{path} holds statistics (mu, sigma) only; this metric needs feature vectors: pass "
                         "the reference images, or make the file with `scmctl eval ref DATA --out FILE "
                         "--features 10000`")
    check_provenance(ref, detector)
    f = ref.features
    if at_most and n_ref is not None:
        n_ref = min(n_ref, f.shape[0])
    if n_ref is not None and n_ref != f.shape[0]:
        if n_ref > f.shape[0]:
            raise UsageError(f"--n-ref {n_ref}: {path} stores {f.shape[0]} feature vectors; pass --n-ref "
                             f"{f.shape[0]} or recompute it with --features {n_ref}")
        f = f[np.sort(np.random.default_rng(seed).choice(f.shape[0], n_ref, replace=False))]
    return np.asarray(f, np.float32), ref


# --------------------------------------------------------------------------------------------
# Writing (`scmctl eval ref`)
# --------------------------------------------------------------------------------------------

def compute_reference(source, detector, batch_size: int = 64, keep_features: int = 0, seed: int = 0,
                      show_progress: bool = True) -> tuple[StreamingStats, np.ndarray | None]:
    """Streaming float64 statistics of ``source``, plus the features of ``keep_features`` images
    drawn without replacement under ``seed`` (in source order), in one pass."""
    total = len(source)
    if total < 2:
        raise UsageError(f"{source.path}: {total} image(s); statistics need at least 2")
    keep = None
    if keep_features:
        if keep_features > total:
            raise UsageError(f"--features {keep_features}: {source.path} has only {total} images")
        keep = np.sort(np.random.default_rng(seed).choice(total, keep_features, replace=False))
    stats, kept, offset = StreamingStats(), [], 0
    for f in iter_features(source, detector, batch_size, "reference", show_progress):
        stats.update(f)
        if keep is not None:
            lo, hi = np.searchsorted(keep, [offset, offset + f.shape[0]])
            kept.append(f[keep[lo:hi] - offset])
        offset += f.shape[0]
    return stats, (np.concatenate(kept).astype(np.float32) if keep is not None else None)


def save_reference(out: str | os.PathLike, stats: StreamingStats, detector, data: str,
                   features: np.ndarray | None = None, features_seed: int | None = None) -> dict:
    """Write ``mu``, ``sigma``, ``count`` (+ ``features``) and the provenance to ``out`` atomically;
    returns the provenance."""
    from scmctl import __version__

    out = Path(out)
    prov = {"format": REF_FORMAT, "detector": detector.name, "detector_sha256": detector.sha256() or "",
            "mode": detector.mode, "data": str(data), "scmctl_version": __version__,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    arrays = {"mu": stats.mu, "sigma": stats.sigma, "count": np.int64(stats.n),
              **{k: np.array(v) for k, v in prov.items()}}
    if features is not None:
        arrays["features"] = features
        arrays["features_seed"] = np.int64(features_seed or 0)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(out, lambda f: np.savez(f, **arrays))
    return prov
