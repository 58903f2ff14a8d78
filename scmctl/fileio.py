"""Small file helpers shared by every writer: atomic replace, sha256, output checks, stale temps.

A file written with `write_atomic` either has its complete new content or its old one (or does not
exist): the bytes go to a temporary file ``.tmp-NAME.XXXXXXXX`` in the same folder, are fsynced,
then renamed over the target. Nothing half-written is ever left under the final name, and the
temporary name says which final file it was for, so a command removes only its own left-overs
(:func:`remove_stale_temps`), never another process's. Files get mode 0666 minus the process umask,
like any file a program creates (a team's shared run directory keeps working).

A write that fails for a reason of the machine rather than the program (a full disk, a quota, a
read-only or vanished folder, no permission) is a one-line :class:`UsageError` naming the file.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import secrets
from pathlib import Path
from typing import IO, Callable

from scmctl.errors import UsageError

TEMP_PREFIX = ".tmp-"
# errno values that say "this place cannot take the file", not "scmctl is broken".
_ENVIRONMENT_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOENT,
                       errno.ENOTDIR, errno.EISDIR, errno.EIO, errno.EFBIG, errno.ENAMETOOLONG}


def temp_path(path: str | os.PathLike) -> Path:
    """A fresh temporary name beside ``path`` that names it: ``.tmp-NAME.<random>``."""
    path = Path(path)
    return path.with_name(f"{TEMP_PREFIX}{path.name}.{secrets.token_hex(4)}")


def write_error(path: str | os.PathLike, e: OSError) -> UsageError:
    """The one-line error for a write the machine refused (ENOSPC, EROFS, EACCES, ...)."""
    what = e.strerror or e.__class__.__name__
    hint = "; free some space and re-run the same command" if e.errno in (errno.ENOSPC, errno.EDQUOT) else ""
    return UsageError(f"cannot write {path}: {what}{hint}")


def write_atomic(path: str | os.PathLike, write: Callable[[IO], None], binary: bool = True,
                 fsync: bool = True) -> Path:
    """Call `write(f)` on a temporary file beside `path`, fsync it (unless `fsync=False`: many small
    files, e.g. 50k PNGs, where a crash only costs re-generating them), and rename it to `path`."""
    path = Path(path)
    tmp = temp_path(path)
    try:
        # O_EXCL: never follow or reuse an existing name; 0o666: the kernel applies the umask.
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666)
        with os.fdopen(fd, "wb" if binary else "w", **({} if binary else {"encoding": "utf-8"})) as f:
            write(f)
            f.flush()
            if fsync:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(e, OSError) and e.errno in _ENVIRONMENT_ERRORS:
            raise write_error(path, e) from None
        raise
    return path


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    return write_atomic(path, lambda f: f.write(text), binary=False)


def write_json_atomic(path: str | os.PathLike, obj) -> Path:
    """`obj` as indented JSON plus a newline (NaN/Inf refused: they are not JSON)."""
    return write_text_atomic(path, json.dumps(obj, indent=1, allow_nan=False) + "\n")


def remove_stale_temps(folder: str | os.PathLike, name_glob: str = "*") -> list[Path]:
    """Delete ``.tmp-NAME.*`` left by a killed writer of the files ``name_glob`` in ``folder``
    (e.g. ``checkpoint-*.pt``, ``*.png``); the caller owns those final names. Returns what went."""
    folder = Path(folder)
    gone = []
    if folder.is_dir():
        for p in folder.glob(f"{TEMP_PREFIX}{name_glob}.*"):
            if p.is_file() and not p.is_symlink():
                p.unlink(missing_ok=True)
                gone.append(p)
    return gone


def check_output_dir(folder: str | os.PathLike, option: str) -> Path:
    """Prove, before any long work and without leaving anything behind, that files can be created
    in ``folder`` (or, when it does not exist yet, in its nearest existing parent, where it will be
    created): a path that is a file, read-only, under /proc, ... is a one-line UsageError."""
    folder = Path(folder)
    probe_in = folder
    while not probe_in.exists() and probe_in != probe_in.parent:
        probe_in = probe_in.parent
    if not probe_in.is_dir():
        raise UsageError(f"{option} {folder}: {probe_in} exists and is not a folder")
    try:
        probe = temp_path(probe_in / "write-test")
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        os.unlink(probe)
    except OSError as e:
        raise UsageError(f"{option} {folder}: cannot write in {probe_in} ({e.strerror or e.__class__.__name__})") from None
    return folder


def check_output_file(path: str | os.PathLike, option: str) -> Path:
    """:func:`check_output_dir` of the file's folder, and the name itself is not a folder."""
    path = Path(path)
    if path.is_dir():
        raise UsageError(f"{option} {path}: is a folder; give a file name")
    check_output_dir(path.parent, option)
    return path


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in 4 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()
