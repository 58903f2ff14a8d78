"""One metric over one or more image sets (seed sets) against one reference: what `scmctl eval`
runs after resolving its options. Each function returns one value (or pair) per set; the caller
reports them with :func:`summarize` (EDM/EDM2 report the minimum FID over three seed sets).
"""

from __future__ import annotations

import numpy as np

from scmctl.errors import UsageError
from scmctl.metrics.fid import extract_features, extract_stats, frechet_distance
from scmctl.metrics.kid import NUM_SUBSETS, SUBSET_SIZE, kid_subsets
from scmctl.metrics.prdc import K, precision_recall
from scmctl.metrics.reference import Reference, check_dims


def _description(k: int, count: int) -> str:
    return "samples" if count == 1 else f"samples {k + 1}/{count}"


def frechet_over_sets(sources: list, reference: Reference, detector, batch_size: int = 64,
                      show_progress: bool = True) -> list[float]:
    """Fréchet distance of each set's features to the reference (mu, sigma)."""
    if reference.mu is None:
        raise UsageError(f"{reference.path}: holds no mu/sigma statistics")
    values = []
    for k, source in enumerate(sources):
        stats = extract_stats(source, detector, batch_size, _description(k, len(sources)), show_progress)
        check_dims(reference, stats.mu.shape[0], detector)
        values.append(frechet_distance(stats.mu, stats.sigma, reference.mu, reference.sigma))
    return values


def _set_features(sources: list, ref_features: np.ndarray, detector, batch_size: int, show_progress: bool):
    """Each set's features (N, D), checked against the reference features' dimension."""
    for k, source in enumerate(sources):
        f = extract_features(source, detector, batch_size, _description(k, len(sources)), show_progress)
        if f.shape[1] != ref_features.shape[1]:
            raise UsageError(f"reference features are {ref_features.shape[1]}-d but detector {detector.name} "
                             f"gives {f.shape[1]}-d features (made with another detector?)")
        yield f


def kid_over_sets(sources: list, ref_features: np.ndarray, detector, batch_size: int = 64,
                  num_subsets: int = NUM_SUBSETS, subset_size: int = SUBSET_SIZE, seed: int = 0,
                  show_progress: bool = True) -> list[tuple[float, float]]:
    """(KID mean, std over subsets) of each set; every set uses the same subset seed."""
    out = []
    for f in _set_features(sources, ref_features, detector, batch_size, show_progress):
        v = kid_subsets(f, ref_features, num_subsets, subset_size, seed, detector.device)
        out.append((float(v.mean()), float(v.std())))
    return out


def pr_over_sets(sources: list, ref_features: np.ndarray, detector, batch_size: int = 64, k: int = K,
                 show_progress: bool = True) -> list[tuple[float, float]]:
    """(precision, recall) of each set against the reference features."""
    out = []
    for f in _set_features(sources, ref_features, detector, batch_size, show_progress):
        if min(f.shape[0], ref_features.shape[0]) <= k:
            raise UsageError(f"precision/recall with k = {k} needs more than {k} images on each side")
        out.append(precision_recall(f, ref_features, k, device=detector.device))
    return out


def summarize(values: list[float], best: str = "min") -> dict:
    """{"value", "min", "mean", "values"}; ``value`` is the minimum (distances, as EDM/EDM2
    report) or the mean (``best="mean"``: precision, recall)."""
    v = [float(x) for x in values]
    s = {"min": min(v), "mean": float(np.mean(v)), "values": v}
    return {"value": s[best], **s}
