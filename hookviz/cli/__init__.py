"""The ``hookviz`` command line: one small function per command over the library.

torch and torchvision are imported inside the commands, so ``hookviz --help``
answers at once. Library errors become one line on stderr and an exit code
(2 usage, 1 failed inputs); stdout carries only output paths or JSON Lines.
Option groups (options.py) hand each command typed values; runs.py holds the
steps commands share; report.py what the user sees.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click

from ..manifest import json_line
from .audit import audit, expected_target, labelled_job
from .evaluate import evaluate, gradcam_metrics
from .filters import dream, filters
from .options import (
    ModelArgs,
    RunArgs,
    ScoreArgs,
    StatsArgs,
    TargetArgs,
    caption_option,
    crop_option,
    expected_option,
    method_option,
    model_options,
    quiet_option,
    run_options,
    score_options,
    stats_options,
    target_options,
    tensorboard_option,
)
from .report import HookvizGroup, note, report_records, reports_errors, say
from .runs import (
    check_target_fits,
    explained,
    explained_layers,
    load,
    note_repeated_layers,
    run_batch,
    target_spec,
    tensorboard_images,
    traced,
)
from .saliency import saliency


@click.group(cls=HookvizGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="hookviz")
def main() -> None:
    """Feature maps and CAM heatmaps for PyTorch CNNs, from the command line.

    MODEL is a torchvision model name (resnet50, deeplabv3_resnet50, fasterrcnn_resnet50_fpn),
    timm:NAME, a Hugging Face directory or hf:ORG/NAME, a state_dict (.pt/.pth/.safetensors),
    a torch.export program (.pt2), or package.module:callable.

    \b
    Examples:
      hookviz layers resnet50
      hookviz fmaps model.pt2 photo.jpg -l layer1.0.conv1
      hookviz fmaps resnet18 photos/ --json | jq .outputs[].png
    """
    # Before torch is imported (libgomp reads it once): torch's idle OpenMP threads sleep instead of spinning for
    # the core the writer threads, the decoding and any other process need. On the 2-core benchmark machine under
    # load (average 5-6), 256 overlays with the demo model took 8.7 s instead of 80.9 s (issue 19).
    import os

    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


@main.command()
@click.argument("model")
@model_options
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array instead of a table.")
@click.option("--all", "show_all", is_flag=True, help="Also list modules that did not run in the forward pass.")
@reports_errors
def layers(model: str, model_args: ModelArgs, as_json: bool, show_all: bool) -> None:
    """List every layer with its type, output shape and parameter count.

    The layer that gradcam uses by default is marked with *.

    \b
    Example:
      hookviz layers resnet50 --weights none
    """
    from ..layers import layer_records, layer_table

    loaded = load(model, model_args, quiet=as_json)
    trace = traced(loaded)
    cam_layer = trace.default_cam_layer()
    rows = [info for info in trace.layers if show_all or info.output_shape is not None]
    if as_json:
        say(json.dumps(layer_records(rows, cam_layer), indent=1))
        return
    say(layer_table(rows, cam_layer))
    click.echo(f"* default CAM layer: {cam_layer or 'none (no layer with a spatial output)'}", err=True)


@main.command()
@click.argument("model")
@click.argument("images", nargs=-1, required=True)
@click.option(
    "-l",
    "--layer",
    "layer_names",
    multiple=True,
    metavar="NAME",
    help="Layer to draw (repeatable; default: every Conv2d).",
)
@click.option(
    "--max-channels",
    type=click.IntRange(min=1),
    default=64,
    show_default=True,
    help="At most N tiles: the N most active channels.",
)
@click.option("--cmap", default="viridis", show_default=True, help="A matplotlib colormap name.")
@click.option("--save-raw", is_flag=True, help="Also write each layer's output as float32 .npy (C, h, w).")
@click.option("--no-index", is_flag=True, help="Do not print channel indices on the tiles.")
@click.option(
    "--scale",
    type=click.Choice(["channel", "layer"]),
    default="channel",
    show_default=True,
    help="channel: each tile scaled to its own range (weak channels visible); layer: one scale for the layer, "
    "with a colour bar (channels compare).",
)
@click.option("--no-caption", "no_caption", is_flag=True, help="No title band (layer, shape, image) above the grid.")
@tensorboard_option
@model_options
@run_options
@reports_errors
def fmaps(
    model: str,
    images: tuple[str, ...],
    layer_names: tuple[str, ...],
    max_channels: int,
    cmap: str,
    save_raw: bool,
    no_index: bool,
    scale: str,
    no_caption: bool,
    tensorboard_dir: Path | None,
    model_args: ModelArgs,
    run: RunArgs,
) -> None:
    """Write a feature-map grid per image and layer: DIR/<image-stem>/fmap_<layer>.png.

    \b
    Examples:
      hookviz fmaps resnet18 cat.jpg                      # every Conv2d layer
      hookviz fmaps model.pt2 photos/ -l layer2.0.conv1 --max-channels 16
      hookviz fmaps resnet18 cat.jpg -l layer1 --scale layer   # one colour scale, with a colour bar
    """
    from ..errors import UsageError
    from ..hooks import resolve_layers
    from ..jobs import FmapJob, FmapOptions
    from ..layers import conv_layer_names
    from ..render import colormap_lut

    colormap_lut(cmap)  # an unknown colormap fails before the model loads
    loaded = load(model, model_args, run.quiet)
    names = list(layer_names) or conv_layer_names(loaded.module)
    if not names:
        raise UsageError("the model has no Conv2d layers; name layers with -l (see 'hookviz layers MODEL')")
    resolve_layers(loaded.module, names)
    if layer_names and not run.quiet:
        note_repeated_layers(loaded, names)
    with tensorboard_images(tensorboard_dir) as sink:
        job = FmapJob(
            loaded,
            FmapOptions(
                out_dir=run.out_dir,
                layers=names,
                max_channels=max_channels,
                cmap=cmap,
                save_raw=save_raw,
                label_channels=not no_index,
                scale=scale,
                caption=not no_caption,
                layers_named=bool(layer_names),
                tensorboard=sink,
                file_format=run.file_format,
                quality=run.quality,
            ),
        )
        code = run_batch(loaded, job, images, run)
    sys.exit(code)


@main.command()
@click.argument("model")
@click.argument("images", nargs=-1, required=True)
@target_options
@expected_option
@method_option
@click.option("--alpha", type=click.FloatRange(0, 1), default=0.5, show_default=True, help="Heatmap opacity.")
@click.option("--cmap", default="jet", show_default=True, help="A matplotlib colormap name.")
@click.option(
    "--save-raw", is_flag=True, help="Also write the heatmap as float32 .npy (H, W) of the original image, in [0, 1]."
)
@click.option(
    "--fuse",
    type=click.Choice(["mean", "max"]),
    default="mean",
    show_default=True,
    help="With several -l: how the layers' maps (each scaled to [0, 1], at the finest layer's size) combine.",
)
@click.option(
    "--eigen-smooth",
    is_flag=True,
    help="Gradient methods: the first principal component of the weighted activations instead of their sum.",
)
@click.option(
    "--aug-smooth",
    is_flag=True,
    help="Average the maps of 6 copies of each image (flipped or not, x0.9/1/1.1 intensity), run together.",
)
@click.option(
    "--metric",
    "metric_names",
    multiple=True,
    metavar="NAME",
    help="Also score each map (repeatable): deletion, insertion, drop, increase, road (see 'hookviz evaluate').",
)
@caption_option
@tensorboard_option
@score_options
@model_options
@run_options
@reports_errors
def gradcam(
    model: str,
    images: tuple[str, ...],
    target: TargetArgs,
    expected: str | None,
    method: str,
    alpha: float,
    cmap: str,
    save_raw: bool,
    fuse: str,
    eigen_smooth: bool,
    aug_smooth: bool,
    metric_names: tuple[str, ...],
    no_caption: bool,
    tensorboard_dir: Path | None,
    score: ScoreArgs,
    model_args: ModelArgs,
    run: RunArgs,
) -> None:
    """Write CAM heatmap overlays: DIR/<image-stem>/<method>_<layer>_c<class>.png.

    Overlays have the original image's size (with --no-caption exactly; a captioned image under 256 px is
    enlarged by a whole factor); with --crop, what the model did not see is dimmed. Several -l fuse their
    layers' maps into one (<method>_<layer>+<layer>_c<class>.png); smoothing adds -eigen/-aug to <method>.

    \b
    Examples:
      hookviz gradcam resnet50 cat.jpg                       # top-1 class, Grad-CAM
      hookviz gradcam resnet50 cat.jpg --class "tabby" -m gradcam++
      hookviz gradcam resnet50 cat.jpg -l layer3 -l layer4 --fuse max --aug-smooth
      hookviz gradcam model.pt2 photos/ --top-k 3 --json | jq .predictions
      find photos -name '*.jpg' | hookviz gradcam resnet50 - --skip-existing -o maps
      find photos -name '*.jpg' -printf '{"input": "%p", "label": 281}\\n' > labels.jsonl && hookviz gradcam model.pt2 photos/ --expected labels.jsonl
      hookviz gradcam binary.pt2 photos/ -c 0 --activation sigmoid    # a single-logit model's negative side
      hookviz gradcam deeplabv3_mobilenet_v3_large street.jpg -c 7 --region 40,60,300,200   # 7: car
      hookviz gradcam resnet50 photo.jpg --similar-to other.jpg --embedding-layer avgpool
    """
    from ..batch import default_batch_size
    from ..cams import check_cam_options
    from ..jobs import CamJob, CamOptions
    from ..methods import CLASS_INDEPENDENT
    from ..render import colormap_lut

    colormap_lut(cmap)  # an unknown colormap fails before the model loads
    layers = list(target.layer_names) or ["default"]  # the default layer is found after loading
    check_cam_options(method, layers, eigen_smooth=eigen_smooth, aug_smooth=aug_smooth, fuse=fuse)
    metrics = gradcam_metrics(metric_names)
    target, explain = expected_target(target, expected)  # with --expected, -c is expected|predicted|both
    loaded, classes, layers = explained_layers(model, model_args, target, run.quiet, score)
    spec = target_spec(loaded, score, classes, target.top_k)
    check_target_fits(spec, method, aug_smooth=aug_smooth, metrics=metrics, expected=expected)
    if method in CLASS_INDEPENDENT and (classes or target.top_k > 1) and not run.quiet:
        note(f"{method} does not depend on the class: one map per image, --class and --top-k do not change it")
    with tensorboard_images(tensorboard_dir) as sink:
        options = CamOptions(
            out_dir=run.out_dir,
            layer="+".join(layers),
            layers=layers if len(layers) > 1 else (),
            fuse=fuse,
            eigen_smooth=eigen_smooth,
            aug_smooth=aug_smooth,
            method=method,
            classes=classes,
            top_k=target.top_k,
            alpha=alpha,
            cmap=cmap,
            save_raw=save_raw,
            score_batch_size=run.batch_size or default_batch_size(loaded.device),
            tensorboard=sink,
            caption=not no_caption,
            metrics=metrics,
            target=spec,
            file_format=run.file_format,
            quality=run.quality,
        )
        job: Any = CamJob(loaded, options)
        if spec.kind == "detection":
            from ..detection import detection_job

            min_score = 0.5 if score.min_score is None else score.min_score
            job = detection_job(loaded, options, boxes=score.boxes or 5, min_score=min_score)
        if expected is not None:
            job = labelled_job(job, expected, images, explain)
        code = run_batch(loaded, job, images, run)
    sys.exit(code)


@main.command()
@click.argument("model")
@click.argument("images", nargs=-1, required=True)
@target_options
@caption_option
@score_options
@model_options
@run_options
@reports_errors
def guided(
    model: str,
    images: tuple[str, ...],
    target: TargetArgs,
    no_caption: bool,
    score: ScoreArgs,
    model_args: ModelArgs,
    run: RunArgs,
) -> None:
    """Write guided backpropagation and guided Grad-CAM images per image and class.

    DIR/<image-stem>/guided_c<class>.png and guided-gradcam_<layer>_c<class>.png,
    at the original image's size. Needs a model with ReLU modules.

    \b
    Examples:
      hookviz guided resnet50 cat.jpg
      hookviz guided resnet50 cat.jpg --class "tabby" -l layer3
    """
    from ..errors import UsageError
    from ..guided import relu_modules
    from ..jobs import CamOptions, GuidedJob

    loaded, classes, layer = explained(model, model_args, target, run.quiet, score)
    relu_modules(loaded.module)  # a model without ReLUs fails before any image is read
    spec = target_spec(loaded, score, classes, target.top_k)
    if spec.kind == "detection":
        raise UsageError("guided explains classes, regions and similarities; for a detection model use gradcam")
    job = GuidedJob(
        loaded,
        CamOptions(
            out_dir=run.out_dir,
            layer=layer,
            classes=classes,
            top_k=target.top_k,
            caption=not no_caption,
            file_format=run.file_format,
            quality=run.quality,
            target=spec,
        ),
    )
    sys.exit(run_batch(loaded, job, images, run))


@main.command()
@click.argument("model")
@click.argument("images", nargs=-1, required=True)
@click.option(
    "-l",
    "--layer",
    "layer_names",
    multiple=True,
    metavar="NAME",
    help="Layer to measure (repeatable, name#N for one call; default: every activation module, else every Conv2d "
    "and Linear).",
)
@click.option(
    "--bins", type=click.IntRange(min=4, max=10_000), default=100, show_default=True, help="Histogram bins per layer."
)
@click.option(
    "--top",
    type=click.IntRange(min=1, max=100),
    metavar="N",
    help="Also write DIR/top_<layer>.png: per channel, the N images that activate it most (crops of the receptive "
    "field around the maximum).",
)
@stats_options
@tensorboard_option
@model_options
@reports_errors
def stats(
    model: str,
    images: tuple[str, ...],
    layer_names: tuple[str, ...],
    bins: int,
    top: int | None,
    run: StatsArgs,
    tensorboard_dir: Path | None,
    model_args: ModelArgs,
) -> None:
    """Activation statistics per layer over all images: mean, std, min, max, zeros, dead channels, histogram.

    A zero is a value a ReLU would zero (<= 0); a dead channel is never > 0 on any
    image at any position. Memory stays flat however many images: statistics and
    fixed-bin histograms are updated batch by batch.

    \b
    Examples:
      hookviz stats resnet50 photos/                    # table + out/stats.png
      hookviz stats model.pt2 photos/ -l layer4 --json | jq '{layer, dead_channels}'
      hookviz stats resnet50 photos/ -l layer2.0.relu --top 9  # what each channel responds to
    """
    from contextlib import nullcontext

    from ..batch import default_batch_size, default_workers
    from ..errors import HookvizError, UsageError
    from ..images import collect_inputs
    from ..jobs import StatsJob
    from ..output import output_stems, prepare_output_dir
    from ..pipeline import run_job
    from ..stats import StatsCollector, format_table, histogram_figure

    loaded = load(model, model_args, run.quiet)
    collector = StatsCollector(loaded.module, list(layer_names) or None, bins=bins, top=top or 0)
    if not collector.stats:
        raise UsageError("the model has no Conv2d or Linear layers; name layers with -l (see 'hookviz layers MODEL')")
    figure_path = prepare_output_dir(run.out_dir) / "stats.png"
    if figure_path.exists() and not run.overwrite:
        raise UsageError(f"{figure_path} already exists; pass --overwrite to replace it, or choose another -o")
    tops_there = sorted(figure_path.parent.glob("top_*.png")) if top else []
    if tops_there and not run.overwrite:
        raise UsageError(f"{tops_there[0]} already exists; pass --overwrite to replace it, or choose another -o")
    paths = collect_inputs(images)
    stems = output_stems(paths)
    writer = None
    if tensorboard_dir is not None:  # a missing tensorboard package fails before any work
        from ..tensorboard import summary_writer

        writer = summary_writer(tensorboard_dir)
    with writer if writer is not None else nullcontext():  # closed however the run ends
        records = run_job(
            [(path, stems[path]) for path in paths],
            loaded,
            job := StatsJob(loaded, collector),
            crop=run.crop,
            batch_size=run.batch_size or default_batch_size(loaded.device),
            max_pixels=run.max_pixels,
            workers=run.workers if run.workers is not None else default_workers(len(paths), run.batch_size),
        )
        counts = report_records(records, len(paths), quiet=run.quiet, print_outputs=False)
        if collector.images == 0:
            raise UsageError("no image could be read; nothing to measure")
        results = collector.results()
        try:
            histogram_figure(results, figure_path)
        except OSError as exc:
            raise HookvizError(
                f"cannot write {figure_path} ({exc.strerror or exc}); free some space or choose another -o"
            ) from None
        if writer is not None:
            from ..tensorboard import add_layer_statistics

            add_layer_statistics(writer, results)
        if top:
            from ..stats import top_grids

            try:
                grids = top_grids(
                    loaded.module,
                    collector.top_activations(),
                    job.paths,
                    loaded.preprocessing,
                    figure_path.parent,
                    crop=run.crop,
                    device=loaded.device,
                )
            except OSError as exc:
                raise HookvizError(
                    f"cannot write the top images in {figure_path.parent} ({exc.strerror or exc}); choose another -o"
                ) from None
            if not run.quiet:
                note(f"top {top} images per channel: {', '.join(map(str, grids))}")
    if run.as_json:
        for name, layer_stats in results.items():
            say(json_line({"layer": name, **layer_stats.as_dict()}))
    else:
        say(format_table(results))
    if not run.quiet:
        note(f"{collector.images} image(s), {len(results)} layer(s); histograms in {figure_path}")
    sys.exit(1 if counts["error"] else 0)


@main.command()
@click.argument("model")
@click.argument("image")
@click.option(
    "-c",
    "--class",
    "class_value",
    metavar="C",
    help="Class whose score is backpropagated (default: the top-1 prediction).",
)
@crop_option
@click.option("--json", "as_json", is_flag=True, help="Print the trace as one JSON object.")
@quiet_option
@score_options
@model_options
@reports_errors
def trace(
    model: str,
    image: str,
    class_value: str | None,
    crop: bool,
    as_json: bool,
    quiet: bool,
    score: ScoreArgs,
    model_args: ModelArgs,
) -> None:
    """Print every module's forward inputs and outputs, then the gradients flowing back, for one image.

    Forward rows come in execution order with shapes and value ranges; backward
    rows in the order autograd reaches each module's output, with the gradient's
    shape and norm (zero and non-finite gradients are flagged). Gradients are read
    with tensor hooks, so in-place ops and the model's parameters are left alone.

    \b
    Examples:
      hookviz trace resnet18 cat.jpg
      hookviz trace model.pt2 cat.jpg -c 281 --json | jq '.events[] | select(.direction == "backward") | .gradient.norm'
    """
    from ..errors import InputError, UsageError
    from ..jobs import BatchTargets, target_label
    from ..pipeline import model_batch, prepare_image
    from ..trace import format_trace, trace_model

    loaded = load(model, model_args, quiet)
    class_index = loaded.class_index(class_value) if class_value is not None else None
    classes = [class_index] if class_index is not None else []
    spec = target_spec(loaded, score, classes, 1)
    if spec.kind == "detection":
        raise UsageError("trace explains classes, regions and similarities; for a detection model use gradcam")
    prepared = prepare_image(Path(image), Path(image).stem, loaded.preprocessing, crop)  # InputError: exit 1
    target, region_errors = BatchTargets(loaded, spec, classes)([prepared])
    result = trace_model(
        loaded.module,
        model_batch([prepared], loaded),
        class_index=class_index,
        output_key=loaded.output_key,
        target=None if spec.kind == "class" else target,
    )
    if region_errors and region_errors[0]:
        raise InputError(f"{image}: {region_errors[0]}")
    say(json_line(result.as_json()) if as_json else format_trace(result))
    if not quiet:
        label = target_label(loaded, spec, result.classes[0])
        note(
            f"traced {len(result.forward)} module calls and {len(result.backward)} gradients "
            f"for class {result.classes[0]} ({label})"
        )


main.add_command(audit)
main.add_command(saliency)
main.add_command(filters)
main.add_command(dream)
main.add_command(evaluate)
