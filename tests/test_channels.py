"""Models that take one input channel (MNIST-style, medical and document images), and ones hookviz cannot feed.

hookviz gradcam nets:build_graynet photo.png --size 28 --mean 0.5 --std 0.5
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from cli_helpers import hookviz, json_lines, write_noise_image
from PIL import Image

from hookviz.models import load_model

GRAY = ["nets:build_graynet", "--size", "28"]


@pytest.fixture
def photo(tmp_path: Path) -> Path:
    return write_noise_image(tmp_path / "photo.png", 56, 42, seed=5)


def reference_input(photo: Path, mean: float, std: float) -> torch.Tensor:
    """What the model should see, by hand: resize, Pillow's luma conversion, normalize."""
    gray = Image.open(photo).convert("RGB").resize((28, 28), Image.Resampling.BILINEAR).convert("L")
    pixels = torch.from_numpy(np.asarray(gray, dtype=np.float32) / 255.0)
    return ((pixels - mean) / std)[None, None]


def test_a_grayscale_model_gets_grayscale_input_and_one_mean(tmp_path, photo, nets):
    """It used to fail with "expected input[1, 3, 28, 28] to have 1 channels", and --mean 0.5 was refused."""
    result = hookviz("gradcam", *GRAY, photo, "--mean", "0.5", "--std", "0.25", "--json", "-o", tmp_path / "out")

    assert result.exit_code == 0, result.stderr
    (record,) = json_lines(result.stdout)
    with torch.no_grad():
        expected = nets.build_graynet()(reference_input(photo, 0.5, 0.25)).softmax(1)[0]
    assert record["predictions"][0]["class"] == int(expected.argmax())
    assert record["predictions"][0]["score"] == pytest.approx(float(expected.max()), abs=1e-5)
    with Image.open(record["outputs"][0]["png"]) as overlay:
        assert overlay.mode == "RGB"  # drawn on the colour photo, as the user sees it


def test_a_grayscale_model_defaults_to_imagenets_statistics_averaged(nets):
    loaded = load_model("nets:build_graynet", device="cpu")

    assert loaded.preprocessing.channels == 1
    assert loaded.preprocessing.mean == pytest.approx((0.449,), abs=1e-3)
    assert loaded.preprocessing.std == pytest.approx((0.226,), abs=1e-3)


def test_guided_backprop_on_a_grayscale_model(tmp_path, photo, nets):
    result = hookviz("guided", *GRAY, photo, "--json", "-o", tmp_path / "out", "-q")

    assert result.exit_code == 0, result.stderr
    (record,) = json_lines(result.stdout)
    assert [output["method"] for output in record["outputs"]] == ["guided", "guided-gradcam"]


def test_a_grayscale_pt2_reads_its_channels_from_the_program(tmp_path, photo, nets):
    program = torch.export.export(
        nets.build_graynet().eval(),
        (torch.randn(2, 1, 28, 28),),
        dynamic_shapes=({0: torch.export.Dim("batch", min=1)},),
    )
    torch.export.save(program, tmp_path / "gray.pt2")

    result = hookviz("gradcam", tmp_path / "gray.pt2", photo, "-l", "relu2", "--json", "-o", tmp_path / "out", "-q")

    assert result.exit_code == 0, result.stderr


@pytest.mark.parametrize(
    ("arguments", "expected"),
    [
        (["nets:build_graynet", "--mean", "0.1,0.2"], "--mean gives 2 values but the model takes 1-channel input"),
        (["nets:build_four_channel_net"], "the model takes 4-channel input; hookviz reads images as 1"),
    ],
)
def test_channels_that_cannot_be_fed_are_one_line(tmp_path, photo, nets, arguments, expected):
    result = hookviz("gradcam", *arguments, "--size", "28", photo, "-o", tmp_path / "out", "-q")

    assert result.exit_code == 2
    (line,) = result.stderr.splitlines()
    assert expected in line


def test_one_mean_for_an_rgb_model_is_used_for_every_channel(nets):
    loaded = load_model("nets:build_tinynet", mean=(0.5,), std=(0.25,), device="cpu")

    assert (loaded.preprocessing.mean, loaded.preprocessing.std) == ((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
