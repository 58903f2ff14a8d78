"""DINOv2 ViT-L/14 features for FD_DINOv2 (EDM2's second metric), written here in plain torch.

The network is the inference forward of DINOv2's ViT (Oquab et al. 2023), loaded from the official
``dinov2_vitl14_pretrain.pth`` state dict with ``torch.load(weights_only=True)``; nothing is fetched
through torch.hub and no code is unpickled. Architecture, as the checkpoint's keys spell it:

- ``patch_embed.proj``: a 14×14 stride-14 convolution, 3 → 1024 channels (224² → 16×16 tokens);
- ``cls_token`` prepended, ``pos_embed`` added; the checkpoint's position grid (37×37, trained at
  518²) is resized bicubically to the token grid the way DINOv2 does it: ``interpolate`` with
  ``scale_factor = (16 + 0.1) / 37`` (its "+0.1" offset, no antialiasing), which samples slightly
  differently from ``size=16``;
- 24 pre-norm blocks ``blocks.i``: ``x += ls1.gamma ⊙ attn(norm1(x))``, ``x += ls2.gamma ⊙
  mlp(norm2(x))``, 16 heads of 64 channels, ``attn.qkv``/``attn.proj``, ``mlp.fc1``/``mlp.fc2``
  with exact (erf) GELU, LayerNorm ε = 1e-6 (LayerScale = the ``gamma`` vectors);
- the feature is the CLS token after the final ``norm`` (1024-d).

Preprocessing follows EDM2's FD_DINOv2: uint8 → float → bicubic resize to 224² (antialiased,
PIL-like; values not rounded or clipped) → /255 → ImageNet mean/std normalization.
"""

from __future__ import annotations

import math
import os
import pickle
import re
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from scmctl.errors import UsageError
from scmctl.metrics.detectors import DINOV2_URL, Detector

INPUT_SIZE = 224
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
POS_EMBED_OFFSET = 0.1   # DINOv2's interpolate_offset (kept for its trained models)
LAYER_NORM_EPS = 1e-6
HEAD_DIM = 64            # every DINOv2 ViT (S/B/L/g) uses 64-channel heads


class _PatchEmbed(nn.Module):
    def __init__(self, dim: int, patch: int):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, patch, stride=patch)


class _LayerScale(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim))


class _Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v)  # softmax(q kᵀ/√d_head) v
        return self.proj(y.transpose(1, 2).reshape(b, n, c))


class _Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class _Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, hidden: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.attn = _Attention(dim, num_heads)
        self.ls1 = _LayerScale(dim)
        self.norm2 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.mlp = _Mlp(dim, hidden)
        self.ls2 = _LayerScale(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.ls1.gamma * self.attn(self.norm1(x))
        return x + self.ls2.gamma * self.mlp(self.norm2(x))


class DinoViT(nn.Module):
    """DINOv2's ViT forward to the normalized CLS token; parameter names match the checkpoints."""

    def __init__(self, dim: int = 1024, depth: int = 24, num_heads: int = 16, patch: int = 14,
                 grid: int = 37, mlp_hidden: int | None = None):
        super().__init__()
        self.patch = patch
        self.grid = grid
        self.patch_embed = _PatchEmbed(dim, patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, grid * grid + 1, dim))
        self.blocks = nn.ModuleList(_Block(dim, num_heads, mlp_hidden or 4 * dim) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self._pos_cache: dict[tuple, torch.Tensor] = {}

    @classmethod
    def from_state_dict(cls, state: dict, num_heads: int | None = None, where: str = "state dict") -> "DinoViT":
        """Build from an official DINOv2 ViT state dict (sizes read from the tensors)."""
        state = _unchunk(state)
        try:
            dim = state["cls_token"].shape[-1]
            patch = state["patch_embed.proj.weight"].shape[-1]
            n_pos = state["pos_embed"].shape[1] - 1
            hidden = state["blocks.0.mlp.fc1.weight"].shape[0]
        except (KeyError, AttributeError, IndexError):
            raise UsageError(f"{where}: not a DINOv2 ViT state dict (no cls_token / patch_embed.proj / "
                             f"pos_embed / blocks.0.mlp.fc1 tensors); expected {DINOV2_URL}") from None
        grid = math.isqrt(n_pos)
        depth = len({k.split(".")[1] for k in state if k.startswith("blocks.")})
        if grid * grid != n_pos or depth == 0:
            raise UsageError(f"{where}: pos_embed of {n_pos} patches is not a square grid")
        net = cls(dim, depth, num_heads or max(1, dim // HEAD_DIM), patch, grid, hidden)
        state = {k: v for k, v in state.items() if k != "mask_token"}  # used in training only
        missing, unexpected = net.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise UsageError(f"{where}: not a plain DINOv2 ViT checkpoint (missing "
                             f"{', '.join(missing[:3]) or 'none'}; unexpected {', '.join(unexpected[:3]) or 'none'})")
        return net

    def position_embedding(self, gh: int, gw: int) -> torch.Tensor:
        """(1, 1 + gh·gw, D): the class position plus the patch grid resized as DINOv2 does."""
        key = (gh, gw, self.pos_embed.device, self.pos_embed.dtype)
        if key not in self._pos_cache:
            pos = self.pos_embed.detach()
            if (gh, gw) != (self.grid, self.grid):
                m, d = self.grid, pos.shape[-1]
                grid = pos[:, 1:].float().reshape(1, m, m, d).permute(0, 3, 1, 2)
                grid = F.interpolate(grid, scale_factor=((gh + POS_EMBED_OFFSET) / m, (gw + POS_EMBED_OFFSET) / m),
                                     mode="bicubic", align_corners=False)
                assert grid.shape[-2:] == (gh, gw), grid.shape
                pos = torch.cat([pos[:, :1], grid.permute(0, 2, 3, 1).reshape(1, gh * gw, d).to(pos.dtype)], 1)
            self._pos_cache[key] = pos
        return self._pos_cache[key]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalized float images (B, 3, H, W), H and W multiples of the patch -> CLS (B, D)."""
        x = self.patch_embed.proj(x)
        gh, gw = x.shape[-2:]
        x = x.flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.position_embedding(gh, gw)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)[:, 0]


def _unchunk(state: dict) -> dict:
    """Checkpoints saved with FSDP block chunks name blocks ``blocks.<chunk>.<i>.``: flatten them."""
    if not any(re.match(r"blocks\.\d+\.\d+\.", k) for k in state):
        return state
    return {re.sub(r"^blocks\.\d+\.(\d+)\.", r"blocks.\1.", k): v for k, v in state.items()}


def preprocess(images: torch.Tensor) -> torch.Tensor:
    """uint8 NCHW RGB -> float32 at 224² (bicubic, antialiased), ImageNet-normalized (EDM2)."""
    x = images.float()
    x = F.interpolate(x, size=(INPUT_SIZE, INPUT_SIZE), mode="bicubic", antialias=True, align_corners=False)
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
    return (x / 255 - mean) / std


def load_dinov2(path: str | os.PathLike, num_heads: int | None = None) -> DinoViT:
    """A :class:`DinoViT` from a local state dict file, loaded with ``weights_only=True``."""
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)  # safe: tensors/plain data only
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0][:120] if str(e).strip() else ""
        raise UsageError(f"{path}: refused to load: not a plain state dict of tensors ({first})") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise UsageError(f"{path}: cannot read the DINOv2 weights ({e.__class__.__name__}); the file may be "
                         f"truncated: delete it and download {DINOV2_URL} again") from None
    if isinstance(state, dict) and not any(isinstance(v, torch.Tensor) for v in state.values()):
        state = state.get("model") or state.get("state_dict") or state  # a training checkpoint wrapper
    if not isinstance(state, dict):
        raise UsageError(f"{path}: expected a state dict (a dict of tensors), got {type(state).__name__}")
    return DinoViT.from_state_dict(state, num_heads, where=str(path))


class DINOv2Detector(Detector):
    """FD_DINOv2's detector: :func:`preprocess` then :class:`DinoViT`'s CLS token (1024-d for ViT-L)."""

    name = "dinov2"
    mode = "bicubic-224"

    def __init__(self, weights: str | os.PathLike, device: str | torch.device = "cpu",
                 num_heads: int | None = None):
        super().__init__(device)
        self.weights = Path(weights)
        self.net = load_dinov2(self.weights, num_heads).to(self.device).eval().requires_grad_(False)
        self.feature_dim = int(self.net.cls_token.shape[-1])

    def _features(self, images: torch.Tensor) -> torch.Tensor:
        try:
            return self.net(preprocess(images))
        except torch.OutOfMemoryError:
            raise UsageError(f"DINOv2 ran out of memory on a batch of {images.shape[0]} images: lower --batch") from None
