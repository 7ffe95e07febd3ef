"""``hookviz audit``: a labelled set in, how the model does on it out; and ``gradcam --expected``'s steps.

The audit is a command of its own rather than a mode of ``gradcam``: its input is one labelled set (a folder
in the ImageFolder layout or a label file), not a list of images, and its result is about the set (audit.json,
confusion.png, per_class.png, a summary on stdout) where gradcam's is a picture per image. ``gradcam
--expected`` is the per-image half: the same maps and records, no summary.
"""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import click

from ..manifest import json_line
from .options import (
    ModelArgs,
    RunArgs,
    TargetArgs,
    caption_option,
    method_option,
    model_options,
    run_options,
)
from .report import note, reports_errors, say
from .runs import explained, run_batch

if TYPE_CHECKING:
    from ..jobs import CamJob, LabelledCamJob

EXPLAIN = ("both", "predicted", "expected")


def expected_target(target: TargetArgs, expected: str | None) -> tuple[TargetArgs, str]:
    """With ``--expected``, -c says which class to explain (expected, predicted or both): the target without
    it, and that choice. Without ``--expected``, the target as it is."""
    from ..errors import UsageError

    if expected is None:
        return target, "predicted"
    if target.top_k != 1:
        raise UsageError("--expected explains the top-1 prediction and the expected class; leave out --top-k")
    values = [value.strip().lower() for value in target.class_values]
    if len(values) > 1 or any(value not in EXPLAIN for value in values):
        given = " ".join(f"-c {value}" for value in target.class_values)
        raise UsageError(f"with --expected, -c is one of expected, predicted, both (default both), not {given!r}")
    return replace(target, class_values=()), values[0] if values else "both"


def labelled_job(job: CamJob, expected: str, images: tuple[str, ...], explain: str) -> LabelledCamJob:
    """``job`` over inputs labelled by ``--expected`` (``folder`` or a label file), explaining ``explain``."""
    from ..jobs import LabelledCamJob
    from ..labels import expected_labels

    loaded = job.loaded
    labels = expected_labels(expected, images, class_names=loaded.labels, num_classes=loaded.output_count())
    return LabelledCamJob(loaded, job.options, labels, explain)


@click.command()
@click.argument("model")
@click.argument("labelled", metavar="FOLDER|FILE")
@click.option(
    "-c",
    "--class",
    "explain",
    type=click.Choice(EXPLAIN),
    default="both",
    show_default=True,
    help="Which class each map explains: both (one map where the model is right, else predicted | expected side by "
    "side), the top-1 prediction, or the expected class.",
)
@click.option("-l", "--layer", "layer_name", metavar="NAME", help="Target layer (default: the last spatial layer).")
@method_option
@click.option("--alpha", type=click.FloatRange(0, 1), default=0.5, show_default=True, help="Heatmap opacity.")
@click.option("--cmap", default="jet", show_default=True, help="A matplotlib colormap name.")
@click.option(
    "--list",
    "listed",
    type=click.IntRange(min=0),
    default=10,
    show_default=True,
    metavar="N",
    help="Confused pairs, confident mistakes and unsure correct inputs listed in the summary and audit.json.",
)
@caption_option
@model_options
@run_options
@reports_errors
def audit(
    model: str,
    labelled: str,
    explain: str,
    layer_name: str | None,
    method: str,
    alpha: float,
    cmap: str,
    listed: int,
    no_caption: bool,
    model_args: ModelArgs,
    run: RunArgs,
) -> None:
    """Audit a labelled set: accuracy, per-class precision and recall, the most confused classes, the most
    confident mistakes, with a CAM of each image.

    FOLDER holds one folder per class (hookviz audit model.pt2 photos/ for photos/<class name>/*.jpg, the names
    matched to the model's class names);
    FILE is a CSV file with a header line path,label or a JSON Lines file of {"input": ..., "label": ...}
    (paths relative to the file; a label is a class index or name). Writes DIR/audit.json, DIR/confusion.png,
    DIR/per_class.png and DIR/<image-stem>/ maps, and prints the summary (--json: audit.json's object).
    Batched, resumable (--skip-existing) and shardable as every run; the audit covers what the manifest records.

    \b
    Examples:
      hookviz audit out/efficientnet_lite0.pt2 sample_images/labels.csv --labels imagenet -o audit
      find photos -name '*.jpg' -printf '{"input": "%p", "label": 281}\\n' > labels.jsonl && hookviz audit model.pt2 labels.jsonl --html -o audit
      find photos -name '*.jpg' -printf '{"input": "%p", "label": 281}\\n' > labels.jsonl && hookviz audit model.pt2 labels.jsonl --json -q | jq .accuracy
    """
    from ..audit import audit_items, format_summary, make_audit, manifest_records, write_audit
    from ..batch import default_batch_size
    from ..errors import HookvizError, UsageError
    from ..jobs import CamOptions, LabelledCamJob
    from ..labels import expected_labels
    from ..manifest import options_key
    from ..output import input_identity
    from ..render import colormap_lut

    colormap_lut(cmap)
    if not Path(labelled).exists():
        raise UsageError(
            f"{labelled}: no such folder or file; give a folder of class folders, a CSV file or a JSON Lines file"
        )
    target = TargetArgs(class_values=(), top_k=1, layer_names=(layer_name,) if layer_name else ())
    loaded, _, layer = explained(model, model_args, target, run.quiet)
    labels = expected_labels(labelled, (), class_names=loaded.labels, num_classes=loaded.output_count())
    options = CamOptions(
        out_dir=run.out_dir,
        layer=layer,
        method=method,
        alpha=alpha,
        cmap=cmap,
        score_batch_size=run.batch_size or default_batch_size(loaded.device),
        caption=not no_caption,
        file_format=run.file_format,
        quality=run.quality,
    )
    job = LabelledCamJob(loaded, options, labels, explain)
    job.command = "audit"  # the manifest and the gallery name the run an audit
    code = run_batch(loaded, job, tuple(map(str, labels.inputs)), replace(run, as_json=False), print_outputs=False)
    key = options_key(job.command, loaded.spec, loaded.preprocessing, run.crop, job.settings())
    records = manifest_records(run.out_dir, key, [input_identity(path) for path in labels.inputs])
    items, failed = audit_items(records)
    result = make_audit(items, loaded.label, failed=failed, listed=listed)
    try:
        written = write_audit(result, run.out_dir)
    except OSError as exc:
        raise HookvizError(f"cannot write the audit in {run.out_dir} ({exc.strerror or exc})") from None
    say(json_line(result.as_json()) if run.as_json else format_summary(result))
    if not run.quiet:
        missing = len(labels.inputs) - len(records)
        if missing:
            note(
                f"the audit covers {len(records)} of {len(labels.inputs)} inputs; when the other shards are done, "
                "run it again with --skip-existing"
            )
        note(f"audit: {written['audit']}, {written['confusion']}, {written['per_class']}")
    sys.exit(code)
