"""``DIR/manifest.jsonl``: what every run into an output folder did, one JSON line at a time.

One header line per run (versions, model, options) and then one line per
finished input, appended as each finishes with a single ``write`` under a file
lock, so a killed run and parallel shards writing to the same directory leave a
valid file. ``completed`` reads it back for ``--skip-existing``: an input is done
when a run with the same options recorded it ``ok`` and its files exist.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import math
import os
import platform
from collections.abc import Iterable, Iterator
from dataclasses import asdict
from importlib import metadata
from pathlib import Path
from typing import Any

from .errors import HookvizError, UsageError

MANIFEST_NAME = "manifest.jsonl"
DONE = ("ok", "skipped")


def versions() -> dict[str, str]:
    """Python's, hookviz's, torch's and torchvision's versions, for the run header."""
    found = {"python": platform.python_version()}
    for package in ("hookviz", "torch", "torchvision"):
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            found[package] = "not installed"
    return found


class Manifest:
    """``DIR/manifest.jsonl``: append-only JSON Lines, safe to share between processes."""

    def __init__(self, directory: Path):
        self.path = directory / MANIFEST_NAME

    def append(self, entry: dict[str, Any]) -> None:
        """Append ``entry`` as one line; a HookvizError (exit 1) naming the file if it cannot be written."""
        line = (json_line(entry) + "\n").encode("utf-8")
        try:
            # O_NOFOLLOW: a symbolic link planted at DIR/manifest.jsonl must not redirect the appends.
            descriptor = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o644)
            try:
                fcntl.flock(descriptor, fcntl.LOCK_EX)  # parallel shards append whole lines, never interleaved bytes
                os.write(descriptor, line)
            finally:
                os.close(descriptor)  # closing releases the lock
        except OSError as exc:
            if self.path.is_symlink():
                problem = "a symbolic link, which hookviz does not write through; remove it or choose another -o"
            elif self.path.is_dir():
                problem = "a directory; remove it or choose another -o"
            elif exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
                problem = f"{exc.strerror}; free some space or choose another -o"
            else:
                problem = f"{exc.strerror or exc}; choose another -o"
            raise HookvizError(f"cannot write {self.path}: {problem}") from None

    def entries(self) -> Iterator[dict[str, Any]]:
        """Every readable line; a line cut short by a full disk is ignored."""
        try:
            with self.path.open(encoding="utf-8", errors="replace") as stream:
                for line in stream:
                    try:
                        entry = json.loads(line)
                    except json.JSONDecodeError:
                        continue
                    if isinstance(entry, dict):
                        yield entry
        except FileNotFoundError:
            return
        except OSError as exc:
            problem = "a directory" if self.path.is_dir() else exc.strerror or str(exc)
            raise UsageError(f"cannot read {self.path} ({problem}); remove it or choose another -o") from None

    def completed(self, key: str, entries: Iterable[dict[str, Any]] | None = None) -> dict[str, dict[str, Any]]:
        """Inputs (by identity, see output.input_identity) that a run with these options finished, whose output
        files all still exist, in the folder the input owns. ``entries``: ``input_entries()`` read already."""
        done: dict[str, dict[str, Any]] = {}
        for entry in self.input_entries() if entries is None else entries:
            if entry["key"] != key:
                continue
            if entry.get("status") in DONE and _outputs_exist(entry.get("outputs", [])):
                done[entry["identity"]] = entry
            elif entry.get("status") == "error":
                done.pop(entry["identity"], None)
        return done

    def folder_owners(self, entries: Iterable[dict[str, Any]] | None = None) -> dict[str, str]:
        """Output folder name -> identity of the input whose outputs it holds, from every run recorded.
        ``entries``: ``input_entries()`` read already."""
        owners: dict[str, str] = {}
        for entry in self.input_entries() if entries is None else entries:
            if entry.get("status") in DONE and entry.get("folder"):
                owners.setdefault(entry["folder"], entry["identity"])
        return owners

    def input_entries(self) -> Iterator[dict[str, Any]]:
        """Every input record, with its run's ``key`` and its ``identity`` and ``folder`` filled in.

        Records of older versions lack identity and folder: the identity is then the recorded
        path resolved now, and the folder the one holding its outputs.
        """
        keys: dict[Any, Any] = {}
        for entry in self.entries():
            if entry.get("type") == "run":
                keys[entry.get("run")] = entry.get("key")
            elif entry.get("type") == "input" and isinstance(entry.get("input"), str):
                entry.setdefault("key", keys.get(entry.get("run")))
                if not entry.get("identity"):
                    entry["identity"] = os.path.realpath(entry["input"])
                if not entry.get("folder"):
                    outputs = entry.get("outputs") or []
                    pngs = [Path(o["png"]).parent.name for o in outputs if isinstance(o, dict) and o.get("png")]
                    entry["folder"] = pngs[0] if pngs else None
                yield entry


def json_line(entry: Any) -> str:
    """``entry`` as one line of strict JSON.

    Non-finite floats become null (strict parsers reject NaN); file names that are not
    UTF-8 (bytes os.fsdecode kept as lone surrogates) become ``\\udcXX`` escapes, which
    ``json.loads`` turns back into the same name.
    """
    text = json.dumps(_finite(entry), ensure_ascii=False, allow_nan=False)
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _finite(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(item) for item in value]
    return value


def _outputs_exist(outputs: list[dict[str, Any]]) -> bool:
    return all(Path(output[key]).is_file() for output in outputs for key in ("png", "raw") if key in output)


def options_key(command: str, model: str, preprocessing: Any, crop: bool, settings: dict[str, Any]) -> str:
    """A hash of everything that decides a command's output files (not batch size, workers or paths)."""
    decided_by = {
        "command": command,
        "model": model,
        "preprocessing": jsonable(preprocessing),
        "crop": crop,
        "settings": settings,
    }
    return hashlib.sha256(json.dumps(decided_by, sort_keys=True, default=str).encode()).hexdigest()[:16]


def jsonable(value: Any) -> Any:
    """A dataclass as plain JSON values (tuples become lists, other objects their text)."""
    return json.loads(json.dumps(asdict(value), default=str))
