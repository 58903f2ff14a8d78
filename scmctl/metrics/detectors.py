"""Feature detectors for FID, FD_DINOv2, KID and precision/recall: uint8 images in, (N, D) out.

A :class:`Detector` takes a uint8 NCHW tensor (1 or 3 channels; grayscale is repeated to RGB) and
returns float32 (N, D) features on the CPU; :meth:`Detector.sha256` identifies its weights file.
Three kinds exist:

- :class:`InceptionDetector`: clean-fid's TF-Inception (pool3, 2048-d), built offline from a local
  ``inception-2015-12-05.pt`` (see :func:`find_inception_weights`; clean-fid's downloader is
  never reached).
  ``legacy_tensorflow`` feeds the uint8 images at native size to the network, which resizes inside
  (what EDM and sCM report); ``clean`` first resizes each channel to 299×299 with PIL bicubic in
  float (clean-fid's own resizer) and feeds the network without its internal resize.
- :class:`~scmctl.metrics.dinov2.DINOv2Detector`: DINOv2 ViT-L/14 CLS features (1024-d) for
  FD_DINOv2 (EDM2), from a local ``dinov2_vitl14_pretrain.pth``.
- :class:`TorchScriptDetector`: any TorchScript module mapping uint8 NCHW (3 channels) to (N, D)
  features, fed at native size (mode ``native``): for offline use and other domains.

Weights are offline-first (:func:`find_weights`): an explicit ``--inception``/``--dinov2`` path,
then ``$SCMCTL_CACHE`` (default ``~/.cache/scmctl``), then read-only copies other tools left behind.
A missing file is one UsageError line naming the file, its public URL and where to put it; only
``--download`` fetches it (into the cache, atomically, with a timeout), never with
``SCMCTL_OFFLINE=1`` or ``HF_HUB_OFFLINE=1``.
"""

from __future__ import annotations

import os
import platform
import shutil
import tempfile
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from scmctl.errors import UsageError
from scmctl.fileio import sha256_file, write_atomic  # noqa: F401  (sha256_file: re-exported by scmctl.metrics)

INCEPTION_FILE = "inception-2015-12-05.pt"
INCEPTION_URL = ("https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/"
                 + INCEPTION_FILE)
INCEPTION_MODES = ("legacy_tensorflow", "clean")
DEFAULT_INCEPTION_MODE = "legacy_tensorflow"
NATIVE_MODE = "native"

# Where clean-fid itself downloads the weights (read-only use; a module attribute so tests can
# switch the fallback off and never touch the real path).
CLEANFID_WEIGHT_DIRS: tuple[str, ...] = ("./",) if platform.system() == "Windows" else ("/tmp",)

DINOV2_FILE = "dinov2_vitl14_pretrain.pth"
DINOV2_URL = "https://dl.fbaipublicfiles.com/dinov2/dinov2_vitl14/" + DINOV2_FILE
# torch.hub's download folder (EDM2 fetches DINOv2 through torch.hub): read-only use, a module
# attribute so tests can switch it off.
DINOV2_WEIGHT_DIRS: tuple[str, ...] = (
    str(Path(os.environ.get("TORCH_HOME") or "~/.cache/torch").expanduser() / "hub" / "checkpoints"),)
DOWNLOAD_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class WeightsFile:
    """A detector's weights: file name, public URL, the option that points at it, read-only dirs."""

    what: str
    file: str
    url: str
    option: str

    def extra_dirs(self) -> tuple[str, ...]:
        return CLEANFID_WEIGHT_DIRS if self.file == INCEPTION_FILE else DINOV2_WEIGHT_DIRS


INCEPTION_WEIGHTS = WeightsFile("Inception", INCEPTION_FILE, INCEPTION_URL, "--inception")
DINOV2_WEIGHTS = WeightsFile("DINOv2 ViT-L/14", DINOV2_FILE, DINOV2_URL, "--dinov2")


def cache_dir() -> Path:
    """scmctl's cache folder: ``$SCMCTL_CACHE``, default ``~/.cache/scmctl``."""
    return Path(os.environ.get("SCMCTL_CACHE") or "~/.cache/scmctl").expanduser()


def offline() -> bool:
    """True when ``SCMCTL_OFFLINE`` or ``HF_HUB_OFFLINE`` is set to a true value (1, true, yes, on)."""
    return any(os.environ.get(k, "").strip().lower() in ("1", "true", "yes", "on")
               for k in ("SCMCTL_OFFLINE", "HF_HUB_OFFLINE"))


def weight_candidates(spec: WeightsFile) -> list[Path]:
    """Where :func:`find_weights` looks, in order (after the explicit option)."""
    return [cache_dir() / spec.file] + [Path(d) / spec.file for d in spec.extra_dirs()]


def inception_weight_candidates() -> list[Path]:
    return weight_candidates(INCEPTION_WEIGHTS)


def find_weights(spec: WeightsFile, explicit: str | os.PathLike | None = None,
                 download: bool = False) -> Path:
    """The local weights file; a one-line UsageError (and no network access) if absent.

    ``explicit`` (``--inception``/``--dinov2``) may be the file itself or a folder holding it.
    With ``download`` (and not offline) a missing file is fetched into the cache first.
    """
    if explicit is not None:
        p = Path(explicit).expanduser()
        if p.is_dir():
            p = p / spec.file
        if not p.is_file():
            raise UsageError(f"{spec.option} {explicit}: no such file (expected {spec.file}, from {spec.url})")
        return p
    for p in weight_candidates(spec):
        if p.is_file():
            return p
    if download and not offline():
        return download_weights(spec)
    where = (f"download {spec.url} and put it in {cache_dir()}/ (or set SCMCTL_CACHE=DIR, or pass "
             f"{spec.option} FILE")
    if offline():
        raise UsageError(f"{spec.what} weights {spec.file} not found and offline mode is on "
                         f"(SCMCTL_OFFLINE/HF_HUB_OFFLINE): {where})")
    raise UsageError(f"{spec.what} weights {spec.file} not found: {where}, or add --download)")


def find_inception_weights(explicit: str | os.PathLike | None = None, download: bool = False) -> Path:
    """:func:`find_weights` for clean-fid's ``inception-2015-12-05.pt``."""
    return find_weights(INCEPTION_WEIGHTS, explicit, download)


def download_weights(spec: WeightsFile, timeout: float = DOWNLOAD_TIMEOUT_S) -> Path:
    """Fetch ``spec.url`` into the cache: a temporary file renamed into place when complete."""
    import urllib.request
    from urllib.error import URLError

    if offline():
        raise UsageError(f"refusing to download {spec.url}: offline mode is on (SCMCTL_OFFLINE/HF_HUB_OFFLINE)")
    dest = cache_dir() / spec.file
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        with urllib.request.urlopen(spec.url, timeout=timeout) as r:
            write_atomic(dest, lambda f: shutil.copyfileobj(r, f, 1 << 20))
    except (URLError, OSError, TimeoutError) as e:
        raise UsageError(f"cannot download {spec.url} ({e.__class__.__name__}: {str(e)[:120]}): download "
                         f"it yourself and put it in {dest.parent}/") from None
    return dest


def _load_torchscript(path: Path, map_location: str | torch.device = "cpu") -> torch.jit.ScriptModule:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load is deprecated in torch 2.9+
        return torch.jit.load(str(path), map_location=map_location)


class Detector:
    """Base class: ``features(uint8 NCHW) -> float32 (N, D)`` on the CPU.

    Subclasses set ``name`` and ``mode`` and implement :meth:`_features` on 3-channel uint8 images
    already on ``self.device``. ``feature_dim`` is known up front or after the first batch.
    """

    name: str = "detector"
    mode: str = NATIVE_MODE
    feature_dim: int | None = None
    weights: Path | None = None  # the file whose sha256 identifies the detector

    def __init__(self, device: str | torch.device = "cpu"):
        self.device = torch.device(device)
        self._sha256: str | None = None

    def sha256(self) -> str | None:
        """sha256 of the weights file (computed once), recorded with every statistic and result."""
        if self._sha256 is None and self.weights is not None:
            self._sha256 = sha256_file(self.weights)
        return self._sha256

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Features of a batch of uint8 NCHW images (C = 1 or 3), as float32 (N, D) on the CPU."""
        if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError("Detector.features expects a uint8 NCHW tensor")
        if images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1)
        elif images.shape[1] != 3:
            raise UsageError(f"images have {images.shape[1]} channels; expected 1 (grayscale) or 3 (RGB)")
        n = images.shape[0]
        with torch.no_grad():
            f = self._features(images.contiguous().to(self.device))
        if not isinstance(f, torch.Tensor) or f.ndim != 2 or f.shape[0] != n:
            shape = tuple(f.shape) if isinstance(f, torch.Tensor) else type(f).__name__
            raise UsageError(f"detector {self.name} returned {shape} for {n} images; expected (N, D) features")
        if self.feature_dim is None:
            self.feature_dim = int(f.shape[1])
        elif f.shape[1] != self.feature_dim:
            raise UsageError(f"detector {self.name} returned {f.shape[1]}-d features after {self.feature_dim}-d ones")
        f = f.detach().float().cpu()
        if not torch.isfinite(f).all():
            raise UsageError(f"detector {self.name} returned non-finite features")
        return f

    def _features(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def describe(self) -> str:
        return f"{self.name} ({self.mode})"


class TorchScriptDetector(Detector):
    """A user's TorchScript module: uint8 NCHW (3 channels) at native size -> (N, D) features."""

    mode = NATIVE_MODE

    def __init__(self, path: str | os.PathLike, device: str | torch.device = "cpu"):
        super().__init__(device)
        self.path = Path(path)
        self.weights = self.path
        self.name = str(path)
        if not self.path.is_file():
            raise UsageError(f"--detector {path}: no such file (use 'inception', 'dinov2' or a TorchScript .pt file)")
        try:
            module = _load_torchscript(self.path)
        except Exception as e:  # zip/format errors come as RuntimeError, others vary
            first = str(e).strip().splitlines()[0] if str(e).strip() else e.__class__.__name__
            raise UsageError(f"--detector {path}: not a TorchScript module ({first}); save one with "
                             "torch.jit.script(model).save(path)") from None
        self.module = module.to(self.device).eval()

    def _features(self, images: torch.Tensor) -> torch.Tensor:
        try:
            return self.module(images)
        except torch.OutOfMemoryError:
            raise UsageError(f"detector {self.name} ran out of memory on a batch of {images.shape[0]} "
                             "images: lower --batch") from None
        except Exception as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else e.__class__.__name__
            raise UsageError(f"detector {self.name} failed on uint8 images of shape {tuple(images.shape)}: "
                             f"{first}") from None


class InceptionDetector(Detector):
    """clean-fid's TF-Inception pool3 features (2048-d) in ``legacy_tensorflow`` or ``clean`` mode.

    Built from clean-fid's ``InceptionV3W(path, download=False, resize_inside=...)`` on a local
    weights file, so clean-fid's download code (hard-coded /tmp, no timeout) is never reached.
    """

    name = "inception"
    feature_dim = 2048

    def __init__(self, weights: str | os.PathLike, mode: str = DEFAULT_INCEPTION_MODE,
                 device: str | torch.device = "cpu", workers: int | None = None):
        super().__init__(device)
        if mode not in INCEPTION_MODES:
            raise UsageError(f"--mode {mode}: expected one of {', '.join(INCEPTION_MODES)}")
        self.mode = mode
        self.weights = Path(weights)
        self.workers = workers or min(8, os.cpu_count() or 1)
        from cleanfid.inception_torchscript import InceptionV3W  # lazy: clean-fid is only for eval

        folder = self.weights.parent
        tmp = None
        if self.weights.name != INCEPTION_FILE:  # InceptionV3W wants the canonical name in a folder
            tmp = tempfile.TemporaryDirectory(prefix="scmctl-inception-")
            os.symlink(self.weights.resolve(), Path(tmp.name) / INCEPTION_FILE)
            folder = Path(tmp.name)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                net = InceptionV3W(str(folder), download=False, resize_inside=(mode == "legacy_tensorflow"))
        except Exception as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else e.__class__.__name__
            raise UsageError(f"cannot load Inception weights {self.weights} ({first}): the file may be "
                             f"truncated; delete it and download {INCEPTION_URL} again") from None
        finally:
            if tmp is not None:
                tmp.cleanup()
        self.net = net.to(self.device).eval()
        self._resize = None
        if mode == "clean":
            from cleanfid.resize import build_resizer

            self._resize = build_resizer("clean")  # PIL bicubic on float channels, 299x299, clipped

    def _features(self, images: torch.Tensor) -> torch.Tensor:
        if self.mode == "legacy_tensorflow":
            # Values 0..255 as float; the TorchScript graph resizes to 299 and normalizes inside.
            return self.net(images.float())
        hwc = images.permute(0, 2, 3, 1).cpu().numpy()
        with ThreadPoolExecutor(max_workers=self.workers) as pool:
            resized = list(pool.map(self._resize, list(hwc)))
        x = torch.from_numpy(np.stack(resized).astype(np.float32, copy=False)).permute(0, 3, 1, 2)
        return self.net(x.contiguous().to(self.device))


DETECTORS = ("inception", "dinov2")


def load_detector(spec: str, mode: str | None = None, device: str | torch.device = "cpu",
                  inception_weights: str | os.PathLike | None = None, *,
                  dinov2_weights: str | os.PathLike | None = None, download: bool = False) -> Detector:
    """``spec`` = ``inception``, ``dinov2`` or the path of a TorchScript module; ``mode`` is
    Inception-only. Weights are looked up (with their one-line error) before anything is imported."""
    if spec != "inception" and mode is not None:
        raise UsageError(f"--mode {mode} applies to --detector inception only; "
                         + ("DINOv2 resizes to 224 bicubic" if spec == "dinov2" else
                            "a TorchScript detector gets uint8 images at native size"))
    if spec != "inception" and inception_weights is not None:
        raise UsageError("--inception applies to --detector inception only")
    if spec != "dinov2" and dinov2_weights is not None:
        raise UsageError("--dinov2 applies to the DINOv2 detector only (eval fd-dinov2, or --detector dinov2)")
    if spec == "inception":
        mode = mode or DEFAULT_INCEPTION_MODE
        if mode not in INCEPTION_MODES:
            raise UsageError(f"--mode {mode}: expected one of {', '.join(INCEPTION_MODES)}")
        return InceptionDetector(find_inception_weights(inception_weights, download), mode=mode, device=device)
    if spec == "dinov2":
        from scmctl.metrics.dinov2 import DINOv2Detector

        return DINOv2Detector(find_weights(DINOV2_WEIGHTS, dinov2_weights, download), device=device)
    return TorchScriptDetector(spec, device=device)
