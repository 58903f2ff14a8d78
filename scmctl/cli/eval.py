"""`scmctl eval ref|fid|fd-dinov2|kid|pr`: reference statistics and paper-protocol metrics.

Options are parsed and checked here (cheap checks before any feature is extracted); the work is
in :mod:`scmctl.metrics` (sources, detectors, references, :mod:`scmctl.metrics.evaluate`).
"""

from __future__ import annotations

from typing import Optional

import typer

from scmctl.cli import app
from scmctl.errors import UsageError
from scmctl.sampling import SOLVERS

eval_app = typer.Typer(help="Evaluate samples: reference statistics, FID, FD_DINOv2, KID, precision/recall.",
                       no_args_is_help=True, add_completion=False)
app.add_typer(eval_app, name="eval")


@eval_app.callback()
def _eval() -> None:
    """Evaluate samples: `scmctl eval ref DATA --out REF.npz`, then `scmctl eval fid SAMPLES --ref REF.npz`."""


# ------------------------------------------------------------------ shared options

SAMPLES = typer.Argument(
    ..., metavar="SAMPLES", help="An image folder, an .npz/.npy of uint8 NHWC images (key 'images' or "
                                 "'arr_0'), or a checkpoint / run directory (images generated on the fly, "
                                 "no files written).")
REF = typer.Option(
    ..., "--ref", help="Reference: an `eval ref` .npz, a clean-fid/EDM .npz (mu, sigma), an EDM2 .pkl "
                       "(read without running code), or reference images (folder, array, dataset).")
DETECTOR = typer.Option(
    "inception", "--detector", help="'inception' (TF-Inception pool3, 2048-d), 'dinov2' (ViT-L/14 CLS, "
                                    "1024-d) or a TorchScript .pt mapping uint8 NCHW to (N, D) features "
                                    "(its code runs: use files you trust).")
MODE = typer.Option(
    None, "--mode", help="Inception preprocessing: legacy_tensorflow (default; resize inside the network, as "
                         "EDM/sCM report) or clean (PIL bicubic to 299 first).")
INCEPTION = typer.Option(
    None, "--inception", help="Local inception-2015-12-05.pt (file or folder; TorchScript: it runs as code); "
                              "else $SCMCTL_CACHE (~/.cache/scmctl), only with the published sha256.")
INCEPTION_OLD = typer.Option(None, "--inception-weights", hidden=True)
DINOV2 = typer.Option(
    None, "--dinov2", help="Local dinov2_vitl14_pretrain.pth (file or folder); else $SCMCTL_CACHE "
                           "(~/.cache/scmctl), then torch.hub's checkpoints folder (read only).")
DOWNLOAD = typer.Option(
    False, "--download", help="Fetch missing detector weights into $SCMCTL_CACHE (never when SCMCTL_OFFLINE "
                              "or HF_HUB_OFFLINE is set).")
NUM = typer.Option(None, "-n", "--num", help="Samples per set: the first N files, or N seeds (generated; "
                                             "default 50,000).")
SEEDS = typer.Option(None, "--seeds", help="Generated sources: the first seed set, e.g. 0-49999 or 0,5,10-19 "
                                           "(default 0..N-1).")
REPEAT = typer.Option(1, "--repeat", help="Evaluate R disjoint sets (seed sets shifted by their span: 0-49999, "
                                          "50000-99999, 100000-149999 as EDM/EDM2; files: consecutive blocks) "
                                          "and report min and mean.")
STEPS = typer.Option(None, "--steps", help="Generated: consistency steps, or ODE solver steps of a diffusion model.")
T_MID = typer.Option(None, "--t-mid", help="Generated: 2-step intermediate time (default: the checkpoint's, 1.1).")
GUIDANCE = typer.Option(1.0, "--guidance", help="Generated: guidance scale s.")
SOLVER = typer.Option(None, "--solver", help=f"Generated diffusion models: {' | '.join(SOLVERS)}.")
JSON = typer.Option(False, "--json", help="Print one JSON object on stdout.")
BATCH = typer.Option(64, "--batch", help="Images per detector (and generator) batch.")
DEVICE = typer.Option("auto", "--device", help="auto (CUDA if available), cpu, cuda, cuda:N.")
ALLOW_SMALL = typer.Option(False, "--allow-small", help="Allow fewer than 50,000 samples.")


def _inception_path(inception: Optional[str], old: Optional[str]) -> Optional[str]:
    if inception is not None and old is not None and inception != old:
        raise UsageError("--inception and --inception-weights name different files; pass one")
    return inception if inception is not None else old


def _open(samples: str, *, detector: str, mode, inception, dinov2, download: bool, device: str, batch: int,
          num, seeds, repeat: int, steps, t_mid, guidance: float, solver, min_samples: int | None = None,
          metric: str = "FID"):
    """Validate the cheap things first, then (sets, generator, detector)."""
    from scmctl.devices import select_device
    from scmctl.metrics import MIN_SAMPLES, load_detector
    from scmctl.metrics.sources import sample_sets

    if batch < 1:
        raise UsageError(f"--batch {batch}: must be at least 1")
    dev = select_device(device)
    sets, generator = sample_sets(samples, n=num, seeds=seeds, repeat=repeat, default_n=MIN_SAMPLES,
                                  generator_options=dict(steps=steps, t_mid=t_mid, guidance=guidance,
                                                         solver=solver, device=dev))
    n = len(sets[0])
    if min_samples is not None and n < min_samples:
        raise UsageError(f"{samples}: {n} samples; {metric} needs {min_samples:,} for numbers comparable to "
                         "papers (pass --allow-small to compute it anyway)")
    det = load_detector(detector, mode, dev, inception, dinov2_weights=dinov2, download=download)
    return sets, generator, det


def _notes(sets, generator, det, metric: str, fd: bool) -> None:
    from rich.markup import escape

    from scmctl.cli.common import console
    from scmctl.metrics import MIN_SAMPLES

    if generator is not None:
        i = generator.info
        console.print(escape(f"generating {len(sets)} x {len(sets[0])} images from {i['checkpoint']} "
                             f"({i['kind']}, {i['steps']} steps, {i['nfe']} network evaluations each)"), soft_wrap=True)
    if fd and len(sets[0]) < MIN_SAMPLES:
        console.print(f"note: {len(sets[0])} < {MIN_SAMPLES:,} samples: {metric} is biased upward and not "
                      "comparable to published numbers", soft_wrap=True)


def _record(metric: str, summary: dict, *, sets, generator, detector: str, det, ref: str, reference,
            n_ref: int | None, samples: str) -> dict:
    from scmctl.metrics.reference import Reference
    from scmctl.metrics.sources import describe_seeds

    out = {"metric": metric, **summary, "n": len(sets[0]), "repeat": len(sets),
           "seeds": [describe_seeds(s.seeds) for s in sets] if generator is not None else None,
           "mode": det.mode, "detector": detector, "detector_sha256": det.sha256(),
           "ref": ref, "ref_sha256": reference.sha256 if isinstance(reference, Reference) else None}
    if n_ref is not None:
        out["n_ref"] = n_ref
    out["samples"] = samples
    if generator is not None:
        out["generator"] = generator.info
    return out


def _print_line(text: str) -> None:
    from rich.console import Console
    from rich.markup import escape

    Console(highlight=False).print(escape(text), soft_wrap=True)


def _values_text(summary: dict, fmt: str) -> str:
    if len(summary["values"]) == 1:
        return ""
    vals = ", ".join(format(v, fmt) for v in summary["values"])
    return f"min of {len(summary['values'])} sets; mean {format(summary['mean'], fmt)}; values {vals}; "


# ------------------------------------------------------------------ eval ref

@eval_app.command("ref")
def ref_cmd(
    data: str = typer.Argument(..., metavar="DATA", help="Reference images: an image folder, an .npz/.npy of "
                                                         "uint8 images, cifar-10-python.tar.gz[:test], a "
                                                         "prepared pixel dataset folder."),
    out: str = typer.Option(..., "--out", help="Output .npz: mu, sigma (float64), count, provenance."),
    detector: str = DETECTOR,
    mode: Optional[str] = MODE,
    inception: Optional[str] = INCEPTION,
    inception_weights: Optional[str] = INCEPTION_OLD,
    dinov2: Optional[str] = DINOV2,
    num: Optional[int] = typer.Option(None, "-n", "--num", help="Use a random subset of N images (seeded by "
                                                                 "--seed; datasets are often sorted by class)."),
    features: int = typer.Option(0, "--features", help="Also store the features of N random images (for "
                                                         "`eval kid` / `eval pr` with this file as --ref)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the random subsets (-n, --features)."),
    json_out: bool = JSON,
    batch: int = BATCH,
    device: str = DEVICE,
    download: bool = DOWNLOAD,
) -> None:
    """Reference statistics of DATA (streamed float64 mean and covariance) with provenance."""
    from pathlib import Path

    from scmctl.cli.common import console, emit_json
    from scmctl.devices import select_device
    from scmctl.metrics import load_detector
    from scmctl.metrics.reference import compute_reference, save_reference
    from scmctl.metrics.sources import open_data_images, random_subset

    if batch < 1:
        raise UsageError(f"--batch {batch}: must be at least 1")
    if not out.lower().endswith(".npz"):
        raise UsageError(f"--out {out}: reference statistics are written as .npz; end the name with .npz")
    if Path(out).is_dir():
        raise UsageError(f"--out {out}: is a folder; give a file name ending in .npz")
    from scmctl.fileio import check_output_file

    check_output_file(out, "--out")  # before the hours of feature extraction, not after
    if features < 0:
        raise UsageError(f"--features {features}: must be >= 0")
    source = random_subset(open_data_images(data), num, seed, "-n")
    dev = select_device(device)
    det = load_detector(detector, mode, dev, _inception_path(inception, inception_weights),
                        dinov2_weights=dinov2, download=download)
    stats, kept = compute_reference(source, det, batch, features, seed)
    prov = save_reference(out, stats, det, data, kept, seed if features else None)
    summary = {"out": out, "count": stats.n, "dim": int(stats.mu.shape[0]), "features": 0 if kept is None else
               int(kept.shape[0]), "detector": detector, "detector_sha256": prov["detector_sha256"],
               "mode": prov["mode"], "data": data, "scmctl_version": prov["scmctl_version"]}
    if json_out:
        emit_json(summary)
    else:
        console.print(f"wrote {out}: {stats.n} images, {summary['dim']}-d statistics "
                      f"({det.describe()})", soft_wrap=True, markup=False)
        print(out)


# ------------------------------------------------------------------ eval fid / fd-dinov2

def _frechet(metric: str, label: str, samples, ref, detector, mode, inception, dinov2, download, num, seeds,
             repeat, steps, t_mid, guidance, solver, allow_small, json_out, batch, device) -> None:
    from scmctl.cli.common import emit_json
    from scmctl.metrics import MIN_SAMPLES
    from scmctl.metrics.evaluate import frechet_over_sets, summarize
    from scmctl.metrics.reference import Reference, check_dims, check_provenance, open_reference

    reference = open_reference(ref, "fd_dinov2" if detector == "dinov2" else "fid")
    sets, generator, det = _open(samples, detector=detector, mode=mode, inception=inception, dinov2=dinov2,
                                 download=download, device=device, batch=batch, num=num, seeds=seeds,
                                 repeat=repeat, steps=steps, t_mid=t_mid, guidance=guidance, solver=solver,
                                 min_samples=None if allow_small else MIN_SAMPLES, metric=label)
    if isinstance(reference, Reference):
        check_provenance(reference, det)
        if det.feature_dim is not None:
            check_dims(reference, det.feature_dim, det)  # fail before extraction when D is known up front
        _mode_note(ref, reference, det)
    _notes(sets, generator, det, label, fd=True)
    if not isinstance(reference, Reference):
        reference = reference.compute(det, batch)
    summary = summarize(frechet_over_sets(sets, reference, det, batch))
    if json_out:
        emit_json(_record(metric, summary, sets=sets, generator=generator, detector=detector, det=det, ref=ref,
                          reference=reference, n_ref=reference.n, samples=samples))
        return
    against = f"{ref} ({reference.n} images)" if reference.n is not None else ref
    _print_line(f"{label} {summary['value']:.4f}  ({_values_text(summary, '.4f')}{len(sets[0])} samples vs "
                f"{against}; detector {detector}, mode {det.mode})")


def _mode_note(ref: str, reference, det) -> None:
    from scmctl.cli.common import console

    if det.name != "inception" or reference.provenance.get("mode"):
        return
    name = ref.lower()
    other = "clean" if det.mode == "legacy_tensorflow" else "legacy_tensorflow"
    if other in name and det.mode not in name:
        console.print(f"note: {ref} looks like {other} statistics but --mode is {det.mode}", soft_wrap=True,
                      markup=False)


@eval_app.command("fid")
def fid(
    samples: str = SAMPLES, ref: str = REF, detector: str = DETECTOR, mode: Optional[str] = MODE,
    inception: Optional[str] = INCEPTION, inception_weights: Optional[str] = INCEPTION_OLD,
    dinov2: Optional[str] = DINOV2, num: Optional[int] = NUM, seeds: Optional[str] = SEEDS,
    repeat: int = REPEAT, steps: Optional[int] = STEPS, t_mid: Optional[float] = T_MID,
    guidance: float = GUIDANCE, solver: Optional[str] = SOLVER, allow_small: bool = ALLOW_SMALL,
    json_out: bool = JSON, batch: int = BATCH, device: str = DEVICE, download: bool = DOWNLOAD,
) -> None:
    """FID of SAMPLES against REF (Fréchet distance of detector features; 50,000 samples)."""
    _frechet("fd_dinov2" if detector == "dinov2" else "fid", "FD_DINOv2" if detector == "dinov2" else "FID",
             samples, ref, detector, mode, _inception_path(inception, inception_weights), dinov2, download, num,
             seeds, repeat, steps, t_mid, guidance, solver, allow_small, json_out, batch, device)


@eval_app.command("fd-dinov2")
def fd_dinov2(
    samples: str = SAMPLES, ref: str = REF, dinov2: Optional[str] = DINOV2, num: Optional[int] = NUM,
    seeds: Optional[str] = SEEDS, repeat: int = REPEAT, steps: Optional[int] = STEPS,
    t_mid: Optional[float] = T_MID, guidance: float = GUIDANCE, solver: Optional[str] = SOLVER,
    allow_small: bool = ALLOW_SMALL, json_out: bool = JSON, batch: int = BATCH, device: str = DEVICE,
    download: bool = DOWNLOAD,
) -> None:
    """FD_DINOv2 of SAMPLES against REF (EDM2: DINOv2 ViT-L/14 features at 224², 50,000 samples)."""
    _frechet("fd_dinov2", "FD_DINOv2", samples, ref, "dinov2", None, None, dinov2, download, num, seeds, repeat,
             steps, t_mid, guidance, solver, allow_small, json_out, batch, device)


# ------------------------------------------------------------------ eval kid / pr

@eval_app.command("kid")
def kid(
    samples: str = SAMPLES, ref: str = REF, detector: str = DETECTOR, mode: Optional[str] = MODE,
    inception: Optional[str] = INCEPTION, inception_weights: Optional[str] = INCEPTION_OLD,
    dinov2: Optional[str] = DINOV2, num: Optional[int] = NUM, seeds: Optional[str] = SEEDS,
    repeat: int = REPEAT, steps: Optional[int] = STEPS, t_mid: Optional[float] = T_MID,
    guidance: float = GUIDANCE, solver: Optional[str] = SOLVER,
    n_ref: Optional[int] = typer.Option(None, "--n-ref", help="Reference images: a random subset of N (default all)."),
    subsets: int = typer.Option(100, "--subsets", help="Number of random subsets."),
    subset_size: int = typer.Option(1000, "--subset-size", help="Images per subset (capped by both set sizes)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the subsets (and of --n-ref)."),
    json_out: bool = JSON, batch: int = BATCH, device: str = DEVICE, download: bool = DOWNLOAD,
) -> None:
    """KID of SAMPLES against REF: unbiased MMD² with a cubic kernel, mean ± std over random subsets."""
    from scmctl.cli.common import emit_json
    from scmctl.metrics.evaluate import kid_over_sets, summarize
    from scmctl.metrics.reference import reference_features

    if subsets < 1 or subset_size < 2:
        raise UsageError("--subsets must be >= 1 and --subset-size >= 2")
    sets, generator, det = _open(samples, detector=detector, mode=mode,
                                 inception=_inception_path(inception, inception_weights), dinov2=dinov2,
                                 download=download, device=device, batch=batch, num=num, seeds=seeds,
                                 repeat=repeat, steps=steps, t_mid=t_mid, guidance=guidance, solver=solver)
    _notes(sets, generator, det, "KID", fd=False)
    feats, reference = reference_features(ref, det, batch, n_ref, seed)
    results = kid_over_sets(sets, feats, det, batch, subsets, subset_size, seed)
    summary = summarize([m for m, _ in results])
    summary["std"] = [s for _, s in results]
    if json_out:
        rec = _record("kid", summary, sets=sets, generator=generator, detector=detector, det=det, ref=ref,
                      reference=reference, n_ref=int(feats.shape[0]), samples=samples)
        rec.update(subsets=subsets, subset_size=min(subset_size, len(sets[0]), feats.shape[0]), seed=seed)
        emit_json(rec)
        return
    i = summary["values"].index(summary["value"])
    _print_line(f"KID {summary['value']:.6f} ± {summary['std'][i]:.6f}  ({_values_text(summary, '.6f')}"
                f"{len(sets[0])} samples vs {feats.shape[0]} reference images of {ref}; {subsets} subsets; "
                f"detector {detector}, mode {det.mode})")


@eval_app.command("pr")
def pr(
    samples: str = SAMPLES, ref: str = REF, detector: str = DETECTOR, mode: Optional[str] = MODE,
    inception: Optional[str] = INCEPTION, inception_weights: Optional[str] = INCEPTION_OLD,
    dinov2: Optional[str] = DINOV2, num: Optional[int] = NUM, seeds: Optional[str] = SEEDS,
    repeat: int = REPEAT, steps: Optional[int] = STEPS, t_mid: Optional[float] = T_MID,
    guidance: float = GUIDANCE, solver: Optional[str] = SOLVER,
    n_ref: Optional[int] = typer.Option(10000, "--n-ref", help="Reference images: a random subset of N "
                                                               "(all when fewer exist)."),
    k: int = typer.Option(3, "--k", help="k-th nearest neighbour radius."),
    seed: int = typer.Option(0, "--seed", help="Seed of the --n-ref subset."),
    json_out: bool = JSON, batch: int = BATCH, device: str = DEVICE, download: bool = DOWNLOAD,
) -> None:
    """Improved precision and recall (Kynkäänniemi et al. 2019, k = 3) of SAMPLES against REF."""
    from scmctl.cli.common import emit_json
    from scmctl.metrics.evaluate import pr_over_sets, summarize
    from scmctl.metrics.reference import reference_features

    if k < 1:
        raise UsageError(f"--k {k}: must be >= 1")
    sets, generator, det = _open(samples, detector=detector, mode=mode,
                                 inception=_inception_path(inception, inception_weights), dinov2=dinov2,
                                 download=download, device=device, batch=batch, num=num, seeds=seeds,
                                 repeat=repeat, steps=steps, t_mid=t_mid, guidance=guidance, solver=solver)
    _notes(sets, generator, det, "precision/recall", fd=False)
    # --n-ref caps the reference: a smaller one is used whole
    feats, reference = reference_features(ref, det, batch, n_ref, seed, at_most=True)
    results = pr_over_sets(sets, feats, det, batch, k)
    precision = summarize([p for p, _ in results], best="mean")
    recall = summarize([r for _, r in results], best="mean")
    if json_out:
        rec = _record("pr", {}, sets=sets, generator=generator, detector=detector, det=det, ref=ref,
                      reference=reference, n_ref=int(feats.shape[0]), samples=samples)
        rec = {"metric": "pr", "precision": precision, "recall": recall, **{x: v for x, v in rec.items() if x != "metric"}}
        rec["k"] = k
        emit_json(rec)
        return
    sets_text = f"mean of {len(sets)} sets; " if len(sets) > 1 else ""
    _print_line(f"precision {precision['value']:.4f}  recall {recall['value']:.4f}  ({sets_text}{len(sets[0])} "
                f"samples vs {feats.shape[0]} reference images of {ref}; k = {k}; detector {detector}, "
                f"mode {det.mode})")
