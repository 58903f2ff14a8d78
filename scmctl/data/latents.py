"""Pixel <-> model space for pixel and latent (SD-VAE) datasets.

Model space is what the network sees as x0: pixels in [-1, 1], or VAE latents normalized per
channel, z_norm = (z − latent_mean)·sigma_data/latent_std (SCM_NOTES §6). `sample`, `refine`,
`eval` and the training grids go through these two functions, so latent models decode to images
automatically.
"""

from __future__ import annotations

import numpy as np
import torch

from scmctl.data.imageio import from_uint8, to_uint8


def is_latent(data_cfg) -> bool:
    return bool(getattr(data_cfg, "encoder", None))


def decode_to_uint8(data_cfg, x0: torch.Tensor, device=None) -> np.ndarray:
    """Model-space samples (N, C, H, W) -> uint8 NHWC images."""
    if not is_latent(data_cfg):
        return to_uint8(x0)
    raise NotImplementedError("latent decoding")  # TODO(latents): denormalize, VAE-decode


def encode_from_uint8(data_cfg, images: np.ndarray, device=None) -> torch.Tensor:
    """uint8 NHWC images -> model-space float32 NCHW on `device`."""
    if not is_latent(data_cfg):
        x = from_uint8(images)
        return x.to(device) if device is not None else x
    raise NotImplementedError("latent encoding")  # TODO(latents): VAE-encode (posterior mean), normalize
