"""The DDPM++/NCSN++ family (network.arch ddpmpp / ncsnpp): forward-mode AD against float64 central
differences, layers against independent computations, the architecture against EDM's published
description layer by layer, and the cifar10 preset through the CLI."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from _cli import run
from scmctl import config
from scmctl.config import NetworkConfig
from scmctl.nn import NETWORKS, build_network, count_parameters
from scmctl.nn.edm_layers import Conv2d, GroupNorm, PositionalEmbedding
from scmctl.nn.songunet import SongBlock, load_edm_state_dict

ARCHS = ("ddpmpp", "ncsnpp")


def tiny_cfg(arch, **kw):
    """8×8, two levels, one block each, attention at 4×4: every layer kind in ~50k parameters."""
    cfg = NetworkConfig(arch=arch, resolution=8, channels=2, num_classes=0, model_channels=8,
                        channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4], adaptive_weight_channels=8)
    for k, v in kw.items():
        setattr(cfg, k, v)
    return cfg


def trained_looking(net):
    """Replace the near-zero initial output convolutions (EDM's 1e-5 init) and the zero guidance
    layer by unit-scale weights, so every path carries signal into the output."""
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if p.ndim == 4 or name.startswith("emb_guidance"):
                p.normal_(0, 1 / math.sqrt(p[0].numel()))
    return net


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


# ------------------------------------------------------------------ forward-mode AD --------------

@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("double_norm", [True, False])
def test_jvp_matches_central_differences(arch, double_norm):
    """Tangent in x and in t together, with class, guidance and augmentation inputs, every layer."""
    cfg = tiny_cfg(arch, adaptive_double_norm=double_norm, num_classes=3, guidance_input=True, augment_dim=9,
                   time_embedding="positional" if double_norm else "fourier")
    torch.manual_seed(0)
    net = trained_looking(build_network(cfg).double().eval())
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 2, 8, 8, generator=g, dtype=torch.float64)
    t = torch.tensor([0.2, 0.9, 1.4], dtype=torch.float64)
    labels, s = torch.tensor([0, 2, 1]), torch.tensor([1.0, 1.5, 2.0], dtype=torch.float64)
    aug = torch.randn(3, 9, generator=g, dtype=torch.float64)
    f = lambda x, t: net(x, t, labels, s, aug)  # noqa: E731
    tx = torch.randn(x.shape, generator=g, dtype=torch.float64)
    h = 1e-5
    with torch.no_grad():
        y, j = torch.func.jvp(f, (x, t), (tx, torch.ones_like(t)))
        fd = (f(x + h * tx, t + h) - f(x - h * tx, t - h)) / (2 * h)
        _, jt = torch.func.jvp(f, (x, t), (torch.zeros_like(x), torch.ones_like(t)))
        assert torch.equal(y, f(x, t))
        # every input reaches the output
        assert jt.abs().max() > 1e-3
        assert (net(x, t, torch.tensor([1, 1, 1]), s, aug) - y).abs().max() > 1e-4
        assert (net(x, t, labels, s + 0.5, aug) - y).abs().max() > 1e-4
        assert (net(x, t, labels, s, None) - y).abs().max() > 1e-4
    assert _rel(j, fd) < 1e-7


def test_groupnorm_and_its_tangent_match_pytorch():
    """Hand-written GroupNorm (and its written-out tangent) = F.group_norm (and PyTorch's own
    forward-AD rule for it), float64, with a non-trivial affine."""
    gn = GroupNorm(24, eps=1e-6).double()  # min(32, 24/4) = 6 groups
    with torch.no_grad():
        gn.weight.normal_()
        gn.bias.normal_()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 24, 5, 3, generator=g, dtype=torch.float64) * 3 + 1
    tx = torch.randn(x.shape, generator=g, dtype=torch.float64)
    ref = lambda x: F.group_norm(x, 6, gn.weight, gn.bias, 1e-6)  # noqa: E731
    with torch.no_grad():
        y, ty = torch.func.jvp(gn, (x,), (tx,))
        y_ref, ty_ref = torch.func.jvp(ref, (x,), (tx,))
    assert gn.num_groups == 6
    assert _rel(y, y_ref) < 1e-13 and _rel(ty, ty_ref) < 1e-12


# ------------------------------------------------------------------ layers -----------------------

def _fir_reference(x, f, mode):
    """×2 FIR resampling of (H, W) `x` by the separable filter f⊗f/(Σf)², with explicit loops:
    down: y[i] = Σ_k f_k/Σf·x[2i + k − p]; up: y[2i + k − p] += 2·f_k/Σf·x[i] (p = (len f − 1)//2)."""
    f = np.asarray(f, dtype=np.float64)
    p = (len(f) - 1) // 2

    def one_axis(a):
        n = a.shape[0]
        if mode == "down":
            out = np.zeros((n // 2,) + a.shape[1:])
            for i in range(n // 2):
                for k, fk in enumerate(f):
                    j = 2 * i + k - p
                    if 0 <= j < n:
                        out[i] += fk / f.sum() * a[j]
        else:
            out = np.zeros((2 * n,) + a.shape[1:])
            for i in range(n):
                for k, fk in enumerate(f):
                    j = 2 * i + k - p
                    if 0 <= j < 2 * n:
                        out[j] += 2 * fk / f.sum() * a[i]
        return out

    return one_axis(one_axis(x).T).T


@pytest.mark.parametrize("fir", [(1, 1), (1, 3, 3, 1)])
@pytest.mark.parametrize("mode", ["down", "up"])
def test_resampling_matches_explicit_fir(fir, mode):
    conv = Conv2d(2, 2, 0, resample=mode, resample_filter=fir).double()
    x = torch.randn(1, 2, 6, 6, dtype=torch.float64)
    with torch.no_grad():
        y = conv(x)
    for c in range(2):
        assert np.allclose(y[0, c].numpy(), _fir_reference(x[0, c].numpy(), fir, mode), atol=1e-12)
    if fir == (1, 1):  # the box filter is 2×2 average pooling / nearest-neighbour upsampling
        ref = F.avg_pool2d(x, 2) if mode == "down" else F.interpolate(x, scale_factor=2.0, mode="nearest")
        assert torch.allclose(y, ref, atol=1e-12)


def test_fused_downsampling_convolves_then_filters():
    """NCSN++'s residual path: 3×3 conv at full resolution (zero padding 1 + filter padding), then
    the FIR decimation — checked against F.conv2d followed by the explicit FIR reference."""
    fir = (1, 3, 3, 1)
    conv = Conv2d(3, 4, 3, resample="down", resample_filter=fir, fused=True).double()
    with torch.no_grad():
        conv.bias.normal_()
    x = torch.randn(1, 3, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        y = conv(x)
        full = F.conv2d(x, conv.weight, padding=2)  # (10, 10): the filter's own padding of 1 added
    for c in range(4):
        # decimate the padded full-resolution map: outputs i = 0..3 read rows 2i .. 2i+3 of `full`
        f = np.asarray(fir, float) / sum(fir)
        k2 = np.outer(f, f)
        ref = np.array([[(full[0, c, 2 * i:2 * i + 4, 2 * j:2 * j + 4].numpy() * k2).sum() for j in range(4)]
                        for i in range(4)]) + conv.bias[c].item()
        assert np.allclose(y[0, c].numpy(), ref, atol=1e-12)


def test_positional_embedding_formula():
    emb = PositionalEmbedding(8).double()
    c = torch.tensor([0.0, 0.7, -1.3], dtype=torch.float64)
    freqs = np.array([(1 / 10000) ** (i / 3) for i in range(4)])  # endpoint: the last one is 1/10000
    a = c.numpy()[:, None] * freqs
    assert np.allclose(emb(c).numpy(), np.concatenate([np.sin(a), np.cos(a)], axis=1), atol=1e-15)


def _edm_block_reference(blk, x, emb):
    """EDM's DDPM++ block written out from its description with plain PyTorch ops (float64):
    GN→SiLU→conv3×3(↓) ; + affine(emb) ; GN→SiLU→dropout→conv3×3 ; (+ skip)·√½ ;
    attention: qkv = conv1×1(GN(x)) with channels ordered (channel, q/k/v), one head,
    softmax(qᵀk/√C) over keys, x ← (proj(v·wᵀ) + x)·√½."""
    def gn(m, a):
        return F.group_norm(a, m.num_groups, m.weight, m.bias, 1e-6)

    def conv(m, a, pad):
        return F.conv2d(a, m.weight, m.bias, padding=pad)

    orig = x
    h = F.silu(gn(blk.norm0, x))
    h = F.avg_pool2d(h, 2)  # [1, 1] filter
    h = conv(blk.conv0, h, 1)
    h = h + (emb @ blk.affine.weight.t() + blk.affine.bias)[:, :, None, None]
    h = conv(blk.conv1, F.silu(gn(blk.norm1, h)), 1)
    x = (h + conv(blk.skip, F.avg_pool2d(orig, 2), 0)) * math.sqrt(0.5)
    n, c, hh, ww = x.shape
    qkv = conv(blk.qkv, gn(blk.norm2, x), 0).reshape(n, c, 3, hh * ww)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    w = torch.softmax(torch.einsum("ncq,nck->nqk", q, k) / math.sqrt(c), dim=2)
    a = torch.einsum("nqk,nck->ncq", w, v).reshape(n, c, hh, ww)
    return (conv(blk.proj, a, 0) + x) * math.sqrt(0.5)


def test_edm_block_matches_written_out_reference():
    torch.manual_seed(0)
    blk = trained_looking(SongBlock(8, 16, 12, resample="down", attn=True, double_norm=False).double().eval())
    with torch.no_grad():
        for m in (blk.norm0, blk.norm1, blk.norm2):
            m.weight.normal_()
            m.bias.normal_()
        x, emb = torch.randn(2, 8, 8, 8, dtype=torch.float64), torch.randn(2, 12, dtype=torch.float64)
        assert _rel(blk(x, emb), _edm_block_reference(blk, x, emb)) < 1e-12


# ------------------------------------------------------------------ architecture -----------------

def edm_songunet_state(arch, double_norm=False, res=32, img=3, C=128, mult=(2, 2, 2), blocks=4,
                       attn=(16,), emb_mult=4):
    """Names and shapes of EDM's SongUNet state dict, from the architecture description of the EDM
    paper (App. F.2, Table 7) and Song et al. (2021): the mapping network, then per resolution
    (down block / residual aux conv,) `blocks` blocks; decoder: in0 (attention) + in1 at the lowest
    resolution, else an up block, then blocks+1 blocks with skips (attention in the last one),
    output GroupNorm + conv. double_norm: each block's affine emits scale and shift (2C)."""
    ncsn = arch == "ncsnpp"
    fir = 4 if ncsn else 2
    cn, ce = C * (2 if ncsn else 1), C * emb_mult
    out = {}

    def lin(name, i, o, bias=True):
        out[f"{name}.weight"] = (o, i)
        if bias:
            out[f"{name}.bias"] = (o,)

    def conv(name, i, o, k, resample=False):
        out[f"{name}.weight"] = (o, i, k, k)
        out[f"{name}.bias"] = (o,)
        if resample:
            out[f"{name}.resample_filter"] = (1, 1, fir, fir)

    def norm(name, c):
        out[f"{name}.weight"] = out[f"{name}.bias"] = (c,)

    def block(name, i, o, resample=False, attention=False):
        norm(f"{name}.norm0", i)
        conv(f"{name}.conv0", i, o, 3, resample)
        lin(f"{name}.affine", ce, o * (2 if double_norm else 1))
        norm(f"{name}.norm1", o)
        conv(f"{name}.conv1", o, o, 3)
        if i != o or resample:
            conv(f"{name}.skip", i, o, 1, resample)
        if attention:
            norm(f"{name}.norm2", o)
            conv(f"{name}.qkv", o, 3 * o, 1)
            conv(f"{name}.proj", o, o, 1)

    if ncsn:
        out["map_noise.freqs"] = (cn // 2,)
    lin("map_layer0", cn, ce)
    lin("map_layer1", ce, ce)
    c, caux, skips = C, img, []
    for level, m in enumerate(mult):
        r = res >> level
        if level == 0:
            conv(f"enc.{r}x{r}_conv", img, C, 3)
        else:
            block(f"enc.{r}x{r}_down", c, c, resample=True)
            if ncsn:
                conv(f"enc.{r}x{r}_aux_residual", caux, c, 3, resample=True)
                caux = c
        skips.append(c)
        for i in range(blocks):
            block(f"enc.{r}x{r}_block{i}", c, C * m, attention=r in attn)
            c = C * m
            skips.append(c)
    for level in reversed(range(len(mult))):
        r = res >> level
        if level == len(mult) - 1:
            block(f"dec.{r}x{r}_in0", c, c, attention=True)
            block(f"dec.{r}x{r}_in1", c, c)
        else:
            block(f"dec.{r}x{r}_up", c, c, resample=True)
        for i in range(blocks + 1):
            block(f"dec.{r}x{r}_block{i}", c + skips.pop(), C * mult[level],
                  attention=i == blocks and r in attn)
            c = C * mult[level]
    norm(f"dec.{res}x{res}_aux_norm", c)
    conv(f"dec.{res}x{res}_aux_conv", c, img, 3)
    return out


def _params(state):
    return sum(math.prod(s) for k, s in state.items() if not k.endswith(("resample_filter", "freqs")))


def cifar10_cfg(arch, edm: bool) -> NetworkConfig:
    """EDM's CIFAR-10 configuration; edm=True: EDM's own options (additive AdaGN, EDM's embedding)."""
    cfg = config.resolve("cifar10", "sct").network
    cfg.arch = arch
    if edm:
        cfg.adaptive_double_norm = False
        if arch == "ncsnpp":
            cfg.time_embedding, cfg.time_embedding_scale = "fourier", 16.0
    return cfg


@pytest.mark.parametrize("arch", ARCHS)
def test_layers_match_edm_architecture(arch):
    """Layer by layer (names and shapes) with the EDM options; the totals are EDM's published sizes
    (DDPM++ 55.7M, NCSN++ 56.4M); the sCM changes add exactly the scale half of every block's
    affine layer (AdaDN: emb·C + C per block) and w_φ's 128 weights."""
    expected = edm_songunet_state(arch)
    with torch.device("meta"):
        net = NETWORKS[arch](cifar10_cfg(arch, edm=True))
    ours = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    assert ours.pop("weight_linear.weight") == (1, 128)
    assert ours == expected
    edm_params = _params(expected)
    assert round(edm_params / 1e6, 1) == {"ddpmpp": 55.7, "ncsnpp": 56.4}[arch]
    assert count_parameters(cifar10_cfg(arch, edm=True)) == edm_params + 128

    scm = edm_songunet_state(arch, double_norm=True)
    n_blocks = sum(1 for k in expected if k.endswith(".affine.bias"))
    assert n_blocks == 33  # 2 down + 12 + 2 (in0, in1) + 2 up + 15
    added = sum(math.prod(s) for k, s in expected.items() if ".affine." in k)  # one more affine's worth
    assert count_parameters(cifar10_cfg(arch, edm=False)) == _params(scm) + 128 == edm_params + added + 128
    assert added == 33 * (512 * 256 + 256)


def test_edm_state_dict_loads_strictly_after_the_key_mapping():
    """An EDM EDMPrecond state dict (``model.`` + SongUNet keys, NCSN++ with its Fourier buffer):
    every tensor lands where its name says."""
    cfg = tiny_cfg("ncsnpp", adaptive_double_norm=False, time_embedding="fourier", time_embedding_scale=16.0)
    net = build_network(cfg).double()
    shapes = edm_songunet_state("ncsnpp", res=8, img=2, C=8, mult=(1, 2), blocks=1, attn=(4,))
    g = torch.Generator().manual_seed(0)
    edm = {f"model.{k}": torch.randn(s, generator=g, dtype=torch.float64) for k, s in shapes.items()}
    edm = {k: (v.abs() if k.endswith("resample_filter") else v) for k, v in edm.items()}
    load_edm_state_dict(net, edm)
    mine = net.state_dict()
    for k, v in edm.items():
        assert torch.equal(mine[k[len("model."):]], v), k


def test_every_arch_has_a_network():
    assert set(NETWORKS) == set(config.NETWORK_ARCHS)


# ------------------------------------------------------------------ the cifar10 preset -----------

def test_cifar10_preset_dry_run_reports_ddpmpp(capsys):
    code, out, err = run(capsys, "train", "--preset", "cifar10", "--dry-run", "--json")
    assert code == 0, err
    import json
    d = json.loads(out)
    assert d["config"]["network"]["arch"] == "ddpmpp"
    assert d["config"]["network"]["adaptive_double_norm"] is True
    assert d["params"] == _params(edm_songunet_state("ddpmpp", double_norm=True)) + 128  # 60,066,691


def test_cifar10_preset_trains_at_a_shrunk_width(tmp_path, capsys):
    """The cifar10 preset's real network (DDPM++, 3 levels, attention at 16×16) at width 8 and one
    block per level: a few sCT steps on CPU, finite loss, a checkpoint that reloads to the same F."""
    g = np.random.default_rng(0)
    data = tmp_path / "c.npz"
    np.savez(data, images=g.integers(0, 256, size=(16, 32, 32, 3), dtype=np.uint8))
    rd = tmp_path / "run"
    code, out, err = run(capsys, "train", "--preset", "cifar10", "--data", data, "--run-dir", rd,
                         "--steps", 2, "--batch", 4, "--set", "network.model_channels=8",
                         "--set", "network.num_blocks=1", "--set", "train.grid_every=0", "--json")
    assert code == 0, err
    import json
    d = json.loads(out)
    assert math.isfinite(d["loss"])
    from scmctl.training.checkpoint import load, network_from_checkpoint
    ckpt = load(d["checkpoint"])
    net = network_from_checkpoint(ckpt, weights="raw")
    assert type(net).__name__ == "SongUNet" and ckpt["config"]["network"]["arch"] == "ddpmpp"
