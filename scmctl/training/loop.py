"""The training loop shared by `scmctl train` (diffusion teacher or sCT) and `scmctl distill` (sCD).

Resume = run the same command again: the loop finds the run directory's latest checkpoint and
continues. Data order and every random draw of step s are derived from (seed, s) alone, so a
resumed run reproduces the uninterrupted one bit for bit on the CPU.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Optional

import torch

from scmctl import losses
from scmctl.config import Config
from scmctl.data.imageio import save_grid, to_uint8
from scmctl.errors import UsageError
from scmctl.nn.unet import UNet, build_network
from scmctl.training import checkpoint as ckpt_io
from scmctl.training.ema import EMA


def select_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"train.device={name} but no CUDA device is available")
    return dev


def step_seed(seed: int, step: int) -> int:
    """The RNG seed of training step `step` (independent of everything before it)."""
    return (seed * 1_000_003 + step * 7919 + 12345) % (2 ** 63 - 1)


def learning_rate(cfg: Config, step: int) -> float:
    """α(t) = α_ref/√max(t/t_ref, 1) (EDM2's inverse square root), with an optional linear ramp-up."""
    t = cfg.train
    lr = t.lr
    if t.lr_ref_steps > 0:
        lr /= math.sqrt(max(step / t.lr_ref_steps, 1.0))
    if t.lr_warmup_steps > 0:
        lr *= min(step / t.lr_warmup_steps, 1.0)
    return lr


def make_optimizer(cfg: Config, params) -> torch.optim.Optimizer:
    t = cfg.train
    cls = torch.optim.RAdam if t.optimizer == "radam" else torch.optim.Adam
    return cls(params, lr=t.lr, betas=tuple(t.betas), eps=t.eps)


def model_kind(method: str) -> str:
    return "diffusion" if method == "diffusion" else "consistency"


def training_step(cfg: Config, net: UNet, opt: torch.optim.Optimizer, x0: torch.Tensor,
                  onehot: Optional[torch.Tensor], step: int, lr: float,
                  teacher: Optional[UNet] = None) -> tuple[losses.LossOutput, torch.Tensor, bool]:
    """One optimizer step of `cfg.method`. A step whose gradient norm is not finite is skipped.
    Returns (loss output, gradient norm, skipped)."""
    for g in opt.param_groups:
        g["lr"] = lr
    if cfg.method == "diffusion":
        out = losses.diffusion_loss(net, x0, onehot, cfg.loss, cfg.data.sigma_data)
    else:
        out = losses.consistency_loss(net, x0, onehot, cfg.loss, cfg.data.sigma_data, step,
                                      teacher=teacher)
    opt.zero_grad(set_to_none=True)
    out.loss.backward()
    clip = cfg.train.grad_clip if cfg.train.grad_clip > 0 else float("inf")
    grad_norm = torch.nn.utils.clip_grad_norm_(net.parameters(), clip)
    skipped = not bool(torch.isfinite(grad_norm))
    if not skipped:
        opt.step()
        net.renormalize_()
    return out, grad_norm, skipped


class StatsLog:
    """stats.jsonl: one JSON object per logged step. On resume, lines after the checkpoint's step
    are dropped (they are recomputed identically)."""

    def __init__(self, path: Path, resume_step: int):
        self.path = path
        if path.exists():
            keep = []
            for line in path.read_text().splitlines():
                try:
                    if json.loads(line).get("step", 0) <= resume_step:
                        keep.append(line)
                except json.JSONDecodeError:
                    pass  # a line cut off by a crash
            _write_text_atomic(path, "".join(line + "\n" for line in keep))
        self.f = open(path, "a")

    def write(self, obj: dict) -> None:
        self.f.write(json.dumps(obj) + "\n")
        self.f.flush()

    def close(self) -> None:
        self.f.close()


def train(cfg: Config, run_dir: Path, images: torch.Tensor, labels: Optional[torch.Tensor],
          teacher: Optional[UNet] = None, init_state: Optional[dict] = None,
          show_progress: bool = True) -> dict:
    """Train `cfg.method` on uint8 NCHW `images`; returns a summary dict.

    `teacher`: the sCD teacher (EMA weights, eval mode). `init_state`: weights to start from (a
    checkpoint's EMA), used only when the run has no checkpoint yet. SIGTERM/SIGINT (a cluster's
    preemption, Ctrl-C) finish the current step, write a checkpoint and stop; re-running the same
    command resumes from it.
    """
    from scmctl.cli.common import progress
    from scmctl.data.datasets import batch_indices

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    device = select_device(cfg.train.device)
    tc, sigma_data = cfg.train, cfg.data.sigma_data
    torch.manual_seed(tc.seed)
    net = build_network(cfg.network, device).train()
    ema = None
    opt = make_optimizer(cfg, net.parameters())
    start = 0

    latest = ckpt_io.latest(run_dir)
    if latest is not None:
        state = ckpt_io.load(latest, map_location=device)
        ckpt_io.load_state(net, state["net"], str(latest))
        ema = EMA(net, tc.ema_sigma_rel, tc.ema_halflife_images, tc.batch)
        ckpt_io.load_state(ema.net, state["ema"], str(latest))
        opt.load_state_dict(state["optimizer"])
        start = int(state["step"])
    else:
        if init_state is not None:
            ckpt_io.load_state(net, init_state, "--init/--teacher", allow_missing=("emb_guidance.", "guidance_gain"))
            net.renormalize_()
        ema = EMA(net, tc.ema_sigma_rel, tc.ema_halflife_images, tc.batch)
    _write_text_atomic(run_dir / "config.yaml", cfg.to_yaml())  # resuming may have raised train.steps

    n = images.shape[0]
    num_classes = cfg.network.num_classes or 0
    stats = StatsLog(run_dir / "stats.jsonl", start)
    kind = model_kind(cfg.method)
    end = tc.steps
    stop = _StopRequest()
    last_grid = None
    t_last, imgs_since = time.perf_counter(), 0
    summary = {"run_dir": str(run_dir), "method": cfg.method, "start_step": start}
    try:
        with progress(disable=not show_progress) as bar:
            task = bar.add_task(f"{cfg.method} training", total=tc.steps, completed=start, info="")
            for step in range(start, end):
                torch.manual_seed(step_seed(tc.seed, step))
                idx = batch_indices(n, tc.batch, step, tc.seed)
                x0 = images[idx].to(device).float() / 127.5 - 1.0
                if cfg.data.xflip:
                    flip = torch.rand(x0.shape[0], device=device) < 0.5
                    x0 = torch.where(flip[:, None, None, None], x0.flip(3), x0)
                lab = labels[idx].to(device) if (labels is not None and num_classes) else None
                onehot = losses.drop_labels(lab, num_classes, cfg.network.label_dropout)
                lr = learning_rate(cfg, step)
                out, grad_norm, skipped = training_step(cfg, net, opt, x0, onehot, step, lr, teacher)
                ema.update(net, step + 1)
                done = step + 1
                imgs_since += x0.shape[0]
                if done % tc.log_every == 0 or done == end:
                    now = time.perf_counter()
                    rec = {"step": done, "loss": float(out.loss.detach()), "lr": lr,
                           "grad_norm": float(grad_norm), "skipped": int(skipped),
                           "images_per_s": imgs_since / max(now - t_last, 1e-9),
                           "kimg": done * tc.batch / 1000}
                    rec.update(out.stats)
                    stats.write(rec)
                    t_last, imgs_since = now, 0
                    bar.update(task, completed=done, info=f"loss {rec['loss']:.4f}")
                else:
                    bar.update(task, completed=done)
                if done % tc.checkpoint_every == 0 or done == tc.steps:
                    _save(run_dir, cfg, kind, done, net, ema, opt)
                if tc.grid_every > 0 and (done % tc.grid_every == 0 or done == tc.steps):
                    last_grid = write_grid(run_dir / f"grid-{done:07d}.png", ema.net, cfg, kind, device)
                if stop.requested:
                    if done % tc.checkpoint_every != 0 and done != tc.steps:
                        _save(run_dir, cfg, kind, done, net, ema, opt)
                    end = done
                    break
    finally:
        stats.close()
        stop.restore()
    summary.update({"steps": end, "checkpoint": str(ckpt_io.latest(run_dir)),
                    "grid": str(last_grid) if last_grid else None, "stopped_early": end < tc.steps})
    return summary


class _StopRequest:
    """SIGTERM/SIGINT set a flag that the loop checks after each step (main thread only)."""

    def __init__(self):
        import signal
        import threading

        self.requested = False
        self._old = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._old[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.requested = True

    def restore(self) -> None:
        import signal

        for sig, handler in self._old.items():
            signal.signal(sig, handler)


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".tmp-{path.name}")
    tmp.write_text(text)
    os.replace(tmp, path)


def _save(run_dir: Path, cfg: Config, kind: str, step: int, net, ema: EMA, opt) -> Path:
    path = run_dir / f"checkpoint-{step:07d}.pt"
    ckpt_io.save_atomic({
        "format": ckpt_io.FORMAT, "version": ckpt_io.VERSION, "kind": kind, "step": step,
        "config": cfg.to_dict(), "net": net.state_dict(), "ema": ema.state_dict(),
        "optimizer": opt.state_dict(),
    }, path)
    ckpt_io.prune(run_dir, cfg.train.keep_checkpoints)
    return path


@torch.no_grad()
def write_grid(path: Path, net: UNet, cfg: Config, kind: str, device) -> Path:
    """A sample grid from the EMA weights with fixed seeds 0..grid_images−1."""
    from scmctl.sampling import generate

    s = cfg.sample
    n = s.grid_images
    shape = (cfg.network.channels, cfg.network.resolution, cfg.network.resolution)
    steps = s.steps if kind == "consistency" else s.solver_steps
    x0, _, _ = generate(net, kind, list(range(n)), shape, cfg.data.sigma_data, steps, s.t_mid,
                        solver=s.solver, device=device)
    save_grid(path, to_uint8(x0))
    return path
