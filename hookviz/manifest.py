"""``DIR/manifest.jsonl``: what every run into an output folder did, one JSON line at a time.

One header line per run (versions, model, options) and then one line per
finished input, appended as each finishes with a single ``write`` under a file
lock, so a killed run and parallel shards writing to the same directory leave a
valid file. ``completed`` reads it back for ``--skip-existing``: an input is done
when a run with the same options recorded it ``ok`` and its files exist.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import platform
from collections.abc import Iterator
from dataclasses import asdict
from importlib import metadata
from pathlib import Path
from typing import Any

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
        line = (json.dumps(entry, ensure_ascii=False) + "\n").encode()
        descriptor = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX)  # parallel shards append whole lines, never interleaved bytes
            os.write(descriptor, line)
        finally:
            os.close(descriptor)  # closing releases the lock

    def entries(self) -> Iterator[dict[str, Any]]:
        """Every readable line; a line cut short by a full disk is ignored."""
        try:
            with self.path.open(encoding="utf-8") as stream:
                for line in stream:
                    try:
                        entry = json.loads(line)
                    except json.JSONDecodeError:
                        continue
                    if isinstance(entry, dict):
                        yield entry
        except FileNotFoundError:
            return

    def completed(self, key: str) -> dict[str, dict[str, Any]]:
        """Inputs that a run with these options finished, whose output files all still exist."""
        runs: set[Any] = set()
        done: dict[str, dict[str, Any]] = {}
        for entry in self.entries():
            if entry.get("type") == "run" and entry.get("key") == key:
                runs.add(entry.get("run"))
            elif entry.get("type") == "input" and entry.get("run") in runs:
                if entry.get("status") in DONE and _outputs_exist(entry.get("outputs", [])):
                    done[entry["input"]] = entry
                elif entry.get("status") == "error":
                    done.pop(entry["input"], None)
        return done


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
