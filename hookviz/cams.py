"""Class activation maps: each method is its weighting rule over a layer's activations.

Shapes: activations ``A`` are (B, C, h, w); gradients ``G`` of the K explained
class scores are (B, K, C, h, w); every method returns maps of shape (B, K, h, w),
after ReLU, not yet normalized.

Gradients come from ``torch.autograd.grad(scores, A)``: no ``loss.backward()``,
no parameter ``.grad``, no module backward hooks, and the forward pass records
autograd only above the target layer (see hooks.capture). K classes per image
cost one forward pass and one batched backward (``is_grads_batched``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .errors import UsageError
from .forward import run_model, select_logits
from .hooks import capture, preserved_state
from .methods import CAM_METHODS, GRADIENT_METHODS
from .spatial import spatial_output, to_spatial

EPS = 1e-7
METHODS = CAM_METHODS


def gradcam(A: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
    """Grad-CAM (Selvaraju et al.): channel weights are the spatial mean of the gradients."""
    weights = G.mean(dim=(-2, -1), keepdim=True)
    return F.relu((weights * A[:, None]).sum(dim=2))


def gradcam_plus_plus(A: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
    """Grad-CAM++ (Chattopadhyay et al.): positive gradients weighted per position by alpha.

    alpha = g^2 / (2 g^2 + sum_ij(A) g^3), the closed form for an exponential score.
    """
    g2, g3 = G.pow(2), G.pow(3)
    activation_sum = A[:, None].sum(dim=(-2, -1), keepdim=True)
    denominator = 2 * g2 + activation_sum * g3
    alpha = g2 / torch.where(denominator != 0, denominator, torch.ones_like(denominator))
    alpha = torch.where(G != 0, alpha, torch.zeros_like(alpha))
    weights = (F.relu(G) * alpha).sum(dim=(-2, -1), keepdim=True)
    return F.relu((weights * A[:, None]).sum(dim=2))


def xgradcam(A: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
    """XGrad-CAM (Fu et al.): gradients weighted by the normalized activations."""
    a = A[:, None]
    weights = (G * a).sum(dim=(-2, -1), keepdim=True) / (a.sum(dim=(-2, -1), keepdim=True) + EPS)
    return F.relu((weights * a).sum(dim=2))


def layercam(A: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
    """LayerCAM (Jiang et al.): each position weighted by its own positive gradient."""
    return F.relu((F.relu(G) * A[:, None]).sum(dim=2))


def hirescam(A: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
    """HiResCAM (Draelos & Carin): gradient times activation, summed over channels (faithful to the score)."""
    return F.relu((G * A[:, None]).sum(dim=2))


def eigencam(A: torch.Tensor) -> torch.Tensor:
    """Eigen-CAM (Muhammad & Yeasin): the first principal component of the activations, class-independent.

    The component's sign is arbitrary; it is chosen so the map correlates
    positively with the mean activation, so the heat sits where the layer fires.
    """
    batch, channels, height, width = A.shape
    positions = A.flatten(2).transpose(1, 2)  # (B, hw, C)
    centered = positions - positions.mean(dim=1, keepdim=True)
    _, _, vh = torch.linalg.svd(centered, full_matrices=False)
    projection = centered @ vh[:, 0, :, None]  # (B, hw, 1)
    projection = projection[..., 0]
    mean_map = positions.mean(dim=2)
    mean_map = mean_map - mean_map.mean(dim=1, keepdim=True)
    sign = torch.sign((projection * mean_map).sum(dim=1, keepdim=True))
    sign = torch.where(sign == 0, torch.ones_like(sign), sign)
    return F.relu(projection * sign).view(batch, 1, height, width)


def class_activation_map(A: torch.Tensor, classifier_weight: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """CAM (Zhou et al.): the layer's channels weighted by the final linear layer's row for each class."""
    weights = classifier_weight[classes]  # (B, K, C)
    return F.relu(torch.einsum("bkc,bchw->bkhw", weights, A))


GRADIENT_RULES: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "gradcam": gradcam,
    "gradcam++": gradcam_plus_plus,
    "xgradcam": xgradcam,
    "layercam": layercam,
    "hirescam": hirescam,
}


@dataclass
class CamBatch:
    """The maps for a batch: ``maps[b, k]`` explains class ``classes[b, k]`` for image b."""

    maps: torch.Tensor  # (B, K, h, w), >= 0, not normalized
    classes: torch.Tensor  # (B, K) long
    probabilities: torch.Tensor  # (B, num_classes) softmax of the logits
    layer: str
    method: str
    layer_calls: int = 1  # how many times the layer ran in the forward pass (the last call is explained)
    empty: torch.Tensor | None = None  # (B, K) bool: the map is constant (all zero), so it shows nothing


def constant_maps(maps: torch.Tensor) -> torch.Tensor:
    """(B, K) bool: which maps (B, K, h, w) have one value everywhere (nothing to show, whatever the colormap)."""
    flat = maps.flatten(2)
    return (flat.max(dim=-1).values - flat.min(dim=-1).values) <= 0


def choose_classes(logits: torch.Tensor, classes: Sequence[int] | None, top_k: int) -> torch.Tensor:
    """(B, K) class indices: the given ones for every image, else each image's top-k predictions."""
    num_classes = logits.shape[1]
    if classes:
        for index in classes:
            if not 0 <= index < num_classes:
                raise UsageError(f"--class {index} is out of range: this model has classes 0..{num_classes - 1}")
        return torch.tensor(list(classes), device=logits.device).expand(logits.shape[0], -1)
    if top_k > num_classes:
        raise UsageError(f"--top-k {top_k} is more than the model's {num_classes} classes")
    return logits.topk(top_k, dim=1).indices


def batched_gradients(scores: torch.Tensor, activation: torch.Tensor) -> torch.Tensor:
    """d scores[b, k] / d activation[b] for every k: (B, K, C, h, w), with one batched backward pass.

    Images in a batch do not interact in eval mode, so the gradient of the sum over
    the batch is each image's own gradient.
    """
    batch, k = scores.shape
    if k == 1:
        (gradient,) = torch.autograd.grad(scores.sum(), activation)
        return gradient[:, None]
    selectors = torch.eye(k, device=scores.device, dtype=scores.dtype)[:, None, :].expand(k, batch, k)
    try:
        # retain_graph: if vmap fails part-way, the per-class fallback below still needs the graph.
        (gradient,) = torch.autograd.grad(
            scores, activation, grad_outputs=selectors, is_grads_batched=True, retain_graph=True
        )
    except RuntimeError:  # an op without a batching rule: one backward pass per class instead
        gradient = torch.stack(
            [torch.autograd.grad(scores[:, j].sum(), activation, retain_graph=j < k - 1)[0] for j in range(k)]
        )
    return gradient.transpose(0, 1)


def compute_cams(
    model: nn.Module,
    batch: torch.Tensor,
    *,
    layer: str,
    method: str = "gradcam",
    classes: Sequence[int] | None = None,
    top_k: int = 1,
    output_key: str | None = None,
    score_batch_size: int = 32,
    layer_calls: int | None = None,
    fixed_batch: int | None = None,
) -> CamBatch:
    """Explain ``classes`` (or each image's top-k predictions) for a batch of model inputs at ``layer``.

    Args:
        model: any ``nn.Module``; left as it was (modes, ``.grad``, hooks) whatever happens.
        batch: model inputs (B, C, H, W), on the model's device.
        layer: a ``named_modules()`` name whose output is a map (N, C, h, w), tokens or channels-last.
        method: one of ``METHODS``.
        classes: class indices to explain for every image; None for each image's ``top_k`` predictions.
        output_key: which part of a tuple/dict output holds the class scores (see ``select_logits``).
        score_batch_size: masked inputs per forward pass for Score-CAM.
        layer_calls: for a layer that runs several times per forward pass, the ``CamBatch.layer_calls``
            of an earlier batch, so that autograd does not record the calls before the last one.
        fixed_batch: the model takes exactly that many inputs (a .pt2 exported with a static batch),
            for Score-CAM's own forward passes.

    Returns:
        ``CamBatch``: maps (B, K, h, w) >= 0, not normalized, with the classes and probabilities.
    """
    if method not in METHODS:
        raise UsageError(f"unknown method {method!r}; choose one of: {', '.join(METHODS)}")
    needs_grad = method in GRADIENT_METHODS
    with capture(model, [layer], grad=needs_grad, leaf_calls={layer: layer_calls or 1}) as activations:
        output = run_model(model, batch)
        logits = select_logits(output, output_key)
        if logits.dim() != 2:
            raise UsageError(f"the model's output has shape {tuple(logits.shape)}, not (N, classes); use --output KEY")
        output, layout = spatial_output(
            activations, layer, (batch.shape[-2], batch.shape[-1]), activations.calls.get(layer, 0)
        )
        if needs_grad and not output.requires_grad:  # it ran fewer times than layer_calls said: start over
            return compute_cams(
                model,
                batch,
                layer=layer,
                method=method,
                classes=classes,
                top_k=top_k,
                output_key=output_key,
                score_batch_size=score_batch_size,
                fixed_batch=fixed_batch,
            )
        activation = to_spatial(output.detach(), layout)  # tokens and channels-last outputs as (B, C, h, w)
        chosen = choose_classes(logits.detach(), classes, top_k)
        if needs_grad:
            gradients = batched_gradients(logits.gather(1, chosen), output)  # (B, K, *output's shape)
            gradients = to_spatial(gradients.flatten(0, 1), layout).unflatten(0, gradients.shape[:2])
            maps = GRADIENT_RULES[method](activation, gradients)
        elif method == "eigencam":
            maps = eigencam(activation).expand(-1, chosen.shape[1], -1, -1)
        elif method == "cam":
            maps = class_activation_map(activation, _linear_head(model, activation, logits.detach(), layer), chosen)
    if method == "scorecam":  # its many masked forward passes run without the capture hook
        with preserved_state(model):
            maps = score_cam(
                model, batch, activation, chosen, output_key, fixed_batch or score_batch_size, pad_to=fixed_batch
            )
    return CamBatch(
        maps=maps.detach(),
        classes=chosen,
        probabilities=logits.detach().softmax(dim=1),
        layer=layer,
        method=method,
        layer_calls=activations.calls.get(layer, 1),
    )


def _linear_head(model: nn.Module, activation: torch.Tensor, logits: torch.Tensor, layer: str) -> torch.Tensor:
    """The classifier weight W when logits = W @ mean_hw(activation) + b, checked on the batch itself."""
    pooled = activation.mean(dim=(-2, -1))
    for module in reversed(list(model.modules())):
        weight = module._parameters.get("weight")
        if weight is None or weight.dim() != 2 or weight.shape != (logits.shape[1], pooled.shape[1]):
            continue
        bias = module._parameters.get("bias")
        predicted = pooled @ weight.detach().T + (bias.detach() if bias is not None else 0)
        if torch.allclose(predicted, logits, rtol=1e-3, atol=1e-3 * float(logits.abs().max().clamp_min(1))):
            return weight.detach()
    raise UsageError(
        f"method cam needs layer {layer!r} to be followed only by global average pooling and one linear layer; "
        "pick that layer with -l (see 'hookviz layers'), or use -m gradcam"
    )


def _score_masks(activation: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Channels (1, n, h, w) upsampled to the input ``size`` and each scaled to [0, 1]: (n, H, W); flat channels mask everything."""
    upsampled = F.interpolate(activation, size=size, mode="bilinear", align_corners=False)[0]
    flat = upsampled.flatten(1)
    low, high = flat.min(dim=1).values, flat.max(dim=1).values
    span = high - low
    masks = (upsampled - low[:, None, None]) / torch.where(span > 0, span, torch.ones_like(span))[:, None, None]
    return torch.where((span > 0)[:, None, None], masks, torch.zeros_like(masks))


def score_cam(
    model: nn.Module,
    batch: torch.Tensor,
    activation: torch.Tensor,
    classes: torch.Tensor,
    output_key: str | None,
    chunk_size: int,
    pad_to: int | None = None,
) -> torch.Tensor:
    """Score-CAM (Wang et al.): each channel, upsampled and scaled to [0, 1], masks the input;
    the channel's weight is the class probability of the masked input.

    Masked inputs are built and scored ``chunk_size`` at a time, so memory does not
    grow with the number of channels; ``pad_to`` pads each chunk for a model that
    takes a fixed batch size.
    """
    batch_size, channels = activation.shape[:2]
    maps = []
    with torch.no_grad():
        for b in range(batch_size):
            probabilities = []
            for start in range(0, channels, chunk_size):
                masks = _score_masks(
                    activation[b : b + 1, start : start + chunk_size], (batch.shape[-2], batch.shape[-1])
                )
                masked = batch[b : b + 1] * masks[:, None]
                count = masked.shape[0]
                if pad_to is not None and count < pad_to:
                    masked = torch.cat([masked, masked[-1:].expand(pad_to - count, *masked.shape[1:])])
                logits = select_logits(run_model(model, masked), output_key)[:count]
                probabilities.append(logits.softmax(dim=1)[:, classes[b]])  # (chunk, K)
            weights = torch.cat(probabilities).T  # (K, C)
            maps.append(F.relu(torch.einsum("kc,chw->khw", weights, activation[b])))
    return torch.stack(maps)
