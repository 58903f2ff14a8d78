"""Segment boundaries of multistep consistency models (Heek et al. 2024) in TrigFlow.

[0, t_max] is split at 0 = s_0 < s_1 < … < s_M = t_max. For t in segment (s_{i−1}, s_i] the
consistency function maps x_t to the segment's lower boundary s = s_{i−1}:

    f_θ(x_t, t) = cos(t − s)·x_t − sin(t − s)·σ_d·F_θ(x_t/σ_d, t)

(the TrigFlow DDIM jump from t to s with F_θ; M = 1 is sCM's f_θ, Lu & Song 2025 Sec. 3). Sampling walks
the boundaries, x_{s_{i−1}} = f_θ(x_{s_i}, s_i): M network evaluations.

Default placement (``loss.segment_spacing``; the run records the resulting list):

- ``uniform`` (default): s_i = i·t_max/M, evenly spaced in TrigFlow time, as Heek et al. space their
  segments evenly in their diffusion time;
- ``edm``: EDM's ρ = 7 σ grid (Karras et al. 2022, Eq. 5) of M + 1 points from σ_max = 80 down to
  σ_min = 0.002, mapped to t = arctan(σ/σ_d), its last point (σ_min) replaced by 0 (so no segment is
  the near-empty (0, t(σ_min)]): the teacher sampler's steps.

Measured on the 2-D grid toy (sCD, 1000 steps from the same teacher, sliced Wasserstein distance;
teacher 0.0245): M = 4 in 4 steps 0.024 (uniform) vs 0.034 (edm), M = 2 in 2 steps 0.060 vs 0.086.
The ρ = 7 grid crowds the boundaries near t_max (for M = 4 the top two segments are 0.02 wide).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from scmctl import trigflow
from scmctl.errors import UsageError

# |s_0 − 0| and |s_M − t_max| below this count as equal (a list typed with a few decimals).
ENDPOINT_TOLERANCE = 1e-3


SPACINGS = ("uniform", "edm")  # loss.segment_spacing


def default_boundaries(segments: int, sigma_data: float, spacing: str = "uniform") -> list[float]:
    """The M + 1 increasing boundaries of the default placement `spacing` (module docstring),
    float64; the ends exactly 0 and t_max(σ_d)."""
    t_max = trigflow.t_max(sigma_data)
    if spacing == "uniform":
        inner = [i * t_max / segments for i in range(1, segments)]
    elif spacing == "edm":
        grid = trigflow.edm_time_grid(segments + 1, sigma_data)  # M + 1 σ points decreasing, then 0
        inner = sorted(float(t) for t in grid[1:segments])      # σ_1 … σ_{M−1}; σ_max and σ_min dropped
    else:
        raise ValueError(f"segment spacing {spacing!r} is not one of {SPACINGS}")
    return [0.0, *inner, t_max]


def boundary_problem(boundaries: Sequence[float], segments: int, sigma_data: float) -> Optional[str]:
    """Why `boundaries` cannot be the segment boundaries of M = `segments`, or None if it can."""
    t_max = trigflow.t_max(sigma_data)
    b = list(boundaries)
    if len(b) != segments + 1:
        return f"must list loss.segments + 1 = {segments + 1} times, got {len(b)}"
    if abs(b[0]) > ENDPOINT_TOLERANCE or abs(b[-1] - t_max) > ENDPOINT_TOLERANCE:
        return f"must run from 0 to t_max = {t_max:.6f}, got {b[0]} .. {b[-1]}"
    if any(hi <= lo for lo, hi in zip(b, b[1:])):
        return f"must be strictly increasing, got {b}"
    return None


def resolved_boundaries(boundaries: Optional[Sequence[float]], segments: int, sigma_data: float,
                        spacing: str = "uniform") -> list[float]:
    """The boundaries a run uses: the default placement `spacing` for None, else the given list
    with its ends snapped to exactly 0 and t_max (validated by :func:`boundary_problem` beforehand)."""
    if boundaries is None:
        return default_boundaries(segments, sigma_data, spacing)
    return [0.0, *(float(t) for t in boundaries[1:-1]), trigflow.t_max(sigma_data)]


def segment_start(t: torch.Tensor, boundaries: Sequence[float]) -> torch.Tensor:
    """s = s_{i−1} per sample for t in (s_{i−1}, s_i], in t's dtype; t > t_max (the time proposal
    reaches π/2) belongs to the last segment. One segment: zeros."""
    b = torch.tensor(list(boundaries), dtype=t.dtype, device=t.device)
    i = torch.bucketize(t, b, right=False).clamp(1, len(b) - 1)  # b[i−1] < t <= b[i]
    return b[i - 1]


def of_model(cfg) -> Optional[list[float]]:
    """A model's segment boundaries from its config (loss.segments, loss.segment_boundaries), or
    None for a model that is not multistep (M = 1, a diffusion model, a checkpoint written before
    multistep models existed)."""
    if cfg.method == "diffusion" or cfg.loss.segments == 1:
        return None
    return resolved_boundaries(cfg.loss.segment_boundaries, cfg.loss.segments, cfg.data.sigma_data,
                               cfg.loss.segment_spacing)


def sampling_times(steps: int, boundaries: Sequence[float]) -> list[float]:
    """The K + 1 decreasing times of a K-step multistep sample, t_max first and 0 last: the
    boundaries with indices round(linspace(M, 0, K + 1)) (halves to even). K = M walks every
    boundary; K < M a subset, each jump from s_i to a lower boundary using F_θ(x/σ_d, s_i) as its
    DDIM velocity (K = 1: one jump t_max → 0). K > M: a UsageError."""
    m = len(boundaries) - 1
    if not 1 <= steps <= m:
        raise UsageError(f"--steps {steps}: this multistep model has {m} segments; sample it in 1..{m} steps "
                         f"({m} walks every segment boundary)")
    idx = torch.linspace(m, 0, steps + 1, dtype=torch.float64).round().long().tolist()
    return [float(boundaries[i]) for i in idx]
