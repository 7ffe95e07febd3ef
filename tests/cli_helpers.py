"""Helpers the CLI tests share: run the command in-process, read JSON Lines and the manifest, write test photos.

Batch runs in the tests use one model, ``nets:build_batchnet`` (tests/nets.py) at 32x32:

    hookviz gradcam nets:build_batchnet photos/ --size 32 -l relu2 --json -o OUT

and the reliability tests (bad arguments, hostile images, output paths) ``nets:build_tinynet``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from click.testing import CliRunner, Result
from PIL import Image

from hookviz.cli import main

RED, GREEN, BLUE = (220, 30, 30), (30, 200, 40), (30, 40, 220)

BATCHNET = "nets:build_batchnet"  # MODEL of the batch-run tests
SIZE = ["--size", "32"]
GRADCAM = ["gradcam", BATCHNET, *SIZE, "-l", "relu2"]
FMAPS = ["fmaps", BATCHNET, *SIZE, "-l", "conv2", "--max-channels", "4"]
TINY = ["nets:build_tinynet", "--size", "32"]  # MODEL and its input size


def hookviz(*args: object, stdin: str | None = None) -> Result:
    """Run ``hookviz ARGS`` in-process (stdout and stderr kept apart); fail on any crash or traceback."""
    result = CliRunner().invoke(main, [str(a) for a in args], input=stdin)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise AssertionError(f"hookviz crashed: {result.exception!r}\n{result.stderr}") from result.exception
    for text in (result.stdout, result.stderr):
        assert "Traceback" not in text
    return result


def json_lines(text: str) -> list[dict]:
    """Every line of ``text`` parsed as JSON (fails on any line that is not)."""
    return [json.loads(line) for line in text.splitlines()]


def assert_usage_error(result: Result, expected_line: str) -> None:
    """Exit code 2, nothing on stdout, and stderr is exactly the one error line."""
    assert result.exit_code == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr == f"hookviz: error: {expected_line}\n"
    assert result.stdout == ""


# --- test photos ---------------------------------------------------------------------------------


def write_noise_image(path: Path, width: int = 64, height: int = 48, *, seed: int) -> Path:
    """Seeded noise with a flat disc somewhere, so predictions, activations and maps differ from image to image.

    A JPEG (quality 90) when the name ends in .jpg or .jpeg, else a PNG, whatever the name; parent folders are made.
    """
    rng = np.random.default_rng(seed)
    pixels = rng.uniform(0, 255, (height, width, 3))
    cy, cx = rng.integers(0, height), rng.integers(0, width)
    yy, xx = np.mgrid[:height, :width]
    pixels[(yy - cy) ** 2 + (xx - cx) ** 2 < (min(width, height) // 4) ** 2] = rng.uniform(0, 255, 3)
    path.parent.mkdir(parents=True, exist_ok=True)
    jpeg = path.suffix.lower() in (".jpg", ".jpeg")
    options = {"format": "JPEG", "quality": 90} if jpeg else {"format": "PNG"}
    Image.fromarray(pixels.astype(np.uint8)).save(path, **options)  # a format: PIL reads no suffix in "...png"
    return path


def write_solid_png(path: Path, size: tuple[int, int] = (40, 30), colour: tuple[int, int, int] = RED) -> Path:
    """A PNG of one colour, ``size`` = (width, height)."""
    Image.new("RGB", size, colour).save(path, "PNG")
    return path


def image_folder(folder: Path, count: int, seed: int = 0) -> list[Path]:
    """``count`` PNGs img00.png, img01.png, ... in ``folder``: the order hookviz lists the folder in."""
    return [write_noise_image(folder / f"img{i:02d}.png", seed=seed + i) for i in range(count)]


def write_broken(folder: Path) -> dict[str, Path]:
    """Three files with image suffixes that do not decode: zero bytes, text, a JPEG cut in half."""
    folder.mkdir(parents=True, exist_ok=True)
    whole = write_noise_image(folder.parent / "whole.jpg", 256, 192, seed=99)
    data = whole.read_bytes()
    whole.unlink()
    broken = {"empty": folder / "empty.png", "text": folder / "text.jpg", "truncated": folder / "truncated.jpg"}
    broken["empty"].write_bytes(b"")
    broken["text"].write_text("this is not a JPEG, just text\n")
    broken["truncated"].write_bytes(data[: len(data) // 2])
    return broken


# --- what a run leaves in -o DIR -----------------------------------------------------------------


def read_manifest(out: Path) -> list[dict]:
    """DIR/manifest.jsonl as a list: asserts it is valid JSON Lines (whole lines only, each an object)."""
    text = (out / "manifest.jsonl").read_text(encoding="utf-8")
    assert text.endswith("\n"), "the manifest ends in a half-written line"
    entries = [json.loads(line) for line in text.splitlines()]
    assert all(isinstance(entry, dict) and entry.get("type") in ("run", "input") for entry in entries)
    return entries


def inputs_of(entries: list[dict]) -> list[dict]:
    return [entry for entry in entries if entry["type"] == "input"]


def pngs_of(records: list[dict]) -> list[str]:
    return [output["png"] for record in records for output in record["outputs"]]


def mtimes(paths) -> dict[str, int]:
    return {str(path): os.stat(path).st_mtime_ns for path in paths}


def assert_no_partial_files(out: Path) -> None:
    """No temporary file is left and every PNG under ``out`` is complete."""
    assert sorted(out.rglob("*.tmp")) == []
    assert_pngs_complete(out)


def assert_pngs_complete(out: Path) -> None:
    for png in out.rglob("*.png"):
        with Image.open(png) as image:
            image.verify()  # raises on a truncated or corrupt file
