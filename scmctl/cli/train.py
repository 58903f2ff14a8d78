"""`scmctl train` (sCT, or the diffusion teacher) and `scmctl distill` (sCD)."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from scmctl.cli import app
from scmctl.cli.common import console, emit_json
from scmctl.errors import UsageError
from scmctl.fileio import check_output_dir

# Fields that may change between the first call and a resuming call on the same run directory.
# The scale-out fields never change the optimization (train.batch does): a run may resume on
# another number of GPUs, or with DDP instead of FSDP2 (the checkpoint format is the same).
RESUMABLE_CHANGES = ("train.steps", "train.log_every", "train.checkpoint_every", "train.grid_every",
                     "train.keep_checkpoints", "train.device", "train.batch_per_gpu",
                     "train.parallel", "train.compile", "train.check_grads_every", "train.phema_", "sample.",
                     # the run's config records what these scale-out fields made of them (both jvp
                     # modes compute the same loss; every attention backend the same attention)
                     "loss.jvp_mode", "network.attention_backend")

# `scmctl train --objective X` trains config method OBJECTIVE_METHODS[X] (distill is method scd).
OBJECTIVE_METHODS = {"consistency": "sct", "diffusion": "diffusion"}

PRESET = typer.Option("tiny", "--preset", help="Preset name (see presets/) or a YAML file.")
DATA = typer.Option(None, "--data", help="Dataset: image folder, cifar-10-python.tar.gz, .npz/.npy; default: the preset's (tiny: built-in digits).")
RUN_DIR = typer.Option(None, "--run-dir", help="Run directory; re-running on an existing one resumes. Default: runs/PRESET-METHOD.")
INIT = typer.Option(None, "--init", help="Start from this checkpoint's (or run directory's) EMA weights.")
STEPS = typer.Option(None, "--steps", help="Total training steps (train.steps).")
BATCH = typer.Option(None, "--batch", help="Global batch size (train.batch).")
SEED = typer.Option(None, "--seed", help="Random seed (train.seed).")
SET = typer.Option([], "--set", help="Override a config field: --set train.lr=1e-4 (repeatable).")
DRY = typer.Option(False, "--dry-run", help="Print the resolved config and parameter count, then exit.")
JSON = typer.Option(False, "--json", help="Print exactly one JSON object on stdout.")


@app.command("train")
def train_cmd(preset: str = PRESET, data: Optional[str] = DATA, run_dir: Optional[Path] = RUN_DIR,
              objective: str = typer.Option("consistency", "--objective",
                                            help="consistency (sCT) or diffusion (the teacher)."),
              init: Optional[str] = INIT, steps: Optional[int] = STEPS, batch: Optional[int] = BATCH,
              seed: Optional[int] = SEED, set_: List[str] = SET, dry_run: bool = DRY,
              json_out: bool = JSON) -> None:
    """Consistency training (sCT), or the TrigFlow diffusion teacher with --objective diffusion."""
    if objective not in OBJECTIVE_METHODS:
        raise UsageError(f"--objective must be one of {', '.join(OBJECTIVE_METHODS)}, got '{objective}'")
    method = OBJECTIVE_METHODS[objective]
    _run(method, preset=preset, data=data, run_dir=run_dir, init=init, teacher=None, steps=steps, batch=batch,
         seed=seed, overrides=set_, dry_run=dry_run, json_out=json_out)


@app.command("distill")
def distill_cmd(teacher: str = typer.Option(..., "--teacher", help="Teacher checkpoint or run directory (a diffusion model)."),
                preset: str = PRESET, data: Optional[str] = DATA, run_dir: Optional[Path] = RUN_DIR,
                init: Optional[str] = INIT, steps: Optional[int] = STEPS, batch: Optional[int] = BATCH,
                seed: Optional[int] = SEED, set_: List[str] = SET, dry_run: bool = DRY,
                json_out: bool = JSON) -> None:
    """Consistency distillation (sCD) from a diffusion teacher (student starts from its EMA weights)."""
    _run("scd", preset=preset, data=data, run_dir=run_dir, init=init, teacher=teacher, steps=steps, batch=batch,
         seed=seed, overrides=set_, dry_run=dry_run, json_out=json_out)


def _run(method: str, *, preset: str, data: Optional[str], run_dir: Optional[Path], init: Optional[str],
         teacher: Optional[str], steps: Optional[int], batch: Optional[int], seed: Optional[int],
         overrides: List[str], dry_run: bool, json_out: bool) -> None:
    """Resolve the config (once), then dry-run or train; the options as the command line gave them."""
    from scmctl import config as config_mod
    from scmctl import distributed
    from scmctl.training.parallel import check_scaleout
    from scmctl.training.run_config import load_data, resolve_for_run, start_weights

    teacher_ckpt = _load_ckpt(teacher) if teacher is not None else None
    init_ckpt = _load_ckpt(init) if init is not None else None
    fields = {"train.steps": steps, "train.batch": batch, "train.seed": seed, "data.path": data,
              "teacher": teacher_ckpt and teacher_ckpt["path"], "init": init_ckpt and init_ckpt["path"]}
    if teacher_ckpt is not None:
        if teacher_ckpt["kind"] != "diffusion":
            raise UsageError(f"--teacher {teacher}: is a {teacher_ckpt['kind']} model; sCD needs a "
                             "diffusion teacher (scmctl train --objective diffusion)")
        if data is None and not any(o.startswith("data.") for o in overrides):
            for k, v in teacher_ckpt["config"]["data"].items():  # the teacher's data by default
                fields[f"data.{k}"] = "null" if v is None else v  # (None would mean "not given")
    cfg = config_mod.resolve(preset, method, overrides, **fields)
    world = distributed.world_size()
    check_scaleout(cfg, world)  # before any data is read or process group made

    dims_known = None not in (cfg.network.resolution, cfg.network.channels, cfg.network.num_classes)
    if cfg.data.path is None and not (dry_run and dims_known):
        raise UsageError(f"preset '{preset}' names no dataset: pass --data PATH (an image folder, "
                         "cifar-10-python.tar.gz, .npz/.npy, a folder made by scmctl data), or "
                         "--data digits for the built-in digits")
    dataset = None if (dry_run and dims_known) else load_data(cfg)
    cfg, notes = resolve_for_run(cfg, world=world, device=cfg.train.device, dataset=dataset,
                                 source=init_ckpt or teacher_ckpt, teacher=teacher_ckpt,
                                 set_keys=[o.split("=", 1)[0].strip() for o in overrides])

    from scmctl.nn.networks import count_parameters

    params = count_parameters(cfg.network)
    if dry_run:
        if json_out:
            emit_json({"config": cfg.to_dict(), "params": params})
        else:
            print(cfg.to_yaml(), end="")
            console.print(f"parameters: {params:,}")
        return

    run_dir = Path(run_dir) if run_dir is not None else Path("runs") / f"{Path(preset).stem}-{method}"
    check_output_dir(run_dir, "--run-dir")  # before the dataset and the network, not at the first checkpoint
    _check_resume(run_dir, cfg)

    from scmctl.training.loop import train
    from scmctl.training.run_dir import last_stats

    teacher_net = _network_from(teacher_ckpt) if teacher_ckpt is not None else None
    source = init_ckpt or teacher_ckpt
    init_state = start_weights(source["ema"], cfg.network, source["config"]["network"]) if source else None
    # Under torchrun: one process group for the run; only rank 0 prints, writes and reports.
    dist = distributed.init(cfg.train.device) if distributed.launched() else None
    main = dist is None or dist.is_main
    try:
        if main:
            net = cfg.network
            procs = f", {dist.world} processes" if dist is not None else ""
            console.print(f"[bold]{method}[/bold] on {dataset.source}: {len(dataset)} examples "
                          f"{(net.channels, net.resolution, net.resolution)}, {params:,} parameters"
                          f"{procs}, run directory {run_dir}")
            for note in notes:
                console.print(note)
        summary = train(cfg, run_dir, dataset, teacher=teacher_net, init_state=init_state,
                        show_progress=main, dist=dist)
    finally:
        if dist is not None:
            distributed.shutdown()
    if not main:
        return
    summary.update({"params": params, "loss": last_stats(run_dir).get("loss")})
    if summary.get("stopped_early"):
        console.print(f"stopped at step {summary['steps']} of {cfg.train.steps}; "
                      "re-run the same command to resume")
    if json_out:
        emit_json(summary)
    else:
        print(f"run directory: {summary['run_dir']}")
        if summary.get("grid"):
            print(f"sample grid: {summary['grid']}")
        print(f"checkpoint: {summary['checkpoint']}")


def _load_ckpt(path: str) -> dict:
    from scmctl.training import checkpoint as ckpt_io

    return ckpt_io.load(path)


def _network_from(ckpt: dict):
    from scmctl.training.checkpoint import network_from_checkpoint

    return network_from_checkpoint(ckpt)


def _check_resume(run_dir: Path, cfg) -> None:
    from scmctl import config as config_mod

    saved = run_dir / "config.yaml"
    if not saved.exists():
        if run_dir.exists() and any(run_dir.glob("checkpoint-*.pt")):
            raise UsageError(f"{run_dir}: has checkpoints but no config.yaml; use a new --run-dir")
        return
    import yaml

    try:
        old = config_mod.from_dict(yaml.safe_load(saved.read_text(encoding="utf-8")) or {})
    except UsageError as e:
        raise UsageError(f"{saved}: {e}") from None
    except (yaml.YAMLError, UnicodeDecodeError, RecursionError, OSError) as e:
        raise UsageError(f"{saved}: unreadable ({e.__class__.__name__}); restore it or use a new --run-dir") from None
    changed = config_mod.diff(old, cfg, ignore=RESUMABLE_CHANGES)
    if changed:
        k = changed[0]
        o = config_mod.flatten(old.to_dict())[k]
        nw = config_mod.flatten(cfg.to_dict())[k]
        raise UsageError(f"{run_dir} was started with a different config ({k}: {o!r} -> {nw!r}"
                         f"{f' and {len(changed) - 1} more' if len(changed) > 1 else ''}); "
                         "resume with the same options or use a new --run-dir")
