"""Sections a stop signal must not cut in half, such as a record appended to the manifest but not yet printed.

The CLI's SIGINT/SIGTERM handler calls ``deliver``: outside a section the exception
is raised at once, as usual; inside one it is raised when the outermost section ends.
Only the main thread, where Python runs signal handlers, enters sections.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

_depth = 0
_pending: BaseException | None = None


def deliver(stop: BaseException) -> None:
    """Raise ``stop`` now, or at the end of the section the main thread is in."""
    global _pending
    if _depth:
        if _pending is None:
            _pending = stop
        return
    raise stop


@contextmanager
def uninterrupted() -> Iterator[None]:
    """A section that ``deliver`` does not interrupt; a stop that arrived meanwhile is raised as it ends."""
    global _depth, _pending
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1
        if _depth == 0 and _pending is not None:
            stop, _pending = _pending, None
            raise stop
