"""Device selection: the one place that turns a device name into a torch.device.

Training, sampling, the feature detectors and the VAE all accept ``auto`` (CUDA when available,
else the CPU), ``cpu``, ``cuda`` or ``cuda:N``; an unusable name is a UsageError with one message.
"""

from __future__ import annotations

import torch

from scmctl.errors import UsageError


def select_device(name: str | torch.device = "auto") -> torch.device:
    """``auto`` = CUDA when available, else CPU; a torch.device is returned as is."""
    if isinstance(name, torch.device):
        return name
    name = str(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        raise UsageError(f"device '{name}' is not a torch device (use auto, cpu, cuda or cuda:N)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"device '{name}': CUDA is not available on this machine (use cpu or auto)")
    return dev


def fork_rng(device: torch.device):
    """A context that restores the CPU's RNG and, on CUDA, `device`'s RNG on exit: two passes
    started from it draw the same random numbers (the same dropout mask)."""
    return torch.random.fork_rng(devices=[device] if device.type == "cuda" else [])
