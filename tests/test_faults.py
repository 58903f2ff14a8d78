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
from test_metrics import save_standin
from test_reliability import write_random_pngs
from test_sample_scale import make_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny networks: one thread (see conftest)


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
    images = write_random_pngs(tmp_path / "images", 40)
    save_standin(tmp_path / "det.pt")
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

            from _cli import exit_code

            sys.stdout = sys.stderr = _io.StringIO()
            code = exit_code(*argv)
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
    from _cli import exit_code  # import here what the children would import, once: forks start warm

    assert exit_code("train", "--run-dir", tmp_path / "warm-up", *TINY, "--steps", 1) == 0
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


def _train(capsys, run_dir, *extra):
    from _cli import run

    return run(capsys, "train", "--run-dir", run_dir, *TINY, "--steps", 9, *extra)


def _stats_of(run_dir) -> list[dict]:
    return [_strip_timing(ln) for ln in (Path(run_dir) / "stats.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """stats.jsonl of an uninterrupted 9-step run (checkpoints at 3, 6, 9)."""
    from _cli import exit_code

    rd = tmp_path_factory.mktemp("uninterrupted") / "run"
    assert exit_code("train", "--run-dir", rd, *TINY, "--steps", 9) == 0
    return _stats_of(rd)


def test_corrupted_latest_checkpoint_falls_back_to_the_previous_with_a_warning(tmp_path, capsys, uninterrupted):
    rd = tmp_path / "run"
    assert _train(capsys, rd)[0] == 0
    latest = rd / "checkpoint-0000009.pt"
    latest.write_bytes(latest.read_bytes()[: latest.stat().st_size // 2])   # a torn write
    code, out, err = _train(capsys, rd)
    assert code == 0, err
    assert "checkpoint-0000009.pt" in err and "checkpoint-0000006.pt" in err and "warning" in err
    assert _stats_of(rd) == uninterrupted
    from scmctl.training import checkpoint as ck

    assert ck.load(latest)["step"] == 9                                    # rewritten whole


def test_stale_temp_files_of_a_killed_run_are_removed_and_only_those(tmp_path, capsys, uninterrupted):
    rd = tmp_path / "run"
    assert _train(capsys, rd, "--set", "train.checkpoint_every=3")[0] == 0
    ours = [rd / ".tmp-checkpoint-0000012.pt.0badf00d", rd / ".tmp-stats.jsonl.12345678",
            rd / ".tmp-config.yaml.abcdef01"]
    theirs = [rd / ".tmp-notes.txt.00000000", rd / ".tmp-handmade"]
    for p in ours + theirs:
        p.write_bytes(b"half")
    assert _train(capsys, rd)[0] == 0
    assert not any(p.exists() for p in ours) and all(p.exists() for p in theirs)


def test_log_behind_its_checkpoint_resumes_from_a_covered_checkpoint(tmp_path, capsys, uninterrupted):
    rd = tmp_path / "run"
    assert _train(capsys, rd)[0] == 0
    lines = (rd / "stats.jsonl").read_text().splitlines(keepends=True)
    (rd / "stats.jsonl").write_text("".join(lines[:7]))   # lost steps 8-9: checkpoint 9 is ahead of the log
    code, out, err = _train(capsys, rd)
    assert code == 0, err
    assert "warning" in err and "stats.jsonl" in err
    assert _stats_of(rd) == uninterrupted


def test_sigterm_during_the_checkpoint_write(tmp_path, capsys, uninterrupted, monkeypatch):
    from scmctl.training import checkpoint as ck

    real = ck.save_atomic
    calls = []

    def save_and_get_terminated(obj, path):
        calls.append(Path(path).name)
        if len(calls) == 2:                      # while checkpoint 6 is being written
            os.kill(os.getpid(), signal.SIGTERM)
        real(obj, path)

    monkeypatch.setattr(ck, "save_atomic", save_and_get_terminated)
    rd = tmp_path / "run"
    code, out, err = _train(capsys, rd)
    assert code == 0, err
    assert "re-run the same command" in err
    assert calls == ["checkpoint-0000003.pt", "checkpoint-0000006.pt", "checkpoint-0000007.pt"]
    assert ck.load(rd / "checkpoint-0000007.pt")["step"] == 7
    monkeypatch.undo()
    assert _train(capsys, rd)[0] == 0
    assert _stats_of(rd) == uninterrupted


def test_full_disk_during_a_checkpoint_is_one_line_and_the_previous_still_loads(tmp_path, capsys, uninterrupted,
                                                                                 monkeypatch):
    import errno

    from scmctl.training import checkpoint as ck

    real = os.replace

    def replace(src, dst, *a, **k):
        if Path(dst).name == "checkpoint-0000006.pt":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(src, dst, *a, **k)

    monkeypatch.setattr(os, "replace", replace)
    rd = tmp_path / "run"
    code, out, err = _train(capsys, rd)
    lines = err.strip().splitlines()
    assert code == 2 and lines[-1].startswith("error:") and "No space left on device" in lines[-1], err
    assert "Traceback" not in err and sum(ln.startswith("error:") for ln in lines) == 1
    assert ck.load(rd / "checkpoint-0000003.pt")["step"] == 3
    assert not (rd / "checkpoint-0000006.pt").exists()
    assert not [p for p in rd.iterdir() if p.name.startswith(".tmp-")]
    monkeypatch.undo()
    assert _train(capsys, rd)[0] == 0
    assert _stats_of(rd) == uninterrupted
