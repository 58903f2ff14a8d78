"""The sCT loss of `scmctl.losses.consistency_loss` against an independent Algorithm 1 on one batch.

On a real checkpoint's network (the U-Net of the run, EMA weights) and one batch of its data, the
same draws (z, t) are replayed and Algorithm 1 of Lu & Song (2025) is recomputed in float64 with
the time derivative of F_θ⁻ along the pair's own trajectory x_t = cos t·x0 + sin t·z taken by
central differences (no forward-mode AD):

    g = −cos²t·(σ_d F⁻ − dx_t/dt) − r·cos t·sin t·(x_t + σ_d dF⁻/dt),  g ← g/(‖g‖ + c)
    L = mean(e^{w(t)}/D·‖F_θ − sg(F_θ) − g‖² − w(t))

Prints the relative differences of the loss value, of the gradient (all parameters as one vector)
and of the per-sample tangent, for scmctl's loss run in float64 and in float32.

    python benchmarks/sct_loss_check.py runs/tiny-diffusion --batch 64 --step 5000
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from scmctl import trigflow  # noqa: E402
from scmctl.losses import consistency_loss  # noqa: E402


def flat_grad(net) -> torch.Tensor:
    return torch.cat([p.grad.flatten().double() if p.grad is not None else torch.zeros(p.numel(), dtype=torch.float64)
                      for p in net.parameters()])


def scmctl_loss(net, x0, cfg, sd, step, seed):
    net.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    out = consistency_loss(net, x0, None, cfg, sd, step)
    out.loss.backward()
    return float(out.loss), flat_grad(net)


def reference_loss(net, x0, cfg, sd, step, seed, h, draw_dtype):
    """Algorithm 1 in float64 with dF/dt by central differences along x_t(t) of this pair.
    The draws replay those of a loss run in ``draw_dtype`` (randn differs between float32 and float64)."""
    torch.manual_seed(seed)
    z = torch.randn_like(x0, dtype=draw_dtype).double() * sd            # the loss's draws, in order
    t = trigflow.sample_time(x0.shape[0], cfg.P_mean, cfg.P_std, sd).double()
    c, s = (v.reshape(-1, 1, 1, 1) for v in (torch.cos(t), torch.sin(t)))
    x_t, dxdt = c * x0 + s * z, c * z - s * x0
    net.zero_grad(set_to_none=True)
    with torch.no_grad():
        def F_along(dt):
            tt = t + dt
            ct, st = torch.cos(tt).reshape(-1, 1, 1, 1), torch.sin(tt).reshape(-1, 1, 1, 1)
            return net((ct * x0 + st * z) / sd, tt, None)
        dFdt = (F_along(h) - F_along(-h)) / (2 * h)
    r = min(1.0, step / cfg.tangent_warmup_steps) if cfg.tangent_warmup_steps > 0 else 1.0
    F_theta = net(x_t / sd, t, None)
    F_minus = F_theta.detach()
    g = -c ** 2 * (sd * F_minus - dxdt) - r * c * s * (x_t + sd * dFdt)
    g_norm = g.flatten(1).norm(dim=1)
    if cfg.tangent_norm == "rms":
        g_norm = g_norm / math.sqrt(x0[0].numel())
    if cfg.tangent_norm != "none":
        g = g / (g_norm.reshape(-1, 1, 1, 1) + cfg.tangent_norm_c)
    w = net.adaptive_weight(t).double() if cfg.adaptive_weighting else torch.zeros_like(t)
    d = x0[0].numel()
    per = (F_theta - F_minus - g).flatten(1).square().sum(1) / d
    loss = (torch.exp(w) * per - w).mean()
    loss.backward()
    return float(loss), flat_grad(net)


def rel(a, b) -> float:
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def main(argv=None):
    from scmctl.data.datasets import load_dataset
    from scmctl.generation import load_for_sampling

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("model", help="checkpoint or run directory (its network and data)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--step", type=int, default=10_000, help="training step (sets the tangent warmup r)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--h", type=float, default=1e-4, help="central-difference step in t")
    a = p.parse_args(argv)

    net, cfg, _, _, _ = load_for_sampling(a.model, "ema", "cpu")
    net.requires_grad_(True).eval()  # dropout off: both computations see the same network
    sd = cfg.data.sigma_data
    data = load_dataset(cfg.data.path, cfg.data.resolution)
    idx = torch.randperm(len(data), generator=torch.Generator().manual_seed(a.seed))[:a.batch]
    x0 = data.batch(idx)[0]
    loss_cfg = copy.deepcopy(cfg.loss)
    loss_cfg.jvp_mode = "dual" if loss_cfg.jvp_mode == "auto" else loss_cfg.jvp_mode

    net64 = copy.deepcopy(net).double()
    for name, m, x in (("float64", net64, x0.double()), ("float32", net, x0)):
        ref_loss, ref_grad = reference_loss(net64, x0.double(), loss_cfg, sd, a.step, a.seed, a.h, x.dtype)
        loss, grad = scmctl_loss(m, x, loss_cfg, sd, a.step, a.seed)
        print(f"scmctl {name}: loss {loss:.8f} vs Algorithm 1 {ref_loss:.8f} (rel {rel(loss, ref_loss):.2e}); "
              f"gradient rel diff {rel(grad, ref_grad):.2e}, cosine "
              f"{float(torch.nn.functional.cosine_similarity(grad, ref_grad, dim=0)):.8f}")


if __name__ == "__main__":
    main()
