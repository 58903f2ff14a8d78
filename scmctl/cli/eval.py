"""`scmctl eval ref|fid|fd-dinov2|kid|pr`: reference statistics and paper-protocol metrics.

Options are parsed and checked here (cheap checks before any feature is extracted); the work is
in :mod:`scmctl.metrics` (sources, detectors, references, :mod:`scmctl.metrics.evaluate`). The
metric commands share one options object (:class:`EvalOptions`, added to each command by
:func:`eval_options`) and one driver (:func:`_evaluate`) that runs a metric on SAMPLES or, with
``--checkpoints``, on each selected checkpoint of a run (cached: :mod:`scmctl.metrics.history`).
"""

from __future__ import annotations

import functools
import inspect
import typing
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Callable, Optional

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


CHECKPOINTS = typer.Option(
    None, "--checkpoints", help="SAMPLES is a run directory: evaluate each of its checkpoints (all, last, or steps "
                                "500,1000) or its post-hoc EMAs from `scmctl ema` (ema); one row each, results "
                                "cached in RUN_DIR/metrics.json.")


@dataclass
class EvalOptions:
    """The options every metric command (fid, fd-dinov2, kid, pr) takes: the reference, the detector,
    which samples (count, seeds, sets, sampler settings of a generating checkpoint), output, device."""
    ref: str
    detector: str = "inception"
    mode: Optional[str] = None
    inception: Optional[str] = None
    inception_weights: Optional[str] = None
    dinov2: Optional[str] = None
    download: bool = False
    num: Optional[int] = None
    seeds: Optional[str] = None
    repeat: int = 1
    steps: Optional[int] = None
    t_mid: Optional[float] = None
    guidance: float = 1.0
    solver: Optional[str] = None
    checkpoints: Optional[str] = None
    json_out: bool = False
    batch: int = 64
    device: str = "auto"

    def settings(self) -> dict:
        """Everything here that changes a metric's value (a cache key's part)."""
        return {f.name: getattr(self, f.name) for f in fields(self)
                if f.name not in ("checkpoints", "json_out", "batch", "device", "download", "inception_weights")}


# Each shared option's command-line form: the typer default of the parameter named like the field.
_OPTION_INFO = {"ref": REF, "detector": DETECTOR, "mode": MODE, "inception": INCEPTION,
                "inception_weights": INCEPTION_OLD, "dinov2": DINOV2, "download": DOWNLOAD, "num": NUM,
                "seeds": SEEDS, "repeat": REPEAT, "steps": STEPS, "t_mid": T_MID, "guidance": GUIDANCE,
                "solver": SOLVER, "checkpoints": CHECKPOINTS, "json_out": JSON, "batch": BATCH, "device": DEVICE}


def eval_options(**fixed) -> Callable:
    """Decorator: the command's CLI gets every :class:`EvalOptions` field not in `fixed` as an option
    (after its own parameters) and the function receives them as one `opts` keyword argument."""
    hints = typing.get_type_hints(EvalOptions)

    def decorate(fn: Callable) -> Callable:
        own_hints = typing.get_type_hints(fn)
        own = [p.replace(annotation=own_hints.get(p.name, p.annotation))
               for p in inspect.signature(fn).parameters.values() if p.name != "opts"]
        shared = [inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=_OPTION_INFO[f.name],
                                    annotation=hints[f.name]) for f in fields(EvalOptions) if f.name not in fixed]

        @functools.wraps(fn)
        def command(**kwargs):
            opts = EvalOptions(**fixed, **{f.name: kwargs.pop(f.name) for f in fields(EvalOptions) if f.name not in fixed})
            return fn(opts=opts, **kwargs)

        command.__signature__ = inspect.Signature(own + shared)
        command.__annotations__ = {p.name: p.annotation for p in own + shared}
        del command.__wrapped__  # typer must read the signature above, not fn's
        return command

    return decorate


def _inception_path(inception: Optional[str], old: Optional[str]) -> Optional[str]:
    if inception is not None and old is not None and inception != old:
        raise UsageError("--inception and --inception-weights name different files; pass one")
    return inception if inception is not None else old


def _sets(samples: str, opts: EvalOptions, dev, min_samples: int | None, label: str):
    """The evaluated sets of SAMPLES and their generator (None for files); too few samples for a
    Fréchet distance is an error unless allowed."""
    from scmctl.metrics import MIN_SAMPLES
    from scmctl.metrics.sources import sample_sets

    sets, generator = sample_sets(samples, n=opts.num, seeds=opts.seeds, repeat=opts.repeat, default_n=MIN_SAMPLES,
                                  generator_options=dict(steps=opts.steps, t_mid=opts.t_mid, guidance=opts.guidance,
                                                         solver=opts.solver, device=dev))
    n = len(sets[0])
    if min_samples is not None and n < min_samples:
        raise UsageError(f"{samples}: {n} samples; {label} needs {min_samples:,} for numbers comparable to "
                         "papers (pass --allow-small to compute it anyway)")
    return sets, generator


def _detector(opts: EvalOptions, dev):
    from scmctl.metrics import load_detector

    return load_detector(opts.detector, opts.mode, dev, _inception_path(opts.inception, opts.inception_weights),
                         dinov2_weights=opts.dinov2, download=opts.download)


@dataclass
class _Metric:
    """One metric as the driver runs it. prepare(det) -> the reference side, computed once;
    compute(samples, sets, generator, det, prepared) -> (JSON record, human line); value_text(record)
    -> the value column of a table row; settings: its own options (part of the cache key)."""
    name: str
    label: str
    prepare: Callable
    compute: Callable
    value_text: Callable
    settings: dict
    min_samples: int | None = None
    fd: bool = False


def _evaluate(samples: str, opts: EvalOptions, metric: _Metric) -> None:
    """Run `metric` on SAMPLES (one record) or on each checkpoint selected by --checkpoints (one row
    each, cached in the run directory by checkpoint sha256 and settings)."""
    from scmctl.cli.common import emit_json
    from scmctl.devices import select_device

    if opts.batch < 1:
        raise UsageError(f"--batch {opts.batch}: must be at least 1")
    dev = select_device(opts.device)
    if opts.checkpoints is None:
        sets, generator = _sets(samples, opts, dev, metric.min_samples, metric.label)
        det = _detector(opts, dev)
        prepared = metric.prepare(det)
        _notes(sets, generator, det, metric.label, fd=metric.fd)
        record, line = metric.compute(samples, sets, generator, det, prepared)
        if opts.json_out:
            emit_json(record)
        else:
            _print_line(line)
        return
    rows = _over_checkpoints(samples, opts, metric, dev)
    if opts.json_out:
        emit_json(rows)
        return
    _print_line(f"{'step':>8} {'kimg':>9} {'sigma_rel':>9}  {metric.label:<12} seeds")
    for r in rows:
        sigma = "" if r["sigma_rel"] is None else f"{r['sigma_rel']:.4f}"
        seeds = ", ".join(r["seeds"]) if r.get("seeds") else f"{r['n']} files"
        _print_line(f"{r['step']:>8} {r['kimg']:>9.1f} {sigma:>9}  {metric.value_text(r):<12} {seeds}"
                    f"{'  (cached)' if r['cached'] else ''}")


def _over_checkpoints(run_dir: str, opts: EvalOptions, metric: _Metric, dev) -> list[dict]:
    from scmctl.cli.common import console
    from scmctl.fileio import sha256_file
    from scmctl.metrics.history import MetricCache, cache_key, describe_checkpoint, select_checkpoints

    paths = select_checkpoints(run_dir, opts.checkpoints)
    infos = [describe_checkpoint(p) for p in paths]
    det = _detector(opts, dev)
    ref_path = Path(opts.ref)
    settings = {"metric": metric.name, **opts.settings(), **metric.settings, "detector_sha256": det.sha256(),
                "ref_sha256": sha256_file(ref_path) if ref_path.is_file() else None}
    cache = MetricCache(run_dir)
    keys = [cache_key(i["sha256"], settings) for i in infos]
    todo = [k for k in keys if cache.get(k) is None]
    console.print(f"{len(paths)} checkpoints: {len(paths) - len(todo)} cached, {len(todo)} to compute",
                  markup=False)
    prepared = metric.prepare(det) if todo else None
    rows = []
    for info, key in zip(infos, keys):
        row = cache.get(key)
        cached = row is not None
        if not cached:
            sets, generator = _sets(info["checkpoint"], opts, dev, metric.min_samples, metric.label)
            _notes(sets, generator, det, metric.label, fd=metric.fd)
            record, _ = metric.compute(info["checkpoint"], sets, generator, det, prepared)
            row = {**{k: info[k] for k in ("step", "kimg", "sigma_rel", "posthoc", "checkpoint", "sha256")}, **record}
            cache.put(key, row)
        rows.append({**row, "checkpoint": info["checkpoint"], "cached": cached})
    return rows


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


def _record(metric: str, summary: dict, *, sets, generator, opts: EvalOptions, det, reference,
            n_ref: int | None, samples: str) -> dict:
    from scmctl.metrics.reference import Reference
    from scmctl.metrics.sources import describe_seeds

    out = {"metric": metric, **summary, "n": len(sets[0]), "repeat": len(sets),
           "seeds": [describe_seeds(s.seeds) for s in sets] if generator is not None else None,
           "mode": det.mode, "detector": opts.detector, "detector_sha256": det.sha256(),
           "ref": opts.ref, "ref_sha256": reference.sha256 if isinstance(reference, Reference) else None}
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

def _frechet(samples: str, opts: EvalOptions, allow_small: bool) -> None:
    from scmctl.metrics import MIN_SAMPLES
    from scmctl.metrics.evaluate import frechet_over_sets, summarize
    from scmctl.metrics.reference import Reference, check_dims, check_provenance, open_reference

    name, label = ("fd_dinov2", "FD_DINOv2") if opts.detector == "dinov2" else ("fid", "FID")
    reference = open_reference(opts.ref, name)

    def prepare(det):
        if not isinstance(reference, Reference):
            return reference.compute(det, opts.batch)
        check_provenance(reference, det)
        if det.feature_dim is not None:
            check_dims(reference, det.feature_dim, det)  # fail before extraction when D is known up front
        _mode_note(opts.ref, reference, det)
        return reference

    def compute(samples, sets, generator, det, ref_stats):
        summary = summarize(frechet_over_sets(sets, ref_stats, det, opts.batch))
        record = _record(name, summary, sets=sets, generator=generator, opts=opts, det=det, reference=ref_stats,
                         n_ref=ref_stats.n, samples=samples)
        against = f"{opts.ref} ({ref_stats.n} images)" if ref_stats.n is not None else opts.ref
        return record, (f"{label} {summary['value']:.4f}  ({_values_text(summary, '.4f')}{len(sets[0])} samples vs "
                        f"{against}; detector {opts.detector}, mode {det.mode})")

    _evaluate(samples, opts, _Metric(name, label, prepare, compute, lambda r: f"{r['value']:.4f}", {},
                                     min_samples=None if allow_small else MIN_SAMPLES, fd=True))


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
@eval_options()
def fid(samples: str = SAMPLES, *, opts: EvalOptions, allow_small: bool = ALLOW_SMALL) -> None:
    """FID of SAMPLES against REF (Fréchet distance of detector features; 50,000 samples)."""
    _frechet(samples, opts, allow_small)


@eval_app.command("fd-dinov2")
@eval_options(detector="dinov2", mode=None, inception=None, inception_weights=None)
def fd_dinov2(samples: str = SAMPLES, *, opts: EvalOptions, allow_small: bool = ALLOW_SMALL) -> None:
    """FD_DINOv2 of SAMPLES against REF (EDM2: DINOv2 ViT-L/14 features at 224², 50,000 samples)."""
    _frechet(samples, opts, allow_small)


# ------------------------------------------------------------------ eval kid / pr

@eval_app.command("kid")
@eval_options()
def kid(
    samples: str = SAMPLES, *, opts: EvalOptions,
    n_ref: Optional[int] = typer.Option(None, "--n-ref", help="Reference images: a random subset of N (default all)."),
    subsets: int = typer.Option(100, "--subsets", help="Number of random subsets."),
    subset_size: int = typer.Option(1000, "--subset-size", help="Images per subset (capped by both set sizes)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the subsets (and of --n-ref)."),
) -> None:
    """KID of SAMPLES against REF: unbiased MMD² with a cubic kernel, mean ± std over random subsets."""
    from scmctl.metrics.evaluate import kid_over_sets, summarize
    from scmctl.metrics.reference import reference_features

    if subsets < 1 or subset_size < 2:
        raise UsageError("--subsets must be >= 1 and --subset-size >= 2")

    def compute(samples, sets, generator, det, prepared):
        feats, reference = prepared
        results = kid_over_sets(sets, feats, det, opts.batch, subsets, subset_size, seed)
        summary = summarize([m for m, _ in results])
        summary["std"] = [s for _, s in results]
        record = _record("kid", summary, sets=sets, generator=generator, opts=opts, det=det, reference=reference,
                         n_ref=int(feats.shape[0]), samples=samples)
        record.update(subsets=subsets, subset_size=min(subset_size, len(sets[0]), feats.shape[0]), seed=seed)
        i = summary["values"].index(summary["value"])
        return record, (f"KID {summary['value']:.6f} ± {summary['std'][i]:.6f}  ({_values_text(summary, '.6f')}"
                        f"{len(sets[0])} samples vs {feats.shape[0]} reference images of {opts.ref}; {subsets} "
                        f"subsets; detector {opts.detector}, mode {det.mode})")

    _evaluate(samples, opts, _Metric(
        "kid", "KID", lambda det: reference_features(opts.ref, det, opts.batch, n_ref, seed), compute,
        lambda r: f"{r['value']:.6f}", dict(n_ref=n_ref, subsets=subsets, subset_size=subset_size, seed=seed)))


@eval_app.command("pr")
@eval_options()
def pr(
    samples: str = SAMPLES, *, opts: EvalOptions,
    n_ref: Optional[int] = typer.Option(10000, "--n-ref", help="Reference images: a random subset of N "
                                                               "(all when fewer exist)."),
    k: int = typer.Option(3, "--k", help="k-th nearest neighbour radius."),
    seed: int = typer.Option(0, "--seed", help="Seed of the --n-ref subset."),
) -> None:
    """Improved precision and recall (Kynkäänniemi et al. 2019, k = 3) of SAMPLES against REF."""
    from scmctl.metrics.evaluate import pr_over_sets, summarize
    from scmctl.metrics.reference import reference_features

    if k < 1:
        raise UsageError(f"--k {k}: must be >= 1")

    def compute(samples, sets, generator, det, prepared):
        feats, reference = prepared
        results = pr_over_sets(sets, feats, det, opts.batch, k)
        precision = summarize([p for p, _ in results], best="mean")
        recall = summarize([r for _, r in results], best="mean")
        rec = _record("pr", {}, sets=sets, generator=generator, opts=opts, det=det, reference=reference,
                      n_ref=int(feats.shape[0]), samples=samples)
        record = {"metric": "pr", "precision": precision, "recall": recall,
                  **{x: v for x, v in rec.items() if x != "metric"}, "k": k}
        sets_text = f"mean of {len(sets)} sets; " if len(sets) > 1 else ""
        return record, (f"precision {precision['value']:.4f}  recall {recall['value']:.4f}  ({sets_text}"
                        f"{len(sets[0])} samples vs {feats.shape[0]} reference images of {opts.ref}; k = {k}; "
                        f"detector {opts.detector}, mode {det.mode})")

    # --n-ref caps the reference: a smaller one is used whole
    _evaluate(samples, opts, _Metric(
        "pr", "P / R", lambda det: reference_features(opts.ref, det, opts.batch, n_ref, seed, at_most=True), compute,
        lambda r: f"{r['precision']['value']:.4f} / {r['recall']['value']:.4f}", dict(n_ref=n_ref, k=k, seed=seed)))
