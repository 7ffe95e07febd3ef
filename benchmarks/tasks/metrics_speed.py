"""Metrics: deletion + insertion (20 steps) + ROAD (MoRF and LeRF at 10..90%) of Grad-CAM maps on 16 photos with
resnet50 (random weights), hookviz against the references on the same maps: torchcam's DeletionInsertionMetric
(deletion/insertion; pytorch-grad-cam has none) plus pytorch-grad-cam's ROADMostRelevantFirstAverage and
ROADLeastRelevantFirstAverage (ROAD; torchcam has none). Target: hookviz at least 2x faster.

Every tool scores the same input tensors, the same maps (hookviz's Grad-CAM at layer4, upsampled) and the same
classes with the softmax probability; the removed pixels' value for deletion/insertion is the same blurred copy.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

import torch
import torchvision
from common import SEED, interleaved, log

from tasks import Context

PERCENTILES = [10, 20, 30, 40, 50, 60, 70, 80, 90]
STEPS = 20
CHUNK = 32  # inputs per forward pass, the same for every tool


def _inputs(ctx: Context, count: int, size: int) -> torch.Tensor:
    from hookviz.images import load_image, preprocess
    from hookviz.preprocessing import default_preprocessing

    preprocessing = default_preprocessing((size, size))
    return torch.stack([preprocess(load_image(path), preprocessing) for path in ctx.photos[:count]])


def run(ctx: Context) -> dict[str, Any]:
    from hookviz import metrics
    from hookviz.cams import compute_cams

    count, size = (2, 112) if ctx.quick else (16, 224)
    torch.manual_seed(SEED)
    model = torchvision.models.resnet50(weights=None).eval()
    inputs = _inputs(ctx, count, size)
    cams = compute_cams(model, inputs, layer="layer4", method="gradcam")
    maps = metrics.input_maps(cams.maps, (size, size))  # (B, 1, H, W): every tool gets these
    classes = cams.classes

    def hookviz_metrics() -> dict[str, torch.Tensor]:
        scorer = metrics.Scorer(model, chunk=CHUNK)
        return metrics.map_scores(scorer, inputs, maps, classes, ["deletion", "insertion", "road"], steps=STEPS)

    def references() -> dict[str, Any]:
        from pytorch_grad_cam.metrics.road import ROADLeastRelevantFirstAverage, ROADMostRelevantFirstAverage
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputSoftmaxTarget
        from torchcam.metrics import DeletionInsertionMetric

        class SameMaps:  # torchcam's extractor interface, handing over the shared maps
            def __init__(self) -> None:
                self.model = model

            def __call__(self, class_idx: Any, scores: Any = None, normalized: bool = True, **kwargs: Any) -> Any:
                return [maps[:, 0]]

            def fuse_cams(self, cams: Any) -> Any:
                return cams[0]

            def _hooks_off(self) -> Any:
                return nullcontext()

        deletion_insertion = DeletionInsertionMetric(
            SameMaps(), lambda logits: logits.softmax(dim=-1), steps=STEPS, baseline=metrics.blurred, batch_size=CHUNK
        )
        with torch.no_grad():
            deletion_insertion.update(inputs, class_idx=classes[:, 0].tolist())
        targets = [ClassifierOutputSoftmaxTarget(int(c)) for c in classes[:, 0]]
        heat = maps[:, 0].numpy()
        with torch.no_grad():
            morf = ROADMostRelevantFirstAverage(PERCENTILES)(inputs, heat, targets, model)
            lerf = ROADLeastRelevantFirstAverage(PERCENTILES)(inputs, heat, targets, model)
        return {"deletion_insertion": deletion_insertion.summary(), "morf": morf, "lerf": lerf}

    with torch.inference_mode():  # the first forward passes of a batch shape are slow: neither tool pays them
        model(inputs)
        model(inputs[:1].expand(CHUNK, -1, -1, -1))
    log(
        f"metrics: deletion+insertion ({STEPS} steps) + ROAD (9 percentiles) of Grad-CAM, resnet50, {len(inputs)} photos"
    )
    series = interleaved(  # the cases' results stay out of the JSON (tensors)
        {"hookviz": lambda: hookviz_metrics() and None, "torchcam + pytorch-grad-cam": lambda: references() and None},
        ctx.heavy_reps,
        warmup=0,
        label="metrics",
    )
    ours = hookviz_metrics()
    theirs = references()
    agreement = {
        "deletion": abs(float(ours["deletion"].mean()) - theirs["deletion_insertion"]["deletion_auc"]),
        "insertion": abs(float(ours["insertion"].mean()) - theirs["deletion_insertion"]["insertion_auc"]),
    }
    return {
        "images": len(inputs),
        "size": size,
        "tools": {name: value.as_json() for name, value in series.items()},
        "agreement": agreement,
    }


def markdown(result: dict[str, Any]) -> str:
    tools = result["tools"]
    ours = tools["hookviz"]["median"]
    theirs = tools["torchcam + pytorch-grad-cam"]["median"]
    ratio = theirs / ours if ours else float("nan")
    lines = [
        f"### Metrics: deletion + insertion + ROAD of Grad-CAM maps, resnet50, {result['images']} photos at "
        f"{result['size']} px",
        "",
        "| tool | median s | vs hookviz |",
        "|---|---:|---:|",
        f"| hookviz (`metrics.map_scores`) | {ours:.1f} | 1.00x |",
        f"| torchcam DeletionInsertionMetric + pytorch-grad-cam ROAD averages | {theirs:.1f} | {ratio:.2f}x |",
        "",
        f"Mean deletion/insertion areas differ from torchcam's by {result['agreement']['deletion']:.1e} / "
        f"{result['agreement']['insertion']:.1e} (tie order of equal map values aside). "
        f"Target hookviz >= 2x faster: **{'met' if ratio >= 2 else 'missed'}** ({ratio:.2f}x).",
    ]
    return "\n".join(lines)
