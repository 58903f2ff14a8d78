"""Networks: the EDM2-style U-Net with the sCM changes."""

from scmctl.nn.unet import UNet, build_network  # noqa: F401
