"""User-facing errors.

A :class:`UsageError` is bad input from the user (a missing file, a bad option value, a checkpoint
of another architecture). The CLI prints its message as one line on stderr and exits with code 2.
Anything else that escapes is an unexpected failure (exit code 1).
"""


class UsageError(Exception):
    """Bad input: reported as one line on stderr, exit code 2, no traceback."""
