"""What each image command does with a batch: run the method, then write one input's files and record.

A job plugs into the batch loop (pipeline.run_job) as a ``pipeline.Job``:
``compute`` runs the model on a batch in the calling thread, ``write`` renders
and writes one image's outputs in the writer thread and returns its ``Record``.
The methods themselves (fmaps, cams, guided, stats) know nothing of files.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from .cams import CamBatch, compute_cams, constant_maps
from .errors import shown
from .fmaps import channel_grid, selected_channels
from .forward import run_model
from .guided import GuidedBatch, compute_guided, gradient_image
from .hooks import capture
from .methods import CLASS_INDEPENDENT, GRADIENT_METHODS
from .models import LoadedModel
from .output import layer_file_names, safe_name, write_npy, write_png
from .pipeline import PreparedImage, Record, model_batch
from .render import captioned, heat_in_image, normalize_map, overlay, titled, to_pil
from .spatial import spatial_output, to_spatial
from .stats import StatsCollector

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
        }

    def output_patterns(self) -> list[str]:
        return [f"fmap_{name}.png" for name in layer_file_names(self.options.layers).values()]

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
                "png": str(write_png(picture, folder / f"{name}.png", metadata)),
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


class CamJob:
    """CAM overlays: one forward (and one batched backward) per batch; an overlay per (image, class)."""

    command = "gradcam"

    def __init__(self, loaded: LoadedModel, options: CamOptions):
        self.loaded, self.options = loaded, options
        self.layer_calls: int | None = None  # learnt from the first batch: see compute_cams

    def settings(self) -> dict[str, Any]:
        return _settings(
            self.options,
            method=self.options.method,
            alpha=self.options.alpha,
            cmap=self.options.cmap,
            save_raw=self.options.save_raw,
        )

    def output_patterns(self) -> list[str]:
        if self.options.method in CLASS_INDEPENDENT:
            return [f"{safe_name(self.options.method)}_{safe_name(self.options.layer)}.png"]
        return [
            f"{safe_name(self.options.method)}_{safe_name(self.options.layer)}_c{c}.png"
            for c in _class_patterns(self.options)
        ]

    def compute(self, batch: list[PreparedImage]) -> CamBatch:
        options = self.options
        result = compute_cams(
            self.loaded.module,
            model_batch(batch, self.loaded),
            layer=options.layer,
            method=options.method,
            classes=options.classes,
            top_k=options.top_k,
            output_key=self.loaded.output_key,
            score_batch_size=options.score_batch_size,
            layer_calls=self.layer_calls,
            fixed_batch=self.loaded.fixed_batch,
        )
        self.layer_calls = result.layer_calls
        maps = result.maps.float().cpu()
        return CamBatch(
            maps=normalize_map(maps),
            classes=result.classes.cpu(),
            probabilities=result.probabilities.float().cpu(),
            layer=result.layer,
            method=result.method,
            empty=constant_maps(maps),
        )

    def write(self, item: PreparedImage, index: int, result: CamBatch) -> Record:
        options = self.options
        if not bool(torch.isfinite(result.probabilities[index]).all() and torch.isfinite(result.maps[index]).all()):
            return _not_finite(item, "class scores")
        record = _record(self.loaded, item, result.probabilities[index], options)
        class_independent = options.method in CLASS_INDEPENDENT
        classes = result.classes[index].tolist()
        for k, class_index in enumerate(classes[:1] if class_independent else classes):
            heat, seen = heat_in_image(result.maps[index, k], item.view.box, item.size)
            label, probability = self.loaded.label(class_index), float(result.probabilities[index, class_index])
            picture = to_pil(overlay(item.pixels, heat, alpha=options.alpha, cmap=options.cmap, seen=seen))
            empty = result.empty is not None and bool(result.empty[index, k])
            method_at_layer = f"{options.method} @ {options.layer}" + (" (empty map)" if empty else "")
            name = f"{safe_name(options.method)}_{safe_name(options.layer)}"
            # A class-independent map names no class: one picture, and no class in its caption.
            named: tuple[int | None, str | None, float | None] = (None, None, None)
            caption = f"class-independent | {method_at_layer}"
            if not class_independent:
                named, caption = (class_index, label, probability), f"{label} {probability:.1%} | {method_at_layer}"
                name += f"_c{class_index}"
            picture, scale = _captioned(picture, caption, options)
            shown_class, shown_label, shown_probability = named
            output = _write_class_output(
                picture,
                options.out_dir / item.stem / f"{name}.png",
                item,
                options.method,
                options.layer,
                shown_class,
                shown_label,
                shown_probability,
                kind="cam",
                scale=scale,
            )
            if class_independent:
                output["class_independent"] = True
            if empty:
                output["empty"] = True
                output["warning"] = _empty_map_warning(
                    item, options, label, result.probabilities[index], class_independent
                )
            if options.save_raw:
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


class GuidedJob:
    """Guided backprop and guided Grad-CAM images per (image, class), at the original's resolution."""

    command = "guided"

    def __init__(self, loaded: LoadedModel, options: CamOptions):
        self.loaded, self.options = loaded, options

    def settings(self) -> dict[str, Any]:
        return _settings(self.options)

    def output_patterns(self) -> list[str]:
        layer = safe_name(self.options.layer)
        return [
            pattern
            for c in _class_patterns(self.options)
            for pattern in (f"guided_c{c}.png", f"guided-gradcam_{layer}_c{c}.png")
        ]

    def compute(self, batch: list[PreparedImage]) -> GuidedBatch:
        options = self.options
        result = compute_guided(
            self.loaded.module,
            model_batch(batch, self.loaded),
            layer=options.layer,
            classes=options.classes,
            top_k=options.top_k,
            output_key=self.loaded.output_key,
        )
        return GuidedBatch(
            guided=result.guided.float().cpu(),
            guided_gradcam=result.guided_gradcam.float().cpu(),
            classes=result.classes.cpu(),
            probabilities=result.probabilities.float().cpu(),
        )

    def write(self, item: PreparedImage, index: int, result: GuidedBatch) -> Record:
        options = self.options
        if not bool(torch.isfinite(result.probabilities[index]).all() and torch.isfinite(result.guided[index]).all()):
            return _not_finite(item, "class scores")
        record = _record(self.loaded, item, result.probabilities[index], options)
        for k, class_index in enumerate(result.classes[index].tolist()):
            label, probability = self.loaded.label(class_index), float(result.probabilities[index, class_index])
            for method, gradients in (("guided", result.guided), ("guided-gradcam", result.guided_gradcam)):
                picture = _gradient_picture(gradients[index, k], item)
                at_layer = "" if method == "guided" else f" @ {options.layer}"
                picture, scale = _captioned(picture, f"{label} {probability:.1%} | {method}{at_layer}", options)
                name = (
                    f"{method}_c{class_index}"
                    if method == "guided"
                    else f"{method}_{safe_name(options.layer)}_c{class_index}"
                )
                record.outputs.append(
                    _write_class_output(
                        picture,
                        options.out_dir / item.stem / f"{name}.png",
                        item,
                        method,
                        options.layer,
                        class_index,
                        label,
                        probability,
                        kind="guided",
                        scale=scale,
                    )
                )
        return record


def _not_finite(item: PreparedImage, what: str) -> Record:
    """The record of an input whose results hold NaN or inf: no picture of garbage, and strict JSON."""
    return Record(
        input=str(item.path),
        status="error",
        error=f"{shown(item.path)}: the model's {what} for this image are not finite (NaN or inf); "
        "check the model's weights and --mean/--std",
    )


def _settings(options: CamOptions, **extra: Any) -> dict[str, Any]:
    classes = list(options.classes) if options.classes else None
    uncaptioned = {} if options.caption else {"caption": False}  # the default leaves earlier runs' keys as they were
    return {
        "layer": options.layer,
        "classes": classes,
        "top_k": None if classes else options.top_k,
        **uncaptioned,
        **extra,
    }


def _class_patterns(options: CamOptions) -> list[str]:
    """The class part of output names: the given classes, or any class when the top-k decide."""
    return [str(c) for c in options.classes] if options.classes else ["*"]


def _record(loaded: LoadedModel, item: PreparedImage, probabilities: torch.Tensor, options: CamOptions) -> Record:
    """The record of one explained input; ``downscaled_from`` when its pictures are smaller than the file."""
    extra: dict[str, Any] = {"predictions": _predictions(loaded, probabilities, options.predictions)}
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
) -> dict[str, Any]:
    """Write one explanation PNG (its metadata says what it shows) and describe it for the record.

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
        "png": str(write_png(picture, path, metadata)),
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
    if float(probabilities.max() - probabilities.min()) < 1e-6:
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


def _predictions(loaded: LoadedModel, probabilities: torch.Tensor, count: int) -> list[dict]:
    top = probabilities.topk(min(count, probabilities.shape[0]))
    return [
        {"class": int(c), "label": loaded.label(int(c)), "score": round(float(p), 6)}
        for p, c in zip(top.values, top.indices, strict=True)
    ]


# --- stats -------------------------------------------------------------------------------------------


class StatsJob:
    """Activation statistics: each batch updates the collector; no files per input (the CLI writes the summary)."""

    command = "stats"

    def __init__(self, loaded: LoadedModel, collector: StatsCollector):
        self.loaded, self.collector = loaded, collector

    def settings(self) -> dict[str, Any]:
        return {"layers": list(self.collector.stats), "bins": self.collector.bins}

    def output_patterns(self) -> list[str]:
        return []

    def compute(self, batch: list[PreparedImage]) -> None:
        # A fixed-batch .pt2 gets a padded batch; only the real images count.
        self.collector.update(model_batch(batch, self.loaded), count=len(batch))

    def write(self, item: PreparedImage, index: int, result: None) -> Record:
        return Record(input=str(item.path))
