"""Post-hoc EMA (EDM2, Karras et al. 2024, Sec. 3 and App. C): choose the EMA length after training.

Training tracks a few power-function EMAs (σ_rel 0.05 and 0.10 by default) and stores their
weights every ``train.phema_every`` images. Any other σ_rel at any stored step is then
approximated by a linear combination of the stored snapshots.

The profile of a power-function EMA. With β_i = (1 − 1/i)^(γ+1) at step i (EDM2 Eq. 127 with
t_δ = one step; :class:`scmctl.training.ema.EMA`), the EMA after t steps weighs the weights θ_i
reached after i steps by w_i = (i^(γ+1) − (i−1)^(γ+1)) / t^(γ+1): exactly the mass on (i−1, i] of
the continuous profile p_{t,γ}(τ) = (γ+1)·τ^γ / t^(γ+1) on [0, t] (EDM2 Eq. 121). So with θ(τ)
piecewise constant (θ_i on (i−1, i]), the EMA is ∫ p_{t,γ}(τ)·θ(τ) dτ, and a combination
Σ_k c_k·EMA_k has the profile Σ_k c_k·p_k. Post-hoc EMA picks the c_k that make that profile the
closest, in L2, to the wanted p_{t,γ} (EDM2 App. C.3, Algorithm 3): the normal equations
A·c = b with A_jk = ⟨p_j, p_k⟩ and b_j = ⟨p_j, p_target⟩, whose entries have the closed form of
:func:`profile_inner_product` (EDM2 Eq. 151).

Snapshots live in ``RUN_DIR/phema/phema-STEP-SIGMA.pt``, one file per (step, σ_rel), each
self-contained (the EMA weights, the step, σ_rel, γ, the run's config and model kind) and written
atomically; deleting any of them only removes it from the solve.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from scmctl.config import MAX_SIGMA_REL
from scmctl.errors import UsageError
from scmctl.training import checkpoint as ckpt_io
from scmctl.training.ema import EMA, sigma_rel_to_gamma

SNAPSHOT_FORMAT = "scmctl-phema-snapshot"
SNAPSHOT_VERSION = 1
SNAPSHOT_DIR = "phema"
POSTHOC_DIR = "ema"      # RUN_DIR/ema/: `scmctl ema` writes here by default
SNAPSHOT_RE = re.compile(r"^phema-(\d+)-([0-9.]+)\.pt$")


def gamma_to_sigma_rel(gamma: float | np.ndarray) -> float | np.ndarray:
    """σ_rel = √((γ+1) / ((γ+2)²(γ+3))), the profile's std relative to its length (EDM2 Eq. 123)."""
    g = np.float64(gamma)
    return np.sqrt((g + 1) / ((g + 2) ** 2 * (g + 3)))


def check_sigma_rel(sigma_rel: float, what: str = "σ_rel") -> float:
    """`sigma_rel` if a power-function EMA has it (0 < σ_rel ≤ √(1/12)); else a UsageError."""
    if not (0 < sigma_rel <= MAX_SIGMA_REL):
        raise UsageError(f"{what} {sigma_rel}: must be in (0, {MAX_SIGMA_REL:.4f}] (a power-function "
                         "EMA's relative width; EDM2 uses 0.01-0.2)")
    return float(sigma_rel)


def profile_inner_product(t_a, gamma_a, t_b, gamma_b) -> np.ndarray:
    """⟨p_{t_a,γ_a}, p_{t_b,γ_b}⟩ = ∫ p_a(τ)·p_b(τ) dτ (EDM2 Eq. 151), broadcast over arrays.

    With t_a ≤ t_b the integral runs over [0, t_a]:
        (γ_a+1)(γ_b+1) / ((γ_a+γ_b+1)·t_b) · (t_a/t_b)^γ_b,
    and symmetrically when t_a > t_b. Computed in float64.
    """
    t_a, g_a, t_b, g_b = (np.asarray(x, dtype=np.float64) for x in (t_a, gamma_a, t_b, gamma_b))
    a_first = t_a <= t_b
    t_lo, t_hi = np.where(a_first, t_a, t_b), np.where(a_first, t_b, t_a)
    g_hi = np.where(a_first, g_b, g_a)
    return (g_a + 1) * (g_b + 1) / ((g_a + g_b + 1) * t_hi) * (t_lo / t_hi) ** g_hi


def discrete_profile(t: int, gamma: float) -> np.ndarray:
    """w_1..w_t: the weights the power-function EMA after t steps gives θ_1..θ_t,
    w_i = (i^(γ+1) − (i−1)^(γ+1)) / t^(γ+1) (they sum to 1)."""
    i = np.arange(t + 1, dtype=np.float64)
    c = (i / t) ** (gamma + 1)
    return np.diff(c)


def solve_coefficients(steps: Sequence[float], gammas: Sequence[float], target_step: float,
                       target_gamma: float) -> np.ndarray:
    """c minimizing ‖Σ_k c_k·p_{steps_k,γ_k} − p_{target}‖² (EDM2 App. C.3, Algorithm 3), rescaled to
    sum to 1 (every profile has unit mass). A stored profile is reproduced exactly (c = e_k)."""
    s = np.asarray(steps, dtype=np.float64)
    g = np.asarray(gammas, dtype=np.float64)
    if s.size == 0:
        raise UsageError("post-hoc EMA needs at least one stored snapshot")
    A = profile_inner_product(s[:, None], g[:, None], s[None, :], g[None, :])
    b = profile_inner_product(s, g, np.float64(target_step), np.float64(target_gamma))
    try:
        c = np.linalg.solve(A, b)
    except np.linalg.LinAlgError:
        c = np.linalg.lstsq(A, b, rcond=None)[0]
    return c / c.sum()


def profile_error(steps: Sequence[float], gammas: Sequence[float], coefficients: np.ndarray,
                  target_step: float, target_gamma: float) -> float:
    """‖Σ c_k p_k − p_target‖ / ‖p_target‖: how well the snapshots can express the target profile."""
    s, g, c = (np.asarray(x, dtype=np.float64) for x in (steps, gammas, coefficients))
    A = profile_inner_product(s[:, None], g[:, None], s[None, :], g[None, :])
    b = profile_inner_product(s, g, target_step, target_gamma)
    tt = profile_inner_product(target_step, target_gamma, target_step, target_gamma)
    err2 = c @ A @ c - 2 * c @ b + tt
    return float(np.sqrt(max(err2, 0.0) / tt))


# ------------------------------------------------------------------ tracking while training

class PowerEMAs:
    """The power-function EMAs tracked for post-hoc EMA: one :class:`EMA` per σ_rel, updated with
    the same β schedule as the run's own EMA (so a stored profile is exactly what it claims)."""

    def __init__(self, net: torch.nn.Module, sigma_rels: Sequence[float]):
        self.sigma_rels = [float(s) for s in sigma_rels]
        self.emas = [EMA(net, s) for s in self.sigma_rels]

    def __bool__(self) -> bool:
        return bool(self.emas)

    def update(self, net: torch.nn.Module, step: int) -> None:
        for ema in self.emas:
            ema.update(net, step)

    def state_dict(self) -> dict:
        return {"sigma_rels": list(self.sigma_rels), "emas": [e.state_dict() for e in self.emas]}

    def resume(self, ckpt: dict) -> None:
        """Continue the profiles a training checkpoint carries. One without them (tracking was off,
        or an older scmctl) resumes only with tracking off: a profile cannot be rebuilt afterwards."""
        if not self.emas:
            return
        if "phema" not in ckpt:
            raise UsageError(f"{ckpt['path']}: holds no post-hoc EMA profiles (tracking was off, or an older "
                             "scmctl); resume with --set train.phema_sigma_rels=[]")
        self.load_state_dict(ckpt["phema"], ckpt["path"])

    def snapshot_due(self, cfg, step: int) -> bool:
        """Store the profiles after step `step`: every train.phema_every images (0: every checkpoint)
        and at the run's last step."""
        t = cfg.train
        return bool(self.emas) and (step == t.steps or snapshot_due(step, t.batch, t.phema_every or
                                                                    t.checkpoint_every * t.batch))

    def load_state_dict(self, state: dict, where: str) -> None:
        if [float(s) for s in state["sigma_rels"]] != self.sigma_rels:
            raise UsageError(f"{where}: tracks post-hoc EMA profiles σ_rel {state['sigma_rels']}, the config "
                             f"asks for {self.sigma_rels}; resume with --set train.phema_sigma_rels="
                             f"[{','.join(str(x) for x in state['sigma_rels'])}] (or [] to stop tracking)")
        for ema, s in zip(self.emas, state["emas"]):
            ckpt_io.load_state(ema.net, s, where)


def snapshot_due(step: int, batch: int, every_images: int) -> bool:
    """Whether training images crossed a multiple of `every_images` during step `step` (1-based)."""
    return every_images > 0 and (step * batch) // every_images > ((step - 1) * batch) // every_images


def snapshot_path(run_dir: str | os.PathLike, step: int, sigma_rel: float) -> Path:
    return Path(run_dir) / SNAPSHOT_DIR / f"phema-{step:07d}-{sigma_rel:.4f}.pt"


def save_snapshots(run_dir: str | os.PathLike, step: int, kimg: float, kind: str, config: dict,
                   sigma_rels: Sequence[float], states: Sequence[dict]) -> list[Path]:
    """One compact file per profile (EMA weights only), each written atomically."""
    (Path(run_dir) / SNAPSHOT_DIR).mkdir(parents=True, exist_ok=True)
    paths = []
    for sigma_rel, state in zip(sigma_rels, states):
        path = snapshot_path(run_dir, step, sigma_rel)
        ckpt_io.save_atomic({"format": SNAPSHOT_FORMAT, "version": SNAPSHOT_VERSION, "step": int(step),
                             "kimg": float(kimg), "sigma_rel": float(sigma_rel),
                             "gamma": sigma_rel_to_gamma(sigma_rel), "kind": kind, "config": config,
                             "ema": state}, path)
        paths.append(path)
    return paths


@dataclass(frozen=True)
class Snapshot:
    path: Path
    step: int
    kimg: float
    sigma_rel: float
    gamma: float


def _load_snapshot(path: Path, mmap: bool = True) -> dict:
    try:
        snap = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)  # safe: tensors/plain data only
    except Exception as e:  # unpickling refusals and truncated files alike: one line naming the file
        raise UsageError(f"{path}: not a readable post-hoc EMA snapshot ({str(e).strip().splitlines()[0][:120] if str(e).strip() else e.__class__.__name__})") from None
    if not isinstance(snap, dict) or snap.get("format") != SNAPSHOT_FORMAT:
        raise UsageError(f"{path}: not an scmctl post-hoc EMA snapshot")
    return snap


def snapshots(run_dir: str | os.PathLike) -> list[Snapshot]:
    """The stored snapshots of a run, ordered by (step, σ_rel)."""
    folder = Path(run_dir) / SNAPSHOT_DIR
    found = []
    for p in sorted(folder.glob("phema-*.pt")) if folder.is_dir() else []:
        if SNAPSHOT_RE.match(p.name):
            s = _load_snapshot(p)
            found.append(Snapshot(p, int(s["step"]), float(s["kimg"]), float(s["sigma_rel"]), float(s["gamma"])))
    return sorted(found, key=lambda s: (s.step, s.sigma_rel))


@dataclass
class Reconstruction:
    """A post-hoc EMA: its weights, target, the snapshots used with their coefficients, and
    the relative L2 error of the reached profile (:func:`profile_error`)."""
    sigma_rel: float
    gamma: float
    step: int
    kimg: float
    state: dict
    used: list[tuple[Snapshot, float]]
    profile_error: float
    kind: str
    config: dict


@torch.no_grad()
def reconstruct(run_dir: str | os.PathLike, sigma_rels: Sequence[float], at: int | None = None) -> list[Reconstruction]:
    """The EMA of each σ_rel at step `at` (default: the last snapshot's step) from the snapshots
    stored up to that step. Each snapshot file is read once; sums are accumulated in float64."""
    snaps = snapshots(run_dir)
    if not snaps:
        raise UsageError(f"{run_dir}: no post-hoc EMA snapshots ({SNAPSHOT_DIR}/phema-*.pt); train with "
                         "train.phema_sigma_rels set (default [0.05, 0.1])")
    if at is None:
        at = snaps[-1].step
    if at > snaps[-1].step:
        raise UsageError(f"--at {at}: the last snapshot of {run_dir} is at step {snaps[-1].step}")
    usable = [s for s in snaps if s.step <= at]
    if not usable:
        raise UsageError(f"--at {at}: the first snapshot of {run_dir} is at step {snaps[0].step}")
    targets = [(check_sigma_rel(s, "--sigma-rel"), sigma_rel_to_gamma(s)) for s in sigma_rels]
    steps = [s.step for s in usable]
    gammas = [s.gamma for s in usable]
    coeffs = [solve_coefficients(steps, gammas, at, g) for _, g in targets]
    sums: list[dict] = [{} for _ in targets]
    first: dict = {}
    constant: dict = {}
    kind = config = kimg = None
    for k, snap_info in enumerate(usable):
        snap = _load_snapshot(snap_info.path)
        kind, config = snap["kind"], snap["config"]
        kimg = snap_info.kimg * at / snap_info.step
        for key, v in snap["ema"].items():
            if key not in first:
                first[key], constant[key] = v.clone(), True
            elif constant[key]:
                constant[key] = torch.equal(first[key], v)
            if v.is_floating_point():
                for acc, c in zip(sums, coeffs):
                    acc[key] = acc.get(key, 0) + float(c[k]) * v.double()
    out = []
    for (sigma_rel, gamma), c, acc in zip(targets, coeffs, sums):
        state = {key: (first[key] if constant[key] or key not in acc else acc[key].to(first[key].dtype))
                 for key in first}
        out.append(Reconstruction(sigma_rel, gamma, int(at), float(kimg), state,
                                  [(s, float(ck)) for s, ck in zip(usable, c)],
                                  profile_error(steps, gammas, c, at, gamma), kind, config))
    return out


def checkpoint_dict(rec: Reconstruction) -> dict:
    """A checkpoint every command loads (sample, eval, refine, --init, distill --teacher): the
    reconstructed weights as its EMA; it has no raw weights and no optimizer state."""
    return {"format": ckpt_io.FORMAT, "version": ckpt_io.VERSION, "kind": rec.kind, "step": rec.step,
            "config": rec.config, "ema": rec.state,
            "posthoc_ema": {"sigma_rel": rec.sigma_rel, "gamma": rec.gamma, "kimg": rec.kimg,
                            "profile_error": rec.profile_error,
                            "snapshots": [{"step": s.step, "sigma_rel": s.sigma_rel, "coefficient": c}
                                          for s, c in rec.used]}}
