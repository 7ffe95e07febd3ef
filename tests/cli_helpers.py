"""Helpers the CLI tests share: run the command in-process, read JSON Lines, write test photos."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from click.testing import CliRunner, Result
from PIL import Image

from hookviz.cli import main


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


def write_noise_image(path: Path, width: int, height: int, seed: int) -> Path:
    """Noise with a flat disc somewhere, so predictions, activations and maps differ from image to image."""
    rng = np.random.default_rng(seed)
    pixels = rng.uniform(0, 255, (height, width, 3))
    cy, cx = rng.integers(0, height), rng.integers(0, width)
    yy, xx = np.mgrid[:height, :width]
    pixels[(yy - cy) ** 2 + (xx - cx) ** 2 < (min(width, height) // 4) ** 2] = rng.uniform(0, 255, 3)
    Image.fromarray(pixels.astype(np.uint8)).save(path)
    return path
