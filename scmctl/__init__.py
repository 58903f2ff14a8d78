"""scmctl: continuous-time consistency models (sCM, Lu & Song, ICLR 2025) from the command line."""

__version__ = "0.4.0"
