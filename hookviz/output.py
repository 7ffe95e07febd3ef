"""Where outputs go, and writing them so that a killed run never leaves a half-written file."""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import struct
import tempfile
import threading
import time
import zlib
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import torch
from PIL import Image, PngImagePlugin

from .errors import UsageError

PNG_COMPRESS_LEVEL = 1  # zlib level 1 encodes ~5x faster than the default for a few percent more bytes
# Picture formats (--format) and their file suffixes; PNG is the default and lossless.
FILE_FORMATS = {"png": ".png", "jpg": ".jpg", "webp": ".webp"}
DEFAULT_QUALITY = 90  # --quality of JPEG and WebP
WEBP_METHOD = 2  # libwebp effort, 0 (fast) to 6: 2 encoded a 640x480 overlay 2.5x faster than the default 4, 3% larger
EXIF_DESCRIPTION, EXIF_SOFTWARE, EXIF_IFD, EXIF_USER_COMMENT = 0x010E, 0x0131, 0x8769, 0x9286
USER_COMMENT_ASCII = b"ASCII\0\0\0"  # the character-code prefix of an EXIF UserComment
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


def image_suffix(file_format: str) -> str:
    """The file suffix of a picture format: ".png", ".jpg" or ".webp"."""
    try:
        return FILE_FORMATS[file_format]
    except KeyError:
        raise UsageError(f"unknown picture format {file_format!r}; use one of {', '.join(FILE_FORMATS)}") from None


def format_of(path: Path) -> str:
    """The picture format a path's suffix names (``.jpeg`` is jpg); PNG for any other suffix."""
    suffix = path.suffix.lower()
    return "jpg" if suffix == ".jpeg" else next((f for f, s in FILE_FORMATS.items() if s == suffix), "png")


class _Clock(threading.local):
    """Seconds this thread spent encoding pictures and writing files (read by pipeline.run_job for -v)."""

    encode = 0.0
    write = 0.0


CLOCK = _Clock()


def write_png(image: Image.Image, path: Path, metadata: Mapping[str, str] | None = None) -> Path:
    """Write a PNG atomically, with text metadata (``hookviz:layer``, ...)."""
    return write_image(image, path, metadata, file_format="png")


def write_image(
    image: Image.Image,
    path: Path,
    metadata: Mapping[str, str] | None = None,
    *,
    file_format: str | None = None,
    quality: int | None = None,
) -> Path:
    """Write a picture atomically as PNG, JPEG or WebP (``file_format``; default: from the path's suffix).

    The metadata (``hookviz:layer``, ...) is PNG text chunks in a PNG; in a JPEG or WebP it is EXIF: the
    UserComment and the ImageDescription each hold it as one JSON object (``read_metadata`` reads either
    back). ``quality``: 1-100 for JPEG and WebP (default 90). The file gets the permissions ``write_png``'s
    always had (a plain ``open()`` under the umask); a failure leaves no partial file.
    """
    started = time.perf_counter()
    data = encode_image(image, file_format or format_of(path), metadata, quality)
    encoded = time.perf_counter()
    with atomic_write(path) as handle:
        handle.write(data)
    CLOCK.encode += encoded - started
    CLOCK.write += time.perf_counter() - encoded
    return path


def encode_image(
    image: Image.Image, file_format: str, metadata: Mapping[str, str] | None = None, quality: int | None = None
) -> bytes:
    """The bytes of ``image`` in ``file_format`` (png, jpg, webp) with ``metadata`` (see ``write_image``)."""
    text = {key: value.encode("utf-8", "backslashreplace").decode("utf-8") for key, value in (metadata or {}).items()}
    image_suffix(file_format)  # an unknown format is a UsageError
    if file_format == "png":
        if image.mode in _PNG_COLOUR_TYPES:
            return _png_bytes(image, text)
        info = PngImagePlugin.PngInfo()
        for key, value in text.items():
            info.add_text(key, value)
        buffer = io.BytesIO()
        image.save(buffer, format="PNG", pnginfo=info, compress_level=PNG_COMPRESS_LEVEL)
        return buffer.getvalue()
    if quality is not None and not 1 <= quality <= 100:
        raise UsageError(f"--quality {quality} is out of range; use 1 to 100")
    if image.mode not in ("RGB", "L"):
        image = image.convert("RGB")  # JPEG has no alpha; the pictures hookviz draws are opaque
    buffer = io.BytesIO()
    options: dict[str, Any] = {"quality": quality or DEFAULT_QUALITY, "exif": _exif_bytes(text)}
    if file_format == "webp":
        options["method"] = WEBP_METHOD
    image.save(buffer, format="JPEG" if file_format == "jpg" else "WEBP", **options)
    return buffer.getvalue()


def _exif_bytes(text: Mapping[str, str]) -> bytes:
    exif = Image.Exif()
    described = json.dumps(dict(text), ensure_ascii=True, separators=(",", ":"))  # ASCII: EXIF strings are
    exif[EXIF_DESCRIPTION] = described
    exif[EXIF_SOFTWARE] = "hookviz"
    exif.get_ifd(EXIF_IFD)[EXIF_USER_COMMENT] = USER_COMMENT_ASCII + described.encode("ascii")
    return exif.tobytes()


def read_metadata(path: Path | str) -> dict[str, str]:
    """The hookviz metadata of a picture written by ``write_image``: PNG text, or the JSON in JPEG/WebP EXIF."""
    with Image.open(path) as image:
        if image.format == "PNG":
            return {str(key): str(value) for key, value in image.text.items()}
        exif = image.getexif()
        comment = exif.get_ifd(EXIF_IFD).get(EXIF_USER_COMMENT)
        if isinstance(comment, bytes) and comment.startswith(USER_COMMENT_ASCII):
            text = comment[len(USER_COMMENT_ASCII) :].decode("ascii", "replace")
        else:
            text = str(exif.get(EXIF_DESCRIPTION) or "{}")
    try:
        found = json.loads(text)
    except ValueError:
        return {}
    return {str(key): str(value) for key, value in found.items()} if isinstance(found, dict) else {}


# PNG written here rather than by Pillow: Pillow tries all five row filters on every row, which took as long as
# the compression itself. Every row gets the "up" filter (a difference with the row above, one numpy pass), and
# zlib's run-length strategy at level 1 compresses it to about the size Pillow's level 1 gave, 2-3x faster;
# zlib releases the GIL, so several writer threads encode at once.
_PNG_COLOUR_TYPES = {"L": (0, 1), "RGB": (2, 3), "RGBA": (6, 4)}
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_UP = 2


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png_bytes(image: Image.Image, text: Mapping[str, str]) -> bytes:
    import numpy

    colour_type, channels = _PNG_COLOUR_TYPES[image.mode]
    width, height = image.size
    rows = numpy.asarray(image, dtype=numpy.uint8).reshape(height, width * channels)
    filtered = numpy.empty((height, width * channels + 1), dtype=numpy.uint8)
    filtered[:, 0] = _PNG_UP
    filtered[0, 1:] = rows[0]  # the first row's "row above" is zeros
    numpy.subtract(rows[1:], rows[:-1], out=filtered[1:, 1:])  # modulo 256, as PNG defines it
    compressor = zlib.compressobj(PNG_COMPRESS_LEVEL, zlib.DEFLATED, 15, 8, zlib.Z_RLE)
    idat = compressor.compress(filtered.data) + compressor.flush()
    parts = [_PNG_SIGNATURE, _png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, colour_type, 0, 0, 0))]
    for key, value in text.items():
        name = key.encode("latin-1", "replace")[:79]
        try:  # as Pillow's PngInfo.add_text: Latin-1 text as tEXt, anything else as UTF-8 iTXt
            parts.append(_png_chunk(b"tEXt", name + b"\0" + value.encode("latin-1")))
        except UnicodeEncodeError:
            parts.append(_png_chunk(b"iTXt", name + b"\0\0\0\0\0" + value.encode("utf-8")))
    parts += [_png_chunk(b"IDAT", idat), _png_chunk(b"IEND", b"")]
    return b"".join(parts)


def write_npy(array: torch.Tensor, path: Path) -> Path:
    """Write a tensor as float32 .npy atomically."""
    import numpy

    with atomic_write(path) as handle:
        numpy.save(handle, array.detach().float().cpu().numpy())
    return path
