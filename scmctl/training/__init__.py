"""The training loop shared by `train` and `distill`, EMA, checkpoints."""
