"""Time and peak memory of `scmctl import` on an EDM2-S-sized snapshot (ImageNet-512 latents,
1000 classes, 280M parameters, fp16), built with the test suite's persistent-pickle writer.

    python benchmarks/import_snapshot.py [--channels 192] [--out /tmp/edm2-s]
"""

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--channels", type=int, default=192)
    ap.add_argument("--out", default="/tmp/edm2-import-bench")
    args = ap.parse_args()
    import torch

    import edm_snapshots as E

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    snap = out / "edm2.pkl"
    torch.manual_seed(0)
    with torch.no_grad():
        net = E.Precond(64, 4, 1000, model_channels=args.channels, channel_mult=[1, 2, 3, 4], num_blocks=3,
                        attn_resolutions=[16, 8], channels_per_head=64, logvar_channels=128).eval()
    params = sum(p.numel() for p in net.parameters())
    snap.write_bytes(E.edm2_snapshot(net, encoder=E.VAEEncoder([5.81, 3.25, 0.12, -2.15], [4.17, 4.62, 3.71, 3.28])))
    del net
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "scmctl", "import", str(snap), "--out", str(out / "teacher.pt"),
                        "--json"], capture_output=True, text=True, check=True)
    dt = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2 ** 20
    print(json.dumps({"params": params, "snapshot_bytes": snap.stat().st_size, "import_s": round(dt, 1),
                      "import_peak_rss_gib": round(peak, 2), "result": json.loads(r.stdout)}))


if __name__ == "__main__":
    main()
