"""hookviz's CAMs agree with two independent implementations: pytorch-grad-cam and Captum.

Model: torchvision resnet18 with random weights (seeded, eval mode, nothing downloaded) at
layer4. pytorch-grad-cam hooks ``model.layer4[-1]``, whose output *is* the output of the
``layer4`` Sequential that hookviz captures, so both see the same (B, 512, 3, 3) activations
for a 96x96 input.

How the maps are compared, and why it is fair:

* pytorch-grad-cam's public call returns maps min-max normalized and resized to the input
  with cv2 (B, 96, 96). We compare twice. (1) At the layer's resolution: after the public
  call, the activations and gradients it recorded with its own hooks are passed to its own
  ``get_cam_image`` (its weighting rule), followed by the ReLU its ``compute_cam_per_layer``
  applies; that is its map before scaling, on the same 3x3 grid as hookviz's. (2) At the
  input's resolution: its final output against hookviz's map, min-max normalized and
  bilinearly upsampled (pixel centres aligned, as cv2.resize does). Both must have a
  Pearson correlation > 0.99 per image (and they are nearly identical in practice).
* Captum's LayerGradCam returns maps at the layer's resolution (before ReLU by default; we
  apply it, as Grad-CAM does).

Random-weight networks can give flat or all-zero CAMs, which would make a correlation
meaningless, so every compared map is first checked to have structure (std > 1% of its max).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from cam_models import random_batch
from nets import seeded

from hookviz.cams import compute_cams

pytorch_grad_cam = pytest.importorskip("pytorch_grad_cam")
captum_attr = pytest.importorskip("captum.attr")
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget  # noqa: E402

REFERENCE_CLASSES = {
    "gradcam": pytorch_grad_cam.GradCAM,
    "gradcam++": pytorch_grad_cam.GradCAMPlusPlus,
    "layercam": pytorch_grad_cam.LayerCAM,
    "xgradcam": pytorch_grad_cam.XGradCAM,
    "hirescam": pytorch_grad_cam.HiResCAM,
}


@pytest.fixture(scope="module")
def resnet() -> torch.nn.Module:
    with seeded(0):
        return torchvision.models.resnet18(weights=None).eval()


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return random_batch(2, height=96, width=96, seed=21)


def pearson(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64).ravel(), np.asarray(b, dtype=np.float64).ravel()
    return float(np.corrcoef(a, b)[0, 1])


def assert_has_structure(heat) -> None:
    heat = np.asarray(heat, dtype=np.float64)
    assert heat.max() > 0 and heat.std() > 0.01 * heat.max(), (
        f"flat or blank map, a correlation would be meaningless: {heat}"
    )


def pytorch_grad_cam_maps(cam_class, model, x, classes):
    """(maps at layer4's resolution, maps at the input's resolution) for one class per image."""
    cam = cam_class(model=model, target_layers=[model.layer4[-1]])
    try:
        full = cam(input_tensor=x, targets=[ClassifierOutputTarget(int(c)) for c in classes])
        activations = cam.activations_and_grads.activations[0].numpy()
        gradients = cam.activations_and_grads.gradients[0].numpy()
        low = np.maximum(cam.get_cam_image(x, model.layer4[-1], None, activations, gradients, False), 0)
    finally:
        cam.activations_and_grads.release()
    return low, full


def hookviz_at_input_resolution(heat: torch.Tensor, size) -> np.ndarray:
    low, high = heat.min(), heat.max()
    scaled = (heat - low) / (high - low)
    return F.interpolate(scaled[None, None], size=size, mode="bilinear", align_corners=False)[0, 0].numpy()


@pytest.mark.parametrize("rank", [0, 1], ids=["top1", "second"])
@pytest.mark.parametrize("method", list(REFERENCE_CLASSES))
def test_agrees_with_pytorch_grad_cam(resnet, images, method, rank):
    ours = compute_cams(resnet, images, layer="layer4", method=method, top_k=2)
    classes = ours.classes[:, rank]
    low, full = pytorch_grad_cam_maps(REFERENCE_CLASSES[method], resnet, images, classes)

    assert ours.maps.shape[-2:] == low.shape[-2:] == (3, 3)
    for b in range(images.shape[0]):
        ours_map = ours.maps[b, rank]
        assert_has_structure(ours_map)
        assert_has_structure(low[b])
        assert pearson(ours_map, low[b]) > 0.99
        assert pearson(hookviz_at_input_resolution(ours_map, (96, 96)), full[b]) > 0.99


def test_grad_cam_agrees_with_captum(resnet, images):
    ours = compute_cams(resnet, images, layer="layer4", method="gradcam", top_k=2)
    for rank in range(2):
        classes = ours.classes[:, rank].tolist()
        theirs = captum_attr.LayerGradCam(resnet, resnet.layer4).attribute(images, target=classes)
        theirs = torch.relu(theirs).detach()[:, 0]  # (B, 3, 3)
        for b in range(images.shape[0]):
            assert_has_structure(theirs[b])
            assert pearson(ours.maps[b, rank], theirs[b]) > 0.99


def test_top_classes_are_the_models_own_top_predictions(resnet, images):
    with torch.no_grad():
        expected = resnet(images).topk(2, dim=1).indices
    assert torch.equal(compute_cams(resnet, images, layer="layer4", top_k=2).classes, expected)
