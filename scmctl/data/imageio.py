"""Reading and writing image files: PNG folders in, PNG files and grids out.

Conventions: images on disk and in arrays are uint8 HWC (C = 1 or 3); tensors in the model are
float NCHW in [-1, 1]. :func:`to_uint8` is the one quantizer used everywhere (samples, grids, FID).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Optional

import numpy as np

from scmctl.errors import UsageError
from scmctl.fileio import write_atomic

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


def list_image_files(root: str | os.PathLike, recursive: bool = True) -> list[Path]:
    """Sorted image files under ``root``; a missing or image-less folder is a UsageError."""
    root = Path(root)
    if not root.exists():
        raise UsageError(f"{root}: no such file or directory")
    if not root.is_dir():
        raise UsageError(f"{root}: expected a folder of images")
    it = root.rglob("*") if recursive else root.iterdir()
    files = sorted(p for p in it if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
                   and not p.name.startswith("."))
    if not files:
        raise UsageError(f"{root}: no image files ({', '.join(IMAGE_EXTENSIONS[:3])}, ...) found")
    return files


def list_class_tree(root: str | os.PathLike) -> tuple[list[Path], Optional[list[int]], list[str]]:
    """(files, labels or None, class names) of an image folder: class subfolders in sorted name
    order (labels 0..K-1, images nested at any depth inside; an empty class is a UsageError), or
    loose images (unlabeled). A folder holding both is a UsageError."""
    root = Path(root)
    entries = sorted(e for e in root.iterdir() if not e.name.startswith("."))
    subdirs = [e for e in entries if e.is_dir()]
    loose = [e for e in entries if e.is_file() and e.suffix.lower() in IMAGE_EXTENSIONS]
    if subdirs and loose:
        raise UsageError(f"{root}: holds both images ({loose[0].name}) and subfolders "
                         f"({subdirs[0].name}); put every image in a class subfolder, or remove "
                         f"the subfolders for unlabeled data")
    if not subdirs:
        return list_image_files(root, recursive=False), None, []
    files: list[Path] = []
    labels: list[int] = []
    for k, d in enumerate(subdirs):
        class_files = list_image_files(d, recursive=True)
        files += class_files
        labels += [k] * len(class_files)
    return files, labels, [d.name for d in subdirs]


GRAY_MODES = ("1", "L", "LA", "I", "F")  # plus I;16, I;16B, I;16L, I;16N


def to_8bit(im):
    """A PIL image as what it shows, in mode L (grayscale) or RGB:

    - 16-bit grayscale (``I;16*``) and 32-bit ``I`` hold 0..65535: divided by 257 (65535 -> 255),
      rounded; ``I`` values outside that range are clipped;
    - ``F`` (float) holds 0..1: multiplied by 255, rounded, clipped;
    - ``LA`` drops its alpha; palette images with transparency, ``PA`` and ``RGBA`` drop their alpha
      after the palette lookup (the colour under the alpha, as ADM's convert("RGB") does); CMYK,
      YCbCr, LAB and HSV are converted to RGB by Pillow.
    """
    import numpy as np
    from PIL import Image

    mode = im.mode
    if mode.startswith("I;16") or mode == "I":
        a = np.clip(np.asarray(im, dtype=np.float64), 0, 65535) / 257.0
        return Image.fromarray(np.round(a).astype(np.uint8), mode="L")
    if mode == "F":
        a = np.clip(np.nan_to_num(np.asarray(im, dtype=np.float64)), 0.0, 1.0) * 255.0
        return Image.fromarray(np.round(a).astype(np.uint8), mode="L")
    if mode in GRAY_MODES:
        return im.convert("L")
    if mode == "P" and "transparency" in im.info or mode == "PA":
        return im.convert("RGBA").convert("RGB")
    return im.convert("RGB")


def _open_image(path):
    """A loaded PIL image; anything Pillow refuses (format, truncation, decompression bomb) is a
    one-line UsageError."""
    from PIL import Image, UnidentifiedImageError

    try:
        im = Image.open(path)
        im.load()
        return im
    except Image.DecompressionBombError:
        raise UsageError(f"{path}: refusing to decode an image of more than {2 * Image.MAX_IMAGE_PIXELS:,} "
                         "pixels (a decompression bomb?)") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise UsageError(f"{path}: cannot read image ({e.__class__.__name__})") from None


def read_image(path: str | os.PathLike) -> np.ndarray:
    """One image as uint8 HWC with C = 1 (grayscale) or 3 (RGB), read as it shows (:func:`to_8bit`);
    unreadable files are UsageErrors."""
    with _open_image(path) as im:
        arr = np.asarray(to_8bit(im))
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return np.ascontiguousarray(arr, dtype=np.uint8)


def center_crop_adm(image, resolution: int) -> np.ndarray:
    """ADM's center crop of a PIL image to uint8 (resolution, resolution, C), as in ADM
    (Dhariwal & Nichol 2021, guided-diffusion ``center_crop_arr``) and the sCM ImageNet setups:

    1. while the shorter side is >= 2·resolution, halve both sides (floor) with PIL's BOX filter;
    2. resize with PIL's BICUBIC so the shorter side becomes ``resolution`` (the longer side
       ``round(side·scale)``, Python's round);
    3. cut the centred square at offsets ((H − resolution)//2, (W − resolution)//2). No flips.
    """
    from PIL import Image

    while min(image.size) >= 2 * resolution:
        image = image.resize((image.width // 2, image.height // 2), resample=Image.BOX)
    scale = resolution / min(image.size)
    image = image.resize((round(image.width * scale), round(image.height * scale)),
                         resample=Image.BICUBIC)
    arr = np.asarray(image)
    y = (arr.shape[0] - resolution) // 2
    x = (arr.shape[1] - resolution) // 2
    return np.ascontiguousarray(arr[y:y + resolution, x:x + resolution])


def read_image_adm(path: str | os.PathLike, resolution: int) -> np.ndarray:
    """An image file as RGB (every mode read as it shows, :func:`to_8bit`), ADM center-cropped to
    uint8 (resolution, resolution, 3); unreadable files are UsageErrors."""
    with _open_image(path) as im:
        rgb = to_8bit(im).convert("RGB")
    return center_crop_adm(rgb, resolution)


def write_png(path: str | os.PathLike, image: np.ndarray) -> None:
    """Write uint8 HWC (or HW) as PNG atomically: a half-written file never has the final name."""
    from PIL import Image

    path = Path(path)
    arr = np.asarray(image)
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    write_atomic(path, lambda f: Image.fromarray(arr).save(f, format="PNG"), fsync=False)


def to_uint8(x):
    """Float NCHW tensor in [-1, 1] -> uint8 NHWC numpy array (round to nearest, clamp)."""
    import torch

    y = (x.detach().float() * 127.5 + 127.5).round().clamp(0, 255).to(torch.uint8)
    return y.permute(0, 2, 3, 1).cpu().numpy()


def from_uint8(images: np.ndarray):
    """uint8 NHWC numpy array -> float32 NCHW tensor in [-1, 1]."""
    import torch

    t = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float()
    return t / 127.5 - 1.0


def make_grid(images: np.ndarray, ncol: int | None = None, pad: int = 1) -> np.ndarray:
    """Tile uint8 NHWC images into one uint8 HWC image (near-square by default)."""
    n, h, w, c = images.shape
    ncol = ncol or max(1, math.ceil(math.sqrt(n)))
    nrow = math.ceil(n / ncol)
    grid = np.zeros((nrow * (h + pad) + pad, ncol * (w + pad) + pad, c), dtype=np.uint8)
    for i in range(n):
        r, q = divmod(i, ncol)
        y, x = pad + r * (h + pad), pad + q * (w + pad)
        grid[y:y + h, x:x + w] = images[i]
    return grid


def save_grid(path: str | os.PathLike, images: np.ndarray, ncol: int | None = None) -> None:
    """Write a grid of uint8 NHWC images as one PNG (atomically)."""
    write_png(path, make_grid(images, ncol))
