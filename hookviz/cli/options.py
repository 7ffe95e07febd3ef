"""Options defined once, and option groups that hand a command one typed object each.

A group is a dataclass plus the click options that fill it: ``@model_options``
adds ``--weights``, ``--arch``, ... to a command and passes them as one
``model: ModelArgs``. The dataclass's fields are the options' parameter names,
so an option that a group declares but does not carry (or the reverse) fails
the first time the command runs, in every test, instead of being ignored.

Nothing here imports torch: ``hookviz --help`` must answer at once.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, TypeVar

import click

from ..methods import CAM_METHODS

F = TypeVar("F", bound=Callable[..., Any])
# A model input side beyond this is a typo (--size 100000 asked for a 120 GB probe tensor), not a model.
MAX_INPUT_SIDE = 8192


# --- parsing -------------------------------------------------------------------------------------------


def parse_size(ctx: click.Context, param: click.Parameter, value: str | None) -> tuple[int, int] | None:
    """``N`` or ``HxW`` (also ``H,W``) as (height, width), sides of at least 8 pixels."""
    if value is None:
        return None
    parts = value.lower().replace(",", "x").split("x")
    try:
        numbers = [int(p) for p in parts]
    except ValueError:
        raise click.BadParameter("use N or HxW, e.g. 224 or 384x512") from None
    if len(numbers) not in (1, 2) or min(numbers) < 8:
        raise click.BadParameter("use N or HxW with sides of at least 8 pixels, e.g. 224 or 384x512")
    if max(numbers) > MAX_INPUT_SIDE:
        raise click.BadParameter(f"use sides of at most {MAX_INPUT_SIDE} pixels, e.g. 224 or 384x512")
    return (numbers[0], numbers[-1])


def parse_channel_values(ctx: click.Context, param: click.Parameter, value: str | None) -> tuple[float, ...] | None:
    """One number for every channel, or comma-separated numbers, one per channel (for ``--std``, all positive)."""
    if value is None:
        return None
    try:
        numbers = tuple(float(p) for p in value.split(","))
    except ValueError:
        raise click.BadParameter("use one number, or one per channel, e.g. 0.5 or 0.485,0.456,0.406") from None
    if not all(math.isfinite(n) for n in numbers):
        raise click.BadParameter("use finite numbers, e.g. 0.5 or 0.485,0.456,0.406")
    if param.name == "std" and min(numbers) <= 0:
        raise click.BadParameter("use numbers above 0, e.g. 0.5 or 0.229,0.224,0.225")
    return numbers


# --- groups --------------------------------------------------------------------------------------------


def option_group(group: type, name: str, options: list[Callable[[Any], Any]]) -> Callable[[F], F]:
    """A decorator adding ``options`` to a command and passing their values as one ``group`` instance ``name``."""
    names = [field.name for field in fields(group)]

    def decorator(command: F) -> F:
        @functools.wraps(command)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            kwargs[name] = group(**{key: kwargs.pop(key) for key in names})
            return command(*args, **kwargs)

        for option in reversed(options):
            wrapper = option(wrapper)
        return wrapper  # type: ignore[return-value]

    return decorator


@dataclass(frozen=True)
class ModelArgs:
    """How to load MODEL (see hookviz.models.load_model, which takes these as keyword arguments)."""

    weights: str
    arch: str | None
    state_dict: str | None
    trust: bool
    size: tuple[int, int] | None
    mean: tuple[float, ...] | None
    std: tuple[float, ...] | None
    labels: str | None
    device: str
    output_key: str | None


model_options = option_group(
    ModelArgs,
    "model_args",
    [
        click.option(
            "--weights",
            default="DEFAULT",
            show_default=True,
            metavar="DEFAULT|NAME|none",
            help="torchvision weights: DEFAULT, an enum member such as IMAGENET1K_V2, or none for random weights.",
        ),
        click.option(
            "--arch", metavar="NAME", help="torchvision architecture of a state_dict file (detected when omitted)."
        ),
        click.option(
            "--state-dict", type=click.Path(dir_okay=False), help="Weights for a package.module:callable MODEL."
        ),
        click.option("--trust", is_flag=True, help="Allow loading a pickled model, which runs code from the file."),
        click.option(
            "--size",
            callback=parse_size,
            metavar="N|HxW",
            help="Model input size (default: from the weights or the .pt2, else 224).",
        ),
        click.option(
            "--mean",
            callback=parse_channel_values,
            metavar="M|R,G,B",
            help="Normalization mean: one value, or one per channel (default: the weights', else ImageNet's).",
        ),
        click.option(
            "--std",
            callback=parse_channel_values,
            metavar="S|R,G,B",
            help="Normalization std: one value, or one per channel (default: the weights', else ImageNet's).",
        ),
        click.option(
            "--labels",
            metavar="imagenet|FILE",
            help="Class names: imagenet, or a file with one name per line (default: the weights').",
        ),
        click.option("--device", default="auto", show_default=True, type=click.Choice(["auto", "cpu", "cuda", "mps"])),
        click.option(
            "--output", "output_key", metavar="KEY", help="Which part of a tuple/dict model output holds the logits."
        ),
    ],
)


# Options that several groups and commands share, defined once.
def out_dir_option(help: str) -> Callable[[F], F]:
    return click.option(
        "-o",
        "--out-dir",
        type=click.Path(file_okay=False, path_type=Path),
        default=Path("out"),
        show_default=True,
        help=help,
    )


def json_option(help: str) -> Callable[[F], F]:
    return click.option("--json", "as_json", is_flag=True, help=help)


def overwrite_option(help: str) -> Callable[[F], F]:
    return click.option("--overwrite", is_flag=True, help=help)


crop_option = click.option(
    "--crop", is_flag=True, help="Use the weights' resize + center crop instead of the whole image."
)
batch_size_option = click.option(
    "--batch-size",
    type=click.IntRange(min=1),
    metavar="N",
    help="Images per model call (default: 8 on CPU, 32 on CUDA).",
)
workers_option = click.option(
    "--workers",
    type=click.IntRange(min=0),
    metavar="N",
    help="Processes decoding images in the background (default for folders: one per core beyond two, up to 4).",
)
max_pixels_option = click.option(
    "--max-pixels",
    type=click.IntRange(min=1),
    metavar="N",
    help="Refuse larger images as possible decompression bombs (default: Pillow's limit, about 89 million).",
)
quiet_option = click.option("-q", "--quiet", is_flag=True, help="No progress or messages on stderr, except errors.")
tensorboard_option = click.option(
    "--tensorboard",
    "tensorboard_dir",
    type=click.Path(file_okay=False, path_type=Path),
    metavar="DIR",
    help="Also write TensorBoard events to DIR (pip install 'hookviz[tensorboard]').",
)


@dataclass(frozen=True)
class RunArgs:
    """A run of an image command over many inputs: where outputs go, how images are read, what is reported."""

    out_dir: Path
    crop: bool
    batch_size: int | None
    workers: int | None
    shard: str | None
    skip_existing: bool
    overwrite: bool
    fail_fast: bool
    max_pixels: int | None
    html: bool
    as_json: bool
    quiet: bool
    verbose: bool
    file_format: str
    quality: int | None


run_options = option_group(
    RunArgs,
    "run",
    [
        out_dir_option("Output directory; each input gets DIR/<image-stem>/, and DIR/manifest.jsonl records the run."),
        crop_option,
        batch_size_option,
        workers_option,
        click.option(
            "--shard",
            metavar="K/N",
            help="Process only the K-th of N slices of the sorted inputs (K from 1), e.g. for SLURM arrays.",
        ),
        click.option(
            "--skip-existing",
            is_flag=True,
            help="Skip inputs the manifest records as done with the same options (resume a killed run).",
        ),
        overwrite_option("Replace existing outputs (without it, existing outputs are an error)."),
        click.option(
            "--fail-fast", is_flag=True, help="Stop at the first input that fails (default: report it and go on)."
        ),
        max_pixels_option,
        click.option(
            "--html", is_flag=True, help="Also write DIR/index.html, a gallery of every input's outputs in DIR."
        ),
        json_option("Print one JSON object per input on stdout (JSON Lines)."),
        quiet_option,
        click.option("-v", "--verbose", is_flag=True, help="One line per input and a timing summary on stderr."),
        click.option(
            "--format",
            "file_format",
            type=click.Choice(["png", "jpg", "webp"]),
            default="png",
            show_default=True,
            help="Picture format: PNG (lossless, text metadata), or JPEG/WebP (several times faster to write and "
            "a tenth of the size; the metadata in EXIF).",
        ),
        click.option(
            "--quality",
            type=click.IntRange(1, 100),
            metavar="N",
            help="JPEG/WebP quality, 1-100 (default: 90).",
        ),
    ],
)


@dataclass(frozen=True)
class StatsArgs:
    """A stats run: images in, one summary out."""

    out_dir: Path
    overwrite: bool
    crop: bool
    batch_size: int | None
    workers: int | None
    max_pixels: int | None
    as_json: bool
    quiet: bool


stats_options = option_group(
    StatsArgs,
    "run",
    [
        out_dir_option("Where stats.png (one histogram row per layer) is written."),
        overwrite_option("Replace an existing DIR/stats.png."),
        crop_option,
        batch_size_option,
        workers_option,
        max_pixels_option,
        json_option("Print one JSON object per layer (JSON Lines) instead of the table."),
        quiet_option,
    ],
)


@dataclass(frozen=True)
class TargetArgs:
    """What an explanation explains: classes (given, or the top-k predictions) at a layer."""

    class_values: tuple[str, ...]
    top_k: int
    layer_names: tuple[str, ...]  # -l, repeatable; commands that explain one layer take one (runs.explained)

    @property
    def layer_name(self) -> str | None:
        """The one -l given (None when none was); commands that take one layer check there is only one."""
        return self.layer_names[0] if self.layer_names else None


target_options = option_group(
    TargetArgs,
    "target",
    [
        click.option(
            "-c",
            "--class",
            "class_values",
            multiple=True,
            metavar="C",
            help="Class to explain: an index or a label name (repeatable; default: the top-1 prediction).",
        ),
        click.option(
            "-k",
            "--top-k",
            type=click.IntRange(min=1),
            default=1,
            show_default=True,
            help="Explain the K most probable classes.",
        ),
        click.option(
            "-l",
            "--layer",
            "layer_names",
            multiple=True,
            metavar="NAME",
            help="Target layer (default: the last spatial layer; see 'hookviz layers'). gradcam fuses several.",
        ),
    ],
)


@dataclass(frozen=True)
class ScoreArgs:
    """Which score of the model's output is explained, for models other than plain classifiers (hookviz.targets)."""

    activation: str | None
    region: str | None
    mask: str | None
    similar_to: str | None
    embedding_layer: str | None
    boxes: int | None
    min_score: float | None

    @property
    def given(self) -> list[str]:
        """The options given, as the user typed them (for errors naming what does not fit the model): each
        field is its option's name, ``similar_to`` for ``--similar-to``."""
        return ["--" + item.name.replace("_", "-") for item in fields(self) if getattr(self, item.name) is not None]


score_options = option_group(
    ScoreArgs,
    "score",
    [
        click.option(
            "--activation",
            type=click.Choice(["softmax", "sigmoid", "none"]),
            help="What captions and predictions show: softmax, sigmoid (multi-label, binary) or none (raw value; "
            "default for a single-output model, whose -c 1 explains the output and -c 0 its negative).",
        ),
        click.option(
            "--region",
            metavar="X0,Y0,X1,Y1",
            help="Segmentation: explain the class's logits summed over this box of the original image (default: "
            "over the pixels predicted as the class).",
        ),
        click.option(
            "--mask",
            type=click.Path(dir_okay=False),
            metavar="FILE",
            help="Segmentation: as --region, over the nonzero pixels of a mask image of the photo's size.",
        ),
        click.option(
            "--similar-to",
            type=click.Path(dir_okay=False),
            metavar="REF",
            help="Explain the cosine similarity of each image's embedding to REF's (the model's output, or --output "
            "KEY, or --embedding-layer's pooled output).",
        ),
        click.option(
            "--embedding-layer",
            metavar="NAME",
            help="With --similar-to: the embedding is this layer's output averaged over its positions.",
        ),
        click.option(
            "--boxes",
            type=click.IntRange(min=1),
            metavar="N",
            help="Detection models: explain the N highest-scoring detections (default 5).",
        ),
        click.option(
            "--min-score",
            type=click.FloatRange(0, 1),
            metavar="S",
            help="Detection models: only detections scoring at least S (default 0.5).",
        ),
    ],
)

caption_option = click.option(
    "--no-caption",
    "no_caption",
    is_flag=True,
    help="Write pictures at the original's exact size with nothing drawn on them (default: a caption band at the "
    "bottom; pictures under 256 px are enlarged for it).",
)
method_option = click.option("-m", "--method", default="gradcam", show_default=True, type=click.Choice(CAM_METHODS))
expected_option = click.option(
    "--expected",
    metavar="folder|FILE",
    help="Expected labels: 'folder' (photos/<class name>/*.jpg), a CSV file path,label or a JSON Lines file with "
    "input and label; then -c is expected, predicted or both (default: both maps side by side where they differ).",
)
