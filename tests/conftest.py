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
