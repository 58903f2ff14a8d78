"""`scmctl sample`: images from a checkpoint or run directory, as a PNG folder or one .npz.

Runs as one process or under torchrun (seeds sharded by global batch, see
:func:`scmctl.generation.batch_plan`); re-running the same command resumes. With
``--search-tmid`` it instead evaluates the 2-step FID over t_mid on a small budget.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import typer

from scmctl.cli import app
from scmctl.cli.common import console, emit_json, progress
from scmctl.errors import UsageError
from scmctl.sampling import SOLVERS
from scmctl.generation import load_for_sampling, parse_label  # noqa: F401  (used by `refine`)

SEARCH_DEFAULT_N = 5000  # a proxy budget: FIDs at 5k samples are biased upwards but rank t_mid alike


def default_out(model: str) -> Path:
    p = Path(model)
    return (p if p.is_dir() else p.parent) / "samples"


def _floats(text: str, option: str) -> list[float]:
    try:
        vals = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UsageError(f"{option} must be comma-separated numbers, got '{text}'") from None
    if not vals:
        raise UsageError(f"{option} must list at least one number")
    return vals


def _output_format(fmt: Optional[str], out: Optional[Path], model: str) -> tuple[str, Path]:
    if fmt is not None and fmt not in ("png", "npz"):
        raise UsageError(f"--format must be png or npz, got '{fmt}'")
    is_npz = out is not None and out.suffix.lower() == ".npz"
    fmt = fmt or ("npz" if is_npz else "png")
    if fmt == "npz":
        if out is None:
            return fmt, default_out(model).with_suffix(".npz")
        if not is_npz:
            raise UsageError(f"--format npz writes one file: give --out a name ending in .npz (got {out})")
    elif is_npz:
        raise UsageError(f"--out {out}: an .npz name with --format png; drop --format or rename --out")
    return fmt, out or default_out(model)


@app.command("sample")
def sample_cmd(model: str = typer.Argument(..., metavar="CKPT|RUN_DIR", help="Checkpoint file or run directory (latest checkpoint)."),
               n: Optional[int] = typer.Option(None, "-n", help=f"Number of images (--search-tmid: per t_mid, default {SEARCH_DEFAULT_N})."),
               steps: Optional[int] = typer.Option(None, "--steps", help="Consistency steps (1, 2, K) or the ODE solver's steps for a diffusion model."),
               t_mid: Optional[float] = typer.Option(None, "--t-mid", help="2-step intermediate time (default: the config's, 1.1)."),
               ts: Optional[str] = typer.Option(None, "--ts", help="Explicit decreasing times T1,T2,... (consistency models)."),
               solver: Optional[str] = typer.Option(None, "--solver", help=f"Diffusion models: {' | '.join(SOLVERS)} (default: the checkpoint's sample.solver)."),
               label: Optional[str] = typer.Option(None, "--label", help="Class index, or 'random' (per seed)."),
               guidance: float = typer.Option(1.0, "--guidance", help="Guidance scale s (CFG teacher, or an sCD student's input)."),
               seed: int = typer.Option(0, "--seed", help="Image k uses seed SEED+k."),
               batch: int = typer.Option(64, "--batch", help="Images per network call (per process)."),
               out: Optional[Path] = typer.Option(None, "--out", help="Output folder, or FILE.npz (default: RUN_DIR/samples)."),
               fmt: Optional[str] = typer.Option(None, "--format", help="png (a folder) | npz (one uint8 array; default when --out ends in .npz)."),
               grid: Optional[Path] = typer.Option(None, "--grid", help="Also write a grid of the first 64 images here."),
               weights: str = typer.Option("ema", "--weights", help="ema | raw"),
               device: str = typer.Option("auto", "--device"),
               search_tmid: bool = typer.Option(False, "--search-tmid", help="Search the 2-step t_mid by FID instead of writing samples."),
               ref: Optional[str] = typer.Option(None, "--ref", help="--search-tmid: reference statistics (.npz mu/sigma) or images."),
               tmid_grid: Optional[str] = typer.Option(None, "--tmid-grid", help="--search-tmid: t_mid values a,b,c."),
               tmid_range: Optional[str] = typer.Option(None, "--tmid-range", help="--search-tmid: ternary search over lo,hi."),
               iters: int = typer.Option(5, "--iters", help="--search-tmid: ternary-search iterations (2 FIDs each)."),
               detector: str = typer.Option("inception", "--detector", help="--search-tmid: inception | TorchScript file."),
               inception_weights: Optional[str] = typer.Option(None, "--inception", help="--search-tmid: local Inception weights."),
               mode: Optional[str] = typer.Option(None, "--mode", help="--search-tmid: legacy_tensorflow | clean (Inception)."),
               json_out: bool = typer.Option(False, "--json", help="Print exactly one JSON object on stdout.")) -> None:
    """Sample images (a PNG per seed, or one .npz) from a consistency or diffusion model; resumable."""
    if batch < 1:
        raise UsageError("--batch must be >= 1")
    if n is not None and n < 1:
        raise UsageError("-n must be >= 1")
    ts_list = _floats(ts, "--ts") if ts else None
    if search_tmid:
        for name, val in (("--out", out), ("--format", fmt), ("--grid", grid), ("--t-mid", t_mid), ("--ts", ts),
                          ("--solver", solver)):
            if val is not None:
                raise UsageError(f"{name} does not apply to --search-tmid (it searches t_mid and writes no samples)")
        return _search(model, n or SEARCH_DEFAULT_N, steps, label, guidance, seed, batch, weights, device, ref,
                       tmid_grid, tmid_range, iters, detector, inception_weights, mode, json_out)
    for name, val in (("--ref", ref), ("--tmid-grid", tmid_grid), ("--tmid-range", tmid_range),
                      ("--inception", inception_weights), ("--mode", mode)):
        if val is not None:
            raise UsageError(f"{name} applies to --search-tmid only")
    if n is None:
        raise UsageError("-n is required: the number of images to sample")
    _sample(model, n, steps, t_mid, ts_list, solver, label, guidance, seed, batch, out, fmt, grid, weights,
            device, json_out)


def _sample(model, n, steps, t_mid, ts_list, solver, label, guidance, seed, batch, out, fmt, grid, weights,
            device, json_out) -> None:
    from scmctl import distributed
    from scmctl.fileio import check_output_dir, check_output_file
    from scmctl.generation import batch_plan, check_count, manifest_for, open_generator, open_output

    fmt, out = _output_format(fmt, out, model)
    if fmt == "npz":
        check_output_file(out, "--out")
    else:
        check_output_dir(out, "--out")
    if grid is not None:
        check_output_file(grid, "--grid")
    d = distributed.init(device) if distributed.launched() else None
    rank, world = (d.rank, d.world) if d else (0, 1)
    try:
        gen = open_generator(model, steps=steps, t_mid=t_mid, ts=ts_list, solver=solver, guidance=guidance,
                             label=label, weights=weights, device=d.device if d else device)
        info = gen.info
        check_count(n, seed, fmt, info["resolution"] ** 2 * info["channels"], out.parent if fmt == "npz" else out)
        manifest = manifest_for(info, seed, n, fmt, batch)
        output = open_output(out, fmt)
        output.check(manifest)  # every process: a refusal exits all of them before any barrier
        distributed.barrier()
        if rank == 0:
            output.prepare(manifest)
        # Every process sees the same files here (nothing is written before the next barrier), so
        # all agree on what is left; the pending batches are dealt round-robin for an even share.
        pending = output.pending(batch_plan(n, batch), seed)
        mine = pending[rank::world]
        distributed.barrier()
        todo = sum(len(r) for _, r in pending)
        t0 = time.perf_counter()
        with progress(disable=rank != 0) as bar:
            what = "sampling" if world == 1 else f"sampling (rank 0 of {world})"
            task = bar.add_task(what, total=sum(len(r) for _, r in mine), info="")
            done = 0
            try:
                for (j, r), b in zip(mine, gen.stream([seed + k for k in r] for _, r in mine)):
                    output.write(j, b)
                    done += len(r)
                    rate = done / max(time.perf_counter() - t0, 1e-9)
                    bar.update(task, completed=done, info=f"{rate:.1f} img/s"
                               + (f", ≈{rate * world:.1f} img/s in all" if world > 1 else ""))
            finally:
                output.close()  # queued files on disk before anyone counts them
        distributed.barrier()
        elapsed = time.perf_counter() - t0
        if rank != 0:
            return
        if grid is not None:
            from scmctl.data.imageio import save_grid

            grid.parent.mkdir(parents=True, exist_ok=True)
            save_grid(grid, output.first_images(seed, n, 64))
        output.finish(n, batch)
    finally:
        if d is not None:
            distributed.shutdown()
    summary = {"count": n, "generated": todo, "out": str(out), "format": fmt, "seeds": [seed, seed + n - 1],
               **{k: info[k] for k in ("kind", "steps", "nfe", "solver", "t_mid", "ts", "guidance", "label",
                                       "weights", "checkpoint", "checkpoint_sha256")},
               "time_s": round(elapsed, 3), "images_per_s": todo / max(elapsed, 1e-9), "world_size": world,
               "batch": batch, "grid": str(grid) if grid else None}
    if json_out:
        emit_json(summary)
    else:
        resumed = f", {n - todo} already there" if todo < n else ""
        console.print(f"wrote {todo} images to {out} ({n} in all{resumed}; {info['steps']} steps, {info['nfe']} "
                      f"network evaluations per image, {summary['images_per_s']:.1f} img/s, {world} process(es))")
        print(out)


def _search(model, n, steps, label, guidance, seed, batch, weights, device, ref, tmid_grid, tmid_range, iters,
            detector, inception_weights, mode, json_out) -> None:
    from scmctl import distributed
    from scmctl.generation import open_generator, ternary_search
    from scmctl.metrics import load_detector, load_reference
    from scmctl.metrics.evaluate import frechet_over_sets
    from scmctl.metrics.sources import GeneratedSource

    if distributed.launched():
        raise UsageError("--search-tmid runs in one process; start it without torchrun")
    if ref is None:
        raise UsageError("--search-tmid needs --ref (reference statistics .npz, or a folder of images)")
    if (tmid_grid is None) == (tmid_range is None):
        raise UsageError("--search-tmid needs exactly one of --tmid-grid a,b,c or --tmid-range lo,hi")
    if steps not in (None, 2):
        raise UsageError(f"--search-tmid searches the 2-step sampler's t_mid; got --steps {steps}")
    if n < 2:
        raise UsageError("-n must be >= 2 for FID statistics")
    gen = open_generator(model, steps=2, guidance=guidance, label=label, weights=weights, device=device)
    if gen.kind != "consistency":
        raise UsageError("--search-tmid needs a consistency model (sCT/sCD checkpoint); this one is a diffusion model")
    if gen.boundaries is not None:
        raise UsageError("--search-tmid: a multistep consistency model has no t_mid (it samples along its segment "
                         "boundaries, --steps 1..M)")
    from scmctl import trigflow

    t_max = trigflow.t_max(gen.cfg.data.sigma_data)
    if tmid_grid is not None:
        grid = _floats(tmid_grid, "--tmid-grid")
        bad = [t for t in grid if not 0 < t < t_max]
        if bad:
            raise UsageError(f"--tmid-grid: {bad[0]} is outside (0, t_max = {t_max:.4f})")
    else:
        lo_hi = _floats(tmid_range, "--tmid-range")
        if len(lo_hi) != 2 or not 0 < lo_hi[0] < lo_hi[1] < t_max:
            raise UsageError(f"--tmid-range must be lo,hi with 0 < lo < hi < t_max = {t_max:.4f}, got '{tmid_range}'")
        if iters < 1:
            raise UsageError("--iters must be >= 1")
    det = load_detector(detector, mode, gen.device, inception_weights)
    reference = load_reference(ref, det, batch)
    seeds = list(range(seed, seed + n))  # common random numbers: the same seeds for every t_mid
    points: dict[float, float] = {}
    with progress() as bar:
        task = bar.add_task("t_mid search", total=None, info="")

        def fid(t: float) -> float:
            bar.update(task, info=f"t_mid = {t:g}")
            source = GeneratedSource(model, gen.with_t_mid(t), seeds)
            (points[t],) = frechet_over_sets([source], reference, det, batch, show_progress=False)
            bar.advance(task, n)
            return points[t]

        if tmid_grid is not None:
            for t in grid:
                if t not in points:
                    fid(t)
        else:
            ternary_search(fid, lo_hi[0], lo_hi[1], iters)
    table = [{"t_mid": t, "fid": points[t]} for t in sorted(points)]
    best = min(table, key=lambda r: r["fid"])
    summary = {"search": "grid" if tmid_grid is not None else "ternary", "points": table, "best": best,
               "n": n, "seeds": [seed, seed + n - 1], "ref": str(ref), "detector": det.name,
               "mode": det.mode, **{k: gen.info[k] for k in ("guidance", "label", "weights", "checkpoint",
                                                                 "checkpoint_sha256")}}
    if json_out:
        emit_json(summary)
        return
    console.print(f"2-step FID over t_mid, {n} samples each (seeds {seed}..{seed + n - 1}; a proxy for the "
                  f"50k protocol), detector {det.describe()}")
    print(f"{'t_mid':>8}  {'FID':>10}")
    for r in table:
        print(f"{r['t_mid']:8.4f}  {r['fid']:10.4f}" + ("  <- best" if r is best else ""))
    print(f"best t_mid = {best['t_mid']:g} (FID {best['fid']:.4f})")
