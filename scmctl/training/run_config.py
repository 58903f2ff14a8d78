"""The config a training run executes, decided once before it starts.

``config.resolve`` turns a preset, the method and the overrides into the requested config. Before
the run, :func:`resolve_for_run` makes the one copy the run uses, and nothing edits it later:

- the network of the checkpoint the run starts from (``--init`` / the sCD teacher), keeping the
  fields a student sets itself (:data:`OWN_NETWORK_FIELDS`);
- what the data says: network.resolution/channels/num_classes, a latent dataset's encoder and
  normalization;
- the sCD student's guidance input (a guided teacher, loss.max_guidance > 1, conditional data);
- what the hardware setup forces: the effective loss.jvp_mode (:func:`effective_jvp_mode`) and,
  under train.compile, the attention backend that ``auto`` means.

config.yaml and every checkpoint record this config, so a run directory shows what actually ran.
"""

from __future__ import annotations

import copy
from typing import Optional

from scmctl.config import Config, from_dict, validate
from scmctl.errors import UsageError
from scmctl.training.parallel import effective_jvp_mode

# Network fields a student takes from its own config rather than from the checkpoint it starts from.
OWN_NETWORK_FIELDS = ("dropout", "dropout_max_resolution", "label_dropout", "guidance_input",
                      "attention_backend", "attention_jvp")


def resolve_for_run(cfg: Config, *, world: int = 1, device: str = "auto", dataset=None,
                    source: Optional[dict] = None) -> tuple[Config, list[str]]:
    """(the run's config, notes for the user). `cfg`: the requested config (not modified);
    `world`: the number of processes; `device`: the run's device name (train.compile resolves the
    attention backend for it); `dataset`: the training data (None: the network's sizes must be
    set); `source`: the checkpoint dict the weights start from (``--init`` or the teacher)."""
    cfg = copy.deepcopy(cfg)
    notes: list[str] = []
    if source is not None:
        _network_from(cfg, source)
    if dataset is not None:
        _fill_from_data(cfg, dataset)
    if cfg.method == "scd" and cfg.loss.max_guidance > 1 and cfg.network.num_classes:
        cfg.network.guidance_input = True  # the student takes the teacher's guidance scale s
    validate(cfg)
    mode, why = effective_jvp_mode(cfg, world)
    if mode != cfg.loss.jvp_mode:
        notes.append(f"loss.jvp_mode={cfg.loss.jvp_mode} runs as {mode}: {why}")
        cfg.loss.jvp_mode = mode
    if cfg.train.compile and cfg.network.attention_backend == "auto":
        # 'auto' probes for xformers on every call: a graph break per attention layer
        from scmctl.attention import resolve_backend
        from scmctl.devices import select_device

        if resolve_backend("auto", select_device(device)) == "sdpa":
            cfg.network.attention_backend = "sdpa"
    if cfg.train.check_grads_every and world > 1 and cfg.train.parallel == "fsdp":
        notes.append("train.check_grads_every has no effect with train.parallel=fsdp "
                     "(each process holds a different gradient shard)")
    return cfg, notes


def _network_from(cfg: Config, source: dict) -> None:
    """The network must match the weights it starts from."""
    net_cfg = from_dict({"network": source["config"]["network"]}).network
    for f in OWN_NETWORK_FIELDS:
        setattr(net_cfg, f, getattr(cfg.network, f))
    cfg.network = net_cfg
    sigma = source["config"]["data"]["sigma_data"]
    if abs(sigma - cfg.data.sigma_data) > 1e-12:
        raise UsageError(f"{source.get('path', 'checkpoint')}: was trained with sigma_data={sigma}, "
                         f"config has {cfg.data.sigma_data}")


def load_data(cfg: Config):
    """The training dataset of ``cfg.data`` (a latent config needs a prepared latent dataset)."""
    from scmctl.data.datasets import is_prepared, load_dataset, read_metadata

    path = cfg.data.path
    if path is None:
        raise UsageError("data.path is not set: name a dataset (an image folder, cifar-10-python.tar.gz, "
                         ".npz/.npy, a folder made by scmctl data, or digits)")
    if cfg.data.encoder and not (is_prepared(path) and read_metadata(path)["kind"] == "latents"):
        raise UsageError(f"the config expects VAE latents (data.encoder={cfg.data.encoder}) but "
                         f"{path} is not a latent dataset: run `scmctl data latents {path} --out DIR "
                         f"--vae {cfg.data.encoder}` and train on DIR")
    return load_dataset(path, cfg.data.resolution)


def _fill_from_data(cfg: Config, ds) -> None:
    """network.resolution/channels/num_classes from the data where unset (and equal where set); a
    latent dataset fills data.encoder/latent_mean/latent_std where unset and must agree where set."""
    from scmctl.data.latents import fill_from_latent_data

    if ds.kind == "latents":
        fill_from_latent_data(cfg.data, ds)
    c, h, w = ds.channels, ds.height, ds.width
    if h != w:
        raise UsageError(f"{ds.source}: images are {h}x{w}; scmctl trains on square images")
    net = cfg.network
    for key, have in (("resolution", h), ("channels", c)):
        want = getattr(net, key)
        if want is None:
            setattr(net, key, have)
        elif want != have:
            raise UsageError(f"network.{key} is {want} but the data ({ds.source}) has {have}")
    ncls = ds.num_classes if cfg.data.conditional else 0
    if net.num_classes is None:
        net.num_classes = ncls
    elif net.num_classes != ncls:
        raise UsageError(f"network.num_classes is {net.num_classes} but the data ({ds.source}) has {ncls} "
                         "(set data.conditional=false for unconditional training)")
