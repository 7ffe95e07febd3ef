"""Integrated Gradients, 32 steps, on resnet50 (random weights): hookviz vs Captum's IntegratedGradients.

Both get their own copy of the same seeded model, the same input, the same class, the same black
baseline, the same integration rule (Gauss-Legendre, Captum's default) and the same number of path
points per forward pass (hookviz ``batch_size``, Captum ``internal_batch_size``). Target: hookviz no slower.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torchvision
from common import CLASS, SEED, interleaved, log

from tasks import Context

STEPS = 32
TARGET_RATIO = 1.0  # hookviz time / Captum time must be at most this


def _model() -> torch.nn.Module:
    torch.manual_seed(SEED)
    return torchvision.models.resnet50(weights=None).eval()


def run(ctx: Context) -> dict[str, Any]:
    from captum.attr import IntegratedGradients

    from hookviz.attribution import baseline_image, integrated_gradients
    from hookviz.preprocessing import IMAGENET_MEAN, IMAGENET_STD

    model = _model()
    hv_model, captum_model = copy.deepcopy(model), copy.deepcopy(model)
    captum = IntegratedGradients(captum_model)
    results: dict[str, Any] = {"steps": STEPS, "cases": {}}
    sizes = ((1, 16),) if ctx.quick else ((1, 32), (2, 16))
    for images, internal in sizes:
        torch.manual_seed(SEED + images)
        x = torch.randn(images, 3, 224, 224)
        start = baseline_image("black", x, IMAGENET_MEAN, IMAGENET_STD)
        classes = torch.full((images, 1), CLASS)

        def hookviz() -> torch.Tensor:
            return integrated_gradients(hv_model, x, classes, start, steps=STEPS, batch_size=internal)[:, 0]

        def reference() -> torch.Tensor:
            return captum.attribute(
                x, start, target=CLASS, n_steps=STEPS, method="gausslegendre", internal_batch_size=internal
            ).detach()

        ours, theirs = hookviz(), reference()  # untimed: both explain the same thing
        difference = float((ours - theirs).abs().max() / theirs.abs().max().clamp_min(1e-30))
        label = f"{images} image(s), {internal} path points per pass"
        log(f"integrated gradients: {label}: largest difference {difference:.2e} of the largest attribution")
        cases = {"hookviz": hookviz, "Captum": reference}
        series = interleaved(
            {name: (lambda case=case: _discarded(case())) for name, case in cases.items()},
            ctx.heavy_reps,
            warmup=0,
            label=f"ig {label}",
        )
        results["cases"][f"images{images}_internal{internal}"] = {
            "images": images,
            "internal_batch_size": internal,
            "relative_difference": difference,
            "tools": {name: s.as_json() for name, s in series.items()},
        }
    return results


def _discarded(result: torch.Tensor) -> None:
    """Nothing to keep from a timed call (the results are compared once, untimed)."""


def markdown(result: dict[str, Any]) -> str:
    """A table of median times per case, hookviz / Captum ratios and whether the target is met."""
    lines = [
        f"### Integrated Gradients ({result['steps']} steps, resnet50, random weights) vs Captum",
        "",
        "| images | path points per pass | hookviz | Captum | hookviz / Captum | largest difference | target |",
        "|---:|---:|---:|---:|---:|---:|:---|",
    ]
    for case in result["cases"].values():
        ours, theirs = case["tools"]["hookviz"]["median"], case["tools"]["Captum"]["median"]
        ratio = ours / theirs
        met = "met" if ratio <= TARGET_RATIO else "missed"
        lines.append(
            f"| {case['images']} | {case['internal_batch_size']} | {ours:.2f} s | {theirs:.2f} s | {ratio:.2f}x | "
            f"{case['relative_difference']:.1e} | {met} (no slower) |"
        )
    return "\n".join(lines) + "\n"
