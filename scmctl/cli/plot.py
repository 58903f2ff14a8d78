"""`scmctl plot`: one PNG of a training run (loss, sCM stability signals, metrics); see
:mod:`scmctl.plotting`."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from scmctl.cli import app
from scmctl.errors import UsageError


@app.command("plot")
def plot_cmd(run_dir: Path = typer.Argument(..., metavar="RUN_DIR", help="A training run directory (stats.jsonl)."),
             out: Optional[Path] = typer.Option(None, "--out", help="Output PNG (default: RUN_DIR/run.png)."),
             json_out: bool = typer.Option(False, "--json", help="Print one JSON object on stdout.")) -> None:
    """Plot a run: loss, loss and tangent RMS by t-bin, masked samples, lr, throughput, metric history."""
    from scmctl.cli.common import console, emit_json
    from scmctl.plotting import plot_run

    if not run_dir.is_dir():
        raise UsageError(f"{run_dir}: not a run directory")
    out = out if out is not None else run_dir / "run.png"
    if out.suffix.lower() != ".png":
        raise UsageError(f"--out {out}: the plot is a PNG; end the name with .png")
    if not out.parent.is_dir():
        raise UsageError(f"--out {out}: folder {out.parent} does not exist")
    drawn = plot_run(run_dir, out)
    if json_out:
        emit_json({"run_dir": str(run_dir), "out": str(out), "panels": drawn})
    else:
        console.print(f"wrote {out}", markup=False, soft_wrap=True)
        print(out)
