"""``network.arch`` → the network class: build one from its config, or count its parameters."""

from __future__ import annotations

import torch

from scmctl.config import NetworkConfig
from scmctl.nn.base import ImageNetwork
from scmctl.nn.songunet import SongUNet
from scmctl.nn.unet import UNet

# One entry per name of scmctl.config.NETWORK_ARCHS (a test checks they agree).
NETWORKS: dict[str, type[ImageNetwork]] = {"edm2": UNet, "ddpmpp": SongUNet, "ncsnpp": SongUNet}


def build_network(cfg: NetworkConfig, device: torch.device | str = "cpu") -> ImageNetwork:
    with torch.device(device):
        return NETWORKS[cfg.arch](cfg)


def count_parameters(cfg: NetworkConfig) -> int:
    """Parameter count without allocating memory (the network is built on the meta device)."""
    return sum(p.numel() for p in build_network(cfg, "meta").parameters())
