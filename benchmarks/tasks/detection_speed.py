"""Detection: Grad-CAM of 5 boxes per image on fasterrcnn_mobilenet_v3_large_320_fpn, hookviz vs pytorch-grad-cam.

Random weights (no pretrained detector offline), with the backbone's batch-norm statistics calibrated on the
photos so that its activations do not vanish and the boxes' scores differ. Both tools explain the same boxes
(each photo's top 5 detections) at the same layer, ``backbone.fpn.layer_blocks.0``: the FPN's finest level,
the one this model's box head reads (its two finest levels have the same stride, so the RoI pooler maps every
box to the first). pytorch-grad-cam's gradient methods cannot take ``model.backbone`` itself (its output is a
dict of maps, on which no gradient hook is registered: the gradients come back None), so its detection
tutorial uses Eigen-CAM there. pytorch-grad-cam: ``GradCAM(model, [layer])`` called once per box rank with
``FasterRCNNBoxScoreTarget([label], [box])`` for each photo (one forward and one backward through the whole
network per box). hookviz: one forward pass for the batch without autograd, then the box head run again on
the explained boxes' own proposals only, from the layer's maps, and one batched backward for all the boxes
(``detection_cams``' box-head shortcut; the same maps as back-propagating through the whole head).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from common import SEED, interleaved, log, source_photos
from torch import nn

from hookviz.detection import detection_cams
from tasks import Context

TARGET = 2.0  # hookviz at least this many times faster
MODEL = "fasterrcnn_mobilenet_v3_large_320_fpn"
BOXES = 5
LAYER = "backbone.fpn.layer_blocks.0"
INPUT_SIZE = (320, 480)  # (height, width) of every photo as the model input


def photos_batch(count: int) -> torch.Tensor:
    """The first ``count`` sample photos as a (count, 3, 320, 480) batch in [0, 1]."""
    from PIL import Image

    tensors = []
    for path in source_photos()[:count]:
        with Image.open(path) as image:
            picture = image.convert("RGB").resize((INPUT_SIZE[1], INPUT_SIZE[0]), Image.BILINEAR)
        tensors.append(torch.frombuffer(bytearray(picture.tobytes()), dtype=torch.uint8).view(*INPUT_SIZE, 3))
    return torch.stack(tensors).permute(0, 3, 1, 2).float() / 255


def calibrated_detector(images: torch.Tensor) -> nn.Module:
    """The detector with random weights and batch-norm statistics measured on ``images`` (one pass)."""
    import torchvision

    torch.manual_seed(SEED)
    model = torchvision.models.detection.fasterrcnn_mobilenet_v3_large_320_fpn(
        weights=None, weights_backbone=None, num_classes=91, box_score_thresh=0.0
    )
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.reset_running_stats()
            module.momentum = None  # a cumulative average: one pass gives the batch's statistics
    model.eval()
    model.backbone.train()
    with torch.no_grad():
        model.backbone(model.transform(list(images))[0].tensors)
    return model.eval()


def _corr(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.flatten().double(), b.flatten().double()
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / (a.norm() * b.norm()).clamp_min(1e-12))


def run(ctx: Context) -> dict[str, Any]:
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import FasterRCNNBoxScoreTarget

    images = photos_batch(2 if ctx.quick else 4)
    model = calibrated_detector(images)
    theirs_model = copy.deepcopy(model)
    log(f"detection: Grad-CAM, {MODEL} (random weights), {images.shape[0]} photos, {BOXES} boxes each, at {LAYER}")

    first = detection_cams(model, images, layer=LAYER, method="gradcam", boxes=BOXES, min_score=0.0)
    if not bool(first.valid.all()):
        raise RuntimeError("the detector found fewer than 5 boxes in a photo")
    reference = GradCAM(model=theirs_model, target_layers=[dict(theirs_model.named_modules())[LAYER]])

    def targets(k: int) -> list[Any]:  # each photo's k-th box
        return [
            FasterRCNNBoxScoreTarget(labels=[first.labels[b, k]], bounding_boxes=[first.boxes[b, k]])
            for b in range(images.shape[0])
        ]

    def ours() -> None:
        detection_cams(model, images, layer=LAYER, method="gradcam", boxes=BOXES, min_score=0.0)

    def pytorch_grad_cam() -> None:
        for k in range(BOXES):  # one call per box rank
            reference(input_tensor=images, targets=targets(k))

    # One repetition each takes a minute and more: no untimed warm-up round.
    series = interleaved(
        {"hookviz": ours, "pytorch-grad-cam": pytorch_grad_cam}, ctx.heavy_reps, warmup=0, label="detection"
    )
    # Their target adds the IoU of the matched box to its score: the maps agree closely, not exactly.
    theirs = torch.from_numpy(reference(input_tensor=images, targets=targets(0)))  # (B, H, W)
    ours_maps = torch.nn.functional.interpolate(first.maps[:, 0:1], size=theirs.shape[-2:], mode="bilinear")[:, 0]
    agreement = min(_corr(ours_maps[b], theirs[b]) for b in range(images.shape[0]))
    log(f"detection: lowest correlation of pytorch-grad-cam's maps of the first boxes with hookviz's: {agreement:.3f}")
    reference.activations_and_grads.release()
    return {
        "model": MODEL,
        "layer": LAYER,
        "photos": images.shape[0],
        "boxes": BOXES,
        "input": list(INPUT_SIZE),
        "agreement": agreement,
        "tools": {k: v.as_json() for k, v in series.items()},
    }


def markdown(result: dict[str, Any]) -> str:
    ours, theirs = result["tools"]["hookviz"]["median"], result["tools"]["pytorch-grad-cam"]["median"]
    ratio = theirs / ours
    verdict = "met" if ratio >= TARGET else "missed"
    return (
        "| task | photos x boxes | hookviz | pytorch-grad-cam | speed-up | map correlation |\n"
        "|---|---:|---:|---:|---:|---:|\n"
        f"| Grad-CAM per box, `{result['model']}` `{result.get('layer', LAYER)}` (random weights) "
        f"| {result['photos']} x {result['boxes']} | {ours:.2f} s | {theirs:.2f} s "
        f"| **{ratio:.1f}x** (target {TARGET:g}x: {verdict}) | {result['agreement']:.3f} |\n"
    )
