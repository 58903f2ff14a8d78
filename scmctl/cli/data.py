"""`scmctl data`: prepare datasets (CIFAR-10, ImageNet crops, SD-VAE latents) and show their metadata."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from scmctl.cli import app
from scmctl.errors import UsageError
from scmctl.fileio import check_output_dir

data_app = typer.Typer(help="Prepare datasets for training (written once, memory-mapped by train).",
                       no_args_is_help=True, add_completion=False)
app.add_typer(data_app, name="data")

OUT = typer.Option(..., "--out", help="Output folder (must not exist, or be empty); written to "
                                      "OUT.partial and renamed when complete. Re-run to resume.")
JSON = typer.Option(False, "--json", help="Print exactly one JSON object (the metadata) on stdout.")
WORKERS = typer.Option(None, "--workers", help="Image-decoding threads (default: CPU count, at most 32).")


@data_app.callback()
def _data() -> None:
    """Prepare datasets: a folder (dataset.json, images.npy or latents.npy, labels.npy) for train --data DIR."""


@data_app.command("cifar10")
def cifar10(archive: Path = typer.Argument(..., metavar="ARCHIVE",
                                           help="cifar-10-python.tar.gz or its cifar-10-batches-py folder."),
            out: Path = OUT,
            split: str = typer.Option("train", "--split", help="train (50,000 images) or test (10,000)."),
            json_out: bool = JSON) -> None:
    """CIFAR-10 from the official python archive: 32x32 RGB as stored, labels 0..9 (class names kept)."""
    from scmctl.data.prepare import prepare_cifar10

    check_output_dir(out, "--out")
    with _bar("CIFAR-10") as cb:
        meta = prepare_cifar10(archive, out, split, on_progress=cb)
    _done(meta, out, json_out)


@data_app.command("imagenet")
def imagenet(src: Path = typer.Argument(..., metavar="SRC",
                                        help="ImageNet train folder (synset subfolders n01440764/...; "
                                             "any class-subfolder tree, or a flat folder = unlabeled)."),
             out: Path = OUT,
             resolution: int = typer.Option(64, "--resolution", help="Output side (the ADM crop)."),
             workers: Optional[int] = WORKERS, json_out: bool = JSON) -> None:
    """Image folders -> ADM center crops (BOX halving, BICUBIC, center crop, no flips), labels by sorted folder."""
    from scmctl.data.prepare import prepare_images

    check_output_dir(out, "--out")
    with _bar("cropping") as cb:
        meta = prepare_images(src, out, resolution, workers=workers, on_progress=cb)
    _done(meta, out, json_out)


@data_app.command("latents")
def latents(src: Path = typer.Argument(..., metavar="SRC",
                                       help="ImageNet train folder (as for `data imagenet`), or a "
                                            "prepared RGB dataset at --resolution."),
            out: Path = OUT,
            vae: str = typer.Option("stabilityai/sd-vae-ft-mse", "--vae",
                                    help="AutoencoderKL: Hugging Face id (from the HF cache; downloaded "
                                         "unless SCMCTL_OFFLINE=1/HF_HUB_OFFLINE=1) or a local folder."),
            resolution: int = typer.Option(512, "--resolution", help="Image side encoded (ADM crop)."),
            batch: int = typer.Option(32, "--batch", help="Images per VAE encode call."),
            device: str = typer.Option("auto", "--device", help="auto (CUDA if available), cpu, cuda, cuda:N."),
            dtype: str = typer.Option("float16", "--dtype", help="Storage of the posterior mean/std: float16 or float32."),
            latent_mean: Optional[str] = typer.Option(
                None, "--latent-mean", help="Normalization mean, comma-separated per channel, or "
                                            "'measured'; default: sCM's [1.56,-0.695,0.483,0.729]."),
            latent_std: Optional[str] = typer.Option(
                None, "--latent-std", help="Normalization std, or 'measured'; default: sCM's "
                                           "[5.27,5.91,4.21,4.31]."),
            sigma_data: float = typer.Option(0.5, "--sigma-data", help="Std of the normalized latents."),
            vae_pixel_range: str = typer.Option("signed", "--vae-pixel-range",
                                                help="Pixels the VAE sees: signed = [-1, 1] (default), "
                                                     "unit = [0, 1] (EDM2's latent models)."),
            workers: Optional[int] = WORKERS, json_out: bool = JSON) -> None:
    """Images -> ADM crop -> SD-VAE posterior mean/std (raw, normalized at training time by latent_mean/std)."""
    from scmctl.data.prepare import prepare_latents

    check_output_dir(out, "--out")
    with _bar("encoding") as cb:
        meta = prepare_latents(src, out, vae, resolution=resolution, batch=batch, device=device,
                               dtype=dtype, latent_mean=_floats(latent_mean, "--latent-mean"),
                               latent_std=_floats(latent_std, "--latent-std"),
                               sigma_data=sigma_data, vae_pixel_range=vae_pixel_range,
                               workers=workers, on_progress=cb)
    _done(meta, out, json_out)


@data_app.command("info")
def info(path: Path = typer.Argument(..., metavar="DIR", help="A prepared dataset folder."),
         json_out: bool = JSON) -> None:
    """Print a prepared dataset's metadata (dataset.json)."""
    from scmctl.data.datasets import read_metadata

    meta = read_metadata(path)
    if json_out:
        from scmctl.cli.common import emit_json

        emit_json(meta)
        return
    for k, v in meta.items():
        if k == "class_names" and len(v) > 8:
            v = ", ".join(v[:4]) + f", ... ({len(v)} names)"
        elif isinstance(v, list) and v and isinstance(v[0], float):
            v = "[" + ", ".join(f"{x:.4g}" for x in v) + "]"
        print(f"{k}: {v}")


# --- helpers --------------------------------------------------------------------------------------

def _floats(text: Optional[str], name: str):
    if text is None or text.strip() == "measured":
        return None if text is None else "measured"
    try:
        return [float(v) for v in text.strip().strip("[]").split(",") if v.strip()]
    except ValueError:
        raise UsageError(f"{name} must be comma-separated numbers or 'measured', got '{text}'") from None


class _bar:
    """A progress bar on stderr fed by scmctl.data.prepare's (done, total) callback; started at
    the first report, so an error before any work prints just its one line."""

    def __init__(self, what: str):
        self.what, self.bar, self.task = what, None, None

    def __enter__(self):
        return self.update

    def update(self, done: int, total: int) -> None:
        if self.bar is None:
            from scmctl.cli.common import progress

            self.bar = progress()
            self.bar.__enter__()
            self.task = self.bar.add_task(self.what, total=total, info="")
        self.bar.update(self.task, completed=done)

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.__exit__(*exc)
        return False


def _done(meta: dict, out: Path, json_out: bool) -> None:
    from scmctl.cli.common import console, emit_json

    if json_out:
        emit_json({"out": str(out), **meta})
        return
    size = (f"{meta['resolution']}x{meta['resolution']} images" if meta["kind"] == "pixels" else
            f"{meta['latent_channels']}x{meta['latent_resolution']}x{meta['latent_resolution']} "
            f"latents of {meta['image_resolution']}x{meta['image_resolution']} images")
    classes = f"{meta['num_classes']} classes" if meta["num_classes"] else "unlabeled"
    console.print(f"wrote {meta['count']} {size} ({classes}) to {out}; train with --data {out}")
    print(out)
