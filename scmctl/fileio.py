"""Small file helpers shared by every writer: atomic replace and sha256.

A file written with `write_atomic` either has its complete new content or its old one (or does not
exist): the bytes go to a temporary file in the same folder, are fsynced, then renamed over the
target. Nothing half-written is ever left under the final name.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import IO, Callable


def write_atomic(path: str | os.PathLike, write: Callable[[IO], None], binary: bool = True,
                 fsync: bool = True) -> Path:
    """Call `write(f)` on a temporary file beside `path`, fsync it (unless `fsync=False`: many small
    files, e.g. 50k PNGs, where a crash only costs re-generating them), and rename it to `path`."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=path.suffix, dir=path.parent)
    try:
        with os.fdopen(fd, "wb" if binary else "w") as f:
            write(f)
            f.flush()
            if fsync:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    return write_atomic(path, lambda f: f.write(text), binary=False)


def write_json_atomic(path: str | os.PathLike, obj) -> Path:
    """`obj` as indented JSON plus a newline."""
    return write_text_atomic(path, json.dumps(obj, indent=1) + "\n")


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in 4 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()
