"""The ``hookviz`` command line: a thin layer over the library.

torch and torchvision are imported inside the commands, so ``hookviz --help``
answers at once. Library errors become one line on stderr and an exit code
(2 usage, 1 failed inputs); stdout carries only output paths or JSON Lines.
"""

from __future__ import annotations

import functools
import json
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import click

EXIT_INTERRUPTED = 130


def _fail(message: str, code: int) -> None:
    click.echo(f"hookviz: error: {message}", err=True)
    sys.exit(code)


def reports_errors(command: Callable[..., Any]) -> Callable[..., Any]:
    """Map hookviz's errors to one line on stderr and an exit code; Ctrl-C to 130."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from .errors import HookvizError

        try:
            return command(*args, **kwargs)
        except HookvizError as exc:
            _fail(str(exc), exc.exit_code)
        except KeyboardInterrupt:
            click.echo("hookviz: interrupted", err=True)
            sys.exit(EXIT_INTERRUPTED)

    return wrapper


def _parse_size(ctx: click.Context, param: click.Parameter, value: str | None) -> tuple[int, int] | None:
    if value is None:
        return None
    parts = value.lower().replace(",", "x").split("x")
    try:
        numbers = [int(p) for p in parts]
    except ValueError:
        raise click.BadParameter("use N or HxW, e.g. 224 or 384x512") from None
    if len(numbers) not in (1, 2) or min(numbers) < 8:
        raise click.BadParameter("use N or HxW with sides of at least 8 pixels, e.g. 224 or 384x512")
    return (numbers[0], numbers[-1])


def _parse_triple(ctx: click.Context, param: click.Parameter, value: str | None) -> tuple[float, float, float] | None:
    if value is None:
        return None
    try:
        numbers = tuple(float(p) for p in value.split(","))
    except ValueError:
        raise click.BadParameter("use three comma-separated numbers, e.g. 0.5,0.5,0.5") from None
    if len(numbers) != 3 or (param.name == "std" and min(numbers) <= 0):
        raise click.BadParameter("use three comma-separated numbers (std > 0), e.g. 0.5,0.5,0.5")
    return numbers  # type: ignore[return-value]


MODEL_OPTIONS = [
    click.option("--weights", default="DEFAULT", show_default=True, metavar="DEFAULT|NAME|none",
                 help="torchvision weights: DEFAULT, an enum member such as IMAGENET1K_V2, or none for random weights."),
    click.option("--arch", metavar="NAME", help="torchvision architecture of a state_dict file (detected when omitted)."),
    click.option("--state-dict", type=click.Path(dir_okay=False), help="Weights for a package.module:callable MODEL."),
    click.option("--trust", is_flag=True, help="Allow loading a pickled model, which runs code from the file."),
    click.option("--size", callback=_parse_size, metavar="N|HxW", help="Model input size (default: from the weights or the .pt2, else 224)."),
    click.option("--mean", callback=_parse_triple, metavar="R,G,B", help="Normalization mean (default: the weights', else ImageNet's)."),
    click.option("--std", callback=_parse_triple, metavar="R,G,B", help="Normalization std (default: the weights', else ImageNet's)."),
    click.option("--labels", metavar="imagenet|FILE", help="Class names: imagenet, or a file with one name per line (default: the weights')."),
    click.option("--device", default="auto", show_default=True, type=click.Choice(["auto", "cpu", "cuda", "mps"])),
    click.option("--output", "output_key", metavar="KEY", help="Which part of a tuple/dict model output holds the logits."),
]

# Options some commands share one by one (stats and trace take images but are not batch runs).
CROP_OPTION = click.option("--crop", is_flag=True, help="Use the weights' resize + center crop instead of the whole image.")
BATCH_SIZE_OPTION = click.option("--batch-size", type=click.IntRange(min=1), metavar="N",
                                 help="Images per model call (default: 8 on CPU, 32 on CUDA).")
MAX_PIXELS_OPTION = click.option("--max-pixels", type=click.IntRange(min=1), metavar="N",
                                 help="Refuse larger images as possible decompression bombs (default: Pillow's limit, about 89 million).")
QUIET_OPTION = click.option("-q", "--quiet", is_flag=True, help="No progress or messages on stderr, except errors.")
TENSORBOARD_OPTION = click.option("--tensorboard", "tensorboard_dir", type=click.Path(file_okay=False, path_type=Path),
                                  metavar="DIR", help="Also write TensorBoard events to DIR (pip install 'hookviz[tensorboard]').")

IMAGE_OPTIONS = [
    click.option("-o", "--out-dir", type=click.Path(file_okay=False, path_type=Path), default=Path("out"),
                 show_default=True, help="Output directory; each input gets DIR/<image-stem>/, and DIR/manifest.jsonl records the run."),
    CROP_OPTION,
    BATCH_SIZE_OPTION,
    click.option("--workers", type=click.IntRange(min=0), metavar="N",
                 help="Processes decoding images in the background (default for folders: one per core beyond two, up to 4)."),
    click.option("--shard", metavar="K/N", help="Process only the K-th of N slices of the sorted inputs (K from 1), e.g. for SLURM arrays."),
    click.option("--skip-existing", is_flag=True, help="Skip inputs the manifest records as done with the same options (resume a killed run)."),
    click.option("--overwrite", is_flag=True, help="Replace existing outputs (without it, existing outputs are an error)."),
    click.option("--fail-fast", is_flag=True, help="Stop at the first input that fails (default: report it and go on)."),
    MAX_PIXELS_OPTION,
    click.option("--html", is_flag=True, help="Also write DIR/index.html, a gallery of every input's outputs in DIR."),
    click.option("--json", "as_json", is_flag=True, help="Print one JSON object per input on stdout (JSON Lines)."),
    QUIET_OPTION,
    click.option("-v", "--verbose", is_flag=True, help="One line per input and a timing summary on stderr."),
]
BATCH_KEYS = ("out_dir", "crop", "batch_size", "workers", "shard", "skip_existing", "overwrite", "fail_fast", "max_pixels",
              "html", "as_json", "quiet", "verbose")

CLASS_OPTIONS = [
    click.option("-c", "--class", "class_values", multiple=True, metavar="C",
                 help="Class to explain: an index or a label name (repeatable; default: the top-1 prediction)."),
    click.option("-k", "--top-k", type=click.IntRange(min=1), default=1, show_default=True, help="Explain the K most probable classes."),
    click.option("-l", "--layer", "layer_name", metavar="NAME", help="Target layer (default: the last spatial layer; see 'hookviz layers')."),
]


def apply(options: list[Callable[[Any], Any]]) -> Callable[[Any], Any]:
    def decorator(function: Any) -> Any:
        for option in reversed(options):
            function = option(function)
        return function

    return decorator


MODEL_KEYS = ("weights", "arch", "state_dict", "trust", "size", "mean", "std", "labels", "device", "output_key")


def _load(model: str, options: dict[str, Any], quiet: bool = False):
    from .memory import keep_freed_memory
    from .models import load_model

    keep_freed_memory()  # before the first large allocation: see hookviz/memory.py

    loaded = load_model(model, **{key: options.pop(key) for key in MODEL_KEYS})
    if not quiet:
        click.echo(f"hookviz: model: {loaded.description}", err=True)
    return loaded


def _run_images(loaded: Any, job: Any, images: tuple[str, ...], batch: dict[str, Any]) -> int:
    """Run an image job over the inputs with progress, JSON Lines and the manifest; return the exit code."""
    import os
    import time

    from .batch import BatchOptions, parse_shard, plan_batch
    from .images import collect_inputs

    paths = collect_inputs(images)
    batch_size = batch["batch_size"]
    workers = batch["workers"]
    if workers is None:
        # Background decoding pays off for more than a batch or two, and only on cores torch's own two
        # threads leave free: on a 2-core machine a worker process slowed a resnet50 run from 13.5 to 10-11 images/s.
        spare = (os.cpu_count() or 1) - 2
        workers = min(4, max(0, spare)) if len(paths) > 2 * (batch_size or 8) else 0
    options = BatchOptions(out_dir=job.options.out_dir, batch_size=batch_size, workers=workers, crop=batch["crop"],
                           shard=parse_shard(batch["shard"]) if batch["shard"] else None,
                           skip_existing=batch["skip_existing"], overwrite=batch["overwrite"],
                           max_pixels=batch["max_pixels"], argv=sys.argv[1:])
    run = plan_batch(paths, loaded, job, options)
    quiet, verbose, as_json = batch["quiet"], batch["verbose"] and not batch["quiet"], batch["as_json"]
    if verbose:
        click.echo(f"hookviz: {run.total} input(s), batch size {run.header['batch_size']}, {workers} decoding worker(s), "
                   f"{len(run.skipped)} already done", err=True)
    counts = {"ok": 0, "error": 0, "skipped": 0}
    started = time.perf_counter()
    with _progress(run.total, hidden=quiet) as progress:
        try:
            for number, record in enumerate(run.records, start=1):
                counts[record.status] = counts.get(record.status, 0) + 1
                progress.clear()
                if as_json:
                    click.echo(json.dumps(record.as_json()))
                elif record.status == "ok":
                    for output in record.outputs:
                        click.echo(output["png"])
                if record.status == "error":
                    click.echo(f"hookviz: error: {record.error}", err=True)
                elif verbose:
                    click.echo(f"hookviz: [{number}/{run.total}] {record.input}: {record.status}, "
                               f"{len(record.outputs)} output(s)", err=True)
                progress.advance(time.perf_counter() - started)
                if record.status == "error" and batch["fail_fast"]:
                    click.echo("hookviz: stopped at the first failure (--fail-fast)", err=True)
                    break
        finally:
            run.records.close()
    elapsed = time.perf_counter() - started
    if not quiet:
        done = counts["ok"] + counts["error"]
        rate = f" ({done / elapsed:.1f} images/s)" if done and elapsed > 0 else ""
        click.echo(f"hookviz: {counts['ok']} ok, {counts['error']} failed, {counts['skipped']} skipped "
                   f"in {elapsed:.1f} s{rate}; outputs under {options.out_dir}/", err=True)
    if verbose:
        click.echo(f"hookviz: time: {run.timings.as_text()}", err=True)
    if batch["html"]:
        from .gallery import gallery_from_manifest

        page = gallery_from_manifest(options.out_dir)
        if not quiet:
            click.echo(f"hookviz: gallery: {page}", err=True)
    return 1 if counts["error"] else 0


class _progress:
    """A progress bar on stderr (images done, images/s, ETA) only when stderr is a terminal and not --quiet."""

    def __init__(self, total: int, hidden: bool):
        self.total, self.hidden, self.rate = total, hidden, 0.0
        self.bar: Any = None

    def __enter__(self) -> "_progress":
        stderr = click.get_text_stream("stderr")
        if not self.hidden and stderr.isatty() and self.total > 1:
            self.bar = click.progressbar(length=self.total, label="hookviz", file=stderr, show_eta=True, show_pos=True,
                                         item_show_func=lambda _: f"{self.rate:.1f} images/s" if self.rate else None)
            self.bar.__enter__()
        return self

    def advance(self, elapsed: float) -> None:
        if self.bar is not None:
            self.rate = (self.bar.pos + 1) / elapsed if elapsed > 0 else 0.0
            self.bar.update(1, True)

    def clear(self) -> None:
        """Erase the bar's line before other output, so lines do not mix; the next update redraws it."""
        if self.bar is not None:
            click.echo("\r\033[K", nl=False, err=True)

    def __exit__(self, *exc: Any) -> None:
        if self.bar is not None:
            self.bar.__exit__(*exc)


@contextmanager
def _tensorboard_images(log_dir: Path | None) -> Iterator[Any]:
    """An ImageSink writing to ``log_dir`` for the block (None without --tensorboard); closed even on errors."""
    if log_dir is None:
        yield None
        return
    from .tensorboard import ImageSink, summary_writer

    sink = ImageSink(summary_writer(log_dir))
    try:
        yield sink
    finally:
        sink.close()


def _batch_options(options: dict[str, Any]) -> dict[str, Any]:
    return {key: options.pop(key) for key in BATCH_KEYS}


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="hookviz")
def main() -> None:
    """Feature maps and CAM heatmaps for PyTorch CNNs, from the command line.

    MODEL is a torchvision model name (resnet50), a state_dict (.pt/.pth), a
    torch.export program (.pt2), or package.module:callable.

    \b
    Examples:
      hookviz layers resnet50
      hookviz fmaps model.pt2 photo.jpg -l layer1.0.conv1
      hookviz fmaps resnet18 photos/ --json | jq .outputs[].png
    """


@main.command()
@click.argument("model")
@apply(MODEL_OPTIONS)
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array instead of a table.")
@click.option("--all", "show_all", is_flag=True, help="Also list modules that did not run in the forward pass.")
@reports_errors
def layers(model: str, as_json: bool, show_all: bool, **options: Any) -> None:
    """List every layer with its type, output shape and parameter count.

    The layer that gradcam uses by default is marked with *.

    \b
    Example:
      hookviz layers resnet50 --weights none
    """
    from .layers import trace_layers

    loaded = _load(model, options, quiet=as_json)
    trace = trace_layers(loaded.module, loaded.preprocessing.input_size, loaded.device, batch=loaded.fixed_batch or 1)
    cam_layer = trace.default_cam_layer()
    rows = [info for info in trace.layers if show_all or info.output_shape is not None]
    if as_json:
        click.echo(json.dumps([
            {"name": info.name, "type": info.type, "output_shape": list(info.output_shape) if info.output_shape else None,
             "parameters": info.parameters, "calls": info.calls, "conv": info.is_conv, "cam_default": info.name == cam_layer}
            for info in rows
        ], indent=1))
        return
    name_width = max([len(info.name) for info in rows] + [5])
    type_width = max([len(info.type) for info in rows] + [4])
    click.echo(f"  {'layer':<{name_width}}  {'type':<{type_width}}  {'output shape':<20}  {'params':>11}")
    for info in rows:
        shape = "x".join(map(str, info.output_shape[1:])) if info.output_shape else "-"
        marker = "*" if info.name == cam_layer else " "
        calls = f"  (runs {info.calls}x)" if info.calls > 1 else ""
        click.echo(f"{marker} {info.name:<{name_width}}  {info.type:<{type_width}}  {shape:<20}  {info.parameters:>11,}{calls}")
    click.echo(f"* default CAM layer: {cam_layer or 'none (no layer with a spatial output)'}", err=True)


@main.command()
@click.argument("model")
@click.argument("images", nargs=-1, required=True)
@click.option("-l", "--layer", "layer_names", multiple=True, metavar="NAME", help="Layer to draw (repeatable; default: every Conv2d).")
@click.option("--max-channels", type=click.IntRange(min=1), default=64, show_default=True, help="At most N tiles: the N most active channels.")
@click.option("--cmap", default="viridis", show_default=True, help="A matplotlib colormap name.")
@click.option("--save-raw", is_flag=True, help="Also write each layer's output as float32 .npy (C, h, w).")
@click.option("--no-index", is_flag=True, help="Do not print channel indices on the tiles.")
@TENSORBOARD_OPTION
@apply(MODEL_OPTIONS)
@apply(IMAGE_OPTIONS)
@reports_errors
def fmaps(model: str, images: tuple[str, ...], layer_names: tuple[str, ...], max_channels: int, cmap: str,
          save_raw: bool, no_index: bool, tensorboard_dir: Path | None, **options: Any) -> None:
    """Write a feature-map grid per image and layer: DIR/<image-stem>/fmap_<layer>.png.

    \b
    Examples:
      hookviz fmaps resnet18 cat.jpg                      # every Conv2d layer
      hookviz fmaps model.pt2 photos/ -l layer2.0.conv1 --max-channels 16
    """
    from .errors import UsageError
    from .fmaps import FmapJob, FmapOptions
    from .hooks import resolve_layers
    from .layers import conv_layer_names
    from .render import colormap_lut

    batch = _batch_options(options)
    loaded = _load(model, options, batch["quiet"])
    names = list(layer_names) or conv_layer_names(loaded.module)
    if not names:
        raise UsageError("the model has no Conv2d layers; name layers with -l (see 'hookviz layers MODEL')")
    resolve_layers(loaded.module, names)
    colormap_lut(cmap)  # an unknown colormap fails before any work
    with _tensorboard_images(tensorboard_dir) as sink:
        job = FmapJob(loaded, FmapOptions(out_dir=batch["out_dir"], layers=names, max_channels=max_channels, cmap=cmap,
                                          save_raw=save_raw, label_channels=not no_index, layers_named=bool(layer_names),
                                          tensorboard=sink))
        code = _run_images(loaded, job, images, batch)
    sys.exit(code)


@main.command()
@click.argument("model")
@click.argument("images", nargs=-1, required=True)
@apply(CLASS_OPTIONS)
@click.option("-m", "--method", default="gradcam", show_default=True,
              type=click.Choice(["gradcam", "gradcam++", "xgradcam", "layercam", "hirescam", "scorecam", "eigencam", "cam"]))
@click.option("--alpha", type=click.FloatRange(0, 1), default=0.5, show_default=True, help="Heatmap opacity.")
@click.option("--cmap", default="jet", show_default=True, help="A matplotlib colormap name.")
@click.option("--save-raw", is_flag=True, help="Also write the heatmap as float32 .npy (H, W) of the original image, in [0, 1].")
@TENSORBOARD_OPTION
@apply(MODEL_OPTIONS)
@apply(IMAGE_OPTIONS)
@reports_errors
def gradcam(model: str, images: tuple[str, ...], class_values: tuple[str, ...], top_k: int, method: str,
            layer_name: str | None, alpha: float, cmap: str, save_raw: bool, tensorboard_dir: Path | None,
            **options: Any) -> None:
    """Write CAM heatmap overlays: DIR/<image-stem>/<method>_<layer>_c<class>.png.

    Overlays have the original image's size; with --crop, what the model did not see is dimmed.

    \b
    Examples:
      hookviz gradcam resnet50 cat.jpg                       # top-1 class, Grad-CAM
      hookviz gradcam resnet50 cat.jpg --class "tabby" -m gradcam++
      hookviz gradcam model.pt2 photos/ --top-k 3 --json | jq .predictions
      find photos -name '*.jpg' | hookviz gradcam resnet50 - --skip-existing -o maps
    """
    from .batch import default_batch_size
    from .explain import CamJob, CamOptions
    from .render import colormap_lut

    batch = _batch_options(options)
    loaded, classes, layer_name = _explain_setup(model, options, class_values, top_k, layer_name, batch["quiet"])
    colormap_lut(cmap)
    with _tensorboard_images(tensorboard_dir) as sink:
        job = CamJob(loaded, CamOptions(out_dir=batch["out_dir"], layer=layer_name, method=method, classes=classes,
                                        top_k=top_k, alpha=alpha, cmap=cmap, save_raw=save_raw,
                                        score_batch_size=batch["batch_size"] or default_batch_size(loaded.device),
                                        tensorboard=sink))
        code = _run_images(loaded, job, images, batch)
    sys.exit(code)


def _explain_setup(model: str, options: dict[str, Any], class_values: tuple[str, ...], top_k: int,
                   layer_name: str | None, quiet: bool):
    """Load the model, resolve --class values and the target layer (the default one when -l is omitted)."""
    from .errors import UsageError
    from .hooks import resolve_layers
    from .layers import trace_layers

    if class_values and top_k != 1:
        raise UsageError("give either --class or --top-k, not both")
    loaded = _load(model, options, quiet)
    classes = list(dict.fromkeys(loaded.class_index(value) for value in class_values))  # a repeat would overwrite its own file
    if layer_name is None:
        layer_name = trace_layers(loaded.module, loaded.preprocessing.input_size, loaded.device,
                                  batch=loaded.fixed_batch or 1).default_cam_layer()
        if layer_name is None:
            raise UsageError("the model has no layer with a spatial output to explain; name one with -l")
        if not quiet:
            click.echo(f"hookviz: layer: {layer_name} (default; choose another with -l)", err=True)
    resolve_layers(loaded.module, [layer_name])
    return loaded, classes, layer_name




@main.command()
@click.argument("model")
@click.argument("images", nargs=-1, required=True)
@apply(CLASS_OPTIONS)
@apply(MODEL_OPTIONS)
@apply(IMAGE_OPTIONS)
@reports_errors
def guided(model: str, images: tuple[str, ...], class_values: tuple[str, ...], top_k: int, layer_name: str | None,
           **options: Any) -> None:
    """Write guided backpropagation and guided Grad-CAM images per image and class.

    DIR/<image-stem>/guided_c<class>.png and guided-gradcam_<layer>_c<class>.png,
    at the original image's size. Needs a model with ReLU modules.

    \b
    Examples:
      hookviz guided resnet50 cat.jpg
      hookviz guided resnet50 cat.jpg --class "tabby" -l layer3
    """
    from .explain import CamOptions, GuidedJob

    batch = _batch_options(options)
    loaded, classes, layer_name = _explain_setup(model, options, class_values, top_k, layer_name, batch["quiet"])
    job = GuidedJob(loaded, CamOptions(out_dir=batch["out_dir"], layer=layer_name, classes=classes, top_k=top_k))
    sys.exit(_run_images(loaded, job, images, batch))


@main.command()
@click.argument("model")
@click.argument("images", nargs=-1, required=True)
@click.option("-l", "--layer", "layer_names", multiple=True, metavar="NAME", help="Layer to measure (repeatable; default: every Conv2d and Linear).")
@click.option("--bins", type=click.IntRange(min=4, max=10_000), default=100, show_default=True, help="Histogram bins per layer.")
@click.option("-o", "--out-dir", type=click.Path(file_okay=False, path_type=Path), default=Path("out"), show_default=True,
              help="Where stats.png (one histogram row per layer) is written.")
@click.option("--overwrite", is_flag=True, help="Replace an existing DIR/stats.png.")
@CROP_OPTION
@BATCH_SIZE_OPTION
@click.option("--workers", type=click.IntRange(min=0), default=0, show_default=True, metavar="N", help="Processes decoding images in the background.")
@MAX_PIXELS_OPTION
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object per layer (JSON Lines) instead of the table.")
@QUIET_OPTION
@TENSORBOARD_OPTION
@apply(MODEL_OPTIONS)
@reports_errors
def stats(model: str, images: tuple[str, ...], layer_names: tuple[str, ...], bins: int, out_dir: Path, overwrite: bool,
          crop: bool, batch_size: int | None, workers: int, max_pixels: int | None, as_json: bool, quiet: bool,
          tensorboard_dir: Path | None, **options: Any) -> None:
    """Activation statistics per layer over all images: mean, std, min, max, zeros, dead channels, histogram.

    A zero is a value a ReLU would zero (<= 0); a dead channel is never > 0 on any
    image at any position. Memory stays flat however many images: statistics and
    fixed-bin histograms are updated batch by batch.

    \b
    Examples:
      hookviz stats resnet50 photos/                    # table + out/stats.png
      hookviz stats model.pt2 photos/ -l layer4 --json | jq '{layer, dead_channels}'
    """
    from .batch import default_batch_size
    from .errors import UsageError
    from .images import collect_inputs
    from .output import output_stems, prepare_output_dir
    from .pipeline import PreparedImage, image_batches, model_batch
    from .stats import StatsCollector, format_table, histogram_figure

    loaded = _load(model, options, quiet)
    collector = StatsCollector(loaded.module, list(layer_names) or None, bins=bins)
    if not collector.stats:
        raise UsageError("the model has no Conv2d or Linear layers; name layers with -l (see 'hookviz layers MODEL')")
    figure_path = prepare_output_dir(out_dir) / "stats.png"
    if figure_path.exists() and not overwrite:
        raise UsageError(f"{figure_path} already exists; pass --overwrite to replace it, or choose another -o")
    paths = collect_inputs(images)
    stems = output_stems(paths)
    writer = None
    if tensorboard_dir is not None:  # a missing tensorboard package fails before any work
        from .tensorboard import summary_writer

        writer = summary_writer(tensorboard_dir)
    failed = 0
    for slots in image_batches([(path, stems[path]) for path in paths], loaded, crop=crop,
                               batch_size=batch_size or default_batch_size(loaded.device),
                               workers=workers, max_pixels=max_pixels):
        prepared = [slot for slot in slots if isinstance(slot, PreparedImage)]
        for record in slots:
            if not isinstance(record, PreparedImage):
                failed += 1
                click.echo(f"hookviz: error: {record.error}", err=True)
        if prepared:
            collector.update(model_batch(prepared, loaded)[:len(prepared)])
    if collector.images == 0:
        raise UsageError("no image could be read; nothing to measure")
    results = collector.results()
    histogram_figure(results, figure_path)
    if writer is not None:
        from .tensorboard import add_layer_statistics

        add_layer_statistics(writer, results)
        writer.close()
    if as_json:
        for name, layer_stats in results.items():
            click.echo(json.dumps({"layer": name, **layer_stats.as_dict()}))
    else:
        click.echo(format_table(results))
    if not quiet:
        click.echo(f"hookviz: {collector.images} image(s), {len(results)} layer(s); histograms in {figure_path}", err=True)
    sys.exit(1 if failed else 0)


@main.command()
@click.argument("model")
@click.argument("image")
@click.option("-c", "--class", "class_value", metavar="C", help="Class whose score is backpropagated (default: the top-1 prediction).")
@CROP_OPTION
@click.option("--json", "as_json", is_flag=True, help="Print the trace as one JSON object.")
@QUIET_OPTION
@apply(MODEL_OPTIONS)
@reports_errors
def trace(model: str, image: str, class_value: str | None, crop: bool, as_json: bool, quiet: bool, **options: Any) -> None:
    """Print every module's forward inputs and outputs, then the gradients flowing back, for one image.

    Forward rows come in execution order with shapes and value ranges; backward
    rows in the order autograd reaches each module's output, with the gradient's
    shape and norm (zero and non-finite gradients are flagged). Gradients are read
    with tensor hooks, so in-place ops and the model's parameters are left alone.

    \b
    Examples:
      hookviz trace resnet18 cat.jpg
      hookviz trace model.pt2 cat.jpg -c 281 --json | jq '.events[] | select(.direction == "backward") | .output.norm'
    """
    from .pipeline import prepare_image
    from .trace import format_trace, trace_model

    loaded = _load(model, options, quiet)
    class_index = loaded.class_index(class_value) if class_value is not None else None
    prepared = prepare_image(Path(image), Path(image).stem, loaded.preprocessing, crop)  # InputError: exit 1
    batch = prepared.tensor[None].to(loaded.device)
    if loaded.fixed_batch is not None:
        batch = batch.expand(loaded.fixed_batch, *batch.shape[1:])
    result = trace_model(loaded.module, batch, class_index=class_index, output_key=loaded.output_key)
    if as_json:
        click.echo(json.dumps(result.as_json()))
    else:
        click.echo(format_trace(result))
    if not quiet:
        label = loaded.label(result.classes[0])
        click.echo(f"hookviz: traced {len(result.forward)} module calls and {len(result.backward)} gradients "
                   f"for class {result.classes[0]} ({label})", err=True)
