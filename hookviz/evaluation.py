"""The evaluate run: which map can be trusted? Every method at every layer scored on the same images, then ranked.

``EvaluateJob`` plugs into the batch loop (pipeline.run_job): per batch it computes each
(method, layer)'s maps once, scores all of them with the metrics of ``hookviz.metrics`` in
batched forward passes, and per image writes a PNG of the deletion and insertion curves and a
record with every map's numbers. ``summarize`` turns the records into a ranking (mean and 95%
bootstrap interval of each number per method and layer); ``summary_table``, ``summary_figure``
and ``summary_json`` show it.
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy
import torch
import torch.nn.functional as F
from PIL import Image

from .errors import InputError, UsageError, shown
from .metrics import (
    INSENSITIVE_SPEARMAN,
    LOWER_IS_BETTER,
    POINTING_TOLERANCE,
    TRUTH_METRICS,
    Scorer,
    cascading_randomization,
    confidence_change,
    deletion_insertion,
    energy_game,
    input_maps,
    pointing_game,
    road,
    saliency_maps,
    score_names,
)
from .models import LoadedModel
from .output import atomic_write, write_png
from .pipeline import PreparedImage, Record, model_batch
from .render import heat_in_image, normalize_map, overlay, to_pil
from .tables import format_table
from .targets import choose_classes

if TYPE_CHECKING:
    from matplotlib.figure import Figure

# The numbers that decide the overall rank (ROAD's MoRF and LeRF are shown, their difference ranks).
RANKED = ("deletion", "insertion", "drop", "increase", "road", "sanity_spearman", "pointing", "energy")
BOOTSTRAP_SAMPLES = 1000
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".gif")


# --- ground truth -----------------------------------------------------------------------------------


@dataclass
class Truth:
    """Where the object is in each image: boxes from ``--truth FILE.csv`` or masks from ``--truth-masks DIR``."""

    boxes: dict[str, list[tuple[tuple[float, float, float, float], str | None]]] = field(default_factory=dict)
    masks: Path | None = None

    def region(
        self, item: PreparedImage, class_index: int, loaded: LoadedModel, size: tuple[int, int]
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(truth, near) as (H, W) bool on the model input's grid, ``near`` with the pointing game's tolerance;
        None when the image has no truth (for this class). Raises InputError for a box outside the image."""
        height, width = size
        left, top, right, bottom = item.view.box
        scale_x, scale_y = width / (right - left), height / (bottom - top)
        if self.masks is not None:
            mask = self._mask(item)
            if mask is None:
                return None
            resized = mask.resize((width, height), Image.Resampling.BILINEAR, box=item.view.box)
            truth = torch.from_numpy(numpy.array(resized)) > 127
        else:
            boxes = self._boxes(item)
            if not boxes:
                return None
            truth = torch.zeros(height, width, dtype=torch.bool)
            xs = left + (torch.arange(width) + 0.5) / scale_x  # pixel centres in the original
            ys = top + (torch.arange(height) + 0.5) / scale_y
            image_width, image_height = item.original_size or item.size
            for (x0, y0, x1, y1), class_value in boxes:
                if x1 > image_width or y1 > image_height:
                    raise InputError(
                        f"{shown(item.path)}: truth box {x0:g},{y0:g},{x1:g},{y1:g} lies outside the image "
                        f"({image_width}x{image_height} pixels); boxes are x0,y0,x1,y1 in the image's pixels"
                    )
                if class_value is not None and loaded.class_index(class_value) != class_index:
                    continue
                factor = item.size[0] / image_width  # pixels reduced from a very large file
                inside_x = (xs >= x0 * factor) & (xs < x1 * factor)
                inside_y = (ys >= y0 * factor) & (ys < y1 * factor)
                truth |= inside_y[:, None] & inside_x[None, :]
            if not bool(truth.any()):
                return None
        reach = max(0, round(POINTING_TOLERANCE * min(scale_x, scale_y)))
        near = (
            F.max_pool2d(truth[None, None].float(), 2 * reach + 1, stride=1, padding=reach)[0, 0] > 0
            if reach
            else truth
        )
        return truth, near

    def _boxes(self, item: PreparedImage) -> list[tuple[tuple[float, float, float, float], str | None]]:
        for key in (os.path.realpath(item.path), str(item.path), item.path.name):
            if key in self.boxes:
                return self.boxes[key]
        return []

    def _mask(self, item: PreparedImage) -> Image.Image | None:
        assert self.masks is not None
        for suffix in IMAGE_SUFFIXES:
            path = self.masks / f"{item.path.stem}{suffix}"
            if path.is_file():
                mask = Image.open(path).convert("L")
                expected = item.original_size or item.size
                if mask.size != tuple(expected):
                    raise InputError(
                        f"{shown(path)}: the mask is {mask.size[0]}x{mask.size[1]} pixels but the image "
                        f"{shown(item.path.name)} is {expected[0]}x{expected[1]}; masks must have the image's size"
                    )
                return mask.resize(item.size, Image.Resampling.NEAREST) if mask.size != item.size else mask
        return None


def read_truth_boxes(path: Path) -> Truth:
    """``path,x0,y0,x1,y1[,class]`` rows (a header row is allowed) as a ``Truth``; a UsageError names a bad line."""
    boxes: dict[str, list[tuple[tuple[float, float, float, float], str | None]]] = {}
    try:
        with open(path, newline="", encoding="utf-8") as stream:
            rows = list(csv.reader(stream))
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"--truth {shown(path)}: cannot read it ({getattr(exc, 'strerror', None) or exc})") from None
    base = Path(path).parent
    for number, row in enumerate(rows, 1):
        if not row or not "".join(row).strip() or row[0].startswith("#"):
            continue
        if number == 1 and row[0].strip().lower() == "path":
            continue
        if len(row) not in (5, 6):
            raise UsageError(f"--truth {shown(path)} line {number}: expected path,x0,y0,x1,y1[,class]")
        try:
            x0, y0, x1, y1 = (float(value) for value in row[1:5])
        except ValueError:
            raise UsageError(f"--truth {shown(path)} line {number}: x0,y0,x1,y1 must be numbers (pixels)") from None
        if not (0 <= x0 < x1 and 0 <= y0 < y1):
            raise UsageError(
                f"--truth {shown(path)} line {number}: a box needs 0 <= x0 < x1 and 0 <= y0 < y1 (image pixels)"
            )
        name = row[0].strip()
        class_value = row[5].strip() if len(row) == 6 and row[5].strip() else None
        for key in {os.path.realpath(name), os.path.realpath(base / name)}:
            boxes.setdefault(key, []).append(((x0, y0, x1, y1), class_value))
        boxes.setdefault(Path(name).name, []).append(((x0, y0, x1, y1), class_value))
    return Truth(boxes=boxes)


# --- the job ---------------------------------------------------------------------------------------


@dataclass
class EvaluateOptions:
    """What ``EvaluateJob`` scores and where it writes."""

    out_dir: Path
    methods: list[str]
    layers: list[str]
    metrics: list[str]
    classes: Sequence[int] | None = None
    top_k: int = 1
    steps: int = 20
    truth: Truth | None = None
    chunk: int = 32  # perturbed inputs per forward pass
    seed: int = 0

    @property
    def entries(self) -> list[tuple[str, str | None]]:
        """(method, layer) pairs: every method at every layer; guided backprop once (it has no layer)."""
        pairs: list[tuple[str, str | None]] = []
        for method in self.methods:
            if method == "guided":
                pairs.append((method, None))
            else:
                pairs.extend((method, layer) for layer in self.layers)
        return pairs


@dataclass
class EvaluateBatch:
    """A batch's scores: ``scores[name][b, e, k]`` for image b, entry e (method, layer), class k."""

    entries: list[tuple[str, str | None]]
    classes: torch.Tensor  # (B, K)
    probabilities: torch.Tensor  # (B, num_classes)
    scores: dict[str, torch.Tensor]
    maps: torch.Tensor  # (B, E, K, H, W) at the model input's resolution, for the pictures
    fractions: torch.Tensor | None = None
    deletion: torch.Tensor | None = None  # (B, E, K, S + 1)
    insertion: torch.Tensor | None = None
    sanity: dict[int, Any] = field(default_factory=dict)  # entry -> SanityCurves
    errors: dict[int, str] = field(default_factory=dict)  # image -> why it failed


class EvaluateJob:
    """Per batch: each (method, layer)'s maps once, every metric in batched forward passes; per image a record
    with every map's numbers and ``evaluate_c<class>.png``, its deletion and insertion curves."""

    command = "evaluate"

    def __init__(self, loaded: LoadedModel, options: EvaluateOptions):
        self.loaded, self.options = loaded, options

    def settings(self) -> dict[str, Any]:
        options = self.options
        classes = list(options.classes) if options.classes else None
        return {
            "methods": options.methods,
            "layers": options.layers,
            "metrics": options.metrics,
            "classes": classes,
            "top_k": None if classes else options.top_k,
            "steps": options.steps,
            "truth": bool(options.truth),
            "seed": options.seed,
        }

    def output_patterns(self) -> list[str]:
        return ["evaluate_c*.png"]

    def compute(self, batch: list[PreparedImage]) -> EvaluateBatch:
        options, loaded = self.options, self.loaded
        model = loaded.module
        inputs = model_batch(batch, loaded)
        size = (int(inputs.shape[-2]), int(inputs.shape[-1]))
        scorer = Scorer(model, loaded.output_key, chunk=options.chunk, pad_to=loaded.fixed_batch)
        probabilities = scorer.all_probabilities(inputs)
        classes = choose_classes(probabilities, options.classes, options.top_k)
        entries = options.entries
        per_entry = [
            input_maps(
                saliency_maps(
                    model, inputs, classes, method=method, layer=layer, output_key=loaded.output_key, seed=options.seed
                ),
                size,
            )
            for method, layer in entries
        ]
        maps = torch.stack(per_entry, dim=1)  # (B, E, K, H, W)
        batch_size, count, k = maps.shape[:3]
        flat_maps = maps.flatten(1, 2)
        flat_classes = classes.repeat(1, count)
        scores: dict[str, torch.Tensor] = {}

        def shaped(values: torch.Tensor) -> torch.Tensor:
            return values.float().cpu().view(batch_size, count, k, *values.shape[2:])

        result = EvaluateBatch(
            entries=entries, classes=classes.cpu(), probabilities=probabilities.cpu(), scores=scores, maps=maps.cpu()
        )
        metrics = options.metrics
        if "deletion" in metrics or "insertion" in metrics:
            curves = deletion_insertion(
                scorer,
                inputs,
                flat_maps,
                flat_classes,
                steps=options.steps,
                probabilities=probabilities,
                seed=options.seed,
            )
            # Both curves even when one metric was asked for: the per-image PNG shows them side by side.
            assert curves.deletion is not None and curves.insertion is not None
            result.fractions = curves.fractions
            result.deletion, result.insertion = shaped(curves.deletion), shaped(curves.insertion)
            if "deletion" in metrics:
                scores["deletion"] = shaped(curves.area(curves.deletion))
            if "insertion" in metrics:
                scores["insertion"] = shaped(curves.area(curves.insertion))
        if "drop" in metrics or "increase" in metrics:
            drop, increase = confidence_change(scorer, inputs, flat_maps, flat_classes, probabilities)
            if "drop" in metrics:
                scores["drop"] = shaped(drop)
            if "increase" in metrics:
                scores["increase"] = shaped(increase)
        if "road" in metrics:
            removed = road(scorer, inputs, flat_maps, flat_classes, seed=options.seed)
            scores["road"] = shaped(removed.difference)
            scores["road_morf"] = shaped(removed.morf.mean(dim=-1))
            scores["road_lerf"] = shaped(removed.lerf.mean(dim=-1))
        if "sanity" in metrics:
            spearman, ssim = [], []
            for e, (method, layer) in enumerate(entries):
                curves_e = cascading_randomization(
                    model,
                    inputs,
                    classes,
                    method=method,
                    layer=layer,
                    original=maps[:, e],
                    output_key=loaded.output_key,
                    seed=options.seed,
                )
                result.sanity[e] = curves_e
                spearman.append(curves_e.spearman.mean(dim=-1))
                ssim.append(curves_e.ssim.mean(dim=-1))
            scores["sanity_spearman"] = torch.stack(spearman, dim=1).float().cpu()
            scores["sanity_ssim"] = torch.stack(ssim, dim=1).float().cpu()
        if any(metric in metrics for metric in TRUTH_METRICS) and options.truth is not None:
            pointing = torch.full((batch_size, count, k), math.nan)
            energy = torch.full((batch_size, count, k), math.nan)
            for b, item in enumerate(batch):
                for j, class_index in enumerate(classes[b].tolist()):
                    try:
                        region = options.truth.region(item, class_index, loaded, size)
                    except (InputError, UsageError) as exc:
                        result.errors[b] = str(exc)
                        break
                    if region is None:
                        continue
                    truth, near = region
                    image_maps = maps[b, :, j].cpu()[None]  # (1, E, H, W)
                    pointing[b, :, j] = pointing_game(image_maps, truth[None], near[None])[0]
                    energy[b, :, j] = energy_game(image_maps, truth[None])[0]
            if "pointing" in metrics:
                scores["pointing"] = pointing
            if "energy" in metrics:
                scores["energy"] = energy
        return result

    def write(self, item: PreparedImage, index: int, result: EvaluateBatch) -> Record:
        if index in result.errors:
            return Record(input=str(item.path), status="error", error=result.errors[index])
        if not bool(torch.isfinite(result.probabilities[index]).all()):
            return Record(
                input=str(item.path),
                status="error",
                error=f"{shown(item.path)}: the model's class scores for this image are not finite (NaN or inf); "
                "check the model's weights and --mean/--std",
            )
        loaded, options = self.loaded, self.options
        record = Record(input=str(item.path), extra={"predictions": _predictions(loaded, result.probabilities[index])})
        for j, class_index in enumerate(result.classes[index].tolist()):
            label = loaded.label(class_index)
            probability = float(result.probabilities[index, class_index])
            scored = []
            for e, (method, layer) in enumerate(result.entries):
                numbers: dict[str, Any] = {"method": method, "layer": layer}
                for name in score_names(options.metrics):
                    if name in result.scores:
                        value = float(result.scores[name][index, e, j])
                        numbers[name] = round(value, 6) if math.isfinite(value) else None
                if result.deletion is not None and result.insertion is not None:
                    numbers["deletion_curve"] = [round(float(v), 5) for v in result.deletion[index, e, j]]
                    numbers["insertion_curve"] = [round(float(v), 5) for v in result.insertion[index, e, j]]
                if e in result.sanity:
                    curves = result.sanity[e]
                    numbers["sanity_curve"] = {
                        "blocks": curves.blocks,
                        "spearman": [round(float(v), 5) for v in curves.spearman[index, j]],
                        "ssim": [round(float(v), 5) for v in curves.ssim[index, j]],
                    }
                scored.append(numbers)
            picture = curves_picture(item, result, index, j, label, probability)
            path = options.out_dir / item.stem / f"evaluate_c{class_index}.png"
            metadata = {"hookviz:class": str(class_index), "hookviz:label": label, "hookviz:input": str(item.path)}
            record.outputs.append(
                {
                    "kind": "evaluate",
                    "class": class_index,
                    "label": label,
                    "score": round(probability, 6),
                    "png": str(write_png(picture, path, metadata)),
                    "maps": scored,
                }
            )
        return record


def _predictions(loaded: LoadedModel, probabilities: torch.Tensor, count: int = 5) -> list[dict[str, Any]]:
    top = probabilities.topk(min(count, probabilities.shape[0]))
    return [
        {"class": int(c), "label": loaded.label(int(c)), "score": round(float(p), 6)}
        for p, c in zip(top.values, top.indices, strict=True)
    ]


def entry_name(method: str, layer: str | None) -> str:
    """``method @ layer``, or the method alone when it has no layer."""
    return method if layer is None else f"{method} @ {layer}"


# --- pictures --------------------------------------------------------------------------------------

THUMB = 150  # pixels: the height of each map's thumbnail in the curves picture


def curves_picture(
    item: PreparedImage, result: EvaluateBatch, index: int, k: int, label: str, probability: float
) -> Image.Image:
    """One image's maps as small overlays (framed in each method's colour, with its deletion and insertion areas)
    above its deletion and insertion curves in the same colours."""
    from matplotlib.figure import Figure

    entries = result.entries
    thumbs = _thumbnails(item, result.maps[index, :, k])
    has_curves = result.deletion is not None and result.insertion is not None and result.fractions is not None
    width, left, right, gap = 10.0, 0.6, 0.2, 0.12
    columns = max(4, min(len(entries), 5))
    rows = math.ceil(len(entries) / columns)
    thumb_width = (width - left - right - gap * (columns - 1)) / columns
    thumb_height = thumb_width * thumbs[0].height / thumbs[0].width
    title, caption, curve_height, below = 0.5, 0.42, 3.0 if has_curves else 0.0, 0.55 if has_curves else 0.1
    height = title + rows * (thumb_height + caption) + (0.35 + curve_height if has_curves else 0) + below
    figure = Figure(figsize=(width, height), dpi=100)
    figure.suptitle(
        f"{item.path.name}: {label} ({probability:.1%})", fontsize=12, fontweight="bold", y=1 - 0.12 / height
    )
    colours = _colours(len(entries))
    areas: dict[str, torch.Tensor] = {}
    if has_curves:
        assert result.deletion is not None and result.insertion is not None and result.fractions is not None
        for name, curves in (("del", result.deletion), ("ins", result.insertion)):
            areas[name] = torch.trapezoid(curves[index, :, k], result.fractions.to(curves), dim=-1)
    for e, ((method, layer), thumb) in enumerate(zip(entries, thumbs, strict=True)):
        row, column = divmod(e, columns)
        x = left + column * (thumb_width + gap)
        y = height - title - row * (thumb_height + caption) - caption - thumb_height
        ax = figure.add_axes((x / width, y / height, thumb_width / width, thumb_height / height))
        ax.imshow(thumb)
        ax.set_xticks([])
        ax.set_yticks([])
        for spine in ax.spines.values():
            spine.set_color(colours[e])
            spine.set_linewidth(3)
        text = entry_name(method, layer)
        if areas:
            text += f"\ndeletion {float(areas['del'][e]):.3f}  insertion {float(areas['ins'][e]):.3f}"
        ax.set_title(text, fontsize=8, color=colours[e], pad=3)
    if has_curves:
        assert result.deletion is not None and result.insertion is not None and result.fractions is not None
        fractions = result.fractions.tolist()
        panel = (width - left - right - 0.7) / 2
        for column, (name, curves, better, moved) in enumerate(
            (
                ("deletion", result.deletion, "lower", "removed (blurred)"),
                ("insertion", result.insertion, "higher", "restored into the blurred image"),
            )
        ):
            x = left + column * (panel + 0.7)
            ax = figure.add_axes((x / width, below / height, panel / width, curve_height / height))
            for e, (method, _) in enumerate(entries):
                style = "--" if method == "random" else "-"
                ax.plot(fractions, curves[index, e, k].tolist(), style, color=colours[e], linewidth=1.6)
            ax.set_xlim(0, 1)
            ax.set_ylim(0, 1.02)
            ax.set_xlabel(f"fraction of pixels {moved}, most important first", fontsize=8)
            ax.set_ylabel(f"P({label})", fontsize=8)
            ax.set_title(f"{name} (area: {better} is better)", fontsize=10)
            ax.tick_params(labelsize=8)
            ax.grid(alpha=0.3)
    return _render(figure)


def _thumbnails(item: PreparedImage, maps: torch.Tensor) -> list[Image.Image]:
    """Each map (E, H, W) over the part of the original the model saw, as a small picture."""
    picture = to_pil(item.pixels)
    factor = THUMB * 2 / picture.height
    small = picture.resize((max(1, round(picture.width * factor)), THUMB * 2), Image.Resampling.BILINEAR)
    left, top, right, bottom = item.view.box
    box = (left * factor, top * factor, right * factor, bottom * factor)
    pixels = torch.from_numpy(numpy.asarray(small).copy()).permute(2, 0, 1)
    thumbs = []
    for heat_map in normalize_map(maps.float()):
        heat, seen = heat_in_image(heat_map, box, small.size)
        thumbs.append(to_pil(overlay(pixels, heat, alpha=0.5, cmap="jet", seen=seen)))
    return thumbs


def _colours(count: int) -> list[str]:
    palette = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22"]
    return [palette[i % len(palette)] for i in range(count)]


def _render(figure: Figure) -> Image.Image:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    return Image.frombuffer("RGBA", canvas.get_width_height(), canvas.buffer_rgba()).convert("RGB")


# --- the summary -----------------------------------------------------------------------------------


@dataclass
class Estimate:
    """A number's mean over the maps with a 95% bootstrap interval (over images), and its rank (1 = best)."""

    mean: float
    low: float
    high: float
    count: int
    rank: int = 0


@dataclass
class SummaryRow:
    method: str
    layer: str | None
    scores: dict[str, Estimate]
    mean_rank: float = math.nan
    rank: int = 0
    flags: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return entry_name(self.method, self.layer)


@dataclass
class Summary:
    """The ranking: rows sorted best first, and the names of the numbers they carry."""

    rows: list[SummaryRow]
    scores: list[str]
    images: int


def bootstrap_interval(values: torch.Tensor, samples: int = BOOTSTRAP_SAMPLES, seed: int = 0) -> tuple[float, float]:
    """95% percentile bootstrap interval of the mean of ``values`` (resampled with replacement, seeded)."""
    if values.numel() < 2:
        value = float(values.mean()) if values.numel() else math.nan
        return value, value
    generator = torch.Generator().manual_seed(seed)
    picks = torch.randint(values.numel(), (samples, values.numel()), generator=generator)
    means = values.double()[picks].mean(dim=1)
    low, high = torch.quantile(means, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return low, high


def summarize(records: Iterable[Mapping[str, Any]], scores: Sequence[str]) -> Summary:
    """Per (method, layer): each number's mean and 95% bootstrap interval over the maps of the ``records``
    (JSON records of evaluate runs, ok or skipped), its rank per number and the overall rank (mean rank)."""
    values: dict[tuple[str, str | None], dict[str, list[float]]] = {}
    images = 0
    for record in records:
        if record.get("status") not in ("ok", "skipped"):
            continue
        images += 1
        for output in _scored_maps(record):
            found = values.setdefault((output["method"], output.get("layer")), {})
            for name in scores:
                value = output.get(name)
                if isinstance(value, (int, float)) and math.isfinite(value):
                    found.setdefault(name, []).append(float(value))
    rows = []
    for (method, layer), numbers in values.items():
        estimates = {}
        for name, listed in numbers.items():
            tensor = torch.tensor(listed, dtype=torch.float64)
            low, high = bootstrap_interval(tensor)
            estimates[name] = Estimate(mean=float(tensor.mean()), low=low, high=high, count=len(listed))
        rows.append(SummaryRow(method=method, layer=layer, scores=estimates))
    for name in scores:
        scored = [row for row in rows if name in row.scores]
        sign = 1 if name in LOWER_IS_BETTER else -1
        for row in scored:
            row.scores[name].rank = 1 + sum(
                sign * other.scores[name].mean < sign * row.scores[name].mean for other in scored
            )
    for row in rows:
        ranks = [row.scores[name].rank for name in RANKED if name in row.scores]
        row.mean_rank = sum(ranks) / len(ranks) if ranks else math.nan
        sanity = row.scores.get("sanity_spearman")
        if sanity is not None and sanity.mean >= INSENSITIVE_SPEARMAN:
            row.flags.append("insensitive")
    rows.sort(key=lambda row: (math.isnan(row.mean_rank), row.mean_rank, row.name))
    for row in rows:
        row.rank = 1 + sum(other.mean_rank < row.mean_rank for other in rows)
    return Summary(
        rows=rows, scores=[name for name in scores if any(name in row.scores for row in rows)], images=images
    )


def _scored_maps(record: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """Every scored map of an evaluate record: its method, layer and numbers."""
    return [
        scored
        for output in record.get("outputs", [])
        if isinstance(output, Mapping) and output.get("kind") == "evaluate"
        for scored in output.get("maps", [])
        if isinstance(scored, Mapping)
    ]


def _arrow(name: str) -> str:
    return "↓" if name in LOWER_IS_BETTER else "↑"


def summary_table(summary: Summary) -> str:
    """The ranking as an aligned table: rank (* the best), method @ layer, each ranked number as mean [95% interval]
    (ROAD's MoRF and LeRF are left to the JSON and the picture)."""
    shown = [name for name in summary.scores if name in RANKED]  # road's MoRF and LeRF are in the JSON and picture
    header = ["rank", "method", *(f"{name} {_arrow(name)}" for name in shown)]
    lines = [header]
    for row in summary.rows:
        cells = [f"{row.rank}{' *' if row.rank == 1 else ''}", row.name + ("  (insensitive!)" if row.flags else "")]
        for name in shown:
            estimate = row.scores.get(name)
            cells.append("" if estimate is None else f"{estimate.mean:.3f} [{estimate.low:.2f}, {estimate.high:.2f}]")
        lines.append(cells)
    return format_table(lines, right=list(range(2, len(header))))


def summary_json(summary: Summary) -> dict[str, Any]:
    """The ranking as plain JSON: per row its rank, mean rank, flags and per number mean, interval, count, rank."""
    return {
        "type": "summary",
        "images": summary.images,
        "scores": summary.scores,
        "lower_is_better": [name for name in summary.scores if name in LOWER_IS_BETTER],
        "rows": [
            {
                "rank": row.rank,
                "method": row.method,
                "layer": row.layer,
                "mean_rank": round(row.mean_rank, 4) if math.isfinite(row.mean_rank) else None,
                "flags": row.flags,
                "scores": {
                    name: {
                        "mean": _rounded(estimate.mean),
                        "low": _rounded(estimate.low),
                        "high": _rounded(estimate.high),
                        "count": estimate.count,
                        "rank": estimate.rank,
                    }
                    for name, estimate in row.scores.items()
                },
            }
            for row in summary.rows
        ],
    }


def _rounded(value: float) -> float | None:
    return round(value, 6) if math.isfinite(value) else None


def write_summary(summary: Summary, out_dir: Path) -> tuple[Path, Path]:
    """DIR/evaluate.json and DIR/evaluate.png, written atomically; returns their paths."""
    json_path = Path(out_dir) / "evaluate.json"
    with atomic_write(json_path, "w", encoding="utf-8") as stream:
        stream.write(json.dumps(summary_json(summary), indent=1) + "\n")
    picture = write_png(summary_figure(summary), Path(out_dir) / "evaluate.png", {"hookviz:command": "evaluate"})
    return json_path, picture


def summary_figure(summary: Summary) -> Image.Image:
    """Methods x metrics: per number a panel of bars (mean, 95% bootstrap interval) in rank order; the best bar of
    each panel red, the random baseline grey, a flagged method marked (!)."""
    from matplotlib.figure import Figure

    names = summary.scores or ["none"]
    entries = max(1, len(summary.rows))
    columns = min(3, len(names))
    rows = math.ceil(len(names) / columns)
    labels = [f"{row.rank}. {row.name}" + (" (!)" if row.flags else "") for row in summary.rows]
    label_width = 0.3 + 0.065 * max((len(label) for label in labels), default=10)
    width, title, panel_height, gap = 10.5, 0.75, 0.45 + 0.26 * entries, 0.6
    height = title + rows * panel_height + (rows - 1) * gap + 0.35
    figure = Figure(figsize=(width, height), dpi=100)
    figure.suptitle(
        f"Which map to trust: {len(summary.rows)} method(s) on {summary.images} image(s)",
        fontsize=12,
        fontweight="bold",
        y=1 - 0.1 / height,
    )
    figure.text(
        0.5,
        1 - 0.42 / height,
        "rows in overall rank order (1 = best); bars: mean over images, 95% bootstrap interval; red: best per metric",
        ha="center",
        fontsize=8,
        color="0.3",
    )
    panel_width = (width - label_width - 0.25 - 0.25 * (columns - 1)) / columns
    for number, name in enumerate(names):
        row_index, column = divmod(number, columns)
        x = label_width + column * (panel_width + 0.25)
        y = height - title - (row_index + 1) * panel_height - row_index * gap
        ax = figure.add_axes((x / width, y / height, panel_width / width, (panel_height - 0.3) / height))
        positions = list(range(len(summary.rows)))
        estimates = [row.scores.get(name) for row in summary.rows]
        means = [e.mean if e else math.nan for e in estimates]
        below = [e.mean - e.low if e else 0.0 for e in estimates]
        above = [e.high - e.mean if e else 0.0 for e in estimates]
        colours = [
            "#d62728" if e is not None and e.rank == 1 else "#9e9e9e" if row.method == "random" else "#1f77b4"
            for row, e in zip(summary.rows, estimates, strict=True)
        ]
        ax.barh(
            positions,
            means,
            xerr=[below, above],
            color=colours,
            height=0.7,
            error_kw={"elinewidth": 1, "capsize": 2, "ecolor": "0.2"},
        )
        ax.set_yticks(positions)
        ax.set_yticklabels(labels if column == 0 else [], fontsize=8)
        ax.set_ylim(len(positions) - 0.5, -0.5)
        ax.set_title(
            f"{name} {_arrow(name)} ({'lower' if name in LOWER_IS_BETTER else 'higher'} is better)", fontsize=9
        )
        ax.tick_params(axis="x", labelsize=7)
        ax.grid(axis="x", alpha=0.3)
        ax.set_axisbelow(True)
    return _render(figure)


def sanity_figure(records: Iterable[Mapping[str, Any]]) -> Image.Image | None:
    """The cascading randomization curves: mean Spearman correlation with the original map against the blocks
    randomized, one line per method (None when no record has them)."""
    from matplotlib.figure import Figure

    curves: dict[str, list[list[float]]] = {}
    blocks: list[str] = []
    for record in records:
        for output in _scored_maps(record):
            curve = output.get("sanity_curve")
            if curve:
                blocks = curve["blocks"]
                curves.setdefault(entry_name(output["method"], output.get("layer")), []).append(curve["spearman"])
    if not curves:
        return None
    figure = Figure(figsize=(8, 4.2), dpi=100)
    ax = figure.add_subplot()
    colours = _colours(len(curves))
    for (name, lines), colour in zip(curves.items(), colours, strict=True):
        mean = torch.tensor(lines).mean(dim=0)
        ax.plot(range(1, len(mean) + 1), mean.tolist(), "o-", color=colour, label=name)
    ax.set_xticks(range(1, len(blocks) + 1))
    ax.set_xticklabels(blocks, rotation=30, ha="right", fontsize=8)
    ax.axhline(INSENSITIVE_SPEARMAN, color="0.5", linestyle=":", linewidth=1)
    ax.set_ylim(-1, 1.05)
    ax.set_xlabel("randomized from the output down to (cumulative)")
    ax.set_ylabel("Spearman correlation with the original map")
    ax.set_title("Sanity check (Adebayo et al.): a faithful map changes when the model is randomized", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    figure.subplots_adjust(bottom=0.28, left=0.1, right=0.98, top=0.9)
    return _render(figure)
