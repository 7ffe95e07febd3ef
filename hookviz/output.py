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
# Letters and digits of any script stay (a folder named 猫 for 猫.png); separators, spaces and control characters go.
_UNSAFE = re.compile(r"[^\w.+-]+")


def safe_name(text: str, limit: int = 120) -> str:
    """A file-name part made of safe characters only (no separators, no leading dots), at most ``limit`` bytes
    in UTF-8 (file systems count bytes: 120 CJK characters would be 360)."""
    cleaned = _UNSAFE.sub("_", text).lstrip(".") or "_"
    while len(cleaned.encode("utf-8")) > limit:
        cleaned = cleaned[:-1]
    return cleaned


# Joins a name and its disambiguating hash. safe_name never produces it, so a plain name (even a crafted
# "cat~1863a7f7.jpg", whose "~" becomes "_") can never equal a disambiguated one.
DISAMBIGUATOR = "~"


def input_identity(path: Path | str) -> str:
    """What makes two inputs the same file across runs: its absolute path with links resolved."""
    return os.path.realpath(path)


def output_stems(
    paths: Sequence[Path], owned: Mapping[str, str] | None = None, identities: Mapping[Path, str] | None = None
) -> dict[Path, str]:
    """A folder name per input, stable across runs into one output directory and never shared by two inputs.

    ``owned`` maps folder names to the identity (``input_identity``) of the input that wrote
    them in earlier runs (``Manifest.folder_owners``). An input keeps a folder it owns; else it
    gets its file stem when no other input, in this run or an earlier one, has that stem; else
    ``stem~hash`` of its identity. Computed over the whole input list, so every shard of a run
    names each input's folder the same way. ``identities``: ``input_identity`` of every path, when known already.
    """
    owned = dict(owned or {})
    if identities is None:
        identities = {path: input_identity(path) for path in paths}
    stems = {path: safe_name(path.stem) for path in paths}
    sharing: dict[str, set[str]] = {}
    for path in paths:
        sharing.setdefault(stems[path], set()).add(identities[path])
    folder_of = {identity: folder for folder, identity in owned.items()}
    taken = set(owned)
    chosen: dict[str, str] = {}
    for identity in sorted(set(identities.values())):  # sorted: the same names whatever order the inputs came in
        if identity in folder_of:
            chosen[identity] = folder_of[identity]
    for path in sorted(paths, key=lambda p: identities[p]):
        identity, stem = identities[path], stems[path]
        if identity in chosen:
            continue
        if len(sharing[stem]) == 1 and stem not in taken:
            name = stem
        else:
            name = _disambiguated(stem, identity, taken)
        chosen[identity] = name
        taken.add(name)
    return {path: chosen[identities[path]] for path in paths}


def _disambiguated(name: str, source: str, taken: set[str]) -> str:
    digest = hashlib.sha1(source.encode("utf-8", "surrogateescape")).hexdigest()
    for length in (8, 16, len(digest)):
        candidate = f"{name}{DISAMBIGUATOR}{digest[:length]}"
        if candidate not in taken:
            return candidate
    raise ValueError(f"no free name for {source!r}")  # a SHA-1 collision


def layer_file_names(layers: Sequence[str]) -> dict[str, str]:
    """A file-name part per layer name; ``stem/conv`` and ``stem_conv`` sanitize alike, so they get a hash suffix."""
    names = {layer: safe_name(layer) for layer in layers}
    counts: dict[str, int] = {}
    for name in names.values():
        counts[name] = counts.get(name, 0) + 1
    taken = {name for name, count in counts.items() if count == 1}
    result = {}
    for layer in layers:
        name = names[layer]
        result[layer] = name if counts[name] == 1 else _disambiguated(name, layer, taken)
        taken.add(result[layer])
    return result


def refuse_link(path: Path) -> None:
    """Outputs never leave -o: a symbolic link inside it (a folder, the manifest, the run state) is refused,
    never written through."""
    if path.is_symlink():
        raise UsageError(
            f"{path} is a symbolic link; hookviz does not write through links inside -o "
            "(remove it, or choose another -o)"
        )


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
        # A file name that is not UTF-8 (lone surrogates from os.fsdecode) is kept as \udcXX escapes.
        info.add_text(key, value.encode("utf-8", "backslashreplace").decode("utf-8"))
    with atomic_write(path) as handle:
        image.save(handle, format="PNG", pnginfo=info, compress_level=PNG_COMPRESS_LEVEL)
    return path


def write_npy(array: torch.Tensor, path: Path) -> Path:
    """Write a tensor as float32 .npy atomically."""
    import numpy

    with atomic_write(path) as handle:
        numpy.save(handle, array.detach().float().cpu().numpy())
    return path
