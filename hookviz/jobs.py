"""What each image command does with a batch: run the method, then write one input's files and record.

A job plugs into the batch loop (pipeline.run_job) as a ``pipeline.Job``:
``compute`` runs the model on a batch in the calling thread, ``write`` renders
and writes one image's outputs in the writer thread and returns its ``Record``.
The methods themselves (fmaps, cams, guided, stats) know nothing of files.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from .attribution import AttributionBatch, attribution_heat, compute_attributions, heat_scaled, method_settings
from .cams import CamBatch, compute_cams, constant_maps
from .errors import UsageError, shown
from .fmaps import channel_grid, selected_channels
from .forward import run_model
from .guided import GuidedBatch, compute_guided, gradient_image
from .hooks import capture
from .labels import Expected, ExpectedLabels
from .methods import CLASS_INDEPENDENT, GRADIENT_METHODS
from .metrics import Scorer, map_scores
from .models import LoadedModel
from .output import DEFAULT_QUALITY, image_suffix, layer_file_names, safe_name, write_image, write_npy, write_png
from .pipeline import PreparedImage, Record, model_batch, prepare_image
from .render import captioned, heat_in_image, normalize_map, overlay, overlay_picture, titled, to_pil
from .spatial import spatial_output, to_spatial
from .stats import StatsCollector
from .targets import (
    SINGLE_OUTPUT_SIDES,
    ClassTarget,
    SegmentationTarget,
    SimilarityTarget,
    Target,
    TargetSpec,
    embedding,
    read_mask,
    regions_for,
)

# --- fmaps -------------------------------------------------------------------------------------------


@dataclass
class FmapOptions:
    """What ``FmapJob`` draws and where it writes."""

    out_dir: Path
    layers: list[str]
    max_channels: int = 64
    cmap: str = "viridis"
    save_raw: bool = False
    label_channels: bool = True
    layers_named: bool = (
        True  # False for the default "every Conv2d": convs that do not run (training-only heads) are skipped
    )
    tensorboard: Any = None  # a hookviz.tensorboard.ImageSink, or None
    scale: str = "channel"  # "layer": one colour scale for all of a layer's tiles, with a colour bar
    caption: bool = True  # a title band (layer, shape, input) above the grid
    file_format: str = "png"  # png, jpg or webp (--format)
    quality: int | None = None  # JPEG/WebP quality (--quality; default output.DEFAULT_QUALITY)


@dataclass
class LayerMaps:
    """One layer's part of a batch's result, on the CPU, for the writer thread."""

    maps: torch.Tensor  # (B, k, h, w) the channels to draw, on the CPU
    channels: torch.Tensor  # (B, k) their indices
    shape: tuple[int, ...]  # (C, h, w) of the layer's output
    raw: torch.Tensor | None = None  # (B, C, h, w) everything, for --save-raw
    ranges: torch.Tensor | None = None  # (B, 2) each image's smallest and largest value over all channels


class FmapJob:
    """Feature-map grids: one forward pass per batch captures every layer; one grid per (image, layer)."""

    command = "fmaps"

    def __init__(self, loaded: LoadedModel, options: FmapOptions):
        self.loaded, self.options = loaded, options

    def settings(self) -> dict[str, Any]:
        options = self.options
        return {
            "layers": options.layers,
            "max_channels": options.max_channels,
            "cmap": options.cmap,
            "save_raw": options.save_raw,
            "label_channels": options.label_channels,
            # Only what differs from the defaults: earlier runs' keys stay as they were.
            **({} if options.scale == "channel" else {"scale": options.scale}),
            **({} if options.caption else {"caption": False}),
            **_format_settings(options),
        }

    def output_patterns(self) -> list[str]:
        suffix = image_suffix(self.options.file_format)
        return [f"fmap_{name}{suffix}" for name in layer_file_names(self.options.layers).values()]

    def compute(self, batch: list[PreparedImage]) -> dict[str, LayerMaps]:
        """Per layer, the channels to draw (and the whole output with --save-raw).

        Only the shown channels are kept for the writer, so batches waiting to be written stay small.
        """
        options = self.options
        with capture(self.loaded.module, options.layers) as activations:
            run_model(self.loaded.module, model_batch(batch, self.loaded))
        layers = options.layers if options.layers_named else [layer for layer in options.layers if layer in activations]
        result = {}
        for layer in layers:
            output, layout = spatial_output(
                activations, layer, self.loaded.preprocessing.input_size, activations.calls.get(layer, 0)
            )
            activation = to_spatial(output, layout)  # tokens and channels-last outputs as (B, C, h, w)
            maps, channels = selected_channels(activation, options.max_channels)
            raw = activation.detach().float().cpu() if options.save_raw else None
            ranges = None
            if options.scale == "layer":
                flat = activation.detach().flatten(1).float()
                ranges = torch.stack([flat.min(dim=1).values, flat.max(dim=1).values], dim=1).cpu()
            result[layer] = LayerMaps(
                maps=maps, channels=channels, shape=tuple(activation.shape[1:]), raw=raw, ranges=ranges
            )
        return result

    def write(self, item: PreparedImage, index: int, result: dict[str, LayerMaps]) -> Record:
        options = self.options
        for layer, layer_maps in result.items():
            if not bool(torch.isfinite(layer_maps.maps[index]).all()):
                return _not_finite(item, f"layer {layer}'s output")
        record = Record(input=str(item.path))
        file_names = layer_file_names(options.layers)
        for layer, layer_maps in result.items():
            shape = layer_maps.shape
            left, top, right, bottom = item.view.box
            layer_range = None if layer_maps.ranges is None else tuple(layer_maps.ranges[index].tolist())
            grid = channel_grid(
                layer_maps.maps[index],
                layer_maps.channels[index].tolist(),
                shape[0],
                cmap=options.cmap,
                label_channels=options.label_channels,
                scale=options.scale,
                aspect=(right - left) / (bottom - top),
                layer_range=layer_range,
            )
            picture = grid.image
            if options.caption:
                shown = f"{len(grid.channels)} of {grid.total_channels}" if grid.is_subset else f"{grid.total_channels}"
                title = f"{layer} | {'x'.join(map(str, shape))} | {shown} channels | {item.path.name}"
                colorbar = (options.cmap, *grid.value_range) if grid.value_range is not None else None
                picture = titled(picture, title, colorbar)
            folder, name = options.out_dir / item.stem, f"fmap_{file_names[layer]}"
            metadata = {
                "hookviz:layer": layer,
                "hookviz:shape": "x".join(map(str, shape)),
                "hookviz:channels": ",".join(map(str, grid.channels)),
                "hookviz:selection": (
                    f"the {len(grid.channels)} most active of {grid.total_channels} channels (mean |activation|)"
                    if grid.is_subset
                    else f"all {grid.total_channels} channels"
                ),
                "hookviz:input": str(item.path),
            }
            output = {
                "kind": "fmap",
                "layer": layer,
                "png": str(
                    write_image(
                        picture,
                        folder / f"{name}{image_suffix(options.file_format)}",
                        metadata,
                        quality=options.quality,
                    )
                ),
                "channels": grid.channels,
            }
            if options.tensorboard is not None:
                options.tensorboard.add(f"fmaps/{layer}", picture, str(item.path))
            if layer_maps.raw is not None:  # --save-raw
                output["raw"] = str(write_npy(layer_maps.raw[index], folder / f"{name}.npy"))
            record.outputs.append(output)
        return record


# --- CAMs and guided backpropagation -----------------------------------------------------------------


@dataclass
class CamOptions:
    """What ``CamJob`` and ``GuidedJob`` explain and how they draw it."""

    out_dir: Path
    layer: str
    method: str = "gradcam"
    classes: Sequence[int] | None = None
    top_k: int = 1
    alpha: float = 0.5
    cmap: str = "jet"
    save_raw: bool = False
    predictions: int = 5  # how many top predictions each JSON record lists
    score_batch_size: int = 32
    tensorboard: Any = None  # a hookviz.tensorboard.ImageSink, or None
    caption: bool = True  # False: the picture exactly at the original's size, nothing drawn on it
    layers: Sequence[str] = ()  # several layers whose maps are fused (``layer`` then names them all, "a+b")
    fuse: str = "mean"  # how several layers' maps combine: "mean" or "max"
    eigen_smooth: bool = False
    aug_smooth: bool = False
    metrics: Sequence[str] = ()  # gradcam --metric: each map's numbers in its record (hookviz.metrics.map_scores)
    metric_steps: int = 20
    target: TargetSpec = field(default_factory=TargetSpec)  # what score is explained (hookviz.targets)
    file_format: str = "png"  # png, jpg or webp (--format)
    quality: int | None = None  # JPEG/WebP quality (--quality; default output.DEFAULT_QUALITY)

    @property
    def explained_layers(self) -> list[str]:
        return list(self.layers) or [self.layer]

    @property
    def file_stem(self) -> str:
        """``<method>_<layer>`` of output names, with what changes the map: "gradcam-eigen-aug_layer3+layer4"."""
        method = self.method + "-eigen" * self.eigen_smooth + "-aug" * self.aug_smooth
        return f"{safe_name(method)}_{safe_name(self.layer)}"

    @property
    def layer_caption(self) -> str:
        """The layer part of a caption: "layer4", or "layer3 + layer4 (mean)" for fused layers, with smoothing."""
        text = self.layer if len(self.explained_layers) == 1 else f"{' + '.join(self.layers)} ({self.fuse})"
        smoothing = [name for name, on in (("eigen", self.eigen_smooth), ("aug", self.aug_smooth)) if on]
        return text + (f", {'+'.join(smoothing)}-smoothed" if smoothing else "")


@dataclass
class ScoredCamBatch(CamBatch):
    """A CamBatch with ``gradcam --metric``'s numbers: ``scores[name][b, k]`` for the map of image b, class k;
    and the target that was explained (a segmentation's predicted pixels, a region's errors per image)."""

    scores: dict[str, torch.Tensor] = field(default_factory=dict)
    explained: Target | None = None
    region_errors: list[str | None] | None = None


class BatchTargets:
    """Each batch's ``Target`` from the run's ``TargetSpec`` (the reference embedding and the mask read once)."""

    def __init__(self, loaded: LoadedModel, spec: TargetSpec, classes: Sequence[int] | None = None, top_k: int = 1):
        self.loaded, self.spec, self.classes, self.top_k = loaded, spec, tuple(classes or ()), top_k
        self._reference: torch.Tensor | None = None  # --similar-to's embedding, computed on first use
        self._mask: torch.Tensor | None = read_mask(spec.mask) if spec.mask else None

    def __call__(self, batch: list[PreparedImage]) -> tuple[Target, list[str | None] | None]:
        """The target of this batch, and for a region or mask each image's error (None where it fits)."""
        spec = self.spec
        if spec.kind == "similarity":
            if self._reference is None:
                self._reference = reference_embedding(self.loaded, spec)
            return SimilarityTarget(self._reference, spec.embedding_layer), None
        if spec.kind == "segmentation":
            errors: list[str | None] = []
            region_of = None
            if spec.region is not None or self._mask is not None:

                def region_of(size: tuple[int, int]) -> torch.Tensor:
                    weights, found = regions_for(batch, size, spec.region, self._mask)
                    errors.extend(found)
                    return weights

            return SegmentationTarget(self.classes, self.top_k, region_of=region_of), errors
        return ClassTarget(self.classes, self.top_k, spec.activation), None


class CamJob:
    """CAM overlays: one forward (and one batched backward) per batch; an overlay per (image, class)."""

    command = "gradcam"

    def __init__(self, loaded: LoadedModel, options: CamOptions):
        self.loaded, self.options = loaded, options
        self.layer_calls: dict[str, int] | None = None  # learnt from the first batch: see compute_cams
        self.targets = BatchTargets(loaded, options.target, options.classes, options.top_k)

    def settings(self) -> dict[str, Any]:
        return _settings(
            self.options,
            method=self.options.method,
            alpha=self.options.alpha,
            cmap=self.options.cmap,
            save_raw=self.options.save_raw,
            **self._smoothing(),
            **self._scored(),
            **self.options.target.settings(),
        )

    def _scored(self) -> dict[str, Any]:
        """gradcam --metric's settings, only when used (earlier runs' settings stay equal)."""
        options = self.options
        return {"metrics": list(options.metrics), "metric_steps": options.metric_steps} if options.metrics else {}

    def _smoothing(self) -> dict[str, Any]:
        """Settings and record fields of fusion and smoothing, only when used (earlier runs' settings stay equal)."""
        options = self.options
        extra: dict[str, Any] = {}
        if len(options.explained_layers) > 1:
            extra.update(layers=list(options.layers), fuse=options.fuse)
        if options.eigen_smooth:
            extra["eigen_smooth"] = True
        if options.aug_smooth:
            extra["aug_smooth"] = True
        return extra

    def output_patterns(self) -> list[str]:
        options = self.options
        picture = image_suffix(options.file_format)
        if options.method in CLASS_INDEPENDENT:
            return [f"{options.file_stem}{picture}"]
        explained = [options.target.file_part(c) for c in _class_patterns(options)]
        patterns = [f"{options.file_stem}{what}{picture}" for what in explained]
        if options.target.kind == "segmentation":
            patterns += [f"seg{what}.png" for what in explained]
        return patterns

    def compute(self, batch: list[PreparedImage]) -> CamBatch:
        options = self.options
        target, region_errors = self.targets(batch)
        result = compute_cams(
            self.loaded.module,
            model_batch(batch, self.loaded),
            layer=options.explained_layers,
            method=options.method,
            classes=options.classes,
            top_k=options.top_k,
            output_key=self.loaded.output_key,
            score_batch_size=options.score_batch_size,
            layer_calls=self.layer_calls,
            fixed_batch=self.loaded.fixed_batch,
            eigen_smooth=options.eigen_smooth,
            aug_smooth=options.aug_smooth,
            fuse=options.fuse,
            target=target,
        )
        self.layer_calls = result.calls
        maps = result.maps.float().cpu()
        scores: dict[str, torch.Tensor] = {}
        if options.metrics:  # the same maps, scored in batched forward passes (hookviz.metrics)
            scorer = Scorer(self.loaded.module, self.loaded.output_key, pad_to=self.loaded.fixed_batch)
            inputs = model_batch(batch, self.loaded)
            steps = options.metric_steps
            scores = map_scores(scorer, inputs, result.maps, result.classes, options.metrics, steps=steps)
        return ScoredCamBatch(
            maps=normalize_map(maps),
            classes=result.classes.cpu(),
            probabilities=result.probabilities.float().cpu(),
            layer=result.layer,
            method=result.method,
            empty=constant_maps(maps),
            scores=scores,
            explained=target,
            region_errors=region_errors,
        )

    def write(self, item: PreparedImage, index: int, result: CamBatch) -> Record:
        options, spec = self.options, self.options.target
        if not bool(torch.isfinite(result.probabilities[index]).all() and torch.isfinite(result.maps[index]).all()):
            return _not_finite(item, "class scores")
        scored = result if isinstance(result, ScoredCamBatch) else None
        if scored is not None and (problem := _region_problem(scored.region_errors, index)):
            return _failed(item, problem)
        record = _record(self.loaded, item, result.probabilities[index], options)
        class_independent = options.method in CLASS_INDEPENDENT
        classes = result.classes[index].tolist()
        for k, class_index in enumerate(classes[:1] if class_independent else classes):
            label = target_label(self.loaded, spec, class_index)
            value = float(result.probabilities[index, class_index])
            picture = overlay_picture(
                item.pixels, result.maps[index, k], item.view.box, alpha=options.alpha, cmap=options.cmap
            )
            empty = result.empty is not None and bool(result.empty[index, k])
            method_at_layer = f"{options.method} @ {options.layer_caption}" + (" (empty map)" if empty else "")
            name = options.file_stem
            # A class-independent map names no class: one picture, and no class in its caption.
            named: tuple[int | None, str | None, float | None] = (None, None, None)
            caption = f"class-independent | {method_at_layer}"
            if not spec.has_classes:
                named = (None, None, value)
                caption = f"{spec.caption_value(value)} | {method_at_layer}"
                name += spec.file_part(class_index)
            elif not class_independent:
                named = (class_index, label, value)
                caption = f"{label} {spec.caption_value(value)} | {method_at_layer}"
                name += spec.file_part(class_index)
            picture, scale = _captioned(picture, caption, options)
            shown_class, shown_label, shown_probability = named
            output = _write_class_output(
                picture,
                options.out_dir / item.stem / f"{name}{image_suffix(options.file_format)}",
                item,
                options.method,
                options.layer,
                shown_class,
                shown_label,
                shown_probability,
                kind="cam",
                scale=scale,
                quality=options.quality,
            )
            output |= self._smoothing()
            if spec.settings() and not class_independent:
                output["target"] = spec.describe(class_index, round(value, 6))
            if scored is not None:
                output |= {name: round(float(values[index, k]), 6) for name, values in scored.scores.items()}
                if isinstance(scored.explained, SegmentationTarget) and scored.explained.predicted is not None:
                    pixels = scored.explained.predicted[index] == class_index
                    mask_picture = _captioned(
                        segmentation_picture(item, pixels, class_index), f"{label}: predicted pixels", options
                    )[0]
                    mask_path = options.out_dir / item.stem / f"seg{spec.file_part(class_index)}.png"
                    metadata = {
                        "hookviz:class": str(class_index),
                        "hookviz:label": label,
                        "hookviz:input": str(item.path),
                    }
                    output["segmentation_png"] = str(write_png(mask_picture, mask_path, metadata))
            if class_independent:
                output["class_independent"] = True
            if empty:
                output["empty"] = True
                output["warning"] = _empty_map_warning(
                    item, options, label, result.probabilities[index], class_independent
                )
            if options.save_raw:
                heat = heat_in_image(result.maps[index, k], item.view.box, item.size)[0]
                output["raw"] = str(write_npy(heat, options.out_dir / item.stem / f"{name}.npy"))
            if options.tensorboard is not None:
                rank = (
                    f"/top{k + 1}"
                    if not options.classes and options.top_k > 1
                    else f"/c{class_index}"
                    if options.classes
                    else ""
                )
                options.tensorboard.add(f"{options.method}/{options.layer}{rank}", picture, str(item.path))
            record.outputs.append(output)
        return record


def target_label(loaded: LoadedModel, spec: TargetSpec, class_index: int) -> str:
    """The name of an explained class: the model's, or for a single output without names its side."""
    if spec.kind == "binary" and loaded.labels is None:
        return SINGLE_OUTPUT_SIDES[class_index]
    return loaded.label(class_index)


def reference_embedding(loaded: LoadedModel, spec: TargetSpec) -> torch.Tensor:
    """--similar-to's reference image through the model's own preprocessing: its embedding (D,)."""
    from .errors import HookvizError, InputError

    assert spec.reference is not None
    try:
        prepared = prepare_image(Path(spec.reference), "reference", loaded.preprocessing, crop=False)
    except (InputError, HookvizError) as exc:
        raise UsageError(f"--similar-to {spec.reference}: {exc}") from None
    inputs = model_batch([prepared], loaded)
    return embedding(loaded.module, inputs, output_key=loaded.output_key, layer=spec.embedding_layer)[0]


# Colours of segmentation masks: a class keeps its colour across images and runs (matplotlib's tab20 order).
MASK_COLOURS = (
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
    (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207),
)  # fmt: skip


def segmentation_picture(item: PreparedImage, pixels: torch.Tensor, class_index: int) -> Image.Image:
    """The original with the pixels (h, w) a segmentation model assigned to the class tinted in the class's
    colour (half opacity), on the original's grid; what the model did not see is dimmed."""
    placed, seen = heat_in_image(pixels.float().cpu(), item.view.box, item.size)
    inside = (placed >= 0.5) & seen
    colour = torch.tensor(MASK_COLOURS[class_index % len(MASK_COLOURS)], dtype=torch.float32)[:, None, None]
    original = item.pixels.float()
    tinted = torch.where(inside, original * 0.5 + colour * 0.5, original)
    tinted = torch.where(seen, tinted, original * 0.5)
    return to_pil(tinted.round().clamp(0, 255).to(torch.uint8))


# --- CAMs of labelled inputs: the predicted and the expected class ---------------------------------------

EXPLAINED_CLASSES = ("both", "predicted", "expected")  # -c with --expected


@dataclass
class LabelledCamBatch:
    """A batch's top-1 maps, and the expected class's map where it is not the top-1 (``expected_maps``)."""

    predicted: CamBatch  # the top-1 prediction's maps, normalized, on the CPU
    expected: list[Expected]  # per image
    expected_maps: CamBatch | None  # maps[b, 0] explains image b's expected class (the top-1 map where they agree)


class LabelledCamJob(CamJob):
    """CAM overlays of labelled inputs (``--expected``): each record gains the expected class, whether the top-1
    prediction is it (``correct``), its probability and its rank among the model's classes.

    ``explain``: ``predicted`` (the top-1 map), ``expected`` (the expected class's map), or ``both``: one map
    when they agree, else both side by side in one picture captioned "predicted: X 71% / expected: Y 12%".
    The top-1 maps cost what ``CamJob``'s cost; the expected class's maps are computed only for the images the
    model gets wrong, in one pass per expected class of a batch.
    """

    def __init__(self, loaded: LoadedModel, options: CamOptions, expected: ExpectedLabels, explain: str = "both"):
        if explain not in EXPLAINED_CLASSES:
            raise ValueError(f"explain must be one of {EXPLAINED_CLASSES}, not {explain!r}")
        super().__init__(loaded, replace(options, classes=None, top_k=1))
        self.expected, self.explain = expected, explain

    def settings(self) -> dict[str, Any]:
        return {**super().settings(), "expected": self.expected.source, "explain": self.explain}

    def compute(self, batch: list[PreparedImage]) -> LabelledCamBatch:  # type: ignore[override]
        predicted = super().compute(batch)
        expected = [self.expected.of(item.path) for item in batch]
        if self.explain == "predicted" or self.options.method in CLASS_INDEPENDENT:
            return LabelledCamBatch(predicted, expected, None)
        top1 = predicted.classes[:, 0].tolist()
        wrong: dict[int, list[int]] = {}  # expected class -> the images of the batch predicted otherwise
        for b, (label, guess) in enumerate(zip(expected, top1, strict=True)):
            if label.class_index is not None and label.class_index != guess:
                wrong.setdefault(label.class_index, []).append(b)
        maps, classes = predicted.maps.clone(), predicted.classes.clone()
        empty = predicted.empty.clone() if predicted.empty is not None else None
        for class_index, images in wrong.items():
            explained = self._explained([batch[b] for b in images], class_index)
            for row, b in enumerate(images):
                maps[b], classes[b] = explained.maps[row], explained.classes[row]
                if empty is not None and explained.empty is not None:
                    empty[b] = explained.empty[row]
        return LabelledCamBatch(predicted, expected, replace(predicted, maps=maps, classes=classes, empty=empty))

    def _explained(self, items: list[PreparedImage], class_index: int) -> CamBatch:
        """``items``' maps of ``class_index``, exactly as CamJob computes a ``--class`` run's."""
        job = CamJob(self.loaded, replace(self.options, classes=[class_index], top_k=1))
        job.layer_calls = self.layer_calls
        return job.compute(items)

    def write(self, item: PreparedImage, index: int, result: LabelledCamBatch) -> Record:  # type: ignore[override]
        expected = result.expected[index]
        if expected.class_index is None:
            return Record(input=str(item.path), status="error", error=expected.error)
        probabilities = result.predicted.probabilities[index]
        predicted = int(result.predicted.classes[index, 0])
        correct = predicted == expected.class_index
        if result.expected_maps is None or correct or self.explain == "predicted":
            record = super().write(item, index, result.predicted)
        elif self.explain == "expected":
            record = super().write(item, index, result.expected_maps)
        else:
            record = self._write_both(item, index, result.predicted, result.expected_maps)
        if record.status == "ok":
            record.extra |= expected_fields(self.loaded, probabilities, expected.class_index, predicted)
        return record

    def _write_both(self, item: PreparedImage, index: int, predicted: CamBatch, expected: CamBatch) -> Record:
        """The predicted and the expected class's maps side by side (predicted left) in one captioned picture."""
        options = self.options
        probabilities = predicted.probabilities[index]
        if not bool(torch.isfinite(probabilities).all() and torch.isfinite(expected.maps[index]).all()):
            return _not_finite(item, "class scores")
        record = _record(self.loaded, item, probabilities, options)
        halves, raws, named = [], [], []
        for batch in (predicted, expected):
            class_index = int(batch.classes[index, 0])
            heat, seen = heat_in_image(batch.maps[index, 0], item.view.box, item.size)
            halves.append(to_pil(overlay(item.pixels, heat, alpha=options.alpha, cmap=options.cmap, seen=seen)))
            raws.append(heat)
            named.append((class_index, self.loaded.label(class_index), float(probabilities[class_index])))
        (guess, guess_label, guess_p), (truth, truth_label, truth_p) = named
        picture = side_by_side(halves)
        empty = [b.empty is not None and bool(b.empty[index, 0]) for b in (predicted, expected)]
        method_at_layer = f"{options.method} @ {options.layer}" + (" (empty map)" if any(empty) else "")
        shown = [f"{p:.0%}" if p >= 0.01 else f"{p:.1%}" for p in (guess_p, truth_p)]  # 0.4% is not "0%"
        caption = f"predicted: {guess_label} {shown[0]} / expected: {truth_label} {shown[1]} | {method_at_layer}"
        picture, scale = _captioned(picture, caption, options)
        name = f"{safe_name(options.method)}_{safe_name(options.layer)}_c{guess}_expected_c{truth}"
        path = options.out_dir / item.stem / f"{name}{image_suffix(options.file_format)}"
        metadata = {
            "hookviz:method": options.method,
            "hookviz:layer": options.layer,
            "hookviz:scale": str(scale),
            "hookviz:class": str(guess),
            "hookviz:label": guess_label,
            "hookviz:probability": f"{guess_p:.6f}",
            "hookviz:expected-class": str(truth),
            "hookviz:expected-label": truth_label,
            "hookviz:expected-probability": f"{truth_p:.6f}",
            "hookviz:layout": "predicted | expected",
            "hookviz:input": str(item.path),
        }
        output: dict[str, Any] = {
            "kind": "cam",
            "method": options.method,
            "layer": options.layer,
            "class": guess,
            "label": guess_label,
            "score": round(guess_p, 6),
            "expected_class": truth,
            "expected_label": truth_label,
            "expected_score": round(truth_p, 6),
            "layout": "predicted|expected",
            "png": str(write_image(picture, path, metadata, quality=options.quality)),
        }
        if scale != 1:
            output["scale"] = scale
        if any(empty):
            output["empty"] = True
        if options.save_raw:
            output["raw"] = str(write_npy(torch.stack(raws), path.with_suffix(".npy")))  # (2, H, W)
        if options.tensorboard is not None:
            options.tensorboard.add(f"{options.method}/{options.layer}/predicted-expected", picture, str(item.path))
        record.outputs.append(output)
        return record


def expected_fields(loaded: LoadedModel, probabilities: torch.Tensor, expected: int, predicted: int) -> dict[str, Any]:
    """What a labelled input's record adds: the expected class, whether the top-1 prediction (``predicted``) is it,
    its probability and its rank among the classes (1 = the most probable; a tie counts in its favour)."""
    probability = probabilities[expected]
    return {
        "expected": expected,
        "expected_label": loaded.label(expected),
        "correct": predicted == expected,
        "expected_score": round(float(probability), 6),
        "expected_rank": 1 + int((probabilities > probability).sum()),
    }


SIDE_BY_SIDE_GAP = 0.02  # of the width of one picture: a thin white line between the two maps


def side_by_side(pictures: Sequence[Image.Image]) -> Image.Image:
    """Pictures of one size in a row, separated by a thin white line."""
    width, height = pictures[0].size
    gap = max(2, round(width * SIDE_BY_SIDE_GAP))
    row = Image.new("RGB", (len(pictures) * width + (len(pictures) - 1) * gap, height), (255, 255, 255))
    for i, picture in enumerate(pictures):
        row.paste(picture, (i * (width + gap), 0))
    return row


class GuidedJob:
    """Guided backprop and guided Grad-CAM images per (image, class), at the original's resolution."""

    command = "guided"

    def __init__(self, loaded: LoadedModel, options: CamOptions):
        self.loaded, self.options = loaded, options
        self.targets = BatchTargets(loaded, options.target, options.classes, options.top_k)

    def settings(self) -> dict[str, Any]:
        return _settings(self.options, **self.options.target.settings())

    def output_patterns(self) -> list[str]:
        layer, suffix = safe_name(self.options.layer), image_suffix(self.options.file_format)
        explained = [self.options.target.file_part(c) for c in _class_patterns(self.options)]
        return [
            pattern
            for what in explained
            for pattern in (f"guided{what}{suffix}", f"guided-gradcam_{layer}{what}{suffix}")
        ]

    def compute(self, batch: list[PreparedImage]) -> GuidedBatch:
        options = self.options
        target, region_errors = self.targets(batch)
        result = compute_guided(
            self.loaded.module,
            model_batch(batch, self.loaded),
            layer=options.layer,
            classes=options.classes,
            top_k=options.top_k,
            output_key=self.loaded.output_key,
            target=target,
        )
        return GuidedBatch(
            guided=result.guided.float().cpu(),
            guided_gradcam=result.guided_gradcam.float().cpu(),
            classes=result.classes.cpu(),
            probabilities=result.probabilities.float().cpu(),
            region_errors=region_errors,
        )

    def write(self, item: PreparedImage, index: int, result: GuidedBatch) -> Record:
        options = self.options
        if not bool(torch.isfinite(result.probabilities[index]).all() and torch.isfinite(result.guided[index]).all()):
            return _not_finite(item, "class scores")
        if problem := _region_problem(result.region_errors, index):
            return _failed(item, problem)
        spec = options.target
        record = _record(self.loaded, item, result.probabilities[index], options)
        for k, class_index in enumerate(result.classes[index].tolist()):
            label = target_label(self.loaded, spec, class_index)
            probability = float(result.probabilities[index, class_index])
            shown_value = spec.caption_value(probability)
            for method, gradients in (("guided", result.guided), ("guided-gradcam", result.guided_gradcam)):
                picture = _gradient_picture(gradients[index, k], item)
                at_layer = "" if method == "guided" else f" @ {options.layer}"
                subject = shown_value if not spec.has_classes else f"{label} {shown_value}"
                picture, scale = _captioned(picture, f"{subject} | {method}{at_layer}", options)
                what = spec.file_part(class_index)
                name = f"{method}{what}" if method == "guided" else f"{method}_{safe_name(options.layer)}{what}"
                record.outputs.append(
                    _write_class_output(
                        picture,
                        options.out_dir / item.stem / f"{name}{image_suffix(options.file_format)}",
                        item,
                        method,
                        options.layer,
                        class_index,
                        label,
                        probability,
                        kind="guided",
                        scale=scale,
                        quality=options.quality,
                    )
                )
        return record


def _region_problem(errors: list[str | None] | None, index: int) -> str | None:
    """Why image ``index``'s --region or --mask does not fit it (``BatchTargets``), or None."""
    return errors[index] if errors else None


def _failed(item: PreparedImage, problem: str) -> Record:
    """The record of an input that failed (``problem``: what and how to fix it); the run goes on."""
    return Record(input=str(item.path), status="error", error=f"{shown(item.path)}: {problem}")


def _not_finite(item: PreparedImage, what: str) -> Record:
    """The record of an input whose results hold NaN or inf: no picture of garbage, and strict JSON."""
    return _failed(
        item,
        f"the model's {what} for this image are not finite (NaN or inf); check the model's weights and --mean/--std",
    )


def _settings(options: CamOptions | SaliencyOptions, **extra: Any) -> dict[str, Any]:
    classes = list(options.classes) if options.classes else None
    uncaptioned = {} if options.caption else {"caption": False}  # the default leaves earlier runs' keys as they were
    return {
        "layer": options.layer,
        "classes": classes,
        "top_k": None if classes else options.top_k,
        **uncaptioned,
        **_format_settings(options),
        **extra,
    }


def _format_settings(options: FmapOptions | CamOptions | SaliencyOptions) -> dict[str, Any]:
    """--format and --quality among the settings, only when not PNG (earlier runs' settings stay equal)."""
    if options.file_format == "png":
        return {}
    return {"format": options.file_format, "quality": options.quality or DEFAULT_QUALITY}


def _class_patterns(options: CamOptions | SaliencyOptions) -> list[str]:
    """The class part of output names: the given classes, or any class when the top-k decide."""
    return [str(c) for c in options.classes] if options.classes else ["*"]


def _record(loaded: LoadedModel, item: PreparedImage, probabilities: torch.Tensor, options: CamOptions) -> Record:
    """The record of one explained input; ``downscaled_from`` when its pictures are smaller than the file."""
    spec = options.target
    extra: dict[str, Any]
    if spec.kind == "similarity":
        extra = {"similarity": round(float(probabilities[0]), 6), "reference": spec.reference}
    else:
        extra = {"predictions": _predictions(loaded, probabilities, options.predictions, spec)}
    if item.original_size is not None:
        extra["downscaled_from"] = list(item.original_size)
    return Record(input=str(item.path), extra=extra)


def _write_class_output(
    picture: Image.Image,
    path: Path,
    item: PreparedImage,
    method: str,
    layer: str,
    class_index: int | None,
    label: str | None,
    probability: float | None,
    kind: str,
    scale: int = 1,
    quality: int | None = None,
) -> dict[str, Any]:
    """Write one explanation picture (PNG, JPEG or WebP by ``path``'s suffix; its metadata says what it shows)
    and describe it for the record (under "png", the key of every picture's path).

    ``class_index`` None: a class-independent map (Eigen-CAM). ``scale``: the picture is the
    original enlarged this many times (a small image, captioned).
    """
    metadata = {"hookviz:method": method, "hookviz:layer": layer, "hookviz:scale": str(scale)}
    if class_index is not None and label is not None and probability is not None:
        metadata |= {
            "hookviz:class": str(class_index),
            "hookviz:label": label,
            "hookviz:probability": f"{probability:.6f}",
        }
    metadata["hookviz:input"] = str(item.path)
    output = {
        "kind": kind,
        "method": method,
        "layer": layer,
        "class": class_index,
        "label": label,
        "score": None if probability is None else round(probability, 6),
        "png": str(write_image(picture, path, metadata, quality=quality)),
    }
    if scale != 1:
        output["scale"] = scale
    return output


def _captioned(picture: Image.Image, text: str, options: CamOptions) -> tuple[Image.Image, int]:
    """The picture with its caption (enlarged if small), or as it is with ``--no-caption``; and the enlargement."""
    return captioned(picture, text) if options.caption else (picture, 1)


def _empty_map_warning(
    item: PreparedImage, options: CamOptions, label: str, probabilities: torch.Tensor, class_independent: bool
) -> str:
    """Why a map came out constant, as far as can be told, and what to do about it."""
    subject = f"the {options.method} map" + ("" if class_independent else f" of {label}")
    if probabilities.numel() > 1 and float(probabilities.max() - probabilities.min()) < 1e-6:
        cause = (
            "the model gives every class the same score for this image, so no score depends on it "
            "(an untrained or zero-initialised head?); explain a trained model"
        )
    elif options.method in GRADIENT_METHODS:
        cause = "nothing at this layer raises the class score; try another layer (-l) or method (-m)"
    else:
        cause = "this layer's channels weigh to nothing here (a layer before its activation?); try another layer (-l)"
    return f"{shown(item.path)}: {subject} at {options.layer} is empty (the same value everywhere): {cause}"


def _gradient_picture(gradient: torch.Tensor, item: PreparedImage) -> Image.Image:
    """A guided gradient (3, h, w) drawn over the part of the original image the model saw; grey elsewhere."""
    pixels = gradient_image(gradient.float().cpu())
    if pixels.shape[0] == 1:  # a grayscale model's input gradient: shown in gray
        pixels = pixels.expand(3, -1, -1)
    placed = [heat_in_image(channel, item.view.box, item.size) for channel in pixels]
    picture = torch.stack([heat for heat, _ in placed])
    seen = placed[0][1]  # the same for every channel
    picture = torch.where(seen, picture, torch.full_like(picture, 0.5))
    return to_pil((picture * 255).round().clamp(0, 255).to(torch.uint8))


def _predictions(
    loaded: LoadedModel, probabilities: torch.Tensor, count: int, spec: TargetSpec | None = None
) -> list[dict]:
    top = probabilities.topk(min(count, probabilities.shape[0]))
    return [
        {"class": int(c), "label": target_label(loaded, spec or TargetSpec(), int(c)), "score": round(float(p), 6)}
        for p, c in zip(top.values, top.indices, strict=True)
    ]


# --- stats -------------------------------------------------------------------------------------------


class StatsJob:
    """Activation statistics: each batch updates the collector; no files per input (the CLI writes the summary)."""

    command = "stats"

    def __init__(self, loaded: LoadedModel, collector: StatsCollector):
        self.loaded, self.collector = loaded, collector
        self.paths: list[Path] = []  # the images measured, in order: image n of collector.top_activations()

    def settings(self) -> dict[str, Any]:
        return {"layers": list(self.collector.stats), "bins": self.collector.bins}

    def output_patterns(self) -> list[str]:
        return []

    def compute(self, batch: list[PreparedImage]) -> None:
        # A fixed-batch .pt2 gets a padded batch; only the real images count.
        self.collector.update(model_batch(batch, self.loaded), count=len(batch))
        self.paths.extend(item.path for item in batch)

    def write(self, item: PreparedImage, index: int, result: None) -> Record:
        return Record(input=str(item.path))


# --- pixel attribution (saliency) --------------------------------------------------------------------


@dataclass
class SaliencyOptions:
    """What ``SaliencyJob`` explains (see attribution.compute_attributions) and how it draws it."""

    out_dir: Path
    method: str = "smoothgrad"
    classes: Sequence[int] | None = None
    top_k: int = 1
    samples: int = 25
    noise: float = 0.15
    steps: int = 32
    baseline: str = "black"
    rule: str = "gausslegendre"
    seed: int = 0
    layer: str | None = None  # multiply by this layer's Grad-CAM map (guided Grad-CAM style)
    alpha: float = 0.8  # the heat's opacity where the heat is strongest
    cmap: str = "inferno"
    save_raw: bool = False
    batch_size: int = 8  # model inputs per forward pass, noisy samples and path points included
    predictions: int = 5
    caption: bool = True
    file_format: str = "png"  # png, jpg or webp (--format)
    quality: int | None = None  # JPEG/WebP quality (--quality; default output.DEFAULT_QUALITY)


class SaliencyJob:
    """Pixel attributions per (image, class), at the original's resolution: a heat overlay and the signed picture.

    Files: DIR/<stem>/<name>-heat_c<class>.png (|attribution| summed over channels, over the photo) and
    <name>_c<class>.png (the signed attribution, grey = 0), where <name> is the method, or
    <method>-gradcam_<layer> with a layer.
    """

    command = "saliency"

    def __init__(self, loaded: LoadedModel, options: SaliencyOptions):
        self.loaded, self.options = loaded, options
        self.layer_calls: int | None = None  # learnt from the first batch: see cams.compute_cams

    def _method_settings(self) -> dict[str, Any]:
        options = self.options
        return method_settings(
            options.method,
            samples=options.samples,
            noise=options.noise,
            steps=options.steps,
            baseline=options.baseline,
            rule=options.rule,
            seed=options.seed,
        )

    def settings(self) -> dict[str, Any]:
        options = self.options
        return _settings(
            options,
            method=options.method,
            **self._method_settings(),
            alpha=options.alpha,
            cmap=options.cmap,
            save_raw=options.save_raw,
        )

    def _name(self) -> tuple[str, str]:
        """(method as named in files and records, the file name stem before the class)."""
        options = self.options
        if options.layer is None:
            return options.method, safe_name(options.method)
        method = f"{options.method}-gradcam"
        return method, f"{safe_name(method)}_{safe_name(options.layer)}"

    def output_patterns(self) -> list[str]:
        _, name = self._name()
        heat = name.replace("_", "-heat_", 1) if "_" in name else f"{name}-heat"
        suffix = image_suffix(self.options.file_format)
        classes = _class_patterns(self.options)
        return [pattern for c in classes for pattern in (f"{heat}_c{c}{suffix}", f"{name}_c{c}{suffix}")]

    def compute(self, batch: list[PreparedImage]) -> AttributionBatch:
        options, loaded = self.options, self.loaded
        result = compute_attributions(
            loaded.module,
            model_batch(batch, loaded)[: len(batch)],  # each chunk of model inputs is padded for a fixed batch
            method=options.method,
            classes=options.classes,
            top_k=options.top_k,
            samples=options.samples,
            noise=options.noise,
            steps=options.steps,
            baseline=options.baseline,
            rule=options.rule,
            mean=loaded.preprocessing.mean,
            std=loaded.preprocessing.std,
            seed=options.seed,
            layer=options.layer,
            output_key=loaded.output_key,
            batch_size=options.batch_size,
            fixed_batch=loaded.fixed_batch,
            layer_calls=self.layer_calls,
        )
        self.layer_calls = result.layer_calls
        return replace(
            result,
            attributions=result.attributions.float().cpu(),
            classes=result.classes.cpu(),
            probabilities=result.probabilities.float().cpu(),
            cams=None,
        )

    def write(self, item: PreparedImage, index: int, result: AttributionBatch) -> Record:
        options = self.options
        attributions = result.attributions[index]
        if not bool(torch.isfinite(result.probabilities[index]).all() and torch.isfinite(attributions).all()):
            return _not_finite(item, "class scores or gradients")
        extra: dict[str, Any] = {
            "predictions": _predictions(self.loaded, result.probabilities[index], options.predictions)
        }
        if item.original_size is not None:
            extra["downscaled_from"] = list(item.original_size)
        record = Record(input=str(item.path), extra=extra)
        method, name = self._name()
        heat_name = name.replace("_", "-heat_", 1) if "_" in name else f"{name}-heat"
        described = _described(method, options.layer, self._method_settings())
        folder = options.out_dir / item.stem
        for k, class_index in enumerate(result.classes[index].tolist()):
            label, probability = self.loaded.label(class_index), float(result.probabilities[index, class_index])
            heat = attribution_heat(attributions[k])  # (h, w) at the model input's resolution
            placed, seen = heat_in_image(heat, item.view.box, item.size)
            shown_heat = heat_in_image(heat_scaled(heat), item.view.box, item.size)[0].clamp(0, 1)
            pictures = (
                ("heat", heat_name, to_pil(_heat_overlay(item.pixels, shown_heat, seen, options))),
                ("signed", name, _gradient_picture(attributions[k], item)),
            )
            for picture_kind, stem, picture in pictures:
                picture, scale = (
                    captioned(picture, f"{label} {probability:.1%} | {described} | {picture_kind}")
                    if options.caption
                    else (picture, 1)
                )
                metadata = {"hookviz:method": method, "hookviz:picture": picture_kind, "hookviz:scale": str(scale)}
                if options.layer is not None:
                    metadata["hookviz:layer"] = options.layer
                metadata |= {
                    "hookviz:class": str(class_index),
                    "hookviz:label": label,
                    "hookviz:probability": f"{probability:.6f}",
                    "hookviz:input": str(item.path),
                }
                output: dict[str, Any] = {
                    "kind": "saliency",
                    "method": method,
                    "picture": picture_kind,
                    "layer": options.layer,
                    "class": class_index,
                    "label": label,
                    "score": round(probability, 6),
                    **self._method_settings(),
                    "png": str(
                        write_image(
                            picture,
                            folder / f"{stem}_c{class_index}{image_suffix(options.file_format)}",
                            metadata,
                            quality=options.quality,
                        )
                    ),
                }
                if scale != 1:
                    output["scale"] = scale
                if picture_kind == "heat" and options.save_raw:
                    output["raw"] = str(write_npy(placed, folder / f"{stem}_c{class_index}.npy"))
                record.outputs.append(output)
        return record


def _described(method: str, layer: str | None, settings: dict[str, Any]) -> str:
    """The method and what it was run with, for a caption: ``smoothgrad (25 samples, noise 0.15)``."""
    parts = []
    if "samples" in settings:
        parts = [f"{settings['samples']} samples", f"noise {settings['noise']:g}"]
    elif "steps" in settings:
        parts = [f"{settings['steps']} steps", f"{settings['baseline']} baseline"]
    text = method + (f" ({', '.join(parts)})" if parts else "")
    return text + (f" @ {layer}" if layer is not None else "")


def _heat_overlay(
    pixels: torch.Tensor, heat: torch.Tensor, seen: torch.Tensor, options: SaliencyOptions
) -> torch.Tensor:
    """A sparse heat (H, W) in [0, 1] over the photo (3, H, W): each pixel's opacity is ``alpha`` times its heat, so
    the photo shows as it is where there is none (a constant opacity tinted the whole photo with the colormap's
    low end); what the model did not see is dimmed."""
    from .render import apply_colormap

    colours = apply_colormap(heat, options.cmap).float()
    weight = options.alpha * heat[None]
    blended = pixels.float() * (1 - weight) + colours * weight
    if not bool(seen.all()):
        blended = torch.where(seen, blended, pixels.float() * 0.35)
    return blended.round().clamp(0, 255).to(torch.uint8)
