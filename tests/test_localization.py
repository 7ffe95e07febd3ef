"""End to end: the heat sits on the object, in the original image's own pixel coordinates.

A tiny CNN (conv-pool-conv-pool-conv, global average pooling, linear) is trained here for a
few seconds to tell the colour of a square on a noisy grey background: class 0 "red", class
1 "blue". Only the square's pixels say which class an image is, so a correct class map must
peak on the square. The originals are 96x192 (HxW) while the model sees 48x96, and the
squares sit away from the centre (top-left / bottom-right), so a heatmap that is mapped back
with the wrong scale, a swapped axis or a forgotten crop lands off the square.

    hookviz gradcam nets:build_colournet IMG --state-dict trained.pt --size 48x96 \
        --mean 0.5,0.5,0.5 --std 0.5,0.5,0.5 --labels labels.txt -l relu3 --save-raw --json -o OUT
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from nets import seeded
from PIL import Image

from hookviz.cli import main

MODEL = "nets:build_colournet"
LABELS = ["red", "blue"]
COLOURS = np.array([[0.85, 0.15, 0.15], [0.15, 0.15, 0.85]])
MODEL_H, MODEL_W = 48, 96
ORIGINAL_H, ORIGINAL_W = 96, 192
# (left, top, right, bottom) of the 32x32 square in the 96x192 original
PLACEMENTS = {"left": (40, 12, 72, 44), "right": (136, 56, 168, 88)}
METHODS = ["gradcam", "gradcam++", "xgradcam", "layercam", "hirescam", "scorecam", "eigencam", "cam"]


def training_batch(rng: np.random.Generator, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """n model-sized scenes: a square of 10-21 px anywhere, of the class's colour, on grey noise; normalized (x - 0.5) / 0.5."""
    labels = rng.integers(0, 2, n)
    grey = rng.uniform(0.3, 0.7, (n, 1, 1, 1))
    noise = rng.uniform(0.02, 0.2, (n, 1, 1, 1)) * rng.standard_normal((n, MODEL_H, MODEL_W, 3))
    images = grey + noise
    for i in range(n):
        side = rng.integers(10, 22)
        top, left = rng.integers(0, MODEL_H - side + 1), rng.integers(0, MODEL_W - side + 1)
        images[i, top : top + side, left : left + side] = COLOURS[labels[i]] + rng.uniform(-0.1, 0.1, 3)
    pixels = torch.from_numpy(np.clip(images, 0, 1)).float().permute(0, 3, 1, 2)
    return (pixels - 0.5) / 0.5, torch.from_numpy(labels)


@pytest.fixture(scope="module")
def project(tmp_path_factory, nets):
    """A folder with trained.pt (the trained state_dict of nets.build_colournet()) and labels.txt."""
    folder = tmp_path_factory.mktemp("colournet")
    (folder / "labels.txt").write_text("\n".join(LABELS) + "\n")
    with seeded(0):
        model = nets.build_colournet()
        torch.nn.init.zeros_(model.fc.weight)  # with softmax, the two rows then stay opposite: no shared component
        optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
        rng = np.random.default_rng(0)
        for _ in range(100):
            images, labels = training_batch(rng, 32)
            loss = F.cross_entropy(model(images), labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.eval()
    images, labels = training_batch(np.random.default_rng(1), 200)
    with torch.no_grad():
        accuracy = (model(images).argmax(dim=1) == labels).float().mean()
    assert accuracy > 0.95, f"the model did not learn the task (accuracy {accuracy:.2f})"
    torch.save(model.state_dict(), folder / "trained.pt")
    return folder


def scene(
    path: Path, colour: int, box: tuple[int, int, int, int], size=(ORIGINAL_H, ORIGINAL_W), seed: int = 5
) -> Path:
    """An original image: grey noise with a square of LABELS[colour] at box, saved as PNG."""
    rng = np.random.default_rng(seed)
    pixels = 0.5 + 0.1 * rng.standard_normal((*size, 3))
    left, top, right, bottom = box
    pixels[top:bottom, left:right] = COLOURS[colour]
    Image.fromarray((np.clip(pixels, 0, 1) * 255).round().astype(np.uint8)).save(path)
    return path


def run_gradcam(project: Path, images: list[Path], out: Path, *extra: str) -> list[dict]:
    args = [
        MODEL,
        *map(str, images),
        "--state-dict",
        str(project / "trained.pt"),
        "--size",
        f"{MODEL_H}x{MODEL_W}",
        "--mean",
        "0.5,0.5,0.5",
        "--std",
        "0.5,0.5,0.5",
        "--labels",
        str(project / "labels.txt"),
        "-l",
        "relu3",
        "--save-raw",
        "--json",
        "--no-caption",  # overlays exactly at the original's size
        "-o",
        str(out),
        "-q",
        *extra,
    ]
    result = CliRunner().invoke(main, ["gradcam", *args])
    assert result.exit_code == 0, result.output
    return [json.loads(line) for line in result.stdout.splitlines()]


@pytest.mark.parametrize("method", METHODS)
def test_heat_sits_on_the_object_in_original_coordinates(project, tmp_path, method):
    cases = [(colour, placement) for colour in (0, 1) for placement in PLACEMENTS]
    images = [scene(tmp_path / f"{LABELS[c]}_{p}.png", c, PLACEMENTS[p]) for c, p in cases]

    records = run_gradcam(project, images, tmp_path / "out", "-m", method)

    assert [record["input"] for record in records] == [str(path) for path in images]
    for (colour, placement), record in zip(cases, records):
        assert record["predictions"][0]["label"] == LABELS[colour]
        (output,) = record["outputs"]  # default: the top-1 class only
        if method == "eigencam":  # class-independent: one map, naming no class
            assert (output["class"], output["class_independent"], output["method"]) == (None, True, method)
        else:
            assert (output["class"], output["label"], output["method"]) == (colour, LABELS[colour], method)
        heat = np.load(output["raw"])
        assert heat.shape == (ORIGINAL_H, ORIGINAL_W) and heat.dtype == np.float32
        assert Image.open(output["png"]).size == (ORIGINAL_W, ORIGINAL_H)

        left, top, right, bottom = PLACEMENTS[placement]
        peak_y, peak_x = np.unravel_index(np.argmax(heat), heat.shape)
        assert left <= peak_x < right and top <= peak_y < bottom, f"{placement}: peak at x={peak_x}, y={peak_y}"
        on_object = np.zeros(heat.shape, dtype=bool)
        on_object[top:bottom, left:right] = True
        assert heat[on_object].mean() > 0.5
        assert heat[~on_object].mean() < 0.2


def pixels_seen_after_crop(width: int, height: int, crop_h: int, crop_w: int, resize: int) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of the original pixels that torchvision's Resize(resize) + CenterCrop keeps.

    Found empirically: every pixel of an image stores its own (x, y), and nearest-neighbour resizing
    carries those coordinates into the crop.
    """
    from torchvision import transforms

    coordinates = np.zeros((height, width, 3), dtype=np.uint8)
    xs = np.arange(width)
    coordinates[..., 0], coordinates[..., 1] = xs % 256, xs // 256
    coordinates[..., 2] = np.arange(height)[:, None]
    transform = transforms.Compose(
        [
            transforms.Resize(resize, interpolation=transforms.InterpolationMode.NEAREST),
            transforms.CenterCrop((crop_h, crop_w)),
        ]
    )
    crop = np.asarray(transform(Image.fromarray(coordinates))).astype(int)
    x, y = crop[..., 0] + 256 * crop[..., 1], crop[..., 2]
    return int(x.min()), int(y.min()), int(x.max()) + 1, int(y.max()) + 1


def test_crop_maps_the_heat_back_into_the_crop_box(project, tmp_path):
    """A 96x384 original with --crop: the model sees only the centre (shorter side resized to
    round(48 * 256 / 224) = 55, the ImageNet ratio, then a 48x96 centre crop)."""
    height, width = 96, 384
    left, top, right, bottom = pixels_seen_after_crop(
        width, height, MODEL_H, MODEL_W, resize=round(MODEL_H * 256 / 224)
    )
    assert 100 < left < right < 290  # the crop is a centre part of the width
    square = (left + 14, 30, left + 44, 60)  # inside the crop, near its left edge, not at its centre
    image = scene(tmp_path / "wide.png", 0, square, size=(height, width))

    (record,) = run_gradcam(project, [image], tmp_path / "out", "--crop")
    (output,) = record["outputs"]
    assert output["label"] == "red"
    heat = np.load(output["raw"])
    assert heat.shape == (height, width)

    margin = 2  # pixels: the box edges fall between original pixels
    outside = np.ones(heat.shape, dtype=bool)
    outside[max(0, top - margin) : bottom + margin, left - margin : right + margin] = False
    assert np.all(heat[outside] == 0)
    peak_y, peak_x = np.unravel_index(np.argmax(heat), heat.shape)
    assert square[0] <= peak_x < square[2] and square[1] <= peak_y < square[3]

    overlay = np.asarray(Image.open(output["png"]).convert("RGB")).astype(float)
    original = np.asarray(Image.open(image)).astype(float)
    assert overlay.shape == original.shape == (height, width, 3)
    # What the model did not see is the original, dimmed, with no heat colour (rows below the caption band).
    unseen = outside.copy()
    unseen[:24] = False
    factor = overlay[unseen].sum() / original[unseen].sum()
    assert factor < 0.7
    np.testing.assert_allclose(overlay[unseen], original[unseen] * factor, atol=1.5)
    # On the object, the heat colour is blended in.
    assert np.abs(overlay[peak_y, peak_x] - original[peak_y, peak_x] * factor).max() > 30
