"""Detection: a map per detected box, from real torchvision detectors with random weights.

No pretrained detector exists offline, so each detector is built with random weights and its backbone's
batch-norm statistics are measured on the sample photos (``calibrated``): without that the random backbone's
activations vanish (1e-8 at the FPN) and every box gets the same score.
"""

from __future__ import annotations

import json
import math
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torchvision.models import detection

from hookviz.cams import GRADIENT_RULES
from hookviz.detection import (
    BOX_COLOUR,
    DetectionCamJob,
    DetectionOptions,
    Geometry,
    detection_cams,
    detection_job,
    to_original,
    unpadded,
)
from hookviz.errors import UsageError
from hookviz.jobs import CamOptions
from hookviz.models import LoadedModel
from hookviz.pipeline import prepare_image, run_job
from hookviz.preprocessing import Preprocessing

SAMPLES = Path(__file__).resolve().parent.parent / "sample_images"
PHOTOS = ("astronaut.jpg", "coffee_cup.jpg", "rocket.jpg", "grace_hopper.jpg")
# Each detector small enough for a test: its own resize made 320 px on the short side.
BUILDERS = {
    "fasterrcnn_mobilenet_v3_large_320_fpn": {"box_score_thresh": 0.0},
    "retinanet_resnet50_fpn": {"score_thresh": 0.0, "min_size": 256, "max_size": 384},
    "fcos_resnet50_fpn": {"score_thresh": 0.0, "min_size": 256, "max_size": 384},
    "ssdlite320_mobilenet_v3_large": {"score_thresh": 0.0},
}


def photos(size: tuple[int, int], count: int = 2) -> torch.Tensor:
    """The first ``count`` sample photos resized to ``size`` (height, width), as a batch in [0, 1]."""
    tensors = []
    for name in PHOTOS[:count]:
        with Image.open(SAMPLES / name) as image:
            picture = image.convert("RGB").resize((size[1], size[0]), Image.BILINEAR)
        tensors.append(torch.frombuffer(bytearray(picture.tobytes()), dtype=torch.uint8).view(*size, 3))
    return torch.stack(tensors).permute(0, 3, 1, 2).float() / 255


def calibrated(name: str, **options) -> nn.Module:
    """torchvision detector ``name`` with random weights, its batch norms' statistics measured on the photos."""
    torch.manual_seed(0)
    model = getattr(detection, name)(weights=None, weights_backbone=None, num_classes=91, **options)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.reset_running_stats()
            module.momentum = None
    model.eval()
    model.backbone.train()
    with torch.no_grad():
        model.backbone(model.transform(list(photos((240, 320), 4)))[0].tensors)
    return model.eval()


@pytest.fixture(scope="module")
def fasterrcnn() -> nn.Module:
    return calibrated("fasterrcnn_mobilenet_v3_large_320_fpn", **BUILDERS["fasterrcnn_mobilenet_v3_large_320_fpn"])


def levels_with_grad(model: nn.Module, batch: torch.Tensor) -> tuple[list[dict], list[torch.Tensor]]:
    """The detector's output on ``batch`` with every FPN level a leaf that requires grad (a plain hook)."""
    leaves: list[torch.Tensor] = []

    def hook(module, inputs, output):
        replaced = OrderedDict()
        for key, value in output.items():
            leaf = value.detach().requires_grad_(True)
            leaves.append(leaf)
            replaced[key] = leaf
        return replaced

    handle = model.backbone.register_forward_hook(hook)
    try:
        with torch.enable_grad():
            output = model(batch)
    finally:
        handle.remove()
    return output, leaves


# --- the maps ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fcos() -> nn.Module:
    return calibrated("fcos_resnet50_fpn", **BUILDERS["fcos_resnet50_fpn"])


@pytest.mark.parametrize(
    ("detector", "size", "method"),
    [
        ("fasterrcnn", (320, 480), "gradcam"),
        ("fasterrcnn", (320, 480), "hirescam"),
        ("fcos", (256, 384), "gradcam"),  # its boxes read every level: the levels' maps add up
    ],
)
def test_box_map_is_the_method_applied_to_the_gradient_of_that_box_score(request, detector, size, method):
    model = request.getfixturevalue(detector)
    batch = photos(size)  # the detector's own size: no resize, no padding
    result = detection_cams(model, batch, layer="backbone", method=method, boxes=3, min_score=0.0)
    assert result.valid.all() and result.matched.all()
    assert len(result.levels) >= 3
    for b in range(batch.shape[0]):
        output, leaves = levels_with_grad(model, batch[b : b + 1])
        top = output[0]["scores"].argsort(descending=True)[:3]
        torch.testing.assert_close(result.boxes[b], output[0]["boxes"][top].detach())
        torch.testing.assert_close(result.scores[b], output[0]["scores"][top].detach())
        for k, index in enumerate(top.tolist()):
            gradients = torch.autograd.grad(output[0]["scores"][index], leaves, retain_graph=True, allow_unused=True)
            finest = leaves[0].shape[-2:]
            total = torch.zeros(finest)
            for leaf, gradient in zip(leaves, gradients, strict=True):
                if gradient is None:  # the ``pool`` level feeds only the (detached) proposals
                    continue
                if method == "gradcam":
                    level_map = (gradient.mean(dim=(-2, -1), keepdim=True) * leaf).sum(dim=1)[0]
                else:
                    level_map = (gradient * leaf).sum(dim=1)[0]
                share = leaf.shape[-2] * leaf.shape[-1] / (finest[0] * finest[1])
                total += F.interpolate(level_map[None, None].detach(), size=finest, mode="bilinear")[0, 0] * share
            expected = F.relu(total)
            assert expected.max() > 0
            scale = float(expected.abs().max())
            torch.testing.assert_close(result.maps[b, k] / scale, expected / scale, atol=1e-5, rtol=1e-5)


def test_boxes_read_from_coarse_levels_have_maps_only_when_every_level_is_explained(fcos):
    batch = photos((240, 320), 2)
    every = detection_cams(fcos, batch, layer="backbone", boxes=10, min_score=0.0)
    first = detection_cams(fcos, batch, layer="backbone", boxes=10, min_score=0.0, levels="first")
    assert first.levels == ["0"] and len(every.levels) == 5
    assert not bool(every.empty.any())
    assert bool(first.empty.any())  # FCOS's larger boxes come from its coarser levels


@pytest.mark.parametrize("layer", ["backbone.fpn", "backbone.fpn.layer_blocks.0"])
def test_the_box_head_shortcut_gives_the_maps_of_the_general_way(fasterrcnn, monkeypatch, layer):
    import hookviz.detection as module

    traced = []
    original = module.box_head_scores
    monkeypatch.setattr(module, "box_head_scores", lambda *a: traced.append(original(*a)) or traced[-1])
    batch = photos((240, 320), 2)  # resized to 320 x 427 and padded: the proposals are in resized pixels
    short = detection_cams(fasterrcnn, batch, layer=layer, method="gradcam++", boxes=4, min_score=0.0)
    assert len(traced) == 1 and traced[0] is not None  # the shortcut ran and traced every box
    general = detection_cams(
        fasterrcnn, batch, layer=layer, method="gradcam++", boxes=4, min_score=0.0, box_head_shortcut=False
    )
    assert len(traced) == 1
    scale = float(general.maps.abs().max())
    assert scale > 0
    torch.testing.assert_close(short.maps / scale, general.maps / scale, atol=1e-5, rtol=1e-5)
    # A box it cannot trace: the general way, the same maps.
    monkeypatch.setattr(module, "box_head_scores", lambda *a: None)
    fallen_back = detection_cams(fasterrcnn, batch, layer=layer, method="gradcam++", boxes=4, min_score=0.0)
    torch.testing.assert_close(fallen_back.maps, general.maps)


def test_the_fpn_itself_explains_as_the_backbone_does(fasterrcnn):
    # hookviz's default CAM layer for FPN detectors is backbone.fpn: the same OrderedDict of levels.
    batch = photos((240, 320), 1)
    fpn = detection_cams(fasterrcnn, batch, layer="backbone.fpn", boxes=2, min_score=0.0)
    backbone = detection_cams(fasterrcnn, batch, layer="backbone", boxes=2, min_score=0.0)
    assert fpn.levels == backbone.levels == ["0", "1", "pool"]
    torch.testing.assert_close(fpn.maps, backbone.maps)


def test_the_score_of_a_box_is_read_from_the_detection_matching_it_by_iou(fasterrcnn):
    from hookviz.detection import box_scores

    output, _ = levels_with_grad(fasterrcnn, photos((320, 480), 1))
    found = output[0]
    boxes = found["boxes"][:4].detach()
    nudged = boxes + torch.tensor([2.0, -1.0, 1.0, 2.0])  # still IoU > 0.5 with the original
    scores, matched = box_scores(found, nudged, found["labels"][:4])
    assert matched.all()
    torch.testing.assert_close(scores.detach(), found["scores"][:4].detach())
    assert scores.requires_grad  # read from the gradient-carrying output
    other_label = (found["labels"][:4] + 1) % 91
    scores, matched = box_scores(found, boxes, other_label)
    # A box whose label changed has no match unless another detection of that label overlaps it.
    for i in range(4):
        same = (found["labels"] == other_label[i]).nonzero().flatten()
        if len(same) == 0:
            assert not matched[i] and scores[i] == 0


def test_images_of_a_batch_get_the_maps_they_get_alone(fasterrcnn):
    batch = photos((240, 320), 3)
    together = detection_cams(fasterrcnn, batch, layer="backbone", boxes=4, min_score=0.0)
    for b in range(batch.shape[0]):
        alone = detection_cams(fasterrcnn, batch[b : b + 1], layer="backbone", boxes=4, min_score=0.0)
        torch.testing.assert_close(together.boxes[b], alone.boxes[0], atol=1e-3, rtol=1e-4)
        torch.testing.assert_close(together.scores[b], alone.scores[0], atol=1e-6, rtol=1e-4)
        scale = float(alone.maps[0].abs().max())
        assert scale > 0
        torch.testing.assert_close(together.maps[b] / scale, alone.maps[0] / scale, atol=1e-4, rtol=1e-4)


def test_images_with_fewer_boxes_are_padded_and_marked(fasterrcnn):
    batch = photos((240, 320), 2)
    everything = detection_cams(fasterrcnn, batch, layer="backbone", method="eigencam", boxes=100, min_score=0.0)
    # A threshold between the two images' best scores: the second image keeps fewer boxes than the first.
    threshold = float(everything.scores[:, 4].max())
    result = detection_cams(fasterrcnn, batch, layer="backbone", boxes=5, min_score=threshold)
    counts = result.valid.sum(dim=1).tolist()
    assert counts[0] != counts[1] or counts[0] < 5
    for b, count in enumerate(counts):
        assert (result.scores[b, :count] >= threshold).all()
        assert (result.maps[b, count:] == 0).all()


def test_eigencam_runs_without_any_backward_pass(fasterrcnn, monkeypatch):
    def no_backward(*args, **kwargs):
        raise AssertionError("Eigen-CAM ran a backward pass")

    monkeypatch.setattr(torch.autograd, "grad", no_backward)
    monkeypatch.setattr(torch.Tensor, "backward", no_backward)
    batch = photos((240, 320), 2)
    with torch.inference_mode():
        result = detection_cams(fasterrcnn, batch, layer="backbone", method="eigencam", boxes=3, min_score=0.0)
    assert result.valid.all()
    assert not result.maps.requires_grad
    assert all(p.grad is None for p in fasterrcnn.parameters())
    # One map per image, whatever the box.
    assert torch.equal(result.maps[:, 0], result.maps[:, 2])
    assert (result.maps.flatten(2).amax(dim=-1) > 0).all()


def test_a_gradient_method_works_inside_inference_mode(fasterrcnn):
    batch = photos((240, 320), 1)
    plain = detection_cams(fasterrcnn, batch, layer="backbone", boxes=2, min_score=0.0)
    with torch.inference_mode():
        inside = detection_cams(fasterrcnn, photos((240, 320), 1), layer="backbone", boxes=2, min_score=0.0)
    assert plain.maps.amax() > 0
    torch.testing.assert_close(inside.maps, plain.maps)
    assert all(p.grad is None for p in fasterrcnn.parameters())


def test_eigencam_of_a_pyramid_averages_each_levels_own_component():
    from hookviz.cams import eigencam
    from hookviz.detection import eigen_levels
    from hookviz.render import normalize_map

    torch.manual_seed(0)
    fine, coarse = torch.rand(2, 8, 6, 8), torch.rand(2, 4, 3, 4)
    torch.testing.assert_close(eigen_levels([fine]), eigencam(fine))
    upsampled = F.interpolate(normalize_map(eigencam(coarse)), size=(6, 8), mode="bilinear")
    torch.testing.assert_close(eigen_levels([fine, coarse]), (normalize_map(eigencam(fine)) + upsampled) / 2)


def test_eigen_smoothed_gradcam_of_boxes(fasterrcnn):
    result = detection_cams(
        fasterrcnn, photos((240, 320), 2), layer="backbone", boxes=2, min_score=0, eigen_smooth=True
    )
    assert result.valid.all() and not bool(result.empty.any())
    assert result.maps.min() >= 0 and result.maps.max() <= 1


class DetachedDetector(nn.Module):
    """A detector whose outputs carry no gradient at all (as an exported or wrapped one may)."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, images):
        return [{key: value.detach() for key, value in found.items()} for found in self.inner(images)]


def test_eigencam_works_on_a_detector_without_gradients(fasterrcnn):
    wrapped = DetachedDetector(fasterrcnn)
    result = detection_cams(wrapped, photos((240, 320), 1), layer="inner.backbone", method="eigencam", min_score=0)
    assert result.valid.sum() == 5
    # A gradient method on it finds no score to differentiate: maps are empty, not an exception.
    empty = detection_cams(wrapped, photos((240, 320), 1), layer="inner.backbone", method="gradcam", min_score=0)
    assert empty.empty is not None and bool(empty.empty.all())


@pytest.mark.parametrize("name", list(BUILDERS))
def test_every_torchvision_detector_explains_its_boxes(name):
    model = calibrated(name, **BUILDERS[name])
    batch = photos((240, 320), 2)
    result = detection_cams(model, batch, layer="backbone", method="gradcam", boxes=2, min_score=0.0)
    assert result.valid.all() and result.matched.all()
    assert result.levels and len(result.levels) >= 3
    assert not bool(result.empty.any()), f"{name}: a box's map is empty"
    height, width = batch.shape[-2:]
    assert (result.boxes[..., 0::2] >= 0).all() and (result.boxes[..., 0::2] <= width).all()
    assert (result.boxes[..., 1::2] >= 0).all() and (result.boxes[..., 1::2] <= height).all()
    eigen = detection_cams(model, batch, layer="backbone", method="eigencam", boxes=1, min_score=0.0)
    assert (eigen.maps.flatten(1).amax(dim=-1) > 0).all()


# --- geometry: padding and coordinates --------------------------------------------------------------------------


def test_captured_geometry_is_the_detectors_resize_and_padding(fasterrcnn):
    from hookviz.detection import capture_levels

    with capture_levels(fasterrcnn, "backbone", grad=False) as captured, torch.no_grad():
        fasterrcnn(photos((110, 400), 1))
    # 320 / 110 would make the long side 1164 > 640: the long side decides, 1.6x; then padded to 32.
    assert captured.geometry == Geometry(resized=[(176, 640)], padded=(192, 640))
    assert captured.levels[0].shape[-2:] == (6, 20)


def test_unpadding_keeps_every_map_position_where_it_was():
    # A map over a padded 192 x 640 batch whose value is each cell centre's y in padded pixels.
    cells_y = (torch.arange(6) + 0.5) * 32
    ramp = cells_y[:, None].expand(6, 20).clone()
    cut = unpadded(ramp[None], Geometry(resized=[(176, 640)], padded=(192, 640)))[0]
    assert cut.shape == (6, 20)
    # Cell i of the cut covers 176/6 resized pixels: its centre's y is its value (bilinear is exact on a ramp),
    # except the first, whose centre (14.7) lies above the map's first centre (16): clamped at the border.
    centres = (torch.arange(6) + 0.5) * 176 / 6
    torch.testing.assert_close(cut[1:, 0], centres[1:])
    assert cut[0, 0] == 16
    # With no padding the map is returned as it is; with padding on a cell border it is a plain crop.
    assert torch.equal(unpadded(ramp[None], Geometry(resized=[(192, 640)], padded=(192, 640))), ramp[None])
    assert torch.equal(unpadded(ramp[None], Geometry(resized=[(160, 640)], padded=(192, 640)))[0], ramp[:5])


def test_a_spot_on_the_backbone_map_lands_where_it_is_in_the_input(fasterrcnn):
    # Input 110 x 400: the detector resizes it to 176 x 640 and pads it to 192 x 640 (6 x 20 cells of 32 px).
    # A spot on cell (4, 10) of every level-0 channel is at resized (144, 336): input (90, 210).
    torch.manual_seed(0)
    direction = torch.rand(256) + 0.5

    def spot(module, inputs, output):
        controlled = OrderedDict((key, torch.zeros_like(value)) for key, value in output.items())
        controlled["0"][:, :, 4, 10] = direction
        return controlled

    handle = fasterrcnn.backbone.register_forward_hook(spot)
    try:
        result = detection_cams(fasterrcnn, photos((110, 400), 1), layer="backbone", method="eigencam", min_score=0)
    finally:
        handle.remove()
    heat = F.interpolate(result.maps[:, :1], size=(110, 400), mode="bilinear")[0, 0]
    ys, xs = torch.meshgrid(torch.arange(110) + 0.5, torch.arange(400) + 0.5, indexing="ij")
    centre_y, centre_x = float((heat * ys).sum() / heat.sum()), float((heat * xs).sum() / heat.sum())
    # Without the cut the spot would land at y = 4.5 / 6 * 110 = 82.5.
    assert abs(centre_y - 90) < 2, centre_y
    assert abs(centre_x - 210) < 2, centre_x


def test_boxes_map_to_the_photo_through_the_model_view():
    # The model input (100 x 200) was made from the photo's part (40, 10)-(440, 210): 2 photo pixels per input pixel.
    assert to_original([10, 20, 30, 40], (40.0, 10.0, 440.0, 210.0), (100, 200)) == [60.0, 50.0, 100.0, 90.0]


# --- the job: files and records ------------------------------------------------------------------------------


def loaded_detector(model: nn.Module, size: tuple[int, int]) -> LoadedModel:
    return LoadedModel(
        module=model,
        spec="fasterrcnn_mobilenet_v3_large_320_fpn",
        description="fasterrcnn_mobilenet_v3_large_320_fpn, random weights",
        preprocessing=Preprocessing(input_size=size, resize_size=min(size), mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0)),
        labels=[f"thing{i}" for i in range(91)],
    )


@pytest.fixture
def wide_photo(tmp_path) -> Path:
    """A 360 x 200 photo: the model input (160 x 240) stretches it 1.5x across and 1.25x down."""
    path = tmp_path / "wide.png"
    with Image.open(SAMPLES / "astronaut.jpg") as image:
        image.convert("RGB").resize((360, 200), Image.BILINEAR).save(path)
    return path


def test_gradcam_job_writes_a_picture_per_box_with_the_box_in_photo_pixels(fasterrcnn, wide_photo, tmp_path):
    loaded = loaded_detector(fasterrcnn, (160, 240))
    options = CamOptions(out_dir=tmp_path / "out", layer="backbone", method="gradcam")
    job = detection_job(loaded, options, boxes=3, min_score=0.0)
    records = [r.as_json() for r in run_job([(wide_photo, "wide")], loaded, job)]
    assert len(records) == 1
    record = json.loads(json.dumps(records[0]))  # strict JSON
    assert record["status"] == "ok" and "warning" not in record
    assert len(record["outputs"]) == 3 and len(record["detections"]) == 3

    # The same boxes, computed by running the detector on the same model input.
    prepared = prepare_image(wide_photo, "wide", loaded.preprocessing, crop=False)
    with torch.no_grad():
        found = fasterrcnn(prepared.tensor[None])[0]
    top = found["scores"].argsort(descending=True)[:3]
    names = set()
    for k, (output, index) in enumerate(zip(record["outputs"], top.tolist(), strict=True)):
        x0, y0, x1, y1 = found["boxes"][index].tolist()
        expected = [x0 * 1.5, y0 * 1.25, x1 * 1.5, y1 * 1.25]
        assert output["box"] == pytest.approx(expected, abs=0.01)
        assert output["class"] == int(found["labels"][index])
        assert output["label"] == f"thing{output['class']}"
        assert output["score"] == pytest.approx(float(found["scores"][index]), abs=1e-6)
        assert output["target"] == {
            "kind": "detection",
            "box": output["box"],
            "class": output["class"],
            "score": output["score"],
            "rank": k,
            "iou_threshold": 0.5,
        }
        assert output["kind"] == "cam" and output["method"] == "gradcam" and output["layer"] == "backbone"
        png = Path(output["png"])
        assert png.name == f"gradcam_backbone_box{k}_c{output['class']}.png"
        names.add(png.name)
        with Image.open(png) as picture:
            assert picture.text["hookviz:box"] == ",".join(f"{v:g}" for v in output["box"])
            scale = output.get("scale", 1)
            assert picture.size == (360 * scale, 200 * scale)
            rgb = picture.convert("RGB")
            # The box's outline, in the photo's (enlarged) pixels: its left edge half way down.
            left, top_y, right, bottom = (round(v) for v in expected)
            middle = (top_y + bottom) // 2
            assert (
                rgb.getpixel((left * scale, middle * scale)) == BOX_COLOUR
                or rgb.getpixel((left * scale + 1, middle * scale)) == BOX_COLOUR
            )
    assert len(names) == 3


def test_an_image_with_no_detection_above_min_score_gets_a_warning_and_no_picture(fasterrcnn, wide_photo, tmp_path):
    loaded = loaded_detector(fasterrcnn, (160, 240))
    job = detection_job(loaded, CamOptions(out_dir=tmp_path / "out", layer="backbone"), boxes=3, min_score=0.99)
    (record,) = [r.as_json() for r in run_job([(wide_photo, "wide")], loaded, job)]
    assert record["status"] == "ok" and record["outputs"] == [] and record["detections"] == []
    assert "no detection scored at least 0.99" in record["warning"] and "--min-score" in record["warning"]
    assert not list((tmp_path / "out").rglob("*.png"))


class NothingFound(nn.Module):
    """A detector that finds nothing (a trained one on an empty scene, under its own score threshold)."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, images):
        return [{key: value[:0] for key, value in found.items()} for found in self.inner(images)]


def test_an_image_the_detector_finds_nothing_in_gets_a_warning_saying_so(fasterrcnn, wide_photo, tmp_path):
    loaded = loaded_detector(NothingFound(fasterrcnn), (160, 240))
    job = detection_job(loaded, CamOptions(out_dir=tmp_path / "out", layer="inner.backbone"), min_score=0.0)
    (record,) = [r.as_json() for r in run_job([(wide_photo, "wide")], loaded, job)]
    assert record["status"] == "ok" and record["outputs"] == []
    assert "the detector returned no box for this image" in record["warning"]


def test_eigencam_job_and_settings(fasterrcnn, wide_photo, tmp_path):
    loaded = loaded_detector(fasterrcnn, (160, 240))
    job = DetectionCamJob(
        loaded,
        DetectionOptions(
            cam=CamOptions(out_dir=tmp_path / "out", layer="backbone", method="eigencam", file_format="jpg"),
            boxes=2,
            min_score=0.0,
        ),
    )
    assert job.settings()["boxes"] == 2 and job.settings()["min_score"] == 0.0 and job.settings()["format"] == "jpg"
    assert job.output_patterns() == ["eigencam_backbone_box*_c*.jpg"]
    (record,) = [r.as_json() for r in run_job([(wide_photo, "wide")], loaded, job)]
    assert [o["class_independent"] for o in record["outputs"]] == [True, True]
    for output in record["outputs"]:
        with Image.open(output["png"]) as picture:
            scale = output.get("scale", 1)
            assert picture.format == "JPEG" and picture.size == (360 * scale, 200 * scale)


# --- errors ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["scorecam", "ablationcam", "cam"])
def test_methods_that_cannot_explain_a_box_are_refused_naming_those_that_can(fasterrcnn, method):
    with pytest.raises(UsageError, match=r"does not work on a detector.*use one of: gradcam, .*eigencam") as caught:
        detection_cams(fasterrcnn, photos((160, 240), 1), layer="backbone", method=method)
    assert "\n" not in str(caught.value)


def test_a_model_that_is_not_a_detector_is_refused(tmp_path):
    classifier = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
    with pytest.raises(UsageError, match="not a detector's: detection needs one dict per image with boxes"):
        detection_cams(classifier.eval(), torch.rand(1, 3, 32, 32), layer="0")


def test_a_detector_output_without_scores_is_refused():
    class BoxesOnly(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 2, 3)

        def forward(self, x):
            self.conv(x)
            return [{"boxes": torch.zeros(1, 4), "labels": torch.zeros(1, dtype=torch.long)} for _ in x]

    with pytest.raises(UsageError, match="with keys boxes, labels"):
        detection_cams(BoxesOnly().eval(), torch.rand(1, 3, 16, 16), layer="conv")


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"boxes": 0}, "--boxes 0"),
        ({"min_score": 1.5}, "--min-score 1.5"),
        ({"min_score": math.nan}, "--min-score nan"),
    ],
)
def test_box_options_out_of_range_are_refused(fasterrcnn, options, message):
    with pytest.raises(UsageError, match=message):
        detection_cams(fasterrcnn, photos((160, 240), 1), layer="backbone", **options)


def test_several_layers_and_aug_smooth_are_refused(fasterrcnn, tmp_path):
    loaded = loaded_detector(fasterrcnn, (160, 240))
    with pytest.raises(UsageError, match="one -l"):
        detection_job(loaded, CamOptions(out_dir=tmp_path, layer="a+b", layers=["a", "b"]))
    with pytest.raises(UsageError, match="--aug-smooth does not apply to detectors"):
        detection_job(loaded, CamOptions(out_dir=tmp_path, layer="backbone", aug_smooth=True))


@pytest.mark.parametrize("batched", [True, False])
def test_each_box_gets_the_gradient_of_its_own_level(monkeypatch, batched):
    from hookviz.detection import level_gradients

    fine, coarse = torch.rand(2, 3, 4, 4, requires_grad=True), torch.rand(2, 3, 2, 2, requires_grad=True)
    # Box 0 reads the fine level only, box 1 the coarse one only (as the RoI pooler assigns levels by size).
    scores = torch.stack([(fine**2).sum(dim=(1, 2, 3)), (coarse * 3).sum(dim=(1, 2, 3))], dim=1)  # (2, 2)
    if not batched:  # as when an op has no batching rule: one backward pass per box
        grad = torch.autograd.grad

        def unbatched(*args, **kwargs):
            if kwargs.get("is_grads_batched"):
                raise RuntimeError("no batching rule")
            return grad(*args, **kwargs)

        monkeypatch.setattr(torch.autograd, "grad", unbatched)
    fine_grad, coarse_grad = level_gradients(scores, [fine, coarse])
    assert fine_grad.shape == (2, 2, 3, 4, 4) and coarse_grad.shape == (2, 2, 3, 2, 2)
    torch.testing.assert_close(fine_grad[:, 0], 2 * fine.detach())
    assert (fine_grad[:, 1] == 0).all() and (coarse_grad[:, 0] == 0).all()
    torch.testing.assert_close(coarse_grad[:, 1], torch.full_like(coarse_grad[:, 1], 3.0))


def test_every_gradient_rule_is_offered():
    from hookviz.detection import DETECTION_METHODS

    assert set(GRADIENT_RULES) | {"eigencam"} == set(DETECTION_METHODS)
