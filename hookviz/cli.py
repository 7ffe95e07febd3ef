"""The ``hookviz`` command line: a thin layer over the library.

torch and torchvision are imported inside the commands, so ``hookviz --help``
answers at once. Library errors become one line on stderr and an exit code
(2 usage, 1 failed inputs); stdout carries only output paths or JSON Lines.
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path
from typing import Any, Callable, Iterable

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

IMAGE_OPTIONS = [
    click.option("-o", "--out-dir", type=click.Path(file_okay=False, path_type=Path), default=Path("out"),
                 show_default=True, help="Output directory; each input gets DIR/<image-stem>/."),
    click.option("--crop", is_flag=True, help="Use the weights' resize + center crop instead of the whole image."),
    click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True),
    click.option("--json", "as_json", is_flag=True, help="Print one JSON object per input on stdout (JSON Lines)."),
    click.option("-q", "--quiet", is_flag=True, help="No messages on stderr except errors."),
]

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
    from .models import load_model

    loaded = load_model(model, **{key: options.pop(key) for key in MODEL_KEYS})
    if not quiet:
        click.echo(f"hookviz: model: {loaded.description}", err=True)
    return loaded


def _report(records: Iterable[Any], as_json: bool) -> int:
    """Print each record as it finishes; return the exit code (1 if any input failed)."""
    failed = 0
    for record in records:
        if as_json:
            click.echo(json.dumps(record.as_json()))
        else:
            for output in record.outputs:
                click.echo(output["png"])
        if record.status != "ok":
            failed += 1
            click.echo(f"hookviz: error: {record.error}", err=True)
    return 1 if failed else 0


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
@apply(MODEL_OPTIONS)
@apply(IMAGE_OPTIONS)
@reports_errors
def fmaps(model: str, images: tuple[str, ...], layer_names: tuple[str, ...], max_channels: int, cmap: str,
          save_raw: bool, no_index: bool, out_dir: Path, crop: bool, batch_size: int, as_json: bool, quiet: bool,
          **options: Any) -> None:
    """Write a feature-map grid per image and layer: DIR/<image-stem>/fmap_<layer>.png.

    \b
    Examples:
      hookviz fmaps resnet18 cat.jpg                      # every Conv2d layer
      hookviz fmaps model.pt2 photos/ -l layer2.0.conv1 --max-channels 16
    """
    from .errors import UsageError
    from .fmaps import FmapOptions, write_feature_maps
    from .hooks import resolve_layers
    from .images import collect_inputs
    from .layers import conv_layer_names
    from .output import prepare_output_dir
    from .pipeline import run_batches
    from .render import colormap_lut

    loaded = _load(model, options, quiet)
    names = list(layer_names) or conv_layer_names(loaded.module)
    if not names:
        raise UsageError("the model has no Conv2d layers; name layers with -l (see 'hookviz layers MODEL')")
    resolve_layers(loaded.module, names)
    colormap_lut(cmap)  # an unknown colormap fails before any work
    paths = collect_inputs(images)
    fmap_options = FmapOptions(out_dir=prepare_output_dir(out_dir), layers=names, max_channels=max_channels,
                               cmap=cmap, save_raw=save_raw, label_channels=not no_index,
                               layers_named=bool(layer_names))
    records = run_batches(paths, loaded, lambda batch: write_feature_maps(loaded, batch, fmap_options),
                          crop=crop, batch_size=batch_size)
    code = _report(records, as_json)
    if not quiet:
        click.echo(f"hookviz: wrote feature maps of {len(names)} layer(s) under {out_dir}/", err=True)
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
@apply(MODEL_OPTIONS)
@apply(IMAGE_OPTIONS)
@reports_errors
def gradcam(model: str, images: tuple[str, ...], class_values: tuple[str, ...], top_k: int, method: str,
            layer_name: str | None, alpha: float, cmap: str, save_raw: bool, out_dir: Path, crop: bool,
            batch_size: int, as_json: bool, quiet: bool, **options: Any) -> None:
    """Write CAM heatmap overlays: DIR/<image-stem>/<method>_<layer>_c<class>.png.

    Overlays have the original image's size; with --crop, what the model did not see is dimmed.

    \b
    Examples:
      hookviz gradcam resnet50 cat.jpg                       # top-1 class, Grad-CAM
      hookviz gradcam resnet50 cat.jpg --class "tabby" -m gradcam++
      hookviz gradcam model.pt2 photos/ --top-k 3 --json | jq .predictions
    """
    from .explain import CamOptions, write_cams
    from .images import collect_inputs
    from .output import prepare_output_dir
    from .pipeline import run_batches
    from .render import colormap_lut

    loaded, classes, layer_name = _explain_setup(model, options, class_values, top_k, layer_name, quiet)
    colormap_lut(cmap)
    paths = collect_inputs(images)
    cam_options = CamOptions(out_dir=prepare_output_dir(out_dir), layer=layer_name, method=method, classes=classes,
                             top_k=top_k, alpha=alpha, cmap=cmap, save_raw=save_raw, score_batch_size=batch_size)
    records = run_batches(paths, loaded, lambda batch: write_cams(loaded, batch, cam_options), crop=crop, batch_size=batch_size)
    code = _report(records, as_json)
    if not quiet:
        click.echo(f"hookviz: wrote {method} overlays under {out_dir}/", err=True)
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
           out_dir: Path, crop: bool, batch_size: int, as_json: bool, quiet: bool, **options: Any) -> None:
    """Write guided backpropagation and guided Grad-CAM images per image and class.

    DIR/<image-stem>/guided_c<class>.png and guided-gradcam_<layer>_c<class>.png,
    at the original image's size. Needs a model with ReLU modules.

    \b
    Examples:
      hookviz guided resnet50 cat.jpg
      hookviz guided resnet50 cat.jpg --class "tabby" -l layer3
    """
    from .explain import CamOptions, write_guided
    from .images import collect_inputs
    from .output import prepare_output_dir
    from .pipeline import run_batches

    loaded, classes, layer_name = _explain_setup(model, options, class_values, top_k, layer_name, quiet)
    paths = collect_inputs(images)
    guided_options = CamOptions(out_dir=prepare_output_dir(out_dir), layer=layer_name, classes=classes, top_k=top_k)
    records = run_batches(paths, loaded, lambda batch: write_guided(loaded, batch, guided_options), crop=crop, batch_size=batch_size)
    code = _report(records, as_json)
    if not quiet:
        click.echo(f"hookviz: wrote guided backpropagation images under {out_dir}/", err=True)
    sys.exit(code)
