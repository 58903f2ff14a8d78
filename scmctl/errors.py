"""User-facing errors.

A :class:`UsageError` is bad input from the user (a missing file, a bad option value, a checkpoint
of another architecture). The CLI prints its message as one line on stderr and exits with code 2.
Anything else that escapes is an unexpected failure (exit code 1).
"""


class UsageError(Exception):
    """Bad input: reported as one line on stderr, exit code 2, no traceback."""


def check_float(value: float, option: str, lo: float | None = None, hi: float | None = None,
                open_lo: bool = False) -> float:
    """A float option that must be finite and in [lo, hi] (lo excluded with ``open_lo``): NaN
    passes every comparison, so ranges alone never catch it."""
    import math

    v = float(value)
    bad = not math.isfinite(v) or (lo is not None and (v <= lo if open_lo else v < lo)) or (hi is not None and v > hi)
    if bad:
        where = f"{'(' if open_lo else '['}{lo if lo is not None else '-inf'}, {hi if hi is not None else 'inf'}]"
        raise UsageError(f"{option} must be a finite number in {where}, got {value}")
    return v
