"""Class activation maps of object detectors: one map per detected box, the box drawn on it.

torchvision's detectors (Faster R-CNN, RetinaNet, FCOS, SSD) return, in eval mode, one dict per image with
``boxes`` (x0, y0, x1, y1 in the pixels of the image they were given), ``labels`` and ``scores``. Each of an
image's top ``boxes`` detections scoring at least ``min_score`` is explained: its target is the box's class
score, read in the gradient-carrying output from the detection matched to it (the same label, IoU >= 0.5),
as pytorch-grad-cam's ``FasterRCNNBoxScoreTarget`` does (which also adds the IoU; here the score alone is
explained). The whole batch costs one forward pass and one batched backward pass for all its boxes. For an
R-CNN (torchvision's ``RoIHeads``) the forward pass runs without autograd and only the explained boxes'
proposals go through the box head again, from the explained maps, to be differentiated (``box_head_scores``):
the same maps, without back-propagating through the head's hundreds of other proposals.

A detector's explained layer (``backbone.fpn``, or ``backbone``, which returns the FPN's output; SSD's
``backbone``) returns several maps, an OrderedDict from the finest (stride 8 to 32) to the coarsest. Each
box's score reads one pyramid level (the RoI pooler picks it by the box's size; RetinaNet's and FCOS's
anchors live on one level), so every level is captured and explained, and the level maps are summed on the
finest level's grid, each weighted by its share of the grid's area (``pyramid_sum``): the combined map sums
to what each level contributes. ``levels="first"`` keeps the first map only (a hook on the FPN's output
sees that one; larger boxes, read from coarser levels, then have empty maps).

Coordinates: the detector resizes its input (``GeneralizedRCNNTransform``: min_size/max_size) and pads it
to a multiple of 32; its maps cover the padded image. The padding is cut off the maps (``unpadded``), so a
returned map covers exactly the model input, as every other hookviz map does, and ``heat_in_image`` places
it on the photo. Boxes come back in model-input pixels; ``to_original`` maps them to the photo's.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from torch import nn

from .cams import GRADIENT_RULES, constant_maps, eigencam, first_component
from .errors import UsageError, shown
from .forward import run_model
from .hooks import hook_handles, layer_call, preserved_state, resolve_layers
from .methods import CAM_METHODS, GRADIENT_METHODS
from .models import LoadedModel
from .output import DEFAULT_QUALITY, image_suffix, write_image, write_npy
from .pipeline import PreparedImage, Record, model_batch
from .render import captioned, font, heat_in_image, normalize_map, overlay, to_pil

DETECTION_METHODS = (*GRADIENT_METHODS, "eigencam")
IOU_THRESHOLD = 0.5  # a gradient-carrying detection stands for an explained one from this IoU on (same label)
LEVELS = ("all", "first")
BOX_COLOUR = (0, 255, 64)
BOX_OUTLINE = (0, 0, 0)


# --- capturing a detector's maps -------------------------------------------------------------------------


@dataclass
class Geometry:
    """Where the detector's internal image lies in the padded batch its maps cover, in its own pixels."""

    resized: list[tuple[int, int]]  # (height, width) of each image after the detector's resize
    padded: tuple[int, int]  # (height, width) of the batch the backbone ran on (a multiple of 32)


@dataclass
class Captured:
    """What one forward pass gave: the explained layer's maps (each (B, C, h, w)) and the detector's geometry."""

    levels: list[torch.Tensor] = field(default_factory=list)
    names: list[str] = field(default_factory=list)
    geometry: Geometry | None = None
    calls: int = 0
    handed: list[torch.Tensor] = field(default_factory=list)  # the copies the rest of the network got, per map


def _maps_of(output: Any) -> list[tuple[str, torch.Tensor]]:
    """The (name, map) pairs of a layer's output: a map, a dict of maps (an FPN's), or a sequence of maps."""
    if isinstance(output, torch.Tensor):
        return [("", output)] if output.dim() == 4 else []
    if isinstance(output, Mapping):
        return [(str(k), v) for k, v in output.items() if isinstance(v, torch.Tensor) and v.dim() == 4]
    if isinstance(output, (tuple, list)):
        return [(str(i), v) for i, v in enumerate(output) if isinstance(v, torch.Tensor) and v.dim() == 4]
    return []


def _replaced_maps(output: Any, replacements: Sequence[torch.Tensor]) -> Any:
    """``output`` with its maps (in ``_maps_of`` order) replaced; containers keep their type."""
    if isinstance(output, torch.Tensor):
        return replacements[0]
    queue = iter(replacements)
    if isinstance(output, Mapping):
        items = {k: next(queue) if isinstance(v, torch.Tensor) and v.dim() == 4 else v for k, v in output.items()}
        rebuild: Any = type(output)
        return items if rebuild is dict else rebuild(items)
    values = [next(queue) if isinstance(v, torch.Tensor) and v.dim() == 4 else v for v in output]
    if isinstance(output, list):
        return values
    return type(output)(*values) if hasattr(output, "_fields") else tuple(values)


def _start_without_grad(module: nn.Module, inputs: Any) -> None:
    torch.set_grad_enabled(False)


@contextmanager
def capture_levels(model: nn.Module, layer: str, *, grad: bool) -> Iterator[Captured]:
    """Record every map ``layer`` outputs (all FPN levels) and the detector's resize and padding.

    With ``grad``, autograd records from the layer on only: each map becomes a leaf to differentiate
    against, and the rest of the network gets copies (in-place ops cannot rewrite what was captured).
    The model's modes and ``.grad`` are restored and the hooks removed however the block ends.
    """
    module = resolve_layers(model, [layer])[layer]
    picked = layer_call(layer, dict(model.named_modules()))[1]
    captured = Captured()

    def on_layer(module: nn.Module, inputs: Any, output: Any) -> Any:
        maps = _maps_of(output)
        if not maps:
            return None
        captured.calls += 1
        if picked is not None and captured.calls != picked:
            return None
        tensors = [tensor.detach() for _, tensor in maps]
        if grad:
            tensors = [tensor.requires_grad_(True) for tensor in tensors]
            torch.set_grad_enabled(True)
        captured.levels, captured.names = tensors, [name for name, _ in maps]
        captured.handed = [tensor.clone() for tensor in tensors]
        return _replaced_maps(output, captured.handed)

    def on_transform(module: nn.Module, inputs: Any, output: Any) -> None:
        images = output[0] if isinstance(output, tuple) else output
        sizes, tensors = getattr(images, "image_sizes", None), getattr(images, "tensors", None)
        if sizes is not None and isinstance(tensors, torch.Tensor):
            captured.geometry = Geometry(
                resized=[(int(h), int(w)) for h, w in sizes], padded=(tensors.shape[-2], tensors.shape[-1])
            )

    grad_mode = torch.is_grad_enabled()
    inference_off = torch.inference_mode(False) if grad else nullcontext()
    try:
        with inference_off, preserved_state(model), hook_handles() as handles:
            handles.append(module.register_forward_hook(on_layer))
            transform = getattr(model, "transform", None)
            if isinstance(transform, nn.Module):
                handles.append(transform.register_forward_hook(on_transform))
            handles.append(model.register_forward_pre_hook(_start_without_grad))
            torch.set_grad_enabled(False)
            yield captured
    finally:
        torch.set_grad_enabled(grad_mode)


# --- detections and their targets --------------------------------------------------------------------------


def detections_of(output: Any, batch_size: int) -> list[Mapping[str, torch.Tensor]]:
    """The per-image detection dicts of a detector's output; a UsageError when it is not one."""
    if isinstance(output, tuple) and len(output) == 2 and isinstance(output[1], (list, tuple)):
        output = output[1]  # torchvision's scripted detectors return (losses, detections)
    fields = ("boxes", "labels", "scores")
    if (
        not isinstance(output, (list, tuple))
        or len(output) != batch_size
        or not all(
            isinstance(item, Mapping) and all(isinstance(item.get(k), torch.Tensor) for k in fields) for item in output
        )
    ):
        shape = type(output).__name__
        if isinstance(output, (list, tuple)) and output and isinstance(output[0], Mapping):
            shape += f" of dicts with keys {', '.join(map(str, output[0]))}"
        raise UsageError(
            f"the model's output ({shape}) is not a detector's: detection needs one dict per image with boxes, "
            "labels and scores (as torchvision's detectors return in eval mode); wrap the model to return them"
        )
    return list(output)


def chosen_detections(detections: Mapping[str, torch.Tensor], boxes: int, min_score: float) -> torch.Tensor:
    """Indices of the top ``boxes`` detections scoring at least ``min_score``, best first."""
    scores = detections["scores"].detach()
    order = torch.argsort(scores, descending=True, stable=True)
    order = order[scores[order] >= min_score]
    return order[:boxes]


def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """IoU of boxes a (n, 4) and b (m, 4), x0 y0 x1 y1: (n, m)."""
    area_a = (a[:, 2] - a[:, 0]).clamp_min(0) * (a[:, 3] - a[:, 1]).clamp_min(0)
    area_b = (b[:, 2] - b[:, 0]).clamp_min(0) * (b[:, 3] - b[:, 1]).clamp_min(0)
    top_left = torch.maximum(a[:, None, :2], b[None, :, :2])
    bottom_right = torch.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = (bottom_right - top_left).clamp_min(0).prod(dim=-1)
    union = area_a[:, None] + area_b[None, :] - inter
    return inter / union.clamp_min(torch.finfo(union.dtype).tiny)


def box_scores(
    detections: Mapping[str, torch.Tensor],
    boxes: torch.Tensor,
    labels: torch.Tensor,
    iou_threshold: float = IOU_THRESHOLD,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The scores (n,) of the given boxes (n, 4) with ``labels`` (n,), read in ``detections`` (an output that
    carries gradients): for each, the score of the detection of the same label that overlaps it most, if the
    IoU reaches ``iou_threshold``, else 0. Also (n,) bool: which were matched."""
    found = detections["boxes"].detach()
    if len(found) == 0 or len(boxes) == 0:
        return torch.zeros(len(boxes), device=boxes.device), torch.zeros(len(boxes), dtype=torch.bool)
    iou = box_iou(boxes.to(found), found)
    # A box is its own match, even a degenerate one (zero width at the image border: 0 / 0 IoU).
    iou = torch.where((boxes.to(found)[:, None, :] == found[None, :, :]).all(dim=-1), torch.ones_like(iou), iou)
    iou = torch.where(labels[:, None].to(found.device) == detections["labels"][None, :], iou, torch.full_like(iou, -1))
    best, index = iou.max(dim=1)
    matched = best >= iou_threshold
    scores = detections["scores"][index]
    return torch.where(matched, scores, torch.zeros_like(scores)), matched.cpu()


def level_gradients(scores: torch.Tensor, levels: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """d scores[b, k] / d levels[i][b] for all k, with one batched backward pass: each (B, K, C, h, w).

    Levels that no score reads get zero gradients (an FPN's ``pool`` level feeds only the proposals, which
    torchvision detaches).
    """
    batch, k = scores.shape
    if k == 1:
        single = torch.autograd.grad(scores.sum(), levels, allow_unused=True)
        grads: Sequence[torch.Tensor | None] = [None if g is None else g[None] for g in single]
    else:
        selectors = torch.eye(k, device=scores.device, dtype=scores.dtype)[:, None, :].expand(k, batch, k)
        try:
            grads = torch.autograd.grad(
                scores, levels, grad_outputs=selectors, is_grads_batched=True, retain_graph=True, allow_unused=True
            )
        except RuntimeError:  # an op without a batching rule: one backward pass per box instead
            per_box = [
                torch.autograd.grad(scores[:, j].sum(), levels, retain_graph=j < k - 1, allow_unused=True)
                for j in range(k)
            ]
            # A level one box reads and another does not (the RoI pooler picks a level per box): zeros there.
            grads = [
                torch.stack([torch.zeros_like(level) if g[i] is None else g[i] for g in per_box])
                for i, level in enumerate(levels)
            ]
    return [
        (torch.zeros(k, *level.shape, device=level.device, dtype=level.dtype) if g is None else g).transpose(0, 1)
        for g, level in zip(grads, levels, strict=True)
    ]


def _gradient_maps(
    target: torch.Tensor, explained: Sequence[torch.Tensor], method: str, eigen_smooth: bool
) -> torch.Tensor:
    """The maps (B, K, h_0, w_0) of the scores ``target`` (B, K) at the maps ``explained`` (leaves), by the
    weighting rule of ``method``, levels summed (``pyramid_sum``) or, with ``eigen_smooth``, projected together."""
    activations = [level.detach() for level in explained]
    batch, k = target.shape
    if target.requires_grad:
        gradients = level_gradients(target, explained)
    else:  # nothing detected anywhere, or no score depends on the layer
        gradients = [torch.zeros(batch, k, *a.shape[1:], device=a.device) for a in activations]
    rule = GRADIENT_RULES[method]
    if eigen_smooth:  # level by level, as eigen_levels does (an SVD's cost grows with the square of the channels)
        height, width = activations[0].shape[-2:]
        total = torch.zeros(batch, k, height, width, device=activations[0].device)
        for a, g in zip(activations, gradients, strict=True):
            level_map = normalize_map(F.relu(first_component(rule(a, g))))
            if level_map.shape[-2:] != (height, width):
                level_map = F.interpolate(level_map, size=(height, width), mode="bilinear")
            total += level_map
        return total / len(activations)
    # Level by level, each (B, K, C, h, w) gradient dropped once summed over channels: a large detector's
    # finest level at batch 8 and 5 boxes holds hundreds of MB.
    level_maps = []
    for level in range(len(gradients)):
        gradient, gradients[level] = gradients[level], torch.empty(0)
        level_maps.append(rule(activations[level], gradient).sum(dim=2))
        del gradient
    return F.relu(pyramid_sum(level_maps))


# --- the R-CNN box head shortcut -----------------------------------------------------------------------------


@dataclass
class BoxHeadInputs:
    """What an R-CNN's box head was given and gave in one forward pass (torchvision's ``RoIHeads``)."""

    features: Mapping[str, torch.Tensor] | None = None
    proposals: list[torch.Tensor] | None = None
    image_shapes: list[tuple[int, int]] | None = None  # (height, width) of each image after the detector's resize
    class_logits: torch.Tensor | None = None
    box_regression: torch.Tensor | None = None


def _box_head(model: nn.Module, layer: str) -> nn.Module | None:
    """The model's torchvision-style ``RoIHeads`` when ``layer`` may give (some of) the maps it reads
    (``backbone``, ``backbone.fpn``, an FPN output block), or None."""
    heads = getattr(model, "roi_heads", None)
    needed = ("box_roi_pool", "box_head", "box_predictor", "box_coder")
    if not isinstance(heads, nn.Module) or not all(hasattr(heads, name) for name in needed):
        return None
    base = layer_call(layer, dict(model.named_modules()))[0]
    return heads if base == "backbone" or base.startswith("backbone.fpn") else None


@contextmanager
def _watch_box_head(heads: nn.Module) -> Iterator[BoxHeadInputs]:
    seen = BoxHeadInputs()

    def before(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        given = dict(zip(("features", "proposals", "image_shapes"), args, strict=False)) | kwargs
        seen.features, seen.proposals = given.get("features"), given.get("proposals")
        shapes = given.get("image_shapes")
        seen.image_shapes = None if shapes is None else [(int(h), int(w)) for h, w in shapes]

    def predicted(module: nn.Module, inputs: Any, output: Any) -> None:
        if isinstance(output, tuple) and len(output) == 2:
            seen.class_logits, seen.box_regression = output

    with hook_handles() as handles:
        handles.append(heads.register_forward_pre_hook(before, with_kwargs=True))
        predictor = heads.get_submodule("box_predictor")
        handles.append(predictor.register_forward_hook(predicted))
        yield seen


def box_head_scores(
    heads: Any,
    seen: BoxHeadInputs,
    leaves: Mapping[int, torch.Tensor],
    detections: Sequence[Mapping[str, torch.Tensor]],
    chosen: Sequence[torch.Tensor],
    input_size: tuple[int, int],
) -> list[torch.Tensor] | None:
    """Each image's chosen detections' scores, recomputed through the box head run on those detections' own
    proposals only, from the maps it read with ``leaves`` in place of some: ``id(map) -> leaf`` for the maps
    the forward pass handed on from the explained layer. (n_b,) per image.

    A detection is traced to the proposal it came from: the one whose decoded box for the detection's label
    is the detection's box (IoU >= 0.99, in the detector's resized pixels) and whose class probability is
    the detection's score. None when the box head read none of the explained maps, or when a detection
    cannot be traced, or its recomputed score differs from the detection's.
    """
    if seen.features is None or seen.proposals is None or seen.image_shapes is None or seen.class_logits is None:
        return None
    if seen.box_regression is None or not any(id(value) in leaves for value in seen.features.values()):
        return None  # the explained layer is not (part of) the box head's input
    features = {key: leaves.get(id(value), value) for key, value in seen.features.items()}
    proposals, shapes = seen.proposals, seen.image_shapes
    decoded = heads.box_coder.decode(seen.box_regression, proposals)  # (R, classes, 4) in resized pixels
    probabilities = F.softmax(seen.class_logits, -1)
    rois: list[torch.Tensor] = []
    picked_labels: list[torch.Tensor] = []
    offset = 0
    for found, indices, image_proposals, (height, width) in zip(detections, chosen, proposals, shapes, strict=True):
        count = len(image_proposals)
        boxes = decoded[offset : offset + count]
        xs, ys = boxes[..., 0::2].clamp(0, width), boxes[..., 1::2].clamp(0, height)  # as the detector clips them
        boxes = torch.stack((xs[..., 0], ys[..., 0], xs[..., 1], ys[..., 1]), dim=-1)
        image_probabilities = probabilities[offset : offset + count]
        offset += count
        scale = torch.tensor(
            [input_size[1] / width, input_size[0] / height] * 2, device=boxes.device, dtype=boxes.dtype
        )
        rows = []
        for index in indices.tolist():
            label = int(found["labels"][index])
            score = found["scores"][index].detach()
            box = found["boxes"][index].detach().to(boxes.dtype) / scale
            overlap = box_iou(box[None], boxes[:, label])[0]
            same_score = (image_probabilities[:, label] - score).abs() <= 1e-6 * float(score.abs().clamp_min(1e-6))
            overlap = torch.where(same_score, overlap, torch.full_like(overlap, -1))
            row = int(overlap.argmax())
            if float(overlap[row]) < 0.99:
                return None
            rows.append(row)
        rois.append(image_proposals[rows])
        picked_labels.append(found["labels"][indices].detach())
    scores: list[torch.Tensor] = []
    with torch.enable_grad():  # the caller's forward pass ran without autograd
        pooled = heads.box_roi_pool(dict(features), rois, shapes)
        class_logits, _ = heads.box_predictor(heads.box_head(pooled))
        recomputed = F.softmax(class_logits, -1)
        start = 0
        for labels, found, indices in zip(picked_labels, detections, chosen, strict=True):
            rows_of_image = recomputed[start : start + len(labels)]
            image_scores = rows_of_image.gather(1, labels[:, None].to(recomputed.device))[:, 0]
            start += len(labels)
            expected = found["scores"][indices].detach().to(image_scores.dtype)
            if not torch.allclose(image_scores.detach(), expected, rtol=1e-4, atol=1e-6):
                return None
            scores.append(image_scores)
    return scores


# --- maps over the model input ------------------------------------------------------------------------------


def pyramid_sum(maps: Sequence[torch.Tensor]) -> torch.Tensor:
    """Maps of pyramid levels (..., h_i, w_i), finest first, summed on the finest grid (..., h_0, w_0).

    A level's map is upsampled (bilinear) and weighted by its share of the finest grid's area, h_i w_i /
    (h_0 w_0), so the sum over the combined map's positions is the sum of the levels' own sums: a coarse
    level is not counted more for having been upsampled.
    """
    height, width = maps[0].shape[-2:]
    total = maps[0].float()
    for level in maps[1:]:
        lead = level.shape[:-2]
        up = F.interpolate(level.float().reshape(-1, 1, *level.shape[-2:]), size=(height, width), mode="bilinear")
        total = total + up.reshape(*lead, height, width) * (level.shape[-2] * level.shape[-1] / (height * width))
    return total


def eigen_levels(levels: Sequence[torch.Tensor]) -> torch.Tensor:
    """Eigen-CAM of maps (B, C_i, h_i, w_i) of several pyramid levels: each level's own first principal
    component (``cams.eigencam``), scaled to [0, 1], upsampled to the first level's grid and averaged:
    (B, 1, h_0, w_0).

    Level by level, not of all levels' channels together: the SVD's cost grows with the square of the
    channels: RetinaNet's five 256-channel levels at 800 px took 12-18 s per image together, 0.4 s apart.
    """
    if len(levels) == 1:
        return eigencam(levels[0].float())
    height, width = levels[0].shape[-2:]
    total = torch.zeros(levels[0].shape[0], 1, height, width, device=levels[0].device)
    for level in levels:
        level_map = normalize_map(eigencam(level.float()))
        if level_map.shape[-2:] != (height, width):
            level_map = F.interpolate(level_map, size=(height, width), mode="bilinear")
        total += level_map
    return total / len(levels)


def unpadded(maps: torch.Tensor, geometry: Geometry | None, image: int = 0) -> torch.Tensor:
    """Maps (..., h, w) over the detector's padded batch, cut to the part over image ``image``'s content.

    The result covers exactly the model input (the detector's resize keeps its aspect ratio, or stretches it
    as the input was). The cut falls where it falls on the map's grid: the maps are resampled (bilinear, pixel
    centres aligned) onto a grid of about the same resolution over the content only.
    """
    if geometry is None:
        return maps
    (resized_h, resized_w), (padded_h, padded_w) = geometry.resized[image], geometry.padded
    if (resized_h, resized_w) == (padded_h, padded_w):
        return maps
    height, width = maps.shape[-2:]
    extent_h, extent_w = height * resized_h / padded_h, width * resized_w / padded_w  # in map cells
    out_h, out_w = max(1, math.ceil(extent_h - 1e-6)), max(1, math.ceil(extent_w - 1e-6))
    if (out_h, out_w) == (extent_h, extent_w):  # the content ends on a cell border: a plain crop
        return maps[..., :out_h, :out_w]
    ys = (torch.arange(out_h, dtype=torch.float32) + 0.5) * (extent_h / out_h) / height * 2 - 1
    xs = (torch.arange(out_w, dtype=torch.float32) + 0.5) * (extent_w / out_w) / width * 2 - 1
    grid = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), dim=-1).to(maps.device)  # (out_h, out_w, 2): x, y
    flat = maps.float().reshape(-1, 1, height, width)
    sampled = F.grid_sample(
        flat, grid.expand(flat.shape[0], -1, -1, -1), mode="bilinear", padding_mode="border", align_corners=False
    )
    return sampled.reshape(*maps.shape[:-2], out_h, out_w)


# --- the whole computation ------------------------------------------------------------------------------------


@dataclass
class DetectionCamBatch:
    """The maps of a batch's explained boxes: ``maps[b, k]`` explains box ``boxes[b, k]`` of image b.

    Images with fewer boxes than the batch's most are padded: ``valid[b, k]`` says which slots are boxes.
    Boxes are in model-input pixels (x0, y0, x1, y1); maps cover the model input exactly (no padding).
    """

    maps: torch.Tensor  # (B, K, h, w) >= 0, not normalized
    boxes: torch.Tensor  # (B, K, 4) float
    labels: torch.Tensor  # (B, K) long
    scores: torch.Tensor  # (B, K) the detections' scores
    valid: torch.Tensor  # (B, K) bool
    matched: torch.Tensor  # (B, K) bool: an IoU match was found in the gradient-carrying output
    best_scores: torch.Tensor  # (B,) each image's best detection score (nan: it detected nothing)
    layer: str
    method: str
    input_size: tuple[int, int]  # (height, width) of the model input the boxes and maps refer to
    levels: list[str] = field(default_factory=list)  # the explained maps' names (an FPN's level keys)
    empty: torch.Tensor | None = None  # (B, K) bool: a constant map


def check_detection_options(
    method: str,
    layers: Sequence[str],
    *,
    boxes: int,
    min_score: float,
    eigen_smooth: bool = False,
    aug_smooth: bool = False,
    levels: str = "all",
) -> None:
    """Refuse, in one line, what cannot work on a detector, before any image is read."""
    if method not in CAM_METHODS:
        raise UsageError(f"unknown method {method!r}; choose one of: {', '.join(DETECTION_METHODS)}")
    if method not in DETECTION_METHODS:
        why = {
            "cam": "it needs a global-pooling classifier head",
            "scorecam": "it scores masked copies of the whole image, and boxes move between copies",
            "ablationcam": "it scores ablated copies of the whole image, and boxes move between copies",
        }.get(method, "")
        raise UsageError(f"-m {method} does not work on a detector ({why}); use one of: {', '.join(DETECTION_METHODS)}")
    if len(layers) > 1:
        raise UsageError("a detector's boxes are explained at one layer; give one -l (an FPN's levels are all used)")
    if boxes < 1:
        raise UsageError(f"--boxes {boxes}: explain at least 1 box per image")
    if not (0.0 <= min_score <= 1.0) or math.isnan(min_score):
        raise UsageError(f"--min-score {min_score}: a detection score is between 0 and 1")
    if eigen_smooth and method not in GRADIENT_METHODS:
        raise UsageError(
            f"--eigen-smooth applies to the gradient methods ({', '.join(GRADIENT_METHODS)}), not {method}"
        )
    if aug_smooth:
        raise UsageError("--aug-smooth does not apply to detectors (a flipped copy moves the boxes); drop it")
    if levels not in LEVELS:
        raise UsageError(f"levels {levels!r}: choose one of {', '.join(LEVELS)}")


def detection_cams(
    model: nn.Module,
    batch: torch.Tensor,
    *,
    layer: str,
    method: str = "gradcam",
    boxes: int = 5,
    min_score: float = 0.5,
    iou_threshold: float = IOU_THRESHOLD,
    eigen_smooth: bool = False,
    levels: str = "all",
    box_head_shortcut: bool = True,
) -> DetectionCamBatch:
    """Explain each image's top ``boxes`` detections scoring at least ``min_score``, at ``layer``.

    Args:
        model: a detector returning, in eval mode, one dict per image with ``boxes``, ``labels`` and ``scores``
            (torchvision's ``fasterrcnn_*``, ``retinanet_*``, ``fcos_*``, ``ssd*``); left as it was.
        batch: model inputs (B, C, H, W) on the model's device (torchvision's detectors normalize inside:
            pixels in [0, 1]).
        layer: a ``named_modules()`` name whose output is a map or a dict of maps (``backbone.fpn``).
        method: a gradient method (``GRADIENT_RULES``) or ``eigencam`` (no backward pass at all: it runs under
            ``torch.inference_mode()`` and on detectors whose scores carry no gradient).
        boxes: detections explained per image, best first. min_score: the lowest score explained.
        iou_threshold: the IoU from which a gradient-carrying detection stands for an explained box.
        eigen_smooth: for a gradient method, the first principal component of the weighted activations.
        levels: ``all`` explains every map the layer returns (summed, see ``pyramid_sum``), ``first`` only
            its first (finest).
        box_head_shortcut: for an R-CNN (torchvision's ``RoIHeads``) explained at the maps its box head reads,
            run the forward pass without autograd and differentiate the explained boxes' scores through the
            box head run again on their own proposals only (``box_head_scores``): the same scores and
            gradients, without back-propagating through the head's hundreds of other proposals. Falls back to
            the general way when a box cannot be traced to its proposal.

    Returns:
        ``DetectionCamBatch``: maps (B, K, h, w) over the model input, boxes in model-input pixels, K the most
        boxes any image of the batch has (at least 1; images with fewer are padded, see ``valid``).
    """
    check_detection_options(method, [layer], boxes=boxes, min_score=min_score, eigen_smooth=eigen_smooth, levels=levels)
    needs_grad = method in GRADIENT_METHODS
    images = batch.shape[0]
    heads = None
    if needs_grad and box_head_shortcut and not torch.is_inference_mode_enabled():
        heads = _box_head(model, layer)
    watching = _watch_box_head(heads) if heads is not None else nullcontext(None)
    with capture_levels(model, layer, grad=needs_grad and heads is None) as captured, watching as seen:
        output = run_model(model, batch)
        detections = detections_of(output, images)
        if not captured.levels:
            raise UsageError(
                f"layer {layer!r} "
                + ("did not run" if captured.calls == 0 else "gave no map (N, C, h, w)")
                + " in the detector's forward pass; choose another with -l (e.g. backbone)"
            )
        count = len(captured.levels) if levels == "all" else 1
        names = captured.names[:count]
        chosen = [chosen_detections(d, boxes, min_score) for d in detections]
        k = max(1, max(len(c) for c in chosen))
        device = batch.device
        box_table = torch.zeros(images, k, 4, device=device)
        label_table = torch.zeros(images, k, dtype=torch.long, device=device)
        score_table = torch.zeros(images, k, device=device)
        valid = torch.zeros(images, k, dtype=torch.bool)
        matched = torch.zeros(images, k, dtype=torch.bool)
        for b, (found, indices) in enumerate(zip(detections, chosen, strict=True)):
            n = len(indices)
            box_table[b, :n] = found["boxes"][indices].detach().float()
            label_table[b, :n] = found["labels"][indices].detach()
            score_table[b, :n] = found["scores"][indices].detach().float()
            valid[b, :n] = True
            matched[b, :n] = True
        best = torch.tensor([float(d["scores"].detach().max()) if len(d["scores"]) else math.nan for d in detections])
        rows: list[torch.Tensor] | None = None
        explained = captured.levels[:count]
        if needs_grad and not bool(valid.any()):  # nothing to explain in the whole batch
            rows = [torch.zeros(0, device=device) for _ in range(images)]
        elif heads is not None and seen is not None:
            # The forward pass ran without autograd: the explained maps become leaves here, and the box head
            # runs again from them on the explained boxes' proposals only.
            explained = [level.detach().requires_grad_(True) for level in explained]
            leaves = {id(handed): leaf for handed, leaf in zip(captured.handed, explained, strict=False)}
            rows = box_head_scores(heads, seen, leaves, detections, chosen, (batch.shape[-2], batch.shape[-1]))
        elif needs_grad:
            rows = []
            for b, (found, indices) in enumerate(zip(detections, chosen, strict=True)):
                n = len(indices)
                scores, hit = box_scores(found, box_table[b, :n], label_table[b, :n], iou_threshold)
                matched[b, :n] = hit
                rows.append(scores)
        if needs_grad and rows is not None:
            with torch.enable_grad():  # (already on after the captured layer, but not with the shortcut)
                padded = [torch.cat([row, row.new_zeros(k - len(row))]) if len(row) < k else row for row in rows]
                target = torch.stack(padded)  # (B, K)
            maps = _gradient_maps(target, explained, method, eigen_smooth)
        elif not needs_grad:
            maps = eigen_levels([level.detach() for level in explained]).expand(-1, k, -1, -1)
        geometry = captured.geometry
    if needs_grad and rows is None:  # a box the shortcut could not trace: the general way
        return detection_cams(
            model,
            batch,
            layer=layer,
            method=method,
            boxes=boxes,
            min_score=min_score,
            iou_threshold=iou_threshold,
            eigen_smooth=eigen_smooth,
            levels=levels,
            box_head_shortcut=False,
        )
    per_image = [unpadded(maps[b], geometry, b) for b in range(images)]
    if len({m.shape for m in per_image}) > 1:  # images resized differently (never from one stacked batch)
        size = per_image[0].shape[-2:]
        per_image = [F.interpolate(m[None], size=size, mode="bilinear")[0] for m in per_image]
    maps = torch.stack(per_image).detach() * valid.to(batch.device)[..., None, None]  # padding slots: no map
    return DetectionCamBatch(
        maps=maps,
        boxes=box_table,
        labels=label_table,
        scores=score_table,
        valid=valid,
        matched=matched,
        best_scores=best,
        layer=layer,
        method=method,
        input_size=(batch.shape[-2], batch.shape[-1]),
        levels=names,
        empty=constant_maps(maps).cpu() & valid,
    )


# --- boxes in the photo ---------------------------------------------------------------------------------------


def to_original(
    box: Sequence[float], view_box: tuple[float, float, float, float], input_size: tuple[int, int]
) -> list[float]:
    """A box (x0, y0, x1, y1) in model-input pixels (``input_size`` = (height, width)) in the photo's pixels,
    given the part of the photo the model input was made from (``PreparedImage.view.box``)."""
    left, top, right, bottom = view_box
    scale_x, scale_y = (right - left) / input_size[1], (bottom - top) / input_size[0]
    x0, y0, x1, y1 = (float(v) for v in box)
    return [left + x0 * scale_x, top + y0 * scale_y, left + x1 * scale_x, top + y1 * scale_y]


def draw_box(picture: Image.Image, box: Sequence[float], text: str) -> Image.Image:
    """``picture`` with ``box`` (its pixels) outlined and ``text`` on a dark tag at its top-left corner (inside
    the box when there is no room above it)."""
    draw = ImageDraw.Draw(picture)
    side = min(picture.size)
    width = max(2, round(side / 250))
    x0, y0, x1, y1 = (round(v) for v in box)
    draw.rectangle((x0 - 1, y0 - 1, x1 + 1, y1 + 1), outline=BOX_OUTLINE, width=width + 2)
    draw.rectangle((x0, y0, x1, y1), outline=BOX_COLOUR, width=width)
    tag_font = font(max(10, min(24, side // 28)))
    left, top, right, bottom = draw.textbbox((0, 0), text, font=tag_font)
    tag_w, tag_h = right - left + 6, bottom - top + 6
    tag_x = min(max(0, x0), max(0, picture.width - tag_w))
    tag_y = y0 - tag_h if y0 - tag_h >= 0 else max(0, y0)
    draw.rectangle((tag_x, tag_y, tag_x + tag_w, tag_y + tag_h), fill=BOX_OUTLINE)
    draw.text((tag_x + 3 - left, tag_y + 3 - top), text, fill=BOX_COLOUR, font=tag_font)
    return picture


# --- the job ----------------------------------------------------------------------------------------------------


@dataclass
class DetectionOptions:
    """What ``DetectionCamJob`` explains: ``cam`` (a ``jobs.CamOptions``: out_dir, layer, method, alpha, cmap,
    save_raw, caption, eigen_smooth) and which boxes."""

    cam: Any  # jobs.CamOptions (not imported here: jobs imports much)
    boxes: int = 5
    min_score: float = 0.5
    iou_threshold: float = IOU_THRESHOLD
    levels: str = "all"


class DetectionCamJob:
    """CAM overlays of a detector's boxes: one forward and one batched backward per batch, a PNG per box."""

    command = "gradcam"

    def __init__(self, loaded: LoadedModel, options: DetectionOptions):
        cam = options.cam
        check_detection_options(
            cam.method,
            cam.explained_layers,
            boxes=options.boxes,
            min_score=options.min_score,
            eigen_smooth=cam.eigen_smooth,
            aug_smooth=cam.aug_smooth,
            levels=options.levels,
        )
        self.loaded, self.options = loaded, options

    def settings(self) -> dict[str, Any]:
        cam, options = self.options.cam, self.options
        settings: dict[str, Any] = {
            "layer": cam.layer,
            "method": cam.method,
            "boxes": options.boxes,
            "min_score": options.min_score,
            "alpha": cam.alpha,
            "cmap": cam.cmap,
            "save_raw": cam.save_raw,
        }
        if not cam.caption:
            settings["caption"] = False
        if cam.eigen_smooth:
            settings["eigen_smooth"] = True
        if options.levels != "all":
            settings["levels"] = options.levels
        if self._format != "png":  # only when not PNG: earlier runs' settings stay equal
            settings |= {"format": self._format, "quality": getattr(cam, "quality", None) or DEFAULT_QUALITY}
        return settings

    @property
    def _format(self) -> str:
        return str(getattr(self.options.cam, "file_format", "png"))

    def output_patterns(self) -> list[str]:
        return [f"{self.options.cam.file_stem}_box*_c*{image_suffix(self._format)}"]

    def compute(self, batch: list[PreparedImage]) -> DetectionCamBatch:
        cam = self.options.cam
        result = detection_cams(
            self.loaded.module,
            model_batch(batch, self.loaded),
            layer=cam.layer,
            method=cam.method,
            boxes=self.options.boxes,
            min_score=self.options.min_score,
            iou_threshold=self.options.iou_threshold,
            eigen_smooth=cam.eigen_smooth,
            levels=self.options.levels,
        )
        maps = result.maps.float().cpu()
        return replace(
            result,
            maps=normalize_map(maps),
            boxes=result.boxes.cpu(),
            labels=result.labels.cpu(),
            scores=result.scores.float().cpu(),
        )

    def write(self, item: PreparedImage, index: int, result: DetectionCamBatch) -> Record:
        cam, options = self.options.cam, self.options
        if not bool(torch.isfinite(result.scores[index]).all() and torch.isfinite(result.maps[index]).all()):
            return Record(
                input=str(item.path),
                status="error",
                error=f"{shown(item.path)}: the detector's scores or maps for this image are not finite (NaN or inf); "
                "check the model's weights",
            )
        # Boxes in the photo as decoded (the picture's pixels) and in the file's, when it was reduced on reading.
        file_scale = (1.0, 1.0)
        extra: dict[str, Any] = {}
        if item.original_size is not None:
            extra["downscaled_from"] = list(item.original_size)
            file_scale = (item.original_size[0] / item.size[0], item.original_size[1] / item.size[1])
        record = Record(input=str(item.path), extra=extra)
        detections: list[dict[str, Any]] = []
        folder = cam.out_dir / item.stem
        count = int(result.valid[index].sum())
        for k in range(count):
            class_index, score = int(result.labels[index, k]), float(result.scores[index, k])
            label = self.loaded.label(class_index)
            in_picture = to_original(result.boxes[index, k].tolist(), item.view.box, result.input_size)
            in_file = [round(v * file_scale[i % 2], 2) for i, v in enumerate(in_picture)]
            detections.append({"box": in_file, "class": class_index, "label": label, "score": round(score, 6)})
            heat, seen = heat_in_image(result.maps[index, k], item.view.box, item.size)
            picture = to_pil(overlay(item.pixels, heat, alpha=cam.alpha, cmap=cam.cmap, seen=seen))
            picture = draw_box(picture, in_picture, f"{label} {score:.2f}")
            empty = result.empty is not None and bool(result.empty[index, k])
            caption = f"box {k}: {label} {score:.1%} | {cam.method} @ {cam.layer}" + (" (empty map)" if empty else "")
            scale = 1
            if cam.caption:
                picture, scale = captioned(picture, caption)
            name = f"{cam.file_stem}_box{k}_c{class_index}"
            metadata = {
                "hookviz:method": cam.method,
                "hookviz:layer": cam.layer,
                "hookviz:scale": str(scale),
                "hookviz:class": str(class_index),
                "hookviz:label": label,
                "hookviz:probability": f"{score:.6f}",
                "hookviz:box": ",".join(f"{v:g}" for v in in_file),
                "hookviz:input": str(item.path),
            }
            output: dict[str, Any] = {
                "kind": "cam",
                "method": cam.method,
                "layer": cam.layer,
                "class": class_index,
                "label": label,
                "score": round(score, 6),
                "box": in_file,
                "target": {
                    "kind": "detection",
                    "box": in_file,
                    "class": class_index,
                    "score": round(score, 6),
                    "rank": k,
                    "iou_threshold": options.iou_threshold,
                },
                "png": str(
                    write_image(
                        picture,
                        folder / f"{name}{image_suffix(self._format)}",
                        metadata,
                        quality=getattr(cam, "quality", None),
                    )
                ),
            }
            if scale != 1:
                output["scale"] = scale
            if cam.eigen_smooth:
                output["eigen_smooth"] = True
            if cam.method == "eigencam":
                output["class_independent"] = True
            if not bool(result.matched[index, k]):
                output["warning"] = (
                    f"{shown(item.path)}: box {k} ({label}) has no match in the gradient-carrying output; its map is empty"
                )
            elif empty:
                output["empty"] = True
                output["warning"] = (
                    f"{shown(item.path)}: the {cam.method} map of box {k} ({label}) at {cam.layer} is empty "
                    "(the same value everywhere): nothing at this layer raises its score; try another layer (-l)"
                )
            if cam.save_raw:
                output["raw"] = str(write_npy(heat, folder / f"{name}.npy"))
            if getattr(cam, "tensorboard", None) is not None:
                cam.tensorboard.add(f"{cam.method}/{cam.layer}/box{k}", picture, str(item.path))
            record.outputs.append(output)
        record.extra["detections"] = detections
        if count == 0:
            best = float(result.best_scores[index])
            if math.isnan(best):
                record.extra["warning"] = (
                    f"{shown(item.path)}: the detector returned no box for this image (it drops boxes under its "
                    "own score threshold): nothing to explain"
                )
            else:
                record.extra["warning"] = (
                    f"{shown(item.path)}: no detection scored at least {options.min_score:g} (the best scored "
                    f"{best:.3f}); lower --min-score to explain weaker ones"
                )
        return record


def detection_job(
    loaded: LoadedModel, cam_options: Any, *, boxes: int = 5, min_score: float = 0.5, levels: str = "all"
) -> DetectionCamJob:
    """The job ``hookviz gradcam DETECTOR IMAGES --boxes N --min-score S`` runs (``pipeline.run_job`` /
    ``batch.run_batch``): for each image, one overlay per explained box, DIR/<stem>/<method>_<layer>_box<k>_c<class>.png,
    the box drawn with its label and score; each record lists the boxes (``detections``, in the file's pixels)
    and each output its ``box`` and ``target`` ({"kind": "detection", ...}). An image without a detection at
    ``min_score`` gets a record with a ``warning`` and no picture.

    ``cam_options``: the run's ``jobs.CamOptions`` (its ``classes``/``top_k`` do not apply: the boxes decide what
    is explained). Raises UsageError for what cannot work on a detector (``check_detection_options``).
    """
    return DetectionCamJob(loaded, DetectionOptions(cam=cam_options, boxes=boxes, min_score=min_score, levels=levels))
