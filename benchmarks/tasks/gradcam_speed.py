"""Tasks 1 and 2: Grad-CAM on resnet50 at layer4, hookviz vs pytorch-grad-cam vs torchcam vs Captum.

Every tool gets its own copy of the same seeded model (so one tool's hooks never
run during another's forward pass), the same input tensor and the same class.
"""

from __future__ import annotations

import copy
from typing import Any

import hookviz_adapter as hv
import torch
import torchvision
from common import CLASS, SEED, interleaved, log

from tasks import Context

TOOLS = ("hookviz", "pytorch-grad-cam", "torchcam", "Captum")


def _model() -> torch.nn.Module:
    torch.manual_seed(SEED)
    return torchvision.models.resnet50(weights=None).eval()


class References:
    """Each reference library set up the way its README shows, on its own copy of the model."""

    def __init__(self, model: torch.nn.Module):
        from captum.attr import LayerGradCam
        from pytorch_grad_cam import GradCAM as PgcGradCAM
        from torchcam.methods import GradCAM as TcGradCAM

        self.pgc_model = copy.deepcopy(model)
        self.pgc = PgcGradCAM(model=self.pgc_model, target_layers=[self.pgc_model.layer4[-1]])
        self.tc_model = copy.deepcopy(model)
        self.tc = TcGradCAM(self.tc_model, "layer4")
        self.captum_model = copy.deepcopy(model)
        self.captum = LayerGradCam(self.captum_model, self.captum_model.layer4)

    def pytorch_grad_cam(self, x: torch.Tensor, classes: list[int]) -> Any:
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

        return self.pgc(input_tensor=x, targets=[ClassifierOutputTarget(c) for c in classes])

    def torchcam(self, x: torch.Tensor, class_idx: int | list[int], retain_graph: bool = False) -> Any:
        scores = self.tc_model(x)
        return self.tc(class_idx=class_idx, scores=scores, retain_graph=retain_graph)

    def torchcam_multi(self, x: torch.Tensor, per_class: list[list[int]]) -> Any:
        """One forward, then one extractor call per class (retain_graph on all but the last)."""
        scores = self.tc_model(x)
        return [
            self.tc(class_idx=classes, scores=scores, retain_graph=j < len(per_class) - 1)
            for j, classes in enumerate(per_class)
        ]

    def captum_cam(self, x: torch.Tensor, target: int | torch.Tensor) -> Any:
        return self.captum.attribute(x, target=target)

    def close(self) -> None:
        self.pgc.activations_and_grads.release()
        self.tc.remove_hooks()


def _corr(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.flatten().double(), b.flatten().double()
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / (a.norm() * b.norm()).clamp_min(1e-12))


def agreement(hv_model: torch.nn.Module, refs: References) -> dict[str, float]:
    """Untimed check that every tool explains the same thing: correlation of each reference's map with hookviz's."""
    import torch.nn.functional as F

    torch.manual_seed(SEED + 7)
    x = torch.randn(2, 3, 224, 224)
    ours = F.relu(hv.cam_maps(hv_model, x, layer="layer4", classes=[CLASS])[:, 0])  # (2, 7, 7)
    upsampled = F.interpolate(ours[:, None], size=(224, 224), mode="bilinear", align_corners=False)[:, 0]
    pgc = torch.from_numpy(refs.pytorch_grad_cam(x, [CLASS, CLASS]))
    tc = refs.torchcam(x, CLASS)[0]
    captum = F.relu(refs.captum_cam(x, CLASS).detach()[:, 0])
    return {"pytorch-grad-cam": _corr(upsampled, pgc), "torchcam": _corr(ours, tc), "Captum": _corr(ours, captum)}


def run(ctx: Context) -> dict[str, Any]:
    model = _model()
    hv_model = copy.deepcopy(model)
    floor_model = copy.deepcopy(model)
    refs = References(model)
    results: dict[str, Any] = {"task1": {}, "task2": {}}
    results["agreement"] = agreement(hv_model, refs)
    log(
        "task 1: correlation of each reference's Grad-CAM with hookviz's: "
        + ", ".join(f"{k} {v:.4f}" for k, v in results["agreement"].items())
    )

    sizes = (1, 4) if ctx.quick else (1, 16)
    for batch in sizes:
        torch.manual_seed(SEED + batch)
        x = torch.randn(batch, 3, 224, 224)
        classes = [CLASS] * batch

        def floor() -> None:
            with torch.inference_mode():
                floor_model(x)

        cases = {
            "hookviz": lambda: hv.cam_maps(hv_model, x, layer="layer4", classes=[CLASS]),
            "pytorch-grad-cam": lambda: refs.pytorch_grad_cam(x, classes),
            "torchcam": lambda: refs.torchcam(x, CLASS),
            "Captum": lambda: refs.captum_cam(x, CLASS),
            "floor": floor,
        }
        log(f"task 1: Grad-CAM resnet50 layer4, batch {batch}")
        series = interleaved(cases, ctx.reps, label=f"task1 b{batch}")
        results["task1"][f"batch{batch}"] = {"batch": batch, "tools": {k: v.as_json() for k, v in series.items()}}

    batch = 2 if ctx.quick else 8
    torch.manual_seed(SEED + 100)
    x = torch.randn(batch, 3, 224, 224)
    with torch.no_grad():  # not inference_mode: Captum must be able to use these indices under autograd
        top5 = floor_model(x).topk(5, dim=1).indices  # given to the references; hookviz finds its top-5 itself
    per_class = [top5[:, j].tolist() for j in range(5)]
    cases = {
        "hookviz top-5": lambda: hv.cam_maps(hv_model, x, layer="layer4", top_k=5),
        "hookviz top-1": lambda: hv.cam_maps(hv_model, x, layer="layer4", top_k=1),
        "pytorch-grad-cam": lambda: [refs.pytorch_grad_cam(x, classes) for classes in per_class],
        "torchcam": lambda: refs.torchcam_multi(x, per_class),
        "Captum": lambda: [refs.captum_cam(x, top5[:, j]) for j in range(5)],
    }
    log(f"task 2: Grad-CAM top-5 classes, batch {batch}")
    # warm-up=0: task 1 already warmed these models; the median of the repetitions absorbs the first call
    series = interleaved(cases, ctx.heavy_reps, warmup=0, label="task2")
    results["task2"] = {"batch": batch, "tools": {k: v.as_json() for k, v in series.items()}}
    refs.close()
    return results
