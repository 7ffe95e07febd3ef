"""Which runs are writing into an output folder right now, so that two runs never write the same files.

Each run holds an advisory lock (``flock``) on a file of its own in ``DIR/.hookviz/`` for
as long as it runs; the kernel drops it when the process ends, however it ends (SIGKILL
included), so a lock that can be taken belongs to a dead run. A new run, holding
``DIR/.hookviz/registry.lock`` while it looks, refuses to start when a live run writes
files its own could overwrite: the same options on the same shard, or other options with
output names that overlap (``--cmap jet`` and ``--cmap gray``). The shards of one run use
the same options on different shards, so they run side by side.
"""

from __future__ import annotations

import fcntl
import fnmatch
import json
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import UsageError
from .output import refuse_link

STATE_DIR = ".hookviz"  # hidden: folder runs and the gallery skip it


@dataclass(frozen=True)
class RunClaim:
    """What a run writes: its options key, its shard (None: every input) and its output name patterns."""

    key: str
    shard: tuple[int, int] | None
    patterns: tuple[str, ...]
    run: str
    command: str

    @property
    def file_name(self) -> str:
        shard = f"{self.shard[0]}of{self.shard[1]}" if self.shard else "all"
        return f"run-{self.key}-{shard}.lock"

    def conflicts_with(self, other: dict[str, Any]) -> bool:
        """Whether the live run ``other`` (a claim as recorded) could write a file this one writes."""
        if other.get("key") == self.key:
            theirs = tuple(other["shard"]) if other.get("shard") else None
            # The same shard, or shards of different counts (whose inputs overlap), or one run over every input.
            return theirs is None or self.shard is None or theirs == self.shard or theirs[1] != self.shard[1]
        return _patterns_overlap(self.patterns, tuple(other.get("patterns") or ()))


def _patterns_overlap(ours: Sequence[str], theirs: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(a, b) or fnmatch.fnmatchcase(b, a) for a in ours for b in theirs)


@contextmanager
def claimed(out_dir: Path, claim: RunClaim) -> Iterator[None]:
    """Hold ``claim`` on ``out_dir`` for the block; a UsageError naming the other run if a live one conflicts."""
    state = out_dir / STATE_DIR
    try:
        refuse_link(state)
        state.mkdir(exist_ok=True)
        with _locked(state / "registry.lock", fcntl.LOCK_EX):
            for other in _live_claims(state, claim.file_name):
                if claim.conflicts_with(other):
                    raise UsageError(
                        f"another hookviz run is writing the same outputs in {out_dir} (run {other.get('run')}, "
                        f"pid {other.get('pid')}: hookviz {' '.join(other.get('argv') or [other.get('command', '')])}); "
                        "wait for it to finish, or choose another -o"
                    )
            mine = _open_lock(state / claim.file_name)
            if not _try_lock(mine, fcntl.LOCK_EX):  # the same claim, held by a live run
                os.close(mine)
                raise UsageError(
                    f"another hookviz run with the same options is writing in {out_dir}; "
                    "wait for it to finish, or choose another -o"
                )
            record = {
                "key": claim.key,
                "shard": claim.shard,
                "patterns": list(claim.patterns),
                "run": claim.run,
                "command": claim.command,
                "pid": os.getpid(),
                "argv": _argv(),
            }
            os.ftruncate(mine, 0)
            os.write(mine, json.dumps(record).encode("utf-8", "backslashreplace"))
    except OSError as exc:
        raise UsageError(f"cannot record the run in {state} ({exc.strerror or exc}); choose another -o") from None
    try:
        yield
    finally:
        os.close(mine)  # releases the lock; the file stays (removing it would race a run taking it)


def _argv() -> list[str]:
    import sys

    return sys.argv[1:]


def _live_claims(state: Path, mine: str) -> Iterator[dict[str, Any]]:
    """The claims of runs alive now: lock files someone else holds (a free lock is a dead run's)."""
    for path in sorted(state.glob("run-*.lock")):
        if path.name == mine:
            continue
        descriptor = _open_lock(path)
        try:
            if _try_lock(descriptor, fcntl.LOCK_SH):
                continue  # nobody holds it: a finished or killed run
            try:
                yield json.loads(path.read_text(encoding="utf-8") or "{}")
            except (OSError, ValueError):
                yield {"run": "?", "patterns": ["*"]}  # unreadable: assume the worst
        finally:
            os.close(descriptor)


def _open_lock(path: Path) -> int:
    return os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)


def _try_lock(descriptor: int, kind: int) -> bool:
    try:
        fcntl.flock(descriptor, kind | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


@contextmanager
def _locked(path: Path, kind: int) -> Iterator[None]:
    descriptor = _open_lock(path)
    try:
        fcntl.flock(descriptor, kind)
        yield
    finally:
        os.close(descriptor)
