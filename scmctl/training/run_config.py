"""The config a training run executes, decided once before it starts.

``config.resolve`` turns a preset, the method and the overrides into the requested config. Before
the run, :func:`resolve_for_run` makes the one copy the run uses, and nothing edits it later:

- the network of the checkpoint the run starts from (``--init`` / the sCD teacher), keeping the
  fields a student sets itself (:data:`OWN_NETWORK_FIELDS`) and the time conditioning when the
  user converts it (:data:`CONVERTIBLE_NETWORK_FIELDS`, e.g. an imported EDM/EDM2 teacher moved to
  c_noise = t with ``--set network.time_embedding=positional``);
- what the data says: network.resolution/channels/num_classes, a latent dataset's encoder and
  normalization;
- the sCD teacher's model space: the data must be encoded and normalized as the teacher's was;
- the sCD student's guidance input (a guided teacher, loss.max_guidance > 1, conditional data);
- a multistep model's segment boundaries (loss.segment_boundaries; null = the default placement);
- what the hardware setup forces: the effective loss.jvp_mode (:func:`effective_jvp_mode`; the
  separate mode for discrete-time sCM, loss.discrete_steps > 0, which has no jvp; its sCT takes the
  exact x_t' of each pair, so loss.sct_velocity runs as conditional); loss.sct_references only
  where sCT's batch velocity runs (else 0, with a note) and, under
  train.compile, the attention backend that ``auto`` means.

config.yaml and every checkpoint record this config, so a run directory shows what actually ran.
"""

from __future__ import annotations

import copy
from typing import Optional, Sequence

from scmctl.config import Config, from_dict, runs_batch_velocity, validate
from scmctl.errors import UsageError
from scmctl.segments import resolved_boundaries
from scmctl.training.parallel import effective_jvp_mode

# Network fields a student takes from its own config rather than from the checkpoint it starts from.
OWN_NETWORK_FIELDS = ("dropout", "dropout_max_resolution", "label_dropout", "guidance_input",
                      "attention_backend", "attention_jvp")
# Network fields a `--set` may change against the checkpoint the run starts from: the architecture
# change sCM makes (Lu & Song 2025, Sec. 4.1; SANA-Sprint does it to a pretrained teacher by a
# short diffusion fine-tune): EDM's c_noise = ln(σ)/4 with Fourier features -> c_noise = t with a
# positional embedding. The old embedding's fixed frequency buffers are dropped
# (:func:`start_weights`); every other weight still loads with its shape checked.
CONVERTIBLE_NETWORK_FIELDS = ("time_embedding", "time_embedding_scale")
EMBEDDING_BUFFERS = ("freqs", "phases")
EDM_TIME_WARNING = (
    "warning: the student keeps EDM's time conditioning c_noise = ln(σ_d·tan t)/4 "
    "(network.time_embedding=edm): its derivative 1/(2 sin 2t) diverges at both ends of [0, π/2], "
    "which makes continuous-time consistency training unstable (Lu & Song 2025, Sec. 4.1). Watch "
    "tangent_rms_t0..t3 (the per-t-bin tangent RMS) in the run's stats.jsonl: a bin that keeps "
    "growing announces divergence. The stable road: scmctl train --objective diffusion --init "
    "TEACHER --set network.time_embedding=positional, then distill with --init.")

DISCRETE_BF16_WARNING = (
    "warning: loss.discrete_steps > 0 under train.precision=bf16 takes the finite difference "
    "(F⁻(x_t, t) − F⁻(x_t', t'))/(t − t') of bf16 outputs, whose rounding noise is of the order of "
    "the tangent itself at N ≈ 1000; set loss.jvp_fp32=true to run the two tangent forwards in fp32")


def resolve_for_run(cfg: Config, *, world: int = 1, device: str = "auto", dataset=None,
                    source: Optional[dict] = None, teacher: Optional[dict] = None,
                    set_keys: Sequence[str] = ()) -> tuple[Config, list[str]]:
    """(the run's config, notes for the user). `cfg`: the requested config (not modified);
    `world`: the number of processes; `device`: the run's device name (train.compile resolves the
    attention backend for it); `dataset`: the training data (None: the network's sizes must be
    set); `source`: the checkpoint dict the weights start from (``--init`` or the teacher);
    `teacher`: the sCD teacher's checkpoint dict; `set_keys`: the dotted keys the user set."""
    cfg = copy.deepcopy(cfg)
    notes: list[str] = []
    if source is not None:
        _network_from(cfg, source, set_keys)
    if dataset is not None:
        _fill_from_data(cfg, dataset)
        if teacher is not None:
            _check_teacher_data(cfg, teacher)
    if cfg.method != "diffusion" and cfg.network.time_embedding == "edm":
        notes.append(EDM_TIME_WARNING)
    if cfg.method == "scd" and cfg.loss.max_guidance > 1 and cfg.network.num_classes:
        cfg.network.guidance_input = True  # the student takes the teacher's guidance scale s
    validate(cfg)
    if cfg.loss.segments > 1:  # a multistep model's checkpoints carry its boundaries (`sample` reads them)
        cfg.loss.segment_boundaries = resolved_boundaries(cfg.loss.segment_boundaries, cfg.loss.segments,
                                                          cfg.data.sigma_data, cfg.loss.segment_spacing)
    mode, why = effective_jvp_mode(cfg, world)
    if mode != cfg.loss.jvp_mode:
        notes.append(f"loss.jvp_mode={cfg.loss.jvp_mode} runs as {mode}: {why}")
        cfg.loss.jvp_mode = mode
    if cfg.loss.sct_velocity != "conditional" and not runs_batch_velocity(cfg.loss):
        notes.append(f"loss.sct_velocity={cfg.loss.sct_velocity} runs as conditional: discrete-time sCT "
                     "takes the exact point x_t' of each sample's own pair")
        cfg.loss.sct_velocity = "conditional"
    if cfg.loss.sct_references and not (cfg.method == "sct" and runs_batch_velocity(cfg.loss)):
        # e.g. the tiny preset's sct_init asks for references and the user picks the conditional velocity
        notes.append(f"loss.sct_references={cfg.loss.sct_references} unused: only sCT's batch velocity "
                     "averages over references")
        cfg.loss.sct_references = 0
    if cfg.loss.discrete_steps and cfg.train.precision == "bf16" and not cfg.loss.jvp_fp32:
        notes.append(DISCRETE_BF16_WARNING)
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


def _network_from(cfg: Config, source: dict, set_keys: Sequence[str] = ()) -> None:
    """The network must match the weights it starts from (up to the fields it may change)."""
    net_cfg = from_dict({"network": source["config"]["network"]}).network
    converted = tuple(f for f in CONVERTIBLE_NETWORK_FIELDS if f"network.{f}" in set_keys)
    for f in OWN_NETWORK_FIELDS + converted:
        setattr(net_cfg, f, getattr(cfg.network, f))
    cfg.network = net_cfg
    sigma = source["config"]["data"]["sigma_data"]
    if abs(sigma - cfg.data.sigma_data) > 1e-12:
        raise UsageError(f"{source.get('path', 'checkpoint')}: was trained with sigma_data={sigma}, "
                         f"config has {cfg.data.sigma_data}")


def start_weights(state: dict, net_cfg, source_net: dict) -> dict:
    """The weights a run starts from (a checkpoint's EMA state dict): with the time embedding
    converted (:data:`CONVERTIBLE_NETWORK_FIELDS`), the old embedding's fixed frequency buffers,
    which the new network does not have, are left out; nothing else changes."""
    if all(source_net.get(f) == getattr(net_cfg, f) for f in CONVERTIBLE_NETWORK_FIELDS):
        return state
    from scmctl.nn.networks import build_network

    own = build_network(net_cfg, "meta").state_dict()
    return {k: v for k, v in state.items() if k in own or k.rsplit(".", 1)[-1] not in EMBEDDING_BUFFERS}


def _check_teacher_data(cfg: Config, teacher: dict) -> None:
    """The student's data must be in the teacher's model space (same VAE, normalization, pixels)."""
    t = teacher["config"]["data"]
    for key in ("encoder", "latent_mean", "latent_std", "vae_pixel_range"):
        have, want = getattr(cfg.data, key), t.get(key, "signed" if key == "vae_pixel_range" else None)
        if key in ("latent_mean", "latent_std") and have and want:
            same = len(have) == len(want) and all(abs(a - b) <= 1e-6 * max(1.0, abs(b)) for a, b in zip(have, want))
        else:
            same = (have or None) == (want or None)
        if not same:
            hint = (f"; prepare the latents as the teacher saw them: scmctl data latents SRC --out DIR "
                    f"--vae {t.get('encoder')} --latent-mean {','.join(map(str, t.get('latent_mean') or []))} "
                    f"--latent-std {','.join(map(str, t.get('latent_std') or []))} "
                    f"--vae-pixel-range {t.get('vae_pixel_range', 'signed')}") if t.get("encoder") else ""
            raise UsageError(f"--teacher {teacher.get('path', 'checkpoint')}: was trained with "
                             f"data.{key}={want!r}, the data gives {have!r}{hint}")


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
