"""`scmctl eval ... --checkpoints`: one row per checkpoint, values equal to evaluating each checkpoint
on its own, cached in the run directory so a re-run computes only what it has not seen."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from _cli import assert_one_line_error, run as run_cli
from test_metrics import D, save_standin
from scmctl.metrics import evaluate


def write_checkpoint(run, step: int, scale: float = 0.3) -> None:
    """A tiny consistency model whose weights differ per step (so are its images and FID)."""
    from scmctl.config import Config
    from scmctl.nn.networks import build_network
    from scmctl.training import checkpoint as ck

    cfg = Config()
    n = cfg.network
    n.resolution, n.channels, n.num_classes, n.model_channels = 8, 3, 0, 8
    n.channel_mult, n.num_blocks, n.attn_resolutions, n.head_channels = [1], 1, [], 8
    cfg.train.batch = 32
    torch.manual_seed(step)
    g = torch.Generator().manual_seed(step)  # perturb every weight: a fresh network's output is zero
    sd = {k: v + scale * torch.randn(v.shape, generator=g) if v.is_floating_point() else v
          for k, v in build_network(n).state_dict().items()}
    torch.save({"format": ck.FORMAT, "version": ck.VERSION, "kind": "consistency", "step": step,
                "config": cfg.to_dict(), "net": sd, "ema": sd}, run / f"checkpoint-{step:07d}.pt")


@pytest.fixture
def setup(tmp_path):
    save_standin(tmp_path / "det.pt")
    feats = np.random.default_rng(2).standard_normal((50, D)) * 0.3
    np.savez(tmp_path / "ref.npz", mu=feats.mean(0), sigma=np.cov(feats, rowvar=False))
    run = tmp_path / "run"
    run.mkdir()
    write_checkpoint(run, 100)
    write_checkpoint(run, 200)
    return tmp_path, run


def fid_args(tmp_path, samples, *extra):
    return ("eval", "fid", samples, "--ref", tmp_path / "ref.npz", "--detector", tmp_path / "det.pt", "-n", 6,
            "--batch", 3, "--allow-small", "--device", "cpu", *extra)


def rows_of(capsys, *args):
    code, out, err = run_cli(capsys, *args)
    assert code == 0, err
    lines = out.strip().splitlines()
    assert len(lines) == 1
    return json.loads(lines[0]), err


def test_checkpoints_rows_equal_single_evaluations_and_are_cached(capsys, setup, monkeypatch):
    tmp_path, run = setup
    calls = []
    real = evaluate.frechet_over_sets

    def counting(sources, *a, **k):
        calls.append(sources[0].path)
        return real(sources, *a, **k)

    monkeypatch.setattr(evaluate, "frechet_over_sets", counting)
    rows, err = rows_of(capsys, *fid_args(tmp_path, run, "--checkpoints", "all", "--json"))
    assert [r["step"] for r in rows] == [100, 200] and [r["kimg"] for r in rows] == [3.2, 6.4]
    assert [r["cached"] for r in rows] == [False, False] and len(calls) == 2
    assert all(r["seeds"] == ["0-5"] and r["metric"] == "fid" for r in rows)
    assert rows[0]["value"] != rows[1]["value"]
    for r in rows:  # each row is what evaluating that checkpoint alone gives
        single, _ = rows_of(capsys, *fid_args(tmp_path, r["checkpoint"], "--json"))
        assert single["value"] == pytest.approx(r["value"], rel=1e-12)
    calls.clear()

    # a re-run computes nothing; a new checkpoint computes exactly one; a changed setting all again
    rows2, err = rows_of(capsys, *fid_args(tmp_path, run, "--checkpoints", "all", "--json"))
    assert calls == [] and [r["cached"] for r in rows2] == [True, True] and "2 cached, 0 to compute" in err
    assert [r["value"] for r in rows2] == [r["value"] for r in rows]
    write_checkpoint(run, 300)
    rows3, _ = rows_of(capsys, *fid_args(tmp_path, run, "--checkpoints", "all", "--json"))
    assert [r["cached"] for r in rows3] == [True, True, False] and len(calls) == 1
    assert calls[0].endswith("checkpoint-0000300.pt")
    calls.clear()
    rows4, _ = rows_of(capsys, *fid_args(tmp_path, run, "--checkpoints", "100,300", "--json", "--seeds", "10-15"))
    assert [r["step"] for r in rows4] == [100, 300] and len(calls) == 2 and rows4[0]["seeds"] == ["10-15"]
    last, _ = rows_of(capsys, *fid_args(tmp_path, run, "--checkpoints", "last", "--json"))
    assert [r["step"] for r in last] == [300] and last[0]["cached"]

    # human output: a table with one row per checkpoint
    code, out, err = run_cli(capsys, *fid_args(tmp_path, run, "--checkpoints", "all"))
    assert code == 0, err
    table = out.strip().splitlines()
    assert table[0].split()[:3] == ["step", "kimg", "sigma_rel"] and len(table) == 4
    assert table[3].split()[0] == "300" and "(cached)" in table[3]


def test_checkpoints_bad_selections_are_one_line_errors(capsys, setup):
    tmp_path, run = setup
    code, _, err = run_cli(capsys, *fid_args(tmp_path, run, "--checkpoints", "150"))
    assert_one_line_error(code, err, "step 150", "100, 200")
    code, _, err = run_cli(capsys, *fid_args(tmp_path, run, "--checkpoints", "best"))
    assert_one_line_error(code, err, "all, last, ema")
    code, _, err = run_cli(capsys, *fid_args(tmp_path, run / "checkpoint-0000100.pt", "--checkpoints", "all"))
    assert_one_line_error(code, err, "run directory")
    code, _, err = run_cli(capsys, *fid_args(tmp_path, run, "--checkpoints", "ema"))
    assert_one_line_error(code, err, "scmctl ema")


def test_kid_over_checkpoints_and_over_posthoc_ema_outputs(capsys, setup):
    """`--checkpoints ema` evaluates the files `scmctl ema` wrote (here: made by hand in RUN_DIR/ema/)."""
    from scmctl.training import checkpoint as ck

    tmp_path, run = setup
    feats = np.random.default_rng(3).standard_normal((40, D)) * 0.3
    np.savez(tmp_path / "ref.npz", mu=feats.mean(0), sigma=np.cov(feats, rowvar=False), features=feats)
    (run / "ema").mkdir()
    for sigma_rel in (0.05, 0.1):
        c = torch.load(run / "checkpoint-0000200.pt", weights_only=True)
        del c["net"]
        c["posthoc_ema"] = {"sigma_rel": sigma_rel, "kimg": 6.4}
        c["ema"] = {k: v * (1 + sigma_rel) if v.is_floating_point() else v for k, v in c["ema"].items()}
        ck.save_atomic(c, run / "ema" / f"ema-0000200-{sigma_rel:.4f}.pt")
    args = ("eval", "kid", run, "--ref", tmp_path / "ref.npz", "--detector", tmp_path / "det.pt", "-n", 6,
            "--subsets", 3, "--subset-size", 4, "--device", "cpu", "--json")
    rows, _ = rows_of(capsys, *args, "--checkpoints", "ema")
    assert [(r["step"], r["sigma_rel"], r["posthoc"]) for r in rows] == [(200, 0.05, True), (200, 0.1, True)]
    single, _ = rows_of(capsys, *args[:2], run / "ema" / "ema-0000200-0.1000.pt", *args[3:])
    assert single["value"] == pytest.approx(rows[1]["value"], rel=1e-12)
    rows_all, _ = rows_of(capsys, *args, "--checkpoints", "all")
    assert [r["sigma_rel"] for r in rows_all] == [0.05, 0.05] and not rows_all[0]["cached"]
    assert {r["metric"] for r in json.loads((run / "metrics.json").read_text())["entries"].values()} == {"kid"}
