"""Paper presets (SCM_NOTES §6, sCM App. G Tables 4-5): values and parameter counts on the meta device."""

import json
import subprocess
import sys

import pytest

from scmctl import config
from scmctl.nn.unet import count_parameters

# EDM2 parameter counts (millions) quoted by the sCM paper for S..XXL.
PAPER_PARAMS = {"s": 280.2, "m": 497.8, "l": 777.6, "xl": 1119.4, "xxl": 1523.4}
WIDTH = {"s": 192, "m": 256, "l": 320, "xl": 384, "xxl": 448}
# size: (teacher α_ref, teacher dropout, teacher EMA σ_rel, CM α_ref)
IMAGENET64 = {"s": (1e-2, 0.0, 0.075, 1e-4), "m": (9e-3, 0.1, 0.06, 9e-5),
              "l": (8e-3, 0.1, 0.04, 8e-5), "xl": (7e-3, 0.1, 0.04, 7e-5)}
IMAGENET512 = {"s": (1e-2, 0.0, 0.025, 1e-4), "m": (9e-3, 0.1, 0.03, 9e-5),
               "l": (8e-3, 0.1, 0.015, 8e-5), "xl": (7e-3, 0.1, 0.02, 7e-5),
               "xxl": (6.5e-3, 0.1, 0.015, 6.5e-5)}
SIZED = [(f"imagenet64-{s}", s) for s in IMAGENET64] + [(f"imagenet512-{s}", s) for s in IMAGENET512]


def test_every_preset_resolves_for_every_method():
    names = config.preset_names()
    for name, _ in SIZED:
        assert name in names
    for name in names:
        for method in config.METHODS:
            cfg = config.resolve(name, method)
            config.validate(cfg)


@pytest.mark.parametrize("name,size", SIZED)
def test_parameter_count_matches_paper(name, size):
    cfg = config.resolve(name, "sct")
    assert cfg.network.model_channels == WIDTH[size]
    paper = PAPER_PARAMS[size] * 1e6
    ours = count_parameters(cfg.network)
    # Adaptive double normalization adds the shift outputs of each block's embedding projection:
    # observed +4.885% .. +4.899% over the paper's count for every size; the band 4.5%..5.3% fails
    # without AdaDN (0%) and for a missing or doubled shift projection.
    assert 0.045 < ours / paper - 1 < 0.053
    # ... which is the whole difference: EDM2's gain-only modulation gives the paper's count
    # (observed within ±0.016%, the rounding of the published figure; band ±0.3%).
    cfg.network.adaptive_double_norm = False
    assert abs(count_parameters(cfg.network) / paper - 1) < 0.003


@pytest.mark.parametrize("name,size", SIZED)
def test_sized_preset_hyperparameters(name, size):
    table = IMAGENET64 if name.startswith("imagenet64") else IMAGENET512
    t_lr, t_drop, t_ema, cm_lr = table[size]
    teacher = config.resolve(name, "diffusion")
    assert teacher.train.lr == pytest.approx(t_lr)
    assert teacher.network.dropout == pytest.approx(t_drop)
    assert teacher.train.ema_sigma_rel == pytest.approx(t_ema)
    for m in ("sct", "scd"):
        cm = config.resolve(name, m)
        assert cm.train.lr == pytest.approx(cm_lr)
        assert cm.train.ema_sigma_rel == pytest.approx(0.05)
        assert (cm.train.betas, cm.train.eps, cm.train.batch) == ([0.9, 0.99], 1e-11, 2048)
        assert cm.network.model_channels == teacher.network.model_channels
    sct, scd = config.resolve(name, "sct"), config.resolve(name, "scd")
    assert scd.network.dropout == 0.0
    if name.startswith("imagenet64"):
        assert teacher.train.lr_ref_steps == 35000 and (teacher.loss.P_mean, teacher.loss.P_std) == (-0.8, 1.6)
        assert (sct.loss.P_mean, sct.loss.P_std) == (-1.0, 1.6)
        assert (sct.network.dropout, sct.network.dropout_max_resolution) == (0.45, 16)
        assert sct.train.steps == scd.train.steps == 400000
        assert (sct.network.channels, sct.network.resolution, sct.data.encoder) == (3, 64, None)
    else:
        assert teacher.train.lr_ref_steps == 70000 and (teacher.loss.P_mean, teacher.loss.P_std) == (-0.4, 1.0)
        assert teacher.network.label_dropout == 0.1
        assert (sct.loss.P_mean, sct.loss.P_std) == (-0.8, 1.6)
        assert 0.25 <= sct.network.dropout <= 0.35 and sct.network.dropout_max_resolution == 16
        assert (sct.train.steps, scd.train.steps, scd.loss.max_guidance) == (100000, 200000, 2.0)
        assert (sct.network.channels, sct.network.resolution) == (4, 64)
        assert sct.data.encoder == "stabilityai/sd-vae-ft-mse"
        assert sct.data.latent_mean == [1.56, -0.695, 0.483, 0.729]
        assert sct.data.latent_std == [5.27, 5.91, 4.21, 4.31]


def test_headline_presets_are_the_papers_sizes():
    assert config.resolve("imagenet64", "sct").to_dict() == config.resolve("imagenet64-xl", "sct").to_dict()
    assert config.resolve("imagenet512", "scd").to_dict() == config.resolve("imagenet512-xxl", "scd").to_dict()


def test_cifar10_preset_matches_table4():
    t, sct, scd = (config.resolve("cifar10", m) for m in config.METHODS)
    assert (t.train.lr, t.train.batch, t.network.dropout, t.train.betas, t.train.eps) == \
        (1e-3, 512, 0.13, [0.9, 0.999], 1e-8)
    assert (sct.train.optimizer, sct.train.lr, sct.train.betas, sct.train.eps) == ("radam", 1e-4, [0.9, 0.99], 1e-8)
    assert (sct.loss.P_mean, sct.loss.P_std, sct.network.dropout, scd.network.dropout) == (-1.0, 1.4, 0.2, 0.0)
    assert (sct.train.ema_halflife_images, sct.loss.tangent_norm_c, sct.loss.tangent_warmup_steps) == \
        (500000, 0.1, 10000)


def test_extends_cycle_is_a_usage_error(tmp_path):
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text(f"extends: {b}\n")
    b.write_text(f"extends: {a}\n")
    with pytest.raises(config.UsageError, match="cycle"):
        config.resolve(str(a), "sct")


def test_dry_run_xxl_reports_params_without_allocating(tmp_path):
    code = ("import json, resource, sys; from scmctl.cli import main\n"
            "try:\n    main(['train', '--preset', 'imagenet512-xxl', '--dry-run', '--json'])\n"
            "except SystemExit as e:\n    assert not e.code, e.code\n"
            "print(json.dumps({'maxrss_kb': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}), file=sys.stderr)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert abs(out["params"] / 1523.4e6 - 1) < 0.08
    rss_gib = json.loads(r.stderr.strip().splitlines()[-1])["maxrss_kb"] / 2**20
    assert rss_gib < 1.5  # the weights alone would be 6 GiB in fp32
