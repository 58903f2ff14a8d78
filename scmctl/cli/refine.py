"""`scmctl refine`: re-noise given images to time t and denoise them with the model.

Pixel models take images of exactly the model's size. Latent models (data.encoder set) take RGB
images of any size: each is ADM center-cropped to the VAE's pixel size (latent side × 8 for
sd-vae-ft-mse, e.g. 512x512; an image of exactly that size is unchanged), VAE-encoded (posterior
mean) and normalized, refined in latent space, and decoded back to PNGs.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import List, Optional

import typer

from scmctl.cli import app
from scmctl.cli.common import console, emit_json, progress
from scmctl.errors import UsageError, check_float


@app.command("refine")
def refine_cmd(model: str = typer.Argument(..., metavar="CKPT|RUN_DIR"),
               input_dir: Path = typer.Argument(..., metavar="INPUT_DIR", help="Folder of images to refine (latent models: any size, ADM center-cropped to the VAE's pixel size, e.g. 512x512)."),
               t: List[float] = typer.Option([], "--t", help="Re-noising time (repeat for several rounds); default: t_mid."),
               label: Optional[str] = typer.Option(None, "--label", help="Class index, or 'random' (per seed)."),
               guidance: float = typer.Option(1.0, "--guidance"),
               seed: int = typer.Option(0, "--seed", help="Image k (sorted by path) uses seed SEED+k."),
               batch: int = typer.Option(64, "--batch"),
               out: Optional[Path] = typer.Option(None, "--out", help="Output folder (default: RUN_DIR/refined)."),
               weights: str = typer.Option("ema", "--weights", help="ema | raw"),
               device: str = typer.Option("auto", "--device"),
               json_out: bool = typer.Option(False, "--json")) -> None:
    """Re-noise images to time t and denoise them with the model (repeat --t for several rounds)."""
    import numpy as np
    import torch

    from scmctl.cli.sample import default_out
    from scmctl.data.imageio import list_image_files, read_image, read_image_adm, write_png
    from scmctl.data.latents import decode_to_uint8, encode_from_uint8, is_latent, pixel_resolution
    from scmctl.generation import load_for_sampling, parse_label
    from scmctl.sampling import refine
    from scmctl import segments

    from scmctl.fileio import check_output_dir

    if batch < 1:
        raise UsageError("--batch must be >= 1")
    check_float(guidance, "--guidance", 0.0)
    files = list_image_files(input_dir)
    out = out or default_out(model).with_name("refined")
    targets = output_names(input_dir, files, out)
    check_output_dir(out, "--out")
    net, cfg, kind, ckpt, dev = load_for_sampling(model, weights, device)
    if kind == "consistency" and segments.of_model(cfg) is not None:
        raise UsageError(f"{model}: refine takes sCM or diffusion models; this multistep consistency model maps "
                         "x_t to its segment's lower boundary, not to data (sample it with --steps 1..M)")
    times = list(t) or [cfg.sample.t_mid]
    for tt in times:
        if not 0 < tt < 1.5707963:  # NaN fails this test too
            raise UsageError(f"--t must be in (0, π/2), got {tt}")
    cls = parse_label(label, net.num_classes)
    latent = is_latent(cfg.data)
    res, ch = cfg.network.resolution, cfg.network.channels
    pixel_res = pixel_resolution(cfg.data, res)      # latents: latent side x the VAE's downsampling

    def load(f: Path) -> np.ndarray:
        if latent:  # any size: RGB, ADM center crop to the VAE's pixel size (identity at that size)
            return read_image_adm(f, pixel_res)
        a = read_image(f)
        if a.shape[0] != res or a.shape[1] != res:
            raise UsageError(f"{f}: is {a.shape[1]}x{a.shape[0]}, the model makes {res}x{res} images")
        if a.shape[2] != ch:
            a = a.mean(axis=2, keepdims=True).round().astype(np.uint8) if ch == 1 else np.repeat(a, 3, axis=2)
        return a

    t0 = time.perf_counter()
    with progress() as bar:
        task = bar.add_task("refining", total=len(files), info="")
        for start in range(0, len(files), batch):
            chunk = files[start:start + batch]
            x0 = encode_from_uint8(cfg.data, np.stack([load(f) for f in chunk]), dev)
            seeds = list(range(seed + start, seed + start + len(chunk)))
            labels = torch.full((len(chunk),), cls, dtype=torch.long, device=dev) if cls is not None else None
            y = refine(net, kind, x0, seeds, times, cfg.data.sigma_data, cfg.sample.solver,
                       cfg.sample.solver_steps, labels, guidance)
            for f, img in zip(chunk, decode_to_uint8(cfg.data, y, dev)):
                targets[f].parent.mkdir(parents=True, exist_ok=True)
                write_png(targets[f], img)
            bar.update(task, completed=start + len(chunk))
    summary = {"count": len(files), "out": str(out), "t": times, "kind": kind, "checkpoint": ckpt["path"],
               "resolution": pixel_res, "latent": latent, "time_s": round(time.perf_counter() - t0, 3)}
    if json_out:
        emit_json(summary)
    else:
        console.print(f"refined {len(files)} images (t = {', '.join(f'{x:g}' for x in times)}) into {out}")
        print(out)


def output_names(input_dir: Path, files: list[Path], out: Path) -> dict[Path, Path]:
    """Each input's output PNG (same relative path, suffix .png). Refused before any work: two inputs
    that would share an output (x.png and x.jpg), and any output that is an input file (--out equal
    to, or overlapping, the input folder): refine never overwrites what it reads."""
    if out.resolve() == Path(input_dir).resolve():
        raise UsageError(f"--out {out} is the input folder; choose another folder (refine never writes "
                         "among its inputs)")
    targets = {f: out / f.relative_to(input_dir).with_suffix(".png") for f in files}
    seen: dict[Path, Path] = {}
    for f, o in targets.items():
        if o in seen:
            raise UsageError(f"{seen[o]} and {f} would both be written as {o}; rename one of them")
        seen[o] = f
    inputs = {f.resolve() for f in files}
    for f, o in targets.items():
        if o.resolve() in inputs:
            raise UsageError(f"--out {out}: refining {f} would overwrite the input {o.resolve()}; choose an "
                             "output folder outside the inputs")
    return targets
