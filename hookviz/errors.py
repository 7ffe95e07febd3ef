"""The two kinds of failure hookviz reports, and the exit code each maps to.

Library code raises these with a one-line message that names the problem and
the fix; the CLI prints the message (never a traceback) and exits with the code.
"""


class HookvizError(Exception):
    """Base class: a failure the user can act on. Exit code 1."""

    exit_code = 1


class UsageError(HookvizError):
    """The run cannot start: bad option, unknown layer, unloadable model. Exit code 2."""

    exit_code = 2


class InputError(HookvizError):
    """One input (an image) failed; the others still run. Exit code 1 at the end."""

    exit_code = 1
