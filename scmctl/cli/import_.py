"""`scmctl import`: an EDM/EDM2 network snapshot -> an scmctl diffusion checkpoint (no pickled code run)."""

from __future__ import annotations

from pathlib import Path

import typer

from scmctl.cli import app
from scmctl.cli.common import console, emit_json
from scmctl.errors import UsageError


@app.command("import")
def import_cmd(snapshot: Path = typer.Argument(..., metavar="SNAPSHOT.pkl",
                                               help="EDM or EDM2 network-snapshot-*.pkl (or an EDM2 post-hoc reconstruction)."),
               out: Path = typer.Option(..., "--out", help="The scmctl checkpoint to write (e.g. teacher.pt)."),
               json_out: bool = typer.Option(False, "--json", help="Print exactly one JSON object on stdout.")) -> None:
    """Convert an EDM/EDM2 snapshot into a diffusion checkpoint for sample/eval/refine/distill --teacher."""
    from scmctl.importers import import_snapshot
    from scmctl.training.checkpoint import save_atomic

    if out.exists() and out.is_dir():
        raise UsageError(f"--out {out}: is a folder; give a file name such as teacher.pt")
    if not out.parent.is_dir():
        raise UsageError(f"--out {out}: folder {out.parent} does not exist")
    ckpt = import_snapshot(snapshot)
    save_atomic(ckpt, out)
    net, src = ckpt["config"]["network"], ckpt["source"]
    summary = {"checkpoint": str(out), "source": str(snapshot), "format": src["format"],
               "class": src["class"], "sha256": src["sha256"], "encoder": src["encoder"],
               "resolution": net["resolution"], "channels": net["channels"],
               "num_classes": net["num_classes"], "numel": src["numel"],
               "latent": bool(ckpt["config"]["data"]["encoder"])}
    if json_out:
        emit_json(summary)
    else:
        console.print(f"imported {src['format']} {src['class']} ({src['numel']:,} weights, "
                      f"{net['channels']}x{net['resolution']}x{net['resolution']}, "
                      f"{net['num_classes']} classes) from {snapshot}; no pickled code was run")
        print(f"checkpoint: {out}")
