"""The command line end to end on a shrunken tiny preset, resume, checkpoints and bad input."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from _cli import Payload, run

# The tiny preset shrunk further so the whole lifecycle runs in seconds on 2 CPU cores.
SMALL = ["--set", "data.resolution=8", "--set", "network.model_channels=16",
         "--set", "network.attn_resolutions=[4]", "--set", "network.head_channels=16",
         "--set", "train.checkpoint_every=2", "--set", "train.grid_every=3",
         "--set", "sample.grid_images=4", "--set", "sample.solver_steps=3",
         "--batch", "8", "--steps", "3"]




def one_json(out: str) -> dict:
    lines = [ln for ln in out.splitlines() if ln.strip()]
    assert len(lines) == 1, out
    return json.loads(lines[0])


def assert_bad_input(code, err, *needles):
    assert code == 2, err
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert lines and lines[-1].startswith("error:"), err
    assert "Traceback" not in err
    for n in needles:
        assert n in lines[-1], lines[-1]


@pytest.fixture(scope="module")
def detector(tmp_path_factory):
    """A stand-in TorchScript feature extractor: uint8 NCHW -> (N, 16) float features."""
    class Feat(torch.nn.Module):
        def __init__(self):
            super().__init__()
            g = torch.Generator().manual_seed(0)
            self.register_buffer("proj", torch.randn(3 * 4 * 4, 16, generator=g))

        def forward(self, x):
            x = torch.nn.functional.adaptive_avg_pool2d(x.float() / 255.0, 4)
            return x.flatten(1) @ self.proj

    path = tmp_path_factory.mktemp("det") / "feat.pt"
    torch.jit.script(Feat()).save(str(path))
    return path


def test_lifecycle_train_sample_distill_sct_refine_eval(tmp_path, capsys, detector):
    teacher = tmp_path / "teacher"
    code, out, err = run(capsys, "train", "--objective", "diffusion", "--run-dir", teacher, *SMALL, "--json")
    assert code == 0, err
    summ = one_json(out)
    assert summ["steps"] == 3 and Path(summ["checkpoint"]).exists() and Path(summ["grid"]).exists()
    stats = [json.loads(ln) for ln in (teacher / "stats.jsonl").read_text().splitlines()]
    assert [s["step"] for s in stats] == [1, 2, 3] and all(np.isfinite(s["loss"]) for s in stats)
    cfg = yaml.safe_load((teacher / "config.yaml").read_text())
    assert cfg["method"] == "diffusion" and cfg["network"]["resolution"] == 8

    # teacher sampling: the default DPM-Solver-2S with 3 steps = 5 network evaluations
    code, out, err = run(capsys, "sample", teacher, "-n", 5, "--steps", 3, "--batch", 2, "--json")
    assert code == 0, err
    s = one_json(out)
    assert s["count"] == 5 and s["nfe"] == 5 and s["kind"] == "diffusion"
    files = sorted((teacher / "samples").glob("*.png"))
    assert [f.name for f in files] == [f"{i:06d}.png" for i in range(5)]

    student = tmp_path / "scd"
    code, out, err = run(capsys, "distill", "--teacher", teacher, "--run-dir", student, *SMALL, "--json")
    assert code == 0, err
    assert yaml.safe_load((student / "config.yaml").read_text())["method"] == "scd"
    st = [json.loads(ln) for ln in (student / "stats.jsonl").read_text().splitlines()]
    assert all("tangent_warmup" in r and "masked" in r for r in st)

    sct = tmp_path / "sct"
    code, out, err = run(capsys, "train", "--init", teacher, "--run-dir", sct, *SMALL, "--json")
    assert code == 0, err

    for steps, nfe in ((1, 1), (2, 2)):
        out_dir = tmp_path / f"s{steps}"
        code, out, err = run(capsys, "sample", sct, "-n", 6, "--steps", steps, "--out", out_dir,
                             "--grid", tmp_path / f"g{steps}.png", "--json")
        assert code == 0, err
        s = one_json(out)
        assert s["nfe"] == nfe and s["kind"] == "consistency" and (tmp_path / f"g{steps}.png").exists()
        assert len(list(out_dir.glob("*.png"))) == 6
    code, out, err = run(capsys, "sample", sct, "-n", 2, "--ts", "1.5,0.8,0.3", "--out", tmp_path / "s3", "--json")
    assert code == 0 and one_json(out)["nfe"] == 3

    code, out, err = run(capsys, "refine", sct, tmp_path / "s1", "--t", 0.8, "--t", 0.4,
                         "--out", tmp_path / "refined", "--json")
    assert code == 0, err
    r = one_json(out)
    assert r["count"] == 6 and r["t"] == [0.8, 0.4]
    assert sorted(p.name for p in (tmp_path / "refined").glob("*.png")) == sorted(p.name for p in (tmp_path / "s1").glob("*.png"))

    code, out, err = run(capsys, "eval", "fid", tmp_path / "s1", "--ref", tmp_path / "s2",
                         "--detector", detector, "--allow-small", "--json")
    assert code == 0, err
    f = one_json(out)
    assert f["metric"] == "fid" and f["n"] == 6 and f["value"] >= 0 and np.isfinite(f["value"])
    code, out, err = run(capsys, "eval", "fid", tmp_path / "s1", "--ref", tmp_path / "s1",
                         "--detector", detector, "--allow-small", "--json")
    assert code == 0 and abs(one_json(out)["value"]) < 1e-6


def _stats(run_dir):
    return [json.loads(ln) for ln in (Path(run_dir) / "stats.jsonl").read_text().splitlines()]


def _strip(rec):
    return {k: v for k, v in rec.items() if k not in ("images_per_s",)}


def test_resume_is_bit_exact(tmp_path, capsys):
    args = [*SMALL, "--set", "train.keep_checkpoints=0", "--set", "train.grid_every=0"]
    full = tmp_path / "full"
    assert run(capsys, "train", "--run-dir", full, *args, "--steps", 6)[0] == 0
    # a run stopped after 3 steps, continued by re-running with the same run directory
    part = tmp_path / "part"
    assert run(capsys, "train", "--run-dir", part, *args, "--steps", 3)[0] == 0
    assert run(capsys, "train", "--run-dir", part, *args, "--steps", 6)[0] == 0
    assert [_strip(r) for r in _stats(full)] == [_strip(r) for r in _stats(part)]
    a = torch.load(full / "checkpoint-0000006.pt", weights_only=True)
    b = torch.load(part / "checkpoint-0000006.pt", weights_only=True)
    for key in ("net", "ema"):
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key])
    # the post-hoc EMA profiles (default σ_rel 0.05, 0.10) resume too: checkpoints and snapshots
    assert a["phema"]["sigma_rels"] == [0.05, 0.1]
    for ea, eb in zip(a["phema"]["emas"], b["phema"]["emas"]):
        assert all(torch.equal(ea[k], eb[k]) for k in ea)
    snaps = sorted(p.name for p in (full / "phema").glob("*.pt"))
    extra = sorted(set(p.name for p in (part / "phema").glob("*.pt")) - set(snaps))
    assert len(snaps) == 6 and extra == ["phema-0000003-0.0500.pt", "phema-0000003-0.1000.pt"]  # + part's last step
    for name in snaps:
        sa, sb = (torch.load(d / "phema" / name, weights_only=True)["ema"] for d in (full, part))
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    # a crash after step 6 whose last checkpoints were lost: resume from step 2 recomputes 3..6
    for p in ("checkpoint-0000006.pt", "checkpoint-0000004.pt", "checkpoint-0000003.pt"):
        (part / p).unlink()
    assert run(capsys, "train", "--run-dir", part, *args, "--steps", 6)[0] == 0
    assert [_strip(r) for r in _stats(full)] == [_strip(r) for r in _stats(part)]


def test_resume_with_a_different_config_is_refused(tmp_path, capsys):
    rd = tmp_path / "r"
    assert run(capsys, "train", "--run-dir", rd, *SMALL, "--steps", 1)[0] == 0
    code, out, err = run(capsys, "train", "--run-dir", rd, *SMALL, "--set", "train.lr=0.5")
    assert_bad_input(code, err, "train.lr", "--run-dir")


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    from scmctl.training import checkpoint as ck

    path = tmp_path / "checkpoint-0000001.pt"
    ck.save_atomic({"format": ck.FORMAT, "x": torch.ones(3)}, path)

    def broken_save(obj, f, *a, **k):
        f.write(b"partial data")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError):
        ck.save_atomic({"format": ck.FORMAT, "x": torch.zeros(3)}, path)
    assert torch.equal(torch.load(path, weights_only=True)["x"], torch.ones(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]


def test_pickle_payload_checkpoint_is_not_executed(tmp_path, capsys):
    marker = tmp_path / "PWNED"
    evil = tmp_path / "evil.pt"
    torch.save({"format": "scmctl-checkpoint", "version": 1, "kind": "consistency",
                "payload": Payload(os.system, f"touch {marker}")}, evil)
    # plain pickle would run it (the payload is real)
    with open(evil, "rb"):
        pass
    for cmd in (["sample", evil, "-n", "1"], ["distill", "--teacher", evil, "--steps", "1"],
                ["train", "--init", evil, "--steps", "1"]):
        code, out, err = run(capsys, *cmd)
        assert_bad_input(code, err, "refused")
        assert not marker.exists()
    torch.load(evil, weights_only=False)  # demonstrate that the payload is live
    assert marker.exists()


def test_checkpoint_of_another_architecture_is_a_clear_error(tmp_path, capsys):
    rd = tmp_path / "r"
    assert run(capsys, "train", "--run-dir", rd, *SMALL, "--steps", 1)[0] == 0
    ck = torch.load(rd / "checkpoint-0000001.pt", weights_only=True)
    ck["config"]["network"]["model_channels"] = 24
    torch.save(ck, tmp_path / "other.pt")
    code, out, err = run(capsys, "sample", tmp_path / "other.pt", "-n", 1)
    assert_bad_input(code, err, "different network architecture")


@pytest.mark.parametrize("args,needle", [
    (["train", "--preset", "nope"], "unknown preset 'nope'"),
    (["train", "--set", "train.lrr=1"], "did you mean 'train.lr'"),
    (["train", "--set", "train.steps=abc"], "expects an integer"),
    (["train", "--set", "loss.tangent_norm=l3"], "must be one of"),
    (["train", "--set", "nokey"], "key=value"),
    (["train", "--objective", "gan"], "--objective"),
    (["train", "--data", "/nonexistent/data", "--dry-run"], "no such file"),
    (["train", "--preset", "/nonexistent.yaml"], "no such preset"),
    (["sample", "/nonexistent/run", "-n", "1"], "no such checkpoint"),
    (["sample", "-n", "1"], "Missing argument"),
    (["train", "--steps", "many"], "Invalid value for '--steps'"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, args, needle, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out, err = run(capsys, *args)
    assert_bad_input(code, err, needle)


def test_sample_and_refine_bad_input(tmp_path, capsys):
    rd = tmp_path / "r"
    assert run(capsys, "train", "--run-dir", rd, *SMALL, "--steps", 1)[0] == 0
    for args, needle in ((["--ts", "0.5,0.9"], "decreasing"), (["--ts", "a,b"], "comma-separated"),
                         (["--label", "3"], "unconditional"), (["--solver", "rk4"], "--solver"),
                         (["--steps", "0"], "--steps")):
        code, out, err = run(capsys, "sample", rd, "-n", 1, *args)
        assert_bad_input(code, err, needle)
    (tmp_path / "imgs").mkdir()
    from scmctl.data.imageio import write_png
    write_png(tmp_path / "imgs" / "a.png", np.zeros((16, 16, 1), np.uint8))
    code, out, err = run(capsys, "refine", rd, tmp_path / "imgs")
    assert_bad_input(code, err, "8x8")
    code, out, err = run(capsys, "refine", rd, tmp_path / "empty_missing")
    assert_bad_input(code, err, "no such file")
    run_empty = tmp_path / "fresh"
    run_empty.mkdir()
    code, out, err = run(capsys, "sample", run_empty, "-n", 1)
    assert_bad_input(code, err, "no checkpoint")


def test_dry_run_json_reports_params_without_training(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out, err = run(capsys, "train", "--dry-run", "--json", "--set", "train.lr=0.002")
    assert code == 0, err
    d = one_json(out)
    assert d["config"]["train"]["lr"] == 0.002 and d["config"]["method"] == "sct"
    from scmctl.config import from_dict
    from scmctl.nn.unet import UNet
    net = UNet(from_dict(d["config"]).network)
    assert d["params"] == sum(p.numel() for p in net.parameters())
    assert not (tmp_path / "runs").exists()
    code, out, err = run(capsys, "train", "--preset", "imagenet512", "--dry-run", "--json")
    assert code == 0, err
    assert one_json(out)["params"] > 1e9


def test_sample_image_k_does_not_depend_on_batch_size(tmp_path, capsys):
    rd = tmp_path / "r"
    assert run(capsys, "train", "--run-dir", rd, *SMALL, "--steps", 2)[0] == 0
    from scmctl.data.imageio import read_image
    from scmctl.training import checkpoint as ckpt_io

    # after 2 steps out_gain is still near its initial 0 and every image would be its scaled noise
    # whatever the network computed: give the network a full-size output
    ck = ckpt_io.load(rd)
    ck.pop("path", None)
    ck["ema"]["out_gain"] = torch.tensor(1.0)
    torch.save(ck, tmp_path / "gain1.pt")
    outs = []
    for b in (1, 4):
        o = tmp_path / f"b{b}"
        assert run(capsys, "sample", tmp_path / "gain1.pt", "-n", 5, "--seed", 10, "--batch", b, "--out", o)[0] == 0
        outs.append({p.name: read_image(p).astype(int) for p in o.glob("*.png")})
    o = tmp_path / "plain"
    assert run(capsys, "sample", rd, "-n", 5, "--seed", 10, "--out", o)[0] == 0
    plain = {p.name: read_image(p).astype(int) for p in o.glob("*.png")}
    assert sorted(outs[0]) == [f"{i:06d}.png" for i in range(10, 15)]
    assert max(np.abs(outs[0][k] - plain[k]).max() for k in plain) > 5  # the network's output shows
    for k in outs[0]:
        assert np.abs(outs[0][k] - outs[1][k]).max() <= 1


def test_sigterm_checkpoints_and_the_rerun_resumes(tmp_path):
    """A preempted run (SIGTERM) writes a checkpoint at the step it reached; re-running resumes
    and ends identical to an uninterrupted run."""
    import signal
    import subprocess
    import sys
    import time

    args = [sys.executable, "-m", "scmctl", "train", *[str(a) for a in SMALL], "--set", "train.checkpoint_every=1000",
            "--set", "train.grid_every=0", "--steps", "400"]
    rd = tmp_path / "run"
    proc = subprocess.Popen(args + ["--run-dir", str(rd)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline:  # wait until a few steps are logged
        p = rd / "stats.jsonl"
        if p.exists() and len(p.read_text().splitlines()) >= 3:
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    ckpts = sorted(rd.glob("checkpoint-*.pt"))
    assert len(ckpts) == 1 and "re-run the same command" in err
    stopped = int(ckpts[0].stem.split("-")[1])
    assert 3 <= stopped < 400
    # resume to a few steps past the stop, and compare with an uninterrupted run of that length
    target = stopped + 2
    common = [*SMALL, "--set", "train.checkpoint_every=1000", "--set", "train.grid_every=0"]
    assert subprocess.run([sys.executable, "-m", "scmctl", "train", *map(str, common), "--steps", str(target),
                           "--run-dir", str(rd)], capture_output=True).returncode == 0
    full = tmp_path / "full"
    assert subprocess.run([sys.executable, "-m", "scmctl", "train", *map(str, common), "--steps", str(target),
                           "--run-dir", str(full)], capture_output=True).returncode == 0
    assert [_strip(r) for r in _stats(rd)] == [_strip(r) for r in _stats(full)]


def test_multistep_distill_sample_eval_refine_and_resume(tmp_path, capsys, detector, one_thread):
    """Multistep sCD (loss.segments = 4): config.yaml and the checkpoints carry the boundaries,
    `sample` walks them (nfe = steps, default M), eval reports that nfe, the t_mid options and
    refine are refused in one line, and a resumed run equals the uninterrupted one bit for bit."""
    from scmctl.segments import default_boundaries

    teacher = tmp_path / "teacher"
    assert run(capsys, "train", "--objective", "diffusion", "--run-dir", teacher, *SMALL, "--steps", 2)[0] == 0
    args = ["--teacher", teacher, *SMALL, "--set", "loss.segments=4", "--set", "train.keep_checkpoints=0"]
    full, part = tmp_path / "full", tmp_path / "part"
    code, out, err = run(capsys, "distill", "--run-dir", full, *args, "--json")  # 3 steps, a grid at the end
    assert code == 0, err
    assert Path(one_json(out)["grid"]).exists()
    bounds = yaml.safe_load((full / "config.yaml").read_text())["loss"]["segment_boundaries"]
    assert bounds == default_boundaries(4, 0.5)
    assert torch.load(full / "checkpoint-0000003.pt", weights_only=True)["config"]["loss"]["segment_boundaries"] == bounds
    assert run(capsys, "distill", "--run-dir", part, *args, "--steps", 2)[0] == 0
    assert run(capsys, "distill", "--run-dir", part, *args)[0] == 0
    assert [_strip(r) for r in _stats(full)] == [_strip(r) for r in _stats(part)]
    a, b = (torch.load(d / "checkpoint-0000003.pt", weights_only=True) for d in (full, part))
    assert all(torch.equal(a[k][n], b[k][n]) for k in ("net", "ema") for n in a[k])

    for steps, nfe in ((None, 4), (2, 2), (1, 1)):
        opt = ["--steps", steps] if steps else []
        code, out, err = run(capsys, "sample", full, "-n", 3, *opt, "--out", tmp_path / f"m{nfe}", "--json")
        assert code == 0, err
        s = one_json(out)
        assert s["nfe"] == nfe and s["steps"] == nfe and s["t_mid"] is None
    code, out, err = run(capsys, "eval", "fid", full, "--ref", tmp_path / "m4", "-n", 3, "--detector", detector,
                         "--allow-small", "--device", "cpu", "--json")
    assert code == 0, err
    assert one_json(out)["generator"]["nfe"] == 4
    for opt, needle in ((["--steps", 5], "1..4"), (["--t-mid", 0.8], "--t-mid"), (["--ts", "1.5,0.5"], "--ts")):
        code, out, err = run(capsys, "sample", full, "-n", 1, *opt, "--out", tmp_path / "bad")
        assert_bad_input(code, err, needle)
    code, out, err = run(capsys, "refine", full, tmp_path / "m4", "--out", tmp_path / "refined")
    assert_bad_input(code, err, "multistep")
    code, out, err = run(capsys, "sample", full, "--search-tmid", "--ref", tmp_path / "ref.npz", "--tmid-grid", 0.9)
    assert_bad_input(code, err, "no t_mid")
    code, out, err = run(capsys, "distill", "--teacher", teacher, "--run-dir", tmp_path / "x", *SMALL,
                         "--set", "loss.segments=2", "--set", "loss.segment_boundaries=[0, 1.6, 1.5645]")
    assert_bad_input(code, err, "loss.segment_boundaries", "increasing")
