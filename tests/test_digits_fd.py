"""benchmarks/digits_fd.py: the feature Fréchet distance it reports is computed correctly.

The classifier is left at its random initialization here (training it is the benchmark's job): the
checks are about the FD pipeline (features of uint8 digits, float64 statistics, Fréchet distance),
which must hold for any feature map.
"""

import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import digits_fd  # noqa: E402


@pytest.fixture(scope="module")
def ref():
    torch.manual_seed(0)
    return digits_fd.Reference(digits_fd.DigitsDetector(digits_fd.DigitsClassifier()))


def numpy_fd(f1: np.ndarray, f2: np.ndarray) -> float:
    """The textbook formula with scipy's sqrtm, independent of scmctl.metrics.fid."""
    mu1, mu2 = f1.mean(0), f2.mean(0)
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def test_digits_against_themselves_is_zero(ref):
    images = digits_fd.digits_uint8()[0]
    shuffled = images[torch.randperm(len(images), generator=torch.Generator().manual_seed(1))]
    assert ref.features.shape == (1797, digits_fd.FEATURE_DIM)
    s = ref.score(shuffled)
    assert s["fd"] < 1e-6 * np.trace(ref.sigma)
    assert s["precision"] == 1.0 and s["recall"] == 1.0


def test_noise_is_far_and_resampled_digits_are_near(ref):
    noise = torch.randint(0, 256, (2000, 1, 16, 16), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    floor = ref.score(digits_fd.resampled_data(2000))["fd"]
    assert ref.score(noise)["fd"] > 20 * floor
    assert floor > 0


def test_fd_equals_an_independent_numpy_computation(ref):
    images = digits_fd.resampled_data(2000, seed=3)
    f = digits_fd.features_of(ref.detector, images)
    with torch.no_grad():  # features straight from the network, one batch, not through the Detector
        f_direct = ref.detector.classifier.features(images).double().numpy()
    np.testing.assert_allclose(f, f_direct, rtol=1e-5, atol=1e-6)
    expected = numpy_fd(f_direct, ref.features)
    assert ref.score(images)["fd"] == pytest.approx(expected, rel=1e-6)


def test_the_runs_it_trains(monkeypatch, tmp_path):
    """The commands behind each model: students from the teacher's run (sCT --init, sCD --teacher)
    and issue 10's from-scratch road, sCT for the teacher's and the student's steps together."""
    calls = []
    monkeypatch.setattr(digits_fd, "run_cli", lambda args, log: calls.append(args) or 1.0)
    a = digits_fd.parse_args(["--cache", str(tmp_path), "--work", str(tmp_path), "--teacher-steps", "60",
                              "--student-steps", "50", "--methods", "sct,scd,sct-scratch",
                              "--set-sct", "loss.sct_references=9"])
    models, walls = digits_fd.train_models(a)
    teacher = str(tmp_path / "teacher-60")
    assert models == {"teacher": teacher, "sct": str(tmp_path / "from-teacher-60" / "sct-50"),
                      "scd": str(tmp_path / "from-teacher-60" / "scd-50"),
                      "sct-scratch": str(tmp_path / "sct-scratch-110")}
    assert calls[1][:5] == ["train", "--preset", "tiny", "--init", teacher] and calls[1][-2:] == [
        "--set", "loss.sct_references=9"]
    assert calls[2][:5] == ["distill", "--preset", "tiny", "--teacher", teacher] and "--set" not in calls[2]
    assert calls[3] == ["train", "--preset", "tiny", "--steps", "110", "--run-dir", models["sct-scratch"],
                        "--set", "loss.sct_references=9"]
    with pytest.raises(SystemExit):
        digits_fd.parse_args(["--cache", str(tmp_path), "--methods", "sct,bogus"])
