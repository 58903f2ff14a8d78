"""One PNG that shows how a training run is going (``scmctl plot``).

Panels, against the training step: the loss; the loss and the tangent RMS per t-bin (the sCM
stability signals: Lu & Song 2025 Sec. 4 — a tangent that grows in one t-bin comes before a
divergence); NaN/Inf-masked samples and skipped steps; gradient norm; learning rate; throughput;
and, when ``scmctl eval ... --checkpoints`` has filled ``metrics.json``, the metric over the
checkpoints and over the post-hoc EMA lengths. Noisy per-step curves are drawn faint with a
running mean on top. Needs matplotlib (the ``plot`` extra).
"""

from __future__ import annotations

import io
import json
import math
import os
from pathlib import Path

import numpy as np

from scmctl.errors import UsageError
from scmctl.fileio import write_atomic
from scmctl.losses import T_BINS
from scmctl.metrics.history import read_history

STATS_FILE = "stats.jsonl"


def read_stats(run_dir: str | os.PathLike) -> list[dict]:
    """stats.jsonl as a list of records (a line cut off by a crash is skipped)."""
    path = Path(run_dir) / STATS_FILE
    if not path.is_file():
        raise UsageError(f"{run_dir}: no {STATS_FILE}; is it a training run directory?")
    rows = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict) and "step" in rec:
            rows.append(rec)
    if not rows:
        raise UsageError(f"{path}: holds no logged steps yet")
    return rows


def running_mean(y: np.ndarray, window: int) -> np.ndarray:
    """Mean of the last `window` finite values at each point (NaN-aware; shorter at the start)."""
    ok = np.isfinite(y)
    c = np.concatenate([[0.0], np.cumsum(np.where(ok, y, 0.0))])
    k = np.concatenate([[0], np.cumsum(ok)])
    idx = np.arange(1, len(y) + 1)
    lo = np.maximum(idx - window, 0)
    n = k[idx] - k[lo]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n > 0, (c[idx] - c[lo]) / np.maximum(n, 1), np.nan)


def _series(stats: list[dict], key: str) -> np.ndarray:
    return np.array([float(r[key]) if r.get(key) is not None else np.nan for r in stats], dtype=np.float64)


def _peak(stats: list[dict], key: str) -> float:
    y = _series(stats, key)
    return float(np.max(y[np.isfinite(y)])) if np.isfinite(y).any() else 0.0


def _bin_label(i: int) -> str:
    lo, hi = T_BINS[i], min(T_BINS[i + 1], math.pi / 2)
    return f"t ∈ [{lo:.2f}, {hi:.2f})"


def plot_run(run_dir: str | os.PathLike, out: str | os.PathLike, title: str | None = None) -> dict:
    """Draw `run_dir`'s PNG to `out` (atomically). Returns what was drawn: {panel: [series]}."""
    try:
        import matplotlib
    except ImportError:
        raise UsageError("scmctl plot needs matplotlib: pip install 'scmctl[plot]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stats = read_stats(run_dir)
    step = _series(stats, "step")
    window = max(1, len(stats) // 40)
    drawn: dict[str, list[str]] = {}
    fig, axes = plt.subplots(3, 3, figsize=(16, 12), dpi=90)
    ax = iter(axes.flat)

    def panel(name, keys_labels, log=False, smooth=True, ylabel=None, a=None):
        a = a if a is not None else next(ax)
        a.set_title(name, fontsize=12)
        a.set_xlabel("step")
        if ylabel:
            a.set_ylabel(ylabel)
        a.grid(alpha=0.3)
        shown = []
        for key, label in keys_labels:
            y = _series(stats, key)
            if not np.isfinite(y).any():
                continue
            if log and not (y[np.isfinite(y)] > 0).all():
                log = False
            if smooth and window > 1:
                (line,) = a.plot(step, y, alpha=0.25, linewidth=0.8)
                a.plot(step, running_mean(y, window), color=line.get_color(), linewidth=1.8, label=label)
            else:
                a.plot(step, y, linewidth=1.5, label=label)
            shown.append(key)
        if log and shown:
            a.set_yscale("log")
        if len(shown) > 1:
            a.legend(fontsize=9, framealpha=0.6)
        if not shown:
            _empty(a, f"not in {STATS_FILE}")
        drawn[name] = shown
        return a

    nb = len(T_BINS) - 1
    a = panel("loss" + (f" (faint: per step; bold: running mean of {window})" if window > 1 else ""),
              [("loss", "loss with adaptive weighting")], ylabel="weighted loss")
    if np.isfinite(_series(stats, "loss_raw")).any():  # another scale: its own axis on the right
        raw = a.twinx()
        y = _series(stats, "loss_raw")
        raw.plot(step, running_mean(y, window), color="tab:orange", linewidth=1.5)
        raw.set_ylabel("unweighted loss", color="tab:orange")
        raw.tick_params(axis="y", colors="tab:orange")
        drawn[a.get_title()].append("loss_raw")
    panel("loss by t-bin (unweighted)", [(f"loss_t{i}", _bin_label(i)) for i in range(nb)], log=True)
    panel("tangent RMS by t-bin", [(f"tangent_rms_t{i}", _bin_label(i)) for i in range(nb)], log=True)
    a = panel("NaN/Inf-masked samples and skipped steps", [("masked", "masked samples"),
                                                            ("skipped", "skipped steps")], smooth=False)
    a.yaxis.get_major_locator().set_params(integer=True)
    a.set_ylim(0, 1.1 * max(1.0, _peak(stats, "masked"), _peak(stats, "skipped")))
    totals = [int(np.nansum(_series(stats, k))) for k in ("masked", "skipped")]
    a.text(0.02, 0.9, f"total: {totals[0]} masked samples, {totals[1]} skipped steps in {len(stats)} logged steps",
           transform=a.transAxes, fontsize=10, color="0.25")
    panel("gradient norm (before clipping)", [("grad_norm", "grad norm")], log=True)
    a = panel("learning rate", [("lr", "lr")], smooth=False)
    if _peak(stats, "lr") > 0:
        a.set_ylim(0, 1.1 * _peak(stats, "lr"))
    panel("throughput", [("images_per_s", "images/s")], ylabel="images / s")
    _metric_panels(next(ax), next(ax), read_history(run_dir), drawn)
    last = stats[-1]
    kimg = f", {last['kimg']:g} kimg" if "kimg" in last else ""
    fig.suptitle(title or f"{run_dir}: step {last['step']}{kimg}", fontsize=14)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    write_atomic(out, lambda f: f.write(buf.getvalue()))
    return drawn


def _empty(a, text: str) -> None:
    a.text(0.5, 0.5, text, ha="center", va="center", transform=a.transAxes, color="0.4", fontsize=11)
    a.set_xticks([])
    a.set_yticks([])


def _group_label(row: dict) -> str:
    gen = row.get("generator") or {}
    parts = [row["metric"].upper().replace("FD_DINOV2", "FD_DINOv2"), f"n={row.get('n')}"]
    if row.get("detector") not in (None, "inception", "dinov2"):
        parts.append(f"[{Path(row['detector']).name}]")
    if gen.get("steps") is not None:
        parts.append(f"{gen['steps']}-step")
    return " ".join(parts)


def _values(row: dict) -> list[tuple[str, float]]:
    if row["metric"] == "pr":
        return [("precision", row["precision"]["value"]), ("recall", row["recall"]["value"])]
    return [("", row["value"])]


def _metric_panels(over_steps, over_sigma, rows: list[dict], drawn: dict) -> None:
    """The metric over regular checkpoints (vs step) and over post-hoc EMA lengths (vs σ_rel)."""
    for a, posthoc, x_key, title, xlabel in (
            (over_steps, False, "step", "metric over checkpoints (scmctl eval --checkpoints)", "step"),
            (over_sigma, True, "sigma_rel", "metric over post-hoc EMA length", "σ_rel")):
        groups: dict[str, list] = {}
        for r in rows:
            if bool(r.get("posthoc")) == posthoc and r.get(x_key) is not None:
                for name, v in _values(r):
                    label = _group_label(r) + (f" {name}" if name else "")
                    if posthoc:
                        label += f" @ step {r['step']}"
                    groups.setdefault(label, []).append((r[x_key], v))
        a.set_title(title, fontsize=12)
        a.grid(alpha=0.3)
        a.set_xlabel(xlabel)
        if not groups:
            _empty(a, "no results in metrics.json yet")
        for label, pts in sorted(groups.items()):
            pts.sort()
            a.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
            if len(pts) > 1 and not label.endswith("recall") and not label.endswith("precision"):
                best = min(pts, key=lambda p: p[1])
                a.annotate(f"min {best[1]:.3g}", best, textcoords="offset points", xytext=(4, 6), fontsize=9)
        if groups:
            a.legend(fontsize=9)
        drawn[title] = sorted(groups)
