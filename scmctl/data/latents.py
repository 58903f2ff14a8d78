"""Pixel <-> model space for pixel and latent (SD-VAE) datasets.

Model space is what the network sees as x0: pixels in [-1, 1], or VAE latents normalized per
channel (SCM_NOTES §6, EDM2's convention):

    z_norm = (z − latent_mean)·sigma_data/latent_std,      z = z_norm·latent_std/sigma_data + latent_mean

where z is the *raw* posterior of diffusers' ``AutoencoderKL`` (``encode(x).latent_dist``, x in
[-1, 1]). The VAE's own ``config.scaling_factor`` (0.18215 for sd-vae-ft-mse) is never applied:
latent_mean/latent_std (e.g. μ_c = [1.56, −0.695, 0.483, 0.729], σ_c = [5.27, 5.91, 4.21, 4.31])
are statistics of the raw latents and take its place. `sample`, `refine`, `eval` and the training
grids go through :func:`decode_to_uint8` / :func:`encode_from_uint8`, so latent models decode to
images automatically.

The VAE (``data.encoder``) is a local folder (``config.json`` + ``diffusion_pytorch_model.
safetensors``, or a pipeline folder with them under ``vae/``) or a Hugging Face id read from the
Hugging Face cache (``$HF_HUB_CACHE``, else ``$HF_HOME/hub``, else ``~/.cache/huggingface/hub``).
With ``SCMCTL_OFFLINE=1`` or ``HF_HUB_OFFLINE=1`` nothing is downloaded; otherwise a missing id is
downloaded into that cache once. A VAE that cannot be found is one UsageError line naming its URL.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from scmctl.data.imageio import from_uint8, to_uint8
from scmctl.devices import select_device
from scmctl.errors import UsageError
from scmctl.fileio import sha256_file

SD_VAE = "stabilityai/sd-vae-ft-mse"
# Per-channel statistics of sd-vae-ft-mse's raw latents on ImageNet-512 (sCM App. G, SCM_NOTES §6).
SD_VAE_LATENT_MEAN = (1.56, -0.695, 0.483, 0.729)
SD_VAE_LATENT_STD = (5.27, 5.91, 4.21, 4.31)
SCALING_NOTE = ("raw AutoencoderKL posterior (latent_dist); the VAE's config.scaling_factor is "
                "not applied, latent_mean/latent_std normalize instead")
WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
ENCODE_BATCH = 16          # images per VAE encode call (512x512 on a GPU: a few GiB)
DECODE_BATCH = 8           # latents per VAE decode call (the decoder is the heavier half)

_OFF = ("", "0", "false", "no", "off")


def is_latent(data_cfg) -> bool:
    return bool(getattr(data_cfg, "encoder", None))


# --- normalization --------------------------------------------------------------------------------

def normalize(z: torch.Tensor, latent_mean, latent_std, sigma_data: float) -> torch.Tensor:
    """Raw latents (N, C, h, w) -> model space: (z − latent_mean)·sigma_data/latent_std."""
    mean, std = _stats(latent_mean, latent_std, z)
    return (z - mean) * (sigma_data / std)


def denormalize(z_norm: torch.Tensor, latent_mean, latent_std, sigma_data: float) -> torch.Tensor:
    """Model space -> raw latents: z_norm·latent_std/sigma_data + latent_mean."""
    mean, std = _stats(latent_mean, latent_std, z_norm)
    return z_norm * (std / sigma_data) + mean


def _stats(latent_mean, latent_std, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    c = like.shape[1]
    if len(latent_mean) != c or len(latent_std) != c:
        raise UsageError(f"data.latent_mean/latent_std have {len(latent_mean)}/{len(latent_std)} "
                         f"values but the latents have {c} channels")
    kw = dict(dtype=like.dtype, device=like.device)
    return (torch.as_tensor(list(latent_mean), **kw).view(1, c, 1, 1),
            torch.as_tensor(list(latent_std), **kw).view(1, c, 1, 1))


# --- model space <-> uint8 images -----------------------------------------------------------------

def decode_to_uint8(data_cfg, x0: torch.Tensor, device=None) -> np.ndarray:
    """Model-space samples (N, C, H, W) -> uint8 NHWC images (latents: denormalize, VAE-decode)."""
    if not is_latent(data_cfg):
        return to_uint8(x0)
    _require_stats(data_cfg)
    vae = load_vae(data_cfg.encoder, device if device is not None else x0.device)
    z = denormalize(x0.detach().float(), data_cfg.latent_mean, data_cfg.latent_std,
                    data_cfg.sigma_data)
    return vae.decode(z)


def encode_from_uint8(data_cfg, images: np.ndarray, device=None) -> torch.Tensor:
    """uint8 NHWC images -> model-space float32 NCHW on ``device`` (latents: VAE-encode the
    posterior mean, normalize). Images must already have the VAE's pixel size (latent side × 8
    for sd-vae-ft-mse): :func:`scmctl.data.imageio.center_crop_adm` makes them so."""
    if not is_latent(data_cfg):
        x = from_uint8(images)
        return x.to(device) if device is not None else x
    _require_stats(data_cfg)
    vae = load_vae(data_cfg.encoder, device if device is not None else "cpu")
    mean, _ = vae.encode(images)
    z = normalize(mean, data_cfg.latent_mean, data_cfg.latent_std, data_cfg.sigma_data)
    return z.to(device) if device is not None else z


def pixel_resolution(data_cfg, model_resolution: int) -> int:
    """The image side that the model's x0 side stands for (latents: × the VAE's downsampling)."""
    if not is_latent(data_cfg):
        return model_resolution
    return model_resolution * load_vae(data_cfg.encoder, "cpu").downsampling


def fill_from_latent_data(dc, ds) -> None:
    """Fill the data config ``dc``'s encoder/latent_mean/latent_std from a latent dataset ``ds``
    where unset, or check that they agree with the normalization it records (relative tolerance
    1e-6); sigma_data must agree too."""
    import math

    where = f"{ds.root} (scmctl data info {ds.root})"
    if dc.xflip:
        raise UsageError("data.xflip would flip latents, not images; latent data is used unflipped")
    if not dc.encoder:
        dc.encoder = ds.encoder
    else:
        known = {ds.encoder, ds.meta.get("encoder_path")}
        given = os.path.realpath(os.path.expanduser(dc.encoder)) if os.path.isdir(
            os.path.expanduser(dc.encoder)) else dc.encoder
        if dc.encoder not in known and given not in known:
            raise UsageError(f"data.encoder is {dc.encoder} but {where} was encoded with "
                             f"{ds.encoder}; pass --set data.encoder={ds.encoder} or re-encode")
    for key in ("latent_mean", "latent_std"):
        have = getattr(ds, key)
        want = getattr(dc, key)
        if not want:
            setattr(dc, key, list(have))
        elif len(want) != len(have) or not all(math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-9)
                                               for a, b in zip(want, have)):
            raise UsageError(f"data.{key} is {list(want)} but {where} is normalized with {have}; "
                             f"drop the setting (it is filled from the data) or re-encode with "
                             f"--{key.replace('_', '-')}")
    if not math.isclose(dc.sigma_data, ds.sigma_data, rel_tol=1e-6):
        raise UsageError(f"data.sigma_data is {dc.sigma_data} but {where} is normalized to "
                         f"sigma_data={ds.sigma_data}")


def _require_stats(data_cfg) -> None:
    if not data_cfg.latent_mean or not data_cfg.latent_std:
        raise UsageError(f"data.encoder is {data_cfg.encoder} but data.latent_mean/latent_std are "
                         f"empty; they come from the latent dataset (scmctl data info DIR)")


# --- the VAE --------------------------------------------------------------------------------------

@dataclass
class VAE:
    """A loaded ``AutoencoderKL`` in eval mode, fp32, with where it came from."""

    model: object
    spec: str                          # as given: Hugging Face id or folder
    path: Path                         # the local folder it was read from
    weights_file: Path
    device: torch.device
    _sha256: str | None = field(default=None, repr=False)

    @property
    def latent_channels(self) -> int:
        return int(self.model.config.latent_channels)

    @property
    def downsampling(self) -> int:
        return 2 ** (len(self.model.config.block_out_channels) - 1)

    @property
    def scaling_factor(self) -> float:
        return float(self.model.config.scaling_factor)

    @property
    def sha256(self) -> str:
        if self._sha256 is None:
            self._sha256 = file_sha256(self.weights_file)
        return self._sha256

    @property
    def revision(self) -> str | None:
        """The Hugging Face commit when read from the hub cache (…/snapshots/<commit>/)."""
        parts = self.path.parts
        if "snapshots" in parts[:-1]:
            return parts[parts.index("snapshots") + 1]
        return None

    @torch.no_grad()
    def encode(self, images: np.ndarray, batch: int = ENCODE_BATCH) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 NHWC RGB -> posterior (mean, std), raw latents as float32 NCHW on the CPU."""
        if images.ndim != 4 or images.shape[3] != 3:
            raise UsageError(f"the VAE encodes RGB images (N, H, W, 3), got {tuple(images.shape)}")
        f = self.downsampling
        if images.shape[1] % f or images.shape[2] % f:
            raise UsageError(f"image size {images.shape[2]}x{images.shape[1]} is not a multiple of "
                             f"the VAE's downsampling factor {f}")
        means, stds = [], []
        for i in range(0, images.shape[0], batch):
            x = from_uint8(images[i:i + batch]).to(self.device)
            dist = self.model.encode(x).latent_dist
            means.append(dist.mean.float().cpu())
            stds.append(dist.std.float().cpu())
        return torch.cat(means), torch.cat(stds)

    @torch.no_grad()
    def decode(self, z: torch.Tensor, batch: int = DECODE_BATCH) -> np.ndarray:
        """Raw latents (N, C, h, w) -> uint8 NHWC images (decoder output in [-1, 1], to_uint8)."""
        if z.ndim != 4 or z.shape[1] != self.latent_channels:
            raise UsageError(f"the VAE decodes latents (N, {self.latent_channels}, h, w), got "
                             f"{tuple(z.shape)}")
        out = [to_uint8(self.model.decode(z[i:i + batch].to(self.device, torch.float32)).sample)
               for i in range(0, z.shape[0], batch)]
        return np.concatenate(out)


_cache: dict[tuple[str, str], VAE] = {}
_lock = threading.Lock()


def load_vae(spec: str, device="cpu") -> VAE:
    """The VAE named by ``spec`` on ``device`` ("auto" = CUDA if available), loaded once per
    (folder, device) and kept for the process."""
    dev = select_device(device)
    folder = resolve_vae(spec)
    key = (str(folder), str(dev))
    with _lock:
        if key not in _cache:
            _cache[key] = _load(spec, folder, dev)
        return _cache[key]


def offline() -> bool:
    return any(os.environ.get(k, "").strip().lower() not in _OFF
               for k in ("SCMCTL_OFFLINE", "HF_HUB_OFFLINE"))


def hf_cache_dir() -> Path:
    """The Hugging Face hub cache, read from the environment at call time."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    return Path(os.environ.get("HF_HOME") or "~/.cache/huggingface").expanduser() / "hub"


def resolve_vae(spec: str) -> Path:
    """The local folder holding the VAE named by ``spec`` (module docstring: lookup order)."""
    if not spec or not isinstance(spec, str):
        raise UsageError(f"no VAE given (data.encoder / --vae is {spec!r})")
    p = Path(spec).expanduser()
    if p.is_dir():
        for folder in (p, p / "vae"):
            if (folder / "config.json").is_file() and _weights(folder) is not None:
                return folder.resolve()
        raise UsageError(f"{spec}: not a VAE folder (expected config.json and "
                         f"{WEIGHT_FILES[0]} in it or in its vae/ subfolder)")
    if p.exists() or not _is_hub_id(spec):
        raise UsageError(f"{spec}: no such VAE folder (pass a folder with config.json and "
                         f"{WEIGHT_FILES[0]}, or a Hugging Face id such as {SD_VAE})")
    return _from_hub(spec)


def _is_hub_id(spec: str) -> bool:
    parts = spec.split("/")
    return (len(parts) == 2 and all(parts) and not spec.startswith((".", "~"))
            and all(c.isalnum() or c in "-_." for c in spec.replace("/", "")))


def _weights(folder: Path) -> Path | None:
    return next((folder / w for w in WEIGHT_FILES if (folder / w).is_file()), None)


def _missing(spec: str, why: str) -> UsageError:
    return UsageError(f"VAE {spec} {why}: get it from https://huggingface.co/{spec} (e.g. "
                      f"`hf download {spec}`) into the Hugging Face cache {hf_cache_dir()} "
                      f"(HF_HOME/HF_HUB_CACHE), or pass a local folder holding its config.json and "
                      f"{WEIGHT_FILES[0]}")


def _from_hub(spec: str) -> Path:
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise UsageError("latent data needs diffusers: pip install 'scmctl[latents]'") from None
    local = offline()
    cache = hf_cache_dir()
    patterns = ["config.json", WEIGHT_FILES[0], "vae/config.json", "vae/" + WEIGHT_FILES[0]]
    try:
        root = Path(snapshot_download(spec, allow_patterns=patterns, cache_dir=str(cache),
                                      local_files_only=local))
    except Exception as e:  # offline miss, no network, unknown repo, gated repo: all one message
        why = ("is not in the cache and downloads are off (SCMCTL_OFFLINE/HF_HUB_OFFLINE)" if local
               else f"could not be downloaded ({e.__class__.__name__})")
        raise _missing(spec, why) from None
    for folder in (root, root / "vae"):
        if (folder / "config.json").is_file() and _weights(folder) is not None:
            return folder
    raise _missing(spec, f"is incomplete in the cache ({root} lacks config.json or weights)")


def _load(spec: str, folder: Path, dev: torch.device) -> VAE:
    try:
        from diffusers import AutoencoderKL
        from diffusers.utils import logging as dlogging
    except ImportError:
        raise UsageError("latent data needs diffusers: pip install 'scmctl[latents]'") from None
    dlogging.set_verbosity_error()
    try:
        import accelerate  # noqa: F401  (diffusers' low-memory loading needs it)
        low_mem = True
    except ImportError:
        low_mem = False
    try:
        model = AutoencoderKL.from_pretrained(str(folder), local_files_only=True,
                                              low_cpu_mem_usage=low_mem, torch_dtype=torch.float32)
    except (OSError, ValueError, RuntimeError, KeyError, TypeError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else e.__class__.__name__
        raise UsageError(f"{folder}: cannot load the VAE ({msg})") from None
    model = model.to(dev).eval().requires_grad_(False)
    return VAE(model=model, spec=spec, path=folder, weights_file=_weights(folder), device=dev)


_sha_cache: dict[tuple[str, int, int], str] = {}


def file_sha256(path: Path) -> str:
    """sha256 of a file (cached by real path, size and mtime)."""
    real = os.path.realpath(path)
    st = os.stat(real)
    key = (real, st.st_size, st.st_mtime_ns)
    if key not in _sha_cache:
        _sha_cache[key] = sha256_file(real)
    return _sha_cache[key]
