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

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, overload

import torch
import torch.nn.functional as F
from torch import nn

from .errors import UsageError
from .forward import replace_first_tensor, run_model, select_logits
from .hooks import capture, hook_handles, layer_call, preserved_state
from .methods import CAM_METHODS, GRADIENT_METHODS
from .render import normalize_map
from .spatial import Layout, spatial_output, to_spatial
from .targets import TARGET_NOUNS, ClassTarget, Target

EPS = 1e-7
METHODS = CAM_METHODS


def gradcam_weighted(A: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
    """Grad-CAM's weighted activations (B, K, C, h, w): channel weights are the spatial mean of the gradients."""
    return G.mean(dim=(-2, -1), keepdim=True) * A[:, None]


def gradcam_plus_plus_weighted(A: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
    """Grad-CAM++'s weighted activations: positive gradients weighted per position by alpha.

    alpha = g^2 / (2 g^2 + sum_ij(A) g^3), the closed form for an exponential score.
    """
    g2, g3 = G.pow(2), G.pow(3)
    activation_sum = A[:, None].sum(dim=(-2, -1), keepdim=True)
    denominator = 2 * g2 + activation_sum * g3
    alpha = g2 / torch.where(denominator != 0, denominator, torch.ones_like(denominator))
    alpha = torch.where(G != 0, alpha, torch.zeros_like(alpha))
    return (F.relu(G) * alpha).sum(dim=(-2, -1), keepdim=True) * A[:, None]


def xgradcam_weighted(A: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
    """XGrad-CAM's weighted activations: gradients weighted by the normalized activations."""
    a = A[:, None]
    return (G * a).sum(dim=(-2, -1), keepdim=True) / (a.sum(dim=(-2, -1), keepdim=True) + EPS) * a


def layercam_weighted(A: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
    """LayerCAM's weighted activations: each position weighted by its own positive gradient."""
    return F.relu(G) * A[:, None]


def hirescam_weighted(A: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
    """HiResCAM's weighted activations: gradient times activation (the map is faithful to the score)."""
    return G * A[:, None]


def gradcam(A: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
    """Grad-CAM (Selvaraju et al.): ReLU of the activations weighted by the spatial mean of the gradients."""
    return F.relu(gradcam_weighted(A, G).sum(dim=2))


def gradcam_plus_plus(A: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
    """Grad-CAM++ (Chattopadhyay et al.), see ``gradcam_plus_plus_weighted``."""
    return F.relu(gradcam_plus_plus_weighted(A, G).sum(dim=2))


def xgradcam(A: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
    """XGrad-CAM (Fu et al.), see ``xgradcam_weighted``."""
    return F.relu(xgradcam_weighted(A, G).sum(dim=2))


def layercam(A: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
    """LayerCAM (Jiang et al.), see ``layercam_weighted``."""
    return F.relu(layercam_weighted(A, G).sum(dim=2))


def hirescam(A: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
    """HiResCAM (Draelos & Carin), see ``hirescam_weighted``."""
    return F.relu(hirescam_weighted(A, G).sum(dim=2))


def first_component(weighted: torch.Tensor) -> torch.Tensor:
    """Eigen smoothing: the projection of weighted activations (..., C, h, w) on their first principal component,
    (..., h, w), instead of their sum over channels.

    pytorch-grad-cam's rule (``get_2d_projection``: positions centred, first right singular vector), with
    one difference: the component's sign, arbitrary in an SVD, is chosen so the projection correlates
    positively with the channel sum, the map it smooths; pytorch-grad-cam keeps whichever sign the SVD
    returns, which can invert the map. Not yet ReLU'd.
    """
    *lead, channels, height, width = weighted.shape
    positions = weighted.reshape(-1, channels, height * width).transpose(1, 2)  # (n, hw, C)
    centered = positions - positions.mean(dim=1, keepdim=True)
    _, _, vh = torch.linalg.svd(centered, full_matrices=False)
    projection = (centered @ vh[:, 0, :, None])[..., 0]  # (n, hw)
    reference = positions.sum(dim=2)
    reference = reference - reference.mean(dim=1, keepdim=True)
    sign = torch.sign((projection * reference).sum(dim=1, keepdim=True))
    projection = projection * torch.where(sign == 0, torch.ones_like(sign), sign)
    return projection.reshape(*lead, height, width)


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


# Each gradient method's rule, as weighted activations (B, K, C, h, w): the map is the ReLU of their sum over
# channels, or with eigen smoothing of their first principal component.
GRADIENT_RULES: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "gradcam": gradcam_weighted,
    "gradcam++": gradcam_plus_plus_weighted,
    "xgradcam": xgradcam_weighted,
    "layercam": layercam_weighted,
    "hirescam": hirescam_weighted,
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
    calls: dict[str, int] | None = None  # per layer, as layer_calls: for several fused layers


def constant_maps(maps: torch.Tensor) -> torch.Tensor:
    """(B, K) bool: which maps (B, K, h, w) have one value everywhere (nothing to show, whatever the colormap)."""
    flat = maps.flatten(2)
    return (flat.max(dim=-1).values - flat.min(dim=-1).values) <= 0


@overload
def batched_gradients(scores: torch.Tensor, activation: torch.Tensor) -> torch.Tensor: ...
@overload
def batched_gradients(scores: torch.Tensor, activation: Sequence[torch.Tensor]) -> list[torch.Tensor]: ...
def batched_gradients(
    scores: torch.Tensor, activation: torch.Tensor | Sequence[torch.Tensor]
) -> torch.Tensor | list[torch.Tensor]:
    """d scores[b, k] / d activation[b] for every k: (B, K, *activation's shape[1:]), with one batched
    backward pass; for a sequence of activations (several layers), one such tensor each, from the same pass.

    Images in a batch do not interact in eval mode, so the gradient of the sum over
    the batch is each image's own gradient.
    """
    single = isinstance(activation, torch.Tensor)
    inputs = [activation] if isinstance(activation, torch.Tensor) else list(activation)
    batch, k = scores.shape
    unrelated = UsageError(
        "the explained score does not depend on the layer's output (the layer runs after what is scored, "
        "such as an --embedding-layer); choose an earlier layer with -l"
    )
    if not scores.requires_grad:
        raise unrelated
    if k == 1:
        found = torch.autograd.grad(scores.sum(), inputs, allow_unused=True)
        if any(g is None for g in found):
            raise unrelated
        gradients = [g[:, None] for g in found]
        return gradients[0] if single else gradients
    selectors = torch.eye(k, device=scores.device, dtype=scores.dtype)[:, None, :].expand(k, batch, k)
    try:
        # retain_graph: if vmap fails part-way, the per-class fallback below still needs the graph.
        batched = torch.autograd.grad(scores, inputs, grad_outputs=selectors, is_grads_batched=True, retain_graph=True)
    except RuntimeError:  # an op without a batching rule: one backward pass per class instead
        per_class = [torch.autograd.grad(scores[:, j].sum(), inputs, retain_graph=j < k - 1) for j in range(k)]
        batched = tuple(torch.stack([grads[i] for grads in per_class]) for i in range(len(inputs)))
    gradients = [g.transpose(0, 1) for g in batched]
    return gradients[0] if single else gradients


FUSIONS = ("mean", "max")  # how maps of several layers combine: pytorch-grad-cam averages, torchcam takes the max
# --aug-smooth: every image also horizontally flipped, each at these input intensities (pytorch-grad-cam's
# augmentations, ttach's HorizontalFlip x Multiply). Intensity, not geometric, scales: they keep the input's
# size, which models exported with a fixed size (.pt2) and vision transformers require.
AUGMENT_INTENSITIES = (0.9, 1.0, 1.1)
# (intensity, flipped) of each copy, the unchanged image first: its scores choose the classes.
AUGMENTATIONS = sorted(
    ((intensity, flipped) for intensity in AUGMENT_INTENSITIES for flipped in (False, True)),
    key=lambda copy: copy != (1.0, False),
)


def augmented(batch: torch.Tensor) -> torch.Tensor:
    """The test-time augmentations of ``batch`` (B, C, H, W) stacked copy-major in AUGMENTATIONS' order:
    (A * B, C, H, W)."""
    return torch.cat([(batch.flip(-1) if flipped else batch) * intensity for intensity, flipped in AUGMENTATIONS])


def deaugmented(maps: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Maps (A * B, K, h, w) of ``augmented`` inputs back in the original geometry, each scaled to [0, 1]
    (as pytorch-grad-cam does before averaging), averaged over the copies: (B, K, h, w)."""
    copies = normalize_map(maps).unflatten(0, (len(AUGMENTATIONS), batch_size))  # (A, B, K, h, w)
    restored = [copy.flip(-1) if flipped else copy for copy, (_, flipped) in zip(copies, AUGMENTATIONS, strict=True)]
    return torch.stack(restored).mean(dim=0)


def fused(maps: Sequence[torch.Tensor], how: str) -> torch.Tensor:
    """Maps of several layers, each (B, K, h_i, w_i), as one (B, K, h, w) at the finest layer's size:
    each scaled to [0, 1], upsampled bilinearly, then their mean or max (``how``)."""
    size = max(((m.shape[-2], m.shape[-1]) for m in maps), key=lambda hw: hw[0] * hw[1])
    scaled = torch.stack(
        [F.interpolate(normalize_map(m.float()), size=size, mode="bilinear", align_corners=False) for m in maps]
    )
    return scaled.mean(dim=0) if how == "mean" else scaled.amax(dim=0)


def check_cam_options(method: str, layers: Sequence[str], *, eigen_smooth: bool, aug_smooth: bool, fuse: str) -> None:
    """Refuse combinations that cannot work, before any image is read (one-line UsageErrors)."""
    if method not in METHODS:
        raise UsageError(f"unknown method {method!r}; choose one of: {', '.join(METHODS)}")
    if not layers:
        raise UsageError("no layer to explain; name one with -l")
    if len(set(layers)) != len(layers):
        raise UsageError("a layer is given twice with -l; give each layer once")
    if fuse not in FUSIONS:
        raise UsageError(f"unknown fusion {fuse!r}; choose one of: {', '.join(FUSIONS)}")
    if eigen_smooth and method not in GRADIENT_METHODS:
        raise UsageError(
            f"--eigen-smooth applies to the gradient methods ({', '.join(GRADIENT_METHODS)}), not {method}"
            + ("; eigencam already is the first principal component" if method == "eigencam" else "")
        )
    if aug_smooth and method == "cam":
        raise UsageError(
            "--aug-smooth does not apply to -m cam: its weights are the classifier's, the same for every copy; "
            "use -m gradcam --aug-smooth"
        )


def check_target(kind: str, method: str, *, aug_smooth: bool) -> None:
    """Refuse a method or option that cannot explain a target of this ``kind`` (``Target.kind``; one-line UsageErrors)."""
    if kind == "class":
        return
    what = TARGET_NOUNS.get(kind, kind)
    if method in ("cam", "scorecam", "ablationcam"):
        raise UsageError(
            f"-m {method} explains class logits, not {what}; use one of: {', '.join(GRADIENT_METHODS)}, eigencam"
        )
    if aug_smooth and kind != "binary":
        raise UsageError(f"--aug-smooth explains class logits, not {what}; drop it or use --eigen-smooth")


def compute_cams(
    model: nn.Module,
    batch: torch.Tensor,
    *,
    layer: str | Sequence[str],
    method: str = "gradcam",
    classes: Sequence[int] | None = None,
    top_k: int = 1,
    output_key: str | None = None,
    score_batch_size: int = 32,
    layer_calls: int | Mapping[str, int] | None = None,
    fixed_batch: int | None = None,
    eigen_smooth: bool = False,
    aug_smooth: bool = False,
    fuse: str = "mean",
    target: Target | None = None,
) -> CamBatch:
    """Explain ``classes`` (or each image's top-k predictions) for a batch of model inputs at ``layer``.

    Args:
        model: any ``nn.Module``; left as it was (modes, ``.grad``, hooks) whatever happens.
        batch: model inputs (B, C, H, W), on the model's device.
        layer: a ``named_modules()`` name whose output is a map (N, C, h, w), tokens or channels-last; or
            several, whose maps come from the same forward and backward pass and are fused (``fuse``).
        method: one of ``METHODS``.
        classes: class indices to explain for every image; None for each image's ``top_k`` predictions.
        output_key: which part of a tuple/dict output holds the class scores (see ``select_logits``).
        score_batch_size: masked or ablated inputs per forward pass for Score-CAM and Ablation-CAM.
        layer_calls: for a layer that runs several times per forward pass, the ``CamBatch.layer_calls``
            of an earlier batch, so that autograd does not record the calls before the last one.
        fixed_batch: the model takes exactly that many inputs (a .pt2 exported with a static batch),
            for Score-CAM's and Ablation-CAM's own forward passes.
        eigen_smooth: for a gradient method, the first principal component of the weighted activations
            instead of their sum (``first_component``).
        aug_smooth: average the maps of test-time augmentations (``augmented``), all in one forward pass;
            the classes are those of the unchanged image.
        fuse: ``"mean"`` or ``"max"`` of the layers' maps (``fused``), when several layers are given.
        target: what is explained (``hookviz.targets``): segmentation classes, a single output's sides, a
            similarity; None for class logits (``classes``, ``top_k``). Its ``shown`` values become
            ``CamBatch.probabilities``.

    Returns:
        ``CamBatch``: maps (B, K, h, w) >= 0, not normalized (with several layers or ``aug_smooth``, an
        average of maps each scaled to [0, 1]), with the classes and probabilities.
    """
    layers = [layer] if isinstance(layer, str) else list(layer)
    check_cam_options(method, layers, eigen_smooth=eigen_smooth, aug_smooth=aug_smooth, fuse=fuse)
    explained = target if target is not None else ClassTarget(tuple(classes or ()), top_k, "softmax")
    check_target(explained.kind, method, aug_smooth=aug_smooth)
    if aug_smooth and fixed_batch is not None:
        raise UsageError(
            f"--aug-smooth runs {len(AUGMENTATIONS)} copies of each image together, and this model "
            f"takes batches of exactly {fixed_batch}; export it with a dynamic batch size"
        )
    if isinstance(layer_calls, Mapping):
        known_calls = {name: layer_calls.get(name, 1) for name in layers}
    else:
        known_calls = dict.fromkeys(layers, layer_calls or 1)
    images = batch.shape[0]
    inputs = augmented(batch) if aug_smooth else batch
    needs_grad = method in GRADIENT_METHODS
    with capture(model, layers, grad=needs_grad, leaf_calls=known_calls) as activations, explained.hooked(model):
        output = run_model(model, inputs)
        logits = explained.select(output, output_key)
        size = (batch.shape[-2], batch.shape[-1])
        captured = [spatial_output(activations, name, size, activations.calls.get(name, 0)) for name in layers]
        if needs_grad and not all(out.requires_grad for out, _ in captured):
            # A layer ran fewer times than layer_calls said: start over, learning the calls afresh.
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
                eigen_smooth=eigen_smooth,
                aug_smooth=aug_smooth,
                fuse=fuse,
                target=target,
            )
        spatial = [to_spatial(out.detach(), layout) for out, layout in captured]  # each (A * B, C, h, w)
        chosen = explained.choose(logits[:images].detach())
        every_copy = chosen.repeat(inputs.shape[0] // images, 1)
        per_layer: list[torch.Tensor] = []
        if needs_grad:
            outputs = [out for out, _ in captured]
            gradients = batched_gradients(explained.scores(logits, every_copy), outputs)
            for activation, gradient, (_, layout) in zip(spatial, gradients, captured, strict=True):
                gradient = to_spatial(gradient.flatten(0, 1), layout).unflatten(0, gradient.shape[:2])
                weighted = GRADIENT_RULES[method](activation, gradient)
                per_layer.append(F.relu(first_component(weighted) if eigen_smooth else weighted.sum(dim=2)))
        elif method == "eigencam":
            per_layer = [eigencam(activation).expand(-1, chosen.shape[1], -1, -1) for activation in spatial]
        elif method == "cam":
            per_layer = [
                class_activation_map(activation, _linear_head(model, activation, logits.detach(), name), every_copy)
                for activation, name in zip(spatial, layers, strict=True)
            ]
        calls = {name: activations.calls.get(name, 1) for name in layers}
    if method in ("scorecam", "ablationcam"):  # their many forward passes run without the capture hook
        with preserved_state(model), torch.no_grad():
            for name, activation, (out, layout) in zip(layers, spatial, captured, strict=True):
                if method == "scorecam":
                    maps = score_cam(
                        model, inputs, activation, every_copy, output_key, fixed_batch or score_batch_size, fixed_batch
                    )
                else:
                    maps = ablation_cam(
                        model,
                        inputs,
                        AblationSite(name, calls[name], out.detach(), layout),
                        every_copy,
                        logits.detach(),
                        output_key,
                        fixed_batch or score_batch_size,
                        fixed_batch,
                    )
                per_layer.append(maps)
    if aug_smooth:
        per_layer = [deaugmented(m, images) for m in per_layer]
    maps = fused(per_layer, fuse) if len(per_layer) > 1 else per_layer[0]
    return CamBatch(
        maps=maps.detach(),
        classes=chosen,
        probabilities=explained.shown(logits[:images].detach()),
        layer="+".join(layers),
        method=method,
        layer_calls=calls[layers[0]],
        calls=calls,
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


@dataclass(frozen=True)
class AblationSite:
    """Where Ablation-CAM zeroes channels: a layer's call, and its output there in its own layout."""

    layer: str  # a named_modules() name, with an optional #N
    call: int  # which call of the module to ablate (its N-th, or its last)
    output: torch.Tensor  # (B, ...) the layer's output at that call, as the network saw it
    layout: Layout


def _ablated(output: torch.Tensor, layout: Layout, channels: torch.Tensor) -> torch.Tensor:
    """``len(channels)`` copies of one image's layer output (1, ...), copy i with channel ``channels[i]`` zeroed
    over the map (for tokens: over the patch tokens the map is made of)."""
    copies = output.expand(len(channels), *output.shape[1:]).clone()
    rows = torch.arange(len(channels), device=output.device)
    if layout.kind == "nchw":
        copies[rows, channels] = 0
    elif layout.kind == "nhwc":
        copies.permute(0, 3, 1, 2)[rows, channels] = 0
    else:
        copies[:, layout.prefix :].transpose(1, 2)[rows, channels] = 0
    return copies


def _replacing_call(call: int, replacement: torch.Tensor) -> Callable[..., Any]:
    """A forward hook that hands the network ``replacement`` instead of the module's output at its ``call``-th call."""
    calls = 0

    def hook(module: nn.Module, args: Any, output: Any) -> Any:
        nonlocal calls
        calls += 1
        return replace_first_tensor(output, replacement) if calls == call else None

    return hook


def ablation_cam(
    model: nn.Module,
    batch: torch.Tensor,
    site: AblationSite,
    classes: torch.Tensor,
    logits: torch.Tensor,
    output_key: str | None,
    chunk_size: int,
    pad_to: int | None = None,
) -> torch.Tensor:
    """Ablation-CAM (Desai & Ramaswamy, 2020): channel k's weight is (y - y_k) / y, the relative drop of the
    class score y when channel k of the layer's output is zeroed; the map is ReLU(sum_k w_k A_k).

    Ablated copies of the layer's output replace it, ``chunk_size`` per forward pass, through a forward hook
    on the layer's call. The network below the layer runs on the one image only, the copies are made at the
    layer (``_ablated_scores``), so the cost is that of the network above it.
    pytorch-grad-cam deviates from the paper where a layer's minimum is not 0: it then sets the channel to
    (minimum - 1e7) instead of zero; this follows the paper.

    Args:
        batch: the model inputs (B, C, H, W) the site's output came from.
        site: the layer, its call and its output there.
        classes: (B, K) the explained classes; ``logits`` (B, num_classes) the unablated scores.
        chunk_size: ablated copies per forward pass; ``pad_to`` pads each chunk for a fixed-batch model.
    """
    modules = dict(model.named_modules())
    module = modules[layer_call(site.layer, modules)[0]]
    activation = to_spatial(site.output, site.layout)  # (B, C, h, w)
    channels = activation.shape[1]
    branch_at_layer = pad_to is None  # a fixed-batch model takes its whole batch at the input
    maps = []
    for b in range(batch.shape[0]):
        scores = []
        for start in range(0, channels, chunk_size):
            indices = torch.arange(start, min(start + chunk_size, channels), device=batch.device)
            replacement = _ablated(site.output[b : b + 1], site.layout, indices)
            if branch_at_layer:
                # The unablated output goes along as a check that the branching gave the model's own scores.
                checked = torch.cat([site.output[b : b + 1], replacement])
                ablated = _ablated_scores(model, module, site.call, batch[b : b + 1], checked, output_key)
                if ablated is not None and _same_scores(ablated[0], logits[b]):
                    scores.append(ablated[1:, classes[b]])
                    continue
                branch_at_layer = False  # this model cannot branch at the layer: run each copy whole
            count = len(indices)
            inputs = batch[b : b + 1].expand(pad_to or count, *batch.shape[1:])
            if pad_to is not None and count < pad_to:
                replacement = torch.cat([replacement, replacement[-1:].expand(pad_to - count, *replacement.shape[1:])])
            with hook_handles() as handles:
                handles.append(module.register_forward_hook(_replacing_call(site.call, replacement)))
                ablated = select_logits(run_model(model, inputs), output_key)[:count]
            scores.append(ablated[:, classes[b]])  # (chunk, K)
        original = logits[b, classes[b]]  # (K,)
        weights = (original - torch.cat(scores)) / torch.where(original != 0, original, torch.ones_like(original))
        maps.append(F.relu(torch.einsum("ck,chw->khw", weights, activation[b])))
    return torch.stack(maps)


def _ablated_scores(
    model: nn.Module, module: nn.Module, call: int, image: torch.Tensor, outputs: torch.Tensor, output_key: str | None
) -> torch.Tensor | None:
    """The scores (n, classes) of the model run on one ``image`` (1, ...) whose layer output, at ``call``, is
    replaced by ``outputs`` (n, ...): the batch grows from 1 to n at the layer, so the network below it runs
    once. Tensors from below that meet the copies later (a residual) broadcast from 1 to n. None when the
    model does not allow it (an op that needs equal batch sizes, an exported program's fixed shapes)."""
    with hook_handles() as handles:
        handles.append(module.register_forward_hook(_replacing_call(call, outputs)))
        try:
            scores = select_logits(run_model(model, image), output_key)
        except UsageError:
            return None
    return scores if scores.shape[0] == outputs.shape[0] else None


def _same_scores(scores: torch.Tensor, expected: torch.Tensor) -> bool:
    scale = float(expected.abs().max().clamp_min(1))
    return scores.shape == expected.shape and torch.allclose(scores, expected, rtol=1e-4, atol=1e-4 * scale)
