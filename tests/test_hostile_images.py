"""Hostile and broken images: each bad file is one error line (in load_image, and as a record of a run that goes
on with the good ones), decompression bombs are refused, and extreme sizes decode.

The fuzzing of load_image is in test_image_fuzz.py.
"""

from __future__ import annotations

import io
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from cli_helpers import (
    GRADCAM,
    RED,
    TINY,
    hookviz,
    image_folder,
    inputs_of,
    json_lines,
    pngs_of,
    read_manifest,
    write_broken,
    write_solid_png,
)
from PIL import Image

from hookviz.errors import InputError
from hookviz.images import load_image

# --- hostile and broken images --------------------------------------------------------------------


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def bomb_png(width: int, height: int) -> bytes:
    """A 100-byte PNG whose header declares width x height RGB pixels (its pixel data is a few bytes)."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + _png_chunk(b"IEND", b"")
    )


def truncated_png() -> bytes:
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(noise).save(buffer, "PNG")
    return buffer.getvalue()[: len(buffer.getvalue()) // 2]


@pytest.fixture
def hostile_folder(tmp_path, tmp_images) -> tuple[Path, dict[str, str | None]]:
    """A folder of images, good and bad: (folder, {file name: expected error fragment, or None if it decodes})."""
    folder = tmp_path / "hostile"
    folder.mkdir()
    expected: dict[str, str | None] = {}

    def copy(kind: str, name: str, error: str | None) -> None:
        shutil.copy(tmp_images[kind], folder / name)
        expected[name] = error

    def write(name: str, data: bytes, error: str | None) -> None:
        (folder / name).write_bytes(data)
        expected[name] = error

    write_solid_png(folder / "good.png")
    expected["good.png"] = None
    copy("truncated_jpeg", "truncated.jpg", "cannot decode image")
    write("truncated.png", truncated_png(), "cannot decode image (image file is truncated)")
    copy("fake_jpeg", "text.jpg", "not an image hookviz can read")
    copy("empty_png", "empty.png", "not an image hookviz can read")
    write(
        "bomb.png",
        bomb_png(20000, 20000),
        "possible decompression bomb; if you trust it, raise the limit with --max-pixels",
    )
    write_solid_png(folder / "one_pixel.png", size=(1, 1))
    expected["one_pixel.png"] = None
    write_solid_png(folder / "long.png", size=(10000, 100))
    expected["long.png"] = None
    copy("gray16_png", "gray16.png", None)
    copy("cmyk_jpeg", "cmyk.jpg", None)
    copy("animated_gif", "animated.gif", None)  # frame 0 RED, frame 1 BLUE
    return folder, expected


@pytest.mark.parametrize("name, size", [("one_pixel.png", (1, 1)), ("long.png", (10000, 100))])
def test_extreme_sizes_decode_to_rgb(hostile_folder, name, size):
    """A 1x1 and a 10000x100 image decode to RGB at their own size."""
    folder, _ = hostile_folder

    image = load_image(folder / name)

    assert image.mode == "RGB" and image.size == size
    assert image.getpixel((size[0] - 1, size[1] - 1)) == RED


@pytest.mark.parametrize("name", ["truncated.png", "bomb.png"])
def test_truncated_png_and_decompression_bomb_raise_one_line_input_errors(hostile_folder, name):
    """A PNG cut in half, and a 100-byte PNG declaring 20000x20000 pixels, are one-line InputErrors naming the file."""
    folder, expected = hostile_folder

    with pytest.raises(InputError) as info:
        load_image(folder / name)

    message = str(info.value)
    assert message.startswith(f"{folder / name}: ") and expected[name] in message
    assert "\n" not in message


@pytest.mark.parametrize("workers", [0, 1], ids=["in-process", "worker-process"])
def test_a_folder_of_hostile_images_fails_only_the_bad_ones(hostile_folder, tmp_path, nets, workers):
    """One folder run: each bad image is one error line, the good ones are written, the exit code is 1."""
    folder, expected = hostile_folder
    out = tmp_path / "out"

    result = hookviz(
        "fmaps",
        *TINY,
        folder,
        "-l",
        "inp",
        "-l",
        "relu2",
        "--mean",
        "0,0,0",
        "--std",
        "1,1,1",
        "--save-raw",
        "--workers",
        workers,
        "-o",
        out,
        "--json",
        "-q",
    )

    assert result.exit_code == 1, result.stderr
    records = json_lines(result.stdout)
    assert [Path(record["input"]).name for record in records] == sorted(expected)
    errors = []
    for record in records:
        name = Path(record["input"]).name
        if expected[name] is None:
            assert record["status"] == "ok", record
            assert all(Path(output["png"]).is_file() for output in record["outputs"])
        else:
            assert record["status"] == "error" and record["outputs"] == []
            assert record["error"].startswith(f"{folder / name}: ") and expected[name] in record["error"]
            assert not (out / Path(name).stem).exists()
            errors.append(f"hookviz: error: {record['error']}")
    assert result.stderr.splitlines() == errors  # one line per failed image, nothing else
    assert "Traceback" not in result.stderr

    # The animated GIF's first frame (red) is what the model saw: --save-raw of the Identity input layer
    # with mean 0 and std 1 is the model input in [0, 1].
    (gif,) = (record for record in records if record["input"].endswith("animated.gif"))
    pixels = np.load(next(output["raw"] for output in gif["outputs"] if output["layer"] == "inp"))
    assert pixels.shape == (3, 32, 32)
    assert abs(pixels[0].mean() - RED[0] / 255) < 0.03 and abs(pixels[2].mean() - RED[2] / 255) < 0.03


def test_max_pixels_refuses_a_larger_image_and_a_higher_limit_accepts_it(tmp_path, nets):
    """`--max-pixels 1000` makes a 300x300 image one error mentioning --max-pixels; `--max-pixels 100000` accepts it."""
    image = write_solid_png(tmp_path / "square.png", size=(300, 300))
    out = tmp_path / "out"

    refused = hookviz("gradcam", *TINY, image, "--max-pixels", "1000", "-o", out, "-q")
    accepted = hookviz("gradcam", *TINY, image, "--max-pixels", "100000", "-o", out, "-q")

    assert refused.exit_code == 1
    assert refused.stderr == (
        f"hookviz: error: {image}: image has more than 1,000 pixels, a possible decompression bomb; "
        "if you trust it, raise the limit with --max-pixels\n"
    )
    assert accepted.exit_code == 0, accepted.stderr
    assert accepted.stderr == ""
    assert len(accepted.stdout.splitlines()) == 1 and Path(accepted.stdout.strip()).is_file()


def test_max_pixels_applies_to_one_call_and_leaves_pillows_global_limit_alone(tmp_path, hostile_folder):
    """load_image(max_pixels=N) refuses above N (also between N and 2N, where Pillow only warns), accepts at N,
    and Image.MAX_IMAGE_PIXELS is the same afterwards, after a success or a failure."""
    folder, _ = hostile_folder
    square = write_solid_png(tmp_path / "square.png", size=(300, 300))  # 90,000 pixels
    global_limit = Image.MAX_IMAGE_PIXELS

    for limit in (1_000, 60_000):  # 60,000 < 90,000 < 2 x 60,000: Pillow's warning range
        with pytest.raises(InputError, match="--max-pixels"):
            load_image(square, max_pixels=limit)
        assert Image.MAX_IMAGE_PIXELS == global_limit
    assert load_image(square, max_pixels=90_000).size == (300, 300)
    assert Image.MAX_IMAGE_PIXELS == global_limit
    with pytest.raises(InputError, match="decompression bomb"):
        load_image(folder / "bomb.png")
    assert Image.MAX_IMAGE_PIXELS == global_limit
    with pytest.raises(InputError, match="truncated"):  # past the check with a high limit, then the data runs out
        load_image(folder / "bomb.png", max_pixels=10**9)
    assert Image.MAX_IMAGE_PIXELS == global_limit


# --- broken images in a batch run -----------------------------------------------------------------


def test_broken_images_get_error_records_and_the_rest_goes_on(project):
    """A folder with an empty, a text and a truncated "image": exit 1, one-line error records naming each
    bad file (stdout, manifest and stderr), outputs for every good image, no traceback."""
    folder = project / "photos"
    good = image_folder(folder, 3)
    broken = write_broken(folder)
    out = project / "out"

    result = hookviz(*GRADCAM, folder, "--json", "-o", out)

    assert result.exit_code == 1
    records = {record["input"]: record for record in json_lines(result.stdout)}
    assert set(records) == {str(path) for path in [*good, *broken.values()]}
    for path in good:
        assert records[str(path)]["status"] == "ok"
        assert all(Path(png).is_file() for png in pngs_of([records[str(path)]]))
    for path in broken.values():
        record = records[str(path)]
        assert record["status"] == "error" and record["outputs"] == []
        assert record["error"].startswith(str(path)) and "\n" not in record["error"]
        assert f"hookviz: error: {path}" in result.stderr
        assert not (out / path.stem).exists()
    manifest = {entry["input"]: entry for entry in inputs_of(read_manifest(out))}
    assert {key: manifest[key]["status"] for key in manifest} == {key: records[key]["status"] for key in records}
    assert "3 ok, 3 failed" in result.stderr


@pytest.mark.parametrize("workers", [0, 2])
def test_fail_fast_stops_at_the_first_failure(project, workers):
    """--fail-fast: the first broken input ends the run (exit 1), so there are fewer records than inputs."""
    folder = project / "photos"
    image_folder(folder, 4)  # img00..img03 sort after the broken empty.png
    write_broken(folder)
    out = project / "out"

    result = hookviz(*GRADCAM, folder, "--json", "--fail-fast", "--workers", workers, "--batch-size", "2", "-o", out)

    assert result.exit_code == 1
    records = json_lines(result.stdout)
    assert [record["status"] for record in records] == ["error"]
    assert records[0]["input"] == str(folder / "empty.png")
    assert "--fail-fast" in result.stderr
    assert inputs_of(read_manifest(out)) == [{"type": "input", "run": read_manifest(out)[0]["run"], **records[0]}]
