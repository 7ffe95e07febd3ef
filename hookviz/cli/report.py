"""What a run tells its user: errors as one line and an exit code, a progress bar, per-input lines, a summary.

stdout carries only output paths or JSON Lines (for scripts); everything for
people goes to stderr.
"""

from __future__ import annotations

import functools
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import TracebackType
from typing import Any, TypeVar

import click

from ..interrupts import deliver
from ..manifest import json_line

EXIT_INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for Ctrl-C
EXIT_TERMINATED = 143  # 128 + SIGTERM


class Terminated(BaseException):
    """SIGTERM arrived (SLURM, Kubernetes and `timeout` send it first): stop as on Ctrl-C."""


F = TypeVar("F", bound=Callable[..., Any])


class _Stdout:
    """Whether the reader of stdout has gone away (``--json | head -1``)."""

    closed = False


def say(text: str | bytes) -> None:
    """One line on stdout, for scripts. Once the reader has closed the pipe, lines are dropped and the run goes
    on to the end (outputs, manifest), as well-behaved Unix tools do; the exit code is the run's own."""
    if _Stdout.closed:
        return
    try:
        click.echo(text)
    except BrokenPipeError:
        _Stdout.closed = True
        try:  # later writes and the flush at exit go nowhere instead of raising again
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError):
            pass


def fail(message: str, code: int) -> None:
    """Print ``hookviz: error: MESSAGE`` on stderr and exit with ``code``."""
    click.echo(f"hookviz: error: {message}", err=True)
    sys.exit(code)


def note(message: str) -> None:
    """One line for people on stderr."""
    click.echo(f"hookviz: {message}", err=True)


class HookvizGroup(click.Group):
    """click's own errors (an unknown option, a bad --size) in hookviz's one-line format, naming the help to read."""

    def main(
        self,
        args: Any = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        **extra: Any,
    ) -> Any:
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode, **extra)
        try:
            returned = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.exceptions.NoArgsIsHelpError as exc:  # bare `hookviz`: the help, as click shows it
            exc.show()
            sys.exit(exc.exit_code)
        except click.ClickException as exc:
            context = getattr(exc, "ctx", None)
            where = f" (see '{context.command_path} --help')" if context is not None else ""
            fail(exc.format_message().replace("\n", " ") + where, exc.exit_code)
        except click.Abort:
            note("interrupted")
            sys.exit(EXIT_INTERRUPTED)
        sys.exit(returned if isinstance(returned, int) else 0)


def reports_errors(command: F) -> F:
    """Map hookviz's errors to one line on stderr and an exit code; Ctrl-C to 130."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from ..errors import HookvizError

        try:
            with stopping_on_signals():
                return command(*args, **kwargs)
        except HookvizError as exc:
            fail(str(exc), exc.exit_code)
        except KeyboardInterrupt:
            note("interrupted")
            sys.exit(EXIT_INTERRUPTED)
        except Terminated:
            note("terminated")
            sys.exit(EXIT_TERMINATED)

    return wrapper  # type: ignore[return-value]


@contextmanager
def stopping_on_signals() -> Iterator[None]:
    """For the block, SIGINT raises KeyboardInterrupt and SIGTERM Terminated, once: later signals are ignored, so
    the stop itself (finishing the write in progress, closing the manifest, stopping workers) is not cut short
    and leaves no temporary file or traceback. The previous handlers come back after the block."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {number: signal.getsignal(number) for number in (signal.SIGINT, signal.SIGTERM)}

    stopped = []

    def stop(number: int, frame: Any) -> None:
        for each in previous:
            signal.signal(each, signal.SIG_IGN)
        stopped.append(number)
        deliver(Terminated() if number == signal.SIGTERM else KeyboardInterrupt())

    try:
        for number in previous:
            signal.signal(number, stop)
        yield
    finally:
        if not stopped:  # after a stop the process is on its way out: a second Ctrl-C must not cut that short
            for number, handler in previous.items():
                signal.signal(number, handler)


class Progress:
    """A progress bar on stderr (images done, images/s, ETA) only when stderr is a terminal and not --quiet."""

    def __init__(self, total: int, hidden: bool):
        self.total, self.hidden, self.rate = total, hidden, 0.0
        self.bar: Any = None

    def __enter__(self) -> Progress:
        stderr = sys.stderr  # (click.get_text_stream is deprecated; under CliRunner this is its stream too)
        if not self.hidden and stderr.isatty() and self.total > 1:
            self.bar = click.progressbar(
                length=self.total,
                label="hookviz",
                file=stderr,
                show_eta=True,
                show_pos=True,
                item_show_func=lambda _: f"{self.rate:.1f} images/s" if self.rate else None,
            )
            self.bar.__enter__()
        return self

    def advance(self, elapsed: float) -> None:
        if self.bar is not None:
            self.rate = (self.bar.pos + 1) / elapsed if elapsed > 0 else 0.0
            self.bar.update(1, True)

    def clear(self) -> None:
        """Erase the bar's line before other output, so lines do not mix; the next update redraws it."""
        if self.bar is not None:
            click.echo("\r\033[K", nl=False, err=True)

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, traceback: TracebackType | None
    ) -> None:
        if self.bar is not None:
            self.bar.__exit__(kind, value, traceback)


class Counts(dict[str, int]):
    """Records seen per status (ok, error, skipped), and when counting started."""

    def __init__(self) -> None:
        super().__init__(ok=0, error=0, skipped=0)
        self.started = time.perf_counter()

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.started


def report_records(
    records: Iterator[Any],
    total: int,
    *,
    quiet: bool,
    verbose: bool = False,
    as_json: bool = False,
    print_outputs: bool = True,
    fail_fast: bool = False,
) -> Counts:
    """Consume ``records`` (pipeline.Record), telling the user about each; return the counts per status.

    stdout gets each record as JSON (``as_json``) or its PNG paths (``print_outputs``);
    stderr gets failures, and with ``verbose`` one line per input. ``fail_fast`` stops at
    the first failure. ``records`` is closed at the end, also on Ctrl-C.
    """
    counts = Counts()
    with Progress(total, hidden=quiet) as progress:
        try:
            for number, record in enumerate(records, start=1):
                counts[record.status] = counts.get(record.status, 0) + 1
                progress.clear()
                if as_json:
                    say(json_line(record.as_json()))
                elif print_outputs and record.status == "ok":
                    for output in record.outputs:
                        say(os.fsencode(output["png"]))  # bytes: a name that is not UTF-8 prints as it is
                for output in record.outputs if record.status == "ok" else ():
                    if output.get("warning"):
                        click.echo(f"hookviz: warning: {output['warning']}", err=True)
                if record.status == "error":
                    click.echo(f"hookviz: error: {record.error}", err=True)
                elif verbose:
                    note(f"[{number}/{total}] {record.input}: {record.status}, {len(record.outputs)} output(s)")
                progress.advance(counts.elapsed)
                if record.status == "error" and fail_fast:
                    note("stopped at the first failure (--fail-fast)")
                    break
        finally:
            close = getattr(records, "close", None)
            if close is not None:
                close()
    return counts


def summary_line(counts: Counts, out_dir: Any) -> str:
    """``3 ok, 1 failed, 0 skipped in 2.1 s (1.9 images/s); outputs under DIR/``."""
    elapsed = counts.elapsed
    rate = f" ({counts['ok'] / elapsed:.1f} images/s)" if counts["ok"] and elapsed > 0 else ""
    return (
        f"{counts['ok']} ok, {counts['error']} failed, {counts['skipped']} skipped "
        f"in {elapsed:.1f} s{rate}; outputs under {out_dir}/"
    )
