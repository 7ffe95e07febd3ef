"""``--html``: ``DIR/index.html``, a self-contained gallery of a run's inputs and outputs.

One card per input: the original image and every output (overlay or feature-map grid) with its
caption (label, score, method, layer), and failed inputs with their error. The page has no network
dependencies (inline CSS, a few lines of inline JS, relative links only), so the output folder can
be copied, zipped or served as is. Thumbnails are the PNGs themselves scaled by CSS, loaded lazily
with explicit dimensions, so a page of thousands of inputs opens at once and does not jump about.

``gallery_from_manifest(DIR)`` builds it from ``DIR/manifest.jsonl``: each input's latest record
across all runs, so a resumed or sharded run shows every input once.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from datetime import datetime
from html import escape
from pathlib import Path
from typing import Any
from urllib.parse import quote

from PIL import Image

from .manifest import Manifest
from .output import atomic_write

GALLERY_NAME = "index.html"
# Image types every current browser shows; other inputs (TIFF, ...) get a link instead of a thumbnail.
BROWSER_IMAGE_TYPES = {".png", ".jpg", ".jpeg", ".jpe", ".jfif", ".gif", ".webp", ".bmp", ".avif", ".ico", ".svg"}
FALLBACK_SIZE = (256, 256)  # width/height attributes when a file cannot be read (the browser still reserves room)
MAX_PREDICTIONS = 3


def write_gallery(
    out_dir: Path, records: Iterable[Mapping[str, Any]], header: Mapping[str, Any] | None = None, title: str = "hookviz"
) -> Path:
    """Write ``out_dir/index.html`` (atomically) for ``records`` (``Record.as_json()`` dicts) and return its path.

    ``header`` is a manifest run header (model, command, settings, started, ...); it fills the summary.
    """
    out_dir = Path(out_dir)
    links = _Links(out_dir)
    records = [record for record in records if isinstance(record, Mapping) and "input" in record]
    cards = [_card(number, record, links) for number, record in enumerate(records)]
    page = _PAGE.format(
        title=escape(title),
        style=_STYLE,
        script=_SCRIPT,
        summary=_summary(records, header or {}, title),
        failures=_failures(records),
        cards="\n".join(cards) if cards else '<p class="empty">No inputs recorded yet.</p>',
    )
    path = out_dir / GALLERY_NAME
    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_write(path, "w", encoding="utf-8") as handle:
        handle.write(page)
    return path


def gallery_from_manifest(out_dir: Path) -> Path:
    """``out_dir/index.html`` from ``out_dir/manifest.jsonl``, with the latest run's header.

    Per input, the latest record of each kind of run (runs with the same options
    share a key), so a resumed or sharded run shows each input once, and an fmaps
    run and a gradcam run into the same folder both show their pictures.
    """
    out_dir = Path(out_dir)
    header: dict[str, Any] = {}
    run_keys: dict[Any, Any] = {}
    latest: dict[str, dict[Any, dict[str, Any]]] = {}
    for entry in Manifest(out_dir).entries():
        if entry.get("type") == "run":
            header = entry
            run_keys[entry.get("run")] = entry.get("key")
        elif entry.get("type") == "input" and isinstance(entry.get("input"), str):
            by_key = latest.setdefault(entry["input"], {})
            key = run_keys.get(entry.get("run"))
            by_key.pop(key, None)  # re-insert: the last item is the input's most recent record
            by_key[key] = entry
    records = [_merged(latest[name]) for name in sorted(latest)]  # folder order, however shards interleaved their lines
    return write_gallery(out_dir, records, header, title=_default_title(header))


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


def _default_title(header: Mapping[str, Any]) -> str:
    command = header.get("command")
    return f"hookviz {command}" if command else "hookviz"


# ---------------------------------------------------------------------------------------------- links


class _Links:
    """URLs relative to the gallery's folder, for files recorded relative to the run's working directory."""

    def __init__(self, out_dir: Path):
        self.out_dir = Path(out_dir)
        self.base = os.path.abspath(out_dir)

    def output(self, recorded: str) -> tuple[str, Path]:
        """An output PNG: always DIR/<stem>/<name>, so look there first (the folder may have moved since)."""
        path = Path(recorded)
        in_place = self.out_dir / path.parent.name / path.name
        if path.parent.name and in_place.is_file():
            return quote(f"{path.parent.name}/{path.name}"), in_place
        return self.file(recorded)

    def file(self, recorded: str) -> tuple[str, Path]:
        """(href, local path) for an input file: relative to DIR, or a file:// URI where no relative path exists."""
        absolute = os.path.abspath(recorded)
        try:
            relative = os.path.relpath(absolute, self.base)
        except ValueError:  # another drive on Windows
            return Path(absolute).as_uri(), Path(absolute)
        return quote(relative.replace(os.sep, "/")), Path(absolute)


def _image_size(path: Path) -> tuple[int, int]:
    """(width, height) as a browser shows it (EXIF rotation applied), from the file's header only."""
    try:
        with Image.open(path) as image:
            width, height = image.size
            if image.format in ("JPEG", "WEBP", "TIFF") and image.getexif().get(0x0112) in (5, 6, 7, 8):
                width, height = height, width
            return max(1, width), max(1, height)
    except Exception:  # missing, unreadable or not an image: the page still works
        return FALLBACK_SIZE


# ---------------------------------------------------------------------------------------------- parts


def _summary(records: list[Mapping[str, Any]], header: Mapping[str, Any], title: str) -> str:
    found = header.get("settings")
    settings: Mapping[str, Any] = found if isinstance(found, Mapping) else {}
    facts: list[tuple[str, Any]] = [
        ("model", header.get("model")),
        ("command", header.get("command")),
        ("method", settings.get("method")),
        ("layer", settings.get("layer")),
        ("layers", ", ".join(map(str, settings["layers"])) if isinstance(settings.get("layers"), list) else None),
        ("classes", ", ".join(map(str, settings["classes"])) if isinstance(settings.get("classes"), list) else None),
        ("top-k", settings.get("top_k")),
        ("device", header.get("device")),
        ("started", _date(header.get("started"))),
        ("hookviz", header.get("hookviz")),
    ]
    facts_html = "".join(
        f"<div><dt>{escape(name)}</dt><dd>{escape(str(value))}</dd></div>"
        for name, value in facts
        if value not in (None, "", [])
    )
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
    return (
        f'<header class="top"><h1>{escape(title)}</h1><p class="counts">{count_html}</p>'
        f'<dl class="facts">{facts_html}</dl></header>'
    )


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


def _card(number: int, record: Mapping[str, Any], links: _Links) -> str:
    recorded = str(record.get("input"))
    status = str(record.get("status") or "ok")
    status_class = status if status in ("ok", "error", "skipped") else "other"
    href, local = links.file(recorded)
    name = Path(recorded).name or recorded
    parts = [
        f'<article class="card {status_class}" id="input-{number}">',
        f'<header><h2><a href="{escape(href)}" title="{escape(recorded)}">{escape(name)}</a></h2>'
        f'<span class="badge {status_class}">{escape(status)}</span></header>',
        f'<p class="path">{escape(recorded)}</p>',
    ]
    if record.get("error") or status == "error":
        parts.append(f'<p class="message">{escape(_error(record))}</p>')
    predictions = record.get("predictions")
    if isinstance(predictions, list) and predictions:
        parts.append(_predictions(predictions))
    figures = []
    if status != "error":  # a failed input is often not a picture at all: link it, don't show a broken image
        figures.append(_original(href, local, recorded))
    recorded_outputs = record.get("outputs")
    outputs: list[Any] = recorded_outputs if isinstance(recorded_outputs, list) else []
    figures.extend(_output(output, links) for output in outputs if isinstance(output, Mapping) and output.get("png"))
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


def _original(href: str, local: Path, recorded: str) -> str:
    if Path(recorded).suffix.lower() not in BROWSER_IMAGE_TYPES:
        return (
            f'<figure class="original"><a class="file" href="{escape(href)}">{escape(Path(recorded).suffix or "file")}'
            f"</a><figcaption>original</figcaption></figure>"
        )
    width, height = _image_size(local)
    return (
        f'<figure class="original"><a href="{escape(href)}">{_img(href, width, height, "original: " + recorded)}</a>'
        f"<figcaption><b>original</b><small>{width}&times;{height}</small></figcaption></figure>"
    )


def _output(output: Mapping[str, Any], links: _Links) -> str:
    href, local = links.output(str(output["png"]))
    width, height = _image_size(local)
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
        raw_href, _ = links.output(str(output["raw"]))
        raw = f' <a class="raw" href="{escape(raw_href)}" title="raw values (NumPy .npy)">.npy</a>'
    score_html = f" <b>{escape(_score(score))}</b>" if score is not None else ""
    return (
        f'<figure><a href="{escape(href)}" title="{escape(described)}">{_img(href, width, height, described)}</a>'
        f'<figcaption><span class="label">{escape(headline)}</span>{score_html}'
        f"<small>{escape(detail_text)}{raw}</small></figcaption></figure>"
    )


def _img(href: str, width: int, height: int, alt: str) -> str:
    return (
        f'<img src="{escape(href)}" alt="{escape(alt)}" loading="lazy" decoding="async" '
        f'width="{width}" height="{height}">'
    )


def _score(score: Any) -> str:
    if isinstance(score, bool) or not isinstance(score, (int, float)):
        return "" if score is None else str(score)
    return f"{score:.1%}" if 0 <= score <= 1 else f"{score:.4g}"


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
.facts { display: flex; flex-wrap: wrap; gap: 4px 22px; margin: 0 0 20px; }
.facts div { display: flex; gap: 6px; min-width: 0; }
.facts dt { color: var(--muted); } .facts dd { margin: 0; font-weight: 550; overflow-wrap: anywhere; }
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
