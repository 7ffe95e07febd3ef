"""Where outputs go, and writing them so that a killed run never leaves a half-written file."""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import torch
from PIL import Image, PngImagePlugin

from .errors import UsageError

PNG_COMPRESS_LEVEL = 1  # zlib level 1 encodes ~5x faster than the default for a few percent more bytes
TEMPORARY_SUFFIX = ".tmp"  # files are written as .<name>.<random>.tmp, then renamed
_UNSAFE = re.compile(r"[^A-Za-z0-9._+-]+")


def safe_name(text: str, limit: int = 120) -> str:
    """A file-name part made of safe characters only (no separators, no leading dots)."""
    cleaned = _UNSAFE.sub("_", text).lstrip(".") or "_"
    return cleaned[:limit]


def output_stems(paths: Sequence[Path]) -> dict[Path, str]:
    """A directory name per input: its stem, plus a short hash of the path where stems collide.

    Computed over the whole input list, so two inputs never share a directory.
    """
    return dict(
        zip(paths, _unique([safe_name(path.stem) for path in paths], [str(path) for path in paths]), strict=True)
    )


def layer_file_names(layers: Sequence[str]) -> dict[str, str]:
    """A file-name part per layer name; ``stem/conv`` and ``stem_conv`` sanitize alike, so they get a hash suffix."""
    return dict(zip(layers, _unique([safe_name(layer) for layer in layers], list(layers)), strict=True))


def _unique(names: list[str], sources: list[str]) -> list[str]:
    counts: dict[str, int] = {}
    for name in names:
        counts[name] = counts.get(name, 0) + 1
    return [
        name if counts[name] == 1 else f"{name}-{hashlib.sha1(source.encode()).hexdigest()[:8]}"
        for name, source in zip(names, sources, strict=True)
    ]


def prepare_output_dir(directory: Path) -> Path:
    """Create ``directory`` if needed; a UsageError naming ``-o`` if it cannot be created or written."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(
            f"cannot create output directory {directory} ({exc.strerror}); choose another with -o"
        ) from None
    if not os.access(directory, os.W_OK):
        raise UsageError(f"output directory {directory} is not writable; choose another with -o")
    return directory


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# Read once, at import (before any writer thread exists): os.umask can only be read by setting it.
UMASK = _current_umask()


@contextmanager
def atomic_write(path: Path, mode: str = "wb", encoding: str | None = None) -> Iterator[IO[Any]]:
    """Write ``path`` through a temporary file in the same folder, renamed into place when the block ends.

    A killed run leaves either the old file or the new one, never half of one; an
    error in the block removes the temporary. The file ends with the permissions a
    plain ``open()`` would give it under the current umask (temporary files are 0600).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    # Not a `with`: the file must outlive its handle, to be renamed or removed below.
    handle = tempfile.NamedTemporaryFile(  # noqa: SIM115
        mode,
        encoding=encoding,
        dir=path.parent,
        prefix=f".{path.name}.",
        suffix=TEMPORARY_SUFFIX,
        delete=False,
    )
    try:
        with handle:
            yield handle
        os.chmod(handle.name, 0o666 & ~UMASK)
        os.replace(handle.name, path)
    except BaseException:
        Path(handle.name).unlink(missing_ok=True)
        raise


def write_png(image: Image.Image, path: Path, metadata: Mapping[str, str] | None = None) -> Path:
    """Write a PNG atomically, with text metadata (``hookviz:layer``, ...)."""
    info = PngImagePlugin.PngInfo()
    for key, value in (metadata or {}).items():
        info.add_text(key, value)
    with atomic_write(path) as handle:
        image.save(handle, format="PNG", pnginfo=info, compress_level=PNG_COMPRESS_LEVEL)
    return path


def write_npy(array: torch.Tensor, path: Path) -> Path:
    """Write a tensor as float32 .npy atomically."""
    import numpy

    with atomic_write(path) as handle:
        numpy.save(handle, array.detach().float().cpu().numpy())
    return path
