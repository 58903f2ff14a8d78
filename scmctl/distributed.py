"""torchrun process groups: one place that reads RANK/WORLD_SIZE/LOCAL_RANK.

Without torchrun's environment everything runs as a single process (rank 0 of 1) and no process
group is created. Under torchrun, ``init()`` creates the default group (NCCL on CUDA, gloo on CPU)
and pins each process to its local GPU. The collectives below are what the training loop needs
beyond DDP/FSDP2 themselves; each one is the identity in a single process.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from scmctl.errors import UsageError


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


def launched() -> bool:
    """True when this process was started by torchrun (or another launcher setting WORLD_SIZE)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def world_size() -> int:
    """The number of processes of this job per the launcher's environment (1 without torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def init(device: str = "auto") -> Dist:
    """The process group for this process (created on first call) and its device."""
    import torch.distributed as dist

    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    want_cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if want_cuda and not torch.cuda.is_available():
        raise UsageError(f"device={device} but no CUDA device is available")
    if want_cuda:
        if device not in ("auto", "cuda") and world > 1:
            raise UsageError(f"device={device}: under torchrun each process uses cuda:LOCAL_RANK; "
                             "pass device=cuda or auto")
        dev = torch.device(device) if device not in ("auto", "cuda") else torch.device("cuda", local)
        torch.cuda.set_device(dev)
    else:
        dev = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo",
                                device_id=dev if dev.type == "cuda" else None)
    return Dist(rank, world, local, dev)


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def shutdown() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _active() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def broadcast_object(obj, src: int = 0):
    """Rank `src`'s (picklable) `obj` on every rank."""
    import torch.distributed as dist

    if not _active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj) -> list:
    """Every rank's (picklable) `obj`, in rank order."""
    import torch.distributed as dist

    if not _active():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def all_gather_tensor(t: torch.Tensor) -> list[torch.Tensor]:
    """Every rank's tensor `t` (same shape and dtype on all ranks), in rank order."""
    import torch.distributed as dist

    if not _active():
        return [t]
    out = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(out, t.contiguous())
    return out


def all_reduce_mean_(tensors: list[torch.Tensor]) -> None:
    """Replace each tensor by its mean over all ranks, in place (one all-reduce per tensor)."""
    import torch.distributed as dist

    if not _active():
        return
    world = dist.get_world_size()
    for t in tensors:
        dist.all_reduce(t)
        t.div_(world)


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank when `flag` is True on at least one (one all-reduce): all processes
    stop at the same step when only some of them received SIGTERM."""
    import torch.distributed as dist

    if not _active():
        return bool(flag)
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)
