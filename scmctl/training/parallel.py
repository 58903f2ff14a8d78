"""Parallelism for one training process: the batch layout over processes, DDP/FSDP2 wrapping,
bf16 autocast and torch.compile of the gradient forward, and the state that crosses them.

Scale-out (torchrun). ``train.batch`` is the global batch B and fixes every hyperparameter. Step s
cuts its B examples into G = B/m contiguous micro-batches of m = ``train.batch_per_gpu`` (default
B/world); process r of W runs the global micro-batches j = r·A … r·A + A − 1 (A = G/W) and
accumulates their gradients (:mod:`scmctl.training.batches` seeds each one). Each micro-batch loss
is its mean and is scaled by 1/A; DDP/FSDP average over the W processes, so the update follows the
mean over all B examples.

DDP replicates the network: the sCM tangent (jvp) runs on the unwrapped module and the gradient
forward goes through the DDP wrapper (``loss.jvp_mode=dual``: its one forward, which carries both,
goes through the wrapper; tested equal to one process), with ``no_sync()`` on all but the last
micro-batch. FSDP2 (``fully_shard``) shards every U-Net block and the rest of the network over all
processes and runs the separate jvp mode (FSDP2's backward hooks reject forward-mode AD inputs);
weight renormalization and the EMA work on the local shards. Checkpoints always hold full,
unsharded state dicts in the single-process format (:class:`FullState` gathers them), so a run
may resume on any number of processes with either mode.

Precision and compile. ``train.precision=bf16`` runs the network forwards under bf16 autocast
(time embedding, attention softmax/JVP accumulators, losses, w_φ and the optimizer stay fp32);
``loss.jvp_fp32`` runs the tangent pass (and an sCD teacher) without autocast. ``train.compile``
compiles the gradient forward (DDP wrapper included); the tangent pass and the teacher stay eager.
:func:`effective_jvp_mode` says when the dual mode runs as separate; the run's config records it
(:func:`scmctl.training.run_config.resolve_for_run`).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field, replace
from typing import Callable, Iterable, Optional, Sequence

import torch

from scmctl import distributed
from scmctl.config import Config, model_kind
from scmctl.errors import UsageError
from scmctl.nn.networks import build_network
from scmctl.nn.base import ImageNetwork
from scmctl.training import checkpoint as ckpt_io
from scmctl.training.ema import EMA


# ------------------------------------------------------------------------- batch layout --------

@dataclass(frozen=True)
class BatchLayout:
    """How the global batch of a step is cut: `micro` examples per micro-batch, `accum`
    micro-batches per process, `world` processes (batch = micro·accum·world)."""
    batch: int
    micro: int
    accum: int
    world: int

    def indices(self, rank: int) -> range:
        """The global micro-batch indices that process `rank` runs."""
        return range(rank * self.accum, (rank + 1) * self.accum)


def batch_layout(batch: int, batch_per_gpu: int, world: int) -> BatchLayout:
    """The layout for `world` processes; a batch that does not divide evenly is a UsageError."""
    micro = batch_per_gpu or batch // world
    if batch_per_gpu == 0 and batch % world:
        raise UsageError(f"train.batch ({batch}) must be divisible by the number of processes "
                         f"({world}); change --batch or set train.batch_per_gpu")
    if micro < 1 or batch % (world * micro):
        raise UsageError(f"train.batch ({batch}) must be a multiple of processes x "
                         f"train.batch_per_gpu ({world} x {micro} = {world * micro}); change "
                         "--batch, train.batch_per_gpu or the number of processes")
    return BatchLayout(batch, micro, batch // (world * micro), world)


def check_scaleout(cfg: Config, world: int) -> BatchLayout:
    """The batch layout for `world` processes; scale-out settings that cannot work are one
    UsageError line each."""
    tc = cfg.train
    layout = batch_layout(tc.batch, tc.batch_per_gpu, world)
    if tc.compile and model_kind(cfg.method) == "consistency" and cfg.network.dropout > 0:
        raise UsageError("train.compile=true with network.dropout > 0 is not supported for "
                         "consistency training: the compiled gradient pass would draw other dropout "
                         "masks than the eager tangent pass; set train.compile=false or network.dropout=0")
    return layout


def effective_jvp_mode(cfg: Config, world: int = 1) -> tuple[str, str]:
    """(jvp mode the loop runs, why it differs from loss.jvp_mode or ''). The dual mode computes
    F_θ and its tangent in one forward with the autograd graph on, so it cannot give an fp32
    tangent next to a bf16 gradient forward (loss.jvp_fp32), nor a compiled gradient forward
    (torch.compile does not trace forward-mode AD), and FSDP2's backward hook (a custom autograd
    Function without a jvp) rejects its dual inputs: those run the separate mode, whose tangent
    pass is under no_grad. DDP passes dual inputs through (tested against one process).
    Discrete-time sCM (loss.discrete_steps > 0) has no jvp: its no-grad forwards are the separate
    mode's tangent pass."""
    mode = cfg.loss.jvp_mode
    if mode == "dual" and model_kind(cfg.method) == "consistency":
        if cfg.loss.discrete_steps:
            return "separate", ("loss.discrete_steps > 0: a finite-difference tangent from two no-grad "
                                "forwards, no forward-mode AD")
        if world > 1 and cfg.train.parallel == "fsdp":
            return "separate", "FSDP2's backward hooks do not pass forward-mode AD"
        if cfg.train.precision == "bf16" and cfg.loss.jvp_fp32:
            return "separate", "loss.jvp_fp32 under bf16 needs a tangent pass of its own"
        if cfg.train.compile:
            return "separate", "train.compile compiles the gradient forward, which dual mode merges with the tangent pass"
    return mode, ""


# ------------------------------------------------------------------------ the model ------------

class _Forward:
    """Calls `module` (the network, a DDP wrapper or a compiled module) under `autocast` (a
    context factory or None); `adaptive_weight` comes from the unwrapped network `net`, outside
    autocast (the loss weighting stays fp32)."""

    def __init__(self, module, net: ImageNetwork, autocast: Optional[Callable] = None):
        self.module, self.net, self.autocast = module, net, autocast

    def __call__(self, *args, **kwargs):
        if self.autocast is None:
            return self.module(*args, **kwargs)
        with self.autocast():
            return self.module(*args, **kwargs)

    def adaptive_weight(self, t: torch.Tensor) -> torch.Tensor:
        return self.net.adaptive_weight(t)


@dataclass
class Model:
    """The network as one training process uses it.

    net: the module whose parameters the optimizer steps (DDP: the unwrapped module; FSDP2: the
    module itself, sharded in place). grad_forward: the forward that is differentiated (through
    DDP, torch.compile and bf16 autocast as configured). jvp_forward: the sCM tangent pass (the
    unwrapped, uncompiled module; fp32 with loss.jvp_fp32). teacher_forward: the sCD teacher.
    param_names/param_shapes: net's parameters as checkpoints hold them (before FSDP2 reshaping).
    sCD + aVSD (:mod:`scmctl.losses_vsd`): fake, the fake score model F_φ (its optimizer's module,
    wrapped and sharded like net), fake_forward its gradient forward, fake_ddp its DDP wrapper,
    fake_names/fake_shapes its parameters as checkpoints hold them; vsd_head, the weighting head
    w_ψ (never wrapped: its gradients are averaged over processes by the update).
    """
    net: ImageNetwork
    grad_forward: Callable
    jvp_forward: Callable
    teacher_forward: Optional[Callable] = None
    ddp: Optional[torch.nn.Module] = None
    fsdp: bool = False
    param_names: list[str] = field(default_factory=list)
    param_shapes: dict = field(default_factory=dict)
    fake: Optional[ImageNetwork] = None
    fake_forward: Optional[Callable] = None
    vsd_head: Optional[torch.nn.Module] = None
    fake_ddp: Optional[torch.nn.Module] = None
    fake_names: list[str] = field(default_factory=list)
    fake_shapes: dict = field(default_factory=dict)

    def sync(self, last: bool):
        """DDP gradient all-reduce only on the last micro-batch of a step (`no_sync` before)."""
        stack = contextlib.ExitStack()
        if not last:
            for ddp in (self.ddp, self.fake_ddp):
                if ddp is not None:
                    stack.enter_context(ddp.no_sync())
        return stack

    def layout(self, part: str) -> tuple[torch.nn.Module, list[str], dict]:
        """(module, parameter names, shapes) of 'net' or 'fake' (the fake score model)."""
        if part == "fake":
            return self.fake, self.fake_names, self.fake_shapes
        return self.net, self.param_names, self.param_shapes

    def with_augment_labels(self, augment_labels: Optional[torch.Tensor]) -> "Model":
        """This model with every forward (gradient, tangent, teacher) given `augment_labels`, the
        augment label of the micro-batch's images (EDM's non-leaking augmentation)."""
        if augment_labels is None:
            return self

        def bind(forward):
            return None if forward is None else _WithAugmentLabels(forward, augment_labels)
        return replace(self, grad_forward=bind(self.grad_forward), jvp_forward=bind(self.jvp_forward),
                       teacher_forward=bind(self.teacher_forward))


class _WithAugmentLabels:
    """A forward called with ``augment_labels=...`` added; ``adaptive_weight`` passes through."""

    def __init__(self, forward: Callable, augment_labels: torch.Tensor):
        self.forward, self.augment_labels = forward, augment_labels

    def __call__(self, *args, **kwargs):
        return self.forward(*args, augment_labels=self.augment_labels, **kwargs)

    def adaptive_weight(self, t: torch.Tensor) -> torch.Tensor:
        return self.forward.adaptive_weight(t)


def _parameter_layout(net: ImageNetwork) -> tuple[list[str], dict]:
    return ([n for n, _ in net.named_parameters()],
            {n: tuple(p.shape) for n, p in net.named_parameters()})


def plain_model(net: ImageNetwork, teacher: Optional[ImageNetwork] = None, fake: Optional[ImageNetwork] = None,
                vsd_head: Optional[torch.nn.Module] = None) -> Model:
    """One process, fp32, eager: every forward is the network itself."""
    fake_layout = _parameter_layout(fake) if fake is not None else ([], {})
    return Model(net, net, net, teacher, None, False, *_parameter_layout(net),
                 fake, fake, vsd_head, None, *fake_layout)


def _autocast_factory(device: torch.device, precision: str) -> Optional[Callable]:
    if precision != "bf16":
        return None
    return lambda: torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def build_model(cfg: Config, net: ImageNetwork, dist: distributed.Dist, teacher: Optional[ImageNetwork] = None,
                ema: Optional[EMA] = None, phemas: Sequence[EMA] = (), fake: Optional[ImageNetwork] = None,
                vsd_head: Optional[torch.nn.Module] = None) -> Model:
    """Wrap `net` for `cfg.train` (parallel, precision, compile); with FSDP also shard `ema.net`
    and the post-hoc EMA profiles' networks (`phemas`). aVSD's fake score model `fake` is wrapped
    (DDP) or sharded (FSDP2) like `net`, under the same autocast, never compiled.
    `cfg` is the run's config (its loss.jvp_mode is the effective one)."""
    tc = cfg.train
    mode, why = effective_jvp_mode(cfg, dist.world)
    if mode != cfg.loss.jvp_mode:
        raise ValueError(f"loss.jvp_mode={cfg.loss.jvp_mode} cannot run here ({why}); build the "
                         "model from the run's config (scmctl.training.run_config.resolve_for_run)")
    if dist.world == 1 and tc.precision == "fp32" and not tc.compile:
        return plain_model(net, teacher, fake, vsd_head)  # the single-process path: no wrapper at all
    names, shapes = _parameter_layout(net)
    fake_names, fake_shapes = _parameter_layout(fake) if fake is not None else ([], {})
    ddp, fake_ddp, fsdp = None, None, False
    module, fake_module = net, fake
    if dist.world > 1 and tc.parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        def wrap(m):
            if not cfg.loss.adaptive_weighting:  # unused head: DDP would wait for its gradients forever
                m.weight_linear.requires_grad_(False)
            return DDP(m, device_ids=[dist.device.index] if dist.device.type == "cuda" else None,
                       **_no_buffer_sync())
        ddp = module = wrap(net)
        if fake is not None:
            fake_ddp = fake_module = wrap(fake)
    elif dist.world > 1 and tc.parallel == "fsdp":
        mesh = _device_mesh(dist)
        shard_network(net, mesh)
        for e in ([ema] if ema is not None else []) + list(phemas):
            shard_network(e.net, mesh, forward_methods=())
        if fake is not None:
            shard_network(fake, mesh)
        fsdp = True
    if tc.compile:
        module = torch.compile(module)
    autocast = _autocast_factory(dist.device, tc.precision)
    jvp_autocast = None if cfg.loss.jvp_fp32 else autocast
    teacher_forward = _Forward(teacher, teacher, jvp_autocast) if teacher is not None else None
    fake_forward = _Forward(fake_module, fake, autocast) if fake is not None else None
    return Model(net, _Forward(module, net, autocast), _Forward(net, net, jvp_autocast),
                 teacher_forward, ddp, fsdp, names, shapes, fake, fake_forward, vsd_head, fake_ddp,
                 fake_names, fake_shapes)


def _no_buffer_sync() -> dict:
    """DDP option: no buffer broadcast before each forward (the buffers are constant time-embedding
    tables); newer PyTorch renamed broadcast_buffers to forward_sync_buffers."""
    import inspect

    from torch.nn.parallel import DistributedDataParallel as DDP

    params = inspect.signature(DDP.__init__).parameters
    return {"forward_sync_buffers": False} if "forward_sync_buffers" in params else {"broadcast_buffers": False}


def _device_mesh(dist: distributed.Dist):
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(dist.device.type, (dist.world,))


def shard_network(net: ImageNetwork, mesh, forward_methods: Sequence[str] = ("adaptive_weight",)) -> None:
    """FSDP2: one shard group per U-Net block, one for the rest (embeddings, conv_in/out, the
    adaptive-weighting head). FSDP2 cannot shard 0-dim parameters: the scalar gains are viewed as
    shape [1] while sharded (the network broadcasts them the same way); checkpoints keep ()."""
    import warnings

    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    for module in net.modules():
        for name, p in list(module.named_parameters(recurse=False)):
            if p.ndim == 0:
                setattr(module, name, torch.nn.Parameter(p.detach().reshape(1), requires_grad=p.requires_grad))
    for blk in net.blocks():
        fully_shard(blk, mesh=mesh)
    fully_shard(net, mesh=mesh)
    for m in forward_methods:  # w_φ(t) is called outside forward: it must unshard its parameters too
        register_fsdp_forward_method(net, m)
    # adaptive_weight returns a view; nothing writes to it in place
    warnings.filterwarnings("ignore", message=r".*FSDP2-wrapped module .* returned a view tensor.*")


# ------------------------------------------------------------- state across the wrappers -------

def load_optimizer(model: Model, opt: torch.optim.Optimizer, state: dict, part: str = "net") -> None:
    """A checkpoint's optimizer state (single-process format, parameters numbered in
    named_parameters() order) into `opt`, the optimizer of `part` ('net' or 'fake',
    :meth:`Model.layout`); FSDP2 shards it from the full state."""
    if not model.fsdp:
        opt.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    module, names, shapes = model.layout(part)
    by_name = ckpt_io.optimizer_state_by_name(state, names)
    _reshape_scalar_state(by_name["state"], shapes, to_checkpoint=False)
    set_optimizer_state_dict(module, opt, by_name, options=StateDictOptions(full_state_dict=True))


def _reshape_scalar_state(state_by_name: dict, shapes: dict, to_checkpoint: bool) -> None:
    """FSDP2 holds the 0-dim gains as shape [1] (see shard_network): fit their optimizer state."""
    for name, st in state_by_name.items():
        if shapes.get(name) == ():
            for k, v in st.items():
                if torch.is_tensor(v) and k != "step":
                    st[k] = v.reshape(()) if to_checkpoint else v.reshape(1)


class FullState:
    """Full (unsharded) network, EMA and optimizer state dicts for rank 0, gathered once per step
    when a checkpoint or grid needs them (under FSDP2 a collective: every process takes part)."""

    def __init__(self, model: Model, ema: EMA, opt: torch.optim.Optimizer, dist: distributed.Dist,
                 phemas: Sequence[EMA] = (), fake_score=None):
        self.model, self.ema, self.opt, self.phemas = model, ema, opt, list(phemas)
        self.fake_score = fake_score  # aVSD: a scmctl.training.fake_score.FakeScore, or None
        self.main = dist.is_main
        self._cache: dict = {}

    def _options(self):
        from torch.distributed.checkpoint.state_dict import StateDictOptions

        return StateDictOptions(full_state_dict=True, cpu_offload=True)

    def _model_state(self, module, part: str = "net") -> dict:
        if not self.model.fsdp:
            return module.state_dict()
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        sd = get_model_state_dict(module, options=self._options())
        shapes = self.model.layout(part)[2]
        return {k: (v.reshape(()) if shapes.get(k) == () else v) for k, v in sd.items()}

    def net(self) -> dict:
        if "net" not in self._cache:
            self._cache["net"] = self._model_state(self.model.net)
        return self._cache["net"]

    def ema_state(self) -> dict:
        if "ema" not in self._cache:
            self._cache["ema"] = self._model_state(self.ema.net)
        return self._cache["ema"]

    def phema_states(self) -> list[dict]:
        """The post-hoc EMA profiles' state dicts (empty when none are tracked)."""
        if "phema" not in self._cache:
            self._cache["phema"] = [self._model_state(e.net) for e in self.phemas]
        return self._cache["phema"]

    def optimizer(self) -> dict:
        return self._optimizer_state(self.opt, "net")

    def _optimizer_state(self, opt: torch.optim.Optimizer, part: str) -> dict:
        if not self.model.fsdp:
            return opt.state_dict()
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        module, names, shapes = self.model.layout(part)
        osd = get_optimizer_state_dict(module, opt, options=self._options())
        if not self.main:
            return {}
        _reshape_scalar_state(osd["state"], shapes, to_checkpoint=True)
        return ckpt_io.optimizer_state_by_index(osd, names)

    def vsd_states(self) -> dict:
        """aVSD's checkpoint entries (:data:`scmctl.training.checkpoint.VSD_KEYS`): the fake score
        model, its optimizer, the weighting head w_ψ and its optimizer; {} without aVSD."""
        fs = self.fake_score
        if fs is None:
            return {}
        if "vsd" not in self._cache:
            self._cache["vsd"] = {"vsd_fake": self._model_state(self.model.fake, "fake"),
                                  "vsd_fake_optimizer": self._optimizer_state(fs.opt, "fake"),
                                  "vsd_weight_head": fs.head.state_dict(),
                                  "vsd_weight_head_optimizer": fs.head_opt.state_dict()}
        return self._cache["vsd"]

    def ema_network(self, cfg: Config, device) -> Optional[ImageNetwork]:
        """The EMA weights as a plain eval-mode network on rank 0 (under FSDP2 a full copy built
        from the gathered state), None elsewhere."""
        if not self.model.fsdp:
            return self.ema.net if self.main else None
        state = self.ema_state()
        if not self.main:
            return None
        net = build_network(cfg.network, device).eval().requires_grad_(False)
        ckpt_io.load_state(net, state, "EMA")
        return net


# ---------------------------------------------------------------- debug: gradient agreement ----

def gradient_fingerprint(params: Iterable[torch.Tensor]) -> torch.Tensor:
    """(Σg, Σg², Σ w_i·g_i with w_i = 1 + i mod 7) over all gradients, float64: equal on every
    DDP process when their gradients are equal, different when they differ (almost surely)."""
    acc = None
    for p in params:
        if p.grad is None:
            continue
        g = p.grad.detach().double().flatten()
        w = torch.arange(g.numel(), device=g.device) % 7 + 1
        v = torch.stack([g.sum(), g.square().sum(), (g * w).sum()])
        acc = v if acc is None else acc + v
    return acc if acc is not None else torch.zeros(3, dtype=torch.float64)


def check_gradients_agree(params: Iterable[torch.Tensor], step: int, rtol: float = 1e-6) -> None:
    """Debug check (train.check_grads_every): all-gather a gradient fingerprint and raise when
    processes disagree (a parameter outside the reducer, a rank-dependent branch, ...)."""
    fp = gradient_fingerprint(params)
    prints = distributed.all_gather_tensor(fp)
    ref = prints[0]
    for r, other in enumerate(prints[1:], start=1):
        diff = float(((other - ref).abs() / ref.abs().clamp_min(1e-30)).max())
        if not diff <= rtol:
            raise RuntimeError(f"step {step}: gradients differ between ranks 0 and {r} (relative "
                               f"difference {diff:.3g} of the gradient fingerprint {ref.tolist()} vs "
                               f"{other.tolist()})")


def checks_gradients(cfg: Config, model: Model, dist: distributed.Dist, done: int) -> bool:
    """Whether train.check_grads_every asks for the gradient check after step `done` (DDP only:
    under FSDP2 each process holds a different gradient shard)."""
    every = cfg.train.check_grads_every
    return bool(every) and dist.world > 1 and not model.fsdp and done % every == 0
