"""``hookviz filters``: the picture each channel of a layer (or each class) responds to most; ``hookviz dream``."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from .options import ModelArgs, json_option, model_options, out_dir_option, overwrite_option, quiet_option
from .report import note, reports_errors, say
from .runs import check_classes, load, note_repeated_layers

if TYPE_CHECKING:
    from ..filters import Settings
    from ..models import LoadedModel

# The library's defaults (hookviz.filters.Settings), repeated here so that --help does not import torch;
# tests/test_filters.py checks that they agree.
DEFAULT_STEPS = 64
DEFAULT_LR = 0.05
DEFAULT_JITTER = 16
DEFAULT_BATCH = 16
DEFAULT_DREAM_OCTAVES = 4
DEFAULT_DREAM_STEPS = 10
DEFAULT_DREAM_LR = 0.01
IMAGE_BATCH = 8  # images per forward pass when IMAGES choose the channels


@click.command()
@click.argument("model")
@click.argument("images", nargs=-1)
@click.option(
    "-l", "--layer", "layer_names", multiple=True, metavar="NAME", help="Layer whose channels to draw (repeatable)."
)
@click.option(
    "-f",
    "--channels",
    metavar="LIST",
    help="Channels to draw, e.g. 0-15,42 (default: the 16 most active on IMAGES, else the first 16).",
)
@click.option(
    "-c",
    "--class",
    "class_values",
    multiple=True,
    metavar="C",
    help="Draw the picture of a class instead: an index or a label name (repeatable).",
)
@click.option("--neuron", is_flag=True, help="Maximize the activation at the map's centre, not its mean.")
@click.option("--steps", type=click.IntRange(1, 100_000), default=DEFAULT_STEPS, show_default=True, metavar="N")
@click.option("--lr", type=click.FloatRange(0, min_open=True), default=DEFAULT_LR, show_default=True, metavar="X")
@click.option(
    "--jitter",
    type=click.IntRange(0, 1000),
    default=DEFAULT_JITTER,
    show_default=True,
    metavar="PX",
    help="Random shift of the picture at each step, in pixels (with random scale and rotation).",
)
@click.option("--seed", type=int, default=0, show_default=True, help="The same seed gives the same pictures.")
@click.option(
    "--batch-size",
    type=click.IntRange(min=1),
    default=DEFAULT_BATCH,
    show_default=True,
    metavar="N",
    help="Pictures optimized at once (memory grows with it).",
)
@click.option(
    "--precision",
    type=click.Choice(["auto", "float32", "bfloat16"]),
    default="auto",
    show_default=True,
    help="Arithmetic of the ascent: auto is bfloat16 on a CPU with native bfloat16 (1.3-2x faster on "
    "EfficientNet-Lite0, the same kind of pictures), else float32. Activations are always reported in float32.",
)
@click.option("--save-each", is_flag=True, help="Also write one PNG per channel (or class).")
@click.option(
    "--html",
    is_flag=True,
    help="Also write DIR/index.html, a gallery of each grid and each channel's (or class's) picture "
    "(implies --save-each).",
)
@out_dir_option("Output directory: DIR/filters_<layer>.png, or DIR/classes.png with --class.")
@overwrite_option("Replace existing outputs (without it, existing outputs are an error).")
@json_option("Print one JSON object per channel (or class) on stdout (JSON Lines).")
@quiet_option
@model_options
@reports_errors
def filters(
    model: str,
    images: tuple[str, ...],
    layer_names: tuple[str, ...],
    channels: str | None,
    class_values: tuple[str, ...],
    neuron: bool,
    steps: int,
    lr: float,
    jitter: int,
    seed: int,
    batch_size: int,
    precision: str,
    save_each: bool,
    html: bool,
    out_dir: Path,
    overwrite: bool,
    as_json: bool,
    quiet: bool,
    model_args: ModelArgs,
) -> None:
    """Draw what each channel of a layer responds to most: a picture optimized to maximize its mean activation.

    The pictures are optimized as Fourier coefficients in a decorrelated colour space,
    seen at each step through a random shift, scale and rotation (as lucid and lucent do),
    so they show textures and object parts instead of noise. The picture's size is the
    model's input size (--size). With --class, each picture maximizes a class score
    instead (Simonyan et al., 2014). IMAGES, if given, choose the channels (the most
    active on them; with -f, the listed ones) and give each channel's maximum over them,
    the natural_max of the JSON records: what the picture's activation is to be compared with.

    \b
    Examples:
      hookviz filters out/efficientnet_lite0.pt2 -l _blocks.12 -f 0-3 --steps 16
      hookviz filters resnet18 sample_images/ -l layer2 --steps 8      # the 16 most active channels on the photos
      hookviz filters resnet18 -l layer3 -f 0-7,42 --steps 8 --save-each --json | jq .activation
      hookviz filters out/efficientnet_lite0.pt2 --labels imagenet -c tabby -c goldfish --steps 24
      hookviz filters out/efficientnet_lite0.pt2 sample_images/ -l _blocks.6 -f 0-7 --html -o filters
    """
    from ..errors import UsageError
    from ..filters import Settings

    if not layer_names and not class_values:
        raise UsageError("name a layer with -l (see 'hookviz layers MODEL'), or classes with --class")
    if layer_names and class_values:
        raise UsageError("give either -l (channels of a layer) or --class (classes), not both")
    if class_values and (channels is not None or neuron or images):
        raise UsageError("--class draws whole classes: drop -f, --neuron and IMAGES")
    settings = Settings(steps=steps, lr=lr, jitter=jitter, seed=seed, batch_size=batch_size, precision=precision)
    loaded = load(model, model_args, quiet)
    gallery = _Gallery(loaded, settings) if html else None
    save_each = save_each or html
    if class_values:
        labels_given = model_args.labels is not None
        _draw_classes(
            loaded, class_values, labels_given, settings, out_dir, save_each, overwrite, as_json, quiet, gallery
        )
    else:
        _draw_layers(
            loaded,
            layer_names,
            images,
            channels,
            neuron,
            settings,
            out_dir,
            save_each,
            overwrite,
            as_json,
            quiet,
            gallery,
        )
    if gallery is not None:
        gallery.write(out_dir, quiet)


def _draw_layers(
    loaded: LoadedModel,
    layer_names: tuple[str, ...],
    images: tuple[str, ...],
    channels: str | None,
    neuron: bool,
    settings: Settings,
    out_dir: Path,
    save_each: bool,
    overwrite: bool,
    as_json: bool,
    quiet: bool,
    gallery: _Gallery | None = None,
) -> None:
    import torch

    from ..errors import UsageError
    from ..filters import (
        DEFAULT_CHANNELS,
        channel_activations,
        most_active_channels,
        parse_channels,
        picture_grid,
        probe_layer,
        to_image,
        visualize_channels,
    )
    from ..hooks import resolve_layers
    from ..images import collect_inputs, load_image, preprocess
    from ..output import layer_file_names, prepare_output_dir
    from ..render import titled

    names = list(dict.fromkeys(layer_names))
    resolve_layers(loaded.module, names)
    if channels is not None:
        parse_channels(channels)  # a malformed list fails before any work
    if not quiet:
        note_repeated_layers(loaded, names)
    activity: dict[str, torch.Tensor] = {}  # per layer, (images, channels): each channel's activation on each image
    if images:  # they choose the channels (without -f), and give each channel's natural maximum
        paths = collect_inputs(images)
        if not paths:
            raise UsageError("no images found in IMAGES; give image files or folders, or none for the first channels")
        rows: dict[str, list[torch.Tensor]] = {layer: [] for layer in names}
        for start in range(0, len(paths), IMAGE_BATCH):  # memory stays flat however many images
            chunk = paths[start : start + IMAGE_BATCH]
            batch = torch.stack([preprocess(load_image(path), loaded.preprocessing) for path in chunk])
            for layer in names:
                rows[layer].append(
                    channel_activations(
                        loaded.module,
                        layer,
                        batch,
                        preprocessing=loaded.preprocessing,
                        neuron=neuron,
                        fixed_batch=loaded.fixed_batch,
                    )
                )
        activity = {layer: torch.cat(found) for layer, found in rows.items()}
    files = layer_file_names(names)
    plans = []
    for layer in names:
        probe = probe_layer(loaded.module, layer, loaded.preprocessing, fixed_batch=loaded.fixed_batch)
        if channels is not None:
            chosen = parse_channels(channels, probe.channels, layer)
        elif layer in activity:
            chosen = most_active_channels(activity[layer], DEFAULT_CHANNELS)
        else:
            chosen = list(range(min(DEFAULT_CHANNELS, probe.channels)))
        grid_path = out_dir / f"filters_{files[layer]}.png"
        each = {c: out_dir / f"filters_{files[layer]}_c{c}.png" for c in chosen} if save_each else {}
        plans.append((layer, probe.channels, chosen, grid_path, each))
    _refuse_existing([path for plan in plans for path in (plan[3], *plan[4].values())], overwrite)
    prepare_output_dir(out_dir)
    for layer, count, chosen, grid_path, each in plans:
        started = time.perf_counter()
        with _step_bar(len(chosen) * settings.steps, quiet) as advance:
            result = visualize_channels(
                loaded.module,
                layer,
                chosen,
                preprocessing=loaded.preprocessing,
                settings=settings,
                neuron=neuron,
                fixed_batch=loaded.fixed_batch,
                progress=advance,
            )
        grid = picture_grid(result.images, [str(c) for c in chosen])
        title = f"{layer}: {len(chosen)} of {count} channels{' (centre)' if neuron else ''}, {settings.steps} steps"
        _write(titled(grid, title), grid_path, {"hookviz:layer": layer, "hookviz:channels": ",".join(map(str, chosen))})
        natural = activity.get(layer)
        records = []
        for index, channel in enumerate(chosen):
            record: dict[str, Any] = {
                "layer": layer,
                "channel": channel,
                "activation": result.activations[index],
                "steps": settings.steps,
                "precision": result.precision,
                "png": str(grid_path),
            }
            if natural is not None:  # the most the channel reaches on the images, to compare the activation with
                record["natural_max"] = float(natural[:, channel].max())
            if channel in each:
                _write(
                    to_image(result.images[index]),
                    each[channel],
                    {"hookviz:layer": layer, "hookviz:channel": str(channel)},
                )
                record["image"] = str(each[channel])
            _report(record, as_json)
            records.append(record)
        if gallery is not None:
            gallery.add(grid_path, [(_channel_caption(r), r) for r in records])
        if not as_json:
            say(str(grid_path))
        if not quiet:
            note(f"{layer}: {len(chosen)} channel(s) in {time.perf_counter() - started:.1f} s{_versus(records)}")


def _channel_caption(record: dict[str, Any]) -> str:
    """``channel 5: 43.2`` and, with images, ``(images at most 12.1)``."""
    caption = f"channel {record['channel']}: {record['activation']:.4g}"
    if "natural_max" in record:
        caption += f" (images at most {record['natural_max']:.4g})"
    return caption


def _versus(records: list[dict[str, Any]]) -> str:
    """``; 14 of 16 channels beyond the images' maximum`` when the images gave each channel's natural maximum."""
    compared = [r["activation"] > r["natural_max"] for r in records if "natural_max" in r]
    if not compared:
        return ""
    return f"; {sum(compared)} of {len(compared)} channel(s) beyond the images' maximum"


def _draw_classes(
    loaded: LoadedModel,
    class_values: tuple[str, ...],
    labels_given: bool,
    settings: Settings,
    out_dir: Path,
    save_each: bool,
    overwrite: bool,
    as_json: bool,
    quiet: bool,
    gallery: _Gallery | None = None,
) -> None:
    from ..filters import picture_grid, to_image, visualize_classes
    from ..output import prepare_output_dir, safe_name
    from ..render import titled

    classes = list(dict.fromkeys(loaded.class_index(value) for value in class_values))
    check_classes(loaded, classes, 1, labels_given=labels_given)
    grid_path = out_dir / "classes.png"
    each = {c: out_dir / f"class_{c}_{safe_name(loaded.label(c), 60)}.png" for c in classes} if save_each else {}
    _refuse_existing([grid_path, *each.values()], overwrite)
    prepare_output_dir(out_dir)
    started = time.perf_counter()
    with _step_bar(len(classes) * settings.steps, quiet) as advance:
        result = visualize_classes(
            loaded.module,
            classes,
            preprocessing=loaded.preprocessing,
            settings=settings,
            output_key=loaded.output_key,
            fixed_batch=loaded.fixed_batch,
            progress=advance,
        )
    labels = [f"{c} {loaded.label(c)}" if loaded.labels else str(c) for c in classes]
    grid = picture_grid(result.images, labels)
    title = f"class visualization: {len(classes)} class(es), {settings.steps} steps"
    _write(titled(grid, title), grid_path, {"hookviz:classes": ",".join(map(str, classes))})
    shown = []
    for index, class_index in enumerate(classes):
        record: dict[str, Any] = {
            "class": class_index,
            "label": loaded.label(class_index),
            "logit": result.activations[index],
            "probability": result.probabilities[index],
            "steps": settings.steps,
            "precision": result.precision,
            "png": str(grid_path),
        }
        if class_index in each:
            _write(to_image(result.images[index]), each[class_index], {"hookviz:class": str(class_index)})
            record["image"] = str(each[class_index])
        _report(record, as_json)
        shown.append((f"{labels[index]}: p = {record['probability']:.3f}", record))
    if gallery is not None:
        gallery.add(grid_path, shown)
    if not as_json:
        say(str(grid_path))
    if not quiet:
        note(f"{len(classes)} class(es) in {time.perf_counter() - started:.1f} s")


@click.command()
@click.argument("model")
@click.argument("image")
@click.option("-l", "--layer", "layer_name", required=True, metavar="NAME", help="Layer whose activation to amplify.")
@click.option(
    "--octaves",
    type=click.IntRange(1, 12),
    default=DEFAULT_DREAM_OCTAVES,
    show_default=True,
    metavar="N",
    help="Scales, each 1.4 times the last, ending at the photo's size.",
)
@click.option(
    "--steps",
    type=click.IntRange(1, 10_000),
    default=DEFAULT_DREAM_STEPS,
    show_default=True,
    metavar="N",
    help="Steps per octave.",
)
@click.option(
    "--lr",
    type=click.FloatRange(0, min_open=True),
    default=DEFAULT_DREAM_LR,
    show_default=True,
    metavar="X",
    help="Step size in [0, 1] pixel units.",
)
@click.option("--seed", type=int, default=0, show_default=True, help="The same seed gives the same picture.")
@out_dir_option("Output directory: DIR/dream_<image-stem>_<layer>.png.")
@overwrite_option("Replace an existing output.")
@json_option("Print one JSON object on stdout.")
@quiet_option
@model_options
@reports_errors
def dream(
    model: str,
    image: str,
    layer_name: str,
    octaves: int,
    steps: int,
    lr: float,
    seed: int,
    out_dir: Path,
    overwrite: bool,
    as_json: bool,
    quiet: bool,
    model_args: ModelArgs,
) -> None:
    """Deep dream: change a photo to amplify what a layer sees in it, written at the photo's resolution.

    Gradient ascent on the layer's mean squared activation, from a small copy of the photo
    up to its full size (octaves), with a random shift at each step. The photo is cut into
    tiles of the model's input size, so any photo size works, even with a fixed-size .pt2.

    \b
    Examples:
      hookviz dream out/efficientnet_lite0.pt2 sample_images/chelsea_cat.png -l _blocks.6
      hookviz dream resnet18 photo.jpg -l layer3 --octaves 3 --steps 5 -o dreams
    """
    from ..filters import DreamSettings, to_image
    from ..filters import dream as deep_dream
    from ..hooks import resolve_layers
    from ..images import image_to_tensor, load_image
    from ..output import layer_file_names, prepare_output_dir, safe_name

    loaded = load(model, model_args, quiet)
    resolve_layers(loaded.module, [layer_name])
    photo = load_image(Path(image))  # InputError: exit 1
    path = out_dir / f"dream_{safe_name(Path(image).stem)}_{layer_file_names([layer_name])[layer_name]}.png"
    _refuse_existing([path], overwrite)
    prepare_output_dir(out_dir)
    started = time.perf_counter()
    with _step_bar(octaves * steps, quiet) as advance:
        result = deep_dream(
            loaded.module,
            image_to_tensor(photo).float() / 255,
            layer_name,
            preprocessing=loaded.preprocessing,
            settings=DreamSettings(octaves=octaves, steps=steps, lr=lr, seed=seed),
            fixed_batch=loaded.fixed_batch,
            progress=advance,
        )
    _write(to_image(result), path, {"hookviz:layer": layer_name, "hookviz:input": str(image)})
    if as_json:
        say_json = {"input": str(image), "layer": layer_name, "octaves": octaves, "steps": steps, "png": str(path)}
        _report(say_json, True)
    else:
        say(str(path))
    if not quiet:
        note(f"dream of {photo.width}x{photo.height} in {time.perf_counter() - started:.1f} s")


# --- shared steps ---------------------------------------------------------------------------------------------------------


class _Gallery:
    """``--html``: the run recorded in DIR/manifest.jsonl (a header, then one entry per grid with each channel's or
    class's picture as its outputs) and DIR/index.html rebuilt from it, as every command's --html does, so the
    pictures of a filters run and of other runs into the same folder share one page."""

    def __init__(self, loaded: LoadedModel, settings: Settings) -> None:
        self.loaded, self.settings = loaded, settings
        self.entries: list[dict[str, Any]] = []
        self.layers: list[str] = []

    def add(self, grid: Path, pictures: list[tuple[str, dict[str, Any]]]) -> None:
        """A card: the ``grid`` and each (caption, JSON record) picture written for it."""
        import os

        layers = list(dict.fromkeys(str(record["layer"]) for _, record in pictures if "layer" in record))
        self.layers.extend(layers)
        outputs = [
            {
                "png": record["image"],
                "label": caption,
                "method": "filters",
                **({"layer": record["layer"]} if "layer" in record else {}),
            }
            for caption, record in pictures
            if "image" in record
        ]
        self.entries.append(
            {
                "type": "input",
                "input": str(grid),
                "identity": os.path.realpath(grid),
                "folder": grid.stem,
                "status": "ok",
                "outputs": outputs,
            }
        )

    def write(self, out_dir: Path, quiet: bool) -> None:
        import uuid
        from dataclasses import asdict
        from datetime import datetime, timezone

        from ..manifest import Manifest, jsonable, options_key, versions
        from .runs import write_gallery

        settings = {"layers": self.layers, **asdict(self.settings)}
        loaded, run = self.loaded, uuid.uuid4().hex[:12]
        manifest = Manifest(out_dir)
        manifest.append(
            {
                "type": "run",
                "run": run,
                "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                **versions(),
                "command": "filters",
                "model": loaded.spec,
                "model_description": loaded.description,
                "device": str(loaded.device),
                "preprocessing": jsonable(loaded.preprocessing),
                "settings": settings,
                "key": options_key("filters", loaded.spec, loaded.preprocessing, False, settings),
                "inputs": len(self.entries),
                "argv": sys.argv[1:],
            }
        )
        for entry in self.entries:
            manifest.append({**entry, "run": run})
        write_gallery(out_dir, quiet)


def _refuse_existing(paths: list[Path], overwrite: bool) -> None:
    from ..errors import UsageError
    from ..output import refuse_link

    for path in paths:
        refuse_link(path)
        if path.exists() and not overwrite:
            raise UsageError(f"{path} already exists; pass --overwrite to replace it, or choose another -o")


def _write(picture: Any, path: Path, metadata: dict[str, str]) -> None:
    from ..errors import HookvizError
    from ..output import write_png

    try:
        write_png(picture, path, metadata)
    except OSError as exc:
        raise HookvizError(
            f"cannot write {path} ({exc.strerror or exc}); free some space or choose another -o"
        ) from None


def _report(record: dict[str, Any], as_json: bool) -> None:
    from ..manifest import json_line

    if as_json:
        say(json_line(record))


@contextmanager
def _step_bar(total: int, quiet: bool) -> Iterator[Callable[[int], None]]:
    """A progress bar of optimization steps on stderr when it is a terminal (one step of N pictures counts N)."""
    if quiet or not sys.stderr.isatty():
        yield lambda done: None
        return
    with click.progressbar(length=total, label="hookviz", file=sys.stderr, show_eta=True) as bar:
        yield bar.update
