"""`scmctl import`: EDM/EDM2 network snapshots -> scmctl diffusion checkpoints (config + state dict).

:func:`import_snapshot` reads the pickle with the restricted unpickler (nothing in it runs),
recognizes the network class, builds scmctl's equivalent network from a config, loads the mapped
weights strictly and returns a checkpoint that every command loads like a trained teacher
(``kind: diffusion``; ``net`` and ``ema`` both hold the snapshot's EMA weights). The checkpoint's
``source`` entry records the file name, its sha256, the format, the class names and the sha256 of
each module source the pickle carried (never executed).
"""

from __future__ import annotations

import warnings
from pathlib import Path

from scmctl.errors import UsageError
from scmctl.fileio import sha256_file
from scmctl.importers import edm, edm2, snapshot


def import_snapshot(path: str | Path) -> dict:
    """The scmctl checkpoint dict for an EDM/EDM2 snapshot (see the module docstring)."""
    from scmctl.training import checkpoint as ckpt_io

    p = Path(path)
    if not p.is_file():
        raise UsageError(f"{p}: no such file")
    top = snapshot.read(p)
    try:
        fmt, cfg, model, state = _convert(top)
    except UsageError as e:
        raise UsageError(f"{p}: {e}") from None
    net = top["ema"]
    with warnings.catch_warnings():          # a meta-device model: the load only checks
        warnings.filterwarnings("ignore", message=".*meta parameter.*")
        ckpt_io.load_state(model, state, f"{p} ({fmt} {net.class_name})")   # names and shapes, strictly
    state = {k: state[k].contiguous() for k in model.state_dict()}
    enc = top.get("encoder")
    return {
        "format": ckpt_io.FORMAT, "version": ckpt_io.VERSION, "kind": "diffusion", "step": 0,
        "config": cfg.to_dict(), "net": state, "ema": state,
        "source": {"format": fmt, "file": p.name, "sha256": sha256_file(p), "class": net.class_name,
                   "encoder": getattr(enc, "class_name", None),
                   "module_sha256": sorted(_module_hashes(top)),
                   "numel": sum(v.numel() for v in state.values())},
    }


def _convert(top: dict):
    """(format, config, scmctl network to check the mapping against, mapped state dict) for the
    snapshot's EMA network. EDM2's are built on the meta device (no second copy of XXL's weights)."""
    import torch

    from scmctl import config as config_mod
    from scmctl.nn.networks import build_network

    net = top["ema"]
    if edm2.is_edm2(net):
        fmt, cfg = "edm2", edm2.config(top, net)
    elif edm.is_edm(net):
        fmt, cfg = "edm", edm.config(top, net)
    else:
        raise UsageError(f"unknown network class '{net.class_name}' (supported: EDM2 Precond "
                         "with its UNet, EDM EDMPrecond with SongUNet DDPM++/NCSN++)")
    config_mod.validate(cfg)
    if fmt == "edm2":                         # every tensor comes from the snapshot: check on meta
        return fmt, cfg, build_network(cfg.network, "meta"), edm2.state_dict(net)
    torch.manual_seed(0)                      # the layers EDM lacks (w_φ) start seeded
    model = build_network(cfg.network)
    return fmt, cfg, model, edm.state_dict(net, model.state_dict())


def _module_hashes(obj, seen=None) -> set[str]:
    from scmctl.safe_pickle import InertObject, PersistentObject

    seen = set() if seen is None else seen
    if id(obj) in seen:
        return set()
    seen.add(id(obj))
    out: set[str] = set()
    if isinstance(obj, PersistentObject):
        out.add(obj.module_sha256)
        obj = obj.state
    elif isinstance(obj, InertObject):
        obj = obj.state
    if isinstance(obj, dict):
        for v in obj.values():
            out |= _module_hashes(v, seen)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            out |= _module_hashes(v, seen)
    return out
