"""The examples of a training step: which dataset indices, which RNG seed, which augmentation.

Data order and every random draw of step s are derived from (seed, s) alone, so a resumed run
reproduces the uninterrupted one bit for bit on the CPU. Global micro-batch j of step s seeds
torch's RNG with ``micro_batch_seed(seed, s, j)`` before anything is drawn (latent posterior
noise, flips, sCT's extra references, label dropout, then the loss's z, t and dropout masks), so a step's result depends on
(seed, s, B, m) and not on how the micro-batches are spread over processes.
"""

from __future__ import annotations

from typing import Iterator, Optional

import torch

from scmctl import losses
from scmctl.batch_velocity import References
from scmctl.config import Config
from scmctl.data import augment as edm_augment
from scmctl.data.datasets import batch_indices
from scmctl.training.parallel import BatchLayout


def step_seed(seed: int, step: int) -> int:
    """The RNG seed of training step `step` (independent of everything before it)."""
    return (seed * 1_000_003 + step * 7919 + 12345) % (2 ** 63 - 1)


def micro_batch_seed(seed: int, step: int, index: int) -> int:
    """The RNG seed of global micro-batch `index` of step `step` (index 0: `step_seed`)."""
    return (step_seed(seed, step) + index * 1_000_000_007) % (2 ** 63 - 1)


def augment(cfg: Config, x0: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Data augmentation of one micro-batch (drawn from the micro-batch's RNG): random
    horizontal flips with data.xflip, then EDM's non-leaking augmentation with data.augment_p.
    Returns (x0, its augment labels for the network, or None without data.augment_p)."""
    if cfg.data.xflip:
        flip = torch.rand(x0.shape[0], device=x0.device) < 0.5
        x0 = torch.where(flip[:, None, None, None], x0.flip(3), x0)
    if cfg.data.augment_p > 0:
        return edm_augment.augment(x0, cfg.data.augment_p)
    return x0, None


def _onehot(labels: Optional[torch.Tensor], num_classes: int, device: torch.device,
            dropout: float = 0.0) -> Optional[torch.Tensor]:
    """One-hot rows on `device` (each zeroed with probability `dropout`), or None without classes."""
    if labels is None or not num_classes:
        return None
    return losses.drop_labels(labels.to(device), num_classes, dropout)


def references(cfg: Config, dataset, device: torch.device) -> Optional[References]:
    """loss.sct_references examples drawn without replacement from the whole dataset (from the
    micro-batch's RNG, after its own examples), augmented like training examples, labels kept:
    the extra reference set of sCT's batch velocity (:mod:`scmctl.batch_velocity`)."""
    count = min(cfg.loss.sct_references, len(dataset))
    if count <= 0:
        return None
    x0, labels = dataset.batch(torch.randperm(len(dataset))[:count])
    x0, augment_labels = augment(cfg, x0.to(device))
    return References(x0, _onehot(labels, cfg.network.num_classes or 0, device), augment_labels)


def micro_batches(cfg: Config, dataset, layout: BatchLayout, rank: int, step: int,
                  device: torch.device) -> Iterator[tuple]:
    """This process's micro-batches of `step` as (x0 in model space, one-hot labels or None,
    augment labels or None, extra references or None (:func:`references`)), drawn lazily: each
    right after its seed is set. `dataset`: ``len(dataset)`` examples and
    ``dataset.batch(indices) -> (x0 float32 NCHW, int64 labels or None)``."""
    tc = cfg.train
    num_classes = cfg.network.num_classes or 0
    idx = batch_indices(len(dataset), tc.batch, step, tc.seed)
    for j in layout.indices(rank):
        torch.manual_seed(micro_batch_seed(tc.seed, step, j))
        x0, labels = dataset.batch(idx[j * layout.micro:(j + 1) * layout.micro])
        x0, augment_labels = augment(cfg, x0.to(device))  # before the loss draws any noise
        refs = references(cfg, dataset, device)
        yield x0, _onehot(labels, num_classes, device, cfg.network.label_dropout), augment_labels, refs
