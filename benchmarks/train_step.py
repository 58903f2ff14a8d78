"""Training-step throughput and memory of diffusion, sCT, sCD and sCD + aVSD steps of one preset network.

Prints images/s and peak memory per step kind, and the ratios to the diffusion step measured in the
same run (targets: sCT <= 1.5x the diffusion step's time and <= 1.3x its memory; sCD about 2x, as in
the paper; sCD + aVSD, ``--methods ...,scd_avsd``, is also reported relative to sCD). The step is
the training loop's own (scmctl.training.loop.build_model: bf16 autocast, fp32 tangent,
torch.compile as the preset or --set says). Each variant runs in its own process:

- time: median wall time of --steps steps after --warmup steps (torch.cuda.synchronize on GPU);
- memory on CUDA: torch.cuda.max_memory_allocated during the timed steps;
- memory on CPU (measured in a second process per variant, because the allocator setting below
  slows the steps): the resident-set high-water mark (VmHWM, reset through /proc/self/clear_refs after
  the warm-up) minus the resident set at that moment, with glibc told to mmap every allocation of
  64 KiB or more (MALLOC_MMAP_THRESHOLD_) and to trim its heap, so freed tensors leave the resident
  set at once: the step's own working memory (activations, tangents), like the CUDA figure.

    python benchmarks/train_step.py                       # tiny preset, CPU
    python benchmarks/train_step.py --preset cifar10 --batch 128 --device cuda
    python benchmarks/train_step.py --preset imagenet512-s --batch 32 --device cuda   # bf16 preset
    python benchmarks/train_step.py --methods diffusion,sct,dsct                    # + discrete-time sCT
    python benchmarks/train_step.py --methods diffusion,scd,scd_avsd   # the cost of adaptive VSD
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _reset_cpu_peak() -> None:
    import ctypes
    import gc

    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS


def _cpu_peak_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


# discrete-time sCM rows: the method with loss.discrete_steps = --discrete-steps (no jvp)
DISCRETE = {"dsct": "sct", "dscd": "scd"}


def child(args) -> dict:
    import torch

    from scmctl import config
    from scmctl.distributed import Dist
    from scmctl.devices import select_device
    from scmctl.nn.networks import build_network
    from scmctl.training.fake_score import FakeScore
    from scmctl.training.loop import build_model, make_optimizer, training_step
    from scmctl.training.run_config import resolve_for_run

    torch.set_num_threads(args.threads)
    avsd = args.method == "scd_avsd"  # sCD + adaptive VSD: sCD with loss.vsd_weight = 1
    method = "scd" if avsd else DISCRETE.get(args.method, args.method)
    extra = [f"loss.discrete_steps={args.discrete_steps}"] if args.method in DISCRETE else []
    extra += ["loss.vsd_weight=1.0"] if avsd else []
    cfg = config.resolve(args.preset, method, args.set + extra)
    net_cfg = cfg.network
    net_cfg.resolution = net_cfg.resolution or args.resolution
    net_cfg.channels = net_cfg.channels or 1
    net_cfg.num_classes = net_cfg.num_classes or 0
    dev = select_device(args.device)
    torch.manual_seed(0)
    teacher = None
    if method == "scd":
        teacher = build_network(net_cfg, dev).eval().requires_grad_(False)
    cfg, _ = resolve_for_run(cfg, device=args.device)  # as `scmctl train/distill` runs it
    net_cfg = cfg.network
    net = build_network(net_cfg, dev).train()
    fake = FakeScore(cfg, teacher, dev) if avsd else None
    model = build_model(cfg, net, Dist(device=dev), teacher, fake=fake.net if fake else None,
                        vsd_head=fake.head if fake else None)
    opt = make_optimizer(cfg, net.parameters())
    if fake is not None:
        fake.make_optimizers(cfg, model)
    x0 = torch.randn(args.batch, net_cfg.channels, net_cfg.resolution, net_cfg.resolution, device=dev) * 0.5
    onehot = None
    if net_cfg.num_classes:
        onehot = torch.nn.functional.one_hot(torch.arange(args.batch, device=dev) % net_cfg.num_classes,
                                             net_cfg.num_classes).float()

    def step(i):
        training_step(cfg, net, opt, x0, onehot, 20000 + i, cfg.train.lr, teacher, model=model, fake_score=fake)

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    for i in range(args.warmup):
        step(i)
    sync()
    if dev.type == "cpu":
        _reset_cpu_peak()
    base_rss = _rss_bytes()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base_cuda = torch.cuda.memory_allocated()
    times = []
    for i in range(args.steps):
        t0 = time.perf_counter()
        step(i)
        sync()
        times.append(time.perf_counter() - t0)
    if dev.type == "cuda":
        mem = torch.cuda.max_memory_allocated() - base_cuda
        mem_kind = "cuda max_memory_allocated above steady state"
    else:
        mem = _cpu_peak_bytes() - base_rss
        mem_kind = "peak RSS above steady state (VmHWM)"
    return {"method": args.method, "time_s": statistics.median(times), "mem_bytes": mem,
            "mem_kind": mem_kind, "device": str(dev),
            "gpu": torch.cuda.get_device_name(dev) if dev.type == "cuda" else None,
            "params": sum(p.numel() for p in net.parameters()),
            "precision": cfg.train.precision, "jvp_fp32": cfg.loss.jvp_fp32, "compile": cfg.train.compile}


def _run_child(cmd, env, name) -> dict:
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        sys.exit(f"{name} step failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--resolution", type=int, default=16, help="when the preset leaves it to the data")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--set", action="append", default=[])
    ap.add_argument("--methods", default="diffusion,sct,scd",
                    help="also dsct, dscd: sCT/sCD in discrete time (loss.discrete_steps=--discrete-steps)")
    ap.add_argument("--discrete-steps", type=int, default=1024)
    ap.add_argument("--method", help=argparse.SUPPRESS)
    ap.add_argument("--mem-run", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.method:  # child process
        print(json.dumps(child(args)))
        return
    results = {}
    for m in args.methods.split(","):
        cmd = [sys.executable, __file__, "--method", m] + [a for a in sys.argv[1:]]
        results[m] = _run_child(cmd, dict(os.environ), m)
        if args.device == "cpu":  # memory from a second process with mmap-backed allocations
            mem = _run_child(cmd + ["--mem-run"], dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536"), m)
            results[m].update(mem_bytes=mem["mem_bytes"], mem_kind=mem["mem_kind"])
    d = results["diffusion"]
    print(f"preset {args.preset}, batch {args.batch}, device {d['device']} {d['gpu'] or ''}, "
          f"{d['params']:,} parameters, precision {d['precision']} (fp32 tangent: {d['jvp_fp32']}), "
          f"compile {d['compile']}; memory = {d['mem_kind']}")
    print(f"{'step':<10} {'img/s':>9} {'time (ms)':>10} {'x diffusion':>12} {'memory (MiB)':>13} {'x diffusion':>12}")
    for m, r in results.items():
        print(f"{m:<10} {args.batch / r['time_s']:>9.1f} {r['time_s'] * 1e3:>10.1f} {r['time_s'] / d['time_s']:>12.2f} "
              f"{r['mem_bytes'] / 2**20:>13.1f} {r['mem_bytes'] / max(d['mem_bytes'], 1):>12.2f}")
    if "sct" in results:
        s = results["sct"]
        print(f"sCT/diffusion: time {s['time_s'] / d['time_s']:.2f}x (target <= 1.5x), "
              f"memory {s['mem_bytes'] / max(d['mem_bytes'], 1):.2f}x (target <= 1.3x)")
    if "scd" in results:
        print(f"sCD/diffusion: time {results['scd']['time_s'] / d['time_s']:.2f}x (paper: about 2x)")
    for m in (m for m in DISCRETE if m in results and DISCRETE[m] in results):
        print(f"{m}/{DISCRETE[m]}: time {results[m]['time_s'] / results[DISCRETE[m]]['time_s']:.2f}x "
              f"(finite-difference tangent vs jvp, N = {args.discrete_steps})")
    if "scd" in results and "scd_avsd" in results:
        a, b = results["scd_avsd"], results["scd"]
        print(f"sCD + aVSD/sCD: time {a['time_s'] / b['time_s']:.2f}x, memory "
              f"{a['mem_bytes'] / max(b['mem_bytes'], 1):.2f}x")
    print(json.dumps({"preset": args.preset, "batch": args.batch, "gpu": d["gpu"], "device": d["device"],
                      "results": {m: {"images_per_s": args.batch / r["time_s"], "time_s": r["time_s"],
                                      "mem_bytes": r["mem_bytes"]} for m, r in results.items()}}))


if __name__ == "__main__":
    main()
