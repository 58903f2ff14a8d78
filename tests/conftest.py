import os

import pytest
import torch

# Two cores: keep each test process on a fixed, small thread count for reproducible timings.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture
def tiny_net_cfg():
    """A very small U-Net config (8x8, 1 channel, attention at 8 and 4) for fast exact checks."""
    from scmctl.config import NetworkConfig

    return NetworkConfig(resolution=8, channels=1, num_classes=0, model_channels=8,
                         channel_mult=[1, 2], num_blocks=1, attn_resolutions=[8, 4], head_channels=8,
                         adaptive_weight_channels=8)


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module of tiny networks: faster than two on a shared 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# A real (shrunken) tiny sCT run shared by the post-hoc EMA and plot tests: 160 steps of batch 8,
# the run's own EMA at σ_rel 0.07 (the post-hoc target, tracked directly), snapshots of σ_rel
# 0.05 and 0.10 every 80 images (10 steps), checkpoints at steps 80 and 160.
TINY_RUN_ARGS = ["train", "--preset", "tiny", "--batch", "8", "--steps", "160",
                 "--set", "data.resolution=8", "--set", "network.model_channels=16",
                 "--set", "network.attn_resolutions=[4]", "--set", "network.head_channels=16",
                 "--set", "train.ema_sigma_rel=0.07", "--set", "train.phema_sigma_rels=[0.05,0.1]",
                 "--set", "train.phema_every=80", "--set", "train.checkpoint_every=80",
                 "--set", "train.keep_checkpoints=0", "--set", "train.grid_every=0",
                 "--set", "loss.tangent_warmup_steps=100"]


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """Trained in a subprocess: its output stays out of the tests' captured stdout."""
    import subprocess
    import sys

    run_dir = tmp_path_factory.mktemp("tiny-run") / "run"
    proc = subprocess.run([sys.executable, "-m", "scmctl", *TINY_RUN_ARGS, "--run-dir", str(run_dir)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return run_dir
