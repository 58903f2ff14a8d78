"""Configuration: dataclasses for every section, YAML presets, dotted `--set` overrides, validation.

A preset is a YAML file with the sections below plus an optional ``methods:`` mapping whose entries
(``diffusion``, ``sct``, ``scd``) overlay the sections for that training method, because the paper's
teacher and consistency-model settings differ (learning rate, P_mean/P_std, dropout, EMA, ...).
A method variant (:data:`METHOD_VARIANTS`, e.g. ``scd_avsd``: sCD with loss.vsd_weight > 0; ``sct_init``:
sCT from a pretrained network) overlays its own ``methods:`` entry on its method's when the config
asks for it.
Resolution order: dataclass defaults < preset sections < preset ``methods[method]`` <
``methods[variant]`` < ``--set``.
The resolved config is what ``--dry-run`` prints and what a run directory's ``config.yaml`` holds.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Optional

import yaml

from scmctl.data.augment import AUGMENT_DIM
from scmctl.errors import UsageError
from scmctl.sampling import SOLVERS
from scmctl.segments import SPACINGS, boundary_problem

# The training methods and the kind of model each makes (the README's Layout section):
#   method: config.method, a preset's ``methods:`` keys, run directory names;
#   kind: a checkpoint's "kind", what the samplers take.
# The command line spells sct `scmctl train` (--objective consistency) and scd `scmctl distill`.
METHOD_KINDS = {"diffusion": "diffusion", "sct": "consistency", "scd": "consistency"}
METHODS = tuple(METHOD_KINDS)
KINDS = ("diffusion", "consistency")
NETWORK_ARCHS = ("edm2", "ddpmpp", "ncsnpp")   # scmctl.nn.networks.NETWORKS builds each
# The widest power-function EMA (EDM2 Eq. 123 at γ = 0, the uniform average over training): σ_rel = √(1/12).
MAX_SIGMA_REL = math.sqrt(1 / 12)


# Method variants: a preset's ``methods:`` entry applied over its method's when the config uses it.
# scd_avsd: sCD + adaptive VSD (Lu & Song 2025, App. C; Table 5: 20k iterations on ImageNet-512).
# sct_init: sCT started from a pretrained network (--init; the paper's sCT starts from the teacher's EMA
# with the CM learning rate, App. G), where sCT from scratch keeps the sct entry's values.
METHOD_VARIANTS = {"scd_avsd": ("scd", lambda cfg: cfg.loss.vsd_weight > 0),
                   "sct_init": ("sct", lambda cfg: cfg.init is not None)}


def uses_vsd(cfg: "Config") -> bool:
    """sCD + adaptive VSD: the run trains a fake score model beside the student."""
    return cfg.method == "scd" and cfg.loss.vsd_weight > 0


def runs_batch_velocity(loss: "LossConfig") -> bool:
    """sCT's posterior-averaged velocity runs: asked for, and continuous time (discrete-time sCT
    takes the exact x_t' of each sample's own pair, so it runs the conditional velocity)."""
    return loss.sct_velocity == "batch" and not loss.discrete_steps


def model_kind(method: str) -> str:
    """The kind of model a training method makes: 'diffusion' (the teacher) or 'consistency'."""
    return METHOD_KINDS[method]


@dataclass
class DataConfig:
    path: Optional[str] = None            # dataset path; "digits" = the built-in 8x8 digits
    resolution: Optional[int] = None      # digits: upsample to this; other data: resize to this
    sigma_data: float = 0.5               # std of the data (images in [-1, 1], normalized latents)
    conditional: bool = True              # use class labels when the dataset has them
    xflip: bool = False                   # random horizontal flips (the paper uses none)
    augment_p: float = 0.0                # EDM's non-leaking augmentation probability; 0 = off
                                          # (CIFAR-10 teacher: 0.12; needs network.augment_dim = 9)
    # Latent data (ImageNet-512): the autoencoder that decodes samples, and the per-channel latent
    # statistics of z_norm = (z − latent_mean)·sigma_data/latent_std. Empty/None = pixel data.
    # Filled from a prepared latent dataset's metadata; a preset's values must agree with it.
    encoder: Optional[str] = None         # e.g. stabilityai/sd-vae-ft-mse (HF id or local folder)
    latent_mean: list[float] = field(default_factory=list)
    latent_std: list[float] = field(default_factory=list)
    # Pixel range the VAE sees: signed = [-1, 1] (diffusers' convention, sCM); unit = [0, 1] (EDM2's
    # StabilityVAEEncoder: its latent models were trained on latents of [0, 1] images).
    vae_pixel_range: str = "signed"


@dataclass
class NetworkConfig:
    """The network F_θ: `arch` picks the family (edm2: EDM2's magnitude-preserving U-Net; ddpmpp /
    ncsnpp: EDM's DDPM++ / NCSN++), the other fields configure it, with the sCM changes by default."""
    arch: str = "edm2"                    # edm2 | ddpmpp | ncsnpp (NETWORK_ARCHS)
    resolution: Optional[int] = None      # image side; None = from the data
    channels: Optional[int] = None        # image channels; None = from the data
    num_classes: Optional[int] = None     # None = from the data (0 = unconditional)
    model_channels: int = 64
    channel_mult: list[int] = field(default_factory=lambda: [1, 2, 2])
    channel_mult_emb: int = 4
    num_blocks: int = 2
    attn_resolutions: list[int] = field(default_factory=lambda: [16])
    head_channels: int = 64               # edm2; ddpmpp/ncsnpp use one attention head (EDM)
    dropout: float = 0.0
    dropout_max_resolution: int = 0       # dropout only in blocks at resolution <= this; 0 = all
    label_dropout: float = 0.0            # classifier-free guidance training
    time_embedding: str = "positional"    # positional | fourier: c_noise(t) = t; edm: EDM/EDM2's
                                          # c_noise = ln(σ_d·tan t)/4 with saved Fourier features
    time_embedding_scale: float = 1.0     # frequency multiplier on c_noise(t) = t
    edm_sigma_data: float = 0.5           # σ_d in EDM's c_noise (time_embedding=edm); = data.sigma_data
    norm_eps_outside: bool = False        # pixel norm x/(rms + ε) as EDM2 (imported snapshots)
    adaptive_double_norm: bool = True     # y = norm(x)·pnorm(s(t)) + pnorm(b(t)); False = EDM2 gain
    guidance_input: bool = False          # sCD student: guidance scale s embedded like t
    augment_dim: int = 0                  # EDM's augment label input (9) added to the embedding; 0 = none
    adaptive_weight_channels: int = 128            # adaptive weighting head w_φ(t)
    attention_backend: str = "auto"       # auto | xformers | sdpa | math
    attention_jvp: str = "auto"           # auto | chunked | fused | math


@dataclass
class TrainConfig:
    steps: int = 1000                     # total training iterations
    batch: int = 64                       # global batch size
    lr: float = 1e-3                      # α_ref
    lr_ref_steps: int = 0                 # t_ref of α(t) = α_ref/√max(t/t_ref, 1); 0 = constant
    lr_rampup_images: int = 0             # EDM/EDM2: lr × min(1, images seen/this); 0 = off (EDM2: 10M)
    optimizer: str = "adam"               # adam | radam
    betas: list[float] = field(default_factory=lambda: [0.9, 0.99])
    eps: float = 1e-8
    grad_clip: float = 0.0                # max global grad norm; 0 = off
    ema_sigma_rel: float = 0.05           # power-function EMA (EDM2); 0 = use ema_halflife_images
    ema_halflife_images: float = 0.0      # classic EMA half-life in images (CIFAR-10: 0.5M)
    # Post-hoc EMA (EDM2 Sec. 3): power-function EMAs tracked besides the one above, stored in
    # RUN_DIR/phema/ every phema_every images (0 = with every checkpoint); [] = off. `scmctl ema`
    # reconstructs any σ_rel from them.
    phema_sigma_rels: list[float] = field(default_factory=lambda: [0.05, 0.10])
    phema_every: int = 0
    seed: int = 0
    device: str = "auto"                  # auto | cpu | cuda | cuda:N
    log_every: int = 1                    # steps between stats.jsonl lines
    checkpoint_every: int = 500           # steps between checkpoints (and at the end)
    grid_every: int = 500                 # steps between sample grids (and at the end); 0 = off
    keep_checkpoints: int = 2             # newest checkpoints kept on disk; 0 = all
    # Scale-out (torchrun). `batch` is the global batch and fixes the hyperparameters; each process
    # runs micro-batches of `batch_per_gpu` and accumulates gradients over batch/(world·batch_per_gpu)
    # of them, so changing batch_per_gpu or the number of GPUs never changes the optimization.
    batch_per_gpu: int = 0                # 0 = batch/world (no accumulation)
    parallel: str = "ddp"                 # ddp | fsdp (FSDP2 fully_shard; XL/XXL presets)
    precision: str = "fp32"               # fp32 | bf16 (autocast; time embedding stays fp32)
    compile: bool = False                 # torch.compile the network
    check_grads_every: int = 0            # debug: every N steps assert gradients agree across ranks


@dataclass
class LossConfig:
    P_mean: float = -1.0                  # time proposal τ ~ N(P_mean, P_std²)
    P_std: float = 1.4
    tangent_warmup_steps: int = 10000     # H: r = min(1, step/H); 0 = off (r = 1)
    tangent_norm: str = "l2"              # l2 | rms | none: g ← g/(‖g‖ + c)
    tangent_norm_c: float = 0.1
    adaptive_weighting: bool = True       # learned w_φ(t): e^{w}/D·‖·‖² − w
    nan_masking: bool = True              # drop samples whose tangent or F⁻ is not finite
    max_guidance: float = 1.0             # sCD with CFG teacher: s ~ U[1, max_guidance]
    jvp_mode: str = "dual"                # dual: one forward carries F_θ (graph) and the tangent;
                                          # separate: no-grad torch.func.jvp, then a grad forward
    jvp_fp32: bool = False                # under train.precision=bf16: the tangent pass in fp32
    sct_velocity: str = "conditional"     # sCT's dx_t/dt: conditional = the own pair's cos t·z − sin t·x0
                                          # (Algorithm 1); batch = its posterior average over the batch
                                          # (stable target field, Xu et al. 2023; scmctl/batch_velocity.py);
                                          # discrete-time sCT runs conditional (its x_{t'} is exact)
    sct_references: int = 0               # with sct_velocity=batch: extra data examples per micro-batch
                                          # in the posterior average (Xu et al.'s larger reference batch);
                                          # unused (a run records 0 and says so) by the conditional velocity
    # multistep sCM (issue 13 part 2; Heek et al. 2024; scmctl/segments.py)
    segments: int = 1                     # M: f_θ maps t in (s_{i−1}, s_i] to s_{i−1}; 1 = sCM
    segment_boundaries: Optional[list[float]] = None  # M + 1 increasing t from 0 to t_max;
                                          # null = from segment_spacing (filled in when a run starts)
    segment_spacing: str = "uniform"      # uniform in t | edm (EDM's ρ = 7 σ grid)
    # discrete-time sCM (issue 13, part 3)
    discrete_steps: int = 0               # N > 0: finite-difference tangent on EDM's ρ=7 grid of N
                                          # steps (no jvp; scmctl.discrete); 0 = continuous time
    # sCD + adaptive VSD (issue 13, part 1; Lu & Song 2025, App. C): a fake score model F_φ and the
    # VSD generator term, both with proposals log(σ_d tan t) ~ N(P_mean, P_std²) of their own
    vsd_weight: float = 0.0               # λ_VSD; 0 = off (plain sCD); > 0 needs method scd
    vsd_P_mean: float = 0.4               # the generator term's re-noising proposal
    vsd_P_std: float = 2.0
    vsd_fake_P_mean: float = -0.8         # the fake score model's diffusion-loss proposal
    vsd_fake_P_std: float = 1.6
    vsd_norm: str = "l2"                  # l2 | rms | none: the residual F_pre − F_φ ← r/(‖r‖ + c),
                                          # c = tangent_norm_c, as the tangent (stable from the teacher's init)


@dataclass
class SampleConfig:
    steps: int = 2                        # consistency steps (t_max, t_mid, ...)
    t_mid: float = 1.1
    solver: str = "dpm2s"                 # teacher ODE solver, one of sampling.SOLVERS
    solver_steps: int = 18                # teacher: DPM-Solver-2S, 18 steps = 35 NFE
    grid_images: int = 64                 # images in the sample grids written while training


@dataclass
class Config:
    method: str = "sct"                   # diffusion | sct | scd
    teacher: Optional[str] = None         # sCD: teacher checkpoint or run directory
    init: Optional[str] = None            # initialize from this checkpoint's EMA weights
    data: DataConfig = field(default_factory=DataConfig)
    network: NetworkConfig = field(default_factory=NetworkConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# g ← g/(‖g‖ + c) or g/(‖g‖/√D + c), or none: the sCM tangent's and the VSD residual's normalization
NORMS = ("l2", "rms", "none")

CHOICES = {
    "method": METHODS,
    "network.arch": NETWORK_ARCHS,
    "data.vae_pixel_range": ("signed", "unit"),
    "network.time_embedding": ("positional", "fourier", "edm"),
    "network.attention_backend": ("auto", "xformers", "sdpa", "math"),
    "network.attention_jvp": ("auto", "chunked", "fused", "math"),
    "train.optimizer": ("adam", "radam"),
    "loss.tangent_norm": NORMS,
    "loss.vsd_norm": NORMS,
    "loss.jvp_mode": ("dual", "separate"),
    "loss.sct_velocity": ("conditional", "batch"),
    "loss.segment_spacing": SPACINGS,
    "train.parallel": ("ddp", "fsdp"),
    "train.precision": ("fp32", "bf16"),
    "sample.solver": tuple(SOLVERS),
}


# ------------------------------------------------------------------------- schema helpers ------

def _fields(cls) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def all_keys(cls=Config, prefix: str = "") -> list[str]:
    """Every dotted leaf key of the schema, e.g. 'train.lr'."""
    keys = []
    hints = _hints(cls)
    for name in _fields(cls):
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            keys += all_keys(tp, prefix + name + ".")
        else:
            keys.append(prefix + name)
    return keys


def _unknown(key: str) -> UsageError:
    near = difflib.get_close_matches(key, all_keys(), n=1, cutoff=0.4)
    hint = f"; did you mean '{near[0]}'?" if near else ""
    return UsageError(f"unknown config key '{key}'{hint}")


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Check/convert a YAML value to the schema type of `key`."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Union and type(None) in args:
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "")):
            return None
        return _coerce(key, value, next(a for a in args if a is not type(None)))
    bad = UsageError(f"config key '{key}' expects {_type_name(tp)}, got {value!r}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise bad
    if tp is int:
        if isinstance(value, bool):
            raise bad
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise bad
    if tp is float:
        if isinstance(value, bool):
            raise bad
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                raise bad from None
        raise bad
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise bad
    if origin is list:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise bad
        return [_coerce(key, v, args[0]) for v in value]
    raise bad


def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Union:
        return " or ".join(_type_name(a) for a in args if a is not type(None)) + " or null"
    if origin is list:
        return f"a list of {_type_name(args[0])}"
    return {bool: "true/false", int: "an integer", float: "a number", str: "a string"}.get(tp, str(tp))


def _apply(obj: Any, mapping: dict[str, Any], prefix: str = "") -> None:
    """Recursively apply a nested mapping onto a dataclass instance, with type checks."""
    if not isinstance(mapping, dict):
        raise UsageError(f"config section '{prefix.rstrip('.') or '<root>'}' must be a mapping")
    hints = _hints(type(obj))
    fields = _fields(type(obj))
    for name, value in mapping.items():
        key = prefix + str(name)
        if name not in fields:
            raise _unknown(key)
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            _apply(getattr(obj, name), value or {}, key + ".")
        else:
            setattr(obj, name, _coerce(key, value, tp))


def set_key(cfg: Config, key: str, value: Any) -> None:
    """Set one dotted key (typed by the schema)."""
    parts = key.split(".")
    obj = cfg
    for i, p in enumerate(parts):
        if not dataclasses.is_dataclass(obj) or p not in _fields(type(obj)):
            raise _unknown(key)
        if i == len(parts) - 1:
            tp = _hints(type(obj))[p]
            if dataclasses.is_dataclass(tp):
                raise UsageError(f"config key '{key}' is a section; set one of its fields, "
                                 f"e.g. '{key}.{next(iter(_fields(tp)))}'")
            setattr(obj, p, _coerce(key, value, tp))
        else:
            obj = getattr(obj, p)


def parse_override(text: str) -> tuple[str, Any]:
    """'train.lr=1e-4' -> ('train.lr', 1e-4); the value is parsed as YAML."""
    if "=" not in text:
        raise UsageError(f"--set expects key=value, got '{text}'")
    key, raw = text.split("=", 1)
    key = key.strip()
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    except RecursionError:
        raise UsageError(f"--set {key}: value nested too deeply") from None
    return key, value


def from_dict(d: dict[str, Any]) -> Config:
    """A config from a mapping (a run's config.yaml or a checkpoint's), read by today's schema;
    keys that older versions wrote are translated first (:func:`_upgrade`)."""
    cfg = Config()
    _apply(cfg, _upgrade(d))
    return cfg


def _upgrade(d: dict[str, Any]) -> dict[str, Any]:
    """scmctl <= 0.2 wrote train.lr_warmup_steps (a ramp-up in steps); it is lr_rampup_images now."""
    train = d.get("train")
    if not isinstance(train, dict) or "lr_warmup_steps" not in train:
        return d
    train = dict(train)
    steps = train.pop("lr_warmup_steps")
    if steps and "lr_rampup_images" not in train:
        train["lr_rampup_images"] = int(steps) * int(train.get("batch", TrainConfig.batch))
    return {**d, "train": train}


# ------------------------------------------------------------------------------ presets ---------

def _preset_root():
    """presets/ beside this source checkout when there is one (so a worktree or a PYTHONPATH checkout
    reads its own presets, not an editable install's), else the installed package scmctl.presets."""
    checkout = Path(__file__).resolve().parent.parent
    if (checkout / "pyproject.toml").is_file() and (checkout / "presets").is_dir():
        return checkout / "presets"
    return resources.files("scmctl.presets")


def preset_names() -> list[str]:
    root = _preset_root()
    return sorted(p.name[:-5] for p in root.iterdir() if p.name.endswith(".yaml"))


def read_preset(name_or_path: str) -> dict[str, Any]:
    """A preset by name (presets/NAME.yaml) or a YAML file path, as a raw mapping."""
    p = Path(name_or_path)
    if name_or_path.endswith((".yaml", ".yml")) or p.exists():
        if not p.is_file():
            raise UsageError(f"{name_or_path}: no such preset file")
        try:
            text = p.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise UsageError(f"{name_or_path}: not UTF-8 text (byte {e.start}); a preset is a YAML file") from None
        except OSError as e:
            raise UsageError(f"{name_or_path}: cannot read ({e.strerror or e.__class__.__name__})") from None
        where = str(p)
    else:
        res = _preset_root() / f"{name_or_path}.yaml"
        if not res.is_file():
            names = preset_names()
            near = difflib.get_close_matches(name_or_path, names, n=1)
            hint = f"; did you mean '{near[0]}'?" if near else ""
            raise UsageError(f"unknown preset '{name_or_path}' (available: {', '.join(names)}){hint}")
        text = res.read_text()
        where = f"preset {name_or_path}"
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise UsageError(f"{where}: invalid YAML ({str(e).splitlines()[0]})") from None
    except RecursionError:
        raise UsageError(f"{where}: YAML nested too deeply to be a preset") from None
    if not isinstance(data, dict):
        raise UsageError(f"{where}: a preset must be a YAML mapping")
    return data


def load_preset(name_or_path: str, _seen: tuple[str, ...] = ()) -> dict[str, Any]:
    """A preset with its ``extends:`` chain merged in: the named base preset is read first and this
    file's mappings are merged over it key by key (lists and scalars replace)."""
    raw = read_preset(name_or_path)
    base = raw.pop("extends", None)
    if base is None:
        return raw
    if not isinstance(base, str):
        raise UsageError(f"preset '{name_or_path}': 'extends' must name one preset")
    if base in _seen or base == name_or_path:
        raise UsageError(f"preset '{name_or_path}': 'extends' forms a cycle ({' -> '.join(_seen + (base,))})")
    return _merge(load_preset(base, _seen + (name_or_path,)), raw)


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def resolve(preset: str, method: str, overrides: list[str] = (), **fields: Any) -> Config:
    """Build the resolved config for `method` from a preset, keyword fields and `--set` overrides."""
    if method not in METHODS:
        raise UsageError(f"unknown method '{method}' (choose from {', '.join(METHODS)})")
    raw = load_preset(preset)
    methods = raw.pop("methods", {}) or {}
    keys = METHODS + tuple(METHOD_VARIANTS)
    if not isinstance(methods, dict) or any(k not in keys for k in methods):
        raise UsageError(f"preset '{preset}': 'methods' may only have the keys {', '.join(keys)}")

    def build(variants: tuple[str, ...]) -> Config:
        cfg = Config()
        _apply(cfg, raw)
        for name in (method,) + variants:
            _apply(cfg, methods.get(name) or {})
        cfg.method = method
        for k, v in fields.items():
            if v is not None:
                set_key(cfg, k, v)
        for text in overrides:
            set_key(cfg, *parse_override(text))
        return cfg

    cfg = build(())
    # the variants this config turns on, overlaid beneath the keyword fields and --set
    variants = tuple(v for v, (m, applies) in METHOD_VARIANTS.items() if m == method and applies(cfg))
    if variants:
        cfg = build(variants)
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    """Choice fields and ranges; one clear message for the first problem found."""
    validate_numbers(cfg)
    for key, choices in CHOICES.items():
        obj = cfg
        for p in key.split("."):
            obj = getattr(obj, p)
        if obj not in choices:
            raise UsageError(f"config key '{key}' must be one of {', '.join(choices)}, got '{obj}'")
    tc = cfg.train
    for key, val, lo in [("train.steps", tc.steps, 0), ("train.batch", tc.batch, 1),
                         ("sample.steps", cfg.sample.steps, 1),
                         ("sample.solver_steps", cfg.sample.solver_steps, 1),
                         ("network.model_channels", cfg.network.model_channels, 1),
                         ("network.num_blocks", cfg.network.num_blocks, 1),
                         ("network.augment_dim", cfg.network.augment_dim, 0),
                         ("train.log_every", tc.log_every, 1),
                         ("train.batch_per_gpu", tc.batch_per_gpu, 0),
                         ("train.check_grads_every", tc.check_grads_every, 0),
                         ("train.checkpoint_every", tc.checkpoint_every, 1),
                         ("train.phema_every", tc.phema_every, 0)]:
        if val < lo:
            raise UsageError(f"config key '{key}' must be >= {lo}, got {val}")
    if not cfg.network.channel_mult:
        raise UsageError("config key 'network.channel_mult' must not be empty")
    if not 0 <= cfg.data.augment_p <= 1:
        raise UsageError(f"config key 'data.augment_p' must be in [0, 1], got {cfg.data.augment_p}")
    if cfg.network.augment_dim not in (0, AUGMENT_DIM):
        raise UsageError(f"config key 'network.augment_dim' must be 0 or {AUGMENT_DIM} (EDM's augment label), "
                         f"got {cfg.network.augment_dim}")
    if cfg.data.augment_p > 0 and not cfg.network.augment_dim:
        raise UsageError(f"data.augment_p > 0 needs network.augment_dim={AUGMENT_DIM}: the network must see what "
                         "the augmentation did, or the augmentation leaks into the samples")
    if not 0 <= cfg.network.dropout < 1 or not 0 <= cfg.network.label_dropout < 1:
        raise UsageError("dropout rates must be in [0, 1)")
    if tc.lr <= 0:
        raise UsageError(f"config key 'train.lr' must be > 0, got {tc.lr}")
    if any(not 0 < s <= MAX_SIGMA_REL for s in tc.phema_sigma_rels) or len(set(tc.phema_sigma_rels)) != len(tc.phema_sigma_rels):
        raise UsageError(f"config key 'train.phema_sigma_rels' must hold distinct values in (0, {MAX_SIGMA_REL:.4f}] "
                         f"(power-function EMA widths), got {tc.phema_sigma_rels}")
    if cfg.loss.max_guidance < 1:
        raise UsageError("config key 'loss.max_guidance' must be >= 1")
    if cfg.loss.vsd_weight > 0 and cfg.method != "scd":
        raise UsageError(f"loss.vsd_weight > 0 (adaptive VSD) needs a teacher: use scmctl distill "
                         f"(method scd), not method {cfg.method}, or set loss.vsd_weight=0")
    if tc.batch_per_gpu and tc.batch % tc.batch_per_gpu:
        raise UsageError(f"train.batch ({tc.batch}) must be a multiple of train.batch_per_gpu ({tc.batch_per_gpu})")
    if len(cfg.data.latent_mean) != len(cfg.data.latent_std):
        raise UsageError("data.latent_mean and data.latent_std must have the same length")
    if any(s <= 0 for s in cfg.data.latent_std):
        raise UsageError("data.latent_std values must be > 0")
    if cfg.data.sigma_data <= 0:
        raise UsageError("config key 'data.sigma_data' must be > 0")
    if cfg.network.time_embedding == "edm" and abs(cfg.network.edm_sigma_data - cfg.data.sigma_data) > 1e-12:
        raise UsageError(f"network.edm_sigma_data ({cfg.network.edm_sigma_data}) must equal "
                         f"data.sigma_data ({cfg.data.sigma_data})")
    _validate_segments(cfg)
    _validate_discrete(cfg)
    if cfg.loss.sct_velocity == "batch" and cfg.method != "sct":
        raise UsageError(f"loss.sct_velocity=batch applies to sCT (scmctl train), not to method {cfg.method}; "
                         "set loss.sct_velocity=conditional")
    if cfg.loss.sct_references < 0:
        raise UsageError(f"config key 'loss.sct_references' must be >= 0, got {cfg.loss.sct_references}")
    if not 0 < cfg.sample.t_mid < 1.5707963:
        raise UsageError(f"config key 'sample.t_mid' must be in (0, π/2), got {cfg.sample.t_mid}")


def _validate_segments(cfg: Config) -> None:
    loss = cfg.loss
    if loss.segments < 1:
        raise UsageError(f"config key 'loss.segments' must be >= 1, got {loss.segments}")
    if loss.segments > 1 and cfg.method == "diffusion":
        raise UsageError("loss.segments > 1 (multistep consistency) applies to sct/scd, not to a diffusion model")
    if loss.segments > 1 and loss.vsd_weight > 0:  # the VSD term's generator is the one-step f_θ(z, t_max)
        raise UsageError("loss.vsd_weight > 0 (adaptive VSD) cannot be combined with loss.segments > 1; set one of them")
    if loss.segment_boundaries is not None:
        problem = boundary_problem(loss.segment_boundaries, loss.segments, cfg.data.sigma_data)
        if problem:
            raise UsageError(f"config key 'loss.segment_boundaries' {problem}")


def _validate_discrete(cfg: Config) -> None:
    """loss.discrete_steps: >= 0, for consistency models, not with multistep segments, a grid float32 can hold."""
    steps = cfg.loss.discrete_steps
    if steps < 0:
        raise UsageError(f"config key 'loss.discrete_steps' must be >= 0 (0 = continuous time), got {steps}")
    if steps == 0:
        return
    if model_kind(cfg.method) != "consistency":
        raise UsageError(f"loss.discrete_steps applies to consistency models (sct, scd), not to "
                         f"method {cfg.method}; set loss.discrete_steps=0")
    if cfg.loss.segments > 1:
        raise UsageError("loss.discrete_steps > 0 cannot be combined with loss.segments > 1; set one of them")
    from scmctl.discrete import time_grid

    time_grid(steps, cfg.data.sigma_data)  # neighbouring times must differ in float32


# Sizes that must be positive (the >= checks above allow 0 where 0 means "off").
POSITIVE = ("network.channel_mult", "network.channel_mult_emb", "network.head_channels",
            "network.adaptive_weight_channels", "network.resolution", "network.channels",
            "data.resolution", "sample.grid_images", "train.eps")


def validate_numbers(cfg: Config) -> None:
    """Every number finite (NaN passes every range check), sizes positive, Adam's betas in [0, 1),
    non-negative rates and counts, a device torch can name."""
    import math

    flat = flatten(cfg.to_dict())
    for key, val in flat.items():
        for v in (val if isinstance(val, list) else [val]):
            if isinstance(v, float) and not math.isfinite(v):
                raise UsageError(f"config key '{key}' must be a finite number, got {v}")
    for key in POSITIVE:
        val = flat[key]
        if any(v is not None and v <= 0 for v in (val if isinstance(val, list) else [val])):
            raise UsageError(f"config key '{key}' must be > 0, got {val}")
    for key in ("network.attn_resolutions", "train.lr_ref_steps", "train.lr_rampup_images", "train.grad_clip",
                "train.ema_sigma_rel", "train.ema_halflife_images", "train.seed", "train.grid_every",
                "train.keep_checkpoints", "loss.tangent_warmup_steps", "loss.tangent_norm_c", "loss.vsd_weight",
                "network.dropout_max_resolution", "network.time_embedding_scale", "network.num_classes"):
        val = flat[key]
        if any(v is not None and v < 0 for v in (val if isinstance(val, list) else [val])):
            raise UsageError(f"config key '{key}' must be >= 0, got {val}")
    betas = cfg.train.betas
    if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
        raise UsageError(f"config key 'train.betas' must be two numbers in [0, 1), got {betas}")
    for key in ("loss.P_std", "loss.vsd_P_std", "loss.vsd_fake_P_std"):
        if flat[key] <= 0:
            raise UsageError(f"config key '{key}' must be > 0, got {flat[key]}")
    if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", cfg.train.device):
        raise UsageError(f"config key 'train.device' must be auto, cpu, cuda or cuda:N, got '{cfg.train.device}'")


def diff(a: Config, b: Config, ignore: tuple[str, ...] = ()) -> list[str]:
    """Dotted keys whose values differ between two configs."""
    fa, fb = flatten(a.to_dict()), flatten(b.to_dict())
    return [k for k in fa if fa[k] != fb.get(k) and not any(k.startswith(i) for i in ignore)]


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, prefix + k + "."))
        else:
            out[prefix + k] = v
    return out
