"""The training loop shared by `scmctl train` (diffusion teacher or sCT) and `scmctl distill` (sCD).

Resume = run the same command again: the loop finds the run directory's latest checkpoint and
continues. Data order and every random draw of step s are derived from (seed, s) alone, so a
resumed run reproduces the uninterrupted one bit for bit on the CPU.

Scale-out (torchrun). ``train.batch`` is the global batch B and fixes every hyperparameter. Step s
takes the B dataset indices ``batch_indices(n, B, s, seed)`` and cuts them into G = B/m contiguous
micro-batches of m = ``train.batch_per_gpu`` (default B/world). Process r of W runs the global
micro-batches j = r·A … r·A + A − 1 (A = G/W) and accumulates their gradients; micro-batch j seeds
torch's RNG with ``micro_batch_seed(seed, s, j)`` before anything is drawn (latent posterior noise,
flips, label dropout, z, t, dropout masks). So a step's result depends on (seed, s, B, m) and not on
how the G micro-batches are spread over processes: 2 processes × 1 micro-batch of B/2 and
1 process × 2 accumulated micro-batches of B/2 make the same draws, and a resumed multi-process
run continues exactly where it stopped. Each micro-batch loss is its mean and is scaled by 1/A;
DDP/FSDP average over the W processes, so the update follows the mean over all B examples.

Parallelism (``train.parallel``). DDP replicates the network: the sCM tangent (jvp) runs on the
unwrapped module and the gradient forward goes through the DDP wrapper (``loss.jvp_mode=dual``:
its one forward, which carries both, goes through the wrapper; tested equal to one process), with
``no_sync()`` on all but the last micro-batch. FSDP2 (``fully_shard``) shards every U-Net block and
the rest of the network over all processes and runs the separate jvp mode (FSDP2's backward hooks
reject forward-mode AD inputs); weight renormalization and the EMA work on the local shards.
Checkpoints always hold full, unsharded state dicts in the single-process format, so a run may
resume on any number of processes with either mode. Only rank 0 writes checkpoints, stats,
grids and config.yaml; the run directory must be on a file system every process sees.

Precision and compile. ``train.precision=bf16`` runs the network forwards under bf16 autocast
(time embedding, attention softmax/JVP accumulators, losses, w_φ and the optimizer stay fp32);
``loss.jvp_fp32`` runs the tangent pass (and an sCD teacher) without autocast. ``train.compile``
compiles the gradient forward (DDP wrapper included); the tangent pass and the teacher stay eager.
See :func:`effective_jvp_mode` for when the dual mode runs as separate.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional, Sequence

import torch

from scmctl import distributed, losses
from scmctl.config import Config, LossConfig
from scmctl.data.imageio import save_grid
from scmctl.errors import UsageError
from scmctl.fileio import write_text_atomic
from scmctl.nn.unet import UNet, build_network
from scmctl.training import checkpoint as ckpt_io
from scmctl.training.ema import EMA
from scmctl.training.phema import PowerEMAs, save_snapshots, snapshot_due


def select_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"train.device={name} but no CUDA device is available")
    return dev


def step_seed(seed: int, step: int) -> int:
    """The RNG seed of training step `step` (independent of everything before it)."""
    return (seed * 1_000_003 + step * 7919 + 12345) % (2 ** 63 - 1)


def micro_batch_seed(seed: int, step: int, index: int) -> int:
    """The RNG seed of global micro-batch `index` of step `step` (index 0: `step_seed`)."""
    return (step_seed(seed, step) + index * 1_000_000_007) % (2 ** 63 - 1)


def learning_rate(cfg: Config, step: int) -> float:
    """α(t) = α_ref/√max(t/t_ref, 1) (EDM2's inverse square root), with an optional linear ramp-up."""
    t = cfg.train
    lr = t.lr
    if t.lr_ref_steps > 0:
        lr /= math.sqrt(max(step / t.lr_ref_steps, 1.0))
    if t.lr_warmup_steps > 0:
        lr *= min(step / t.lr_warmup_steps, 1.0)
    return lr


def make_optimizer(cfg: Config, params) -> torch.optim.Optimizer:
    t = cfg.train
    cls = torch.optim.RAdam if t.optimizer == "radam" else torch.optim.Adam
    return cls(params, lr=t.lr, betas=tuple(t.betas), eps=t.eps)


def model_kind(method: str) -> str:
    return "diffusion" if method == "diffusion" else "consistency"


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
    if tc.compile and cfg.method != "diffusion" and cfg.network.dropout > 0:
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
    pass is under no_grad. DDP passes dual inputs through (tested against one process)."""
    mode = cfg.loss.jvp_mode
    if mode == "dual" and cfg.method != "diffusion":
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

    def __init__(self, module, net: UNet, autocast: Optional[Callable] = None):
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
    """
    net: UNet
    grad_forward: Callable
    jvp_forward: Callable
    teacher_forward: Optional[Callable] = None
    ddp: Optional[torch.nn.Module] = None
    fsdp: bool = False
    loss_cfg: Optional[LossConfig] = None   # cfg.loss with the effective jvp mode; None = cfg.loss

    def sync(self, last: bool):
        """DDP gradient all-reduce only on the last micro-batch of a step (`no_sync` before)."""
        return self.ddp.no_sync() if (self.ddp is not None and not last) else contextlib.nullcontext()


def plain_model(net: UNet, teacher: Optional[UNet] = None) -> Model:
    """One process, fp32, eager: every forward is the network itself."""
    return Model(net, net, net, teacher)


def _autocast_factory(device: torch.device, precision: str) -> Optional[Callable]:
    if precision != "bf16":
        return None
    return lambda: torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def build_model(cfg: Config, net: UNet, dist: distributed.Dist, teacher: Optional[UNet] = None,
                ema: Optional[EMA] = None, phemas: Sequence[EMA] = ()) -> Model:
    """Wrap `net` for `cfg.train` (parallel, precision, compile); with FSDP also shard `ema.net`
    and the post-hoc EMA profiles' networks."""
    tc = cfg.train
    if dist.world == 1 and tc.precision == "fp32" and not tc.compile:
        return plain_model(net, teacher)  # the single-process path: no wrapper at all
    loss_cfg = dataclasses.replace(cfg.loss, jvp_mode=effective_jvp_mode(cfg, dist.world)[0])
    ddp, fsdp = None, False
    module = net
    if dist.world > 1 and tc.parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        if not cfg.loss.adaptive_weighting:  # unused head: DDP would wait for its gradients forever
            net.weight_linear.requires_grad_(False)
        ddp = module = DDP(net, device_ids=[dist.device.index] if dist.device.type == "cuda" else None,
                           **_no_buffer_sync())
    elif dist.world > 1 and tc.parallel == "fsdp":
        mesh = _device_mesh(dist)
        shard_network(net, mesh)
        for e in ([ema] if ema is not None else []) + list(phemas):
            shard_network(e.net, mesh, forward_methods=())
        fsdp = True
    if tc.compile:
        module = torch.compile(module)
    autocast = _autocast_factory(dist.device, tc.precision)
    jvp_autocast = None if cfg.loss.jvp_fp32 else autocast
    teacher_forward = _Forward(teacher, teacher, jvp_autocast) if teacher is not None else None
    return Model(net, _Forward(module, net, autocast), _Forward(net, net, jvp_autocast),
                 teacher_forward, ddp, fsdp, loss_cfg)


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


def shard_network(net: UNet, mesh, forward_methods: Sequence[str] = ("adaptive_weight",)) -> None:
    """FSDP2: one shard group per U-Net block, one for the rest (embeddings, conv_in/out, the
    adaptive-weighting head). FSDP2 cannot shard 0-dim parameters: the scalar gains are viewed as
    shape [1] while sharded (the network broadcasts them the same way); checkpoints keep ()."""
    import warnings

    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    for module in net.modules():
        for name, p in list(module.named_parameters(recurse=False)):
            if p.ndim == 0:
                setattr(module, name, torch.nn.Parameter(p.detach().reshape(1), requires_grad=p.requires_grad))
    for blk in (*net.enc, *net.dec):
        fully_shard(blk, mesh=mesh)
    fully_shard(net, mesh=mesh)
    for m in forward_methods:  # w_φ(t) is called outside forward: it must unshard its parameters too
        register_fsdp_forward_method(net, m)
    # adaptive_weight returns a view; nothing writes to it in place
    warnings.filterwarnings("ignore", message=r".*FSDP2-wrapped module .* returned a view tensor.*")


# ------------------------------------------------------------------------- one step ------------

def micro_batch_loss(cfg: Config, model: Model, x0: torch.Tensor, onehot: Optional[torch.Tensor],
                     step: int) -> losses.LossOutput:
    """The loss of one micro-batch (its mean over examples)."""
    loss_cfg = model.loss_cfg or cfg.loss
    if cfg.method == "diffusion":
        return losses.diffusion_loss(model.grad_forward, x0, onehot, loss_cfg, cfg.data.sigma_data,
                                     weight_net=model.net)
    return losses.consistency_loss(model.jvp_forward, x0, onehot, loss_cfg, cfg.data.sigma_data, step,
                                   teacher=model.teacher_forward, train_net=model.grad_forward)


def accumulate_gradients(cfg: Config, model: Model, micro_batches: Iterable[tuple[torch.Tensor, Optional[torch.Tensor]]],
                         count: int, step: int) -> list[losses.LossOutput]:
    """Backpropagate `count` micro-batches (an iterable of (x0, one-hot labels), drawn lazily so
    each is drawn right after its seed) into the parameters' .grad, each loss scaled by 1/count:
    with DDP/FSDP averaging over processes, .grad is the gradient of the mean over all examples."""
    outs = []
    for k, (x0, onehot) in enumerate(micro_batches):
        with model.sync(last=k == count - 1):
            out = micro_batch_loss(cfg, model, x0, onehot, step)
            (out.loss if count == 1 else out.loss / count).backward()
        outs.append(out)
    if len(outs) != count:
        raise ValueError(f"expected {count} micro-batches, got {len(outs)}")
    return outs


def apply_update(cfg: Config, model: Model, opt: torch.optim.Optimizer, lr: float) -> tuple[torch.Tensor, bool]:
    """Clip, step (unless the gradient norm is not finite), renormalize the weights.
    Returns (gradient norm, skipped)."""
    for g in opt.param_groups:
        g["lr"] = lr
    clip = cfg.train.grad_clip if cfg.train.grad_clip > 0 else float("inf")
    grad_norm = torch.nn.utils.clip_grad_norm_(model.net.parameters(), clip)
    if hasattr(grad_norm, "full_tensor"):  # FSDP2: a DTensor, the same on every process
        grad_norm = grad_norm.full_tensor()
    skipped = not bool(torch.isfinite(grad_norm))
    if not skipped:
        opt.step()
        model.net.renormalize_()
    return grad_norm, skipped


def training_step(cfg: Config, net: UNet, opt: torch.optim.Optimizer, x0: torch.Tensor,
                  onehot: Optional[torch.Tensor], step: int, lr: float,
                  teacher: Optional[UNet] = None, model: Optional[Model] = None,
                  ) -> tuple[losses.LossOutput, torch.Tensor, bool]:
    """One optimizer step of `cfg.method` on one batch (no accumulation, no reseeding). A step
    whose gradient norm is not finite is skipped. Returns (loss output, gradient norm, skipped)."""
    model = model if model is not None else plain_model(net, teacher)
    opt.zero_grad(set_to_none=True)
    (out,) = accumulate_gradients(cfg, model, [(x0, onehot)], 1, step)
    grad_norm, skipped = apply_update(cfg, model, opt, lr)
    return out, grad_norm, skipped


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


def combine_stats(records: Sequence[tuple[float, dict]]) -> dict:
    """One stats record from per-micro-batch (loss, stats) pairs in global order: means over the
    micro-batches that have a value; counts ('masked') summed."""
    out = {"loss": math.fsum(r[0] for r in records) / len(records)}
    keys: list[str] = []
    for _, s in records:
        keys += [k for k in s if k not in keys]
    for k in keys:
        vals = [s[k] for _, s in records if k in s]
        if k == "masked":
            out[k] = int(sum(vals))
        else:
            out[k] = math.fsum(vals) / len(vals)
    return out


# ------------------------------------------------------------------------- the loop ------------

class StatsLog:
    """stats.jsonl: one JSON object per logged step. On resume, lines after the checkpoint's step
    are dropped (they are recomputed identically)."""

    def __init__(self, path: Path, resume_step: int):
        self.path = path
        if path.exists():
            keep = []
            for line in path.read_text().splitlines():
                try:
                    if json.loads(line).get("step", 0) <= resume_step:
                        keep.append(line)
                except json.JSONDecodeError:
                    pass  # a line cut off by a crash
            write_text_atomic(path, "".join(line + "\n" for line in keep))
        self.f = open(path, "a")

    def write(self, obj: dict) -> None:
        self.f.write(json.dumps(obj) + "\n")
        self.f.flush()

    def close(self) -> None:
        self.f.close()


def train(cfg: Config, run_dir: Path, dataset, teacher: Optional[UNet] = None,
          init_state: Optional[dict] = None, show_progress: bool = True,
          dist: Optional[distributed.Dist] = None) -> dict:
    """Train `cfg.method` on `dataset`; returns a summary dict (the same on every process).

    `dataset`: ``len(dataset)`` examples and ``dataset.batch(indices) -> (x0 float32 NCHW in model
    space, int64 labels or None)``. `teacher`: the sCD teacher (EMA weights, eval mode).
    `init_state`: weights to start from (a checkpoint's EMA), used only when the run has no
    checkpoint yet. `dist`: this process's place in the torchrun job (default: from the
    environment). SIGTERM/SIGINT (a cluster's preemption, Ctrl-C) finish the current step, write a
    checkpoint and stop; under torchrun all processes agree on the step (one all-reduce per step).
    Re-running the same command resumes.
    """
    from scmctl.cli.common import progress
    from scmctl.data.datasets import batch_indices

    run_dir = Path(run_dir)
    if dist is None:
        dist = distributed.init(cfg.train.device) if distributed.launched() else \
            distributed.Dist(device=select_device(cfg.train.device))
    device, main = dist.device, dist.is_main
    tc = cfg.train
    layout = check_scaleout(cfg, dist.world)
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(tc.seed)
    net_cfg = cfg.network
    if tc.compile:
        net_cfg = _compile_friendly(net_cfg, device)
    net = build_network(net_cfg, device).train()
    if teacher is not None:
        teacher = teacher.to(device)

    # Rank 0 picks the checkpoint (every process must resume from the same one).
    latest = ckpt_io.latest(run_dir) if main else None
    if dist.world > 1:
        latest = distributed.broadcast_object(None if latest is None else str(latest))
        latest = Path(latest) if latest is not None else None
    state = None
    if latest is not None:
        state = (ckpt_io.load(latest, map_location=device) if dist.world == 1 else
                 ckpt_io.load(latest, map_location="cpu", mmap=True))
        ckpt_io.load_state(net, state["net"], str(latest))
        ema = EMA(net, tc.ema_sigma_rel, tc.ema_halflife_images, tc.batch)
        ckpt_io.load_state(ema.net, state["ema"], str(latest))
        phemas = PowerEMAs(net, tc.phema_sigma_rels)
        if phemas and "phema" not in state:
            raise UsageError(f"{latest}: holds no post-hoc EMA profiles (an older checkpoint); resume "
                             "with --set train.phema_sigma_rels=[]")
        if phemas:
            phemas.load_state_dict(state["phema"], str(latest))
        start = int(state["step"])
    else:
        if init_state is not None:
            ckpt_io.load_state(net, init_state, "--init/--teacher", allow_missing=("emb_guidance.", "guidance_gain"))
            net.renormalize_()
        ema = EMA(net, tc.ema_sigma_rel, tc.ema_halflife_images, tc.batch)
        phemas = PowerEMAs(net, tc.phema_sigma_rels)
        start = 0
    names = [n for n, _ in net.named_parameters()]
    shapes = {n: tuple(p.shape) for n, p in net.named_parameters()}
    model = build_model(cfg, net, dist, teacher, ema, phemas.emas)
    opt = make_optimizer(cfg, net.parameters())
    if state is not None:
        _load_optimizer(model, opt, state["optimizer"], names, shapes)
        del state
    if main:
        write_text_atomic(run_dir / "config.yaml", cfg.to_yaml())  # resuming may have raised train.steps
        from scmctl.cli.common import console

        mode, why = effective_jvp_mode(cfg, dist.world)
        if mode != cfg.loss.jvp_mode and show_progress:
            console.print(f"loss.jvp_mode={cfg.loss.jvp_mode} runs as {mode}: {why}")
        if tc.check_grads_every and model.fsdp and show_progress:
            console.print("train.check_grads_every has no effect with train.parallel=fsdp "
                          "(each process holds a different gradient shard)")

    n = len(dataset)
    num_classes = cfg.network.num_classes or 0
    stats = StatsLog(run_dir / "stats.jsonl", start) if main else None
    kind = model_kind(cfg.method)
    end = tc.steps
    stop = _StopRequest()
    last_grid = None
    t_last, imgs_since = time.perf_counter(), 0
    summary = {"run_dir": str(run_dir), "method": cfg.method, "start_step": start}
    my_micro = layout.indices(dist.rank)

    def micro_batches(step: int, idx: torch.Tensor) -> Iterator[tuple[torch.Tensor, Optional[torch.Tensor]]]:
        for j in my_micro:
            torch.manual_seed(micro_batch_seed(tc.seed, step, j))
            x0, lab = dataset.batch(idx[j * layout.micro:(j + 1) * layout.micro])
            x0 = x0.to(device)
            if cfg.data.xflip:
                flip = torch.rand(x0.shape[0], device=device) < 0.5
                x0 = torch.where(flip[:, None, None, None], x0.flip(3), x0)
            lab = lab.to(device) if (lab is not None and num_classes) else None
            yield x0, losses.drop_labels(lab, num_classes, cfg.network.label_dropout)

    try:
        with progress(disable=not (show_progress and main)) as bar:
            task = bar.add_task(f"{cfg.method} training", total=tc.steps, completed=start, info="")
            for step in range(start, end):
                idx = batch_indices(n, tc.batch, step, tc.seed)
                lr = learning_rate(cfg, step)
                opt.zero_grad(set_to_none=True)
                outs = accumulate_gradients(cfg, model, micro_batches(step, idx), layout.accum, step)
                if (tc.check_grads_every and dist.world > 1 and not model.fsdp
                        and (step + 1) % tc.check_grads_every == 0):
                    check_gradients_agree(model.net.parameters(), step + 1)
                grad_norm, skipped = apply_update(cfg, model, opt, lr)
                ema.update(net, step + 1)
                phemas.update(net, step + 1)
                done = step + 1
                imgs_since += tc.batch
                if done % tc.log_every == 0 or done == end:
                    mine = [(float(o.loss.detach()), o.stats) for o in outs]
                    everyone = distributed.all_gather_object(mine) if dist.world > 1 else [mine]
                    if main:
                        now = time.perf_counter()
                        combined = combine_stats([r for part in everyone for r in part])
                        rec = {"step": done, "loss": combined.pop("loss"), "lr": lr,
                               "grad_norm": float(grad_norm), "skipped": int(skipped),
                               "images_per_s": imgs_since / max(now - t_last, 1e-9),
                               "kimg": done * tc.batch / 1000}
                        rec.update(combined)
                        stats.write(rec)
                        t_last, imgs_since = now, 0
                        bar.update(task, completed=done, info=f"loss {rec['loss']:.4f}")
                else:
                    bar.update(task, completed=done)
                stopping = distributed.any_rank(stop.requested, device) if dist.world > 1 else stop.requested
                want_ckpt = done % tc.checkpoint_every == 0 or done == tc.steps or stopping
                want_grid = tc.grid_every > 0 and (done % tc.grid_every == 0 or done == tc.steps)
                want_snapshot = bool(phemas) and (done == tc.steps or snapshot_due(
                    done, tc.batch, tc.phema_every or tc.checkpoint_every * tc.batch))
                if want_ckpt or want_grid or want_snapshot:
                    full = _FullState(model, ema, opt, names, shapes, dist, phemas)
                    if want_snapshot:
                        states = full.phema_states()  # a collective under FSDP2
                        if main:
                            save_snapshots(run_dir, done, done * tc.batch / 1000, kind, cfg.to_dict(),
                                           phemas.sigma_rels, states)
                    if want_ckpt:
                        _save(run_dir, cfg, kind, done, full, main)
                    if want_grid:
                        grid = _write_grid_from(full, run_dir / f"grid-{done:07d}.png", cfg, kind, device, main)
                        last_grid = grid if main else last_grid
                    del full
                if stopping:
                    end = done
                    break
    finally:
        if stats is not None:
            stats.close()
        stop.restore()
    if dist.world > 1:
        distributed.barrier()  # rank 0's last checkpoint is on disk before anyone reports
    summary.update({"steps": end, "checkpoint": str(ckpt_io.latest(run_dir)),
                    "grid": str(last_grid) if last_grid else None, "stopped_early": end < tc.steps})
    return summary


def _compile_friendly(net_cfg, device):
    """The network config to build for torch.compile: attention_backend 'auto' probes for xformers
    on every call (a graph break per attention layer), so resolve it once here when it means SDPA.
    Only the built module changes; the run's config keeps 'auto'."""
    from scmctl.attention import resolve_backend

    if net_cfg.attention_backend == "auto" and resolve_backend("auto", device) == "sdpa":
        return dataclasses.replace(net_cfg, attention_backend="sdpa")
    return net_cfg


def _load_optimizer(model: Model, opt, state: dict, names: list[str], shapes: dict) -> None:
    """A checkpoint's optimizer state (single-process format, parameters numbered in
    named_parameters() order) into `opt`; FSDP2 shards it from the full state."""
    if not model.fsdp:
        opt.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    by_name = ckpt_io.optimizer_state_by_name(state, names)
    _reshape_scalar_state(by_name["state"], shapes, to_checkpoint=False)
    set_optimizer_state_dict(model.net, opt, by_name, options=StateDictOptions(full_state_dict=True))


def _reshape_scalar_state(state_by_name: dict, shapes: dict, to_checkpoint: bool) -> None:
    """FSDP2 holds the 0-dim gains as shape [1] (see shard_network): fit their optimizer state."""
    for name, st in state_by_name.items():
        if shapes.get(name) == ():
            for k, v in st.items():
                if torch.is_tensor(v) and k != "step":
                    st[k] = v.reshape(()) if to_checkpoint else v.reshape(1)


class _FullState:
    """Full (unsharded) network, EMA and optimizer state dicts for rank 0, gathered once per step
    when a checkpoint or grid needs them (under FSDP2 a collective: every process takes part)."""

    def __init__(self, model: Model, ema: EMA, opt, names: list[str], shapes: dict, dist: distributed.Dist,
                 phemas: Optional[PowerEMAs] = None):
        self.model, self.ema, self.opt, self.names, self.shapes = model, ema, opt, names, shapes
        self.phemas = phemas
        self.main = dist.is_main
        self._cache: dict = {}

    def _options(self):
        from torch.distributed.checkpoint.state_dict import StateDictOptions

        return StateDictOptions(full_state_dict=True, cpu_offload=True)

    def _model_state(self, module) -> dict:
        if not self.model.fsdp:
            return module.state_dict()
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        sd = get_model_state_dict(module, options=self._options())
        return {k: (v.reshape(()) if self.shapes.get(k) == () else v) for k, v in sd.items()}

    def net(self) -> dict:
        if "net" not in self._cache:
            self._cache["net"] = self._model_state(self.model.net)
        return self._cache["net"]

    def ema_state(self) -> dict:
        if "ema" not in self._cache:
            self._cache["ema"] = self._model_state(self.ema.net)
        return self._cache["ema"]

    def phema_states(self) -> list[dict]:
        """The post-hoc EMA profiles' full state dicts (empty when none are tracked)."""
        if "phema" not in self._cache:
            self._cache["phema"] = [self._model_state(e.net) for e in (self.phemas.emas if self.phemas else [])]
        return self._cache["phema"]

    def optimizer(self) -> dict:
        if not self.model.fsdp:
            return self.opt.state_dict()
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        osd = get_optimizer_state_dict(self.model.net, self.opt, options=self._options())
        if not self.main:
            return {}
        _reshape_scalar_state(osd["state"], self.shapes, to_checkpoint=True)
        return ckpt_io.optimizer_state_by_index(osd, self.names)

    def ema_network(self, cfg: Config, device) -> Optional[UNet]:
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


class _StopRequest:
    """SIGTERM/SIGINT set a flag that the loop checks after each step (main thread only)."""

    def __init__(self):
        import signal
        import threading

        self.requested = False
        self._old = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._old[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.requested = True

    def restore(self) -> None:
        import signal

        for sig, handler in self._old.items():
            signal.signal(sig, handler)


def _save(run_dir: Path, cfg: Config, kind: str, step: int, full: _FullState, main: bool) -> Optional[Path]:
    net, ema, opt = full.net(), full.ema_state(), full.optimizer()  # collectives under FSDP2
    phema = full.phema_states()
    if not main:
        return None
    path = run_dir / f"checkpoint-{step:07d}.pt"
    extra = {"phema": {"sigma_rels": full.phemas.sigma_rels, "emas": phema}} if phema else {}
    ckpt_io.save_atomic({
        "format": ckpt_io.FORMAT, "version": ckpt_io.VERSION, "kind": kind, "step": step,
        "config": cfg.to_dict(), "net": net, "ema": ema, "optimizer": opt, **extra,
    }, path)
    ckpt_io.prune(run_dir, cfg.train.keep_checkpoints)
    return path


def _write_grid_from(full: _FullState, path: Path, cfg: Config, kind: str, device, main: bool) -> Optional[Path]:
    net = full.ema_network(cfg, device)  # a collective under FSDP2
    return write_grid(path, net, cfg, kind, device) if main else None


@torch.no_grad()
def write_grid(path: Path, net: UNet, cfg: Config, kind: str, device) -> Path:
    """A sample grid from the EMA weights with fixed seeds 0..grid_images−1, decoded to pixels
    (latent models through their VAE)."""
    from scmctl.data.latents import decode_to_uint8
    from scmctl.sampling import generate

    s = cfg.sample
    n = s.grid_images
    shape = (cfg.network.channels, cfg.network.resolution, cfg.network.resolution)
    steps = s.steps if kind == "consistency" else s.solver_steps
    x0, _, _ = generate(net, kind, list(range(n)), shape, cfg.data.sigma_data, steps, s.t_mid,
                        solver=s.solver, device=device)
    save_grid(path, decode_to_uint8(cfg.data, x0, device))
    return path
