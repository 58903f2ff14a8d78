"""Checkpoints: state dicts plus the resolved config, written atomically, loaded without pickle code.

A checkpoint is a `torch.save`d dict of tensors and plain Python values:
    {"format": "scmctl-checkpoint", "version": 1, "kind": "consistency" | "diffusion",
     "step": int, "config": dict, "net": state_dict, "ema": state_dict,
     "optimizer": state_dict, "rng": {...}}
sCD + aVSD runs add "vsd_fake", "vsd_fake_optimizer", "vsd_weight_head", "vsd_weight_head_optimizer"
(:data:`VSD_KEYS`).
A post-hoc EMA (``scmctl ema``, :mod:`scmctl.training.phema`) has "ema" but no "net" and no
"optimizer", plus "posthoc_ema" (σ_rel, snapshots and their coefficients).
It is loaded with ``torch.load(weights_only=True)``: a file that carries any other pickled object
(code payloads included) is refused before anything in it runs.
"""

from __future__ import annotations

import os
import pickle
import re
import sys
from pathlib import Path
from typing import Any, Callable

import torch

from scmctl.fileio import write_atomic

from scmctl.errors import UsageError

FORMAT = "scmctl-checkpoint"
VERSION = 1
CKPT_RE = re.compile(r"^checkpoint-(\d+)\.pt$")


def save_atomic(obj: Any, path: str | os.PathLike) -> None:
    """torch.save to a temporary file in the same folder, fsync, then rename over `path`."""
    write_atomic(path, lambda f: torch.save(obj, f))


def checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """A run directory's checkpoints, oldest first."""
    run_dir = Path(run_dir)
    found = [(int(m.group(1)), p) for p in run_dir.glob("checkpoint-*.pt") if (m := CKPT_RE.match(p.name))]
    return [p for _, p in sorted(found)]


def latest(run_dir: str | os.PathLike) -> Path | None:
    c = checkpoints(run_dir)
    return c[-1] if c else None


def load_resumable(run_dir: str | os.PathLike, usable: Callable[[int], str | None] = lambda step: None,
                   map_location: str | torch.device = "cpu", mmap: bool = False) -> dict | None:
    """The newest checkpoint of a run directory that loads and that ``usable(step)`` accepts (it
    returns None, or why not), or None when there is none. A checkpoint that cannot be used (torn by
    a crash on a file system without atomic rename, a disk error, NaN weights, ahead of the stats
    log) is skipped with a one-line warning on stderr, and the one before it is tried."""
    skipped = False
    for p in reversed(checkpoints(run_dir)):
        try:
            ckpt = load(p, map_location=map_location, mmap=mmap)
        except UsageError as e:
            why = str(e).removeprefix(f"{p}: ")
        else:
            why = usable(int(ckpt["step"]))
            if why is None:
                if skipped:
                    print(f"warning: resuming from {p} instead", file=sys.stderr)
                return ckpt
            del ckpt
        print(f"warning: skipping {p} ({why[:200]})", file=sys.stderr)
        skipped = True
    if skipped:
        print(f"warning: no usable checkpoint in {run_dir}; starting over from step 0", file=sys.stderr)
    return None


def resolve_path(path: str | os.PathLike) -> Path:
    """A checkpoint file, or a run directory's latest checkpoint."""
    p = Path(path)
    if p.is_dir():
        c = latest(p)
        if c is None:
            raise UsageError(f"{p}: run directory has no checkpoint-*.pt yet")
        return c
    if not p.exists():
        raise UsageError(f"{p}: no such checkpoint or run directory")
    return p


def load(path: str | os.PathLike, map_location: str | torch.device = "cpu", mmap: bool = False) -> dict:
    """Load a checkpoint safely (weights_only); any non-scmctl or unsafe file is a UsageError.
    mmap=True maps the file instead of reading it (processes of one node share the pages)."""
    p = resolve_path(path)
    try:
        ckpt = torch.load(p, map_location=map_location, weights_only=True, mmap=mmap)  # safe: tensors/plain data only
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise UsageError(f"{p}: refused to load: the file holds pickled objects other than tensors "
                         f"and plain data ({first[:120]})") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise UsageError(f"{p}: not a readable checkpoint ({str(e).splitlines()[0][:160] if str(e) else e.__class__.__name__})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise UsageError(f"{p}: not an scmctl checkpoint")
    if ckpt.get("version", 0) > VERSION:
        raise UsageError(f"{p}: checkpoint version {ckpt.get('version')} is newer than this scmctl")
    check_contents(ckpt, p)
    ckpt["path"] = str(p)
    return ckpt


KINDS = ("consistency", "diffusion")
# sCD + aVSD (scmctl.losses_vsd): the fake score model, the weighting head w_ψ and their optimizers
VSD_KEYS = ("vsd_fake", "vsd_fake_optimizer", "vsd_weight_head", "vsd_weight_head_optimizer")
REQUIRED = {"kind": str, "step": int, "config": dict, "net": dict, "ema": dict}


def check_contents(ckpt: dict, where: str | os.PathLike) -> None:
    """Refuse at load what would otherwise sample garbage later: a missing or mistyped entry, an
    unknown ``kind``, a weight that is not a tensor or not finite (NaN weights give black images).
    A post-hoc EMA reconstruction (``scmctl ema``) holds EMA weights only: no 'net' entry."""
    required = {k: tp for k, tp in REQUIRED.items() if not (k == "net" and "posthoc_ema" in ckpt)}
    for key, tp in required.items():
        if key not in ckpt:
            raise UsageError(f"{where}: checkpoint has no '{key}' entry (damaged or not written by scmctl train)")
        if not isinstance(ckpt[key], tp) or isinstance(ckpt[key], bool):
            raise UsageError(f"{where}: checkpoint entry '{key}' is a {type(ckpt[key]).__name__}, not a {tp.__name__}")
    if ckpt["kind"] not in KINDS:
        raise UsageError(f"{where}: unknown checkpoint kind '{ckpt['kind'][:40]}' (expected {' or '.join(KINDS)})")
    if ckpt["step"] < 0:
        raise UsageError(f"{where}: checkpoint step {ckpt['step']} is negative")
    for key in VSD_KEYS:
        if key in ckpt and not isinstance(ckpt[key], dict):
            raise UsageError(f"{where}: checkpoint entry '{key}' is a {type(ckpt[key]).__name__}, not a dict")
    for part in ("net", "ema", "vsd_fake", "vsd_weight_head"):
        for name, value in ckpt.get(part, {}).items():
            if not isinstance(value, torch.Tensor):
                raise UsageError(f"{where}: '{part}' entry {name} is not a tensor")
            if value.is_floating_point() and not bool(torch.isfinite(value).all()):
                raise UsageError(f"{where}: weight {part}.{name} holds NaN or Inf; the checkpoint is unusable "
                                 "(resume from an earlier one)")


def load_state(module: torch.nn.Module, state: dict, where: str, allow_missing: tuple[str, ...] = ()) -> None:
    """Load a state dict strictly; a checkpoint of another architecture is a clear UsageError.
    Keys starting with a prefix in `allow_missing` may be absent (e.g. a student's guidance input)."""
    own = module.state_dict()
    missing = [k for k in own if k not in state and not k.startswith(allow_missing)]
    unexpected = [k for k in state if k not in own]
    shapes = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        parts = []
        if shapes:
            k = shapes[0]
            parts.append(f"{len(shapes)} shape mismatches (e.g. {k}: {tuple(state[k].shape)} vs {tuple(own[k].shape)})")
        if missing:
            parts.append(f"{len(missing)} missing keys (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[0]})")
        raise UsageError(f"{where}: checkpoint is for a different network architecture: " + "; ".join(parts))
    module.load_state_dict(state, strict=False)


def optimizer_state_by_name(state: dict, names: list[str]) -> dict:
    """An ``optimizer.state_dict()`` (parameters numbered 0..N−1 in ``named_parameters()`` order,
    the checkpoint format) keyed by parameter name instead (torch.distributed.checkpoint's format)."""
    return {"state": {names[i]: v for i, v in state["state"].items()},
            "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in state["param_groups"]]}


def optimizer_state_by_index(state: dict, names: list[str]) -> dict:
    """The inverse of :func:`optimizer_state_by_name`."""
    index = {n: i for i, n in enumerate(names)}
    return {"state": {index[k]: v for k, v in state["state"].items()},
            "param_groups": [{**g, "params": [index[k] for k in g["params"]]} for g in state["param_groups"]]}


def prune(run_dir: str | os.PathLike, keep: int) -> None:
    """Delete all but the newest `keep` checkpoints (keep = 0: keep all)."""
    if keep <= 0:
        return
    for p in checkpoints(run_dir)[:-keep]:
        p.unlink(missing_ok=True)


def network_from_checkpoint(ckpt: dict, weights: str = "ema", device: str | torch.device = "cpu"):
    """Build the checkpoint's network (from its saved config) with its EMA (or raw) weights, in
    eval mode without gradients."""
    from scmctl.config import from_dict
    from scmctl.nn.networks import build_network

    cfg = from_dict(ckpt["config"])
    net = build_network(cfg.network, device)
    if weights not in ("ema", "raw"):
        raise UsageError(f"--weights must be 'ema' or 'raw', got '{weights}'")
    if weights == "raw" and "net" not in ckpt:
        raise UsageError(f"{ckpt.get('path', 'checkpoint')}: holds EMA weights only (a post-hoc EMA); drop --weights raw")
    load_state(net, ckpt["ema" if weights == "ema" else "net"], ckpt.get("path", "checkpoint"))
    return net.eval().requires_grad_(False)
