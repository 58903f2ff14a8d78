"""Scale-out: torchrun DDP/FSDP2 on CPU (gloo) against one process, resume, SIGTERM agreement,
gradient accumulation, bf16 autocast, and the batch layout checks.

Equivalence claims and tolerances. With a fixed micro-batch size m, 2 processes × 1 micro-batch and
1 process × 2 accumulated micro-batches make the same random draws (seeded per global micro-batch),
so they compute the same two micro-batch gradients g0, g1. The update uses (g0 + g1)/2 in both, but
not necessarily bit for bit: the all-reduce may sum in another order than the accumulation (with 2
processes and gloo it does not: we observe bitwise equal weights when both sides use one thread),
kernels may reduce in another order with another thread count, and FSDP2 computes the 0-dim gains'
gradients through a [1]-shaped view. We assert max |Δweight| < 1e-5 after a few Adam steps
(observed: 0 for DDP with one thread per process, ~5e-7 for FSDP2 or with 2 threads in the
reference). A resumed run on the same number of processes must be bitwise identical.

Not tested here: train.compile (a cold torch.compile of even the smallest network takes minutes on
this 2-core CPU; checked on a GPU instead) and NCCL (no GPUs here).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
TOL = 1e-5

# The tiny preset shrunk for seconds-long runs; lr_ref_steps=0 keeps the lr constant.
SMALL = ["--set", "data.resolution=8", "--set", "network.model_channels=16",
         "--set", "network.attn_resolutions=[4]", "--set", "network.head_channels=16",
         "--set", "train.grid_every=0", "--set", "train.keep_checkpoints=0",
         "--set", "train.lr_ref_steps=0", "--set", "train.lr=1e-3", "--batch", "8"]


def _env() -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


def _torchrun(*args) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *map(str, args)]


def _scmctl2(*args) -> subprocess.CompletedProcess:
    """`torchrun --nproc_per_node 2 -m scmctl ARGS`."""
    return subprocess.run(_torchrun("-m", "scmctl", *args), capture_output=True, text=True,
                          env=_env(), timeout=300)


def _scmctl1(capsys, *args) -> int:
    """`scmctl ARGS` in this process with one thread (like each torchrun worker)."""
    from scmctl.cli import main

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        main([str(a) for a in args])
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    finally:
        torch.set_num_threads(threads)
    out, err = capsys.readouterr()
    assert code == 0, err
    return code


def _ckpt(run_dir: Path, step: int) -> dict:
    return torch.load(run_dir / f"checkpoint-{step:07d}.pt", weights_only=True)


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].shape == b[k].shape and a[k].dtype == b[k].dtype, k
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


def _assert_same_checkpoint(a: dict, b: dict, tol: float) -> None:
    """Weights, EMA and optimizer moments within `tol` (0 = bitwise); same optimizer layout."""
    for key in ("net", "ema"):
        d = _max_diff(a[key], b[key])
        assert (d == 0) if tol == 0 else (d < tol), f"{key}: max |diff| {d}"
    assert a["phema"]["sigma_rels"] == b["phema"]["sigma_rels"] == [0.05, 0.1]  # post-hoc EMA profiles
    for ea, eb in zip(a["phema"]["emas"], b["phema"]["emas"]):
        d = _max_diff(ea, eb)
        assert (d == 0) if tol == 0 else (d < tol), f"post-hoc EMA profile: max |diff| {d}"
    oa, ob = a["optimizer"], b["optimizer"]
    assert [g["params"] for g in oa["param_groups"]] == [g["params"] for g in ob["param_groups"]]
    assert oa["state"].keys() == ob["state"].keys()
    for i in oa["state"]:
        d = _max_diff(oa["state"][i], ob["state"][i])
        assert (d == 0) if tol == 0 else (d < tol), f"optimizer state {i}: {d}"


def _stats(run_dir: Path) -> list[dict]:
    return [json.loads(ln) for ln in (run_dir / "stats.jsonl").read_text().splitlines()]


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def _rank_of(pid: int) -> int | None:
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    for e in env:
        if e.startswith(b"RANK="):
            return int(e[5:])
    return None


def test_ddp_two_processes_match_one_process_stop_together_and_resume(tmp_path, capsys):
    """sCT (dual jvp mode through the DDP wrapper): SIGTERM to rank 1 alone stops both processes
    at the same step with one checkpoint; re-running resumes; the result equals an uninterrupted
    2-process run bitwise and 1 process accumulating 2 micro-batches of 4 within TOL."""
    common = [*SMALL, "--set", "train.checkpoint_every=1000"]
    run = tmp_path / "ddp"
    proc = subprocess.Popen(_torchrun("-m", "scmctl", "train", *common, "--steps", 400, "--run-dir", run),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            p = run / "stats.jsonl"
            if p.exists() and len(p.read_text().splitlines()) >= 3:
                break
            time.sleep(0.1)
        ranks = {}
        for _ in range(50):
            ranks = {_rank_of(c): c for c in _children(proc.pid)}
            if 1 in ranks:
                break
            time.sleep(0.1)
        assert 1 in ranks, f"no rank-1 worker among {ranks}"
        os.kill(ranks[1], signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err[-3000:]
    ckpts = sorted(run.glob("checkpoint-*.pt"))
    assert len(ckpts) == 1 and "re-run the same command" in err, err[-2000:]
    stopped = int(ckpts[0].stem.split("-")[1])
    assert 3 <= stopped < 400
    assert [s["step"] for s in _stats(run)] == list(range(1, stopped + 1))

    target = stopped + 2
    r = _scmctl2("train", *common, "--steps", target, "--run-dir", run)
    assert r.returncode == 0, r.stderr[-3000:]
    full = tmp_path / "ddp_full"
    r = _scmctl2("train", *common, "--steps", target, "--run-dir", full)
    assert r.returncode == 0, r.stderr[-3000:]
    _assert_same_checkpoint(_ckpt(run, target), _ckpt(full, target), tol=0)
    strip = [{k: v for k, v in rec.items() if k != "images_per_s"} for rec in _stats(run)]
    assert strip == [{k: v for k, v in rec.items() if k != "images_per_s"} for rec in _stats(full)]

    one = tmp_path / "one"
    _scmctl1(capsys, "train", *common, "--set", "train.batch_per_gpu=4", "--steps", target, "--run-dir", one)
    _assert_same_checkpoint(_ckpt(full, target), _ckpt(one, target), tol=TOL)
    for a, b in zip(_stats(full), _stats(one)):  # losses averaged over the same 2 micro-batches
        assert a["step"] == b["step"] and abs(a["loss"] - b["loss"]) < 1e-5 and a["masked"] == b["masked"]


def test_ddp_separate_mode_then_fsdp2_resume_match_one_process(tmp_path, capsys):
    """The paper's path under DDP (jvp on the unwrapped module under no_grad, gradient forward
    through the wrapper), 2 micro-batches of 2 accumulated per process with no_sync, the
    cross-rank gradient check on every step; then FSDP2 resumes that checkpoint (full state
    dicts, optimizer included), trains 2 more steps with weight renormalization and EMA on local
    shards, gathers a sample grid and writes a checkpoint in the 1-process format. Both equal
    1 process accumulating the same 4 micro-batches per step."""
    common = [*SMALL, "--set", "train.checkpoint_every=2", "--set", "loss.jvp_mode=separate",
              "--set", "train.batch_per_gpu=2"]
    one = tmp_path / "one"
    _scmctl1(capsys, "train", *common, "--steps", 4, "--run-dir", one)

    run = tmp_path / "run"
    r = _scmctl2("train", *common, "--steps", 2, "--set", "train.check_grads_every=1", "--run-dir", run, "--json")
    assert r.returncode == 0, r.stderr[-3000:]
    lines = [ln for ln in r.stdout.splitlines() if ln.strip()]
    assert len(lines) == 1 and json.loads(lines[0])["steps"] == 2  # rank 0 alone reports
    _assert_same_checkpoint(_ckpt(run, 2), _ckpt(one, 2), tol=TOL)

    r = _scmctl2("train", *common, "--steps", 4, "--set", "train.parallel=fsdp", "--set", "train.grid_every=4",
                 "--set", "sample.grid_images=4", "--run-dir", run)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (run / "grid-0000004.png").exists()
    _assert_same_checkpoint(_ckpt(run, 4), _ckpt(one, 4), tol=TOL)
    for name in ("phema-0000004-0.0500.pt", "phema-0000004-0.1000.pt"):  # snapshots gathered from FSDP2 shards
        sa, sb = (torch.load(d / "phema" / name, weights_only=True)["ema"] for d in (run, one))
        assert _max_diff(sa, sb) < TOL
    for a, b in zip(_stats(run), _stats(one)):
        assert a["step"] == b["step"] and abs(a["loss"] - b["loss"]) < 1e-5


def test_avsd_ddp_then_fsdp2_resume_match_one_process(tmp_path, capsys):
    """sCD + adaptive VSD: the fake score model F_φ wrapped by DDP like the student (two gradient
    forwards of the student through its wrapper: the sCD and the one-step sample), w_ψ's gradients
    averaged by hand, the cross-rank gradient check on; then FSDP2 (F_φ sharded like the student)
    resumes that checkpoint. Student, EMA, F_φ, w_ψ and all three optimizers equal 1 process
    accumulating the same 2 micro-batches per step within TOL."""
    teacher = tmp_path / "teacher"
    _scmctl1(capsys, "train", "--objective", "diffusion", *SMALL, "--steps", 1, "--run-dir", teacher)
    common = [*SMALL, "--teacher", teacher, "--set", "loss.vsd_weight=1.0", "--set", "train.checkpoint_every=2",
              "--set", "train.batch_per_gpu=4"]
    one = tmp_path / "one"
    _scmctl1(capsys, "distill", *common, "--steps", 4, "--run-dir", one)
    run = tmp_path / "run"
    r = _scmctl2("distill", *common, "--steps", 2, "--set", "train.check_grads_every=1", "--run-dir", run)
    assert r.returncode == 0, r.stderr[-3000:]
    r2 = _scmctl2("distill", *common, "--steps", 4, "--set", "train.parallel=fsdp", "--run-dir", run)
    assert r2.returncode == 0, r2.stderr[-3000:]
    for step in (2, 4):  # 2: DDP, 4: FSDP2
        a, b = _ckpt(run, step), _ckpt(one, step)
        _assert_same_checkpoint(a, b, tol=TOL)
        for key in ("vsd_fake", "vsd_weight_head"):
            assert _max_diff(a[key], b[key]) < TOL, key
        for key in ("vsd_fake_optimizer", "vsd_weight_head_optimizer"):
            sa, sb = a[key]["state"], b[key]["state"]
            assert sa.keys() == sb.keys() and all(_max_diff(sa[i], sb[i]) < TOL for i in sa), key
    for a, b in zip(_stats(run), _stats(one)):
        assert a["step"] == b["step"]
        for k in ("loss", "loss_vsd", "loss_fake"):
            assert abs(a[k] - b[k]) < 1e-5, k


def test_gradient_check_raises_when_ranks_disagree(monkeypatch, tiny_net_cfg):
    """The comparison half of train.check_grads_every (the all-gather itself runs in the DDP
    test above): equal fingerprints pass, a 1e-3 change in one gradient entry raises."""
    from scmctl import distributed
    from scmctl.nn.unet import UNet
    from scmctl.training.loop import check_gradients_agree, gradient_fingerprint

    net = UNet(tiny_net_cfg)
    net(torch.randn(2, 1, 8, 8), torch.rand(2)).square().mean().backward()
    mine = gradient_fingerprint(net.parameters())
    monkeypatch.setattr(distributed, "all_gather_tensor", lambda t: [t, mine.clone()])
    check_gradients_agree(net.parameters(), 1)
    with torch.no_grad():
        net.conv_out.weight.grad[0].flatten()[3] += 1e-3
    with pytest.raises(RuntimeError, match="differ between ranks 0 and 1"):
        check_gradients_agree(net.parameters(), 2)


def test_effective_jvp_mode():
    """The dual mode runs as separate where it cannot work: FSDP2, fp32 tangent under bf16, compile."""
    from scmctl import config
    from scmctl.training.loop import effective_jvp_mode

    def mode(method, world, *sets):
        return effective_jvp_mode(config.resolve("tiny", method, list(sets)), world)[0]

    assert mode("sct", 2, "train.parallel=ddp") == "dual"
    assert mode("sct", 2, "train.parallel=fsdp") == "separate"
    assert mode("sct", 1, "train.parallel=fsdp") == "dual"
    assert mode("scd", 1, "train.precision=bf16", "loss.jvp_fp32=true") == "separate"
    assert mode("sct", 1, "train.precision=bf16") == "dual"
    assert mode("sct", 1, "train.compile=true") == "separate"
    assert mode("sct", 1, "loss.jvp_mode=separate") == "separate"
    assert mode("diffusion", 2, "train.parallel=fsdp") == "dual"


def test_accumulated_gradient_equals_the_full_batch_gradient_float64(monkeypatch, tiny_net_cfg):
    """1 process, 2 micro-batches of 4 accumulated = the gradient of the mean loss over all 8
    examples computed in one pass with the same draws (z, t recorded, then replayed), float64."""
    from scmctl import config, trigflow
    from scmctl.nn.unet import UNet
    from scmctl.training.loop import accumulate_gradients, micro_batch_loss, plain_model

    tiny_net_cfg.attn_resolutions = [4]
    for method in ("sct",):  # the accumulation does not depend on the objective
        cfg = config.resolve("tiny", method, ["network.dropout=0"])
        cfg.network = tiny_net_cfg
        torch.manual_seed(0)
        net = UNet(cfg.network).double().train()
        with torch.no_grad():
            net.out_gain.fill_(1.0)
        model = plain_model(net)
        x0 = torch.randn(8, 1, 8, 8, dtype=torch.float64) * 0.5

        drawn = {"z": [], "t": []}
        randn_like, sample_time = torch.randn_like, trigflow.sample_time

        def record_z(x, *a, **k):
            drawn["z"].append(randn_like(x, *a, **k))
            return drawn["z"][-1]

        def record_t(*a, **k):
            drawn["t"].append(sample_time(*a, **k))
            return drawn["t"][-1]

        monkeypatch.setattr(torch, "randn_like", record_z)
        monkeypatch.setattr(trigflow, "sample_time", record_t)
        net.zero_grad(set_to_none=True)
        torch.manual_seed(1)
        accumulate_gradients(cfg, model, [(x0[:4], None), (x0[4:], None)], 2, step=300)
        acc = [p.grad.clone() for p in net.parameters()]
        assert len(drawn["z"]) == 2 and len(drawn["t"]) == 2

        z, t = torch.cat(drawn["z"]), torch.cat(drawn["t"])
        monkeypatch.setattr(torch, "randn_like", lambda x, *a, **k: z.to(x.dtype))
        monkeypatch.setattr(trigflow, "sample_time", lambda *a, **k: t)
        net.zero_grad(set_to_none=True)
        micro_batch_loss(cfg, model, x0, None, step=300).loss.backward()
        full = [p.grad.clone() for p in net.parameters()]
        monkeypatch.undo()

        scale = max(g.abs().max().item() for g in full)
        err = max((a - b).abs().max().item() for a, b in zip(acc, full))
        assert scale > 1e-3 and err <= 1e-6 * scale, (method, err, scale)


def test_bf16_autocast_step_and_tangent(tiny_net_cfg):
    """bf16 autocast on the CPU: the time embedding stays fp32, the tangent g is within 3% (relative
    L2) of the fp32 one, loss.jvp_fp32 gives the fp32 tangent exactly, and a full bf16 training
    step has a finite loss within 5% of the fp32 step's."""
    import dataclasses

    from scmctl import config, losses
    from scmctl.distributed import Dist
    from scmctl.nn.unet import UNet
    from scmctl.training.loop import build_model, make_optimizer, training_step

    torch.manual_seed(0)
    net = UNet(tiny_net_cfg).train()
    with torch.no_grad():
        net.out_gain.fill_(1.0)
    x_t, t = torch.randn(6, 1, 8, 8) * 0.5, torch.rand(6) * 1.5
    dxdt = torch.randn_like(x_t) * 0.5
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert net.time_embed(t).dtype == torch.float32
        assert net.emb_noise(net.time_embed(t)).dtype == torch.bfloat16  # autocast is on

    cfg = config.resolve("tiny", "sct", ["train.precision=bf16", "train.device=cpu"])
    cfg.network = dataclasses.replace(tiny_net_cfg)
    cfg.loss = dataclasses.replace(cfg.loss, tangent_warmup_steps=0)
    _, g32 = losses.consistency_tangent(net, x_t, t, dxdt, 0.5, 1.0)
    model = build_model(cfg, net, Dist())
    F16, g16 = losses.consistency_tangent(model.jvp_forward, x_t, t, dxdt, 0.5, 1.0)
    assert F16.dtype == torch.bfloat16 and torch.isfinite(g16).all()
    rel = ((g16.double() - g32.double()).norm() / g32.double().norm()).item()
    assert rel < 0.03, rel

    from scmctl.training.run_config import resolve_for_run

    cfg32, _ = resolve_for_run(dataclasses.replace(cfg, loss=dataclasses.replace(cfg.loss, jvp_fp32=True)))
    assert cfg32.loss.jvp_mode == "separate"  # the gradient forward stays bf16
    model32 = build_model(cfg32, net, Dist())
    F32, g = losses.consistency_tangent(model32.jvp_forward, x_t, t, dxdt, 0.5, 1.0)
    assert F32.dtype == torch.float32 and torch.equal(g, g32)

    x0 = torch.randn(8, 1, 8, 8) * 0.5
    results = {}
    for name, c in (("bf16", cfg), ("fp32", dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, precision="fp32")))):
        n = UNet(tiny_net_cfg).train()
        n.load_state_dict(net.state_dict())
        m = build_model(c, n, Dist())
        torch.manual_seed(5)
        out, grad_norm, skipped = training_step(c, n, make_optimizer(c, n.parameters()), x0, None, 300,
                                                1e-3, model=m)
        results[name] = out.loss.item()
        assert torch.isfinite(out.loss) and torch.isfinite(grad_norm) and not skipped
    assert abs(results["bf16"] - results["fp32"]) < 0.05 * abs(results["fp32"]), results


def test_batch_layout():
    from scmctl.errors import UsageError
    from scmctl.training.loop import batch_layout

    lay = batch_layout(2048, 32, 8)
    assert (lay.micro, lay.accum, list(lay.indices(3))) == (32, 8, list(range(24, 32)))
    assert batch_layout(8, 0, 2).micro == 4 and batch_layout(8, 0, 2).accum == 1
    for args in ((9, 0, 2), (8, 8, 2), (12, 4, 2)):
        with pytest.raises(UsageError):
            batch_layout(*args)


@pytest.mark.parametrize("args,needle", [
    (["--batch", "9"], "divisible by the number of processes (2)"),
    (["--batch", "8", "--set", "train.batch_per_gpu=8"], "processes x train.batch_per_gpu (2 x 8 = 16)"),
])
def test_bad_batch_for_the_number_of_processes_is_one_line_exit_2(tmp_path, capsys, monkeypatch, args, needle):
    """Checked from torchrun's WORLD_SIZE before any process group or data exists."""
    from scmctl.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(SystemExit) as e:
        main(["train", *args])
    out, err = capsys.readouterr()
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert e.value.code == 2 and len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], err
    assert not (tmp_path / "runs").exists()


def test_compile_with_dropout_is_refused_for_consistency_training(tmp_path, capsys, monkeypatch):
    from scmctl.cli import main

    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        main(["train", "--set", "train.compile=true", "--set", "network.dropout=0.2", "--dry-run"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "dropout masks" in err and len(err.strip().splitlines()) == 1
