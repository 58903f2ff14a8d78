"""`scmctl plot` on a real tiny run (with metrics over its checkpoints and post-hoc EMAs), the
running mean it draws, and its one-line errors."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest

from _cli import assert_one_line_error, run as run_cli
from test_metrics import D, save_standin
from scmctl.plotting import running_mean


def test_running_mean_against_brute_force():
    y = np.array([1.0, np.nan, 3.0, 4.0, np.nan, np.nan, 10.0, 2.0])
    for w in (1, 2, 3, 8):
        want = [np.nanmean(y[max(0, i + 1 - w):i + 1]) if np.isfinite(y[max(0, i + 1 - w):i + 1]).any() else np.nan
                for i in range(len(y))]
        np.testing.assert_allclose(running_mean(y, w), want, equal_nan=True)


def test_plot_of_a_real_tiny_run(tiny_run, tmp_path, capsys):
    pytest.importorskip("matplotlib", reason="the plot extra (in the test extra) is not installed")
    from PIL import Image

    save_standin(tmp_path / "det.pt")
    feats = np.random.default_rng(0).standard_normal((40, D))
    np.savez(tmp_path / "ref.npz", mu=feats.mean(0), sigma=np.cov(feats, rowvar=False))
    fid = ("eval", "fid", tiny_run, "--ref", tmp_path / "ref.npz", "--detector", tmp_path / "det.pt", "-n", 8,
           "--allow-small", "--device", "cpu", "--json", "--steps", 1)
    code, out, err = run_cli(capsys, *fid, "--checkpoints", "all")
    assert code == 0, err
    assert [r["step"] for r in json.loads(out)] == [80, 160]
    assert run_cli(capsys, "ema", tiny_run, "--sigma-rel", "0.03,0.08,0.15")[0] == 0
    code, out, err = run_cli(capsys, *fid, "--checkpoints", "ema")
    assert code == 0, err
    assert [r["sigma_rel"] for r in json.loads(out)] == [0.03, 0.08, 0.15]

    code, out, err = run_cli(capsys, "plot", tiny_run, "--out", tmp_path / "run.png", "--json")
    assert code == 0, err
    panels = json.loads(out)["panels"]
    assert panels["tangent RMS by t-bin"] == [f"tangent_rms_t{i}" for i in range(4)]
    assert "loss" in panels["loss by t-bin (unweighted)"][0]
    assert panels["metric over checkpoints (scmctl eval --checkpoints)"] == ["FID n=8 [det.pt] 1-step"]
    assert panels["metric over post-hoc EMA length"] == ["FID n=8 [det.pt] 1-step @ step 160"]
    img = np.asarray(Image.open(tmp_path / "run.png").convert("L"))
    assert img.shape == (1080, 1440)
    assert (img < 128).mean() > 0.01  # curves, labels and axes drawn, not a blank page


def test_plot_errors_and_missing_matplotlib(tiny_run, tmp_path, capsys, monkeypatch):
    code, _, err = run_cli(capsys, "plot", tmp_path)
    assert_one_line_error(code, err, "no stats.jsonl")
    code, _, err = run_cli(capsys, "plot", tiny_run, "--out", tmp_path / "x.jpg")
    assert_one_line_error(code, err, ".png")
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import fails as if not installed
    code, _, err = run_cli(capsys, "plot", tiny_run, "--out", tmp_path / "x.png")
    assert_one_line_error(code, err, "pip install 'scmctl[plot]'")
