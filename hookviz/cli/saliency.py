"""``hookviz saliency``: pixel attribution (gradient, input x gradient, SmoothGrad, Integrated Gradients, guided)."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

import click

from ..methods import SALIENCY_METHODS
from .options import ModelArgs, RunArgs, TargetArgs, caption_option, model_options, run_options, target_options
from .report import reports_errors
from .runs import check_classes, explained, load, run_batch

if TYPE_CHECKING:
    from ..models import LoadedModel


@click.command()
@click.argument("model")
@click.argument("images", nargs=-1, required=True)
@click.option(
    "-m",
    "--method",
    default="smoothgrad",
    show_default=True,
    metavar="|".join(SALIENCY_METHODS),
    help="gradient: d score / d pixel; inputxgradient: pixel times gradient; smoothgrad: the mean gradient over "
    "noisy copies; integrated-gradients: along the path from a baseline; guided: guided backprop (ReLU models).",
)
@click.option("--samples", type=int, default=25, show_default=True, metavar="N", help="smoothgrad: noisy copies.")
@click.option(
    "--noise",
    type=float,
    default=0.15,
    show_default=True,
    metavar="SIGMA",
    help="smoothgrad: the noise's standard deviation as a fraction of the image's value range.",
)
@click.option(
    "--steps", type=int, default=32, show_default=True, metavar="N", help="integrated-gradients: path points."
)
@click.option(
    "--baseline",
    default="black",
    show_default=True,
    metavar="black|blur|noise",
    help="integrated-gradients: where the path starts (a black image, the image blurred, or uniform noise).",
)
@click.option("--seed", type=int, default=0, show_default=True, help="Seeds smoothgrad's noise and the noise baseline.")
@target_options
@click.option(
    "--alpha", type=click.FloatRange(0, 1), default=0.8, show_default=True, help="Heat opacity where it is strongest."
)
@click.option("--cmap", default="inferno", show_default=True, help="A matplotlib colormap name for the heat.")
@click.option(
    "--save-raw",
    is_flag=True,
    help="Also write |attribution| summed over channels as float32 .npy (H, W) of the original image, not normalized.",
)
@caption_option
@model_options
@run_options
@reports_errors
def saliency(
    model: str,
    images: tuple[str, ...],
    method: str,
    samples: int,
    noise: float,
    steps: int,
    baseline: str,
    seed: int,
    target: TargetArgs,
    alpha: float,
    cmap: str,
    save_raw: bool,
    no_caption: bool,
    model_args: ModelArgs,
    run: RunArgs,
) -> None:
    """Write pixel attributions per image and class, for any activation function (SiLU, GELU, ...).

    DIR/<image-stem>/<method>-heat_c<class>.png (|attribution| summed over channels, over the photo) and
    <method>_c<class>.png (the signed attribution, grey = 0), at the original image's size. -l LAYER (none by
    default) multiplies the attribution by that layer's Grad-CAM map, as guided Grad-CAM does, and names the files
    <method>-gradcam-heat_<layer>_c<class>.png and <method>-gradcam_<layer>_c<class>.png.

    \b
    Examples:
      hookviz saliency out/efficientnet_lite0.pt2 cat.jpg --labels imagenet
      hookviz saliency resnet50 cat.jpg -m integrated-gradients --steps 64 --baseline blur
      hookviz saliency resnet50 cat.jpg -m gradient --class "tabby" -l layer4
    """
    from ..attribution import check_method, check_settings
    from ..batch import default_batch_size
    from ..guided import relu_modules
    from ..jobs import SaliencyJob, SaliencyOptions
    from ..render import colormap_lut

    check_method(method)
    check_settings(samples=samples, noise=noise, steps=steps, baseline=baseline)
    colormap_lut(cmap)  # an unknown colormap fails before the model loads
    loaded, classes, layer = _explained(model, model_args, target, run.quiet)
    if method == "guided":
        relu_modules(loaded.module)  # a model without ReLUs fails now, not after the first batch
    job = SaliencyJob(
        loaded,
        SaliencyOptions(
            out_dir=run.out_dir,
            method=method,
            classes=classes,
            top_k=target.top_k,
            samples=samples,
            noise=noise,
            steps=steps,
            baseline=baseline,
            seed=seed,
            layer=layer,
            alpha=alpha,
            cmap=cmap,
            save_raw=save_raw,
            batch_size=run.batch_size or default_batch_size(loaded.device),
            caption=not no_caption,
            file_format=run.file_format,
            quality=run.quality,
        ),
    )
    sys.exit(run_batch(loaded, job, images, run))


def _explained(
    spec: str, model_args: ModelArgs, target: TargetArgs, quiet: bool
) -> tuple[LoadedModel, list[int], str | None]:
    """As runs.explained, but a layer only when -l names one: pixel attributions need none."""
    from ..errors import UsageError

    if target.layer_names:
        return explained(spec, model_args, target, quiet)
    if target.class_values and target.top_k != 1:
        raise UsageError("give either --class or --top-k, not both")
    loaded = load(spec, model_args, quiet)
    classes = list(dict.fromkeys(loaded.class_index(value) for value in target.class_values))
    check_classes(loaded, classes, target.top_k, labels_given=model_args.labels is not None)
    return loaded, classes, None
