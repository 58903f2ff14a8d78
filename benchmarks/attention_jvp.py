"""Time and peak memory of attention's primal and forward-mode (JVP) paths; prints, never asserts.

For each shape B·H·N·D it measures, through the public op ``scmctl.attention.attention``:

  fwd        primal forward (backend "auto": xformers if usable, else SDPA), under no_grad
  fwd+bwd    primal forward + backward (gradients of q, k, v)
  jvp/math   torch.func.jvp with jvp_impl="math" (PyTorch's forward AD through softmax: the naive
             jvp that materializes N×N buffers)
  jvp/chunk  torch.func.jvp with jvp_impl="chunked"
  jvp/fused  torch.func.jvp with jvp_impl="fused" (CUDA + triton only)

Every jvp returns O and tO (with tangents on q, k and v). Times are medians of --repeats calls after
a warm-up (on a CPU the variants take turns, so that other load on the machine hits them alike); ratios are to the primal forward of the same shape in the same run. "extra peak" is the
peak memory during the call minus the memory held just before it (inputs excluded, outputs
included):
  * CUDA: torch.cuda.max_memory_allocated() after reset_peak_memory_stats(), minus
    memory_allocated() before the call (the caching allocator's own accounting, exact);
  * CPU: each (shape, variant) runs in a fresh subprocess: warm-up at a tiny size, then inputs are
    made, VmRSS is read from /proc/self/status, the variant runs once, and the extra peak is
    VmHWM (the kernel's resident-set high-water mark) minus that VmRSS. This counts real resident
    pages, so it is an honest upper bound of what the op needed (allocator slack included).
Accuracy: rel. error ‖x − ref‖/‖x_ref‖ of O and tO against a float64 jvp of the explicit formula,
computed for the first (batch, head) and its first 2048 queries only (a float64 N×N reference for
all heads would not fit).

  python benchmarks/attention_jvp.py                      # CPU shapes, or the GPU shapes on CUDA
  python benchmarks/attention_jvp.py --shapes 1x4x4096x64 --dtype float32 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from scmctl.attention import attention, resolve_backend  # noqa: E402

GPU_SHAPES = ["16x8x1024x64", "4x16x4096x64", "1x16x16384x64"]
CPU_SHAPES = ["1x4x1024x64", "1x4x4096x64"]
VARIANTS = ["fwd", "fwd+bwd", "jvp/math", "jvp/chunk", "jvp/fused"]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "float64": torch.float64}


def parse_shape(s):
    b, h, n, d = (int(x) for x in s.lower().split("x"))
    return b, h, n, d


def make_inputs(shape, dtype, device, seed=0):
    b, h, n, d = shape
    g = torch.Generator(device="cpu").manual_seed(seed)
    ts = [torch.randn(b, h, n, d, generator=g, dtype=torch.float32).to(device=device, dtype=dtype)
          for _ in range(6)]
    return ts[:3], ts[3:]


def variant_fn(name, q, k, v, tq, tk, tv):
    """A zero-argument callable running one variant once; returns its outputs."""
    if name == "fwd":
        def f():
            with torch.no_grad():
                return attention(q, k, v)
    elif name == "fwd+bwd":
        qg, kg, vg = (t.detach().requires_grad_() for t in (q, k, v))
        go = torch.ones_like(q)

        def f():
            o = attention(qg, kg, vg)
            o.backward(go)
            return o.detach(), qg.grad
    else:
        impl = {"jvp/math": "math", "jvp/chunk": "chunked", "jvp/fused": "fused"}[name]

        def f():
            with torch.no_grad():
                return torch.func.jvp(lambda a, b, c: attention(a, b, c, jvp_impl=impl),
                                      (q, k, v), (tq, tk, tv))
    return f


REF_ROWS = 2048


def reference_first_head(q, k, v, tq, tk, tv):
    """float64 (O, tO) for batch 0, head 0, the first REF_ROWS queries (all keys), by forward AD
    through the explicit formula."""
    sl = [t[:1, :1].double() for t in (q, k, v, tq, tk, tv)]
    sl[0], sl[3] = sl[0][:, :, :REF_ROWS], sl[3][:, :, :REF_ROWS]
    scale = q.shape[-1] ** -0.5

    def f(a, b, c):
        return torch.softmax(a @ b.transpose(-1, -2) * scale, dim=-1) @ c

    with torch.no_grad():
        return torch.func.jvp(f, tuple(sl[:3]), tuple(sl[3:]))


def rel_err(x, ref):
    x = x[:1, :1, :REF_ROWS].double()
    return float((x - ref).norm() / ref.norm())


def rss_kib(field):
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def measure_cpu_memory(shape, dtype, name, with_error):
    """Runs in a subprocess (fresh VmHWM): extra peak RSS and errors of one call."""
    torch.manual_seed(0)
    (q, k, v), (tq, tk, tv) = make_inputs((1, 1, 64, shape[3]), dtype, "cpu")
    variant_fn(name, q, k, v, tq, tk, tv)()  # warm-up: load kernels, allocator pools
    (q, k, v), (tq, tk, tv) = make_inputs(shape, dtype, "cpu")
    f = variant_fn(name, q, k, v, tq, tk, tv)
    before = rss_kib("VmRSS")
    out = f()
    peak = rss_kib("VmHWM") - before
    res = {"extra_peak_bytes": max(0, peak) * 1024}
    if with_error and name.startswith("jvp"):
        o_ref, t_ref = reference_first_head(q, k, v, tq, tk, tv)
        res["err_o"], res["err_t"] = rel_err(out[0], o_ref), rel_err(out[1], t_ref)
    return res


def time_cpu_interleaved(shape, dtype, names, repeats):
    """Median wall time per variant; the variants take turns so that load from other processes
    on a shared machine hits them alike."""
    (q, k, v), (tq, tk, tv) = make_inputs(shape, dtype, "cpu")
    fns = {n: variant_fn(n, q, k, v, tq, tk, tv) for n in names}
    for f in fns.values():
        f()
    times = {n: [] for n in names}
    for _ in range(repeats):
        for n, f in fns.items():
            t0 = time.perf_counter()
            f()
            times[n].append(time.perf_counter() - t0)
    return {n: statistics.median(ts) for n, ts in times.items()}


def measure_cuda(shape, dtype, name, repeats, with_error, device):
    (q, k, v), (tq, tk, tv) = make_inputs(shape, dtype, device)
    f = variant_fn(name, q, k, v, tq, tk, tv)
    res = {}
    try:
        out = f()  # warm-up (compiles / autotunes the fused kernel)
        if with_error and name.startswith("jvp"):
            o_ref, t_ref = reference_first_head(q, k, v, tq, tk, tv)
            res["err_o"], res["err_t"] = rel_err(out[0], o_ref), rel_err(out[1], t_ref)
        del out
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        out = f()
        torch.cuda.synchronize(device)
        res["extra_peak_bytes"] = torch.cuda.max_memory_allocated(device) - base
        del out
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
        for i in range(repeats):
            starts[i].record()
            f()
            ends[i].record()
        torch.cuda.synchronize(device)
        res["time_s"] = statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends)) / 1e3
    except torch.OutOfMemoryError:
        res = {"oom": True}
    except Exception as exc:  # report and go on with the other variants
        res = {"failed": f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"[:300]}
    finally:
        del q, k, v, tq, tk, tv, f
        torch.cuda.empty_cache()
    return res


def fmt_bytes(n):
    return f"{n / 2**30:.3f} GiB" if n >= 2**28 else f"{n / 2**20:.1f} MiB"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on CPU")
    ap.add_argument("--shapes", nargs="*", default=None, help="BxHxNxD, e.g. 4x16x4096x64")
    ap.add_argument("--variants", nargs="*", default=VARIANTS)
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--no-error", action="store_true", help="skip the float64 accuracy check")
    ap.add_argument("--json", default=None, help="also write all results to this file")
    ap.add_argument("--_child", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args._child:  # CPU subprocess: shape dtype variant
        shape, dtype, name = args._child
        res = measure_cpu_memory(parse_shape(shape), DTYPES[dtype], name, not args.no_error)
        print("RESULT " + json.dumps(res))
        return 0

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    dtype_name = args.dtype or ("bfloat16" if cuda else "float32")
    dtype = DTYPES[dtype_name]
    shapes = args.shapes or (GPU_SHAPES if cuda else CPU_SHAPES)
    repeats = args.repeats or (20 if cuda else 3)
    variants = [v for v in args.variants if v != "jvp/fused" or cuda]
    if cuda:
        print(f"device: {torch.cuda.get_device_name(device)}; torch {torch.__version__}")
    else:
        print(f"device: CPU ({os.cpu_count()} cores, {torch.get_num_threads()} threads); torch {torch.__version__}")
    print(f"primal backend (auto): {resolve_backend('auto', device)}")
    print(f"dtype {dtype_name}; median of {repeats} calls; extra peak = peak during the call − memory "
          f"before it ({'CUDA allocator' if cuda else 'VmHWM − VmRSS in a fresh subprocess'})")

    results = []
    for s in shapes:
        shape = parse_shape(s)
        rows = {}
        for name in variants:
            if cuda:
                res = measure_cuda(shape, dtype, name, repeats, not args.no_error, device)
            else:
                cmd = [sys.executable, os.path.abspath(__file__), "--_child", s, dtype_name, name] + (
                    ["--no-error"] if args.no_error else [])
                p = subprocess.run(cmd, capture_output=True, text=True)
                line = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
                if p.returncode != 0 or not line:
                    tail = (p.stderr.strip().splitlines() or ["?"])[-1]
                    res = {"failed": tail}
                else:
                    res = json.loads(line[0][7:])
            rows[name] = res
        if not cuda:
            ok = [n for n in variants if "failed" not in rows[n]]
            for n, t in time_cpu_interleaved(shape, dtype, ok, repeats).items():
                rows[n]["time_s"] = t
        results += [{"shape": s, "variant": n, "dtype": dtype_name, **rows[n]} for n in variants]
        base = rows.get("fwd", {})
        print(f"\nB·H·N·D = {'·'.join(s.split('x'))}")
        print(f"  {'variant':<10} {'time':>10} {'x fwd':>7} {'extra peak':>12} {'x fwd':>7} "
              f"{'err O':>9} {'err tO':>9}")
        for name in variants:
            r = rows[name]
            if "time_s" not in r:
                print(f"  {name:<10} {'OOM' if r.get('oom') else 'failed: ' + str(r.get('failed'))}")
                continue
            tr = r["time_s"] / base["time_s"] if "time_s" in base else float("nan")
            mr = r["extra_peak_bytes"] / base["extra_peak_bytes"] if base.get("extra_peak_bytes") else float("nan")
            eo = f"{r['err_o']:.2e}" if "err_o" in r else ""
            et = f"{r['err_t']:.2e}" if "err_t" in r else ""
            print(f"  {name:<10} {r['time_s'] * 1e3:>8.3f}ms {tr:>7.2f} {fmt_bytes(r['extra_peak_bytes']):>12} "
                  f"{mr:>7.2f} {eo:>9} {et:>9}")
        m, c = rows.get("jvp/math", {}), rows.get("jvp/chunk", {})
        if "time_s" in m and "time_s" in c:
            print(f"  chunked vs naive jvp: memory {c['extra_peak_bytes'] / m['extra_peak_bytes']:.3f}x, "
                  f"time {c['time_s'] / m['time_s']:.3f}x")
        fu = rows.get("jvp/fused", {})
        tuned = getattr(sys.modules.get("scmctl._attention_triton"), "_kernel_autotuned", None)
        if "time_s" in fu and getattr(tuned, "best_config", None) is not None:
            print(f"  fused kernel config (autotuned): {tuned.best_config}")
        if "time_s" in fu and "time_s" in base:
            out_bytes = 2 * shape[0] * shape[1] * shape[2] * shape[3] * torch.empty(0, dtype=dtype).element_size()
            print(f"  fused jvp: {fu['time_s'] / base['time_s']:.2f}x fwd time; extra peak "
                  f"{fmt_bytes(fu['extra_peak_bytes'])} = {fu['extra_peak_bytes'] / out_bytes:.3f}x its two "
                  f"outputs (O, tO); {fu['extra_peak_bytes'] / base['extra_peak_bytes']:.2f}x the forward's")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
