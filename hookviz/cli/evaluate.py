"""``hookviz evaluate``: which map can be trusted? Faithfulness metrics for every method and layer, and a ranking."""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import click

from ..manifest import json_line
from ..methods import CAM_METHODS
from .options import ModelArgs, RunArgs, TargetArgs, model_options, run_options, target_options
from .report import note, reports_errors, say
from .runs import explained_layers, run_batch, write_gallery

if TYPE_CHECKING:
    from ..models import LoadedModel

METHOD_CHOICES = (*CAM_METHODS, "guided", "random")
METRIC_NAMES = ("deletion", "insertion", "drop", "increase", "road", "sanity", "pointing", "energy")  # metrics.METRICS


@click.command()
@click.argument("model")
@click.argument("images", nargs=-1, required=True)
@click.option(
    "-m",
    "--method",
    "methods",
    multiple=True,
    type=click.Choice(METHOD_CHOICES),
    help="Method to score (repeatable; default: every CAM method that applies to the model, and the random "
    "baseline). guided: guided backprop's |gradient|; random: uniform noise at the layer's resolution.",
)
@target_options
@click.option(
    "--metric",
    "metric_names",
    multiple=True,
    metavar="NAME",
    help=f"Metric (repeatable): {', '.join(METRIC_NAMES)} (default: deletion, insertion, drop, increase, road; "
    "with --truth also pointing and energy).",
)
@click.option(
    "--steps",
    type=click.IntRange(min=2, max=1000),
    default=20,
    show_default=True,
    help="Steps of the deletion and insertion curves.",
)
@click.option(
    "--truth",
    "truth_file",
    type=click.Path(dir_okay=False, path_type=Path),
    metavar="FILE.csv",
    help="Object boxes for pointing/energy: lines path,x0,y0,x1,y1[,class] in the image's pixels.",
)
@click.option(
    "--truth-masks",
    "truth_masks",
    type=click.Path(file_okay=False, path_type=Path),
    metavar="DIR",
    help="Object masks for pointing/energy: DIR/<image stem>.png, non-zero on the object, the image's size.",
)
@model_options
@run_options
@reports_errors
def evaluate(
    model: str,
    images: tuple[str, ...],
    methods: tuple[str, ...],
    target: TargetArgs,
    metric_names: tuple[str, ...],
    steps: int,
    truth_file: Path | None,
    truth_masks: Path | None,
    model_args: ModelArgs,
    run: RunArgs,
) -> None:
    """Score how faithful each method's map is to the model, and rank methods and layers.

    Per image DIR/<image-stem>/evaluate_c<class>.png shows the maps and their deletion and insertion
    curves; every map's numbers go into the JSON records and DIR/manifest.jsonl. At the end: a table
    (mean and 95% bootstrap interval per method and layer, ranked, * the best), DIR/evaluate.json and
    DIR/evaluate.png (and DIR/sanity.png with --metric sanity). Several -l: each layer is scored on its own.

    \b
    Examples:
      hookviz evaluate model.pt2 photos/ -m gradcam -m layercam -m random -o eval
      hookviz evaluate model.pt2 cat.jpg -m gradcam --metric deletion --metric insertion --steps 10
      hookviz evaluate model.pt2 cat.jpg -m gradcam -m guided --metric sanity --json | tail -1 | jq .rows
    """
    from ..errors import HookvizError, UsageError
    from ..evaluation import (
        EvaluateJob,
        EvaluateOptions,
        Truth,
        read_truth_boxes,
        sanity_figure,
        summarize,
        summary_json,
        summary_table,
        write_summary,
    )
    from ..images import collect_inputs
    from ..manifest import Manifest, options_key
    from ..metrics import DEFAULT_METRICS, TRUTH_METRICS, check_metrics, score_names
    from ..output import input_identity, write_png

    metrics = check_metrics(metric_names or DEFAULT_METRICS)
    if run.file_format != "png":
        raise UsageError(f"evaluate writes its figures as PNG only; drop --format {run.file_format}")
    if truth_file is not None and truth_masks is not None:
        raise UsageError("give either --truth or --truth-masks, not both")
    truth = None
    if truth_file is not None:
        truth = read_truth_boxes(truth_file)
    elif truth_masks is not None:
        if not truth_masks.is_dir():
            raise UsageError(f"--truth-masks {truth_masks}: not a folder of masks")
        truth = Truth(masks=truth_masks)
    for name in metrics:
        if name in TRUTH_METRICS and truth is None:
            raise UsageError(
                f"metric {name} needs to know where the object is: give --truth FILE.csv (path,x0,y0,x1,y1) "
                "or --truth-masks DIR"
            )
    if truth is not None and not metric_names:
        metrics += list(TRUTH_METRICS)
    loaded, classes, layers = explained_layers(model, model_args, target, run.quiet)
    check_classifier(loaded)
    chosen = list(dict.fromkeys(methods)) or [*applicable_methods(loaded, layers[0], run.quiet), "random"]
    paths = collect_inputs(images)
    options = EvaluateOptions(
        out_dir=run.out_dir,
        methods=chosen,
        layers=layers,
        metrics=metrics,
        classes=classes,
        top_k=target.top_k,
        steps=steps,
        truth=truth,
        chunk=run.batch_size or 16,
    )
    job = EvaluateJob(loaded, options)
    code = run_batch(loaded, job, tuple(str(path) for path in paths), replace(run, html=False))
    # The summary covers these inputs' latest records of evaluate runs with these options (resumed runs too).
    key = options_key(job.command, loaded.spec, loaded.preprocessing, run.crop, job.settings())
    wanted = {input_identity(path) for path in paths}
    latest = {}
    for entry in Manifest(run.out_dir).input_entries():
        if entry.get("identity") in wanted and entry.get("key") == key:
            latest[entry["identity"]] = entry
    records = list(latest.values())
    summary = summarize(records, score_names(metrics))
    try:
        json_path, picture = write_summary(summary, run.out_dir)
        figure = sanity_figure(records) if "sanity" in metrics else None
        if figure is not None:
            write_png(figure, run.out_dir / "sanity.png", {"hookviz:command": "evaluate"})
    except OSError as exc:
        raise HookvizError(f"cannot write the summary in {run.out_dir} ({exc.strerror or exc})") from None
    if run.as_json:
        say(json_line(summary_json(summary)))
    elif summary.rows:
        say(summary_table(summary))
    if not run.quiet:
        flagged = [row.name for row in summary.rows if row.flags]
        if flagged:
            note(
                f"sanity: the map of {', '.join(flagged)} hardly changes when the model is randomized "
                "(Adebayo et al.): it shows the image more than the model"
            )
        note(f"ranking of {len(summary.rows)} method(s) on {summary.images} image(s): {picture}, {json_path}")
    if run.html:
        write_gallery(run.out_dir, run.quiet)
    sys.exit(code)


def applicable_methods(loaded: LoadedModel, layer: str, quiet: bool) -> list[str]:
    """Every CAM method that works for this model at ``layer``: CAM needs global pooling and one linear layer."""
    import torch

    from ..cams import compute_cams
    from ..errors import UsageError

    module = loaded.module
    preprocessing = loaded.preprocessing
    probe = torch.zeros(
        loaded.fixed_batch or 1, preprocessing.channels, *preprocessing.input_size, device=loaded.device
    )
    methods = []
    # Score-CAM and Ablation-CAM cost a forward pass per channel of the layer (1280 on the demo model), each
    # image: asked for with -m, not run unasked.
    per_channel = ("scorecam", "ablationcam")
    if not quiet:
        note(f"{' and '.join(per_channel)} are left out by default (a forward pass per channel); add them with -m")
    for method in CAM_METHODS:
        if method in per_channel:
            continue
        if method == "cam":
            try:
                compute_cams(module, probe, layer=layer, method="cam", output_key=loaded.output_key)
            except UsageError:
                if not quiet:
                    note(
                        f"method cam does not apply at {layer} (not followed by pooling and one linear layer); skipped"
                    )
                continue
        methods.append(method)
    return methods


def gradcam_metrics(names: tuple[str, ...]) -> list[str]:
    """``gradcam --metric`` values, checked before the model loads: the perturbation metrics only."""
    from ..errors import UsageError
    from ..metrics import check_metrics

    metrics = check_metrics(names)
    for name in metrics:
        if name not in ("deletion", "insertion", "drop", "increase", "road"):
            raise UsageError(f"gradcam --metric {name}: use 'hookviz evaluate --metric {name}' for it")
    return metrics


def check_classifier(loaded: LoadedModel) -> None:
    """evaluate's metrics are class probabilities (softmax): refuse, in one line, models without several classes."""
    from ..errors import UsageError

    shape = loaded.output_shape()
    if shape is not None and len(shape) == 2 and shape[1] > 1:
        return
    kind = (
        "a detector's boxes"
        if shape is None
        else "a single output"
        if len(shape) <= 2
        else f"an output of shape {shape} (segmentation?)"
    )
    raise UsageError(
        f"evaluate scores maps by class probabilities (the softmax of several outputs), and this model gives {kind}; "
        "explain it with gradcam"
    )
