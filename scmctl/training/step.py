"""One optimizer step: the objective of a micro-batch, gradient accumulation, the update, and the
statistics a step reports.

A new training objective is one loss function in :mod:`scmctl.losses` plus one entry in
:data:`OBJECTIVES` (method -> how the micro-batch loss calls it).
"""

from __future__ import annotations

import math
from typing import Callable, Iterable, Optional, Sequence

import torch

from scmctl import losses, losses_vsd
from scmctl.config import Config, uses_vsd
from scmctl.nn.base import ImageNetwork
from scmctl.training.optim import apply_update
from scmctl.training.parallel import Model, plain_model


def _diffusion(cfg: Config, model: Model, x0, onehot, step: int, augment_labels=None,
               references=None) -> losses.LossOutput:
    return losses.diffusion_loss(model.grad_forward, x0, onehot, cfg.loss, cfg.data.sigma_data,
                                 weight_net=model.net)


def _consistency(cfg: Config, model: Model, x0, onehot, step: int, augment_labels=None,
                 references=None) -> losses.LossOutput:
    return losses.consistency_loss(model.jvp_forward, x0, onehot, cfg.loss, cfg.data.sigma_data, step,
                                   teacher=model.teacher_forward, train_net=model.grad_forward,
                                   augment_labels=augment_labels, references=references)


# method -> (cfg, model, x0, one-hot labels, step, augment labels, sCT's extra references) -> the
# mean loss of one micro-batch
OBJECTIVES: dict[str, Callable[..., losses.LossOutput]] = {
    "diffusion": _diffusion,   # the TrigFlow teacher
    "sct": _consistency,       # consistency training (Lu & Song 2025, Alg. 1; teacher None)
    "scd": _consistency,       # consistency distillation (Alg. 1 with the teacher's tangent)
}


def _with_vsd(cfg: Config, model: Model, out: losses.LossOutput, x0, onehot) -> losses.LossOutput:
    """sCD + adaptive VSD (loss.vsd_weight > 0): the sCD loss `out` + λ_VSD·L_VSD, then the fake
    score model's diffusion loss (:func:`scmctl.losses_vsd.with_vsd`)."""
    return losses_vsd.with_vsd(out, model.grad_forward, model.teacher_forward, model.fake_forward, model.fake,
                               model.vsd_head, tuple(x0.shape), onehot, cfg.loss, cfg.data.sigma_data, x0.device)


def micro_batch_loss(cfg: Config, model: Model, x0: torch.Tensor, onehot: Optional[torch.Tensor],
                     step: int, augment_labels: Optional[torch.Tensor] = None,
                     references=None) -> losses.LossOutput:
    """The loss of one micro-batch (its mean over examples); `augment_labels`: what the
    augmentation did to x0 (EDM's augment label), given to every network call of the objective
    (not to aVSD's, whose samples are generated, never augmented); `references`: sCT's extra
    reference examples (:class:`scmctl.batch_velocity.References`) or None."""
    out = OBJECTIVES[cfg.method](cfg, model.with_augment_labels(augment_labels), x0, onehot, step,
                                 augment_labels, references)
    return _with_vsd(cfg, model, out, x0, onehot) if uses_vsd(cfg) else out


def accumulate_gradients(cfg: Config, model: Model, micro_batches: Iterable[tuple[Optional[torch.Tensor], ...]],
                         count: int, step: int) -> list[losses.LossOutput]:
    """Backpropagate `count` micro-batches (an iterable of (x0, one-hot labels[, augment labels[,
    references]]),
    drawn lazily so each is drawn right after its seed) into the parameters' .grad, each loss
    scaled by 1/count: with DDP/FSDP averaging over processes, .grad is the gradient of the mean
    over all examples."""
    outs = []
    for k, (x0, onehot, *extra) in enumerate(micro_batches):
        with model.sync(last=k == count - 1):
            out = micro_batch_loss(cfg, model, x0, onehot, step, *extra)
            (out.loss if count == 1 else out.loss / count).backward()
            if out.then is not None:  # a loss of other parameters (aVSD's F_φ), built after this backward
                aux = out.then()
                (aux.loss if count == 1 else aux.loss / count).backward()
                out.stats.update(aux.stats)
        outs.append(out)
    if len(outs) != count:
        raise ValueError(f"expected {count} micro-batches, got {len(outs)}")
    return outs


def training_step(cfg: Config, net: ImageNetwork, opt: torch.optim.Optimizer, x0: torch.Tensor,
                  onehot: Optional[torch.Tensor], step: int, lr: float,
                  teacher: Optional[ImageNetwork] = None, model: Optional[Model] = None,
                  fake_score=None) -> tuple[losses.LossOutput, torch.Tensor, bool]:
    """One optimizer step of `cfg.method` on one batch (no accumulation, no reseeding). A step
    whose gradient norm is not finite is skipped. `fake_score`: aVSD's
    :class:`~scmctl.training.fake_score.FakeScore` (its modules in `model`), updated after the
    student. Returns (loss output, gradient norm, skipped)."""
    model = model if model is not None else plain_model(net, teacher)
    opt.zero_grad(set_to_none=True)
    if fake_score is not None:
        fake_score.zero_grad()
    (out,) = accumulate_gradients(cfg, model, [(x0, onehot)], 1, step)
    grad_norm, skipped = apply_update(cfg, model, opt, lr)
    if fake_score is not None:
        fake_score.update(cfg, lr)
    return out, grad_norm, skipped


def combine_stats(records: Sequence[tuple[float, dict]]) -> dict:
    """One stats record from per-micro-batch (loss, stats) pairs in global order: means over the
    micro-batches that have a value; counts ('masked') summed."""
    out = {"loss": math.fsum(r[0] for r in records) / len(records)}
    keys: list[str] = []
    for _, s in records:
        keys += [k for k in s if k not in keys]
    for k in keys:
        vals = [s[k] for _, s in records if k in s]
        if k == "masked":
            out[k] = int(sum(vals))
        else:
            out[k] = math.fsum(vals) / len(vals)
    return out
