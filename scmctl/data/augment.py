"""EDM's non-leaking augmentation (Karras et al. 2022, App. C.4 and Sec. 5; the augment pipe of
Karras et al. 2020, "Training GANs with limited data", as EDM configures it for CIFAR-10).

Every image of a batch draws its own transform. With the overall probability p (EDM's CIFAR-10
setting: 0.12), EDM enables these six, in this order, each drawn independently:

    x-flip           always enabled (EDM's multiplier 1e8·p ≥ 1), then done with probability 1/2
    y-flip           with probability p, then done with probability 1/2
    isotropic scale  with probability p: s = 2^(0.2·w), w ~ N(0, 1)
    rotation         with probability p: θ ~ U(−π, π)
    anisotropic      with probability p: s = 2^(0.2·w), w ~ N(0, 1), along axes rotated by
      scale            r ~ U(−π, π) with probability 1/2 (else r = 0)
    translation      with probability p: (w_x, w_y) ~ N(0, 1)², by (w_x·W, w_y·H)·0.125 pixels

The flips move pixels; the four geometric transforms are composed into one 3×3 matrix per image
(acting on pixel coordinates centred on the image) and applied in one bilinear resampling whose
out-of-image reads reflect at the borders (reflection padding). Images whose matrix is the
identity are not resampled at all, so unaugmented images come back bit for bit, and bilinear
interpolation never leaves the input's value range. (EDM resamples through a 2× upsampling with a
sym6 wavelet filter; here it is plain bilinear: the same transforms, a different interpolant.)

What was done is returned as EDM's 9-dim augment label, the network's extra input (zero at
sampling), in EDM's layout so that an imported EDM network's augment mapping reads it correctly:

    [x-flip, y-flip, w_scale, cos θ − 1, sin θ, w_aniso·cos r, w_aniso·sin r, w_x, w_y]

Randomness comes from the given generator, or torch's global CPU generator (the training loop
seeds it per micro-batch), and the number of draws does not depend on p, so a batch's transforms
depend only on the seed and the batch size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

AUGMENT_DIM = 9                # EDM's augment label for its CIFAR-10 pipe (network augment_dim)
XFLIP_MULTIPLIER = 1e8         # EDM: x-flips are always enabled (then done with probability 1/2)
SCALE_STD = 0.2                # log2 std of the isotropic and anisotropic scalings
ANISO_ROTATE_PROB = 0.5        # anisotropic scaling along rotated axes with this probability
TRANSLATE_STD = 0.125          # translation std as a fraction of the image side


@dataclass
class Transforms:
    """Per-image parameters (each a float64 tensor of shape (N,)); zero means not done."""
    xflip: torch.Tensor        # 0 or 1
    yflip: torch.Tensor        # 0 or 1
    scale: torch.Tensor        # w: isotropic scale 2^(0.2·w)
    rotate: torch.Tensor       # θ in radians
    aniso: torch.Tensor        # w: anisotropic scale 2^(0.2·w) along x', 2^(−0.2·w) along y'
    aniso_angle: torch.Tensor  # r: the angle of the axes x', y'
    translate_x: torch.Tensor  # w_x: translation by w_x·0.125·W pixels
    translate_y: torch.Tensor  # w_y

    @classmethod
    def identity(cls, n: int) -> "Transforms":
        return cls(*(torch.zeros(n, dtype=torch.float64) for _ in range(8)))

    def labels(self) -> torch.Tensor:
        """EDM's 9-dim augment label (N, 9), float32."""
        return torch.stack([self.xflip, self.yflip, self.scale,
                            torch.cos(self.rotate) - 1, torch.sin(self.rotate),
                            self.aniso * torch.cos(self.aniso_angle), self.aniso * torch.sin(self.aniso_angle),
                            self.translate_x, self.translate_y], dim=1).float()

    def inverse_matrices(self, height: int, width: int) -> torch.Tensor:
        """(N, 3, 3) float64 maps from output to input pixel coordinates (x right, y down, origin at
        the image centre), composed in EDM's order: scale, rotation, anisotropic scale, translation."""
        def mat(a, b, c, d, e, f):
            one, zero = torch.ones_like(a), torch.zeros_like(a)
            return torch.stack([a, b, c, d, e, f, zero, zero, one], dim=1).reshape(-1, 3, 3)

        def rot(t):
            return mat(torch.cos(t), -torch.sin(t), torch.zeros_like(t), torch.sin(t), torch.cos(t), torch.zeros_like(t))

        def scale(sx, sy):
            z = torch.zeros_like(sx)
            return mat(sx, z, z, z, sy, z)

        s = torch.exp2(SCALE_STD * self.scale)
        a = torch.exp2(SCALE_STD * self.aniso)
        z = torch.zeros_like(s)
        g = scale(1 / s, 1 / s)                                           # inverse isotropic scaling
        g = g @ rot(self.rotate)                                          # inverse of rotating by −θ
        g = g @ rot(-self.aniso_angle) @ scale(1 / a, a) @ rot(self.aniso_angle)
        g = g @ mat(1 + z, z, -self.translate_x * TRANSLATE_STD * width,
                    z, 1 + z, -self.translate_y * TRANSLATE_STD * height)
        return g


def draw(n: int, p: float, generator: Optional[torch.Generator] = None) -> Transforms:
    """Random per-image transforms for a batch of n images at augmentation probability p. The
    draws are made whatever p is (EDM's order), so p changes which transforms happen, not the
    random stream."""
    def rand(*shape):
        return torch.rand(*shape, generator=generator, dtype=torch.float64)

    def randn(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float64)

    def gate(values, prob):
        return torch.where(rand(n) < prob, values, torch.zeros_like(values))

    zero = torch.zeros(n, dtype=torch.float64)
    xflip = gate(torch.randint(2, (n,), generator=generator).double(), XFLIP_MULTIPLIER * p)
    yflip = gate(torch.randint(2, (n,), generator=generator).double(), p)
    scale = gate(randn(n), p)
    rotate = gate((rand(n) * 2 - 1) * math.pi, p)
    aniso_w, aniso_r = randn(n), (rand(n) * 2 - 1) * math.pi
    aniso = gate(aniso_w, p)
    # the axes' angle only matters when the scaling is done (zeroed otherwise: an identity stays exact)
    aniso_angle = torch.where((rand(n) < ANISO_ROTATE_PROB) & (aniso != 0), aniso_r, zero)
    translate = randn(2, n)
    done = rand(n) < p
    tx, ty = (torch.where(done, w, zero) for w in translate)
    return Transforms(xflip, yflip, scale, rotate, aniso, aniso_angle, tx, ty)


def apply(images: torch.Tensor, tf: Transforms) -> torch.Tensor:
    """The transformed images (N, C, H, W): flips, then the composed geometric transform."""
    n, _, h, w = images.shape
    dev = images.device
    images = torch.where(tf.xflip.to(dev).bool()[:, None, None, None], images.flip(3), images)
    images = torch.where(tf.yflip.to(dev).bool()[:, None, None, None], images.flip(2), images)
    g = tf.inverse_matrices(h, w)
    moved = (g - torch.eye(3, dtype=g.dtype)).abs().amax(dim=(1, 2)) > 0
    if not moved.any():
        return images
    idx = moved.nonzero().flatten()
    # output pixel centres (x, y) relative to the image centre -> input positions -> grid_sample's
    # [−1, 1] coordinates (align_corners=True: −1 and 1 are the centres of the border pixels)
    ys, xs = torch.meshgrid(torch.arange(h, dtype=g.dtype) - (h - 1) / 2,
                            torch.arange(w, dtype=g.dtype) - (w - 1) / 2, indexing="ij")
    pts = torch.stack([xs, ys, torch.ones_like(xs)], dim=-1).reshape(1, h * w, 3)
    src = pts @ g[idx].transpose(1, 2)                                    # (M, H·W, 3)
    grid = torch.stack([src[..., 0] / max((w - 1) / 2, 0.5), src[..., 1] / max((h - 1) / 2, 0.5)], dim=-1)
    grid = grid.reshape(-1, h, w, 2).to(device=dev, dtype=images.dtype)
    out = images.clone()
    out[idx.to(dev)] = torch.nn.functional.grid_sample(images[idx.to(dev)], grid, mode="bilinear",
                                                       padding_mode="reflection", align_corners=True)
    return out


def augment(images: torch.Tensor, p: float,
            generator: Optional[torch.Generator] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(augmented images, augment labels (N, 9) on the images' device). p = 0: the images
    unchanged and zero labels (the random stream is still advanced the same way)."""
    tf = draw(images.shape[0], p, generator)
    if p <= 0:
        return images, torch.zeros(images.shape[0], AUGMENT_DIM, device=images.device)
    return apply(images, tf), tf.labels().to(images.device)
