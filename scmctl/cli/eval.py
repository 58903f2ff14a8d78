"""`scmctl eval fid`: FID of generated images against a reference folder or mu/sigma statistics."""

from __future__ import annotations

from typing import Optional

import typer

from scmctl.cli import app
from scmctl.errors import UsageError

eval_app = typer.Typer(help="Evaluate samples (FID).", no_args_is_help=True, add_completion=False)
app.add_typer(eval_app, name="eval")


@eval_app.callback()
def _eval() -> None:
    """Evaluate samples: `scmctl eval fid SAMPLES --ref REF`."""


@eval_app.command("fid")
def fid(
    samples: str = typer.Argument(
        ..., help="Samples: an image folder, a run directory (uses its samples/), or an .npz/.npy of "
                  "uint8 NHWC images (key 'images' or 'arr_0')."),
    ref: str = typer.Option(
        ..., "--ref", help="Reference: an image folder (or run directory / image .npz), or an .npz "
                           "with mu and sigma (clean-fid / EDM statistics; pickles are refused)."),
    detector: str = typer.Option(
        "inception", "--detector", help="'inception' (clean-fid's TF-Inception, 2048-d) or a "
                                         "TorchScript .pt mapping uint8 NCHW images to (N, D) features, "
                                         "fed at native size."),
    mode: Optional[str] = typer.Option(
        None, "--mode", help="Inception preprocessing: legacy_tensorflow (default; resize inside the "
                             "network, as EDM/sCM report) or clean (PIL bicubic to 299 first)."),
    num: Optional[int] = typer.Option(None, "-n", "--num", help="Use the first N samples (sorted file order)."),
    allow_small: bool = typer.Option(False, "--allow-small", help="Allow fewer than 50,000 samples."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object on stdout."),
    batch: int = typer.Option(64, "--batch", help="Images per detector batch."),
    device: str = typer.Option("auto", "--device", help="auto (CUDA if available), cpu, cuda, cuda:N."),
    inception_weights: Optional[str] = typer.Option(
        None, "--inception-weights", help="Local inception-2015-12-05.pt (file or folder); else "
                                          "$SCMCTL_CACHE (~/.cache/scmctl), then clean-fid's /tmp copy."),
) -> None:
    """FID of SAMPLES against REF. Nothing is downloaded: the Inception weights must be local."""
    from rich.console import Console
    from rich.markup import escape

    from scmctl.cli.common import console, emit_json
    from scmctl.metrics import (MIN_SAMPLES, Reference, extract_stats, frechet_distance, load_detector,
                                open_images, open_reference, resolve_device)
    from scmctl.metrics.fid import check_dims

    if batch < 1:
        raise UsageError(f"--batch {batch}: must be at least 1")
    # Everything cheap is validated before the first feature is extracted.
    source = open_images(samples)
    if num is not None:
        if num < 2:
            raise UsageError(f"-n {num}: FID needs at least 2 samples")
        if num > len(source):
            raise UsageError(f"-n {num}: {samples} has only {len(source)} images")
        source = source.first(num)
    n = len(source)
    if n < MIN_SAMPLES and not allow_small:
        raise UsageError(f"{samples}: {n} samples; FID needs {MIN_SAMPLES:,} for numbers comparable to "
                         "papers (pass --allow-small to compute it anyway)")
    reference = open_reference(ref)
    det = load_detector(detector, mode, resolve_device(device), inception_weights)
    if isinstance(reference, Reference) and det.feature_dim is not None:
        check_dims(reference, det.feature_dim, det)  # fail before extraction when D is known up front
    if n < MIN_SAMPLES:
        console.print(f"note: {n} < {MIN_SAMPLES:,} samples: FID is biased upward and not comparable "
                      "to published numbers", soft_wrap=True)

    stats = extract_stats(source, det, batch, "samples")
    if not isinstance(reference, Reference):
        reference = reference.compute(det, batch)
    check_dims(reference, stats.mu.shape[0], det)
    value = frechet_distance(stats.mu, stats.sigma, reference.mu, reference.sigma)

    if json_out:
        out = {"metric": "fid", "value": value, "n": n, "ref": ref, "detector": detector,
               "mode": det.mode}
        if reference.n is not None:
            out["n_ref"] = reference.n
        emit_json(out)
    else:
        against = f"{ref} ({reference.n} images)" if reference.n is not None else ref
        Console(highlight=False).print(f"FID {value:.4f}  ({n} samples vs {escape(against)}; detector "
                                       f"{escape(detector)}, mode {det.mode})", soft_wrap=True)

