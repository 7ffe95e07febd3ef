"""The two kinds of failure hookviz reports, the exit code each maps to, and the hints they carry.

Library code raises these with a one-line message that names the problem and
the fix; the CLI prints the message (never a traceback) and exits with the code.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class HookvizError(Exception):
    """Base class: a failure the user can act on. Exit code 1."""

    exit_code = 1


class UsageError(HookvizError):
    """The run cannot start: bad option, unknown layer, unloadable model. Exit code 2."""

    exit_code = 2


class InputError(HookvizError):
    """One input (an image) failed; the others still run. Exit code 1 at the end."""

    exit_code = 1


def close_matches(word: str, choices: Iterable[str], *, cutoff: float = 0.6, fold_case: bool = False) -> list[str]:
    """Up to three ``choices`` that look like ``word``, best first (case-insensitive with ``fold_case``)."""
    choices = list(choices)
    if not fold_case:
        return difflib.get_close_matches(word, choices, n=3, cutoff=cutoff)
    folded = {choice.lower(): choice for choice in reversed(choices)}  # the first spelling of each folded name wins
    return [folded[match] for match in difflib.get_close_matches(word.lower(), list(folded), n=3, cutoff=cutoff)]


def did_you_mean(
    word: str, choices: Iterable[str], *, cutoff: float = 0.6, fold_case: bool = False, quote: bool = False
) -> str:
    """``"; did you mean a, b?"`` for the close matches of ``word`` (``repr``-quoted with ``quote``), or ``""``."""
    matches = close_matches(word, choices, cutoff=cutoff, fold_case=fold_case)
    if not matches:
        return ""
    return f"; did you mean {', '.join(repr(m) if quote else m for m in matches)}?"


def shown(path: object) -> str:
    """A path (or any name) for a one-line message: newlines, other control characters and bytes that are not
    UTF-8 (lone surrogates from os.fsdecode) are escaped as Python would write them."""
    return "".join(char if char.isprintable() else repr(char)[1:-1] for char in str(path))
