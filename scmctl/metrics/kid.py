"""KID: the kernel inception distance (Bińkowski et al. 2018), seeded.

KID is the unbiased estimate of the squared MMD between generated features X and reference features
Y with the cubic polynomial kernel k(a, b) = (aᵀb/d + 1)³, d the feature dimension:

    MMD²_u = 1/(m(m−1)) Σ_{i≠j} k(x_i, x_j) + 1/(m(m−1)) Σ_{i≠j} k(y_i, y_j) − 2/m² Σ_{i,j} k(x_i, y_j)

averaged over ``num_subsets`` random subsets of size m = min(``subset_size``, |X|, |Y|) (1000 × 100
by default, as clean-fid and StyleGAN2-ADA). Subset s draws ``rng.choice(|X|, m, replace=False)``
then ``rng.choice(|Y|, m, replace=False)`` from ``numpy.random.default_rng(seed)``, so a seed fixes
the result. The Gram matrices are computed in float32 on ``device``; the cubes and sums in float64.
"""

from __future__ import annotations

import numpy as np
import torch

NUM_SUBSETS = 100
SUBSET_SIZE = 1000


def polynomial_mmd2(x: torch.Tensor, y: torch.Tensor) -> float:
    """Unbiased MMD² of two equal-size feature sets (m, d) with k(a, b) = (aᵀb/d + 1)³."""
    m, d = x.shape
    if y.shape != (m, d) or m < 2:
        raise ValueError(f"need two (m, d) feature sets with m >= 2; got {tuple(x.shape)} and {tuple(y.shape)}")

    def kernel(a, b):
        k = (a @ b.T).double().mul_(1.0 / d).add_(1.0)
        return k.mul(k).mul_(k)

    kxx, kyy, kxy = kernel(x, x), kernel(y, y), kernel(x, y)
    within = (kxx.sum() - kxx.diagonal().sum() + kyy.sum() - kyy.diagonal().sum()) / (m * (m - 1))
    return float(within - 2.0 * kxy.sum() / (m * m))


def kid_subsets(gen: np.ndarray, ref: np.ndarray, num_subsets: int = NUM_SUBSETS,
                subset_size: int = SUBSET_SIZE, seed: int = 0, device: str | torch.device = "cpu") -> np.ndarray:
    """MMD² of each of ``num_subsets`` random subset pairs (float64 array); KID = its mean."""
    if gen.ndim != 2 or ref.ndim != 2 or gen.shape[1] != ref.shape[1]:
        raise ValueError(f"feature shapes differ: {gen.shape} vs {ref.shape}")
    m = min(subset_size, gen.shape[0], ref.shape[0])
    if m < 2:
        raise ValueError("KID needs at least 2 features on each side")
    rng = np.random.default_rng(seed)
    g = torch.as_tensor(np.asarray(gen, np.float32), device=device)
    r = torch.as_tensor(np.asarray(ref, np.float32), device=device)
    values = np.empty(num_subsets)
    for s in range(num_subsets):
        ix = rng.choice(gen.shape[0], m, replace=False)
        iy = rng.choice(ref.shape[0], m, replace=False)
        values[s] = polynomial_mmd2(g[torch.as_tensor(ix, device=g.device)], r[torch.as_tensor(iy, device=r.device)])
    return values


def kernel_inception_distance(gen: np.ndarray, ref: np.ndarray, num_subsets: int = NUM_SUBSETS,
                              subset_size: int = SUBSET_SIZE, seed: int = 0,
                              device: str | torch.device = "cpu") -> tuple[float, float]:
    """(mean, std) of :func:`kid_subsets`; std is over subsets (population std, ddof = 0)."""
    v = kid_subsets(gen, ref, num_subsets, subset_size, seed, device)
    return float(v.mean()), float(v.std())
