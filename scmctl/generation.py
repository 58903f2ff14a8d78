"""Images from a checkpoint as uint8 batches: the one generation path behind `scmctl sample`, the
2-step t_mid search and on-the-fly evaluation (`scmctl eval fid CKPT|RUN_DIR`).

Public API (stable; other commands build on it):

    from scmctl.generation import open_generator

    gen = open_generator("runs/cifar10-sct", steps=2)   # a checkpoint file or a run directory
    gen.info            # dict: kind, steps, nfe, t_mid, ts, solver, guidance, label, weights,
                        #       checkpoint, checkpoint_sha256, resolution, channels, latent,
                        #       num_classes (resolution/channels: of the decoded uint8 images)
    for images in gen.batches(range(50_000), batch=256):
        ...             # uint8 NHWC numpy arrays, in seed order, decoded for latent models
    b = gen.generate([7, 8, 9])   # one network batch: b.images (uint8 NHWC), b.labels (int64 or None)
    gen.stream([[0, 1], [2, 3]])  # Batch per seed list (next noises drawn ahead on a GPU)
    gen.with_t_mid(0.9)           # the same network, another 2-step t_mid (no reload)

open_generator(model, *, steps=None, t_mid=None, ts=None, solver=None, guidance=1.0, label=None,
               weights="ema", device="auto") -> Generator
    steps:   consistency steps (1, 2, K) or the ODE solver's steps for a diffusion model;
             default: the checkpoint config's ``sample.steps`` / ``sample.solver_steps``; a
             multistep model (loss.segments = M > 1) walks its segment boundaries in 1..M
             steps, default M (:func:`scmctl.segments.sampling_times`; t_mid and ts refused)
    t_mid:   the 2-step intermediate time (default ``sample.t_mid``, 1.1 in the paper)
    ts:      explicit decreasing times after t_max (consistency models)
    solver:  a name in :data:`scmctl.sampling.SOLVERS` (dpm2s, heun, heun-t, euler; diffusion
             models; default ``sample.solver``)
    guidance: the guidance scale s (a CFG teacher, or an sCD student's input); ignored by
             unconditional models
    label:   None or "random" (drawn per seed), or a class index for every image
    weights: "ema" | "raw"; device: "auto" | "cpu" | "cuda" | "cuda:N" | a torch.device
Bad settings raise :class:`scmctl.errors.UsageError`.

Seeds. The image of seed s depends only on the checkpoint, the settings and s: its class label and
its noises come from a generator seeded with s (:func:`scmctl.sampling.per_image_draws`). What a
batch holds changes the floating-point results only at round-off level (matrix-multiply kernels
are chosen by batch shape), which can move a pixel by one uint8 level; the same batches on the
same kind of device give the same bytes. :func:`batch_plan` therefore cuts a seed range into the
same global batches for any number of processes, so a sharded run equals a single-process run
byte for byte, and a resumed run equals an uninterrupted one.

Outputs of `scmctl sample` (:class:`PngFolder`, :class:`NpzParts`): a folder of ``{seed:06d}.png``
or one ``.npz`` (``arr_0`` uint8 NHWC in seed order, plus ``labels`` for conditional models) built
from per-batch ``.npy`` chunks in ``NAME.npz.parts/``. Both are resumable: a batch whose outputs
exist is skipped, and files appear under their final names only when complete. A manifest
(``samples.json`` in the folder, ``NAME.npz.json`` beside the file) records the settings; resuming
with other settings is refused, so one output never mixes two checkpoints.
"""

from __future__ import annotations

import json
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional, Sequence

import numpy as np
import torch

from scmctl import segments
from scmctl.errors import UsageError, check_float
from scmctl.fileio import remove_stale_temps, sha256_file, write_atomic, write_json_atomic

# --------------------------------------------------------------------------------------------
# The generator
# --------------------------------------------------------------------------------------------

@dataclass
class Batch:
    """One network batch: ``images`` uint8 NHWC, ``labels`` int64 (B,) or None (unconditional)."""

    seeds: list[int]
    images: np.ndarray
    labels: Optional[np.ndarray]


def load_for_sampling(model: str | os.PathLike, weights: str = "ema", device="auto"):
    """(net, config, kind, checkpoint dict, device) for a checkpoint file or a run directory's latest."""
    from scmctl.config import from_dict
    from scmctl.training import checkpoint as ckpt_io
    from scmctl.devices import select_device

    dev = select_device(device)
    ckpt = ckpt_io.load(model, map_location="cpu")
    net = ckpt_io.network_from_checkpoint(ckpt, weights, dev)
    return net, from_dict(ckpt["config"]), ckpt["kind"], ckpt, dev


def _solver(name: str):
    """The teacher solver called `name` (:data:`scmctl.sampling.SOLVERS`); a bad name names --solver."""
    from scmctl.sampling import solver_named

    try:
        return solver_named(name)
    except UsageError as e:
        raise UsageError(f"--solver: {e}") from None


def parse_label(label, num_classes: int) -> Optional[int]:
    """None / "random" -> None (drawn per seed); a class index (int or str) -> int, validated."""
    if label is None or label == "random":
        return None
    if num_classes == 0:
        raise UsageError("--label: this model is unconditional")
    try:
        c = int(label)
    except ValueError:
        raise UsageError(f"--label must be a class index or 'random', got '{label}'") from None
    if not 0 <= c < num_classes:
        raise UsageError(f"--label {c} is out of range (the model has {num_classes} classes)")
    return c


class Generator:
    """A loaded network plus resolved sampling settings; see the module docstring."""

    def __init__(self, net, cfg, kind: str, checkpoint: str, checkpoint_sha256: str, device,
                 steps: int, t_mid: float, ts: Optional[list[float]], solver: str, guidance: float,
                 label: Optional[int], weights: str):
        from scmctl import trigflow
        from scmctl.sampling import consistency_times, evaluations_per_call

        self.net, self.cfg, self.kind, self.device = net, cfg, kind, device
        self.boundaries = segments.of_model(cfg) if kind == "consistency" else None
        self.steps, self.t_mid, self.ts, self.solver = steps, t_mid, ts, solver
        self.guidance, self.label, self.weights = check_float(guidance, "--guidance", 0.0), label, weights
        self.checkpoint, self.checkpoint_sha256 = checkpoint, checkpoint_sha256
        self.shape = (cfg.network.channels, cfg.network.resolution, cfg.network.resolution)
        self.prefetch = torch.device(device).type != "cpu"  # draw the next noises on a thread
        self.num_classes = int(getattr(net, "num_classes", 0) or 0)
        t_max = trigflow.t_max(cfg.data.sigma_data)
        if self.boundaries is not None:
            if ts is not None:
                raise UsageError("--ts does not apply to a multistep consistency model: it samples along its "
                                 "segment boundaries (--steps 1..M)")
            self.times = segments.sampling_times(steps, self.boundaries)  # validates --steps
            calls = steps
        elif kind == "consistency":
            if ts is None and steps >= 2 and not 0 < t_mid < t_max:
                raise UsageError(f"--t-mid must be in (0, t_max = {t_max:.4f}), got {t_mid}")
            self.times = consistency_times(steps, t_max, t_mid, ts)  # validates --ts
            calls = len(self.times)
        else:
            self.times = None
            calls = _solver(solver).calls(steps)
        self.nfe = calls * evaluations_per_call(net, self.guidance)  # guided: F_c and F_u per call

    @property
    def uses_t_mid(self) -> bool:
        return self.kind == "consistency" and self.boundaries is None and self.ts is None and self.steps >= 2

    @property
    def info(self) -> dict:
        return {"kind": self.kind, "steps": self.steps, "nfe": self.nfe,
                "t_mid": self.t_mid if self.uses_t_mid else None,
                "ts": list(self.ts) if self.ts else None,
                "solver": self.solver if self.kind == "diffusion" else None,
                "guidance": self.guidance,
                "label": ("random" if self.label is None else self.label) if self.num_classes else None,
                "weights": self.weights, "checkpoint": self.checkpoint,
                "checkpoint_sha256": self.checkpoint_sha256,
                **self._image_size(), "num_classes": self.num_classes}

    def _image_size(self) -> dict:
        """The decoded images' side and channels (a latent model's SD-VAE decodes 8x larger RGB)."""
        from scmctl.data.latents import is_latent

        if not is_latent(self.cfg.data):
            return {"resolution": self.shape[1], "channels": self.shape[0], "latent": False}
        return {"resolution": self.cfg.data.resolution or 8 * self.shape[1], "channels": 3, "latent": True}

    def with_t_mid(self, t_mid: float) -> "Generator":
        """The same network with another 2-step intermediate time."""
        if self.boundaries is not None:
            raise UsageError("a multistep consistency model has no t_mid: it samples along its segment boundaries")
        same = ("net", "cfg", "kind", "checkpoint", "checkpoint_sha256", "device", "steps", "ts", "solver",
                "guidance", "label", "weights")
        g = Generator(**{k: getattr(self, k) for k in same}, t_mid=float(t_mid))
        g.prefetch = self.prefetch
        return g

    def draws(self, seeds: Sequence[int]):
        """The per-seed labels and noises of ``seeds`` (CPU tensors; see per_image_draws)."""
        from scmctl import trigflow
        from scmctl.sampling import num_draws, per_image_draws

        k = num_draws(self.kind, self.steps, trigflow.t_max(self.cfg.data.sigma_data), self.t_mid, self.ts,
                      self.boundaries)
        return per_image_draws([int(s) for s in seeds], self.shape, k, self.num_classes, "cpu")

    @torch.no_grad()
    def generate(self, seeds: Sequence[int], draws=None) -> Batch:
        """Images for ``seeds`` in one network batch (``draws``: :meth:`draws` of them, if made ahead)."""
        from scmctl.data.latents import decode_to_uint8
        from scmctl.sampling import generate

        seeds = [int(s) for s in seeds]
        labels = None
        if self.label is not None:
            labels = torch.full((len(seeds),), self.label, dtype=torch.long, device=self.device)
        x0, lab, _ = generate(self.net, self.kind, seeds, self.shape, self.cfg.data.sigma_data, self.steps,
                              self.t_mid, self.ts, self.solver, labels, self.guidance, self.device,
                              draws=draws if draws is not None else self.draws(seeds), boundaries=self.boundaries)
        finite = torch.isfinite(x0.flatten(1)).all(dim=1)
        if not bool(finite.all()):  # NaN would quantize to black and pass for an image
            bad = seeds[int((~finite).nonzero()[0, 0])]
            raise UsageError(f"{self.checkpoint}: the model produced non-finite images (first at seed {bad}); "
                             "the checkpoint's weights or the sampling settings are unusable")
        images = decode_to_uint8(self.cfg.data, x0, self.device)
        return Batch(seeds, images, lab.cpu().numpy().astype(np.int64) if lab is not None else None)

    def stream(self, seed_batches: Iterable[Sequence[int]]) -> Iterator[Batch]:
        """:meth:`generate` for each seed list in turn. On an accelerator the next batch's noises
        are drawn on a CPU thread while the current batch runs."""
        seed_batches = [list(b) for b in seed_batches]
        if not self.prefetch:  # on the CPU there is no idle core to overlap with
            for b in seed_batches:
                yield self.generate(b)
            return
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=1) as pool:
            ahead = pool.submit(self.draws, seed_batches[0]) if seed_batches else None
            for i, b in enumerate(seed_batches):
                draws = ahead.result()
                if i + 1 < len(seed_batches):
                    ahead = pool.submit(self.draws, seed_batches[i + 1])
                yield self.generate(b, draws)

    def batches(self, seeds: Sequence[int], batch: int) -> Iterator[np.ndarray]:
        """uint8 NHWC images for ``seeds`` in order, ``batch`` images per network call."""
        if batch < 1:
            raise UsageError("--batch must be >= 1")
        seeds = list(seeds)
        for b in self.stream(seeds[i:i + batch] for i in range(0, len(seeds), batch)):
            yield b.images


def open_generator(model: str | os.PathLike, *, steps: Optional[int] = None, t_mid: Optional[float] = None,
                   ts: Optional[Sequence[float]] = None, solver: Optional[str] = None, guidance: float = 1.0,
                   label=None, weights: str = "ema", device="auto") -> Generator:
    """Load a checkpoint (or a run directory's latest) and resolve the sampling settings."""
    if steps is not None and steps < 1:
        raise UsageError("--steps must be >= 1")
    if solver is not None:
        _solver(solver)
    ts = [float(x) for x in ts] if ts else None
    net, cfg, kind, ckpt, dev = load_for_sampling(model, weights, device)
    if kind == "diffusion" and ts:
        raise UsageError("--ts applies to consistency models; use --steps/--solver for a diffusion model")
    s = cfg.sample
    multistep = kind == "consistency" and segments.of_model(cfg) is not None
    if multistep and t_mid is not None:
        raise UsageError("--t-mid does not apply to a multistep consistency model: it samples along its "
                         "segment boundaries (--steps 1..M)")
    if steps is None:
        steps = (cfg.loss.segments if multistep else len(ts) if ts else
                 s.steps if kind == "consistency" else s.solver_steps)
    return Generator(net, cfg, kind, ckpt["path"], sha256_file(ckpt["path"]), dev, steps,
                     float(s.t_mid if t_mid is None else t_mid), ts, solver or s.solver, guidance,
                     parse_label(label, int(getattr(net, "num_classes", 0) or 0)), weights)


# --------------------------------------------------------------------------------------------
# Sharding
# --------------------------------------------------------------------------------------------

def batch_plan(n: int, batch: int, rank: int = 0, world: int = 1) -> Iterator[tuple[int, range]]:
    """The global batches (index j, seed positions [j·batch, (j+1)·batch) ∩ [0, n)) that process
    ``rank`` of ``world`` runs: j = rank, rank + world, ... The batches do not depend on ``world``,
    so every image is computed in the same batch whatever the number of processes. Lazy: a plan
    for a huge n costs nothing until it is walked."""
    count = -(-n // batch)
    return ((j, range(j * batch, min((j + 1) * batch, n))) for j in range(rank, count, world))


# Seeds seed torch.Generator (64-bit); images are counted in int64 arrays and 6+-digit file names.
MAX_SEED = 2**63 - 1


def check_count(n: int, seed: int, fmt: str, image_bytes: int, folder: Path) -> None:
    """Refuse, before anything is written, an -n the output cannot hold: seeds past 2^63; for an
    .npz more uint8 bytes than the file system has free (twice: chunks, then the merged file); for
    PNGs more files than it has free inodes, or more than 67 bytes (the smallest PNG) each."""
    import shutil

    if seed < 0 or seed + n - 1 > MAX_SEED:
        raise UsageError(f"--seed {seed} -n {n}: seeds must lie in [0, 2^63)")
    probe = Path(folder)
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    need = 2 * n * image_bytes if fmt == "npz" else 67 * n
    if need > free:
        raise UsageError(f"-n {n}: {n} images need at least {need / 1e9:.3g} GB but {probe} has "
                         f"{free / 1e9:.3g} GB free; lower -n or choose another --out")
    st = os.statvfs(probe)
    if fmt != "npz" and st.f_files and n > st.f_favail:
        raise UsageError(f"-n {n}: {n} PNG files but the file system of {probe} has room for {st.f_favail} "
                         "more files; use an .npz --out or another folder")


# --------------------------------------------------------------------------------------------
# Outputs: manifest, PNG folder, .npz built from chunks
# --------------------------------------------------------------------------------------------

def _save_npy_atomic(path: Path, array: np.ndarray) -> None:
    write_atomic(path, lambda f: np.save(f, array, allow_pickle=False))


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_END = b"\x00\x00\x00\x00IEND\xaeB`\x82"  # the empty IEND chunk every complete PNG ends with


def png_complete(path: Path) -> bool:
    """True when ``path`` starts with the PNG signature and ends with the IEND chunk: PNGs are written
    without fsync, so after a power loss a file can exist with its name but not its bytes."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            f.seek(0, os.SEEK_END)
            if f.tell() < 8 + len(PNG_END):
                return False
            f.seek(-len(PNG_END), os.SEEK_END)
            return head == PNG_SIGNATURE and f.read() == PNG_END
    except OSError:
        return False


# Settings that decide what image a seed gets: an output written with other values is not resumed.
IMAGE_SETTINGS = ("checkpoint_sha256", "weights", "kind", "steps", "t_mid", "ts", "solver", "guidance",
                  "label", "resolution", "channels", "seed", "format")


def manifest_for(info: dict, seed: int, n: int, fmt: str, batch: int) -> dict:
    return {"tool": "scmctl sample", **{k: info.get(k) for k in IMAGE_SETTINGS if k in info},
            "seed": seed, "n": n, "format": fmt, "batch": batch, "nfe": info.get("nfe"),
            "checkpoint": info.get("checkpoint")}


def _describe(k: str, v) -> str:
    return f"{k}={v if k != 'checkpoint_sha256' or v is None else str(v)[:12]}"


class _Output:
    """Shared manifest handling of the two output kinds."""

    manifest_path: Path
    out: Path

    def read_manifest(self) -> Optional[dict]:
        if not self.manifest_path.is_file():
            return None
        try:
            m = json.loads(self.manifest_path.read_text())
        except (OSError, ValueError):
            raise UsageError(f"{self.manifest_path}: unreadable sample manifest; remove it (and the samples "
                             "it describes) or choose another --out") from None
        if not isinstance(m, dict):
            raise UsageError(f"{self.manifest_path}: not a sample manifest; choose another --out")
        return m

    def check_settings(self, old: dict, new: dict) -> None:
        diff = [k for k in IMAGE_SETTINGS if old.get(k) != new.get(k)]
        if diff:
            was = ", ".join(_describe(k, old.get(k)) for k in diff)
            now = ", ".join(_describe(k, new.get(k)) for k in diff)
            raise UsageError(f"{self.out} was written with {was} (now {now}); re-run with the same settings "
                             "to resume, or choose another --out")


class PngFolder(_Output):
    """``{seed:06d}.png`` files in a folder, plus ``samples.json``."""

    def __init__(self, out: Path, writers: int = 0):
        self.out = Path(out)
        self.manifest_path = self.out / "samples.json"
        self.writers = writers or min(8, os.cpu_count() or 1)
        self._pool = None
        self._inflight: list = []

    @staticmethod
    def name(seed: int) -> str:
        return f"{seed:06d}.png"

    def check(self, manifest: dict) -> None:
        """Refuse an output written with other settings (read-only; every process may call it)."""
        if self.out.exists() and not self.out.is_dir():
            raise UsageError(f"--out {self.out}: exists and is not a folder (an .npz output needs the .npz suffix)")
        old = self.read_manifest()
        if old is None:
            if self.out.is_dir() and any(p.suffix.lower() == ".png" and not p.name.startswith(".")
                                         for p in self.out.iterdir()):
                raise UsageError(f"{self.out} holds PNG files not written by this version of scmctl sample "
                                 "(no samples.json); choose another --out")
            return
        self.check_settings(old, manifest)
        if manifest["n"] < old.get("n", 0):
            raise UsageError(f"{self.out} holds {old['n']} images (seeds {old['seed']}..{old['seed'] + old['n'] - 1}); "
                             f"-n {manifest['n']} would leave the extra ones: use -n {old['n']} or another --out")

    def prepare(self, manifest: dict) -> None:
        """Create the folder, drop our own temporary left-overs (``.tmp-NNNNNN.png.*``), drop PNGs
        whose bytes never reached the disk, record the manifest (one process)."""
        self.out.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(self.out, "*.png")
        remove_stale_temps(self.out, self.manifest_path.name)
        for p in self.out.glob("[0-9]*.png"):
            if not png_complete(p):
                p.unlink(missing_ok=True)
        write_json_atomic(self.manifest_path, manifest)

    def pending(self, plan: Iterable[tuple[int, range]], seed: int) -> list[tuple[int, range]]:
        present = set(os.listdir(self.out)) if self.out.is_dir() else set()
        return [(j, r) for j, r in plan if any(self.name(seed + k) not in present for k in r)]

    def write(self, j: int, b: Batch) -> None:
        """Queue the batch's PNGs on writer threads (PNG encoding overlaps the next batch);
        :meth:`close` waits for them."""
        from concurrent.futures import ThreadPoolExecutor

        from scmctl.data.imageio import write_png

        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=self.writers, thread_name_prefix="png")
        for s, img in zip(b.seeds, b.images):
            p = self.out / self.name(s)
            if not p.exists():  # a resumed batch: images already written stay as they are
                self._inflight.append(self._pool.submit(write_png, p, img))
        while len(self._inflight) > 4 * max(len(b.seeds), 1):  # bound the images held in memory
            self._inflight.pop(0).result()

    def close(self) -> None:
        """Wait until every queued PNG is on disk (a writer's error is raised here)."""
        try:
            for f in self._inflight:
                f.result()
        finally:
            self._inflight = []
            if self._pool is not None:
                self._pool.shutdown(wait=True)
                self._pool = None

    def first_images(self, seed: int, n: int, k: int) -> np.ndarray:
        from scmctl.data.imageio import read_image

        return np.stack([read_image(self.out / self.name(seed + i)) for i in range(min(n, k))])

    def finish(self, n: int, batch: int) -> None:
        pass


class NpzParts(_Output):
    """One ``.npz`` (``arr_0`` uint8 NHWC, ``labels``) from per-batch chunks in ``NAME.npz.parts/``,
    merged by one process at the end; the manifest is ``NAME.npz.json``."""

    def __init__(self, out: Path):
        self.out = Path(out)
        self.parts = self.out.with_name(self.out.name + ".parts")
        self.manifest_path = self.out.with_name(self.out.name + ".json")

    def chunk(self, j: int) -> Path:
        return self.parts / f"batch-{j:06d}.npy"

    def labels_chunk(self, j: int) -> Path:
        return self.parts / f"batch-{j:06d}-labels.npy"

    def check(self, manifest: dict) -> None:
        if self.out.exists() and not self.out.is_file():
            raise UsageError(f"--out {self.out}: exists and is not a file")
        old = self.read_manifest()
        if old is None:
            if self.out.exists() or self.parts.exists():
                raise UsageError(f"{self.out} exists without its manifest {self.manifest_path.name}; remove it "
                                 "or choose another --out")
            return
        self.check_settings(old, manifest)
        if old.get("n") != manifest["n"]:
            raise UsageError(f"{self.out} was written with -n {old.get('n')} (now {manifest['n']}); "
                             "re-run with the same -n, or choose another --out")
        if self.parts.exists() and old.get("batch") != manifest["batch"]:
            raise UsageError(f"{self.parts} holds batches of {old.get('batch')} images; resume with "
                             f"--batch {old.get('batch')}")

    @property
    def complete(self) -> bool:
        return self.out.is_file() and self.manifest_path.is_file()

    def prepare(self, manifest: dict) -> None:
        self.out.parent.mkdir(parents=True, exist_ok=True)
        if self.complete:
            return
        self.parts.mkdir(exist_ok=True)
        remove_stale_temps(self.parts)                        # NAME.npz.parts/ is this command's own
        remove_stale_temps(self.out.parent, self.out.name)    # .tmp-NAME.npz.* only, never others'
        remove_stale_temps(self.out.parent, self.manifest_path.name)
        write_json_atomic(self.manifest_path, manifest)

    def pending(self, plan: Iterable[tuple[int, range]], seed: int) -> list[tuple[int, range]]:
        if self.complete:
            return []
        present = set(os.listdir(self.parts)) if self.parts.is_dir() else set()
        return [(j, r) for j, r in plan if self.chunk(j).name not in present]

    def close(self) -> None:
        pass

    def write(self, j: int, b: Batch) -> None:
        if b.labels is not None:  # labels first: a chunk counts as done once its images exist
            _save_npy_atomic(self.labels_chunk(j), b.labels)
        _save_npy_atomic(self.chunk(j), np.ascontiguousarray(b.images))

    def _chunks(self, n: int, batch: int) -> list[int]:
        js = list(range(-(-n // batch)))
        missing = [j for j in js if not self.chunk(j).is_file()]
        if missing:
            raise UsageError(f"{self.parts}: {len(missing)} batch(es) missing (e.g. {self.chunk(missing[0]).name}); "
                             "re-run the same command to generate them")
        return js

    def first_images(self, seed: int, n: int, k: int) -> np.ndarray:
        if self.complete:
            with np.load(self.out, allow_pickle=False) as z:
                return np.asarray(z["arr_0"][:k])
        got, out = 0, []
        j = 0
        while got < min(n, k):
            a = np.load(self.chunk(j), allow_pickle=False)
            out.append(a[:k - got])
            got += len(out[-1])
            j += 1
        return np.concatenate(out)

    def finish(self, n: int, batch: int) -> None:
        """Merge the chunks into ``out`` (streamed, atomic), then remove them."""
        if self.complete:
            return
        js = self._chunks(n, batch)
        first = np.load(self.chunk(0), mmap_mode="r", allow_pickle=False)
        with_labels = self.labels_chunk(0).is_file()
        def write(f):
            with zipfile.ZipFile(f, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
                _stream_npy(zf, "arr_0.npy", (n, *first.shape[1:]), first.dtype,
                            (np.load(self.chunk(j), allow_pickle=False) for j in js))
                if with_labels:
                    _stream_npy(zf, "labels.npy", (n,), np.dtype(np.int64),
                                (np.load(self.labels_chunk(j), allow_pickle=False).astype(np.int64) for j in js))

        write_atomic(self.out, write)
        for p in self.parts.iterdir():
            p.unlink()
        self.parts.rmdir()


def _stream_npy(zf: zipfile.ZipFile, name: str, shape: tuple, dtype: np.dtype, chunks: Iterable[np.ndarray]) -> None:
    """Write an .npy member of known shape from chunks, without holding the whole array."""
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False, "shape": tuple(shape)}
    total = 0
    with zf.open(name, "w", force_zip64=True) as f:
        np.lib.format.write_array_header_2_0(f, header)
        for c in chunks:
            c = np.ascontiguousarray(c, dtype=dtype)
            f.write(c.tobytes())
            total += c.shape[0]
    if total != shape[0]:
        raise RuntimeError(f"{name}: merged {total} rows, expected {shape[0]}")


def open_output(out: Path, fmt: str):
    return NpzParts(out) if fmt == "npz" else PngFolder(out)


# --------------------------------------------------------------------------------------------
# 2-step t_mid search (FID on a small budget, the same seeds for every t_mid)
# --------------------------------------------------------------------------------------------

def ternary_search(f: Callable[[float], float], lo: float, hi: float, iters: int,
                   digits: int = 4) -> dict[float, float]:
    """Minimize a unimodal ``f`` on [lo, hi]: each iteration evaluates the two inner third points
    and drops the outer third beside the larger value. Points are rounded to ``digits`` decimals and
    cached, so a point is never evaluated twice. Returns {t: f(t)} of every evaluated point."""
    cache: dict[float, float] = {}

    def value(t: float) -> float:
        t = round(t, digits)
        if t not in cache:
            cache[t] = f(t)
        return cache[t]

    for _ in range(iters):
        m1, m2 = lo + (hi - lo) / 3, hi - (hi - lo) / 3
        if value(m1) <= value(m2):
            hi = m2
        else:
            lo = m1
    return cache
