"""Progress reporting for long loops in the core (training, sampling, feature extraction).

The core never draws anything itself: it opens a :class:`Bar` through :func:`bar` and reports
``update(completed, info)``. By default a bar does nothing; the command line installs its own
renderer once (:func:`use`), so library users and tests see no output and the core never imports
the CLI.
"""

from __future__ import annotations

import contextlib
from typing import Callable, ContextManager, Iterator, Optional


class Bar:
    """One task's progress; the base class ignores every report."""

    def update(self, completed: Optional[int] = None, advance: int = 0, info: Optional[str] = None) -> None:
        pass


# (description, total, completed, info) -> a context manager yielding a Bar
Renderer = Callable[[str, int, int, str], ContextManager[Bar]]
_renderer: Optional[Renderer] = None


def use(renderer: Optional[Renderer]) -> None:
    """Install the renderer every later :func:`bar` uses (None: silent)."""
    global _renderer
    _renderer = renderer


@contextlib.contextmanager
def bar(description: str, total: int, completed: int = 0, info: str = "",
        enabled: bool = True) -> Iterator[Bar]:
    """A progress bar for `total` units (silent when disabled or no renderer is installed)."""
    if not enabled or _renderer is None:
        yield Bar()
        return
    with _renderer(description, total, completed, info) as b:
        yield b
