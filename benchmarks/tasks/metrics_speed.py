"""Metrics: deletion + insertion (20 steps) + ROAD (MoRF and LeRF at 10..90%) of Grad-CAM maps on 16 photos with
resnet50 (random weights), hookviz against the references on the same maps: torchcam's DeletionInsertionMetric
(deletion/insertion; pytorch-grad-cam has none) plus pytorch-grad-cam's ROADMostRelevantFirstAverage and
ROADLeastRelevantFirstAverage (ROAD; torchcam has none). Target: hookviz at least 2x faster.

Every tool scores the same input tensors, the same maps (hookviz's Grad-CAM at layer4, upsampled) and the same
classes with the softmax probability; the removed pixels' value for deletion/insertion is the same blurred copy.

Memory: each case's peak resident memory above the process's memory just before it (VmHWM reset through
/proc/self/clear_refs after glibc's free memory is handed back with malloc_trim), in the same process as the
timings; both tools run 32 inputs per forward pass, so both are bounded by the chunk, not by the steps or images.
"""

from __future__ import annotations

import ctypes
import gc
from collections.abc import Callable
from contextlib import nullcontext
from typing import Any

import torch
import torchvision
from common import SEED, interleaved, log, proc_status

from tasks import Context

PERCENTILES = [10, 20, 30, 40, 50, 60, 70, 80, 90]
STEPS = 20
CHUNK = 32  # inputs per forward pass, the same for every tool


def _inputs(ctx: Context, count: int, size: int) -> torch.Tensor:
    from hookviz.images import load_image, preprocess
    from hookviz.preprocessing import default_preprocessing

    preprocessing = default_preprocessing((size, size))
    return torch.stack([preprocess(load_image(path), preprocessing) for path in ctx.photos[:count]])


def _peak_memory(case: Callable[[], Any]) -> Callable[[], dict[str, int] | None]:
    """``case`` returning its peak resident memory above the resident memory before it (None where /proc cannot
    reset the peak)."""

    def measured() -> dict[str, int] | None:
        gc.collect()
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass
        try:
            with open("/proc/self/clear_refs", "w") as handle:
                handle.write("5")
        except OSError:
            case()
            return None
        before = proc_status()["VmRSS"]
        case()
        return {"peak_above_start": proc_status()["VmHWM"] - before, "start": before}

    return measured


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

    last: dict[str, Any] = {}  # each tool's results of its last timed run, for the agreement below

    def hookviz_metrics() -> dict[str, torch.Tensor]:
        scorer = metrics.Scorer(model, chunk=CHUNK)
        last["hookviz"] = metrics.map_scores(
            scorer, inputs, maps, classes, ["deletion", "insertion", "road"], steps=STEPS
        )
        return last["hookviz"]

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
        last["references"] = {"deletion_insertion": deletion_insertion.summary(), "morf": morf, "lerf": lerf}
        return last["references"]

    with torch.inference_mode():  # the first forward passes of a batch shape are slow: neither tool pays them
        model(inputs)
        model(inputs[:1].expand(CHUNK, -1, -1, -1))
    log(
        f"metrics: deletion+insertion ({STEPS} steps) + ROAD (9 percentiles) of Grad-CAM, resnet50, {len(inputs)} photos"
    )
    series = interleaved(  # the cases' results stay out of the JSON (tensors); their peak memory goes in
        {"hookviz": _peak_memory(hookviz_metrics), "torchcam + pytorch-grad-cam": _peak_memory(references)},
        ctx.heavy_reps,
        warmup=0,
        label="metrics",
    )
    ours, theirs = last["hookviz"], last["references"]
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

    def peak(name: str) -> str:
        measured = [e["peak_above_start"] for e in tools[name].get("extra") or [] if isinstance(e, dict)]
        return f"{max(measured) / 2**20:.0f} MiB" if measured else "n/a"

    lines = [
        f"### Metrics: deletion + insertion + ROAD of Grad-CAM maps, resnet50, {result['images']} photos at "
        f"{result['size']} px",
        "",
        "| tool | median s | vs hookviz | peak memory above start |",
        "|---|---:|---:|---:|",
        f"| hookviz (`metrics.map_scores`) | {ours:.1f} | 1.00x | {peak('hookviz')} |",
        f"| torchcam DeletionInsertionMetric + pytorch-grad-cam ROAD averages | {theirs:.1f} | {ratio:.2f}x | "
        f"{peak('torchcam + pytorch-grad-cam')} |",
        "",
        f"Mean deletion/insertion areas differ from torchcam's by {result['agreement']['deletion']:.1e} / "
        f"{result['agreement']['insertion']:.1e} (tie order of equal map values aside). "
        f"Target hookviz >= 2x faster: **{'met' if ratio >= 2 else 'missed'}** ({ratio:.2f}x).",
    ]
    return "\n".join(lines)
