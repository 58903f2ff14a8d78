"""Helpers shared by the subcommands: stderr console, JSON output, progress bars."""

from __future__ import annotations

import contextlib
import json
import sys
from typing import Any, Iterator

from scmctl import progress as core_progress

from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn)

# Everything human-facing goes to stderr so that `--json` leaves exactly one object on stdout.
console = Console(stderr=True, highlight=False)


def emit_json(obj: dict[str, Any] | list) -> None:
    """Write exactly one JSON value (one line) to stdout: an object, or a list of rows."""
    sys.stdout.write(json.dumps(obj, sort_keys=False, default=_json_default) + "\n")
    sys.stdout.flush()


def _json_default(x: Any) -> Any:
    if hasattr(x, "item"):
        return x.item()
    if hasattr(x, "tolist"):
        return x.tolist()
    return str(x)


class _Progress(Progress):
    """A progress bar that vanishes when an exception ends it, so an error is the only line left."""

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            self.live.transient = True
            if not self.console.is_terminal:
                self.disable = self.live.console.quiet = True  # a pipe cannot erase: print nothing more
        try:
            return super().__exit__(exc_type, exc, tb)
        finally:
            self.live.console.quiet = False


def progress(disable: bool = False) -> Progress:
    """A rich progress bar on stderr (training, sampling, feature extraction)."""
    return _Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        disable=disable,
        transient=False,
    )


class _RichBar(core_progress.Bar):
    def __init__(self, bar: Progress, task):
        self.bar, self.task = bar, task

    def update(self, completed=None, advance=0, info=None) -> None:
        kw = {} if info is None else {"info": info}
        if completed is not None:
            self.bar.update(self.task, completed=completed, **kw)
        else:
            self.bar.update(self.task, advance=advance, **kw)


@contextlib.contextmanager
def rich_bar(description: str, total: int, completed: int = 0, info: str = "") -> Iterator[_RichBar]:
    """The core's progress renderer (scmctl.progress.use): one rich bar on stderr per task."""
    with progress() as bar:
        yield _RichBar(bar, bar.add_task(description, total=total, completed=completed, info=info))
