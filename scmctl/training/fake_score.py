"""sCD + aVSD's second trainee (Lu & Song 2025, App. C): the fake score model F_φ, initialized from
the teacher (its EMA weights), and the VSD term's weighting head w_ψ, each with its own optimizer
(train.optimizer, the student's learning-rate schedule, betas and eps; no EMA). One update of each
per student update (:meth:`FakeScore.update`). F_φ is trained by the diffusion loss on the student's
samples, w_ψ by the VSD term (:mod:`scmctl.losses_vsd`); both are in every checkpoint
(:data:`scmctl.training.checkpoint.VSD_KEYS`), so a resumed run is bit-exact on the CPU.
"""

from __future__ import annotations

import copy
from typing import Optional

import torch

from scmctl import distributed
from scmctl.config import Config
from scmctl.errors import UsageError
from scmctl.nn.base import AdaptiveWeightHead, ImageNetwork
from scmctl.training import checkpoint as ckpt_io
from scmctl.training.optim import make_optimizer, step_network


class FakeScore:
    """F_φ (`net`, trainable, train mode) and w_ψ (`head`), with their optimizers once
    :meth:`make_optimizers` ran (after :func:`scmctl.training.parallel.build_model`, which shards
    `net` in place under FSDP2)."""

    def __init__(self, cfg: Config, teacher: ImageNetwork, device, state: Optional[dict] = None):
        self.net = copy.deepcopy(teacher).train().requires_grad_(True)
        self.head = AdaptiveWeightHead(cfg.network).to(device)
        self.opt: Optional[torch.optim.Optimizer] = None
        self.head_opt: Optional[torch.optim.Optimizer] = None
        if state is not None:
            missing = [k for k in ckpt_io.VSD_KEYS if k not in state]
            if missing:
                raise UsageError(f"{state['path']}: has no '{missing[0]}' entry, but the run uses adaptive VSD "
                                 "(loss.vsd_weight > 0): resume it with the loss.vsd_weight it was written with")
            ckpt_io.load_state(self.net, state["vsd_fake"], f"{state['path']} (vsd_fake)")
            ckpt_io.load_state(self.head, state["vsd_weight_head"], f"{state['path']} (vsd_weight_head)")

    def make_optimizers(self, cfg: Config, model, state: Optional[dict] = None) -> None:
        """The two optimizers, with a checkpoint's state when resuming. `model`: the run's
        :class:`~scmctl.training.parallel.Model` (FSDP2 loads F_φ's optimizer state shard by shard)."""
        from scmctl.training.parallel import load_optimizer

        self.opt = make_optimizer(cfg, self.net.parameters())
        self.head_opt = make_optimizer(cfg, self.head.parameters())
        if state is not None:
            load_optimizer(model, self.opt, state["vsd_fake_optimizer"], part="fake")
            self.head_opt.load_state_dict(state["vsd_weight_head_optimizer"])

    def zero_grad(self) -> None:
        self.opt.zero_grad(set_to_none=True)
        self.head_opt.zero_grad(set_to_none=True)

    def update(self, cfg: Config, lr: float, world: int = 1) -> dict:
        """One step of F_φ and of w_ψ (clip, step unless non-finite, renormalize) at the student's
        learning rate `lr`; w_ψ is not wrapped by DDP/FSDP, so its gradients are averaged over the
        `world` processes here. Returns stats for stats.jsonl."""
        if world > 1:
            distributed.all_reduce_mean_([p.grad for p in self.head.parameters() if p.grad is not None])
        fake_norm, fake_skipped = step_network(cfg, self.net, self.opt, lr)
        head_norm, head_skipped = step_network(cfg, self.head, self.head_opt, lr)
        return {"grad_norm_fake": float(fake_norm), "grad_norm_vsd_head": float(head_norm),
                "skipped_fake": int(fake_skipped or head_skipped)}
