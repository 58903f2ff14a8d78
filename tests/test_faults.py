"""kill -9 at random moments, then the same command: the result equals an uninterrupted run's.

Each test runs the command once uninterrupted (timing it), then K times killed with SIGKILL after a
delay drawn uniformly from (0, that time) with a fixed seed, then once to completion, and compares
the outputs byte for byte (arrays; metadata except creation times).
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from test_data import _fake_cifar, _write_tar
from test_sample_scale import make_checkpoint


def env1():
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def scmctl(*args) -> list[str]:
    return [sys.executable, "-m", "scmctl", *[str(a) for a in args]]


def timed(cmd) -> float:
    t0 = time.perf_counter()
    r = subprocess.run(cmd, env=env1(), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return time.perf_counter() - t0


def kill_at_random(cmd, kills: int, span: float, seed: int) -> list[float]:
    """Start `cmd` `kills` times, each killed with SIGKILL after U(0, span) seconds; the delays."""
    rng = random.Random(seed)
    delays = []
    for _ in range(kills):
        delay = rng.uniform(0.0, span)
        proc = subprocess.Popen(cmd, env=env1(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        delays.append(delay)
    return delays


def finish(cmd) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, env=env1(), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    return r


def no_temps(folder: Path):
    left = [p for p in folder.rglob("*") if p.name.startswith(".tmp-") or p.name.endswith(".partial")]
    assert not left, left


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("faults") / "c.pt", 3)


SAMPLE_KILLS = 5


@pytest.mark.parametrize("fmt", ["png", "npz"])
def test_sample_survives_kill_9_at_random_moments(fmt, ckpt, tmp_path):
    name = "out.npz" if fmt == "npz" else "out"
    args = ("sample", ckpt, "-n", 48, "--batch", 2, "--device", "cpu")
    span = timed(scmctl(*args, "--out", tmp_path / "ref" / name))
    cmd = scmctl(*args, "--out", tmp_path / "killed" / name)
    kill_at_random(cmd, SAMPLE_KILLS, span, seed=1 if fmt == "png" else 2)
    finish(cmd)
    ref, got = tmp_path / "ref" / name, tmp_path / "killed" / name
    if fmt == "npz":
        with np.load(ref) as a, np.load(got) as b:
            assert sorted(a.files) == sorted(b.files)
            assert all(np.array_equal(a[k], b[k]) for k in a.files)
    else:
        names = sorted(p.name for p in ref.glob("*.png"))
        assert names == sorted(p.name for p in got.glob("*.png")) and len(names) == 48
        assert all((ref / n).read_bytes() == (got / n).read_bytes() for n in names)
    no_temps(tmp_path / "killed")


EVAL_REF_KILLS = 4


def test_eval_ref_survives_kill_9_at_random_moments(tmp_path):
    import torch

    from scmctl.data.imageio import write_png

    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(40):
        write_png(images / f"{i:03d}.png", rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))

    class Feat(torch.nn.Module):
        def forward(self, x):
            return torch.nn.functional.adaptive_avg_pool2d(x.float() / 255.0, 2).flatten(1)

    torch.jit.script(Feat()).save(str(tmp_path / "det.pt"))
    args = ("eval", "ref", images, "--detector", tmp_path / "det.pt", "--batch", 2, "--features", 10, "--device", "cpu")
    span = timed(scmctl(*args, "--out", tmp_path / "ref.npz"))
    cmd = scmctl(*args, "--out", tmp_path / "killed" / "ref.npz")
    kill_at_random(cmd, EVAL_REF_KILLS, span, seed=3)
    finish(cmd)
    with np.load(tmp_path / "ref.npz") as a, np.load(tmp_path / "killed" / "ref.npz") as b:
        for k in a.files:
            if k not in ("created", "data"):
                assert np.array_equal(a[k], b[k]), k
    no_temps(tmp_path / "killed")


DATA_KILLS = 3


def _same_dataset(a: Path, b: Path):
    for name in ("images.npy", "labels.npy"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    ma, mb = (json.loads((p / "dataset.json").read_text()) for p in (a, b))
    ma.pop("created"), mb.pop("created")
    assert ma == mb


def test_data_cifar10_survives_kill_9_at_random_moments(tmp_path):
    _, blobs = _fake_cifar(np.random.default_rng(5), counts=(700, 700, 700, 700, 700), test_count=10)
    tar = tmp_path / "cifar-10-python.tar.gz"
    _write_tar(tar, blobs)
    span = timed(scmctl("data", "cifar10", tar, "--out", tmp_path / "ref"))
    cmd = scmctl("data", "cifar10", tar, "--out", tmp_path / "killed" / "c10")
    kill_at_random(cmd, DATA_KILLS, span, seed=4)
    finish(cmd)
    _same_dataset(tmp_path / "ref", tmp_path / "killed" / "c10")
    no_temps(tmp_path / "killed")


def test_data_imagenet_survives_kill_9_at_random_moments(tmp_path):
    from scmctl.data.imageio import write_png

    src = tmp_path / "src"
    rng = np.random.default_rng(6)
    for c in range(3):
        for i in range(400):
            (src / f"n0{c}").mkdir(parents=True, exist_ok=True)
            write_png(src / f"n0{c}" / f"{i:04d}.png", rng.integers(0, 256, (12, 10, 3), dtype=np.uint8))
    args = ("data", "imagenet", src, "--resolution", 8, "--workers", 1)
    span = timed(scmctl(*args, "--out", tmp_path / "ref"))
    cmd = scmctl(*args, "--out", tmp_path / "killed" / "in")
    kill_at_random(cmd, DATA_KILLS, span, seed=5)
    finish(cmd)
    _same_dataset(tmp_path / "ref", tmp_path / "killed" / "in")
    no_temps(tmp_path / "killed")


# ------------------------------------------------------------------ training

TRAIN_KILLS = 20
TINY = ["--preset", "tiny", "--set", "data.resolution=8", "--set", "network.model_channels=8",
        "--set", "network.channel_mult=[1]", "--set", "network.attn_resolutions=[8]",
        "--set", "network.head_channels=8", "--set", "network.adaptive_weight_channels=8",
        "--set", "train.checkpoint_every=3", "--set", "train.grid_every=0", "--set", "train.keep_checkpoints=2",
        "--batch", "4", "--steps", "30"]


def forked(argv, kill_after: float | None = None) -> int:
    """Run `scmctl ARGV` in a forked child (torch already imported: no start-up cost), killed with
    SIGKILL after `kill_after` seconds when given. Returns the child's wait status."""
    pid = os.fork()
    if pid == 0:  # the child: run the command, never return into pytest
        code = 1
        try:
            import io as _io

            sys.stdout = sys.stderr = _io.StringIO()
            from scmctl.cli import main

            main([str(a) for a in argv])
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        finally:
            os._exit(code)
    if kill_after is not None:
        deadline = time.perf_counter() + kill_after
        while time.perf_counter() < deadline:
            if os.waitpid(pid, os.WNOHANG)[0]:
                return 0  # finished before its kill
            time.sleep(0.002)
        os.kill(pid, signal.SIGKILL)
    return os.waitpid(pid, 0)[1]


def _strip_timing(line: str) -> dict:
    rec = json.loads(line)
    rec.pop("images_per_s")  # wall-clock throughput: the one field that cannot repeat
    return rec


def test_train_survives_20_kill_9_in_a_row_and_logs_every_step(tmp_path):
    import torch

    torch.set_num_threads(1)
    from scmctl.cli import main  # import here what the children would import, once: forks start warm

    try:
        main(["train", "--run-dir", str(tmp_path / "warm-up"), *TINY, "--steps", "1", "--json"])
    except SystemExit:
        pass
    ref = tmp_path / "ref"
    t0 = time.perf_counter()
    assert forked(["train", "--run-dir", ref, *TINY]) == 0
    span = time.perf_counter() - t0
    run_dir = tmp_path / "killed"
    rng = random.Random(7)
    for _ in range(TRAIN_KILLS):
        forked(["train", "--run-dir", run_dir, *TINY], kill_after=rng.uniform(0.0, span))
    assert forked(["train", "--run-dir", run_dir, *TINY]) == 0
    want = [_strip_timing(ln) for ln in (ref / "stats.jsonl").read_text().splitlines()]
    got = [_strip_timing(ln) for ln in (run_dir / "stats.jsonl").read_text().splitlines()]
    assert [r["step"] for r in got] == list(range(1, 31))
    assert got == want
    a = torch.load(ref / "checkpoint-0000030.pt", weights_only=True)
    b = torch.load(run_dir / "checkpoint-0000030.pt", weights_only=True)
    assert all(torch.equal(a["ema"][k], b["ema"][k]) for k in a["ema"])
    assert not [p for p in run_dir.iterdir() if p.name.startswith(".tmp-")]
