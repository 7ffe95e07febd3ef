"""Sharper maps: --aug-smooth Grad-CAM (resnet50) and Ablation-CAM (resnet18), hookviz vs pytorch-grad-cam.

Each tool gets its own copy of the same seeded model, the same input and class. pytorch-grad-cam runs its six
augmentations one after another, each with a full backward pass; hookviz runs the six copies as one batch and
back-propagates only above the layer. For Ablation-CAM, pytorch-grad-cam runs the whole network for every
ablated channel; hookviz branches the batch at the layer (the network below runs once per image), where the
model allows it (torchvision's resnets do).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
import torchvision
from common import CLASS, SEED, interleaved, log

from hookviz.cams import compute_cams
from tasks import Context

AUG_TARGET = 3.0  # hookviz at least this many times faster
ABLATION_TARGET = 2.0


def _corr(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.flatten().double(), b.flatten().double()
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / (a.norm() * b.norm()).clamp_min(1e-12))


def _upsampled(maps: torch.Tensor, size: int) -> torch.Tensor:
    return F.interpolate(maps[:, None].float(), size=(size, size), mode="bilinear", align_corners=False)[:, 0]


def _case(name: str, model: torch.nn.Module, layer: str, x: torch.Tensor, reps: int, **options: Any) -> dict[str, Any]:
    from pytorch_grad_cam import AblationCAM, GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    reference_class = AblationCAM if options.get("method") == "ablationcam" else GradCAM
    theirs_model = copy.deepcopy(model)
    modules = dict(theirs_model.named_modules())
    reference = reference_class(model=theirs_model, target_layers=[modules[layer]])
    targets = [ClassifierOutputTarget(CLASS)] * x.shape[0]
    aug = bool(options.get("aug_smooth"))

    def ours() -> torch.Tensor:
        return compute_cams(model, x, layer=layer, classes=[CLASS], **options).maps[:, 0]

    def pytorch_grad_cam() -> Any:
        return reference(input_tensor=x, targets=targets, aug_smooth=aug)

    agreement = _corr(_upsampled(ours(), x.shape[-1]), torch.from_numpy(pytorch_grad_cam()))
    log(f"{name}: correlation of pytorch-grad-cam's maps with hookviz's: {agreement:.4f}")
    series = interleaved({"hookviz": ours, "pytorch-grad-cam": pytorch_grad_cam}, reps, warmup=0, label=name)
    reference.activations_and_grads.release()
    return {"batch": x.shape[0], "agreement": agreement, "tools": {k: v.as_json() for k, v in series.items()}}


def run(ctx: Context) -> dict[str, Any]:
    torch.manual_seed(SEED)
    resnet50 = torchvision.models.resnet50(weights=None).eval()
    torch.manual_seed(SEED + 1)
    images = torch.randn(2 if ctx.quick else 4, 3, 224, 224)
    log(f"smoothing: --aug-smooth Grad-CAM, resnet50 layer4, batch {images.shape[0]}")
    aug = _case("aug-smooth", resnet50, "layer4", images, ctx.heavy_reps, aug_smooth=True)
    torch.manual_seed(SEED)
    resnet18 = torchvision.models.resnet18(weights=None).eval()
    log("smoothing: Ablation-CAM, resnet18 layer4 (512 channels), one 224x224 image, 32 ablated copies per pass")
    ablation = _case(
        "ablationcam", resnet18, "layer4", images[:1], ctx.heavy_reps, method="ablationcam", score_batch_size=32
    )
    return {"aug_smooth": aug, "ablationcam": ablation}


def markdown(result: dict[str, Any]) -> str:
    rows = []
    for key, title, target in (
        ("aug_smooth", "`--aug-smooth` Grad-CAM, resnet50 `layer4`", AUG_TARGET),
        ("ablationcam", "Ablation-CAM, resnet18 `layer4`", ABLATION_TARGET),
    ):
        case = result.get(key)
        if not case:
            continue
        ours, theirs = case["tools"]["hookviz"]["median"], case["tools"]["pytorch-grad-cam"]["median"]
        ratio = theirs / ours
        verdict = "met" if ratio >= target else "missed"
        rows.append(
            f"| {title} | {case['batch']} | {ours:.2f} s | {theirs:.2f} s | **{ratio:.1f}x** "
            f"(target {target:g}x: {verdict}) | {case['agreement']:.4f} |"
        )
    return (
        "| task | images | hookviz | pytorch-grad-cam | speed-up | map correlation |\n"
        "|---|---:|---:|---:|---:|---:|\n" + "\n".join(rows) + "\n"
    )
