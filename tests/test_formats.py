"""Picture formats (--format png|jpg|webp, --quality), the built-in colormap tables and the one-pass overlay.

hookviz gradcam nets:build_batchnet photos/ --size 32 -l relu2 --format jpg --quality 80 -o OUT
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import matplotlib
import numpy as np
import pytest
import torch
from cli_helpers import FMAPS, GRADCAM, hookviz, image_folder, json_lines, read_manifest, write_noise_image
from PIL import Image

from hookviz.colormaps import BUILT_IN, builtin_table
from hookviz.errors import UsageError
from hookviz.images import image_to_tensor, load_image
from hookviz.output import (
    EXIF_DESCRIPTION,
    EXIF_IFD,
    EXIF_USER_COMMENT,
    encode_image,
    read_metadata,
    write_image,
    write_png,
)
from hookviz.render import apply_colormap, heat_in_image, normalize_map, overlay, overlay_picture

SAMPLES = Path(__file__).resolve().parent.parent / "sample_images"
METADATA = {
    "hookviz:method": "gradcam",
    "hookviz:label": "chat tigré 猫",  # not Latin-1: an iTXt chunk in a PNG
    "hookviz:probability": "0.712300",
    "hookviz:input": "photos/caf\udce9.jpg",  # a file name that is not UTF-8
}
SUFFIXES = {"png": ".png", "jpg": ".jpg", "webp": ".webp"}


def photo() -> Image.Image:
    return load_image(SAMPLES / "coffee_cup.jpg")


# --- colormap tables -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", BUILT_IN)
def test_built_in_colormap_tables_equal_matplotlibs(name):
    expected = np.asarray(matplotlib.colormaps[name]([i / 255 for i in range(256)]))[:, :3]
    table = np.frombuffer(builtin_table(name), dtype=np.uint8).reshape(256, 3)
    np.testing.assert_array_equal(table, (expected * 255).round().astype(np.uint8))


def test_drawing_an_overlay_with_a_built_in_colormap_does_not_import_matplotlib():
    script = (
        "import sys, torch\n"
        "from hookviz.render import overlay_picture\n"
        "picture = overlay_picture(torch.zeros(3, 40, 60, dtype=torch.uint8), torch.rand(7, 7), (0.0, 0.0, 60.0, 40.0),"
        " cmap='turbo')\n"
        "assert picture.size == (60, 40)\n"
        "print('matplotlib' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"


def test_another_matplotlib_colormap_still_works_and_a_typo_is_a_usage_error():
    picture = overlay_picture(
        torch.zeros(3, 8, 8, dtype=torch.uint8), torch.ones(2, 2), (0.0, 0.0, 8.0, 8.0), cmap="Blues"
    )
    expected = (np.asarray(matplotlib.colormaps["Blues"](1.0))[:3] * 255 * 0.5).round()
    assert np.abs(np.asarray(picture)[4, 4] - expected).max() <= 1
    with pytest.raises(UsageError, match="unknown colormap 'turbbo'"):
        overlay_picture(torch.zeros(3, 8, 8, dtype=torch.uint8), torch.ones(2, 2), (0.0, 0.0, 8.0, 8.0), cmap="turbbo")


# --- the overlay, in one pass --------------------------------------------------------------------------


def float_overlay(pixels, heat, seen, alpha, cmap):
    """What overlays were before: the float blend of the colormapped, upsampled map, the unseen part dimmed."""
    colours = apply_colormap(heat, cmap).float()
    blended = pixels.float() * (1 - alpha) + colours * alpha
    blended = torch.where(seen, blended, pixels.float() * 0.35)
    return blended.round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy().astype(int)


@pytest.mark.parametrize(
    "box",
    [None, (31.5, 12.25, 250.0, 190.75), (-20.0, -8.0, 180.0, 150.0)],
    ids=["whole image", "crop box", "box past the edges"],
)
@pytest.mark.parametrize("alpha", [0.5, 0.3])
def test_one_pass_overlay_matches_the_float_blend_at_the_photos_size(box, alpha):
    pixels = image_to_tensor(photo())
    width, height = pixels.shape[2], pixels.shape[1]
    box = box or (0.0, 0.0, float(width), float(height))
    heat = normalize_map(torch.rand(7, 7, generator=torch.Generator().manual_seed(3)))
    placed, seen = heat_in_image(heat, box, (width, height))
    picture = overlay_picture(pixels, heat, box, alpha=alpha, cmap="jet")
    assert picture.size == (width, height) and picture.mode == "RGB"
    difference = np.abs(np.asarray(picture).astype(int) - float_overlay(pixels, placed, seen, alpha, "jet"))
    assert difference.max() <= 3  # one colour-table step (jet's steepest is 4 levels) of 8-bit rounding
    assert difference.mean() < 0.5
    # The unseen part is exactly the dimmed photo.
    outside = ~seen.numpy()
    if outside.any():
        dimmed = (pixels.permute(1, 2, 0).numpy().astype(float) * 0.35).round()
        assert np.abs(np.asarray(picture)[outside] - dimmed[outside]).max() <= 1


def test_the_hottest_spot_stays_where_the_map_puts_it():
    """A map hot only in its top-left cell, over a crop box: the reddest pixel is near the box's top-left corner."""
    pixels = torch.full((3, 300, 400), 128, dtype=torch.uint8)
    heat = torch.zeros(4, 4)
    heat[0, 0] = 1.0
    box = (100.0, 50.0, 300.0, 250.0)
    picture = np.asarray(overlay_picture(pixels, heat, box, alpha=1.0, cmap="gray")).astype(int)
    y, x = np.unravel_index(picture[..., 0].argmax(), picture.shape[:2])
    assert (x, y) == (100, 50)  # bilinear upsampling keeps the cell's centre value at its corner pixels
    assert picture[0, 0, 0] == round(128 * 0.35)  # outside the box: dimmed


def test_overlay_of_a_full_resolution_map_keeps_its_api():
    pixels = image_to_tensor(photo())
    heat = torch.rand(pixels.shape[1], pixels.shape[2])
    seen = torch.ones_like(heat, dtype=torch.bool)
    blended = overlay(pixels, heat, alpha=0.5, cmap="viridis", seen=seen)
    assert blended.dtype == torch.uint8 and blended.shape == pixels.shape
    reference = float_overlay(pixels, heat, seen, 0.5, "viridis")
    assert np.abs(blended.permute(1, 2, 0).numpy().astype(int) - reference).max() <= 2


def test_heat_weighted_opacity_leaves_the_photo_alone_where_there_is_no_heat():
    pixels = image_to_tensor(photo())
    heat = torch.zeros(8, 8)
    heat[2:4, 2:4] = 1.0
    box = (0.0, 0.0, float(pixels.shape[2]), float(pixels.shape[1]))
    picture = np.asarray(overlay_picture(pixels, heat, box, alpha=0.8, cmap="inferno", opacity_from_heat=True))
    original = pixels.permute(1, 2, 0).numpy()
    np.testing.assert_array_equal(picture[-5:, -5:], original[-5:, -5:])  # no heat there
    assert np.abs(picture.astype(int) - original).max() > 100  # where the heat is


# --- files: readable, metadata, atomic, permissions -------------------------------------------------------


@pytest.mark.parametrize("file_format", ["png", "jpg", "webp"])
def test_each_format_is_readable_and_carries_the_metadata(tmp_path, file_format):
    picture = photo()
    path = write_image(picture, tmp_path / f"overlay{SUFFIXES[file_format]}", METADATA, quality=85)
    with Image.open(path) as written:
        assert written.format == {"png": "PNG", "jpg": "JPEG", "webp": "WEBP"}[file_format]
        assert written.size == picture.size and written.mode == "RGB"
        written.load()
        difference = np.abs(np.asarray(written).astype(int) - np.asarray(picture).astype(int)).mean()
        assert difference == 0 if file_format == "png" else difference < 6
    expected = {**METADATA, "hookviz:input": "photos/caf\\udce9.jpg"}  # the lone surrogate, escaped as PNG text was
    assert read_metadata(path) == expected


def test_png_text_chunks_are_what_pillow_reads(tmp_path):
    path = write_png(photo(), tmp_path / "a.png", METADATA)
    with Image.open(path) as written:
        assert written.text["hookviz:label"] == "chat tigré 猫"
        assert written.text["hookviz:method"] == "gradcam"
    raw = path.read_bytes()
    assert b"tEXthookviz:method" in raw and b"iTXthookviz:label" in raw


@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA", "P", "I;16"])
def test_png_keeps_every_pixel_of_every_mode(mode):
    rng = np.random.default_rng(0)
    source = Image.fromarray(rng.integers(0, 255, (37, 53, 3), dtype=np.uint8)).convert(mode)
    if mode == "RGBA":
        source.putalpha(Image.fromarray(rng.integers(0, 255, (37, 53), dtype=np.uint8)))
    import io

    decoded = Image.open(io.BytesIO(encode_image(source, "png", {"k": "v"})))
    assert decoded.mode == source.mode
    np.testing.assert_array_equal(np.asarray(decoded), np.asarray(source))


def test_jpeg_metadata_is_exif_json_a_viewer_shows(tmp_path):
    path = write_image(photo(), tmp_path / "a.jpg", METADATA)
    with Image.open(path) as written:
        exif = written.getexif()
        described = json.loads(exif[EXIF_DESCRIPTION])
        comment = exif.get_ifd(EXIF_IFD)[EXIF_USER_COMMENT]
    assert described["hookviz:label"] == "chat tigré 猫"
    assert comment.startswith(b"ASCII\0\0\0") and json.loads(comment[8:]) == described


@pytest.mark.parametrize("file_format", ["png", "jpg", "webp"])
def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch, file_format):
    path = tmp_path / f"overlay{SUFFIXES[file_format]}"
    write_image(photo(), path, METADATA)
    before = path.read_bytes()

    def disk_full(self, data):
        raise OSError(28, "No space left on device")

    import tempfile

    monkeypatch.setattr(tempfile._TemporaryFileWrapper, "write", disk_full, raising=False)
    with pytest.raises(OSError, match="No space"):
        write_image(Image.new("RGB", (20, 10)), path, METADATA)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]


def test_a_bad_quality_is_a_usage_error_and_writes_nothing(tmp_path):
    with pytest.raises(UsageError, match="--quality 0 is out of range"):
        write_image(photo(), tmp_path / "a.jpg", quality=0)
    assert list(tmp_path.iterdir()) == []


def test_every_format_gets_the_permissions_of_a_png(tmp_path):
    modes = {
        file_format: stat.S_IMODE(os.stat(write_image(photo(), tmp_path / f"a{suffix}")).st_mode)
        for file_format, suffix in SUFFIXES.items()
    }
    umask = os.umask(0)
    os.umask(umask)
    assert set(modes.values()) == {0o666 & ~umask}


# --- the commands ---------------------------------------------------------------------------------------


@pytest.fixture
def project(project, monkeypatch):
    """The project folder (conftest.py) as the working directory: the commands below name paths in it."""
    monkeypatch.chdir(project)
    return project


@pytest.mark.parametrize("file_format", ["jpg", "webp"])
def test_gradcam_writes_the_chosen_format_with_the_records_metadata(project, file_format):
    image_folder(project / "photos", 3)
    write_noise_image(project / "more" / "img00.png", seed=9)  # the same stem as photos/img00.png
    result = hookviz(*GRADCAM, "photos", "more", "--format", file_format, "--quality", "70", "--json", "-o", "out")
    assert result.exit_code == 0, result.stderr
    records = json_lines(result.stdout)
    paths = [Path(output["png"]) for record in records for output in record["outputs"]]
    assert len(paths) == 4 and len(set(paths)) == 4  # one picture per input, never sharing a name
    for record, path in zip(records, paths, strict=True):
        assert path.suffix == SUFFIXES[file_format] and path.is_file()
        output = record["outputs"][0]
        metadata = read_metadata(path)
        assert metadata["hookviz:class"] == str(output["class"])
        assert metadata["hookviz:label"] == output["label"]
        assert float(metadata["hookviz:probability"]) == pytest.approx(output["score"], abs=1e-6)
        assert metadata["hookviz:input"] == record["input"]
        with Image.open(path) as picture:
            assert picture.format == {"jpg": "JPEG", "webp": "WEBP"}[file_format]
    assert not list((project / "out").rglob("*.png"))
    run = read_manifest(project / "out")[0]
    assert run["settings"]["format"] == file_format and run["settings"]["quality"] == 70


def test_skip_existing_knows_jpeg_outputs_and_a_png_run_is_not_a_jpeg_run(project):
    image_folder(project / "photos", 2)
    first = hookviz(*GRADCAM, "photos", "--format", "jpg", "-q", "-o", "out")
    assert first.exit_code == 0, first.stderr
    again = hookviz(*GRADCAM, "photos", "--format", "jpg", "--skip-existing", "--json", "-o", "out")
    assert [record["status"] for record in json_lines(again.stdout)] == ["skipped", "skipped"]
    as_png = hookviz(*GRADCAM, "photos", "--skip-existing", "--json", "-o", "out")
    assert [record["status"] for record in json_lines(as_png.stdout)] == ["ok", "ok"]
    assert len(list((project / "out").rglob("*.png"))) == 2 and len(list((project / "out").rglob("*.jpg"))) == 2


def test_existing_jpeg_outputs_need_overwrite(project):
    image_folder(project / "photos", 1)
    assert hookviz(*GRADCAM, "photos", "--format", "jpg", "-q", "-o", "out").exit_code == 0
    refused = hookviz(*GRADCAM, "photos", "--format", "jpg", "-q", "-o", "out")
    assert refused.exit_code == 2 and "--overwrite" in refused.stderr


def test_fmaps_grids_as_webp_and_the_gallery_links_them(project):
    image_folder(project / "photos", 2)
    result = hookviz(*FMAPS, "photos", "--format", "webp", "--html", "--json", "-o", "out")
    assert result.exit_code == 0, result.stderr
    grids = [Path(output["png"]) for record in json_lines(result.stdout) for output in record["outputs"]]
    assert grids and all(grid.suffix == ".webp" and grid.is_file() for grid in grids)
    page = (project / "out" / "index.html").read_text(encoding="utf-8")
    for grid in grids:
        assert f'href="{grid.parent.name}/{grid.name}"' in page


def test_guided_pictures_as_jpeg(project):
    image_folder(project / "photos", 1)
    result = hookviz(
        "guided",
        "nets:build_batchnet",
        "--size",
        "32",
        "-l",
        "relu2",
        "photos",
        "--format",
        "jpg",
        "--json",
        "-o",
        "out",
    )
    assert result.exit_code == 0, result.stderr
    names = sorted(Path(output["png"]).name for output in json_lines(result.stdout)[0]["outputs"])
    assert len(names) == 2 and all(name.endswith(".jpg") for name in names)
    assert names[0].startswith("guided-gradcam_relu2_c") and names[1].startswith("guided_c")


def test_an_unknown_format_is_a_usage_error(project):
    image_folder(project / "photos", 1)
    result = hookviz(*GRADCAM, "photos", "--format", "gif", "-o", "out")
    assert result.exit_code == 2 and "'gif' is not one of 'png', 'jpg', 'webp'" in result.stderr
