"""kill -9 at random moments, then the same command: the result equals an uninterrupted run's.

Each test runs the command once in this process (which imports everything it needs: the forked
runs below start warm, in milliseconds), once in a forked child uninterrupted (timing it: T), then
K times in forked children killed with SIGKILL after a delay drawn uniformly from (0, 2T/K) with a
fixed seed (the work before each kill carries over, so the kills spread over the whole run), then
once to completion; the outputs are compared byte for byte (arrays;
metadata except creation times and wall-clock throughput).
"""

from __future__ import annotations

import json
import os
import random
import signal
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from _cli import exit_code
from test_data import _fake_cifar, _write_tar
from test_metrics import save_standin
from test_reliability import write_random_pngs
from test_sample_scale import make_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny networks: one thread (see conftest)


def forked(argv, kill_after: float | None = None) -> int:
    """Run `scmctl ARGV` in a forked child, killed with SIGKILL after `kill_after` seconds when
    given. Returns the child's exit code (-9 when the kill landed)."""
    pid = os.fork()
    if pid == 0:  # the child: run the command, never return into pytest
        code = 1
        try:
            import io

            sys.stdout = sys.stderr = io.StringIO()
            code = exit_code(*argv)
        finally:
            os._exit(code)
    if kill_after is not None:
        deadline = time.perf_counter() + kill_after
        while time.perf_counter() < deadline:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                return os.waitstatus_to_exitcode(status)
            time.sleep(0.002)
        os.kill(pid, signal.SIGKILL)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def survives_kills(args, out_option: str, root: Path, name: str, kills: int, seed: int) -> tuple[Path, Path, int]:
    """`scmctl ARGS OUT_OPTION root/{warm,ref,killed}/NAME`: warm-up in-process, the reference in a
    fork (timed), `kills` forks killed at random moments, then the same command to the end.
    Returns (reference output, resumed output, kills that landed before the command finished)."""
    out = {k: root / k / name for k in ("warm", "ref", "killed")}
    assert exit_code(*args, out_option, out["warm"]) == 0
    t0 = time.perf_counter()
    assert forked([*args, out_option, out["ref"]]) == 0
    span = time.perf_counter() - t0
    rng = random.Random(seed)
    # Work done before each kill carries over, so delays of U(0, 2·span/kills) spread the kills
    # over the whole run (start-up, work, the final writes) instead of leaving most runs complete.
    codes = [forked([*args, out_option, out["killed"]], kill_after=rng.uniform(0.0, 2 * span / kills))
             for _ in range(kills)]
    assert set(codes) <= {0, -signal.SIGKILL}, codes
    landed = codes.count(-signal.SIGKILL)
    print(f"{' '.join(map(str, args[:2]))}: {landed} of {kills} kills landed (T = {span:.2f} s)")  # -s shows it
    assert forked([*args, out_option, out["killed"]]) == 0
    no_temps(root / "killed")
    return out["ref"], out["killed"], landed


def no_temps(folder: Path):
    left = [p for p in folder.rglob("*") if p.name.startswith(".tmp-") or p.name.endswith(".partial")]
    assert not left, left


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("faults") / "c.pt", 3)


SAMPLE_KILLS = 10


@pytest.mark.parametrize("fmt", ["png", "npz"])
def test_sample_survives_kill_9_at_random_moments(fmt, ckpt, tmp_path):
    args = ("sample", ckpt, "-n", 48, "--batch", 2, "--device", "cpu")
    ref, got, landed = survives_kills(args, "--out", tmp_path, "out.npz" if fmt == "npz" else "out", SAMPLE_KILLS,
                                      seed=1 if fmt == "png" else 2)
    assert landed >= SAMPLE_KILLS // 2
    if fmt == "npz":
        with np.load(ref) as a, np.load(got) as b:
            assert sorted(a.files) == sorted(b.files)
            assert all(np.array_equal(a[k], b[k]) for k in a.files)
    else:
        names = sorted(p.name for p in ref.glob("*.png"))
        assert names == sorted(p.name for p in got.glob("*.png")) and len(names) == 48
        assert all((ref / n).read_bytes() == (got / n).read_bytes() for n in names)


EVAL_REF_KILLS = 8


def test_eval_ref_survives_kill_9_at_random_moments(tmp_path):
    images = write_random_pngs(tmp_path / "images", 40)
    args = ("eval", "ref", images, "--detector", save_standin(tmp_path / "det.pt"), "--batch", 2, "--features", 10,
            "--device", "cpu")
    ref, got, landed = survives_kills(args, "--out", tmp_path, "ref.npz", EVAL_REF_KILLS, seed=3)
    assert landed >= EVAL_REF_KILLS // 2
    with np.load(ref) as a, np.load(got) as b:
        assert sorted(a.files) == sorted(b.files)
        for k in a.files:
            if k != "created":
                assert np.array_equal(a[k], b[k]), k


DATA_KILLS = 6


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
    ref, got, landed = survives_kills(("data", "cifar10", tar), "--out", tmp_path, "c10", DATA_KILLS, seed=4)
    assert landed >= DATA_KILLS // 2
    _same_dataset(ref, got)


def test_data_imagenet_survives_kill_9_at_random_moments(tmp_path):
    from scmctl.data.imageio import write_png

    src = tmp_path / "src"
    rng = np.random.default_rng(6)
    for c in range(3):
        (src / f"n0{c}").mkdir(parents=True)
        for i in range(400):
            write_png(src / f"n0{c}" / f"{i:04d}.png", rng.integers(0, 256, (12, 10, 3), dtype=np.uint8))
    args = ("data", "imagenet", src, "--resolution", 8, "--workers", 1)
    ref, got, landed = survives_kills(args, "--out", tmp_path, "in", DATA_KILLS, seed=5)
    assert landed >= DATA_KILLS // 2
    _same_dataset(ref, got)


# ------------------------------------------------------------------ training

TRAIN_KILLS = 20
TINY = ["--preset", "tiny", "--set", "data.resolution=8", "--set", "network.model_channels=8",
        "--set", "network.channel_mult=[1]", "--set", "network.attn_resolutions=[8]",
        "--set", "network.head_channels=8", "--set", "network.adaptive_weight_channels=8",
        "--set", "train.checkpoint_every=3", "--set", "train.grid_every=0", "--set", "train.keep_checkpoints=2",
        "--batch", "4", "--steps", "30"]


def _strip_timing(line: str) -> dict:
    rec = json.loads(line)
    rec.pop("images_per_s")  # wall-clock throughput: the one field that cannot repeat
    return rec


def test_train_survives_20_kill_9_in_a_row_and_logs_every_step(tmp_path):
    import torch

    ref, got, landed = survives_kills(("train", *TINY), "--run-dir", tmp_path, "run", TRAIN_KILLS, seed=7)
    assert landed >= TRAIN_KILLS // 2
    want = [_strip_timing(ln) for ln in (ref / "stats.jsonl").read_text().splitlines()]
    have = [_strip_timing(ln) for ln in (got / "stats.jsonl").read_text().splitlines()]
    assert [r["step"] for r in have] == list(range(1, 31))
    assert have == want
    a = torch.load(ref / "checkpoint-0000030.pt", weights_only=True)
    b = torch.load(got / "checkpoint-0000030.pt", weights_only=True)
    for key in ("net", "ema"):
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key])


def _train(capsys, run_dir, *extra):
    from _cli import run

    return run(capsys, "train", "--run-dir", run_dir, *TINY, "--steps", 9, *extra)


def _stats_of(run_dir) -> list[dict]:
    return [_strip_timing(ln) for ln in (Path(run_dir) / "stats.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """stats.jsonl of an uninterrupted 9-step run (checkpoints at 3, 6, 9)."""
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
        if Path(path).name.startswith("checkpoint-"):   # (post-hoc EMA snapshots go through it too)
            calls.append(Path(path).name)
        if len(calls) == 2 and Path(path).name.startswith("checkpoint-"):   # while checkpoint 6 is being written
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


def test_stats_lines_reach_the_disk_before_the_checkpoint_covering_them(tmp_path, capsys, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.path.basename(os.readlink(f"/proc/self/fd/{fd}"))))
        return real_fsync(fd)

    def replace(src, dst, *a, **k):
        events.append(("rename", os.path.basename(dst)))
        return real_replace(src, dst, *a, **k)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    assert _train(capsys, tmp_path / "run")[0] == 0
    monkeypatch.undo()
    renames = [i for i, e in enumerate(events) if e[0] == "rename" and e[1].startswith("checkpoint-")]
    assert len(renames) == 3
    for i in renames:  # the last event touching stats.jsonl before each checkpoint's rename is its fsync
        before = [e for e in events[:i] if e[1] == "stats.jsonl"]
        assert before and before[-1] == ("fsync", "stats.jsonl"), events[:i]
