"""`scmctl sample`: images from a checkpoint or run directory, one PNG per image."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Optional

import typer

from scmctl.cli import app
from scmctl.cli.common import console, emit_json, progress
from scmctl.errors import UsageError


def load_for_sampling(model: str, weights: str, device: str):
    """(net, config, kind, checkpoint) for a checkpoint file or a run directory's latest."""
    from scmctl.config import from_dict
    from scmctl.training import checkpoint as ckpt_io
    from scmctl.training.loop import select_device

    dev = select_device(device)
    ckpt = ckpt_io.load(model, map_location="cpu")
    net = ckpt_io.network_from_checkpoint(ckpt, weights, dev)
    return net, from_dict(ckpt["config"]), ckpt["kind"], ckpt, dev


def parse_label(label: Optional[str], num_classes: int) -> Optional[int]:
    if label is None or label == "random":
        return None
    if num_classes == 0:
        raise UsageError("--label: this model is unconditional")
    try:
        c = int(label)
    except ValueError:
        raise UsageError(f"--label must be a class index or 'random', got '{label}'") from None
    if not 0 <= c < num_classes:
        raise UsageError(f"--label {c} is out of range (the model has {num_classes} classes)")
    return c


def default_out(model: str) -> Path:
    p = Path(model)
    return (p if p.is_dir() else p.parent) / "samples"


@app.command("sample")
def sample_cmd(model: str = typer.Argument(..., metavar="CKPT|RUN_DIR", help="Checkpoint file or run directory (latest checkpoint)."),
               n: int = typer.Option(..., "-n", help="Number of images."),
               steps: Optional[int] = typer.Option(None, "--steps", help="Consistency steps (1, 2, K) or the ODE solver's steps for a diffusion model."),
               t_mid: Optional[float] = typer.Option(None, "--t-mid", help="2-step intermediate time (default: the config's, 1.1)."),
               ts: Optional[str] = typer.Option(None, "--ts", help="Explicit decreasing times T1,T2,... (consistency models)."),
               solver: Optional[str] = typer.Option(None, "--solver", help="Diffusion models: heun | dpm2s | euler."),
               label: Optional[str] = typer.Option(None, "--label", help="Class index, or 'random' (per seed)."),
               guidance: float = typer.Option(1.0, "--guidance", help="Guidance scale s (CFG teacher, or an sCD student's input)."),
               seed: int = typer.Option(0, "--seed", help="Image k uses seed SEED+k."),
               batch: int = typer.Option(64, "--batch", help="Images per network call."),
               out: Optional[Path] = typer.Option(None, "--out", help="Output folder (default: RUN_DIR/samples)."),
               grid: Optional[Path] = typer.Option(None, "--grid", help="Also write a grid of the first 64 images here."),
               weights: str = typer.Option("ema", "--weights", help="ema | raw"),
               device: str = typer.Option("auto", "--device"),
               json_out: bool = typer.Option(False, "--json", help="Print exactly one JSON object on stdout.")) -> None:
    """Sample images (PNG per image, named by seed) from a consistency or diffusion model."""
    import torch

    from scmctl.data.imageio import save_grid, to_uint8, write_png
    from scmctl.sampling import consistency_times, generate
    from scmctl import trigflow

    if n < 1:
        raise UsageError("-n must be >= 1")
    if batch < 1:
        raise UsageError("--batch must be >= 1")
    if steps is not None and steps < 1:
        raise UsageError("--steps must be >= 1")
    if solver is not None and solver not in ("heun", "dpm2s", "euler"):
        raise UsageError(f"--solver must be heun, dpm2s or euler, got '{solver}'")
    ts_list = None
    if ts:
        try:
            ts_list = [float(x) for x in ts.split(",") if x.strip()]
        except ValueError:
            raise UsageError(f"--ts must be comma-separated numbers, got '{ts}'") from None
    net, cfg, kind, ckpt, dev = load_for_sampling(model, weights, device)
    if kind == "diffusion" and ts_list:
        raise UsageError("--ts applies to consistency models; use --steps/--solver for a diffusion model")
    cls = parse_label(label, net.num_classes)
    s = cfg.sample
    steps = steps or (len(ts_list) if ts_list else (s.steps if kind == "consistency" else s.solver_steps))
    t_mid = s.t_mid if t_mid is None else t_mid
    if kind == "consistency":
        consistency_times(steps, trigflow.t_max(cfg.data.sigma_data), t_mid, ts_list)  # validate early
    solver = solver or s.solver
    out = out or default_out(model)
    out.mkdir(parents=True, exist_ok=True)
    shape = (cfg.network.channels, cfg.network.resolution, cfg.network.resolution)
    first = []
    nfe = 0
    t0 = time.perf_counter()
    with progress() as bar:
        task = bar.add_task("sampling", total=n, info="")
        for start in range(0, n, batch):
            seeds = list(range(seed + start, seed + min(start + batch, n)))
            labels = torch.full((len(seeds),), cls, dtype=torch.long, device=dev) if cls is not None else None
            x0, _, nfe = generate(net, kind, seeds, shape, cfg.data.sigma_data, steps, t_mid, ts_list,
                                  solver, labels, guidance, dev)
            imgs = to_uint8(x0)
            for sd, img in zip(seeds, imgs):
                write_png(out / f"{sd:06d}.png", img)
            if len(first) < 64:
                first.extend(imgs[: 64 - len(first)])
            done = min(start + batch, n)
            bar.update(task, completed=done,
                       info=f"{done / max(time.perf_counter() - t0, 1e-9):.1f} img/s")
    elapsed = time.perf_counter() - t0
    if grid is not None:
        import numpy as np

        grid.parent.mkdir(parents=True, exist_ok=True)
        save_grid(grid, np.stack(first))
    summary = {"count": n, "out": str(out), "seeds": [seed, seed + n - 1], "kind": kind,
               "steps": steps, "nfe": nfe, "solver": solver if kind == "diffusion" else None,
               "t_mid": t_mid if kind == "consistency" and steps == 2 and not ts_list else None,
               "guidance": guidance, "checkpoint": ckpt["path"],
               "checkpoint_sha256": _sha256(ckpt["path"]), "time_s": round(elapsed, 3),
               "images_per_s": n / max(elapsed, 1e-9), "grid": str(grid) if grid else None}
    if json_out:
        emit_json(summary)
    else:
        console.print(f"wrote {n} images to {out} ({steps} steps, {nfe} network evaluations per image, "
                      f"{summary['images_per_s']:.1f} img/s)")
        print(out)


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
