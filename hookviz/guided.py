"""Guided backpropagation (Springenberg et al.) and guided Grad-CAM (Selvaraju et al.).

Guided backprop lets only positive gradients flow back through each ReLU (on top
of ReLU's own rule, which passes gradients only where its input was positive).
The rule is attached with forward hooks on the ReLU modules, which live for one
call: the model itself is never changed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .cams import batched_gradients, compute_cams
from .errors import UsageError
from .forward import run_model
from .hooks import hook_handles, preserved_state
from .layers import exported_op
from .targets import ClassTarget, Target

_RELU_OPS = ("aten.relu", "aten.relu_", "aten.relu6", "aten.hardtanh", "aten.hardtanh_")


class _PositiveGradientsOnly(torch.autograd.Function):
    """Identity forward; backward keeps only positive gradients."""

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.clone()

    @staticmethod
    def backward(ctx: Any, gradient: torch.Tensor) -> torch.Tensor:
        return gradient.clamp(min=0)


def is_relu_module(module: nn.Module) -> bool:
    """nn.ReLU / nn.ReLU6, or an unflattened torch.export module that is only a ReLU."""
    if isinstance(module, (nn.ReLU, nn.ReLU6)):
        return True
    op = exported_op(module)
    return op is not None and op.startswith(_RELU_OPS)


def relu_modules(model: nn.Module) -> list[nn.Module]:
    """The modules guided backprop rewrites; a UsageError naming the methods that work when there are none.

    Without them (SiLU, GELU, functional activations) guided backprop would silently be the plain gradient.
    """
    relus = [module for module in model.modules() if is_relu_module(module)]
    if not relus:
        raise UsageError(
            "guided backpropagation needs nn.ReLU/ReLU6 modules and this model has none (its activations would "
            "not be guided); use 'hookviz saliency -m smoothgrad' (or gradient, inputxgradient, "
            "integrated-gradients), which work with any activation, or 'hookviz gradcam'"
        )
    return relus


def _guided_hook(module: nn.Module, inputs: Any, output: Any) -> Any:
    return _PositiveGradientsOnly.apply(output) if isinstance(output, torch.Tensor) else None


def guided_backprop(
    model: nn.Module,
    batch: torch.Tensor,
    classes: torch.Tensor | None = None,
    *,
    top_k: int = 1,
    output_key: str | None = None,
    target: Target | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Guided-backprop gradients of each image's class scores w.r.t. the input.

    ``target`` (``hookviz.targets``) scores something else than class logits (a segmentation class, a single
    output's side, a similarity); ``classes`` then are its choices (``Target.choose``).

    Returns (gradients (B, K, 3, H, W), classes (B, K), probabilities (B, num_classes): what ``target.shown`` shows).
    """
    relus = relu_modules(model)
    with torch.inference_mode(False), preserved_state(model), torch.enable_grad(), hook_handles() as handles:
        handles.extend(module.register_forward_hook(_guided_hook) for module in relus)
        inputs = batch.detach().clone().requires_grad_(True)
        explained = target if target is not None else ClassTarget((), top_k, "softmax")
        with explained.hooked(model):
            logits = explained.select(run_model(model, inputs), output_key)
        chosen = classes if classes is not None else explained.choose(logits.detach())
        gradients = batched_gradients(explained.scores(logits, chosen), inputs)
    return gradients.detach(), chosen, explained.shown(logits.detach())


def gradient_image(gradient: torch.Tensor) -> torch.Tensor:
    """A (3, H, W) input gradient as a viewable image in [0, 1]: centred, scaled by its spread, grey = zero."""
    centred = gradient - gradient.mean()
    scaled = centred / (centred.std() + 1e-7) * 0.15 + 0.5
    return scaled.clamp(0, 1)


@dataclass
class GuidedBatch:
    """Guided backprop and guided Grad-CAM gradients for a batch; ``[b, k]`` explains ``classes[b, k]``."""

    guided: torch.Tensor  # (B, K, 3, H, W) guided-backprop gradients at the model's input resolution
    guided_gradcam: torch.Tensor  # (B, K, 3, H, W) the same, weighted by the upsampled Grad-CAM map
    classes: torch.Tensor
    probabilities: torch.Tensor
    region_errors: list[str | None] | None = None  # per image, why a --region or --mask does not fit it


def compute_guided(
    model: nn.Module,
    batch: torch.Tensor,
    *,
    layer: str,
    classes: Sequence[int] | None = None,
    top_k: int = 1,
    output_key: str | None = None,
    target: Target | None = None,
) -> GuidedBatch:
    """Guided backprop and guided Grad-CAM for the same classes (or ``target``'s items, see ``guided_backprop``)."""
    cams = compute_cams(
        model, batch, layer=layer, method="gradcam", classes=classes, top_k=top_k, output_key=output_key, target=target
    )
    guided, chosen, probabilities = guided_backprop(model, batch, cams.classes, output_key=output_key, target=target)
    from .render import normalize_map, resize_map

    maps = normalize_map(cams.maps)
    upsampled = torch.stack(
        [
            torch.stack([resize_map(maps[b, k], (batch.shape[-2], batch.shape[-1])) for k in range(maps.shape[1])])
            for b in range(maps.shape[0])
        ]
    )
    return GuidedBatch(
        guided=guided, guided_gradcam=guided * upsampled[:, :, None], classes=chosen, probabilities=probabilities
    )
