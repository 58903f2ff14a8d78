"""Networks: EDM2's U-Net and EDM's DDPM++/NCSN++ family, with the sCM changes (``network.arch``)."""

from scmctl.nn.networks import NETWORKS, build_network, count_parameters  # noqa: F401
