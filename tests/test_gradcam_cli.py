"""`hookviz gradcam` through click's CliRunner, on a small seeded 10-class model given as package.module:callable.

Every expected class, score and heatmap is computed here independently: the model is
imported and run directly, with the image resized by PIL (bilinear) to the model size and
normalized with the --mean/--std the command is given.

    hookviz gradcam nets:build_clinet photo.png --size 32 --mean 0.5,0.5,0.5 --std 0.25,0.25,0.25 \
        -l relu2 --class 3 --class 5 --json -o OUT
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from cli_helpers import write_noise_image as write_image
from click.testing import CliRunner
from nets import build_clinet
from PIL import Image

from hookviz.cli import main

MODEL = "nets:build_clinet"  # 10 classes, seeded
NUM_CLASSES = 10
SIZE = 32
MEAN, STD = 0.5, 0.25
MODEL_OPTIONS = ["--size", str(SIZE), "--mean", f"{MEAN},{MEAN},{MEAN}", "--std", f"{STD},{STD},{STD}", "-q"]
LABELS = ["cat", "dog", "car", "ship", "tree", "house", "bird", "fish", "lamp", "cup"]
METHODS = ["gradcam", "gradcam++", "xgradcam", "layercam", "hirescam", "scorecam", "eigencam", "cam"]


@pytest.fixture
def project(project):
    """The project folder (conftest.py) with labels.txt."""
    (project / "labels.txt").write_text("\n".join(LABELS) + "\n")
    return project


def model_input(path: Path) -> torch.Tensor:
    image = Image.open(path).convert("RGB").resize((SIZE, SIZE), Image.Resampling.BILINEAR)
    pixels = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).float() / 255
    return ((pixels - MEAN) / STD)[None]


def reference_probabilities(path: Path) -> torch.Tensor:
    model = build_clinet().eval()
    with torch.no_grad():
        return model(model_input(path)).softmax(dim=1)[0]


def reference_gradcam(path: Path, class_index: int) -> torch.Tensor:
    """relu(sum_c mean_hw(dS/dA_c) A_c) at relu2, with a forward hook and torch.autograd.grad."""
    model = build_clinet().eval()
    kept = {}
    model.relu2.register_forward_hook(lambda module, inputs, output: kept.__setitem__("A", output))
    logits = model(model_input(path).requires_grad_(True))
    (gradient,) = torch.autograd.grad(logits[0, class_index], kept["A"])
    weights = gradient[0].mean(dim=(1, 2))
    return torch.relu(torch.einsum("c,chw->hw", weights, kept["A"][0].detach()))


def gradcam(*args: str) -> tuple[int, list[dict], str]:
    """Run `hookviz gradcam ARGS`: (exit code, JSON records from stdout, stderr)."""
    result = CliRunner().invoke(main, ["gradcam", *args])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    records = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    return result.exit_code, records, result.stderr


def minmax(values: np.ndarray) -> np.ndarray:
    return (values - values.min()) / (values.max() - values.min())


def test_two_classes_give_two_overlays_per_image(project):
    images = [write_image(project / "wide.png", 72, 40, seed=1), write_image(project / "tall.png", 30, 54, seed=2)]
    code, records, stderr = gradcam(
        MODEL,
        *map(str, images),
        *MODEL_OPTIONS,
        "-l",
        "relu2",
        "--class",
        "3",
        "--class",
        "5",
        "--json",
        "--no-caption",  # the overlay exactly at the original's size (a caption enlarges small images)
        "-o",
        str(project / "out"),
    )
    assert code == 0, stderr
    assert [record["input"] for record in records] == [str(path) for path in images]
    for path, record in zip(images, records):
        assert record["status"] == "ok"
        probabilities = reference_probabilities(path)

        predictions = record["predictions"]
        scores = [p["score"] for p in predictions]
        assert scores == sorted(scores, reverse=True) and sum(scores) <= 1 + 1e-6
        expected = probabilities.topk(len(predictions))
        assert [p["class"] for p in predictions] == expected.indices.tolist()
        np.testing.assert_allclose(scores, expected.values.numpy(), atol=2e-6)
        assert all(p["label"] == f"class {p['class']}" for p in predictions)  # no --labels: placeholder names

        assert [(o["method"], o["class"], o["layer"]) for o in record["outputs"]] == [
            ("gradcam", 3, "relu2"),
            ("gradcam", 5, "relu2"),
        ]
        pngs = [Path(o["png"]) for o in record["outputs"]]
        assert len(set(pngs)) == 2
        for output, png in zip(record["outputs"], pngs):
            assert output["label"] == f"class {output['class']}"
            assert output["score"] == pytest.approx(float(probabilities[output["class"]]), abs=2e-6)
            assert png.is_file() and (project / "out") in png.parents
            with Image.open(png) as overlay:
                assert overlay.size == Image.open(path).size  # (width, height) of the original


def test_top_k_explains_the_most_probable_classes(project):
    image = write_image(project / "photo.png", 64, 48, seed=3)
    probabilities = reference_probabilities(image)
    ranked = probabilities.sort(descending=True)
    assert ranked.values[1] - ranked.values[2] > 1e-3, "2nd and 3rd classes too close to tell apart"

    code, (record,), stderr = gradcam(
        MODEL, str(image), *MODEL_OPTIONS, "-l", "relu2", "--top-k", "2", "--json", "-o", str(project / "out")
    )
    assert code == 0, stderr
    assert [o["class"] for o in record["outputs"]] == ranked.indices[:2].tolist()
    assert [o["score"] for o in record["outputs"]] == pytest.approx(ranked.values[:2].tolist(), abs=2e-6)


def test_class_by_label_name(project):
    image = write_image(project / "photo.png", 64, 48, seed=4)
    code, (record,), stderr = gradcam(
        MODEL,
        str(image),
        *MODEL_OPTIONS,
        "--labels",
        str(project / "labels.txt"),
        "--class",
        "Dog",
        "--class",
        "lamp",
        "--json",
        "-o",
        str(project / "out"),
    )
    assert code == 0, stderr
    assert [(o["class"], o["label"]) for o in record["outputs"]] == [(1, "dog"), (8, "lamp")]
    assert all(p["label"] == LABELS[p["class"]] for p in record["predictions"])


def test_unknown_label_name_suggests_close_names(project):
    image = write_image(project / "photo.png", 64, 48, seed=4)
    code, records, stderr = gradcam(
        MODEL,
        str(image),
        *MODEL_OPTIONS,
        "--labels",
        str(project / "labels.txt"),
        "--class",
        "dgo",
        "-o",
        str(project / "out"),
    )
    assert code == 2
    assert records == []
    assert "did you mean" in stderr and "dog" in stderr
    assert not list((project / "out").rglob("*.png"))


@pytest.mark.parametrize("value", ["99999", "10", "-1"])
def test_class_index_out_of_range_names_the_range(project, value):
    image = write_image(project / "photo.png", 64, 48, seed=4)
    code, records, stderr = gradcam(MODEL, str(image), *MODEL_OPTIONS, "--class", value, "-o", str(project / "out"))
    assert code == 2
    assert value in stderr and f"0..{NUM_CLASSES - 1}" in stderr
    assert "Traceback" not in stderr


def test_class_and_top_k_together_is_a_usage_error(project):
    image = write_image(project / "photo.png", 64, 48, seed=4)
    code, _, stderr = gradcam(
        MODEL, str(image), *MODEL_OPTIONS, "--class", "1", "--top-k", "2", "-o", str(project / "out")
    )
    assert code == 2 and "--top-k" in stderr


def test_default_layer_is_the_last_spatial_layer(project):
    image = write_image(project / "photo.png", 64, 48, seed=4)
    code, (record,), stderr = gradcam(MODEL, str(image), *MODEL_OPTIONS, "--json", "-o", str(project / "out"))
    assert code == 0, stderr
    assert record["outputs"][0]["layer"] == "relu2"


@pytest.mark.parametrize("method", METHODS)
def test_every_method_runs(project, method):
    image = write_image(project / "photo.png", 50, 70, seed=6)
    top1 = int(reference_probabilities(image).argmax())
    code, (record,), stderr = gradcam(
        MODEL,
        str(image),
        *MODEL_OPTIONS,
        "-l",
        "relu2",
        "-m",
        method,
        "--save-raw",
        "--json",
        "--no-caption",
        "-o",
        str(project / "out"),
    )
    assert code == 0, stderr
    (output,) = record["outputs"]
    # Eigen-CAM ignores the class: its one map per image names none (see test_eigencam_is_class_independent).
    assert (output["method"], output["class"]) == (method, None if method == "eigencam" else top1)
    with Image.open(output["png"]) as overlay:
        assert overlay.size == (50, 70)
        assert overlay.text["hookviz:method"] == method
    heat = np.load(output["raw"])
    assert heat.shape == (70, 50) and heat.dtype == np.float32
    assert heat.min() >= 0 and heat.max() <= 1 and heat.max() > 0.5


def test_save_raw_is_the_normalized_map_at_the_original_resolution(project):
    width, height = 90, 40
    image = write_image(project / "wide.png", width, height, seed=7)
    code, (record,), stderr = gradcam(
        MODEL,
        str(image),
        *MODEL_OPTIONS,
        "-l",
        "relu2",
        "--class",
        "2",
        "--save-raw",
        "--json",
        "-o",
        str(project / "out"),
    )
    assert code == 0, stderr
    heat = np.load(record["outputs"][0]["raw"])
    assert heat.dtype == np.float32 and heat.shape == (height, width)
    assert heat.min() >= 0 and heat.max() <= 1

    # The same map, computed here at relu2 (16x16) and bilinearly upsampled to the original's pixel grid.
    # Min-max scaling commutes with bilinear resizing (an affine map), so compare both scaled to [0, 1].
    low = reference_gradcam(image, 2)
    assert low.std() > 0.01 * low.max()
    expected = F.interpolate(low[None, None], size=(height, width), mode="bilinear", align_corners=False)[0, 0]
    np.testing.assert_allclose(minmax(heat), minmax(expected.numpy()), atol=1e-4)


def test_eigencam_is_class_independent(project):
    """Eigen-CAM ignores the class: with --top-k 2 it writes one overlay per image, captioned and recorded as
    class-independent, instead of identical maps under two class names."""
    image = write_image(project / "photo.png", 64, 48, seed=8)
    code, (record,), stderr = gradcam(
        MODEL,
        str(image),
        *MODEL_OPTIONS,
        "-l",
        "relu2",
        "-m",
        "eigencam",
        "--top-k",
        "2",
        "--save-raw",
        "--json",
        "-o",
        str(project / "out"),
    )
    assert code == 0, stderr
    (output,) = record["outputs"]
    assert (output["class"], output["label"], output["score"], output["class_independent"]) == (None, None, None, True)
    assert Path(output["png"]).name == "eigencam_relu2.png"
    assert np.load(output["raw"]).max() > 0.5
    assert len(record["predictions"]) >= 2  # the predictions are still reported
