"""Targets beyond classification: segmentation classes and regions, a single output's two sides, similarity.

The models are trained here on synthetic pictures where the answer is known (tests/target_nets.py): the
map of the red square's class must lie on the red square, the regressor's map on the grey square, the
similarity-to-red map on the red part of the photo; in the original photo's pixels, for non-square photos.
Scores are checked against their definitions written out here (pytorch-grad-cam's segmentation rule).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from cli_helpers import assert_usage_error, hookviz, json_lines
from PIL import Image
from target_nets import BLUE, RED, SIDE, MeanColour, trained_regressor, trained_segmenter

from hookviz.cams import compute_cams
from hookviz.hooks import capture
from hookviz.targets import ClassTarget, SegmentationTarget, SimilarityTarget, embedding, region_on_output

RAW = ["--mean", "0", "--std", "1", "--size", str(SIDE)]  # the models take [0, 1] pixels, 64x64
RED_BOX = (80, 16, 120, 56)  # (x0, y0, x1, y1) in the 160x90 photo
BLUE_BOX = (16, 40, 48, 80)
GREY_BOX = (100, 20, 140, 60)


def _export(model: torch.nn.Module, path: Path) -> Path:
    program = torch.export.export(
        model, (torch.rand(2, 3, SIDE, SIDE),), dynamic_shapes=({0: torch.export.Dim("batch", min=1)},)
    )
    torch.export.save(program, path)
    return path


@pytest.fixture(scope="module")
def segmenter(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.nn.Module]:
    model = trained_segmenter()
    return _export(model, tmp_path_factory.mktemp("seg") / "squares.pt2"), model


@pytest.fixture(scope="module")
def regressor(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.nn.Module]:
    model = trained_regressor()
    return _export(model, tmp_path_factory.mktemp("reg") / "brightness.pt2"), model


def _photo(path: Path, boxes: dict[tuple[int, int, int, int], tuple[int, int, int]], size=(160, 90), seed=0) -> Path:
    """A dark noise photo of ``size`` (width, height) with flat squares: {box: RGB colour}."""
    rng = np.random.default_rng(seed)
    pixels = rng.uniform(0, 0.35 * 255, (size[1], size[0], 3))
    for (x0, y0, x1, y1), colour in boxes.items():
        pixels[y0:y1, x0:x1] = colour
    Image.fromarray(pixels.astype(np.uint8)).save(path)
    return path


def _mass_inside(heat: np.ndarray, box: tuple[int, int, int, int]) -> float:
    """The share of the map's mass inside ``box`` (0 for an empty map)."""
    x0, y0, x1, y1 = box
    return float(heat[y0:y1, x0:x1].sum() / heat.sum()) if heat.sum() > 0 else 0.0


def _peak_inside(heat: np.ndarray, box: tuple[int, int, int, int]) -> bool:
    y, x = np.unravel_index(heat.argmax(), heat.shape)
    return box[0] <= x < box[2] and box[1] <= y < box[3]


@pytest.fixture
def squares_photo(tmp_path: Path) -> Path:
    return _photo(tmp_path / "squares.png", {RED_BOX: (230, 25, 25), BLUE_BOX: (25, 38, 230)})


# --- segmentation ------------------------------------------------------------------------------------


def test_the_map_of_a_segmentation_class_lies_on_its_pixels(segmenter, squares_photo: Path, tmp_path: Path) -> None:
    model_path, _ = segmenter
    out = tmp_path / "out"
    for class_index, box in ((RED, RED_BOX), (BLUE, BLUE_BOX)):
        result = hookviz(
            "gradcam", model_path, squares_photo, *RAW, "-l", "features", "-c", class_index, "--save-raw", "--json",
            "-o", out, "--overwrite",
        )  # fmt: skip
        assert result.exit_code == 0, result.stderr
        (record,) = json_lines(result.stdout)
        (output,) = record["outputs"]
        assert output["png"].endswith(f"gradcam_features_c{class_index}.png")
        heat = np.load(output["raw"])
        assert heat.shape == (90, 160)  # the original photo's pixels, not the model's 64x64
        assert _mass_inside(heat, box) > 0.6, class_index
        # What was explained: the class's pixels, shown as a picture and counted in the record.
        target = output["target"]
        assert target["kind"] == "segmentation" and target["class"] == class_index
        x0, y0, x1, y1 = box
        assert target["pixels"] == pytest.approx((x1 - x0) * (y1 - y0) / (160 * 90), abs=0.02)
        with Image.open(output["segmentation_png"]) as seg:
            scale = seg.width // 160  # a small photo is enlarged a whole number of times for its caption
            assert seg.size == (160 * scale, 90 * scale)  # the caption band lies over the bottom of the picture
            picture = seg.convert("RGB").crop((0, 0, 160 * scale, 90 * scale)).resize((160, 90), Image.Resampling.BOX)
            tinted = np.asarray(picture).astype(int)
        original = np.asarray(Image.open(squares_photo).convert("RGB")).astype(int)
        changed = np.abs(tinted - original).sum(axis=2) > 30
        assert changed[y0 + 4 : y1 - 4, x0 + 4 : x1 - 4].mean() > 0.9  # the class's pixels are tinted ...
        assert changed.mean() < 2 * (x1 - x0) * (y1 - y0) / (160 * 90)  # ... and little else


def test_top_k_explains_the_classes_covering_most_pixels(segmenter, squares_photo: Path, tmp_path: Path) -> None:
    result = hookviz(
        "gradcam", segmenter[0], squares_photo, *RAW, "-l", "features", "-k", "3", "--json", "-o", tmp_path
    )
    assert result.exit_code == 0, result.stderr
    (record,) = json_lines(result.stdout)
    classes = [output["class"] for output in record["outputs"]]
    assert classes == [0, RED, BLUE]  # background, then the red square (1600 px), then the blue one (1280 px)
    shares = [p["score"] for p in record["predictions"]]
    assert shares == sorted(shares, reverse=True) and sum(shares) == pytest.approx(1.0, abs=1e-4)


def test_segmentation_grad_cam_equals_the_definition(segmenter) -> None:
    """pytorch-grad-cam's SemanticSegmentationTarget: the sum of class C's logits over the pixels predicted as C;
    Grad-CAM is ReLU(sum_k mean(dS/dA_k) A_k)."""
    _, model = segmenter
    generator = torch.Generator().manual_seed(3)
    batch = torch.rand(2, 3, SIDE, SIDE, generator=generator) * 0.3
    batch[0, :, 10:30, 20:40] = torch.tensor([0.9, 0.1, 0.1])[:, None, None]
    batch[1, :, 30:50, 5:25] = torch.tensor([0.9, 0.1, 0.1])[:, None, None]
    result = compute_cams(model, batch, layer="features", method="gradcam", target=SegmentationTarget(classes=(RED,)))
    for b in range(2):
        with capture(model, ["features"], grad=True) as activations:
            logits = model(batch[b : b + 1])["out"]
            features = activations["features"]
            mask = (logits.argmax(dim=1) == RED).float()
            score = (logits[:, RED] * mask).sum()
            (gradient,) = torch.autograd.grad(score, features)
        expected = F.relu((gradient.mean(dim=(2, 3), keepdim=True) * features).sum(dim=1))[0]
        torch.testing.assert_close(result.maps[b, 0], expected.detach(), atol=1e-5, rtol=1e-4)
        assert float(result.probabilities[b, RED]) == pytest.approx(float(mask.mean()), abs=1e-6)


def test_a_region_explains_the_class_logits_summed_over_it(segmenter, squares_photo: Path, tmp_path: Path) -> None:
    model_path, model = segmenter
    region = ",".join(map(str, BLUE_BOX))
    result = hookviz(
        "gradcam", model_path, squares_photo, *RAW, "-l", "features", "-c", BLUE, "--region", region,
        "--save-raw", "--json", "-o", tmp_path,
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    (output,) = json_lines(result.stdout)[0]["outputs"]
    assert output["png"].endswith(f"gradcam_features_c{BLUE}_region-16-40-48-80.png")  # one file per region
    assert output["target"]["region"] == list(BLUE_BOX)
    assert output["target"]["pixels"] > 0.9  # nearly all of the region is predicted blue
    assert _mass_inside(np.load(output["raw"]), BLUE_BOX) > 0.6
    # The score: the class's logits weighted by each output pixel's share of the region (here, the 64x64 grid).
    weights = region_on_output(BLUE_BOX, (0.0, 0.0, 160.0, 90.0), (160, 90), (SIDE, SIDE))
    assert float(weights.sum()) == pytest.approx((32 / 160 * SIDE) * (40 / 90 * SIDE), rel=1e-5)
    target = SegmentationTarget(classes=(BLUE,), regions=weights[None])
    logits = torch.randn(1, 3, SIDE, SIDE)
    assert float(target.scores(logits, torch.tensor([[BLUE]]))[0, 0]) == pytest.approx(
        float((logits[0, BLUE] * weights).sum()), rel=1e-5
    )


def test_a_mask_file_works_as_a_region(segmenter, squares_photo: Path, tmp_path: Path) -> None:
    mask = np.zeros((90, 160), np.uint8)
    x0, y0, x1, y1 = RED_BOX
    mask[y0:y1, x0:x1] = 255
    Image.fromarray(mask).save(tmp_path / "red.png")
    result = hookviz(
        "gradcam", segmenter[0], squares_photo, *RAW, "-l", "features", "-c", RED, "--mask", tmp_path / "red.png",
        "--save-raw", "--json", "-o", tmp_path / "out",
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    (output,) = json_lines(result.stdout)[0]["outputs"]
    assert output["png"].endswith(f"_c{RED}_mask-red.png") and output["target"]["mask"].endswith("red.png")
    assert _mass_inside(np.load(output["raw"]), RED_BOX) > 0.6


def test_a_region_outside_one_photo_fails_that_photo_only(segmenter, squares_photo: Path, tmp_path: Path) -> None:
    small = _photo(tmp_path / "small.png", {(2, 2, 20, 20): (230, 25, 25)}, size=(60, 40))
    result = hookviz(
        "gradcam", segmenter[0], squares_photo, small, *RAW, "-l", "features", "-c", RED, "--region", "70,10,130,60",
        "--json", "-o", tmp_path / "out",
    )  # fmt: skip
    assert result.exit_code == 1
    records = {Path(r["input"]).name: r for r in json_lines(result.stdout)}
    assert records["squares.png"]["status"] == "ok"
    assert records["small.png"]["status"] == "error"
    assert records["small.png"]["error"].endswith("--region 70,10,130,60 reaches outside this 60x40 image")
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) >= 1


def test_segmentation_options_that_do_not_fit_are_one_line_errors(segmenter, squares_photo: Path) -> None:
    base = ("gradcam", segmenter[0], squares_photo, *RAW, "-l", "features", "-q")
    assert_usage_error(
        hookviz(*base, "-m", "scorecam"),
        "-m scorecam explains class logits, not a segmentation class; use one of: gradcam, gradcam++, xgradcam, "
        "layercam, hirescam, eigencam",
    )
    assert_usage_error(
        hookviz(*base, "--metric", "deletion"),
        "--metric scores class probabilities, not a segmentation class; drop it for this model",
    )
    assert_usage_error(
        hookviz(*base, "--activation", "sigmoid"),
        "--activation applies to classifiers; a segmentation map shows each class's share of pixels",
    )
    assert_usage_error(hookviz(*base, "-c", "3"), "--class 3 is out of range: this model has classes 0..2")
    assert_usage_error(
        hookviz(*base, "--region", "30,10,20,40"),
        "--region '30,10,20,40': x1 must exceed x0, y1 exceed y0, none negative",
    )
    assert_usage_error(
        hookviz(*base, "--boxes", "3"),
        f"--boxes applies to detection models; {segmenter[0]} is not one (its output is not boxes)",
    )


# --- a single output: regression and binary classifiers -------------------------------------------------


def test_a_regressor_explains_its_output_and_its_negative(regressor, tmp_path: Path) -> None:
    photo = _photo(tmp_path / "grey.png", {GREY_BOX: (200, 200, 200)})
    runs = {}
    for side in ("1", "0"):
        result = hookviz(
            "gradcam", regressor[0], photo, *RAW, "-l", "features", "-c", side, "--save-raw", "--json", "-o", tmp_path
        )
        assert result.exit_code == 0, result.stderr
        runs[side] = json_lines(result.stdout)[0]
    positive, negative = runs["1"]["outputs"][0], runs["0"]["outputs"][0]
    with torch.no_grad():
        value = float(regressor[1](torch.from_numpy(_model_input(photo)))[0, 0])
    assert value == pytest.approx(200 / 255, abs=0.08)  # the model reads the square's brightness
    # No activation for a single output by default: captions and records show the raw value.
    assert positive["label"] == "positive" and positive["score"] == pytest.approx(value, abs=1e-4)
    assert negative["label"] == "negative" and negative["score"] == pytest.approx(-value, abs=1e-4)
    assert positive["target"] == {"kind": "binary", "class": 1, "side": "positive"}
    heat_positive, heat_negative = np.load(positive["raw"]), np.load(negative["raw"])
    # The square covers 11% of the photo and holds most of the map, with its peak (max pooling: a few strong
    # positions decide the output, and the noise around them adds a faint floor).
    assert _mass_inside(heat_positive, GREY_BOX) > 0.4 and _peak_inside(heat_positive, GREY_BOX)
    # Nothing in the photo lowers the brightness read: the negative side's map is not the positive one.
    assert _mass_inside(heat_negative, GREY_BOX) < _mass_inside(heat_positive, GREY_BOX) - 0.2
    assert positive["png"] != negative["png"]


def _model_input(photo: Path) -> np.ndarray:
    image = Image.open(photo).convert("RGB").resize((SIDE, SIDE), Image.Resampling.BILINEAR)
    return (np.asarray(image, np.float32) / 255).transpose(2, 0, 1)[None].copy()


def test_sigmoid_shows_a_binary_models_probability(regressor, tmp_path: Path) -> None:
    photo = _photo(tmp_path / "grey.png", {GREY_BOX: (200, 200, 200)})
    sigmoid = ("--activation", "sigmoid", "-k", "2")
    result = hookviz("gradcam", regressor[0], photo, *RAW, "-l", "features", *sigmoid, "--json", "-o", tmp_path)
    assert result.exit_code == 0, result.stderr
    record = json_lines(result.stdout)[0]
    scores = {p["label"]: p["score"] for p in record["predictions"]}
    assert scores["positive"] + scores["negative"] == pytest.approx(1.0, abs=1e-5)
    assert [o["class"] for o in record["outputs"]] == [1, 0]
    manifest = [json.loads(line) for line in (tmp_path / "manifest.jsonl").read_text().splitlines()]
    assert manifest[0]["settings"]["target"] == {"kind": "binary", "activation": "sigmoid"}


def test_single_output_errors(regressor, tmp_path: Path) -> None:
    photo = _photo(tmp_path / "grey.png", {GREY_BOX: (200, 200, 200)})
    base = ("gradcam", regressor[0], photo, *RAW, "-l", "features", "-q")
    assert_usage_error(
        hookviz(*base, "-c", "2"), "--class 2: this model has a single output; -c 1 explains it, -c 0 its negative"
    )
    assert_usage_error(
        hookviz(*base, "--activation", "softmax"),
        "--activation softmax needs several outputs and this model has one; use sigmoid or none",
    )
    assert_usage_error(
        hookviz(*base, "--region", "1,1,5,5"),
        "--region applies to segmentation models (output N, classes, H, W); this model's output is (1, 1)",
    )


def test_class_target_matches_the_plain_classifier_path() -> None:
    """The default target is the class logit: the same maps as before targets existed."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
        torch.nn.Linear(8, 5),
    ).eval()  # fmt: skip
    batch = torch.rand(3, 3, 16, 16)
    plain = compute_cams(model, batch, layer="1", classes=[2, 4])
    targeted = compute_cams(model, batch, layer="1", target=ClassTarget(classes=(2, 4), activation="softmax"))
    torch.testing.assert_close(plain.maps, targeted.maps)
    torch.testing.assert_close(plain.probabilities, model(batch).softmax(dim=1))


# --- similarity ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mean_colour(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _export(MeanColour().eval(), tmp_path_factory.mktemp("emb") / "mean_colour.pt2")


def test_similarity_to_a_red_reference_lies_on_the_red_square(mean_colour: Path, squares_photo: Path, tmp_path) -> None:
    reference = tmp_path / "red.png"
    Image.new("RGB", (50, 70), (230, 20, 20)).save(reference)
    result = hookviz(
        "gradcam", mean_colour, squares_photo, *RAW, "-l", "features", "--similar-to", reference, "--save-raw",
        "--json", "-o", tmp_path / "out",
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    record = json_lines(result.stdout)[0]
    (output,) = record["outputs"]
    assert output["png"].endswith("gradcam_features_sim-red.png")
    embedded = embedding(MeanColour(), torch.from_numpy(_model_input(squares_photo)))[0]
    expected = float(F.cosine_similarity(embedded, torch.tensor([230 / 255, 20 / 255, 20 / 255]), dim=0))
    assert record["similarity"] == pytest.approx(expected, abs=1e-4)
    assert output["target"]["similarity"] == pytest.approx(expected, abs=1e-4)
    assert _mass_inside(np.load(output["raw"]), RED_BOX) > 0.6


def test_an_embedding_layer_is_pooled() -> None:
    model = MeanColour().eval()
    batch = torch.rand(2, 3, 8, 12)
    torch.testing.assert_close(embedding(model, batch, layer="relu"), model(batch))
    target = SimilarityTarget(reference=embedding(model, batch[:1], layer="relu")[0], layer="relu")
    maps = compute_cams(model, batch, layer="features", target=target)
    assert maps.probabilities[0, 0] == pytest.approx(1.0, abs=1e-6)  # the reference is image 0 itself


def test_similarity_errors(mean_colour: Path, squares_photo: Path, tmp_path: Path) -> None:
    base = ("gradcam", mean_colour, squares_photo, *RAW, "-l", "features", "-q")
    assert_usage_error(
        hookviz(*base, "--similar-to", tmp_path / "missing.jpg"),
        f"--similar-to {tmp_path / 'missing.jpg'}: file not found; give the reference image's path",
    )
    (tmp_path / "notes.txt").write_text("not an image")
    result = hookviz(*base, "--similar-to", tmp_path / "notes.txt")
    assert result.exit_code == 2 and result.stderr.startswith(
        f"hookviz: error: --similar-to {tmp_path / 'notes.txt'}: "
    )
    assert len(result.stderr.splitlines()) == 1
    assert_usage_error(
        hookviz(*base, "--similar-to", squares_photo, "-c", "1"),
        "--similar-to explains one similarity per image; drop --class and --top-k",
    )
    assert_usage_error(
        hookviz(*base, "--embedding-layer", "relu"),
        "--embedding-layer goes with --similar-to REF; add the reference image",
    )


# --- the same targets in guided backpropagation ------------------------------------------------------------


def test_guided_explains_a_segmentation_class(segmenter, squares_photo: Path, tmp_path: Path) -> None:
    result = hookviz(
        "guided", segmenter[0], squares_photo, *RAW, "-l", "features", "-c", RED, "--json", "-o", tmp_path, "-q"
    )
    assert result.exit_code == 0, result.stderr
    outputs = json_lines(result.stdout)[0]["outputs"]
    assert [Path(o["png"]).name for o in outputs] == [f"guided_c{RED}.png", f"guided-gradcam_features_c{RED}.png"]
    with Image.open(outputs[1]["png"]) as picture:
        scale = picture.width // 160
        grey = np.asarray(picture.convert("L").resize((160, 90), Image.Resampling.BOX)).astype(float)
    away_from_grey = np.abs(grey - 128)  # guided pictures are grey where the gradient is zero
    x0, y0, x1, y1 = RED_BOX
    assert scale >= 1 and away_from_grey[y0:y1, x0:x1].mean() > 3 * away_from_grey[:, :60].mean()


def test_guided_gradients_of_a_single_output_change_sign_with_the_side(regressor) -> None:
    from hookviz.guided import guided_backprop

    batch = torch.rand(2, 3, SIDE, SIDE)
    positive, _, shown = guided_backprop(
        regressor[1], batch, torch.tensor([[1], [1]]), target=ClassTarget(activation="none")
    )
    negative, _, _ = guided_backprop(
        regressor[1], batch, torch.tensor([[0], [0]]), target=ClassTarget(activation="none")
    )
    assert shown.shape == (2, 2) and torch.equal(shown[:, 0], -shown[:, 1])
    # Guided backprop keeps positive gradients at each ReLU: the two sides are not each other's negatives,
    # but the first ReLU-free step (the head) flips the sign of what flows back.
    assert not torch.allclose(positive, negative)


def test_trace_backpropagates_a_segmentation_score(segmenter, squares_photo: Path) -> None:
    result = hookviz("trace", segmenter[0], squares_photo, *RAW, "-c", BLUE, "--json", "-q")
    assert result.exit_code == 0, result.stderr
    trace = json.loads(result.stdout)
    assert trace["classes"] == [BLUE]
    _, model = segmenter
    with torch.no_grad():
        logits = model(torch.from_numpy(_model_input(squares_photo)))["out"]
    expected = float((logits[0, BLUE] * (logits[0].argmax(dim=0) == BLUE)).sum())
    assert trace["score"] == pytest.approx(expected, rel=1e-4)


def test_similarity_on_the_pretrained_demo_model_finds_the_cat(
    demo_model: Path, cat_composites, tmp_path: Path
) -> None:
    """What in a photo of a cat beside something else makes it match another photo of the cat: the cat."""
    reference = tmp_path / "cat_face.jpg"
    Image.open(Path(__file__).resolve().parent.parent / "sample_images" / "chelsea_cat.png").convert("RGB").crop(
        (100, 20, 400, 280)
    ).save(reference)
    photos = [path for path, _ in cat_composites]
    result = hookviz(
        "gradcam", demo_model, *photos, "--similar-to", reference, "--embedding-layer", "_conv_head", "--save-raw",
        "--json", "-o", tmp_path / "out", "-q",
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    for record, (_, box) in zip(json_lines(result.stdout), cat_composites, strict=True):
        (output,) = record["outputs"]
        assert output["layer"] == "_conv_head"  # the embedding layer is the default layer to explain
        assert 0 < record["similarity"] < 1
        assert _mass_inside(np.load(output["raw"]), box) > 0.7


def test_evaluate_refuses_models_without_class_probabilities(segmenter, regressor, squares_photo: Path) -> None:
    for model, what in ((regressor[0], "a single output"), (segmenter[0], "an output of shape (1, 3, 64, 64)")):
        assert_usage_error(
            hookviz("evaluate", model, squares_photo, *RAW, "-l", "features", "-q"),
            "evaluate scores maps by class probabilities (the softmax of several outputs), and this model gives "
            f"{what}" + (" (segmentation?)" if "shape" in what else "") + "; explain it with gradcam",
        )
