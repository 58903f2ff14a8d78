"""Sampling and feature-extraction throughput against the network's forward throughput.

Prints measured numbers only:
- forward: images/s of one network forward (F_θ at a fixed batch), the upper bound for sampling;
- 2-step sampling: images/s through the real code path (`scmctl.generation.open_generator(...)
  .batches`, i.e. per-seed noise draws, two network calls, uint8 conversion and the copy to the
  host), from a checkpoint of the preset's network with random weights written here; optionally
  also with PNG writing (`--png`);
- the ratio of 2-step sampling to forward/2 (the issue's target: >= 0.9);
- feature extraction images/s: the real TF-Inception (legacy_tensorflow mode) when its weights
  are found locally, else torchvision's Inception-v3 architecture with random weights (labelled:
  same network shape, so a timing stand-in only; it resizes to 299x299 like the legacy mode).

Each figure is the throughput over a stream of --iters batches after --warmup batches (CUDA
synchronized at both ends; sampling syncs every batch anyway when it copies the images to the host).

    python benchmarks/sample_eval.py --preset cifar10 --batch 8 --set network.model_channels=32
    python benchmarks/sample_eval.py --preset cifar10 --batch 256 --device cuda
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing


def _network_config(args):
    from scmctl import config

    cfg = config.resolve(args.preset, "sct", args.set)
    n = cfg.network
    n.resolution = n.resolution or cfg.data.resolution or args.resolution
    n.channels = n.channels or 3
    n.num_classes = n.num_classes if n.num_classes is not None else 0
    return cfg


def _stream_time(items, iters: int, warmup: int, sync) -> float:
    """Seconds per item of an iterator over ``iters`` items, after ``warmup`` items."""
    for _ in range(warmup):
        next(items)
    sync()
    t0 = time.perf_counter()
    for _ in range(iters):
        next(items)
    sync()
    return (time.perf_counter() - t0) / iters


def _repeat(fn):
    while True:
        yield fn()


class _TorchvisionInception:
    """torchvision Inception-v3 (random weights), 2048-d pool features of uint8 images resized to 299."""

    name = "torchvision inception_v3, RANDOM weights (architecture stand-in, timing only)"

    def __init__(self, device):
        import torch
        from torchvision.models import inception_v3

        net = inception_v3(weights=None, aux_logits=False, init_weights=False)
        net.fc = torch.nn.Identity()
        self.net, self.device = net.to(device).eval(), device

    def features(self, images):
        import torch
        import torch.nn.functional as F

        with torch.no_grad():
            x = images.to(self.device).float() / 127.5 - 1
            x = F.interpolate(x.expand(-1, 3, -1, -1), size=(299, 299), mode="bilinear", align_corners=False)
            return self.net(x).float().cpu()


def _detector(device):
    from scmctl.errors import UsageError
    from scmctl.metrics import find_inception_weights, load_detector

    try:
        find_inception_weights()
    except UsageError:
        return _TorchvisionInception(device), "stand-in"
    d = load_detector("inception", "legacy_tensorflow", device)
    return d, "real"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="cifar10")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--feature-batch", type=int, default=0, help="detector batch (default: --batch)")
    ap.add_argument("--resolution", type=int, default=32, help="when the preset leaves it to the data")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"),
                    help="bf16 = torch.autocast around the forward and the sampling path alike")
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0, help="CPU threads (0 = torch's default)")
    ap.add_argument("--png", action="store_true", help="also time sampling with PNG writing")
    ap.add_argument("--no-features", action="store_true")
    ap.add_argument("--no-prefetch", action="store_true", help="draw each batch's noises in line (for comparison)")
    ap.add_argument("--set", action="append", default=[])
    args = ap.parse_args()

    import torch

    from scmctl.generation import PngFolder, open_generator
    from scmctl.nn.unet import build_network
    from scmctl.training import checkpoint as ck
    from scmctl.devices import select_device

    if args.threads:
        torch.set_num_threads(args.threads)
    dev = select_device(args.device)
    cfg = _network_config(args)
    torch.manual_seed(0)
    net = build_network(cfg.network, dev).eval().requires_grad_(False)
    params = sum(p.numel() for p in net.parameters())

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    def amp():
        return torch.autocast(dev.type, dtype=torch.bfloat16) if args.dtype == "bf16" else nullcontext()

    B, nc = args.batch, cfg.network.num_classes
    res, ch = cfg.network.resolution, cfg.network.channels
    gpu = torch.cuda.get_device_name(dev) if dev.type == "cuda" else None
    print(f"preset {args.preset}: {params / 1e6:.2f}M parameters, {ch}x{res}x{res}, "
          f"{'classes ' + str(nc) if nc else 'unconditional'}; batch {B}, {args.dtype}, device {dev}"
          f"{' (' + gpu + ')' if gpu else ''}, torch threads {torch.get_num_threads()}")

    x = torch.randn(B, ch, res, res, device=dev)
    t = torch.full((B,), 1.1, device=dev)
    labels = torch.arange(B, device=dev) % nc if nc else None

    def forward():
        with torch.no_grad(), amp():
            net(x, t, labels)

    t_fwd = _stream_time(_repeat(forward), args.iters, args.warmup, sync)
    fwd_ips = B / t_fwd

    with tempfile.TemporaryDirectory(prefix="scmctl-bench-") as tmp:
        path = Path(tmp) / "checkpoint-0000000.pt"
        state = net.state_dict()
        ck.save_atomic({"format": ck.FORMAT, "version": ck.VERSION, "kind": "consistency", "step": 0,
                        "config": cfg.to_dict(), "net": state, "ema": state, "optimizer": {}}, path)
        del state
        gen = open_generator(path, steps=2, device=dev)
        gen.prefetch = gen.prefetch and not args.no_prefetch
        total = B * (args.warmup + args.iters)
        with amp():
            t_gen = _stream_time(gen.batches(range(total), B), args.iters, args.warmup, sync)
        gen_ips = B / t_gen
        png_ips = None
        if args.png:
            out = PngFolder(Path(tmp) / "png")
            out.out.mkdir()

            def written(stream):
                for j, b in enumerate(stream):
                    out.write(j, b)
                    yield j
                out.close()

            def sync_png():  # the timed span ends when the PNGs queued so far are on disk
                sync()
                out.close()

            seeds = range(total, 2 * total)
            with amp():
                batches = gen.stream(seeds[i:i + B] for i in range(0, total, B))
                png_ips = B / _stream_time(written(batches), args.iters, args.warmup, sync_png)
            out.close()

    print(f"{'what':<40} {'images/s':>12}")
    print(f"{'network forward (1 call)':<40} {fwd_ips:>12.1f}")
    print(f"{'2-step sampling (open_generator.batches)':<40} {gen_ips:>12.1f}")
    if png_ips is not None:
        print(f"{'2-step sampling + PNG writing':<40} {png_ips:>12.1f}")
    if args.no_prefetch:
        print("(noises drawn in line, no prefetch thread)")
    print(f"2-step sampling / (forward / 2) = {gen_ips / (fwd_ips / 2):.3f}  (target >= 0.9)")
    if png_ips is not None:
        print(f"with PNG writing / (forward / 2) = {png_ips / (fwd_ips / 2):.3f}")

    if args.no_features:
        return
    det, kind = _detector(dev)
    fb = args.feature_batch or B
    imgs = torch.randint(0, 256, (fb, ch, res, res), dtype=torch.uint8)
    t_feat = _stream_time(_repeat(lambda: det.features(imgs)), args.iters, args.warmup, sync)
    label = "TF-Inception legacy_tensorflow (real weights)" if kind == "real" else det.name
    print(f"feature extraction, {label}, batch {fb}, {res}x{res} inputs: {fb / t_feat:.1f} images/s")


if __name__ == "__main__":
    sys.exit(main())
