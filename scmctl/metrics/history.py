"""Metrics over a run's checkpoints, cached in the run directory (``scmctl eval ... --checkpoints``).

A user picks the checkpoint and the EMA length by evaluating many of them: every regular
checkpoint, or the post-hoc EMAs written by ``scmctl ema`` (``RUN_DIR/ema/``). Each result is
stored in ``RUN_DIR/metrics.json`` under a key made of the checkpoint's sha256 and every setting
that changes the number (metric, reference, detector, seeds, sampler options), so a re-run
computes only checkpoints it has not seen. ``scmctl plot`` draws the history from the same file.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from scmctl.errors import UsageError
from scmctl.fileio import sha256_file, write_json_atomic
from scmctl.training import checkpoint as ckpt_io
from scmctl.training.phema import POSTHOC_DIR

CACHE_FILE = "metrics.json"
CACHE_VERSION = 1
SELECTIONS = ("all", "last", "ema")


def select_checkpoints(run_dir: str | os.PathLike, spec: str) -> list[Path]:
    """``all`` | ``last`` | ``ema`` (the post-hoc EMAs in RUN_DIR/ema/) | ``STEP,STEP,...``."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UsageError(f"--checkpoints needs SAMPLES to be a run directory; {run_dir} is not a folder")
    found = ckpt_io.checkpoints(run_dir)
    if spec == "all":
        paths = found
    elif spec == "last":
        paths = found[-1:]
    elif spec == "ema":
        paths = sorted((run_dir / POSTHOC_DIR).glob("*.pt"))
        if not paths:
            raise UsageError(f"--checkpoints ema: {run_dir / POSTHOC_DIR} holds no post-hoc EMA checkpoints; "
                             f"write them with scmctl ema {run_dir} --sigma-rel 0.05,0.1")
    else:
        by_step = {ckpt_step(p): p for p in found}
        paths = []
        for part in spec.split(","):
            try:
                step = int(part)
            except ValueError:
                raise UsageError(f"--checkpoints {spec}: expected all, last, ema or steps like 500,1000") from None
            if step not in by_step:
                have = ", ".join(str(s) for s in by_step) or "none"
                raise UsageError(f"--checkpoints: {run_dir} has no checkpoint at step {step} (have: {have})")
            paths.append(by_step[step])
    if not paths:
        raise UsageError(f"--checkpoints {spec}: {run_dir} has no checkpoint-*.pt yet")
    return paths


def ckpt_step(path: Path) -> int:
    return int(ckpt_io.CKPT_RE.match(path.name).group(1))


def describe_checkpoint(path: Path) -> dict:
    """step, kimg, the EMA's σ_rel (the post-hoc one, else the run's) and the file's sha256."""
    ckpt = ckpt_io.load(path, mmap=True)
    cfg = ckpt["config"]
    post = ckpt.get("posthoc_ema")
    step = int(ckpt["step"])
    return {"checkpoint": str(path), "sha256": sha256_file(path), "step": step,
            "kimg": post["kimg"] if post else step * cfg["train"]["batch"] / 1000,
            "sigma_rel": post["sigma_rel"] if post else cfg["train"].get("ema_sigma_rel"),
            "posthoc": post is not None}


def cache_key(checkpoint_sha256: str, settings: dict) -> str:
    text = json.dumps({"checkpoint": checkpoint_sha256, **settings}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


class MetricCache:
    """RUN_DIR/metrics.json: {"version", "entries": {key: row}}; every put rewrites it atomically."""

    def __init__(self, run_dir: str | os.PathLike):
        self.path = Path(run_dir) / CACHE_FILE
        self.entries: dict = {}
        if self.path.exists():
            try:
                data = json.loads(self.path.read_text())
                if data.get("version") == CACHE_VERSION:
                    self.entries = dict(data["entries"])
            except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
                self.entries = {}  # an unreadable cache is recomputed, never trusted

    def get(self, key: str) -> dict | None:
        return self.entries.get(key)

    def put(self, key: str, row: dict) -> None:
        self.entries[key] = row
        write_json_atomic(self.path, {"version": CACHE_VERSION, "entries": self.entries})


def read_history(run_dir: str | os.PathLike) -> list[dict]:
    """The cached rows of a run (any metric and settings), in no particular order."""
    return list(MetricCache(run_dir).entries.values())
