"""The run directory: config.yaml, stats.jsonl, checkpoints (written atomically, pruned), post-hoc
EMA snapshots, sample grids, and the stop request (SIGTERM/SIGINT) that ends a run with a checkpoint.

Only rank 0 writes; the run directory must be on a file system every process sees. Resume = run
the same command again: :meth:`RunDir.resume_state` finds the newest usable checkpoint.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import torch

from scmctl import distributed, segments
from scmctl.config import Config, model_kind
from scmctl.data.imageio import save_grid
from scmctl.fileio import remove_stale_temps, write_text_atomic
from scmctl.nn.base import ImageNetwork
from scmctl.training import checkpoint as ckpt_io
from scmctl.training import phema
from scmctl.training.parallel import FullState


class StatsLog:
    """stats.jsonl: one JSON object per logged step.

    The log never falls behind the checkpoint a run resumes from: :meth:`sync` (flush + fsync)
    runs before every checkpoint is renamed into place, so a kill at any moment leaves at least
    the lines of the steps the newest checkpoint covers. On resume, lines after the checkpoint's
    step (they are recomputed identically) and a line cut off by a crash are dropped.
    """

    def __init__(self, path: Path, resume_step: int):
        self.path = path
        if path.exists():
            lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
            keep = [line for line in lines if (step := _step_of(line)) is not None and step <= resume_step]
            if keep != lines or not path.read_bytes().endswith(b"\n"):
                write_text_atomic(path, "".join(line + "\n" for line in keep))
        self.f = open(path, "a", encoding="utf-8")

    def write(self, obj: dict) -> None:
        self.f.write(json.dumps(obj) + "\n")
        self.f.flush()

    def sync(self) -> None:
        """The lines written so far are on disk."""
        self.f.flush()
        os.fsync(self.f.fileno())

    def close(self) -> None:
        self.f.close()


def _step_of(line: str) -> Optional[int]:
    """The step of a stats.jsonl line; None for a line cut off by a crash."""
    try:
        step = json.loads(line).get("step")
    except (json.JSONDecodeError, AttributeError):
        return None
    return step if isinstance(step, int) else None


def logged_steps(path: Path) -> set[int]:
    """The steps stats.jsonl has a line for."""
    if not path.exists():
        return set()
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    return {s for line in lines if (s := _step_of(line)) is not None}


def log_gap(logged: set[int], step: int, log_every: int) -> Optional[str]:
    """None when the log has every line a run reaching `step` writes (each multiple of
    `log_every`), else which one is missing."""
    missing = next((k for k in range(log_every, step + 1, log_every) if k not in logged), None)
    return None if missing is None else f"stats.jsonl has no line for step {missing}"


class StopRequest:
    """SIGTERM/SIGINT set a flag that the loop checks after each step (main thread only); a
    context manager that restores the previous handlers."""

    def __init__(self):
        self.requested = False
        self._old = {}

    def __enter__(self) -> "StopRequest":
        import signal
        import threading

        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.requested = True

    def __exit__(self, *exc) -> None:
        import signal

        for sig, handler in self._old.items():
            signal.signal(sig, handler)


class RunDir:
    """One training run's folder as process `dist` sees it (rank 0 writes, everyone reads)."""

    def __init__(self, path: str | Path, dist: distributed.Dist):
        self.path, self.dist, self.main = Path(path), dist, dist.is_main
        self.stats: Optional[StatsLog] = None
        if self.main:
            self.path.mkdir(parents=True, exist_ok=True)
            for name in ("checkpoint-*.pt", "grid-*.png", "stats.jsonl", "config.yaml"):
                remove_stale_temps(self.path, name)  # a killed writer's left-overs; only our names

    def resume_state(self, log_every: int) -> Optional[dict]:
        """The newest checkpoint that loads and that stats.jsonl covers (rank 0 picks it: every
        process resumes from the same one), or None for a new run. A torn or invalid checkpoint,
        or one ahead of the log, is skipped with a warning for the one before it. Several
        processes map it from the CPU."""
        state = None
        if self.main:
            logged = logged_steps(self.path / "stats.jsonl")
            state = ckpt_io.load_resumable(self.path, lambda step: log_gap(logged, step, log_every),
                                           map_location=self.dist.device if self.dist.world == 1 else "cpu",
                                           mmap=self.dist.world > 1)
        if self.dist.world == 1:
            return state
        chosen = distributed.broadcast_object(None if state is None else state["path"])
        if chosen is None:
            return None
        return state if self.main else ckpt_io.load(chosen, map_location="cpu", mmap=True)

    def write_config(self, cfg: Config) -> None:
        """config.yaml: the run's resolved config (resuming may have raised train.steps)."""
        if self.main:
            write_text_atomic(self.path / "config.yaml", cfg.to_yaml())

    def stats_log(self, start: int) -> Optional[StatsLog]:
        if self.main:
            self.stats = StatsLog(self.path / "stats.jsonl", start)
        return self.stats

    def save_checkpoint(self, cfg: Config, step: int, full: FullState) -> Optional[Path]:
        """checkpoint-STEP.pt (atomic, after the stats lines it covers are on disk), then prune to
        train.keep_checkpoints."""
        net, ema, opt = full.net(), full.ema_state(), full.optimizer()  # collectives under FSDP2
        phema = full.phema_states()
        vsd = full.vsd_states()
        if not self.main:
            return None
        if self.stats is not None:
            self.stats.sync()
        path = self.path / f"checkpoint-{step:07d}.pt"
        extra = {"phema": {"sigma_rels": [e.sigma_rel for e in full.phemas], "emas": phema}} if phema else {}
        ckpt_io.save_atomic({
            "format": ckpt_io.FORMAT, "version": ckpt_io.VERSION, "kind": model_kind(cfg.method),
            "step": step, "config": cfg.to_dict(), "net": net, "ema": ema, "optimizer": opt, **extra, **vsd,
        }, path)
        ckpt_io.prune(self.path, cfg.train.keep_checkpoints)
        return path

    def save_phema_snapshots(self, cfg: Config, step: int, full: FullState) -> None:
        """phema/phema-STEP-SIGMA.pt: the post-hoc EMA profiles' weights (:mod:`scmctl.training.phema`)."""
        states = full.phema_states()  # a collective under FSDP2
        if self.main:
            phema.save_snapshots(self.path, step, step * cfg.train.batch / 1000, model_kind(cfg.method),
                                 cfg.to_dict(), [e.sigma_rel for e in full.phemas], states)

    def save_grid(self, cfg: Config, step: int, full: FullState) -> Optional[Path]:
        """grid-STEP.png from the EMA weights."""
        net = full.ema_network(cfg, self.dist.device)  # a collective under FSDP2
        if not self.main:
            return None
        return write_grid(self.path / f"grid-{step:07d}.png", net, cfg, self.dist.device)


@torch.no_grad()
def write_grid(path: Path, net: ImageNetwork, cfg: Config, device) -> Path:
    """A sample grid with fixed seeds 0..grid_images−1, decoded to pixels (latent models through
    their VAE)."""
    from scmctl.data.latents import decode_to_uint8
    from scmctl.sampling import generate

    s = cfg.sample
    kind = model_kind(cfg.method)
    shape = (cfg.network.channels, cfg.network.resolution, cfg.network.resolution)
    boundaries = segments.of_model(cfg)  # a multistep model walks all its M segments
    steps = (len(boundaries) - 1 if boundaries else s.steps) if kind == "consistency" else s.solver_steps
    x0, _, _ = generate(net, kind, list(range(s.grid_images)), shape, cfg.data.sigma_data, steps, s.t_mid,
                        solver=s.solver, device=device, boundaries=boundaries)
    save_grid(path, decode_to_uint8(cfg.data, x0, device))
    return path


def last_stats(run_dir: str | Path) -> dict:
    """The last line of a run directory's stats.jsonl ({} when there is none)."""
    p = Path(run_dir) / "stats.jsonl"
    if not p.exists():
        return {}
    lines = p.read_text().strip().splitlines()
    return json.loads(lines[-1]) if lines else {}
