"""Improved precision and recall (Kynkäänniemi et al. 2019), memory-bounded.

Each feature set approximates its manifold by the union of balls around its points, the radius of
a point being the distance to its k-th nearest neighbour in the same set (k = 3, the point itself
excluded). Then

    precision = share of generated points inside some reference ball  (are samples realistic?)
    recall    = share of reference points inside some generated ball  (is the data covered?)

A point exactly on a ball's boundary counts as inside (‖a − b‖ ≤ r). Distances are computed in
blocks of ``block × block`` pairs with ‖a − b‖² = ‖a‖² + ‖b‖² − 2aᵀb (float32 on ``device``, after
centring both sets on the reference mean, which leaves distances unchanged and limits cancellation),
so memory stays O(block² + N·k) whatever the set sizes.
"""

from __future__ import annotations

import numpy as np
import torch

K = 3
BLOCK = 4096


def _sq_dists(a: torch.Tensor, a2: torch.Tensor, b: torch.Tensor, b2: torch.Tensor) -> torch.Tensor:
    return (a2[:, None] + b2[None, :] - 2.0 * (a @ b.T)).clamp_min_(0.0)


def knn_radii_sq(x: torch.Tensor, k: int = K, block: int = BLOCK) -> torch.Tensor:
    """Squared distance of each row of ``x`` to its k-th nearest other row, (N,)."""
    n = x.shape[0]
    if n <= k:
        raise ValueError(f"k = {k} nearest neighbours need more than {k} points; got {n}")
    x2 = (x * x).sum(1)
    out = torch.empty(n, dtype=x.dtype, device=x.device)
    for i in range(0, n, block):
        rows = slice(i, min(i + block, n))
        best = None  # the k smallest squared distances seen so far per row, (b, k)
        for j in range(0, n, block):
            cols = slice(j, min(j + block, n))
            d = _sq_dists(x[rows], x2[rows], x[cols], x2[cols])
            lo, hi = max(i, j), min(rows.stop, cols.stop)
            if lo < hi:  # exclude each point itself
                idx = torch.arange(lo, hi, device=x.device)
                d[idx - i, idx - j] = float("inf")
            cand = d if best is None else torch.cat([best, d], dim=1)
            best = torch.topk(cand, min(k, cand.shape[1]), dim=1, largest=False).values
        out[rows] = best[:, k - 1]
    return out


def inside_any_ball(query: torch.Tensor, centres: torch.Tensor, radii_sq: torch.Tensor,
                    block: int = BLOCK) -> torch.Tensor:
    """Boolean (Q,): whether each query point lies in some ball ‖q − c‖² ≤ r_c²."""
    q2, c2 = (query * query).sum(1), (centres * centres).sum(1)
    hit = torch.zeros(query.shape[0], dtype=torch.bool, device=query.device)
    for i in range(0, query.shape[0], block):
        rows = slice(i, min(i + block, query.shape[0]))
        for j in range(0, centres.shape[0], block):
            cols = slice(j, min(j + block, centres.shape[0]))
            d = _sq_dists(query[rows], q2[rows], centres[cols], c2[cols])
            hit[rows] |= (d <= radii_sq[cols][None, :]).any(dim=1)
    return hit


def precision_recall(gen: np.ndarray, ref: np.ndarray, k: int = K, block: int = BLOCK,
                     device: str | torch.device = "cpu") -> tuple[float, float]:
    """(precision, recall) of generated features ``gen`` against reference features ``ref``."""
    if gen.ndim != 2 or ref.ndim != 2 or gen.shape[1] != ref.shape[1]:
        raise ValueError(f"feature shapes differ: {gen.shape} vs {ref.shape}")
    centre = np.asarray(ref, np.float64).mean(0)
    g = torch.as_tensor((np.asarray(gen, np.float64) - centre).astype(np.float32), device=device)
    r = torch.as_tensor((np.asarray(ref, np.float64) - centre).astype(np.float32), device=device)
    precision = inside_any_ball(g, r, knn_radii_sq(r, k, block), block).double().mean().item()
    recall = inside_any_ball(r, g, knn_radii_sq(g, k, block), block).double().mean().item()
    return float(precision), float(recall)
