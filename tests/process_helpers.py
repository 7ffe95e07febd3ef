"""Helpers for tests that run hookviz as a real process: a kill, a Ctrl-C or a terminal on stderr cannot be faked
in-process.

Every subprocess imports the same hookviz as the tests (a worktree given with PYTHONPATH, or the installed
package) and can import ``nets`` (tests/nets.py), so ``hookviz gradcam nets:build_batchnet ...`` works there.

A run to be stopped mid-way is made to hang, not to be slow: with ``hang_after=N`` the model's forward
passes after the N-th never return (``HV_BATCHNET_HANG_AFTER``, see nets.BatchNet), so the run is still
running when the test signals it, on a fast machine as on a busy one.
"""

from __future__ import annotations

import json
import os
import pty
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import hookviz

TESTS = Path(__file__).resolve().parent
HOOKVIZ_ROOT = Path(hookviz.__file__).resolve().parent.parent  # the folder the hookviz under test is imported from


def pythonpath() -> str:
    """PYTHONPATH for a subprocess: the hookviz under test first, then tests/ (for ``nets``), then the caller's own."""
    entries = [str(HOOKVIZ_ROOT), str(TESTS), *os.environ.get("PYTHONPATH", "").split(os.pathsep)]
    return os.pathsep.join(dict.fromkeys(entry for entry in entries if entry))


def subprocess_env(hang_after: int | None = None) -> dict[str, str]:
    """The environment for a hookviz subprocess; ``hang_after=N`` makes nets.BatchNet hang after N forward passes."""
    env = {**os.environ, "PYTHONPATH": pythonpath(), "OMP_NUM_THREADS": "1"}
    env.pop("HV_BATCHNET_HANG_AFTER", None)
    if hang_after is not None:
        env["HV_BATCHNET_HANG_AFTER"] = str(hang_after)
    return env


def hookviz_command() -> list[str]:
    """The installed ``hookviz`` script of this venv (``python -m hookviz`` where there is none)."""
    script = Path(sys.executable).with_name("hookviz")
    return [str(script)] if script.exists() else [sys.executable, "-m", "hookviz"]


@contextmanager
def running(cwd: Path, args: list, log: Path, hang_after: int | None = None) -> Iterator[subprocess.Popen]:
    """``hookviz ARGS`` running in its own process group (stdout to log.out, stderr to log.err);
    the group is killed on the way out if it is still running."""
    with open(log.with_suffix(".out"), "wb") as stdout, open(log.with_suffix(".err"), "wb") as stderr:
        process = subprocess.Popen(
            [*hookviz_command(), *map(str, args)],
            cwd=cwd,
            env=subprocess_env(hang_after),
            stdin=subprocess.DEVNULL,
            stdout=stdout,
            stderr=stderr,
            start_new_session=True,
        )
    try:
        yield process
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def wait_for_records(process: subprocess.Popen, out: Path, count: int, timeout: float = 300) -> None:
    """Poll DIR/manifest.jsonl until it has ``count`` input records (the run is under way).

    ``timeout`` only bounds a broken run: a run made to hang after enough records never reaches it.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, "the run finished before it could be stopped mid-way"
        manifest = out / "manifest.jsonl"
        if manifest.exists():
            lines = manifest.read_text(encoding="utf-8").splitlines(keepends=True)
            if sum(line.endswith("\n") and json.loads(line)["type"] == "input" for line in lines) >= count:
                return
        time.sleep(0.02)
    raise AssertionError(f"no {count} records in {out / 'manifest.jsonl'} after {timeout} s")


def stop(process: subprocess.Popen, sig: int) -> int:
    """Send ``sig`` to the run's process group (as a terminal's Ctrl-C does) and return its exit status."""
    os.killpg(process.pid, sig)
    return process.wait(timeout=120)


def run_with_stderr(cwd: Path, args: list, terminal: bool) -> tuple[int, str, str]:
    """Run ``hookviz ARGS`` with stderr on a pseudo-terminal (or a pipe): (exit code, stdout, stderr)."""
    command = [*hookviz_command(), *map(str, args)]
    if not terminal:
        completed = subprocess.run(command, cwd=cwd, env=subprocess_env(), capture_output=True, text=True, timeout=300)
        return completed.returncode, completed.stdout, completed.stderr
    master, slave = pty.openpty()
    process = subprocess.Popen(
        command, cwd=cwd, env=subprocess_env(), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=slave
    )
    os.close(slave)
    chunks, deadline = [], time.monotonic() + 300
    try:
        while time.monotonic() < deadline:
            if not select.select([master], [], [], 1)[0]:
                continue
            try:
                data = os.read(master, 4096)
            except OSError:  # EIO: the process closed its end of the terminal
                break
            if not data:
                break
            chunks.append(data)
    finally:
        os.close(master)
        if process.poll() is None and time.monotonic() >= deadline:
            process.kill()
    stdout = process.stdout.read().decode()
    process.stdout.close()
    return process.wait(timeout=60), stdout, b"".join(chunks).decode(errors="replace")
