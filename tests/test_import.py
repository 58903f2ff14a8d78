"""`scmctl import`: EDM2 snapshots (built here in the exact persistent-pickle format) become scmctl
diffusion checkpoints whose TrigFlow network equals the snapshot's preconditioned network (checked
against the float64 reference in tests/edm_snapshots.py), without running the pickled code."""

import json
import math
import pickle

import numpy as np
import pytest
import torch

import edm_snapshots as E
from _cli import Payload, assert_one_line_error, run
from scmctl import sampling, trigflow
from scmctl.fileio import sha256_file
from scmctl.training import checkpoint as ckpt_io

SD = 0.5


pytestmark = pytest.mark.usefixtures("one_thread")   # tests/conftest.py: tiny networks run faster on one thread


SIGMAS = torch.tensor([0.002, 0.05, 0.5, 2.0, 80.0], dtype=torch.float64)


def _import(capsys, tmp_path, net, name="teacher", **kw):
    marker = tmp_path / f"{name}-ran"
    snap = tmp_path / f"{name}.pkl"
    snap.write_bytes(E.edm2_snapshot(net, marker=marker, **kw))
    out = tmp_path / f"{name}.pt"
    code, stdout, err = run(capsys, "import", snap, "--out", out, "--json")
    assert code == 0, err
    assert not marker.exists()                      # the embedded module source never ran
    return out, json.loads(stdout), snap, marker


def _trigflow_denoiser(net, x_sigma, sigma, labels, dtype=torch.float32):
    """D(x_σ; σ) through the imported TrigFlow network: cos t·x_t − sin t·σ_d·F(x_t/σ_d, t)."""
    t = trigflow.edm_sigma_to_t(sigma, SD)
    x_t = trigflow.edm_x_to_trigflow(x_sigma, sigma, SD)
    F = net(x_t / SD, t.to(dtype), labels).double()
    return trigflow.denoise(x_t.double(), t, F, SD), net.adaptive_weight(t.to(dtype)).double()


@pytest.mark.parametrize("label_dim,channels,protocol,latent", [(0, 3, 4, False), (5, 4, 2, True)])
def test_edm2_import_equals_the_snapshot_network(capsys, tmp_path, label_dim, channels, protocol, latent):
    ref = E.small_edm2(label_dim=label_dim, img_channels=channels)
    raw_mean, raw_std = [5.81, 3.25, 0.12, -2.15], [4.17, 4.62, 3.71, 3.28]
    enc = E.VAEEncoder(raw_mean, raw_std) if latent else None
    out, info, snap, marker = _import(capsys, tmp_path, ref, encoder=enc, protocol=protocol)
    assert info["format"] == "edm2" and info["num_classes"] == label_dim and info["latent"] is latent
    ckpt = ckpt_io.load(out)
    assert ckpt["kind"] == "diffusion" and ckpt["source"]["sha256"] == sha256_file(snap)
    net = ckpt_io.network_from_checkpoint(ckpt)              # what sample/eval/refine/distill build
    data = ckpt["config"]["data"]
    if latent:
        assert data["encoder"] == "stabilityai/sd-vae-ft-mse"
        np.testing.assert_allclose(data["latent_mean"], raw_mean, rtol=1e-5)
        np.testing.assert_allclose(data["latent_std"], raw_std, rtol=1e-5)
    else:
        assert data["encoder"] is None

    snap_net = E.rounded_like_snapshot(ref)                  # the weights the snapshot holds
    g = torch.Generator().manual_seed(1)
    x = torch.randn(len(SIGMAS), channels, 8, 8, generator=g, dtype=torch.float64) * SD
    x_sigma = x + SIGMAS.reshape(-1, 1, 1, 1) * torch.randn(x.shape, generator=g, dtype=torch.float64)
    labels = [None]
    if label_dim:
        labels.append(torch.nn.functional.one_hot(torch.arange(len(SIGMAS)) % label_dim, label_dim).double())
    for lab in labels:
        D_ref, logvar = snap_net(x_sigma, SIGMAS, lab)
        with torch.no_grad():
            D, w = _trigflow_denoiser(net, x_sigma.float(), SIGMAS, None if lab is None else lab.float())
        rel = ((D - D_ref).abs().amax(dim=(1, 2, 3)) / D_ref.abs().amax(dim=(1, 2, 3))).max().item()
        assert rel <= 1e-5, rel                                  # float32 vs float64 reference
        torch.testing.assert_close(w, -logvar, rtol=1e-5, atol=1e-6)   # w_φ = −u
    E.plain_load(snap.read_bytes())                          # EDM's own loader runs the payload
    assert marker.exists()


@pytest.mark.parametrize("arch,label_dim,protocol", [("ddpmpp", 0, 4), ("ddpmpp", 3, 0), ("ncsnpp", 3, 5)])
def test_edm_import_equals_the_snapshot_network(capsys, tmp_path, arch, label_dim, protocol):
    """EDM's EDMPrecond + SongUNet (DDPM++ or NCSN++, with the augmentation-label input) as TrigFlow."""
    ref = E.small_edm(label_dim=label_dim, ncsnpp=arch == "ncsnpp")
    marker = tmp_path / "ran"
    snap = tmp_path / "edm.pkl"
    snap.write_bytes(E.edm_snapshot(ref, marker=marker, protocol=protocol))
    out = tmp_path / "edm.pt"
    code, stdout, err = run(capsys, "import", snap, "--out", out, "--json")
    assert code == 0, err
    info = json.loads(stdout)
    assert info["format"] == "edm" and info["class"] == "EDMPrecond" and not marker.exists()
    ckpt = ckpt_io.load(out)
    assert ckpt["config"]["network"]["arch"] == arch and ckpt["config"]["network"]["augment_dim"] == 9
    net = ckpt_io.network_from_checkpoint(ckpt)
    snap_net = E.rounded_like_snapshot(ref, fp16=False)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(len(SIGMAS), 3, 8, 8, generator=g, dtype=torch.float64) * SD
    x_sigma = x + SIGMAS.reshape(-1, 1, 1, 1) * torch.randn(x.shape, generator=g, dtype=torch.float64)
    labels = [None] + ([torch.nn.functional.one_hot(torch.arange(5) % label_dim, label_dim).double()]
                       if label_dim else [])
    # float32 (what commands run) within 1e-5; NCSN++'s Fourier features cos(2π·f·c_noise) with
    # f ~ N(0, 16²) lose ~1e-5 of phase in float32, so it gets 2e-4 there (EDM's own fp32 forward
    # does the same). In float64 the mapping is exact for both families (1e-8: fp32 frequency tables).
    tol32 = 1e-5 if arch == "ddpmpp" else 2e-4
    net64 = ckpt_io.network_from_checkpoint(ckpt).double()
    for lab in labels:
        D_ref = snap_net(x_sigma, SIGMAS, lab)              # augment labels: none, as at sampling
        with torch.no_grad():
            D, _ = _trigflow_denoiser(net, x_sigma.float(), SIGMAS, None if lab is None else lab.float())
            D64 = _trigflow_denoiser(net64, x_sigma, SIGMAS, lab, dtype=torch.float64)[0]
        for got, tol in ((D, tol32), (D64, 1e-8)):     # float64: embedding tables stay fp32
            rel = ((got - D_ref).abs().amax(dim=(1, 2, 3)) / D_ref.abs().amax(dim=(1, 2, 3))).max().item()
            assert rel <= tol, (rel, tol)
    E.plain_load(snap.read_bytes())
    assert marker.exists()


class _GaussianEDMDenoiser(torch.nn.Module):
    """EDM's ideal network for x0 ~ N(0, a²I), seen through the importer's identity
    F_θ(x_t/σ_d, t) = −F_x(x_t/σ_d; c_noise(t)) with scmctl's own c_noise (time_embedding: edm).
    D(x_σ; σ) = a²/(a² + σ²)·x_σ ⇒ F_x(y; c) = y·(σ² + σ_d²)/(σ·σ_d)·(a²/(a² + σ²) − σ_d²/(σ² + σ_d²)),
    y = c_in·x_σ, σ = e^{4c}."""
    num_classes, emb_guidance = 0, None

    def __init__(self, a):
        super().__init__()
        from scmctl.config import NetworkConfig

        self.a, self.cfg = a, NetworkConfig(time_embedding="edm", edm_sigma_data=SD)

    def forward(self, x, t, labels=None, guidance=None):
        from scmctl.nn.base import ImageNetwork

        sigma = torch.exp(4 * ImageNetwork.c_noise(self, t.double())).reshape(-1, 1)
        a2, s2, d2 = self.a ** 2, sigma ** 2, SD ** 2
        F_x = x * ((s2 + d2) / (sigma * SD) * (a2 / (a2 + s2) - d2 / (s2 + d2)))
        return -F_x


def test_edm_preconditioning_as_trigflow_samples_gaussian_data_exactly():
    """Teacher sampling through the EDM->TrigFlow identity lands on the PF-ODE's closed form for
    Gaussian data, x0 = x_T·a/s_T with s_T = √(cos²T·a² + sin²T·σ_d²), for every solver.
    Observed at 64 steps: heun (EDM's, in σ) 4.7e-3, heun-t 1.9e-3, dpm2s 2.6e-3, euler 5.0e-2 (32 steps:
    2.1e-2, 7.5e-3, 1.0e-2, 9.9e-2: second, second, second, first order); the opposite sign of F ends
    5.2 away."""
    a = 0.2
    x_T = torch.randn(512, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * SD
    times = sampling.teacher_times(64, SD)
    T = times[0]
    exact = x_T * a / torch.sqrt(torch.cos(T) ** 2 * a ** 2 + torch.sin(T) ** 2 * SD ** 2)
    for solver, tol in (("heun", 7e-3), ("heun-t", 3e-3), ("dpm2s", 4e-3), ("euler", 7.5e-2)):
        got = sampling.ode_sample(sampling.Velocity(_GaussianEDMDenoiser(a), SD, None), x_T, times, solver)
        err = ((got - exact).abs().max() / exact.abs().max()).item()
        assert err < tol, (solver, err)


def test_imported_teacher_solves_the_snapshot_ode(capsys, tmp_path):
    """scmctl's solvers (t-space, on the imported checkpoint) converge to the end point of EDM's
    probability-flow ODE dx_σ/dσ = (x_σ − D(x_σ; σ))/σ of the snapshot network, solved in σ-space
    in float64 by EDM's Heun with 128 steps (relative error of that reference ≈ 1e-3). A wrong
    time map or sign would plateau far away instead of converging.
    Observed (16 -> 32 steps): heun (EDM's, in σ) 7.0e-2 -> 1.4e-2, heun-t 4.3e-3 -> 1.3e-3, dpm2s
    3.1e-2 -> 8.7e-3, euler 0.17 -> 0.084."""
    ref = E.small_edm2(seed=3)
    out, _, _, _ = _import(capsys, tmp_path, ref)
    net = ckpt_io.network_from_checkpoint(ckpt_io.load(out)).double()
    snap_net = E.rounded_like_snapshot(ref)
    z = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)

    def edm_heun(steps):
        sig = (SD * torch.tan(sampling.teacher_times(steps, SD)[:-1])).tolist() + [0.0]
        x = z * sig[0]
        for a, b in zip(sig[:-1], sig[1:]):
            d = (x - snap_net(x, torch.full((2,), a, dtype=torch.float64))[0]) / a
            xn = x + (b - a) * d
            if b > 0:
                d2 = (xn - snap_net(xn, torch.full((2,), b, dtype=torch.float64))[0]) / b
                xn = x + (b - a) * 0.5 * (d + d2)
            x = xn
        return x

    with torch.no_grad():
        expected = edm_heun(128)
        for solver, order, tol in (("heun", 2, 2e-2), ("heun-t", 2, 3e-3), ("dpm2s", 2, 2e-2), ("euler", 1, 0.15)):
            errs = []
            for n in (16, 32):
                times = sampling.teacher_times(n, SD)
                x_T = z * (SD * math.tan(times[0])) * math.cos(times[0])   # x_t = cos t·x_σ
                got = sampling.ode_sample(sampling.Velocity(net, SD, None), x_T, times, solver)
                errs.append(((got - expected).abs().max() / expected.abs().max()).item())
                if solver == "heun":   # scmctl's heun is EDM's Heun in σ: the same iterates (observed 7e-9)
                    same = edm_heun(n)
                    assert ((got - same).abs().max() / same.abs().max()).item() < 1e-6
            assert errs[1] < tol and errs[0] / errs[1] > 0.8 * 2 ** order - 0.4 * order, (solver, errs)


def test_import_errors_are_one_line(capsys, tmp_path):
    marker = tmp_path / "ran"
    out = tmp_path / "t.pt"
    cases = {
        "missing.pkl": (None, "no such file"),
        "text.pkl": (b"not a pickle at all", "not"),
        "arrays.pkl": (pickle.dumps({"fid": {"mu": np.zeros(3)}}), "not an EDM/EDM2 network snapshot"),
        "payload.pkl": (pickle.dumps({"ema": Payload(open, str(marker), "w")}), "refusing to load io.open"),
    }
    other = E.small_edm2()
    for cls_name, needle in (("MysteryPrecond", "unknown network class 'MysteryPrecond'"),
                             ("VEPrecond", "VEPrecond snapshots are not supported")):
        E.Precond.__name__ = cls_name                     # a persistent class scmctl does not map
        try:
            cases[f"{cls_name}.pkl"] = (E.edm2_snapshot(other, marker=marker), needle)
        finally:
            E.Precond.__name__ = "Precond"
    for name, (blob, needle) in cases.items():
        if blob is not None:
            (tmp_path / name).write_bytes(blob)
        code, stdout, err = run(capsys, "import", tmp_path / name, "--out", out)
        assert_one_line_error(code, err, name, needle)
        assert stdout == "" and not out.exists() and not marker.exists()


def test_two_roads_from_an_imported_teacher(capsys, tmp_path):
    """Road 2: distill directly, the student keeping EDM's c_noise (with the warning naming the
    statistics to watch). Road 1: a diffusion fine-tune converts the teacher to c_noise = t with a
    positional embedding; after one step at lr 1e-12 it holds the teacher's weights, only the Fourier
    buffers gone."""
    teacher, _, _, _ = _import(capsys, tmp_path, E.small_edm2(img_channels=1, resolution=16))
    common = ("--preset", "tiny", "--data", "digits", "--batch", 8, "--set", "train.grid_every=0")
    rd2 = tmp_path / "direct"
    code, out, err = run(capsys, "distill", "--teacher", teacher, *common, "--steps", 2, "--run-dir", rd2)
    assert code == 0, err
    assert "EDM's time conditioning" in err and "tangent_rms_t0..t3" in err
    stats = [json.loads(line) for line in (rd2 / "stats.jsonl").read_text().splitlines()]
    assert len(stats) == 2 and all(math.isfinite(r["loss"]) for r in stats)
    assert any(k.startswith("tangent_rms_t") for k in stats[-1])
    student = ckpt_io.load(rd2)
    assert student["config"]["network"]["time_embedding"] == "edm" and student["kind"] == "consistency"

    rd1 = tmp_path / "converted"
    code, out, err = run(capsys, "train", "--objective", "diffusion", "--init", teacher, *common,
                         "--set", "network.time_embedding=positional", "--set", "train.lr=1e-12",
                         "--steps", 1, "--run-dir", rd1)
    assert code == 0, err
    assert "EDM's time conditioning" not in err
    conv = ckpt_io.load(rd1)
    assert conv["config"]["network"]["time_embedding"] == "positional"
    t_state = ckpt_io.load(teacher)["ema"]
    dropped = sorted(set(t_state) - set(conv["ema"]))
    assert dropped == ["time_embed.freqs", "time_embed.phases", "weight_embed.freqs", "weight_embed.phases"]
    rows = lambda w: w / w.flatten(1).norm(dim=1).reshape(-1, *([1] * (w.ndim - 1))) if w.ndim > 1 else w
    for k, v in conv["ema"].items():                 # renormalize_ rescales MPConv rows only
        torch.testing.assert_close(rows(v), rows(t_state[k]), rtol=1e-5, atol=1e-6)
    code, out, err = run(capsys, "distill", "--teacher", teacher, "--init", rd1, *common, "--steps", 1,
                         "--run-dir", tmp_path / "student")
    assert code == 0, err
    assert "EDM's time conditioning" not in err
    assert ckpt_io.load(tmp_path / "student")["config"]["network"]["time_embedding"] == "positional"


def test_a_latent_teacher_refuses_data_in_another_model_space(capsys, tmp_path):
    """An imported EDM2 latent teacher (SD-VAE latents of [0, 1] pixels, EDM2's normalization) is not
    distilled on latents prepared scmctl's default way: one line naming the matching options."""
    from scmctl.training.run_config import _check_teacher_data
    from scmctl.config import Config
    from scmctl.data.latents import SD_VAE, SD_VAE_LATENT_MEAN, SD_VAE_LATENT_STD
    from scmctl.errors import UsageError

    enc = E.VAEEncoder([5.81, 3.25, 0.12, -2.15], [4.17, 4.62, 3.71, 3.28])
    teacher, _, _, _ = _import(capsys, tmp_path, E.small_edm2(img_channels=4, resolution=16), encoder=enc)
    ckpt = ckpt_io.load(teacher)
    assert ckpt["config"]["data"]["vae_pixel_range"] == "unit"
    cfg = Config()                                      # what `scmctl data latents` defaults give
    cfg.data.encoder, cfg.data.latent_mean, cfg.data.latent_std = SD_VAE, list(SD_VAE_LATENT_MEAN), list(SD_VAE_LATENT_STD)
    with pytest.raises(UsageError, match=r"data.latent_mean=.*--latent-mean 5.81.*--vae-pixel-range unit"):
        _check_teacher_data(cfg, ckpt)
    cfg.data.latent_mean, cfg.data.latent_std = ckpt["config"]["data"]["latent_mean"], ckpt["config"]["data"]["latent_std"]
    with pytest.raises(UsageError, match="data.vae_pixel_range='unit', the data gives 'signed'"):
        _check_teacher_data(cfg, ckpt)
    cfg.data.vae_pixel_range = "unit"
    _check_teacher_data(cfg, ckpt)                      # latents encoded the teacher's way


def test_imported_teacher_samples_and_refines_through_the_cli(capsys, tmp_path):
    """The imported checkpoint is an ordinary diffusion model for `sample` (every solver) and `refine`."""
    from scmctl.data.imageio import write_png
    from scmctl.config import CHOICES

    teacher, _, _, _ = _import(capsys, tmp_path, E.small_edm2())
    for solver in CHOICES["sample.solver"]:
        code, out, err = run(capsys, "sample", teacher, "-n", 2, "--steps", 3, "--solver", solver,
                             "--out", tmp_path / f"s-{solver}", "--json")
        assert code == 0, err
        info = json.loads(out)
        assert info["kind"] == "diffusion" and info["nfe"] == (3 if solver == "euler" else 5)
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for i in range(2):
        write_png(imgs / f"{i}.png", np.full((8, 8, 3), 40 * i, np.uint8))
    code, out, err = run(capsys, "refine", teacher, imgs, "--t", 0.5, "--out", tmp_path / "refined", "--json")
    assert code == 0, err
    assert len(list((tmp_path / "refined").glob("*.png"))) == 2
