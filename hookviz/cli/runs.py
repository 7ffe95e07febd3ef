"""The steps every command shares around the library: load the model, choose what to explain, run a batch.

Library imports happen inside the functions, so ``hookviz --help`` never imports torch.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .options import ModelArgs, RunArgs, ScoreArgs, TargetArgs
from .report import note, report_records, summary_line

if TYPE_CHECKING:
    from ..layers import ModelTrace
    from ..models import LoadedModel
    from ..pipeline import Job
    from ..targets import TargetSpec


def load(spec: str, model_args: ModelArgs, quiet: bool) -> LoadedModel:
    """Load MODEL with the model options; say what was loaded unless ``quiet``."""
    from ..memory import keep_freed_memory
    from ..models import load_model

    keep_freed_memory()  # before the first large allocation: see hookviz/memory.py
    loaded = load_model(spec, **asdict(model_args))
    if not quiet:
        note(f"model: {loaded.description}")
    return loaded


def explained(
    spec: str, model_args: ModelArgs, target: TargetArgs, quiet: bool, score: ScoreArgs | None = None
) -> tuple[LoadedModel, list[int], str]:
    """Load the model, resolve the --class values and the one target layer (the default one when -l is omitted)."""
    from ..errors import UsageError

    if len(target.layer_names) > 1:
        raise UsageError("this command explains one layer; give -l once (gradcam fuses several)")
    loaded, classes, layers = explained_layers(spec, model_args, target, quiet, score)
    return loaded, classes, layers[0]


def explained_layers(
    spec: str, model_args: ModelArgs, target: TargetArgs, quiet: bool, score: ScoreArgs | None = None
) -> tuple[LoadedModel, list[int], list[str]]:
    """Load the model, resolve the --class values and the target layers (the default one when -l is omitted;
    with ``--embedding-layer``, none that finishes after it: a later layer cannot change the embedding)."""
    from ..errors import UsageError
    from ..hooks import resolve_layers

    if target.class_values and target.top_k != 1:
        raise UsageError("give either --class or --top-k, not both")
    if len(set(target.layer_names)) != len(target.layer_names):
        raise UsageError("a layer is given twice with -l; give each layer once")
    loaded = load(spec, model_args, quiet)
    # A class given twice would overwrite its own file: each is explained once.
    classes = list(dict.fromkeys(loaded.class_index(value) for value in target.class_values))
    check_classes(loaded, classes, target.top_k, labels_given=model_args.labels is not None)
    layers = list(target.layer_names)
    calls = None
    if not layers:
        trace = traced(loaded)
        layer = trace.default_cam_layer()
        if layer is None:
            raise UsageError("the model has no layer with a spatial output to explain; name one with -l")
        if score is not None and score.embedding_layer is not None:
            layer = last_layer_before(trace, layer, score.embedding_layer)
        if not quiet:
            note(f"layer: {layer} (default; choose another with -l)")
        calls = {info.name: info.calls for info in trace.layers if info.name == layer}  # no second probe pass
        layers = [layer]
    resolve_layers(loaded.module, layers)
    if not quiet:
        note_repeated_layers(loaded, layers, calls)
    return loaded, classes, layers


def last_layer_before(trace: ModelTrace, layer: str, embedding_layer: str) -> str:
    """``layer``, or when it finishes after ``embedding_layer`` (which it then cannot change), the last spatial
    layer finishing no later than the embedding layer (often that layer itself)."""
    order = trace.finish_order
    if layer not in order or embedding_layer not in order or order.index(layer) < order.index(embedding_layer):
        return layer
    spatial = {info.name for info in trace.layers if info.is_spatial}
    earlier = [name for name in order[: order.index(embedding_layer) + 1] if name in spatial]
    return earlier[-1] if earlier else layer


def note_repeated_layers(loaded: LoadedModel, layers: list[str], calls: Mapping[str, int] | None = None) -> None:
    """A note for each layer whose module runs several times per forward pass: which call is used, how to pick.

    ``calls``: how often each layer runs, when a trace already knows; else one forward pass counts them.
    """
    from ..hooks import layer_call
    from ..layers import layer_calls

    module_names = dict(loaded.module.named_modules())
    plain = [layer for layer in layers if layer_call(layer, module_names)[1] is None]
    if calls is None:
        calls = layer_calls(
            loaded.module,
            plain,
            loaded.preprocessing.input_size,
            loaded.device,
            batch=loaded.fixed_batch or 1,
            channels=loaded.preprocessing.channels,
        )
    for layer, count in calls.items():
        if count > 1:
            note(
                f"layer {layer} runs {count} times per forward pass; using its last call "
                f"(pick one with -l {layer}#1 ... {layer}#{count})"
            )


def traced(loaded: LoadedModel) -> ModelTrace:
    """Every module of the loaded model with its output on one dummy input of the model's size and channels."""
    from ..layers import trace_layers

    return trace_layers(
        loaded.module,
        loaded.preprocessing.input_size,
        loaded.device,
        batch=loaded.fixed_batch or 1,
        channels=loaded.preprocessing.channels,
    )


def check_classes(loaded: LoadedModel, classes: list[int], top_k: int, labels_given: bool) -> None:
    """--class, --top-k and --labels against the model's number of outputs, before any work is done."""
    from ..errors import UsageError

    count = loaded.output_count()
    if count is None or count == 1:  # not a classifier, or a single output (hookviz.targets.ClassTarget checks it)
        return
    for index in classes:
        if not 0 <= index < count:
            raise UsageError(f"--class {index} is out of range: this model has classes 0..{count - 1}")
    if not classes and top_k > count:
        raise UsageError(f"--top-k {top_k} is more than the model's {count} classes")
    if labels_given and loaded.labels is not None and len(loaded.labels) != count:
        raise UsageError(
            f"--labels gives {len(loaded.labels)} class names but the model has {count} outputs; "
            "pass the class names of this model, one per output"
        )


def target_spec(loaded: LoadedModel, score: ScoreArgs, classes: list[int], top_k: int) -> TargetSpec:
    """What the run explains, from the model's output and the score options; one-line errors for options that do
    not fit the model (checked before any image is read)."""
    from ..errors import UsageError
    from ..targets import ClassTarget, TargetSpec, parse_region, read_mask

    task = loaded.task
    given = score.given
    if task == "detection":
        misfit = [flag for flag in given if flag not in ("--boxes", "--min-score")]
        if misfit:
            raise UsageError(f"{misfit[0]} does not apply to a detection model; use --boxes and --min-score")
        if classes or top_k != 1:
            raise UsageError(
                "--class and --top-k do not apply to a detection model: --boxes N and --min-score S choose the boxes"
            )
        return TargetSpec(kind="detection")
    for flag in ("--boxes", "--min-score"):
        if flag in given:
            raise UsageError(f"{flag} applies to detection models; {loaded.spec} is not one (its output is not boxes)")
    if score.embedding_layer is not None and score.similar_to is None:
        raise UsageError("--embedding-layer goes with --similar-to REF; add the reference image")
    if score.region is not None and score.mask is not None:
        raise UsageError("give either --region or --mask, not both")
    if score.similar_to is not None:
        misfit = [flag for flag in given if flag not in ("--similar-to", "--embedding-layer")]
        if misfit:
            raise UsageError(f"{misfit[0]} does not go with --similar-to, which explains a similarity, not a class")
        if classes or top_k != 1:
            raise UsageError("--similar-to explains one similarity per image; drop --class and --top-k")
        if not Path(score.similar_to).is_file():
            raise UsageError(f"--similar-to {score.similar_to}: file not found; give the reference image's path")
        return TargetSpec(kind="similarity", reference=score.similar_to, embedding_layer=score.embedding_layer)
    shape = loaded.output_shape() or ()  # the probe output_count made: no second forward pass
    if len(shape) == 4 or task == "segmentation":
        if score.activation is not None:
            raise UsageError(
                "--activation applies to classifiers; a segmentation map shows each class's share of pixels"
            )
        if score.mask is not None:
            read_mask(score.mask)  # an unreadable mask fails before any image is read
        region = parse_region(score.region) if score.region is not None else None
        return TargetSpec(kind="segmentation", region=region, mask=score.mask)
    for flag in ("--region", "--mask"):
        if flag in given:
            raise UsageError(
                f"{flag} applies to segmentation models (output N, classes, H, W); this model's output is {shape}"
            )
    outputs = shape[1] if len(shape) == 2 else 1
    resolved = ClassTarget(tuple(classes), top_k, score.activation).resolved(outputs)
    return TargetSpec(kind=resolved.kind, activation=resolved.activation)


def check_target_fits(
    spec: TargetSpec, method: str, *, aug_smooth: bool = False, metrics: Any = (), expected: str | None = None
) -> None:
    """Refuse what cannot explain the target: a method, smoothing, --metric or --expected (class logits only)."""
    from ..cams import check_target
    from ..errors import UsageError
    from ..targets import TARGET_NOUNS

    if spec.kind == "class":
        return
    for flag, given in (("--metric", bool(metrics)), ("--expected", expected is not None)):
        if given:
            raise UsageError(
                f"{flag} scores class probabilities, not {TARGET_NOUNS[spec.kind]}; drop it for this model"
            )
    if spec.kind != "detection":  # hookviz.detection checks its own methods and smoothing
        check_target(spec.kind, method, aug_smooth=aug_smooth)


def run_batch(loaded: LoadedModel, job: Job, images: tuple[str, ...], run: RunArgs, print_outputs: bool = True) -> int:
    """Run ``job`` over the inputs with the manifest, progress and JSON Lines; return the exit code.
    ``print_outputs`` False: no output paths on stdout (a command that prints a summary there)."""
    from ..batch import BatchOptions, default_workers, parse_shard, plan_batch
    from ..images import collect_inputs

    paths = collect_inputs(images)
    workers = run.workers if run.workers is not None else default_workers(len(paths), run.batch_size)
    options = BatchOptions(
        out_dir=run.out_dir,
        batch_size=run.batch_size,
        workers=workers,
        crop=run.crop,
        shard=parse_shard(run.shard) if run.shard else None,
        skip_existing=run.skip_existing,
        overwrite=run.overwrite,
        max_pixels=run.max_pixels,
        argv=sys.argv[1:],
    )
    planned = plan_batch(paths, loaded, job, options)
    verbose = run.verbose and not run.quiet
    if verbose:
        note(
            f"{planned.total} input(s), batch size {planned.header['batch_size']}, {workers} decoding worker(s), "
            f"{len(planned.skipped)} already done"
        )
    try:
        counts = report_records(
            planned.records,
            planned.total,
            quiet=run.quiet,
            verbose=verbose,
            as_json=run.as_json,
            print_outputs=print_outputs,
            fail_fast=run.fail_fast,
        )
    finally:
        planned.close()
    if not run.quiet:
        note(summary_line(counts, options.out_dir))
    if verbose:
        note(f"time: {planned.timings.as_text()}")
    if run.html:
        write_gallery(options.out_dir, run.quiet)
    return 1 if counts["error"] else 0


def write_gallery(out_dir: Path, quiet: bool) -> None:
    """(Re)write DIR/index.html from the run's manifest; a write failure is one line."""
    from ..errors import HookvizError
    from ..gallery import gallery_from_manifest

    try:
        page = gallery_from_manifest(out_dir)
    except OSError as exc:
        raise HookvizError(f"cannot write the gallery in {out_dir} ({exc.strerror or exc})") from None
    if not quiet:
        note(f"gallery: {page}")


def tensorboard_images(log_dir: Any) -> Any:
    """A context manager: an ImageSink writing to ``log_dir`` for the block (None without --tensorboard), closed even on errors."""
    from contextlib import contextmanager, nullcontext

    if log_dir is None:
        return nullcontext(None)

    @contextmanager
    def sink() -> Any:
        from ..tensorboard import ImageSink, summary_writer

        images = ImageSink(summary_writer(log_dir))
        try:
            yield images
        finally:
            images.close()

    return sink()
