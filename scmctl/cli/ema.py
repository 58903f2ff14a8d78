"""`scmctl ema`: post-hoc EMA of a finished (or running) training run (EDM2 Sec. 3, App. C).

Solves for the combination of the run's stored EMA snapshots (``RUN_DIR/phema/``) whose profile
best matches the requested σ_rel and writes it as a checkpoint that every command loads.
The math is in :mod:`scmctl.training.phema`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from scmctl.cli import app
from scmctl.errors import UsageError

def parse_sigma_rels(text: str) -> list[float]:
    """``0.05`` or ``0.05,0.08,0.1`` -> floats (validated by the core when solving)."""
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UsageError(f"--sigma-rel {text}: expected numbers like 0.05 or 0.05,0.08,0.1") from None
    if not values:
        raise UsageError("--sigma-rel: give at least one value, e.g. 0.05")
    if len(set(values)) != len(values):
        raise UsageError(f"--sigma-rel {text}: a value is listed twice")
    return values


def output_name(step: int, sigma_rel: float) -> str:
    return f"ema-{step:07d}-{sigma_rel:.4f}.pt"


@app.command("ema")
def ema_cmd(run_dir: Path = typer.Argument(..., metavar="RUN_DIR", help="A training run directory with phema/ snapshots."),
            sigma_rel: str = typer.Option(..., "--sigma-rel", help="EMA length(s) σ_rel to reconstruct: 0.05 or 0.05,0.08,..."),
            at: Optional[int] = typer.Option(None, "--at", help="Training step to reconstruct at (default: the last snapshot's); "
                                                              "only snapshots up to it are used."),
            out: Optional[Path] = typer.Option(None, "--out", help="Output checkpoint (one σ_rel, name ending in .pt) or "
                                                                  "folder (default: RUN_DIR/ema/, files ema-STEP-SIGMA.pt)."),
            json_out: bool = typer.Option(False, "--json", help="Print one JSON object on stdout.")) -> None:
    """Post-hoc EMA: reconstruct the EMA of any length σ_rel from the run's stored snapshots."""
    from rich.markup import escape

    from scmctl.cli.common import console, emit_json
    from scmctl.fileio import sha256_file
    from scmctl.training import checkpoint as ckpt_io
    from scmctl.training import phema

    if not run_dir.is_dir():
        raise UsageError(f"{run_dir}: not a run directory")
    values = parse_sigma_rels(sigma_rel)
    if at is not None and at < 1:
        raise UsageError(f"--at {at}: must be a training step >= 1")
    single_file = out is not None and out.suffix == ".pt"
    if single_file and len(values) > 1:
        raise UsageError(f"--out {out}: {len(values)} σ_rel values make {len(values)} files; give a folder")
    if out is not None and out.is_dir() is False and out.exists():
        raise UsageError(f"--out {out}: exists and is not a folder")
    recs = phema.reconstruct(run_dir, values, at)
    folder = out.parent if single_file else (out if out is not None else run_dir / phema.POSTHOC_DIR)
    folder.mkdir(parents=True, exist_ok=True)
    results = []
    for rec in recs:
        path = out if single_file else folder / output_name(rec.step, rec.sigma_rel)
        ckpt_io.save_atomic(phema.checkpoint_dict(rec), path)
        results.append({"sigma_rel": rec.sigma_rel, "gamma": rec.gamma, "out": str(path),
                        "sha256": sha256_file(path), "snapshots": len(rec.used),
                        "profile_error": rec.profile_error})
        if rec.profile_error > 0.05:
            console.print(escape(f"note: σ_rel {rec.sigma_rel} is poorly expressed by the stored profiles (relative "
                                 f"profile error {rec.profile_error:.0%}); track a closer one with "
                                 "train.phema_sigma_rels"), soft_wrap=True)
        if not json_out:
            console.print(escape(f"σ_rel {rec.sigma_rel:.4f} (γ {rec.gamma:.2f}) at step {rec.step}: {len(rec.used)} "
                                 f"snapshots, profile error {rec.profile_error:.1e} -> {path}"), soft_wrap=True)
    if json_out:
        emit_json({"run_dir": str(run_dir), "step": recs[0].step, "kimg": recs[0].kimg, "outputs": results})
    else:
        for r in results:
            print(r["out"])
