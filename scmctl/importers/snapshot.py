"""Reading EDM/EDM2 network snapshots (``network-snapshot-*.pkl``) as inert data.

The snapshots are pickles of ``torch_utils.persistence`` objects that carry their modules' Python
source; :mod:`scmctl.safe_pickle` rebuilds them as :class:`~scmctl.safe_pickle.PersistentObject`
records (class name + state) without running that source. This module turns a record tree back
into what an importer needs: a flat ``{dotted name: tensor}`` state dict in float32, the
constructor keyword arguments the persistence layer recorded, and plain attributes.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch

from scmctl import safe_pickle
from scmctl.config import Config
from scmctl.errors import UsageError
from scmctl.safe_pickle import InertObject, PersistentObject


def read(path: Path) -> dict:
    """The snapshot's top-level dict (EDM: dict(ema=..., ...), EDM2: EasyDict(ema=..., ...))."""
    try:
        blob = path.read_bytes()
    except OSError as e:
        raise UsageError(f"{path}: cannot read ({e.__class__.__name__})") from None
    try:
        top = safe_pickle.loads(blob, snapshots=True)
    except pickle.UnpicklingError as e:
        raise UsageError(f"{path}: not an EDM/EDM2 network snapshot: {e}; nothing in the file was run") from None
    except safe_pickle.MALFORMED as e:
        raise UsageError(f"{path}: not a readable pickle ({e.__class__.__name__}); expected an EDM/EDM2 "
                         "network-snapshot-*.pkl") from None
    if not isinstance(top, dict) or not isinstance(top.get("ema"), PersistentObject):
        keys = ", ".join(map(str, top)) if isinstance(top, dict) else type(top).__name__
        raise UsageError(f"{path}: not an EDM/EDM2 network snapshot (expected a dict with an 'ema' "
                         f"network, found {keys or 'an empty dict'})")
    return top


def diffusion_config(net: PersistentObject, kw: dict) -> Config:
    """The config fields EDM's and EDM2's networks share, read from the preconditioner `net` and its
    U-Net's constructor arguments `kw`: image and label shape, width, blocks, attention, dropout, and
    EDM's time conditioning (c_noise = ln(σ)/4 with the snapshot's own σ_data, no AdaDN)."""
    sigma_data = float(attr(net, "sigma_data", 0.5))
    cfg = Config(method="diffusion")
    n = cfg.network
    n.resolution = int(attr(net, "img_resolution"))
    n.channels = int(attr(net, "img_channels"))
    n.num_classes = int(attr(net, "label_dim", 0))
    n.model_channels = int(kw["model_channels"])
    n.channel_mult = [int(m) for m in kw["channel_mult"]]
    n.num_blocks = int(kw["num_blocks"])
    n.attn_resolutions = [int(r) for r in kw["attn_resolutions"]]
    n.dropout = float(kw["dropout"])
    n.adaptive_double_norm = False
    n.time_embedding = "edm"
    n.edm_sigma_data = sigma_data
    cfg.data.sigma_data = sigma_data
    cfg.data.conditional = n.num_classes > 0
    return cfg


def children(record) -> dict[str, Any]:
    """A module record's submodules by name (``_modules``), in definition order."""
    state = _state(record)
    mods = state.get("_modules") or {}
    return dict(mods)


def attr(record: PersistentObject, name: str, default: Any = None) -> Any:
    return record.state.get(name, default)


def init_kwargs(record: PersistentObject) -> dict:
    """The keyword arguments the object was constructed with (EDM's persistence records them)."""
    kw = record.state.get("_init_kwargs")
    if not isinstance(kw, dict):
        raise UsageError(f"the snapshot's {record.class_name} does not record its constructor "
                         "arguments (_init_kwargs); cannot rebuild its architecture")
    return dict(kw)


def tensors(record, prefix: str = "") -> dict[str, torch.Tensor]:
    """The flat state dict (parameters and persistent buffers) of a module record, in float32."""
    state = _state(record)
    out: dict[str, torch.Tensor] = {}
    skip = set(state.get("_non_persistent_buffers_set") or ())
    for group in ("_parameters", "_buffers"):
        for name, t in (state.get(group) or {}).items():
            if t is None or name in skip:
                continue
            if not isinstance(t, torch.Tensor):
                raise UsageError(f"snapshot entry {prefix}{name} is a {type(t).__name__}, not a tensor")
            out[prefix + name] = t.detach().to(torch.float32).clone()
    for name, child in children(record).items():
        if child is not None:
            out.update(tensors(child, f"{prefix}{name}."))
    return out


def _state(record) -> dict:
    if isinstance(record, PersistentObject):
        return record.state
    if isinstance(record, InertObject) and isinstance(record.state, dict):
        return record.state
    raise UsageError(f"the snapshot holds a {type(record).__name__} where a network module was expected")
