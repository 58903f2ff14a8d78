"""The training loop shared by `scmctl train` (diffusion teacher or sCT) and `scmctl distill` (sCD).

`train` builds the network, resumes from the run directory's latest checkpoint, and then each step
draws its micro-batches, accumulates their gradients, updates the weights and the EMA, logs, and
saves. The plumbing is other modules' job:

- :mod:`~scmctl.training.run_config`: the config the run executes (resolved before the loop);
- :mod:`~scmctl.training.batches`: which examples, which RNG seed, which augmentation;
- :mod:`~scmctl.training.step`: the objective of a micro-batch, accumulation, the update;
- :mod:`~scmctl.training.optim`: optimizer, learning-rate schedule, clipping, renormalization;
- :mod:`~scmctl.training.parallel`: DDP/FSDP2, bf16, compile, full state dicts for checkpoints;
- :mod:`~scmctl.training.run_dir`: config.yaml, stats.jsonl, checkpoints, grids, stop requests;
- :mod:`~scmctl.training.ema`, :mod:`~scmctl.training.phema`, :mod:`~scmctl.training.checkpoint`: the EMA,
  the post-hoc EMA profiles and the checkpoint format.

Resume = run the same command again; a resumed run reproduces the uninterrupted one bit for bit
on the CPU (every draw of step s derives from (seed, s)).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import torch

from scmctl import distributed, progress
from scmctl.config import Config, uses_vsd
from scmctl.devices import select_device
from scmctl.nn.networks import build_network
from scmctl.nn.base import ImageNetwork
from scmctl.training import checkpoint as ckpt_io
from scmctl.training.batches import micro_batches
from scmctl.training.ema import EMA
from scmctl.training.fake_score import FakeScore
from scmctl.training.phema import PowerEMAs
from scmctl.training.optim import apply_update, learning_rate, make_optimizer
from scmctl.training.parallel import (FullState, batch_layout, build_model, check_gradients_agree,  # noqa: F401
                                      check_scaleout, checks_gradients, effective_jvp_mode,
                                      gradient_fingerprint, load_optimizer, plain_model)
from scmctl.training.run_dir import RunDir, StopRequest
from scmctl.training.step import (accumulate_gradients, combine_stats, micro_batch_loss,  # noqa: F401
                                  training_step)

# batch_layout, effective_jvp_mode, gradient_fingerprint, plain_model, micro_batch_loss and
# training_step are imported for the tests and benchmarks that use them from here.


def train(cfg: Config, run_dir: Path, dataset, teacher: Optional[ImageNetwork] = None,
          init_state: Optional[dict] = None, show_progress: bool = True,
          dist: Optional[distributed.Dist] = None) -> dict:
    """Train `cfg.method` on `dataset`; returns a summary dict (the same on every process).

    `cfg`: the run's config (:func:`scmctl.training.run_config.resolve_for_run`), used as is.
    `dataset`: ``len(dataset)`` examples and ``dataset.batch(indices) -> (x0 float32 NCHW in model
    space, int64 labels or None)``. `teacher`: the sCD teacher (EMA weights, eval mode).
    `init_state`: weights to start from (a checkpoint's EMA), used only when the run has no
    checkpoint yet. `dist`: this process's place in the torchrun job (default: from the
    environment). SIGTERM/SIGINT (a cluster's preemption, Ctrl-C) finish the current step, write a
    checkpoint and stop; under torchrun all processes agree on the step (one all-reduce per step).
    """
    if dist is None:
        dist = distributed.init(cfg.train.device) if distributed.launched() else \
            distributed.Dist(device=select_device(cfg.train.device))
    tc, device = cfg.train, dist.device
    layout = check_scaleout(cfg, dist.world)
    run = RunDir(run_dir, dist)

    torch.manual_seed(tc.seed)
    net = build_network(cfg.network, device).train()
    state = run.resume_state(tc.log_every)
    if state is not None:
        ckpt_io.load_state(net, state["net"], state["path"])
    elif init_state is not None:
        ckpt_io.load_state(net, init_state, "--init/--teacher", allow_missing=("emb_guidance.", "guidance_gain"))
        net.renormalize_()
    ema = EMA(net, tc.ema_sigma_rel, tc.ema_halflife_images, tc.batch)
    phemas = PowerEMAs(net, tc.phema_sigma_rels)  # the post-hoc EMA profiles (EDM2 Sec. 3)
    if state is not None:
        ckpt_io.load_state(ema.net, state["ema"], state["path"])
        phemas.resume(state)
    start = int(state["step"]) if state is not None else 0
    teacher = teacher.to(device) if teacher is not None else None
    fake = FakeScore(cfg, teacher, device, state) if uses_vsd(cfg) else None  # sCD + aVSD: F_φ and w_ψ
    model = build_model(cfg, net, dist, teacher, ema, phemas.emas, fake=fake.net if fake else None,
                        vsd_head=fake.head if fake else None)
    opt = make_optimizer(cfg, net.parameters())
    if fake is not None:
        fake.make_optimizers(cfg, model, state)
    if state is not None:
        load_optimizer(model, opt, state["optimizer"])
        del state
    run.write_config(cfg)

    stats = run.stats_log(start)
    end, last_grid = tc.steps, None
    t_last, imgs_since = time.perf_counter(), 0
    try:
        with StopRequest() as stop, progress.bar(f"{cfg.method} training", tc.steps, start,
                                                 enabled=show_progress and dist.is_main) as bar:
            for step in range(start, end):
                # one optimizer step over this process's micro-batches
                lr = learning_rate(cfg, step)
                opt.zero_grad(set_to_none=True)
                if fake is not None:
                    fake.zero_grad()
                outs = accumulate_gradients(cfg, model, micro_batches(cfg, dataset, layout, dist.rank, step, device),
                                            layout.accum, step)
                done = step + 1
                if checks_gradients(cfg, model, dist, done):
                    check_gradients_agree(model.net.parameters(), done)
                grad_norm, skipped = apply_update(cfg, model, opt, lr)
                fake_stats = fake.update(cfg, lr, dist.world) if fake is not None else {}
                ema.update(net, done)
                phemas.update(net, done)
                imgs_since += tc.batch

                # stats.jsonl: the mean over all processes' micro-batches
                info = None
                if done % tc.log_every == 0 or done == end:
                    mine = [(float(o.loss.detach()), o.stats) for o in outs]
                    everyone = distributed.all_gather_object(mine) if dist.world > 1 else [mine]
                    if stats is not None:
                        now = time.perf_counter()
                        rec = combine_stats([r for part in everyone for r in part])
                        rec = {"step": done, "loss": rec.pop("loss"), "lr": lr, "grad_norm": float(grad_norm),
                               "skipped": int(skipped), "images_per_s": imgs_since / max(now - t_last, 1e-9),
                               "kimg": done * tc.batch / 1000, **fake_stats, **rec}
                        stats.write(rec)
                        t_last, imgs_since = now, 0
                        info = f"loss {rec['loss']:.4f}"
                bar.update(done, info=info)

                # checkpoint, post-hoc EMA snapshots and grid; a stop request (on any process) ends the run here
                stopping = distributed.any_rank(stop.requested, device) if dist.world > 1 else stop.requested
                want_ckpt = done % tc.checkpoint_every == 0 or done == tc.steps or stopping
                want_grid = tc.grid_every > 0 and (done % tc.grid_every == 0 or done == tc.steps)
                want_snapshot = phemas.snapshot_due(cfg, done)
                if want_ckpt or want_grid or want_snapshot:
                    full = FullState(model, ema, opt, dist, phemas.emas, fake)
                    if want_snapshot:
                        run.save_phema_snapshots(cfg, done, full)
                    if want_ckpt:
                        run.save_checkpoint(cfg, done, full)
                    if want_grid:
                        last_grid = run.save_grid(cfg, done, full) or last_grid
                    del full
                if stopping:
                    end = done
                    break
    finally:
        if stats is not None:
            stats.close()
    if dist.world > 1:
        distributed.barrier()  # rank 0's last checkpoint is on disk before anyone reports
    return {"run_dir": str(run.path), "method": cfg.method, "start_step": start, "steps": end,
            "checkpoint": str(ckpt_io.latest(run.path)), "grid": str(last_grid) if last_grid else None,
            "stopped_early": end < tc.steps}
