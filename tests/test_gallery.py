"""``--html``: the gallery page, ``DIR/index.html``.

The page is checked as data (parsed with html.parser: escaping, links that resolve to real files,
lazy thumbnails, the latest record per input) and, when Debian's ``chromium`` is installed (``make
test`` installs it), rendered by a real headless browser: every picture must load, and a missing one
must be caught.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest
from PIL import Image

from hookviz import gallery
from hookviz.gallery import gallery_from_manifest, write_gallery
from hookviz.manifest import Manifest

NASTY_LABEL = "<script>alert(1)</script>"
NASTY_NAME = "cat #1 & 'q' \"x\" <y>.png"  # every character that breaks HTML or a URL left raw
HEADER = {
    "type": "run",
    "run": "r1",
    "started": "2026-01-02T03:04:05+00:00",
    "hookviz": "0.1.0",
    "command": "gradcam",
    "model": "resnet50",
    "device": "cpu",
    "settings": {"method": "gradcam", "layer": "layer4", "classes": None, "top_k": 2},
    "inputs": 3,
}


class Page(HTMLParser):
    """Tags with their attributes (entities decoded, as a browser sees them) and the visible text."""

    def __init__(self, text: str):
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict[str, str]]] = []
        self.text: list[str] = []
        self._in: list[str] = []
        self._anchor: str | None = None
        self.linked: list[tuple[dict[str, str], str | None]] = []  # each <img> and the href of the <a> around it
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, {name: value or "" for name, value in attrs}))
        if tag == "a":
            self._anchor = self.tags[-1][1].get("href")
        elif tag == "img":
            self.linked.append((self.tags[-1][1], self._anchor))
        if tag in ("script", "style"):
            self._in.append(tag)

    def handle_endtag(self, tag):
        if tag == "a":
            self._anchor = None
        if self._in and self._in[-1] == tag:
            self._in.pop()

    def handle_data(self, data):
        if not self._in:
            self.text.append(data)

    def all(self, tag: str) -> list[dict[str, str]]:
        return [attrs for name, attrs in self.tags if name == tag]

    def link_around(self, img: dict[str, str]) -> str | None:
        """The href of the link an <img> is in: its full-size file."""
        return next(href for attrs, href in self.linked if attrs is img)

    def links(self) -> list[str]:
        return [attrs[key] for _, attrs in self.tags for key in ("src", "href") if key in attrs]

    @property
    def visible(self) -> str:
        return " ".join(self.text)


def png(path: Path, size=(64, 48), color=(200, 40, 40)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path


def cam(png_path: Path, label="tabby", klass=281, score=0.61) -> dict:
    return {
        "kind": "cam",
        "method": "gradcam",
        "layer": "layer4",
        "class": klass,
        "label": label,
        "score": score,
        "png": str(png_path),
    }


def ok(input_path: Path, *outputs: dict, **extra) -> dict:
    return {"input": str(input_path), "status": "ok", "error": None, **extra, "outputs": list(outputs)}


def failed(input_path: Path, message: str) -> dict:
    return {"input": str(input_path), "status": "error", "error": message, "outputs": []}


def target(out_dir: Path, link: str) -> Path:
    """The local file a relative link on DIR/index.html points at."""
    return out_dir / unquote(urlsplit(link).path)


def test_labels_paths_and_errors_are_escaped(tmp_path):
    photo = png(tmp_path / "in & <dir>" / NASTY_NAME)
    out = tmp_path / "out"
    overlay = png(out / "cat" / "gradcam_layer4_c281.png")
    records = [
        ok(photo, cam(overlay, label=NASTY_LABEL), predictions=[{"class": 1, "label": NASTY_LABEL, "score": 0.5}]),
        failed(tmp_path / 'bad "one" & <two>.jpg', f'cannot read {NASTY_LABEL} & "friends"'),
    ]
    text = write_gallery(out, records, HEADER).read_text(encoding="utf-8")

    assert text.count("<script") == 1  # the page's own few lines, nothing from the data
    assert "alert(1)</script>" not in text and "&lt;script&gt;alert(1)&lt;/script&gt;" in text
    assert "<dir>" not in text and "<y>" not in text and '"x"' not in text and "& 'q'" not in text
    page = Page(text)  # decoded back, the data reads exactly as it was
    assert NASTY_LABEL in page.visible and NASTY_NAME in page.visible and 'bad "one" & <two>.jpg' in page.visible
    assert f'cannot read {NASTY_LABEL} & "friends"' in page.visible
    original = next(img for img in page.all("img") if img["alt"].startswith("original"))
    # '#', quotes, '&' and '<' all survive in the URL of the full-size original (the picture is its thumbnail)
    assert target(out, page.link_around(original)).resolve() == photo.resolve()
    assert all("#" not in link or link.startswith("#") for link in page.links())


def test_links_are_relative_and_resolve_to_the_files(tmp_path, monkeypatch):
    photos, out = tmp_path / "photos", tmp_path / "runs" / "maps"
    records = []
    for number in range(3):
        photo = png(photos / f"p{number}.png")
        grid = png(out / f"p{number}" / "fmap_layer1.png", size=(120, 90))
        raw = out / f"p{number}" / "fmap_layer1.npy"
        raw.write_bytes(b"npy")
        records.append(ok(photo, {"kind": "fmap", "layer": "layer1", "png": str(grid), "raw": str(raw)}))
    monkeypatch.chdir(tmp_path)  # recorded paths relative to the run's working directory, as the CLI writes them
    records = [
        {
            **record,
            "input": os.path.relpath(record["input"]),
            "outputs": [
                {**output, "png": os.path.relpath(output["png"]), "raw": os.path.relpath(output["raw"])}
                for output in record["outputs"]
            ],
        }
        for record in records
    ]
    page = Page(write_gallery(Path("runs/maps"), records, HEADER).read_text(encoding="utf-8"))

    links = page.links()
    assert len(page.all("img")) == 6 and links
    for link in links:
        assert not re.match(r"^[a-z][a-z0-9+.-]*:|^//|^/", link, re.I), link  # no scheme, no host, not absolute
        if not link.startswith("#"):
            assert target(out, link).is_file(), link
    assert any(link.startswith("../../photos/") for link in links)
    assert not any(tag in ("link", "iframe", "object", "embed") for tag, _ in page.tags)
    assert all("src" not in attrs for attrs in page.all("script"))

    # Read later from elsewhere (or after moving the folder): outputs are still found inside DIR.
    monkeypatch.chdir(photos)
    moved = Page(write_gallery(out, records, HEADER).read_text(encoding="utf-8"))
    assert all(target(out, img["src"]).is_file() for img in moved.all("img") if "fmap" in img["src"])


def test_inputs_without_a_relative_path_get_a_file_uri(tmp_path, monkeypatch):
    photo = png(tmp_path / "a b.png")

    def other_drive(path, start=os.curdir):
        raise ValueError("path is on mount 'D:', start on mount 'C:'")

    monkeypatch.setattr(gallery.os.path, "relpath", other_drive)
    page = Page(write_gallery(tmp_path / "out", [ok(photo)]).read_text(encoding="utf-8"))
    assert page.link_around(page.all("img")[0]) == photo.resolve().as_uri()  # the picture is its thumbnail in DIR


def test_failed_inputs_are_listed_with_their_error(tmp_path):
    out = tmp_path / "out"
    good = ok(png(tmp_path / "good.png"), cam(png(out / "good" / "gradcam_layer4_c281.png")))
    bad = failed(tmp_path / "notes.txt.jpg", f"{tmp_path / 'notes.txt.jpg'}: not an image hookviz can read")
    text = write_gallery(out, [good, bad], HEADER).read_text(encoding="utf-8")
    page = Page(text)

    assert "Failed inputs (1)" in page.visible
    assert page.visible.count("not an image hookviz can read") == 2  # in the list and on the card
    assert '<a href="#input-1">' in text and 'id="input-1"' in text
    assert not any("notes.txt" in img["src"] for img in page.all("img"))  # a broken input is linked, not shown
    assert re.search(r'<span class="count ok"><b>1</b> ok</span>.*<span class="count error"><b>1</b> failed', text)


def test_the_header_summarises_the_run(tmp_path):
    out = tmp_path / "out"
    text = write_gallery(out, [ok(png(tmp_path / "a.png"))], HEADER, title="my <run>").read_text(encoding="utf-8")
    visible = Page(text).visible
    for fact in ("resnet50", "gradcam", "layer4", "2026-01-02 03:04 UTC", "0.1.0", "my <run>"):
        assert fact in visible
    assert "<title>my &lt;run&gt;</title>" in text


def test_latest_record_per_input_wins_across_runs(tmp_path):
    out = tmp_path / "out"
    a, b, c = (png(tmp_path / "in" / f"{name}.png") for name in "abc")
    first = png(out / "a" / "gradcam_layer4_c1.png")
    second = png(out / "a" / "gradcam_layer4_c2.png")
    manifest = Manifest(out)
    manifest.append({**HEADER, "run": "r1", "model": "first-model"})
    manifest.append({"type": "input", "run": "r1", **failed(a, "a: out of memory")})
    manifest.append({"type": "input", "run": "r1", **ok(b, cam(first, label="old-b"))})
    (out / "manifest.jsonl").open("a").write('{"type": "input", "run": "r1", "inp')  # a line cut short by a kill
    (out / "manifest.jsonl").open("a").write("\n")
    for shard in ("r2", "r3"):  # two shards of the resumed run
        manifest.append({**HEADER, "run": shard, "model": "second-model"})
    manifest.append({"type": "input", "run": "r2", **ok(c, cam(second, label="only-c"))})
    manifest.append({"type": "input", "run": "r3", **ok(a, cam(second, label="new-a"))})
    manifest.append(
        {
            "type": "input",
            "run": "r2",
            "input": str(b),
            "status": "skipped",
            "error": None,
            "outputs": [cam(first, label="old-b")],
        }
    )

    text = gallery_from_manifest(out).read_text(encoding="utf-8")
    page = Page(text)
    cards = list(page.all("article"))
    assert len(cards) == 3 and [attrs["class"] for attrs in cards] == ["card ok", "card skipped", "card ok"]
    assert "new-a" in page.visible and "out of memory" not in page.visible and "Failed inputs" not in page.visible
    header = Page(text.split("</header>")[0]).visible  # every run is in the header, the newest first
    assert header.index("second-model") < header.index("first-model")
    assert page.visible.count("old-b") == 1 and "only-c" in page.visible


def test_a_thousand_inputs_build_fast_with_lazy_sized_thumbnails(tmp_path, monkeypatch):
    out = tmp_path / "out"
    shared = [png(tmp_path / f"in{k}.png") for k in range(4)]
    overlays = [png(out / f"s{k}" / "gradcam_layer4_c1.png", size=(224, 160)) for k in range(4)]
    records = [
        ok(
            shared[n % 4],
            cam(overlays[n % 4]),
            cam(overlays[(n + 1) % 4], label=f"label {n}"),
            {"kind": "fmap", "layer": "layer1", "png": str(out / f"gone{n}" / "fmap_layer1.png")},
        )
        if n % 50
        else failed(tmp_path / f"bad{n}.jpg", "truncated file")
        for n in range(1000)
    ]
    decoded = []
    real_load = gallery.Image.Image.load
    monkeypatch.setattr(gallery.Image.Image, "load", lambda image: decoded.append(image) or real_load(image))
    path = write_gallery(out, records, HEADER)

    # Fast without racing the clock: sizes come from file headers, and only the 4 distinct originals are decoded
    # (for their thumbnails, a few Pillow loads each; the 224x160 overlays are their own), not a picture per record
    # (3000 are shown): the count would be in the thousands.
    assert len(decoded) <= 10 * 4, f"{len(decoded)} pictures decoded for 4 distinct originals"
    page = Page(path.read_text(encoding="utf-8"))
    images = page.all("img")
    assert len(images) == 980 * 4 and len(page.all("article")) == 1000
    for img in images:
        assert img["loading"] == "lazy" and img["decoding"] == "async"
        assert int(img["width"]) > 0 and int(img["height"]) > 0
    assert {(img["width"], img["height"]) for img in images if "gradcam" in img["src"]} == {("224", "160")}
    originals = {path.resolve() for path in shared}
    for img in images:  # every thumbnail links to its full-size file (small overlays are their own thumbnails)
        link = page.link_around(img)
        assert link == img["src"] or (img["src"].startswith(".thumbs/") and target(out, link).resolve() in originals)


def test_the_page_is_written_atomically(tmp_path, monkeypatch):
    out = tmp_path / "out"
    path = write_gallery(out, [ok(png(tmp_path / "a.png"))])
    assert path == out / "index.html" and stat.S_IMODE(path.stat().st_mode) == 0o644
    before = path.read_text(encoding="utf-8")

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(gallery.os, "replace", full_disk)
    with pytest.raises(OSError):
        write_gallery(out, [])
    assert path.read_text(encoding="utf-8") == before  # the old page stays whole
    assert sorted(p.name for p in out.iterdir()) == [".thumbs", "index.html"]  # .thumbs: a.png's thumbnail
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]  # and no temporary file is left behind


# ------------------------------------------------------------------------------------------------ thumbnails


def photo_with_exif(path: Path, size=(1200, 800), orientation=6) -> Path:
    """A JPEG stored on its side, left half red and right half blue, with an EXIF orientation to show it upright."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.new("RGB", size, (220, 20, 20))
    image.paste((20, 20, 220), (size[0] // 2, 0, size[0], size[1]))
    exif = Image.Exif()
    exif[0x0112] = orientation
    image.save(path, quality=90, exif=exif)
    return path


def cli_run(out: Path, photos: list[Path], run="r1", command="gradcam", outputs=None, **header) -> None:
    """A run's manifest lines as the CLI writes them: a header, then a record (with identity and folder) per input."""
    out.mkdir(parents=True, exist_ok=True)
    manifest = Manifest(out)
    manifest.append({**HEADER, "run": run, "command": command, "key": command, "inputs": len(photos), **header})
    for photo in photos:
        made = outputs(photo) if outputs else [cam(png(out / photo.stem / "gradcam_layer4_c281.png", (160, 120)))]
        record = ok(photo, *made, identity=os.path.realpath(photo), folder=photo.stem)
        manifest.append({"type": "input", "run": run, **record})


def thumbnails(out: Path) -> dict[str, int]:
    """Every file in DIR/.thumbs/, relative to it, with its modification time."""
    return {
        str(p.relative_to(out / ".thumbs")): p.stat().st_mtime_ns for p in (out / ".thumbs").rglob("*") if p.is_file()
    }


def test_thumbnails_are_small_upright_and_link_their_full_size_files(tmp_path):
    out = tmp_path / "out"
    photo = photo_with_exif(tmp_path / "photos" / "side.jpg")  # 1200x800 stored, 800x1200 shown

    def outputs(photo: Path) -> list[dict]:
        return [
            {"kind": "fmap", "layer": "layer1", "png": str(png(out / photo.stem / "fmap_layer1.png", (1000, 600)))},
            cam(png(out / photo.stem / "gradcam_layer4_c281.png", (200, 150))),
        ]

    cli_run(out, [photo], outputs=outputs)
    page = Page(gallery_from_manifest(out).read_text(encoding="utf-8"))

    (original, grid, overlay) = page.all("img")
    assert original["src"] == ".thumbs/side/_original.png" and page.link_around(original) == "../photos/side.jpg"
    assert grid["src"] == ".thumbs/side/fmap_layer1.png" and page.link_around(grid) == "side/fmap_layer1.png"
    assert overlay["src"] == page.link_around(overlay) == "side/gradcam_layer4_c281.png"  # small: shown as it is
    assert "800×1200" in page.visible  # the original's own size, upright, under its thumbnail
    for img in (original, grid):
        with Image.open(target(out, img["src"])) as thumb:
            assert max(thumb.size) <= 256 and thumb.size == (int(img["width"]), int(img["height"]))
            assert thumb.format == "PNG"
            upright = thumb.convert("RGB")
        if img is original:
            assert thumb.size == (171, 256)  # EXIF orientation applied: tall, red on top and blue below
            red, blue = upright.getpixel((85, 40)), upright.getpixel((85, 215))
            assert red[0] > 150 > red[2] and blue[2] > 150 > blue[0], (red, blue)
        else:
            assert thumb.size == (256, 154)
    grid_file = out / "side" / "fmap_layer1.png"
    assert target(out, grid["src"]).stat().st_size < grid_file.stat().st_size


def test_the_page_works_after_the_folder_is_moved(tmp_path):
    root = tmp_path / "first"
    photos = [png(root / "photos" / f"p{n}.png", (640, 480), color) for n, color in enumerate(COLORS[:3])]
    out = root / "out"
    cli_run(out, photos)
    gallery_from_manifest(out)
    made = thumbnails(out)
    assert sorted(made) == [f"p{n}/_original.png" for n in range(3)]  # 160x120 overlays need none

    moved = shutil.move(str(out), str(tmp_path / "elsewhere" / "copy"))
    shutil.rmtree(root)  # the originals are out of reach now, as on another machine
    moved = Path(moved)
    for page in (moved / "index.html", gallery_from_manifest(moved)):  # as it was moved, and rebuilt there
        parsed = Page(page.read_text(encoding="utf-8"))
        images = parsed.all("img")
        assert len(images) == 6
        for img in images:  # every picture is inside the moved folder: the originals from their copies
            assert not urlsplit(img["src"]).scheme and target(moved, img["src"]).is_file(), img["src"]
        originals = [img for img in images if img["alt"].startswith("original")]
        assert [img["src"] for img in originals] == [f".thumbs/p{n}/_original.png" for n in range(3)]
        assert all(parsed.link_around(img).endswith(f"photos/p{n}.png") for n, img in enumerate(originals))
        assert "640×480" in parsed.visible  # the size, kept in the copy
    assert thumbnails(moved) == made  # not made again (nor dropped) without their originals


def test_a_rebuild_makes_only_missing_and_outdated_thumbnails(tmp_path):
    out = tmp_path / "out"
    photos = [photo_with_exif(tmp_path / "photos" / f"p{n}.jpg", (900, 700), 1) for n in range(3)]

    def outputs(photo: Path) -> list[dict]:
        return [{"kind": "fmap", "layer": "layer1", "png": str(png(out / photo.stem / "fmap_layer1.png", (800, 800)))}]

    cli_run(out, photos, outputs=outputs)
    gallery_from_manifest(out)
    first = thumbnails(out)
    assert len(first) == 6  # an original and a grid per input
    inodes = {name: (out / ".thumbs" / name).stat().st_ino for name in first}

    gallery_from_manifest(out)
    assert thumbnails(out) == first  # nothing rewritten
    assert {name: (out / ".thumbs" / name).stat().st_ino for name in first} == inodes

    # A newer grid (a later run wrote it again) and a thumbnail deleted: just those two are made again.
    grid = png(out / "p1" / "fmap_layer1.png", (800, 800), color=(10, 200, 10))
    later = first["p1/fmap_layer1.png"] + 5_000_000_000
    os.utime(grid, ns=(later, later))
    (out / ".thumbs" / "p2" / "_original.png").unlink()
    gallery_from_manifest(out)
    second = thumbnails(out)
    changed = {name for name in first if second[name] != first[name]}
    assert changed == {"p1/fmap_layer1.png", "p2/_original.png"}
    with Image.open(out / ".thumbs" / "p1" / "fmap_layer1.png") as thumb:
        assert thumb.convert("RGB").getpixel((10, 10)) == (10, 200, 10)  # made from the new grid


def test_a_thumbnail_that_cannot_be_made_does_not_break_the_page(tmp_path):
    out = tmp_path / "out"
    garbage = tmp_path / "photos" / "garbage.jpg"
    garbage.parent.mkdir(parents=True)
    garbage.write_bytes(b"not a JPEG at all")
    scan = tmp_path / "photos" / "scan.tif"  # no browser shows TIFF: its PNG thumbnail does
    Image.new("RGB", (600, 300), (30, 60, 90)).save(scan)
    gone = out / "garbage" / "gradcam_layer4_c281.png"
    records = [
        ok(garbage, cam(gone), folder="garbage"),
        ok(scan, cam(png(out / "scan" / "gradcam_layer4_c281.png", (600, 300))), folder="scan"),
        ok(tmp_path / "photos" / "deleted.png", folder="deleted"),
    ]
    page = Page(write_gallery(out, records, HEADER).read_text(encoding="utf-8"))

    shown = {
        img["alt"].split(": ")[-1] if img["alt"].startswith("original") else img["src"]: img for img in page.all("img")
    }
    # Unreadable or missing: the full-size file is the picture, which a browser then marks as missing.
    assert shown[str(garbage)]["src"] == "../photos/garbage.jpg"
    assert shown[str(tmp_path / "photos" / "deleted.png")]["src"] == "../photos/deleted.png"
    assert "garbage/gradcam_layer4_c281.png" in shown
    assert shown[str(scan)]["src"] == ".thumbs/scan/_original.png"
    assert (shown[str(scan)]["width"], shown[str(scan)]["height"]) == ("256", "128")
    assert ".thumbs/scan/gradcam_layer4_c281.png" in shown
    assert sorted(thumbnails(out)) == ["scan/_original.png", "scan/gradcam_layer4_c281.png"]


def test_a_file_name_that_is_not_utf8_is_linked_and_shown(tmp_path):
    photos = tmp_path / "photos"
    photo = png(photos / os.fsdecode(b"bad\xff.png"), (400, 300))  # as os.listdir gives it: a lone surrogate
    out = tmp_path / "out"
    text = write_gallery(out, [ok(photo, identity=str(photo), folder="bad_")]).read_text(encoding="utf-8")
    page = Page(text)

    (original,) = page.all("img")
    assert page.link_around(original) == "../photos/bad%FF.png"  # the file's own bytes
    assert original["src"] == ".thumbs/bad_/_original.png" and target(out, original["src"]).is_file()
    assert "bad\\udcff.png" in page.visible


def test_every_run_is_in_the_header(tmp_path):
    out = tmp_path / "out"
    photos = [png(tmp_path / "photos" / f"p{n}.png") for n in range(3)]

    def grids(photo: Path) -> list[dict]:
        return [{"kind": "fmap", "layer": "layer1", "png": str(png(out / photo.stem / "fmap_layer1.png"))}]

    cli_run(
        out,
        photos,
        run="f1",
        command="fmaps",
        model="resnet18",
        settings={"layers": ["layer1", "layer2.0.conv1"]},
        started="2026-03-04T10:00:00+00:00",
        outputs=grids,
    )
    cli_run(out, photos[:2], run="g1", model="resnet50", started="2026-03-04T11:30:00+00:00")
    Manifest(out).append({"type": "input", "run": "g1", **failed(photos[2], "out of memory")})
    text = gallery_from_manifest(out).read_text(encoding="utf-8")
    page = Page(text)

    assert "<title>hookviz fmaps + gradcam</title>" in text
    rows = [" ".join(row.split()) for row in Page(text.split("</header>")[0]).visible.split("\n") if row.strip()]
    header = " ".join(rows)
    assert "2 runs" in header
    gradcam_row = header.index("2026-03-04 11:30 UTC gradcam resnet50 gradcam @ layer4; top-2 2 ok · 1 failed")
    fmaps_row = header.index("2026-03-04 10:00 UTC fmaps resnet18 layer1, layer2.0.conv1 3 ok")
    assert gradcam_row < fmaps_row  # the newest first
    assert len(page.all("article")) == 3 and page.visible.count("layer1") >= 3  # both runs' pictures on the cards

    for number in range(10):  # many runs: the newest 8 in the table, the earlier ones folded away
        Manifest(out).append({**HEADER, "run": f"x{number}", "model": f"model-{number}"})
    page = Page(gallery_from_manifest(out).read_text(encoding="utf-8"))
    assert all(f"model-{number}" in page.visible for number in range(10)) and "resnet18" in page.visible
    assert "12 runs, newest first" in page.visible and "4 earlier runs" in page.visible


# ------------------------------------------------------------------------------------------------ a real browser

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
COLORS = [(230, 20, 200), (20, 200, 230), (240, 200, 10), (90, 30, 160), (10, 150, 60)]  # 4 originals, overlays


def browser_run(tmp_path: Path, name: str) -> Path:
    """A run folder as the CLI leaves it: real originals (one with a nasty name), overlays, a failure, a manifest."""
    root = tmp_path / name
    photos, out = root / "photos", root / "out"
    out.mkdir(parents=True)
    manifest = Manifest(out)
    manifest.append(HEADER)
    for number, color in enumerate(COLORS[:4]):
        photo = png(photos / (NASTY_NAME if number == 0 else f"photo{number}.png"), size=(160, 120), color=color)
        overlay = png(out / f"photo{number}" / "gradcam_layer4_c7.png", size=(160, 120), color=COLORS[4])
        manifest.append({"type": "input", "run": "r1", **ok(photo, cam(overlay, label=f"class <{number}>"))})
    manifest.append({"type": "input", "run": "r1", **failed(photos / "broken.jpg", "not an image")})
    return out


def chromium(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            CHROMIUM,
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            f"--user-data-dir={tmp_path / 'chromium-profile'}",
            "--virtual-time-budget=10000",
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=90,
        env={**os.environ, "HOME": str(tmp_path)},
    )


def rendered(tmp_path: Path, page: Path) -> dict[str, int]:
    """The page's own tally after a headless load: images in it, loaded (naturalWidth > 0), and broken.

    The window is taller than the page, so every lazy image is in view and loads.
    """
    for _attempt in range(2):  # a first, cold start of the browser can dump the page before the last picture arrives
        result = chromium(tmp_path, "--window-size=1280,3000", "--dump-dom", page.as_uri())
        tag = re.search(r"<html[^>]*>", result.stdout)
        assert tag, f"chromium printed no page:\n{result.stderr[-2000:]}"
        tally = {key: int(value) for key, value in re.findall(r'data-images-(\w+)="(\d+)"', tag.group())}
        if tally.get("loaded", 0) + tally.get("broken", 0) == tally.get("total", -1):
            break
    return tally


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (make test installs it with apt-get)")
def test_a_real_browser_renders_every_picture(tmp_path):
    # The check can fail: a page with a missing overlay reports it as broken.
    broken = browser_run(tmp_path, "broken")
    missing = broken / "photo2" / "gradcam_layer4_c7.png"
    missing.unlink()
    tally = rendered(tmp_path, gallery_from_manifest(broken))
    assert tally == {"total": 8, "loaded": 7, "broken": 1}, tally

    good = gallery_from_manifest(browser_run(tmp_path, "good"))
    assert len(Page(good.read_text(encoding="utf-8")).all("img")) == 8  # 4 originals + 4 overlays; the failure has none
    tally = rendered(tmp_path, good)
    assert tally == {"total": 8, "loaded": 8, "broken": 0}, tally


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (make test installs it with apt-get)")
def test_a_real_browser_shows_the_originals_of_a_moved_folder(tmp_path):
    out = browser_run(tmp_path, "run")
    gallery_from_manifest(out)
    moved = Path(shutil.move(str(out), str(tmp_path / "moved")))
    shutil.rmtree(tmp_path / "run")  # the originals are gone: their thumbnails in the folder show them
    tally = rendered(tmp_path, moved / "index.html")
    assert tally == {"total": 8, "loaded": 8, "broken": 0}, tally
