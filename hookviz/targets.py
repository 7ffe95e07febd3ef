"""What an explanation explains: a target turns a model's output into one score per explained item.

A CAM, a guided gradient or a saliency map explains a scalar. For a classifier
that scalar is a class logit; for other models it is something else:

- ``ClassTarget``: the logit of a class, for classifiers with several outputs;
  for a model with a single output (binary, regression) class 1 is the output
  itself and class 0 its negative. ``activation`` decides only what captions and
  records show: softmax, sigmoid or the raw value.
- ``SegmentationTarget``: for outputs (N, C, H, W), the sum of class C's logits
  over the pixels the model assigns to C (pytorch-grad-cam's
  ``SemanticSegmentationTarget``), or over a region the user gives.
- ``SimilarityTarget``: the cosine similarity between an image's embedding and a
  reference image's ("what in this photo makes it match that one").

Each target chooses what to explain per image (``choose``: (B, K) class indices),
scores it differentiably (``scores``: (B, K)) and says what to show
(``shown``: one value per class, as captions and ``predictions`` report it).
Detection targets live in ``hookviz.detection``: their items are boxes.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from .errors import InputError, UsageError
from .forward import first_tensor, select_logits
from .output import safe_name

ACTIVATIONS = ("softmax", "sigmoid", "none")
SINGLE_OUTPUT_SIDES = ("negative", "positive")  # class 0 and 1 of a model with one output, without --labels
# What each kind of target other than class logits explains, as errors name it.
TARGET_NOUNS = {
    "binary": "a single output",
    "segmentation": "a segmentation class",
    "similarity": "a similarity",
    "detection": "detections",
}


def choose_classes(scores: torch.Tensor, classes: Sequence[int] | None, top_k: int) -> torch.Tensor:
    """(B, K) class indices: the given ones for every image, else each image's ``top_k`` highest ``scores`` (B, C)."""
    num_classes = scores.shape[1]
    if classes:
        for index in classes:
            if not 0 <= index < num_classes:
                raise UsageError(f"--class {index} is out of range: this model has classes 0..{num_classes - 1}")
        return torch.tensor(list(classes), device=scores.device).expand(scores.shape[0], -1)
    if top_k > num_classes:
        raise UsageError(f"--top-k {top_k} is more than the model's {num_classes} classes")
    return scores.topk(top_k, dim=1).indices


class Target(Protocol):
    """Turns a model output into the scores an explanation explains. See the module docstring."""

    @property
    def kind(self) -> str:
        """class, binary, segmentation or similarity."""

    def select(self, output: Any, output_key: str | None) -> torch.Tensor:
        """The tensor of the model's output this target reads."""

    def choose(self, selected: torch.Tensor) -> torch.Tensor:
        """(B, K) long: what is explained for each image (class indices)."""

    def scores(self, selected: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
        """(B, K): the differentiable score of each explained item."""

    def shown(self, selected: torch.Tensor) -> torch.Tensor:
        """(B, n): the value captions and records show for each class."""

    def hooked(self, model: nn.Module) -> contextlib.AbstractContextManager[None]:
        """A context in which the model's forward pass also records what ``select`` needs."""


class _NoHooks:
    def hooked(self, model: nn.Module) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()


@dataclass
class ClassTarget(_NoHooks):
    """Class logits of a classifier (N, classes); a single-output model's output (class 1) or its negative (class 0).

    Args:
        classes: the classes to explain for every image; empty for each image's ``top_k`` best.
        top_k: how many classes per image when ``classes`` is empty (for one output: 1 the positive side, 2 both).
        activation: what is shown: ``softmax``, ``sigmoid`` or ``none`` (raw values); None for the default:
            softmax for several outputs, the raw value for one.
    """

    classes: Sequence[int] = ()
    top_k: int = 1
    activation: str | None = None
    kind: str = "class"

    def _activation(self, outputs: int) -> str:
        """The activation shown: the one given, else softmax for several outputs and the raw value for one."""
        return self.activation or ("softmax" if outputs > 1 else "none")

    def resolved(self, outputs: int) -> ClassTarget:
        """This target for a model with ``outputs`` scores per image: the default activation decided, options checked."""
        activation = self._activation(outputs)
        if activation not in ACTIVATIONS:
            raise UsageError(f"unknown --activation {activation!r}; choose one of: {', '.join(ACTIVATIONS)}")
        if outputs == 1:
            if activation == "softmax":
                raise UsageError(
                    "--activation softmax needs several outputs and this model has one; use sigmoid or none"
                )
            for index in self.classes:
                if index not in (0, 1):
                    raise UsageError(
                        f"--class {index}: this model has a single output; -c 1 explains it, -c 0 its negative"
                    )
            if not self.classes and self.top_k > 2:
                raise UsageError(f"--top-k {self.top_k}: a single-output model has two sides to explain; use -k 2")
        return ClassTarget(self.classes, self.top_k, activation, "binary" if outputs == 1 else "class")

    def select(self, output: Any, output_key: str | None) -> torch.Tensor:
        logits = select_logits(output, output_key)
        if logits.dim() == 1:  # a regressor returning (N,)
            logits = logits[:, None]
        if logits.dim() != 2:
            raise UsageError(
                f"the model's output has shape {tuple(logits.shape)}, not (N, classes); use --output KEY"
                + ("; (N, C, H, W) is a segmentation output, explained per class" if logits.dim() == 4 else "")
            )
        return logits

    def choose(self, selected: torch.Tensor) -> torch.Tensor:
        batch, outputs = selected.shape
        if outputs == 1:
            sides = list(self.classes) if self.classes else [1, 0][: self.top_k]
            return torch.tensor(sides, device=selected.device).expand(batch, -1)
        return choose_classes(selected, self.classes, self.top_k)

    def scores(self, selected: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
        if selected.shape[1] == 1:  # class 1: the output; class 0: its negative
            return selected * (2.0 * chosen.to(selected.dtype) - 1.0)
        return selected.gather(1, chosen)

    def shown(self, selected: torch.Tensor) -> torch.Tensor:
        activation = self._activation(selected.shape[1])
        if selected.shape[1] == 1:
            if activation == "sigmoid":
                positive = selected.sigmoid()
                return torch.cat([1.0 - positive, positive], dim=1)
            return torch.cat([-selected, selected], dim=1)
        if activation == "softmax":
            return selected.softmax(dim=1)
        if activation == "sigmoid":
            return selected.sigmoid()
        return selected


@dataclass
class SegmentationTarget(_NoHooks):
    """Class C of a segmentation output (N, C, H, W): the sum of C's logits over C's predicted pixels or a region.

    Args:
        classes: classes to explain for every image; empty for the ``top_k`` classes covering most pixels.
        top_k: how many classes per image when ``classes`` is empty.
        regions: (B, H, W) weights in [0, 1] on the output's grid (``region_on_output``), the same batch order as
            the images; None to use each class's predicted pixels.
    """

    classes: Sequence[int] = ()
    top_k: int = 1
    regions: torch.Tensor | None = None
    region_of: Callable[[tuple[int, int]], torch.Tensor] | None = None  # regions from the output's (H, W)
    kind: str = "segmentation"
    predicted: torch.Tensor | None = field(default=None, repr=False)  # (B, H, W) argmax of the last output chosen

    def select(self, output: Any, output_key: str | None) -> torch.Tensor:
        logits = select_logits(output, output_key)
        if logits.dim() != 4:
            raise UsageError(
                f"the model's output has shape {tuple(logits.shape)}, not (N, classes, H, W) as a segmentation "
                "model's; use --output KEY to pick the segmentation output"
            )
        return logits

    def choose(self, selected: torch.Tensor) -> torch.Tensor:
        self.predicted = selected.argmax(dim=1)
        if self.region_of is not None and self.regions is None:
            self.regions = self.region_of((selected.shape[-2], selected.shape[-1]))
        # The classes covering most pixels (of the region, when one is given); ties go to the higher total logit.
        coverage = self.shown(selected)
        tie_break = selected.flatten(2).sum(dim=-1).softmax(dim=1) * 1e-6
        return choose_classes(coverage + tie_break, self.classes, self.top_k)

    def scores(self, selected: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
        logits = selected.gather(1, chosen[:, :, None, None].expand(-1, -1, *selected.shape[2:]))  # (B, K, H, W)
        if self.regions is not None:
            weights = self.regions.to(selected.device, selected.dtype)[:, None]
        else:
            predicted = selected.detach().argmax(dim=1)  # each copy's own prediction (not differentiable)
            weights = (predicted[:, None] == chosen[:, :, None, None]).to(selected.dtype)
        return (logits * weights).sum(dim=(-2, -1))

    def shown(self, selected: torch.Tensor) -> torch.Tensor:
        """(B, C): the share of pixels (of the region, when given) the model assigns to each class."""
        predicted = F.one_hot(selected.detach().argmax(dim=1), selected.shape[1]).to(selected.dtype)  # (B, H, W, C)
        if self.regions is None:
            return predicted.mean(dim=(1, 2))
        weights = self.regions.to(selected.device, selected.dtype)[..., None]
        return (predicted * weights).sum(dim=(1, 2)) / weights.sum(dim=(1, 2)).clamp_min(1e-12)


@dataclass
class SimilarityTarget:
    """The cosine similarity between each image's embedding and a reference embedding (one item per image).

    Args:
        reference: the reference image's embedding (D,), from ``embedding`` of the same model.
        layer: a layer whose output, averaged over its positions (``pooled``), is the embedding; None for the
            model's output (``output_key`` chooses a part of it).
    """

    reference: torch.Tensor
    layer: str | None = None
    kind: str = "similarity"
    _recorded: list[torch.Tensor] = field(default_factory=list, repr=False)

    @contextlib.contextmanager
    def hooked(self, model: nn.Module) -> Iterator[None]:
        if self.layer is None:
            yield
            return
        with recording(model, self.layer, self._recorded):
            yield

    def select(self, output: Any, output_key: str | None) -> torch.Tensor:
        if self.layer is not None:
            if not self._recorded:
                raise UsageError(f"--embedding-layer {self.layer} did not run in the forward pass; choose another")
            return pooled(self._recorded[-1])
        return pooled(select_logits(output, output_key))

    def choose(self, selected: torch.Tensor) -> torch.Tensor:
        if selected.shape[-1] != self.reference.shape[-1]:
            raise UsageError(
                f"the embedding has {selected.shape[-1]} values and the reference's {self.reference.shape[-1]}; "
                "use the same model and --embedding-layer for both"
            )
        return torch.zeros(selected.shape[0], 1, dtype=torch.long, device=selected.device)

    def scores(self, selected: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
        reference = self.reference.to(selected.device, selected.dtype)
        return F.cosine_similarity(selected, reference[None], dim=1)[:, None].expand(-1, chosen.shape[1])

    def shown(self, selected: torch.Tensor) -> torch.Tensor:
        return self.scores(selected.detach(), torch.zeros(selected.shape[0], 1, dtype=torch.long))


@contextlib.contextmanager
def recording(model: nn.Module, layer: str, into: list[torch.Tensor]) -> Iterator[None]:
    """Within the block, every output of ``layer`` is appended to ``into`` (cleared first), graph and all."""
    modules = dict(model.named_modules())
    if layer not in modules:
        from .errors import did_you_mean

        raise UsageError(
            f"--embedding-layer {layer!r} is not a layer of this model{did_you_mean(layer, list(modules))}"
        )
    into.clear()

    def keep(module: nn.Module, args: Any, output: Any) -> None:
        tensor = first_tensor(output)
        if tensor is not None:
            into.append(tensor)

    handle = modules[layer].register_forward_hook(keep)
    try:
        yield
    finally:
        handle.remove()


def pooled(tensor: torch.Tensor) -> torch.Tensor:
    """An embedding (N, D) from an output: as it is when 2-D, else averaged over every position.

    (N, C, h, w) maps average over h and w; (N, T, D) tokens over the tokens.
    """
    if tensor.dim() == 2:
        return tensor
    if tensor.dim() == 4:
        return tensor.mean(dim=(2, 3))
    if tensor.dim() == 3:
        return tensor.mean(dim=1)
    raise UsageError(f"an embedding of shape {tuple(tensor.shape)} cannot be pooled to (N, D); use --embedding-layer")


def embedding(
    model: nn.Module, inputs: torch.Tensor, *, output_key: str | None = None, layer: str | None = None
) -> torch.Tensor:
    """The embeddings (N, D) of model inputs: the model's (pooled) output, or ``layer``'s pooled output."""
    target = SimilarityTarget(torch.zeros(0), layer)
    with torch.no_grad(), target.hooked(model):
        output = model(inputs)
        return target.select(output, output_key).detach()


# --- regions and masks on the original image -----------------------------------------------------------


def parse_region(text: str) -> tuple[float, float, float, float]:
    """``x0,y0,x1,y1`` in original-image pixels (x1 > x0, y1 > y0)."""
    try:
        values = tuple(float(part) for part in text.split(","))
    except ValueError:
        raise UsageError(f"--region {text!r}: use x0,y0,x1,y1 in pixels of the original image") from None
    if len(values) != 4 or not all(math.isfinite(v) for v in values):
        raise UsageError(f"--region {text!r}: use four numbers x0,y0,x1,y1 in pixels of the original image")
    x0, y0, x1, y1 = values
    if x1 <= x0 or y1 <= y0 or min(values) < 0:
        raise UsageError(f"--region {text!r}: x1 must exceed x0, y1 exceed y0, none negative")
    return x0, y0, x1, y1


def region_on_output(
    region: tuple[float, float, float, float],
    box: tuple[float, float, float, float],
    image_size: tuple[int, int],
    output_size: tuple[int, int],
    file_size: tuple[int, int] | None = None,
) -> torch.Tensor:
    """A region of the original image as weights (H, W) in [0, 1] on a model output's grid.

    Args:
        region: (x0, y0, x1, y1) in pixels of the image file.
        box: where the model input lies in the decoded picture (``PreparedImage.view.box``).
        image_size: (width, height) of the decoded picture; ``file_size`` the file's, when the picture was reduced.
        output_size: (H, W) of the output grid, which covers ``box``.

    Each output cell's weight is the fraction of its area inside the region. Raises InputError when the
    region lies outside the image or outside what the model saw.
    """
    width, height = file_size or image_size
    x0, y0, x1, y1 = region
    if x1 > width or y1 > height:
        raise InputError(f"--region {x0:g},{y0:g},{x1:g},{y1:g} reaches outside this {width}x{height} image")
    scale_x, scale_y = image_size[0] / width, image_size[1] / height
    left, top, right, bottom = box
    rows, cols = output_size
    # The region in output-cell units, then each cell's overlap with it along each axis.
    u0, u1 = ((x0 * scale_x - left) / (right - left) * cols, (x1 * scale_x - left) / (right - left) * cols)
    v0, v1 = ((y0 * scale_y - top) / (bottom - top) * rows, (y1 * scale_y - top) / (bottom - top) * rows)
    across = (
        torch.minimum(torch.arange(1, cols + 1.0), torch.tensor(u1))
        - torch.maximum(torch.arange(cols + 0.0), torch.tensor(u0))
    ).clamp(0, 1)
    down = (
        torch.minimum(torch.arange(1, rows + 1.0), torch.tensor(v1))
        - torch.maximum(torch.arange(rows + 0.0), torch.tensor(v0))
    ).clamp(0, 1)
    weights = down[:, None] * across[None, :]
    if float(weights.sum()) <= 0:
        raise InputError(f"--region {x0:g},{y0:g},{x1:g},{y1:g} lies outside the part of the image the model saw")
    return weights


def read_mask(path: str | Path) -> torch.Tensor:
    """A binary mask file (any image; nonzero is inside) as (H, W) float in {0, 1}, in the original's pixels."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            mask = torch.frombuffer(bytearray(image.convert("L").tobytes()), dtype=torch.uint8)
            mask = mask.reshape(image.height, image.width)
    except FileNotFoundError:
        raise UsageError(f"--mask {path}: file not found") from None
    except (UnidentifiedImageError, OSError):
        raise UsageError(f"--mask {path}: not an image; give a PNG whose nonzero pixels mark the region") from None
    if not bool((mask > 0).any()):
        raise UsageError(f"--mask {path}: every pixel is zero; nonzero pixels mark the region")
    return (mask > 0).float()


def mask_on_output(
    mask: torch.Tensor,
    box: tuple[float, float, float, float],
    image_size: tuple[int, int],
    output_size: tuple[int, int],
    file_size: tuple[int, int] | None = None,
) -> torch.Tensor:
    """A mask (H, W) of the original image (the file's size) as weights (h, w) on an output grid covering ``box``:
    each cell's share of masked pixels. Raises InputError when sizes differ or the mask misses what the model saw."""
    width, height = file_size or image_size
    if (mask.shape[1], mask.shape[0]) != (width, height):
        raise InputError(
            f"--mask is {mask.shape[1]}x{mask.shape[0]} and this image {width}x{height}; give a mask of the image's size"
        )
    if (width, height) != tuple(image_size):
        mask = F.interpolate(mask[None, None], size=(image_size[1], image_size[0]), mode="area")[0, 0]
    left, top, right, bottom = (round(v) for v in box)
    seen = mask[max(0, top) : bottom, max(0, left) : right]
    weights = F.adaptive_avg_pool2d(seen[None, None], output_size)[0, 0]
    if float(weights.sum()) <= 0:
        raise InputError("--mask marks nothing in the part of the image the model saw")
    return weights


def regions_for(
    items: Sequence[Any],
    output_size: tuple[int, int],
    region: tuple[float, float, float, float] | None = None,
    mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, list[str | None]]:
    """The region (or mask) of each prepared image (``PreparedImage``) as weights (B, H, W) on an output grid, and
    per image None or the error that makes the region unusable there (its weights are then zero)."""
    weights: list[torch.Tensor] = []
    errors: list[str | None] = []
    for item in items:
        try:
            if mask is not None:
                weights.append(mask_on_output(mask, item.view.box, item.size, output_size, item.original_size))
            else:
                assert region is not None
                weights.append(region_on_output(region, item.view.box, item.size, output_size, item.original_size))
            errors.append(None)
        except InputError as exc:
            weights.append(torch.zeros(output_size))
            errors.append(str(exc))
    return torch.stack(weights), errors


@dataclass(frozen=True)
class TargetSpec:
    """What a run explains, as the user gave it; ``CamJob`` builds a ``Target`` from it for each batch.

    Args:
        kind: ``class`` (classifiers), ``binary`` (one output), ``segmentation`` or ``similarity``.
        activation: for class and binary targets, what captions show (see ``ClassTarget``).
        region: for segmentation, (x0, y0, x1, y1) in original-image pixels; ``mask``: a mask file instead.
        reference: for similarity, the reference image's path; ``embedding_layer`` as in ``SimilarityTarget``.
    """

    kind: str = "class"
    activation: str | None = None
    region: tuple[float, float, float, float] | None = None
    mask: str | None = None
    reference: str | None = None
    embedding_layer: str | None = None

    def settings(self) -> dict[str, Any]:
        """The manifest's settings for this target; nothing for a plain classifier (earlier runs stay equal)."""
        if self.kind == "class" and self.activation in (None, "softmax"):
            return {}
        fields = {
            "kind": self.kind,
            "activation": self.activation,
            "region": list(self.region) if self.region else None,
            "mask": self.mask,
            "reference": self.reference,
            "embedding_layer": self.embedding_layer,
        }
        return {"target": {key: value for key, value in fields.items() if value is not None}}

    def file_part(self, class_part: str | int) -> str:
        """What an output's name says it explains, after ``<method>_<layer>``: ``_c<class>`` (``class_part``: an
        index, or ``*`` in a pattern), with the region or mask, so maps of other regions never overwrite each
        other; ``_sim-<reference>`` for a similarity."""
        if self.kind == "similarity":
            return f"_sim-{safe_name(Path(self.reference or 'reference').stem)}"
        if self.region is not None:
            return f"_c{class_part}_region-" + "-".join(f"{v:g}" for v in self.region)
        if self.mask is not None:
            return f"_c{class_part}_mask-{Path(self.mask).stem}"
        return f"_c{class_part}"

    @property
    def has_classes(self) -> bool:
        """Whether outputs are per class (a similarity has one map per image)."""
        return self.kind != "similarity"

    def describe(self, class_index: int, value: float) -> dict[str, Any]:
        """The ``target`` entry of an output record: what this map explains."""
        if self.kind == "similarity":
            described: dict[str, Any] = {"kind": "similarity", "reference": self.reference, "similarity": value}
            if self.embedding_layer:
                described["embedding_layer"] = self.embedding_layer
            return described
        described = {"kind": self.kind, "class": class_index}
        if self.kind == "binary":
            described["side"] = SINGLE_OUTPUT_SIDES[class_index]
        if self.kind == "segmentation":
            described["pixels"] = value  # the share of pixels (of the region) predicted as the class
            if self.region is not None:
                described["region"] = list(self.region)
            if self.mask is not None:
                described["mask"] = self.mask
        return described

    def caption_value(self, value: float) -> str:
        """The number a caption shows after the label: a probability or share as %, a raw value (``--activation
        none``) as it is."""
        if self.kind == "segmentation":
            return f"{value:.1%} of {'the region' if self.region or self.mask else 'pixels'}"
        if self.kind == "similarity":
            return f"similarity {value:.3f} to {Path(self.reference or '').name}"
        return f"{value:.4g}" if self.activation == "none" else f"{value:.1%}"
