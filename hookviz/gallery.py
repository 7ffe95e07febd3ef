"""``--html``: ``DIR/index.html``, a self-contained gallery of the inputs and outputs of the runs into DIR.

One card per input: the original image and every output (overlay or feature-map grid) with its
caption (label, score, method, layer), and failed inputs with their error; the header lists every
run recorded in DIR (command, model, method and layers, when it started, what it did). The page has
no network dependencies (inline CSS, a few lines of inline JS, relative links only).

Pictures on the page are small PNG thumbnails (at most ``THUMBNAIL_SIZE`` px on the long side) in
``DIR/.thumbs/``, each a link to its full-size file: ``.thumbs/<folder>/<output>.png`` for an output
larger than that (smaller ones are shown as they are), ``.thumbs/<folder>/_original.png`` for every
input's original (EXIF orientation applied; ``<folder>`` is the one the input owns in DIR). So the
folder can be moved, copied, zipped or served as is: the originals still show from their copies,
only the links to the full-size originals (back where the inputs were) may break. A thumbnail is made
again only when it is missing or older than its file, so rebuilding the page of thousands of inputs
after every run stays quick; a file that cannot be read is marked missing on the page, never an
error. ``.thumbs`` is hidden, so a folder run over DIR skips it. Images are loaded lazily with
explicit dimensions, so a page of thousands of inputs opens at once and does not jump about.

``gallery_from_manifest(DIR)`` builds it from ``DIR/manifest.jsonl``: each input's latest record
of each kind of run, so a resumed or sharded run shows every input once, and an fmaps run and a
gradcam run into one folder both show their pictures.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from html import escape
from pathlib import Path
from typing import Any
from urllib.parse import quote

from PIL import Image

from .manifest import Manifest
from .output import DISAMBIGUATOR, atomic_write, safe_name, write_png

GALLERY_NAME = "index.html"
# Image types every current browser shows; other inputs (TIFF, ...) are shown from their thumbnail, or linked.
BROWSER_IMAGE_TYPES = {".png", ".jpg", ".jpeg", ".jpe", ".jfif", ".gif", ".webp", ".bmp", ".avif", ".ico", ".svg"}
FALLBACK_SIZE = (256, 256)  # width/height attributes when a file cannot be read (the browser still reserves room)
MAX_PREDICTIONS = 3
RUNS_SHOWN = 8  # the header's table of runs shows the newest ones; earlier runs fold under a <details>

THUMBNAILS = ".thumbs"  # DIR/.thumbs/: hidden, so folder runs over DIR skip it
THUMBNAIL_SIZE = 256  # px on the long side: sharp in a 128 px high box on a 2x screen
ORIGINAL_THUMBNAIL = "_original.png"  # in DIR/.thumbs/<folder>/; outputs start with their method, never "_"
THUMBNAIL_OF = "hookviz:thumbnail-of"  # PNG text in a thumbnail: what it was made from
SOURCE_SIZE = "hookviz:source-size"  # PNG text in a thumbnail: the full-size picture's WxH, as a browser shows it
_ORIENTATION = {  # EXIF orientation -> the transpose that shows the picture upright (as ImageOps.exif_transpose)
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def write_gallery(
    out_dir: Path,
    records: Iterable[Mapping[str, Any]],
    header: Mapping[str, Any] | None = None,
    title: str = "hookviz",
    runs: Sequence[Mapping[str, Any]] | None = None,
) -> Path:
    """Write ``out_dir/index.html`` (atomically) for ``records`` (``Record.as_json()`` dicts) and return its path.

    ``runs`` are the manifest run headers (model, command, settings, started, ...) of the runs the
    records come from, oldest first, each optionally with ``recorded``: its inputs counted by status;
    without them, ``header`` is the one run. They fill the page's header. Thumbnails are written to
    ``out_dir/.thumbs/`` as needed (see the module's docstring).
    """
    out_dir = Path(out_dir)
    pictures = _Pictures(out_dir)
    records = [record for record in records if isinstance(record, Mapping) and "input" in record]
    shown = [pictures.plan(record) for record in records]
    pictures.make(wanted for card in shown for picture in card.pictures() if (wanted := picture.wanted))
    cards = [
        _card(number, record, card, pictures) for number, (record, card) in enumerate(zip(records, shown, strict=True))
    ]
    listed = list(runs) if runs is not None else ([header] if header else [])
    page = _PAGE.format(
        title=escape(title),
        style=_STYLE,
        script=_SCRIPT,
        summary=_summary(records, listed, title) + _evaluation(out_dir),
        failures=_failures(records) + _filters(records),
        cards="\n".join(cards) if cards else '<p class="empty">No inputs recorded yet.</p>',
    )
    path = out_dir / GALLERY_NAME
    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_write(path, "w", encoding="utf-8") as handle:
        handle.write(_text(page))  # a file name that is not UTF-8 reads as \udcXX escapes
    return path


def gallery_from_manifest(out_dir: Path) -> Path:
    """``out_dir/index.html`` from ``out_dir/manifest.jsonl``, with every run in its header.

    Per input, the latest record of each kind of run (runs with the same options
    share a key), so a resumed or sharded run shows each input once, and an fmaps
    run and a gradcam run into the same folder both show their pictures.
    """
    out_dir = Path(out_dir)
    runs: dict[Any, dict[str, Any]] = {}  # run id -> its header, with its inputs counted by status ("recorded")
    latest: dict[str, dict[Any, dict[str, Any]]] = {}
    for entry in Manifest(out_dir).entries():
        if entry.get("type") == "run":
            runs.pop(entry.get("run"), None)
            runs[entry.get("run")] = {**entry, "recorded": {}}
        elif entry.get("type") == "input" and isinstance(entry.get("input"), str):
            run = runs.get(entry.get("run"))
            if run is not None:
                status = str(entry.get("status") or "ok")
                run["recorded"][status] = run["recorded"].get(status, 0) + 1
            by_key = latest.setdefault(entry["input"], {})
            key = run.get("key") if run is not None else None
            by_key.pop(key, None)  # re-insert: the last item is the input's most recent record
            by_key[key] = entry
    records = [_merged(latest[name]) for name in sorted(latest)]  # folder order, however shards interleaved their lines
    listed = list(runs.values())
    return write_gallery(out_dir, records, listed[-1] if listed else None, title=_default_title(listed), runs=listed)


def _merged(by_key: dict[Any, dict[str, Any]]) -> dict[str, Any]:
    """The most recent record, showing the outputs of every kind of run that succeeded on the input."""
    records = list(by_key.values())
    merged = dict(records[-1])
    merged["outputs"] = [
        output
        for record in records
        if record.get("status") in ("ok", "skipped")
        for output in record.get("outputs", [])
    ]
    if not merged.get("predictions"):
        merged["predictions"] = next((r["predictions"] for r in reversed(records) if r.get("predictions")), None)
    return merged


def _default_title(runs: Sequence[Mapping[str, Any]]) -> str:
    """``hookviz gradcam``; ``hookviz fmaps + gradcam`` for a folder of both."""
    commands = list(dict.fromkeys(str(run["command"]) for run in runs if run.get("command")))
    return f"hookviz {' + '.join(commands)}" if commands else "hookviz"


# ---------------------------------------------------------------------------------------------- pictures


@dataclass(frozen=True)
class _Wanted:
    """A thumbnail a picture on the page wants."""

    source: Path  # the full-size file
    thumb: Path  # where its thumbnail goes, in DIR/.thumbs/
    url: str  # the thumbnail's link, relative to DIR
    key: str  # what the thumbnail is made from, kept in it (THUMBNAIL_OF): a file's path, relative to DIR inside it
    portable: bool  # an original: its thumbnail stands in for it when the file is out of reach (DIR moved)


@dataclass(frozen=True)
class _Thumb:
    """A thumbnail ready to show (or a file small enough to be its own thumbnail)."""

    width: int
    height: int
    source_size: tuple[int, int] | None  # the full-size picture's, as a browser shows it
    key: str | None = None
    direct: bool = False  # the file itself, no thumbnail


@dataclass(frozen=True)
class _Shown:
    """A picture on a card: the full-size file it links to, and the thumbnail it wants (if any)."""

    href: str  # the full-size file, relative to DIR (a file:// URI where no relative path exists)
    local: Path
    wanted: _Wanted | None


@dataclass
class _CardPictures:
    original: _Shown | None
    outputs: list[tuple[Mapping[str, Any], _Shown]] = field(default_factory=list)

    def pictures(self) -> list[_Shown]:
        return ([self.original] if self.original else []) + [shown for _, shown in self.outputs]


class _Pictures:
    """Links relative to the gallery's folder, for files recorded relative to the run's working directory, and
    the thumbnails in DIR/.thumbs/ that the page shows in their place."""

    def __init__(self, out_dir: Path):
        self.out_dir = Path(out_dir)
        self.base = os.path.abspath(out_dir)
        self.thumbs: dict[tuple[Path, str], _Thumb | None] = {}  # by (path, key): ready, or None (nothing to show)
        self.owners: dict[Path, str] = {}  # thumbnail path -> the key of the first picture that wanted it

    def plan(self, record: Mapping[str, Any]) -> _CardPictures:
        """The pictures of ``record``'s card (no original for a failed input: it is often no picture at all)."""
        recorded_outputs = record.get("outputs")
        outputs: list[Any] = recorded_outputs if isinstance(recorded_outputs, list) else []
        return _CardPictures(
            self.original(record) if record.get("status") != "error" else None,
            [
                (output, self.output(str(output["png"])))
                for output in outputs
                if isinstance(output, Mapping) and output.get("png")
            ],
        )

    def input(self, record: Mapping[str, Any]) -> tuple[str, Path]:
        """(href, local path) of an input, found by its identity (its absolute path) where recorded: a path
        recorded relative to an earlier run's working directory may not lead to it from this one's."""
        identity = record.get("identity")
        return self.file(
            identity if isinstance(identity, str) and os.path.isabs(identity) else str(record.get("input"))
        )

    def original(self, record: Mapping[str, Any]) -> _Shown:
        """An input's original; its thumbnail goes in the folder the input owns in DIR (or, for a record that names
        none, one named after its path)."""
        recorded = str(record.get("input"))
        href, local = self.input(record)
        folder = record.get("folder")
        if not _plain_name(folder):
            digest = hashlib.sha1(str(local).encode("utf-8", "surrogateescape")).hexdigest()[:16]
            folder = f"{safe_name(Path(recorded).stem)}{DISAMBIGUATOR}{digest}"
        relative = f"{THUMBNAILS}/{folder}/{ORIGINAL_THUMBNAIL}"
        wanted = _Wanted(local, self.out_dir / relative, _url(relative), _text(str(local)), portable=True)
        return _Shown(href, local, wanted)

    def output(self, recorded: str) -> _Shown:
        """An output picture (PNG, JPEG, WebP): always DIR/<folder>/<name>, so look there first (the folder may
        have moved since). Its thumbnail is a PNG named after it (``name.jpg.png`` for a JPEG)."""
        path = Path(recorded)
        in_place = self.out_dir / path.parent.name / path.name
        if _plain_name(path.parent.name) and in_place.is_file():
            relative = f"{path.parent.name}/{path.name}"
            thumb = f"{THUMBNAILS}/{relative}" + ("" if path.suffix.lower() == ".png" else ".png")
            wanted = _Wanted(in_place, self.out_dir / thumb, _url(thumb), _text(relative), portable=False)
            return _Shown(_url(relative), in_place, wanted)
        href, local = self.file(recorded)
        return _Shown(href, local, None)

    def file(self, recorded: str) -> tuple[str, Path]:
        """(href, local path) for an input file: relative to DIR, or a file:// URI where no relative path exists."""
        absolute = os.path.abspath(recorded)
        try:
            relative = os.path.relpath(absolute, self.base)
        except ValueError:  # another drive on Windows
            return Path(absolute).as_uri(), Path(absolute)
        return _url(relative.replace(os.sep, "/")), Path(absolute)

    def make(self, wanted: Iterable[_Wanted]) -> None:
        """Find each wanted thumbnail, making the missing and outdated ones (5 to 20 ms each, one at a time:
        Pillow holds the GIL while it decodes a PNG, so threads gain nothing)."""
        linked = (self.out_dir / THUMBNAILS).is_symlink()
        with warnings.catch_warnings():  # a huge original that a run allowed with --max-pixels is no news here
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            for one in wanted:
                if (one.thumb, one.key) in self.thumbs:
                    continue
                if self.owners.setdefault(one.thumb, one.key) != one.key:  # two inputs said to own one folder
                    self.thumbs[one.thumb, one.key] = None  # the later one is shown from its full-size file
                    continue
                outdated, thumb = self._current(one)
                if outdated and not (linked or one.thumb.parent.is_symlink()):  # never writing through links
                    thumb = _made(one)
                self.thumbs[one.thumb, one.key] = thumb

    def _current(self, wanted: _Wanted) -> tuple[bool, _Thumb | None]:
        """(to be made, the thumbnail to show): an existing thumbnail serves while it is no older than its file
        and made from it; an original's serves also when the original is out of reach."""
        source_time, thumb_time = _mtime(wanted.source), _mtime(wanted.thumb)
        if thumb_time is not None and (
            (source_time is None and wanted.portable) or (source_time is not None and thumb_time >= source_time)
        ):
            kept = _read_thumbnail(wanted.thumb)
            if kept is not None and (source_time is None or kept.key == wanted.key):
                return False, kept
        if source_time is None:
            return False, None  # the page marks it missing
        if not wanted.portable:
            size = _image_size(wanted.source)
            if size is not None and max(size) <= THUMBNAIL_SIZE:
                return False, _Thumb(*size, size, wanted.key, direct=True)  # small already: shown as it is
        return True, None


def _plain_name(name: Any) -> bool:
    """A single file name, not hidden: a folder an input owns in DIR."""
    return isinstance(name, str) and bool(name) and not name.startswith(".") and "/" not in name and os.sep not in name


def _url(path: str) -> str:
    """A relative URL for a path; bytes of a file name that is not UTF-8 (lone surrogates) become %XX as they are."""
    return quote(path, errors="surrogateescape")


def _text(value: str) -> str:
    """``value`` as a PNG text keeps it (write_png escapes what is not UTF-8, such as lone surrogates)."""
    return value.encode("utf-8", "backslashreplace").decode("utf-8")


def _mtime(path: Path) -> int | None:
    try:
        return os.stat(path).st_mtime_ns
    except (OSError, ValueError):
        return None


def _made(wanted: _Wanted) -> _Thumb | None:
    try:
        return _write_thumbnail(wanted.source, wanted.thumb, wanted.key)
    except Exception:  # unreadable, not an image, too large, no room: the page shows the full-size file or marks it
        return None


def _write_thumbnail(source: Path, thumb: Path, key: str) -> _Thumb:
    """Write ``thumb``, ``source`` upright and at most THUMBNAIL_SIZE px on the long side, as a PNG of 256 colours."""
    with Image.open(source) as image:
        orientation = image.getexif().get(0x0112)
        width, height = image.size
        source_size = (height, width) if orientation in (5, 6, 7, 8) else (width, height)
        image.draft(None, (2 * THUMBNAIL_SIZE, 2 * THUMBNAIL_SIZE))  # a JPEG decodes at 1/2 to 1/8 of its size
        small = _displayable(image)
        small.thumbnail((THUMBNAIL_SIZE, THUMBNAIL_SIZE))  # bicubic, after a quick reduce by a whole factor
    if orientation in _ORIENTATION:
        small = small.transpose(_ORIENTATION[orientation])
    if small.mode in ("RGB", "RGBA"):  # a third of the bytes; dithered, a thumbnail looks the same
        small = small.quantize(256, method=Image.Quantize.FASTOCTREE, dither=Image.Dither.FLOYDSTEINBERG)
    write_png(small, thumb, {THUMBNAIL_OF: key, SOURCE_SIZE: f"{source_size[0]}x{source_size[1]}"})
    return _Thumb(small.width, small.height, source_size, key)


def _displayable(image: Image.Image) -> Image.Image:
    """``image`` loaded, as 8-bit RGB(A) or grey (16-bit and other modes scaled or converted as a browser shows them)."""
    if image.mode in ("RGB", "RGBA", "L", "LA"):
        image.load()
        return image
    if image.mode.startswith("I;16"):
        return image.convert("I").point(lambda value: value * (1 / 257)).convert("L")
    return image.convert("RGBA" if image.has_transparency_data else "RGB")


def _read_thumbnail(path: Path) -> _Thumb | None:
    """An existing thumbnail's size and what it was made from, from its header (its pixels are not decoded)."""
    try:
        with Image.open(path) as image:
            width, height = image.size
            key, size = image.info.get(THUMBNAIL_OF), image.info.get(SOURCE_SIZE)
    except Exception:  # unreadable: made again
        return None
    source_size = None
    if isinstance(size, str) and size.count("x") == 1 and all(part.isdigit() for part in size.split("x")):
        shown_width, shown_height = (int(part) for part in size.split("x"))
        source_size = (shown_width, shown_height)
    return _Thumb(width, height, source_size, key if isinstance(key, str) else None)


def _image_size(path: Path) -> tuple[int, int] | None:
    """(width, height) as a browser shows it (EXIF rotation applied), from the file's header only; None if unreadable."""
    try:
        with Image.open(path) as image:
            width, height = image.size
            if image.format in ("JPEG", "WEBP", "TIFF") and image.getexif().get(0x0112) in (5, 6, 7, 8):
                width, height = height, width
            return max(1, width), max(1, height)
    except Exception:  # missing, unreadable or not an image: the page still works
        return None


# ---------------------------------------------------------------------------------------------- parts


def _summary(records: list[Mapping[str, Any]], runs: list[Mapping[str, Any]], title: str) -> str:
    counts = {
        status: sum(1 for record in records if record.get("status") == status) for status in ("ok", "error", "skipped")
    }
    other = len(records) - sum(counts.values())
    count_html = "".join(
        f'<span class="count {status}"><b>{number}</b> {label}</span>'
        for status, number, label in (
            ("total", len(records), "inputs"),
            ("ok", counts["ok"], "ok"),
            ("error", counts["error"], "failed"),
            ("skipped", counts["skipped"], "skipped"),
            ("other", other, "other"),
        )
        if number or status in ("total", "ok", "error")
    )
    return f'<header class="top"><h1>{escape(title)}</h1><p class="counts">{count_html}</p>{_runs(runs)}</header>'


def _evaluation(out_dir: Path) -> str:
    """The ranking of ``hookviz evaluate`` (DIR/evaluate.json and evaluate.png) above the cards, when there is one."""
    import json

    try:
        summary = json.loads((out_dir / "evaluate.json").read_text(encoding="utf-8"))
        rows, names = summary["rows"], summary["scores"]
    except (OSError, ValueError, KeyError, TypeError):
        return ""
    head = "".join(f'<th scope="col">{escape(str(name))}</th>' for name in ["rank", "method", "layer", *names])
    body = "".join(
        "<tr>"
        + "".join(
            f"<td>{escape(str(value))}</td>" for value in (row.get("rank"), row.get("method"), row.get("layer") or "")
        )
        + "".join(
            f"<td>{escape(format(row['scores'][name]['mean'], '.3f'))}</td>"
            if isinstance(row.get("scores", {}).get(name, {}).get("mean"), (int, float))
            else "<td></td>"
            for name in names
        )
        + "</tr>"
        for row in rows
    )
    return (
        f'<section class="evaluation"><h2>Which map to trust: the ranking of hookviz evaluate</h2>'
        f'<table class="runs"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'
        f'<a href="evaluate.png"><img src="evaluate.png" alt="ranking of methods" style="max-width:100%"></a></section>'
    )


_RUN_COLUMNS = "".join(
    f'<th scope="col">{name}</th>'
    for name in ("started", "command", "model", "method / layers", "inputs", "device", "hookviz")
)


def _runs(runs: list[Mapping[str, Any]]) -> str:
    """The table of runs, newest first; beyond RUNS_SHOWN, the earlier ones fold under a <details>."""
    if not runs:
        return ""
    rows = [_run_row(run) for run in reversed(runs)]
    shown, earlier = rows[:RUNS_SHOWN], rows[RUNS_SHOWN:]
    table = f'<table class="runs"><thead><tr>{_RUN_COLUMNS}</tr></thead><tbody>{"".join(shown)}</tbody></table>'
    if earlier:
        table += (
            f'<details class="earlier"><summary>{len(earlier)} earlier run{"s" if len(earlier) > 1 else ""}</summary>'
            f'<table class="runs"><thead><tr>{_RUN_COLUMNS}</tr></thead><tbody>{"".join(earlier)}</tbody></table></details>'
        )
    heading = "1 run" if len(runs) == 1 else f"{len(runs)} runs, newest first"
    return f'<section class="runs" aria-label="runs"><h2>{heading}</h2><div class="scroll">{table}</div></section>'


def _run_row(run: Mapping[str, Any]) -> str:
    found = run.get("settings")
    settings: Mapping[str, Any] = found if isinstance(found, Mapping) else {}
    command = str(run.get("command") or "?")
    shard = f" (shard {run['shard']})" if run.get("shard") else ""

    def cell(value: Any, css: str = "") -> str:
        return f'<td class="{css}">{escape(str(value or ""))}</td>' if css else f"<td>{escape(str(value or ''))}</td>"

    return (
        f"<tr>{cell(_date(run.get('started')), 'when')}<td><b>{escape(command)}</b>{escape(shard)}</td>"
        f"{cell(run.get('model'), 'model')}{cell(_settings_text(settings), 'settings')}"
        f'<td class="recorded">{_recorded(run)}</td>{cell(run.get("device"))}{cell(run.get("hookviz"))}</tr>'
    )


def _settings_text(settings: Mapping[str, Any]) -> str:
    """``gradcam @ layer4, classes 281, 282, top-2``; ``layer1, layer2.0.conv1``."""
    parts = []
    method, layer = settings.get("method"), settings.get("layer")
    if method or layer:
        parts.append(" @ ".join(str(part) for part in (method, layer) if part))
    if isinstance(settings.get("layers"), list):
        parts.append(", ".join(map(str, settings["layers"])))
    if isinstance(settings.get("classes"), list) and settings["classes"]:
        parts.append("classes " + ", ".join(map(str, settings["classes"])))
    if settings.get("top_k"):
        parts.append(f"top-{settings['top_k']}")
    return "; ".join(parts)


def _recorded(run: Mapping[str, Any]) -> str:
    """``3 ok · 1 failed``, and ``of 5`` while (or when a stop left) inputs unrecorded."""
    found = run.get("recorded")
    planned = run.get("inputs") if isinstance(run.get("inputs"), int) else None
    if not isinstance(found, Mapping):
        return f"{planned} inputs" if planned is not None else ""
    recorded = {str(status): number for status, number in found.items() if isinstance(number, int)}
    total = sum(recorded.values())
    parts = [
        f'<span class="{css}"><b>{recorded.get(status, 0)}</b> {label}</span>'
        for status, css, label in (("ok", "ok", "ok"), ("error", "error", "failed"), ("skipped", "skipped", "skipped"))
        if recorded.get(status) or status == "ok"
    ]
    other = total - sum(recorded.get(status, 0) for status in ("ok", "error", "skipped"))
    if other:
        parts.append(f"<span><b>{other}</b> other</span>")
    text = " &middot; ".join(parts)
    if planned is not None and planned > total:
        text += f' <span class="unfinished">of {planned}</span>'
    return text


def _date(value: Any) -> str | None:
    if not isinstance(value, str) or not value:
        return None
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        return value
    zone = moment.tzname()
    return moment.strftime("%Y-%m-%d %H:%M") + (f" {zone}" if zone else "")


def _failures(records: list[Mapping[str, Any]]) -> str:
    failed = [(number, record) for number, record in enumerate(records) if record.get("status") == "error"]
    if not failed:
        return ""
    items = "".join(
        f'<li><a href="#input-{number}">{escape(str(record.get("input")))}</a>'
        f'<span class="message">{escape(_error(record))}</span></li>'
        for number, record in failed
    )
    return f'<section class="failures"><h2>Failed inputs ({len(failed)})</h2><ul>{items}</ul></section>'


def _error(record: Mapping[str, Any]) -> str:
    """The error message, without the input path it starts with (the card and the list show that already)."""
    message, prefix = str(record.get("error") or "failed"), f"{record.get('input')}: "
    return message[len(prefix) :] if message.startswith(prefix) and len(message) > len(prefix) else message


def _card(number: int, record: Mapping[str, Any], shown: _CardPictures, pictures: _Pictures) -> str:
    recorded = str(record.get("input"))
    status = str(record.get("status") or "ok")
    status_class = status if status in ("ok", "error", "skipped") else "other"
    href = shown.original.href if shown.original else pictures.input(record)[0]
    name = Path(recorded).name or recorded
    parts = [
        f'<article class="card {status_class}" id="input-{number}"{_labelled_attributes(record, number)}>',
        f'<header><h2><a href="{escape(href)}" title="{escape(recorded)}">{escape(name)}</a></h2>'
        f'<span class="badge {status_class}">{escape(status)}</span></header>',
        f'<p class="path">{escape(recorded)}</p>',
    ]
    if record.get("error") or status == "error":
        parts.append(f'<p class="message">{escape(_error(record))}</p>')
    predictions = record.get("predictions")
    if isinstance(predictions, list) and predictions:
        parts.append(_predictions(predictions))
    parts.append(_expected(record))
    figures = []
    if shown.original:  # a failed input is often not a picture at all: linked above, not shown as a broken image
        figures.append(_original(shown.original, recorded, pictures))
    figures.extend(_output(output, picture, pictures) for output, picture in shown.outputs)
    if figures:
        parts.append(f'<div class="thumbs">{"".join(figures)}</div>')
    elif status != "error":
        parts.append('<p class="note">No outputs.</p>')
    parts.append("</article>")
    return "".join(parts)


def _predictions(predictions: list[Any]) -> str:
    items = []
    for prediction in predictions[:MAX_PREDICTIONS]:
        if not isinstance(prediction, Mapping):
            continue
        label = prediction.get("label", prediction.get("class", "?"))
        items.append(f"<li><span>{escape(str(label))}</span> <b>{escape(_score(prediction.get('score')))}</b></li>")
    return f'<ol class="predictions" title="top predictions">{"".join(items)}</ol>' if items else ""


def _thumbnail(shown: _Shown, pictures: _Pictures) -> tuple[str, int, int, tuple[int, int] | None] | None:
    """(src, width, height, the full-size picture's size) of the thumbnail shown for ``shown``, if it has one."""
    thumb = pictures.thumbs.get((shown.wanted.thumb, shown.wanted.key)) if shown.wanted else None
    if shown.wanted is None or thumb is None:
        return None
    return (shown.href if thumb.direct else shown.wanted.url), thumb.width, thumb.height, thumb.source_size


def _original(shown: _Shown, recorded: str, pictures: _Pictures) -> str:
    thumbnail = _thumbnail(shown, pictures)
    if thumbnail is not None:
        src, width, height, size = thumbnail
    elif (
        shown.local.suffix.lower() in BROWSER_IMAGE_TYPES
    ):  # no thumbnail: the page shows the file, or marks it missing
        size = _image_size(shown.local)
        src, (width, height) = shown.href, size or FALLBACK_SIZE
    else:
        return (
            f'<figure class="original"><a class="file" href="{escape(shown.href)}">'
            f"{escape(Path(recorded).suffix or 'file')}</a><figcaption>original</figcaption></figure>"
        )
    size_html = f"<small>{size[0]}&times;{size[1]}</small>" if size else ""
    return (
        f'<figure class="original"><a href="{escape(shown.href)}">{_img(src, width, height, "original: " + recorded)}</a>'
        f"<figcaption><b>original</b>{size_html}</figcaption></figure>"
    )


def _output(output: Mapping[str, Any], shown: _Shown, pictures: _Pictures) -> str:
    thumbnail = _thumbnail(shown, pictures)
    if thumbnail is not None:
        src, width, height, _ = thumbnail
    else:
        src, (width, height) = shown.href, _image_size(shown.local) or FALLBACK_SIZE
    label, score, layer = output.get("label"), output.get("score"), output.get("layer")
    method = output.get("method") or output.get("kind")
    headline = (
        str(label)
        if label is not None
        else str(layer if layer is not None else method or Path(str(output["png"])).stem)
    )
    details = [str(method)] if method and (label is not None or layer is not None) else []
    if layer is not None and (label is not None or method):
        details.append(f"@ {layer}")
    if output.get("class") is not None:
        details.append(f"class {output['class']}")
    detail_text = " ".join(details)
    described = " | ".join(part for part in (headline, _score(score) if score is not None else "", detail_text) if part)
    raw = ""
    if output.get("raw"):
        raw_href = pictures.output(str(output["raw"])).href
        raw = f' <a class="raw" href="{escape(raw_href)}" title="raw values (NumPy .npy)">.npy</a>'
    score_html = f" <b>{escape(_score(score))}</b>" if score is not None else ""
    return (
        f'<figure{_pair(output)}><a href="{escape(shown.href)}" title="{escape(described)}">{_img(src, width, height, described)}</a>'
        f'<figcaption><span class="label">{escape(headline)}</span>{score_html}'
        f"<small>{escape(detail_text)}{raw}</small></figcaption></figure>"
    )


def _img(src: str, width: int, height: int, alt: str) -> str:
    return (
        f'<img src="{escape(src)}" alt="{escape(alt)}" loading="lazy" decoding="async" '
        f'width="{width}" height="{height}">'
    )


def _score(score: Any) -> str:
    if isinstance(score, bool) or not isinstance(score, (int, float)):
        return "" if score is None else str(score)
    return f"{score:.1%}" if 0 <= score <= 1 else f"{score:.4g}"


# ---------------------------------------------------------------------------------------------- labelled runs
# Records of a labelled run (gradcam --expected, audit) name the expected class: the page then gets filters
# (mistakes only, by expected class, by predicted class) and a sort by confidence, kept in the address
# (index.html?mistakes=1&expected=tabby&sort=confidence), so a view can be shared and reloaded.


def _is_labelled(record: Mapping[str, Any]) -> bool:
    return record.get("expected") is not None and record.get("status") != "error"


def _top_prediction(record: Mapping[str, Any]) -> Mapping[str, Any]:
    predictions = record.get("predictions")
    first = predictions[0] if isinstance(predictions, list) and predictions else None
    return first if isinstance(first, Mapping) else {}


def _labelled_attributes(record: Mapping[str, Any], number: int) -> str:
    """``data-*`` attributes the filters read: correct, expected and predicted class names, the top-1 probability."""
    if not _is_labelled(record):
        return ""
    top = _top_prediction(record)
    score = top.get("score")
    values = {
        "correct": "1" if record.get("correct") else "0",
        "expected": str(record.get("expected_label", record.get("expected"))),
        "predicted": str(top.get("label", top.get("class", ""))),
        "score": f"{score:.6f}" if isinstance(score, (int, float)) else "",
        "order": str(number),
    }
    return "".join(f' data-{key}="{escape(value)}"' for key, value in values.items())


def _expected(record: Mapping[str, Any]) -> str:
    """A labelled input's line: right or wrong, the expected class, its probability and rank."""
    if not _is_labelled(record):
        return ""
    label = str(record.get("expected_label", record.get("expected")))
    rank = record.get("expected_rank")
    said = f"{_score(record.get('expected_score'))}" + (f", rank {rank}" if isinstance(rank, int) and rank > 1 else "")
    verdict, css = ("right", "right") if record.get("correct") else ("wrong", "wrong")
    return (
        f'<p class="expected {css}"><span class="verdict">{verdict}</span> expected '
        f"<b>{escape(label)}</b> <small>{escape(said)}</small></p>"
    )


def _pair(output: Mapping[str, Any]) -> str:
    """A predicted | expected picture is two pictures wide on the card."""
    return ' class="pair"' if output.get("expected_class") is not None else ""


def _filters(records: Sequence[Mapping[str, Any]]) -> str:
    """The filter bar of a labelled run's page ("" for other runs)."""
    labelled = [record for record in records if _is_labelled(record)]
    if not labelled:
        return ""
    mistakes = sum(1 for record in labelled if not record.get("correct"))

    def options(values: list[str]) -> str:
        counted: dict[str, int] = {}
        for value in values:
            counted[value] = counted.get(value, 0) + 1
        return "".join(
            f'<option value="{escape(value)}">{escape(value)} ({count})</option>'
            for value, count in sorted(counted.items())
        )

    expected = options([str(r.get("expected_label", r.get("expected"))) for r in labelled])
    predicted = options([str(_top_prediction(r).get("label", _top_prediction(r).get("class", ""))) for r in labelled])
    return (
        f"<style>{_FILTER_STYLE}</style>"
        '<section class="filters" aria-label="filters">'
        f'<label><input type="checkbox" name="mistakes" value="1"> mistakes only ({mistakes} of {len(labelled)})</label>'
        f'<label>expected <select name="expected"><option value="">any class</option>{expected}</select></label>'
        f'<label>predicted <select name="predicted"><option value="">any class</option>{predicted}</select></label>'
        '<label>sort <select name="sort"><option value="">as listed</option>'
        '<option value="confidence">most confident first</option>'
        '<option value="-confidence">least confident first</option></select></label>'
        '<span class="shown"></span></section>'
        f"<script>{_FILTER_SCRIPT}</script>"
    )


_FILTER_STYLE = """
.filters { position: sticky; top: 0; z-index: 2; display: flex; flex-wrap: wrap; gap: 8px 18px; align-items: center;
  background: var(--card); border: 1px solid var(--line); border-radius: 10px; padding: 8px 14px; margin: 0 0 16px; }
.filters select { max-width: 16em; }
.filters .shown { color: var(--muted); margin-left: auto; }
.expected { margin: 0 0 10px; font-size: 12px; }
.expected .verdict { font-weight: 700; text-transform: uppercase; font-size: 11px; padding: 1px 6px; border-radius: 6px;
  color: #fff; margin-right: 4px; }
.expected.right .verdict { background: var(--ok); } .expected.wrong .verdict { background: var(--error); }
.card.filtered { display: none; }
.thumbs figure.pair { grid-column: span 2; }
"""

# Reads the controls (first from the address), hides the cards that do not match and orders the rest; the address
# keeps the choice. <html data-cards-shown> holds the count shown (a headless browser test reads it).
_FILTER_SCRIPT = """(function () {
  function apply(form, grid, cards) {
    var want = {}, query = new URLSearchParams();
    form.querySelectorAll("input, select").forEach(function (control) {
      var value = control.type === "checkbox" ? (control.checked ? "1" : "") : control.value;
      want[control.name] = value;
      if (value) query.set(control.name, value);
    });
    var shown = 0;
    cards.forEach(function (card) {
      var labelled = card.hasAttribute("data-expected");
      var hide = (want.mistakes || want.expected || want.predicted) && !labelled ||
        (want.mistakes && card.dataset.correct !== "0") ||
        (want.expected && card.dataset.expected !== want.expected) ||
        (want.predicted && card.dataset.predicted !== want.predicted);
      card.classList.toggle("filtered", !!hide);
      if (!hide) shown++;
    });
    var sorted = cards.slice();
    if (want.sort) {
      var sign = want.sort === "confidence" ? -1 : 1;
      sorted.sort(function (a, b) {
        var x = parseFloat(a.dataset.score), y = parseFloat(b.dataset.score);
        if (isNaN(x) !== isNaN(y)) return isNaN(x) ? 1 : -1;
        return (sign * (x - y)) || (a.dataset.order - b.dataset.order) || 0;
      });
    }
    sorted.forEach(function (card) { grid.appendChild(card); });
    form.querySelector(".shown").textContent = shown + " of " + cards.length + " shown";
    document.documentElement.dataset.cardsShown = shown;
    var text = query.toString();
    try { history.replaceState(null, "", text ? "?" + text : location.pathname); } catch (error) {}
  }
  document.addEventListener("DOMContentLoaded", function () {
    var form = document.querySelector(".filters"), grid = document.querySelector("main.grid");
    if (!form || !grid) return;
    var cards = Array.prototype.slice.call(grid.querySelectorAll(".card"));
    var given = new URLSearchParams(location.search);
    form.querySelectorAll("input, select").forEach(function (control) {
      var value = given.get(control.name);
      if (control.type === "checkbox") control.checked = value === "1";
      else if (value !== null) control.value = value;
      control.addEventListener("change", function () { apply(form, grid, cards); });
    });
    apply(form, grid, cards);
  });
})();"""


# ---------------------------------------------------------------------------------------------- page

# Counts images as they load or fail (lazy ones too), marks missing files so they show as such, and
# leaves the tally on <html data-images-*> (a headless browser test reads it).
_SCRIPT = """(function () {
  var root = document.documentElement, loaded = 0, broken = 0;
  function tally(event) {
    var img = event.target;
    if (!img || img.tagName !== "IMG" || img.dataset.seen) return;
    img.dataset.seen = "1";
    if (event.type === "load" && img.naturalWidth > 0) loaded++;
    else { broken++; var figure = img.closest("figure"); if (figure) figure.classList.add("missing"); }
    root.dataset.imagesLoaded = loaded; root.dataset.imagesBroken = broken;
  }
  document.addEventListener("load", tally, true);
  document.addEventListener("error", tally, true);
  document.addEventListener("DOMContentLoaded", function () { root.dataset.imagesTotal = document.images.length; });
})();"""

_STYLE = """
:root { color-scheme: light dark; --bg: #f4f5f7; --card: #fff; --ink: #1d2330; --muted: #667085; --line: #e3e6eb;
  --thumb: #eef0f3; --ok: #1a7f37; --error: #c62828; --skipped: #8a6d00; --accent: #2457c5; }
@media (prefers-color-scheme: dark) { :root { --bg: #15181d; --card: #1f2329; --ink: #e6e8eb; --muted: #9aa3af;
  --line: #30353d; --thumb: #272c33; --ok: #4cc26a; --error: #ff6b6b; --skipped: #e0b93a; --accent: #7aa2ff; } }
* { box-sizing: border-box; }
body { margin: 0; padding: 24px clamp(12px, 3vw, 40px) 48px; background: var(--bg); color: var(--ink);
  font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; }
a { color: var(--accent); text-decoration: none; }
a:hover { text-decoration: underline; }
.top h1 { margin: 0 0 6px; font-size: 22px; font-weight: 650; }
.counts { margin: 0 0 10px; display: flex; flex-wrap: wrap; gap: 8px; }
.count { padding: 2px 10px; border-radius: 999px; background: var(--card); border: 1px solid var(--line); }
.count.ok b { color: var(--ok); } .count.error b { color: var(--error); } .count.skipped b { color: var(--skipped); }
section.runs { margin: 0 0 20px; }
section.runs h2 { margin: 0 0 6px; font-size: 12px; font-weight: 600; color: var(--muted); text-transform: uppercase;
  letter-spacing: .04em; }
.scroll { overflow-x: auto; }
table.runs { border-collapse: separate; border-spacing: 0; background: var(--card); border: 1px solid var(--line);
  border-radius: 10px; font-size: 13px; }
table.runs th { text-align: left; font-size: 12px; font-weight: 500; color: var(--muted); }
table.runs th, table.runs td { padding: 5px 12px; border-bottom: 1px solid var(--line); vertical-align: top; }
table.runs tbody tr:last-child td { border-bottom: 0; }
table.runs td.when, table.runs td.recorded { white-space: nowrap; }
table.runs td.model, table.runs td.settings { overflow-wrap: anywhere; min-width: 10em; }
.recorded .ok b { color: var(--ok); } .recorded .error b { color: var(--error); }
.recorded .skipped b { color: var(--skipped); } .recorded .unfinished { color: var(--muted); }
details.earlier summary { margin: 6px 0; color: var(--accent); cursor: pointer; font-size: 12px; }
.failures { background: var(--card); border: 1px solid var(--line); border-left: 4px solid var(--error);
  border-radius: 10px; padding: 10px 16px; margin: 0 0 20px; }
.failures h2 { font-size: 15px; margin: 0 0 6px; color: var(--error); }
.failures ul { margin: 0; padding-left: 18px; max-height: 240px; overflow: auto; }
.failures li { margin: 2px 0; overflow-wrap: anywhere; }
.failures li .message { color: var(--muted); margin-left: 8px; }
.grid { display: grid; gap: 16px; grid-template-columns: repeat(auto-fill, minmax(min(100%, 400px), 1fr)); }
.card { background: var(--card); border: 1px solid var(--line); border-radius: 12px; padding: 12px 14px 14px;
  min-width: 0; box-shadow: 0 1px 2px rgba(16, 24, 40, .05); content-visibility: auto; contain-intrinsic-size: auto 330px; }
.card.error { border-left: 4px solid var(--error); }
.card > header { display: flex; align-items: center; gap: 8px; }
.card h2 { flex: 1; min-width: 0; margin: 0; font-size: 15px; font-weight: 600; white-space: nowrap;
  overflow: hidden; text-overflow: ellipsis; }
.card h2 a { color: inherit; }
.badge { font-size: 11px; font-weight: 600; text-transform: uppercase; letter-spacing: .04em; padding: 1px 8px;
  border-radius: 999px; color: #fff; background: var(--muted); }
.badge.ok { background: var(--ok); } .badge.error { background: var(--error); } .badge.skipped { background: var(--skipped); }
.path { margin: 2px 0 8px; color: var(--muted); font-size: 12px; overflow-wrap: anywhere; }
.card .message { margin: 8px 0 0; padding: 8px 10px; border-radius: 8px; color: var(--error); overflow-wrap: anywhere;
  background: color-mix(in srgb, var(--error) 9%, transparent); font-family: ui-monospace, SFMono-Regular, Menlo, monospace; font-size: 12px; }
.predictions { list-style: none; margin: 0 0 10px; padding: 0; display: flex; flex-wrap: wrap; gap: 4px 6px; font-size: 12px; }
.predictions li { padding: 1px 8px; border-radius: 6px; background: var(--thumb); }
.predictions li:first-child { font-weight: 600; }
.thumbs { display: grid; gap: 10px; grid-template-columns: repeat(auto-fill, minmax(116px, 1fr)); }
figure { margin: 0; min-width: 0; }
figure > a { display: block; border-radius: 8px; overflow: hidden; background: var(--thumb); }
figure img { display: block; width: 100%; height: 128px; object-fit: contain; }
figure.original > a { outline: 2px solid var(--line); outline-offset: -2px; }
figure > a.file { height: 128px; display: grid; place-items: center; color: var(--muted); font-weight: 600; }
figure.missing > a { position: relative; height: 128px; }
figure.missing img { visibility: hidden; }
figure.missing > a::after { content: "missing file"; position: absolute; inset: 0; display: grid; place-items: center;
  color: var(--error); font-size: 12px; }
figcaption { margin-top: 4px; font-size: 12px; line-height: 1.3; overflow-wrap: anywhere; }
figcaption .label { font-weight: 600; }
figcaption b { color: var(--accent); font-weight: 600; }
figcaption small { display: block; color: var(--muted); font-size: 11px; }
.note, .empty { color: var(--muted); margin: 8px 0 0; }
footer { margin-top: 28px; color: var(--muted); font-size: 12px; }
"""

_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="referrer" content="no-referrer">
<title>{title}</title>
<style>{style}</style>
<script>{script}</script>
</head>
<body>
{summary}
{failures}
<main class="grid">
{cards}
</main>
<footer>Written by hookviz. Click a picture for the full-size file.</footer>
</body>
</html>
"""
