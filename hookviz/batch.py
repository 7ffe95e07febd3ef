"""Runs over many inputs: shards, planning a run against its manifest, resuming, refusing to overwrite by accident.

``plan_batch`` checks that a run can go ahead, writes its header to
``DIR/manifest.jsonl`` (see manifest.py) and returns the generator of its
records, each appended to the manifest as it finishes.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Generator, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .errors import HookvizError, UsageError
from .interrupts import uninterrupted
from .locks import RunClaim, claimed
from .manifest import Manifest, jsonable, options_key, versions
from .models import LoadedModel
from .output import TEMPORARY_SUFFIX, input_identity, output_stems, prepare_output_dir, refuse_link
from .pipeline import Job, Record, Timings, run_job


def default_batch_size(device: Any) -> int:
    """A batch size that keeps a CPU busy without swapping, and an accelerator fed."""
    return {"cuda": 32, "mps": 16}.get(getattr(device, "type", str(device)), 8)


def default_workers(inputs: int, batch_size: int | None) -> int:
    """Decoding worker processes for a run of ``inputs`` images.

    Background decoding pays off for more than a batch or two, and only on cores torch's own two threads
    leave free: on a 2-core machine a worker process slowed a resnet50 run from 13.5 to 10-11 images/s.
    """
    spare = (os.cpu_count() or 1) - 2
    return min(4, max(0, spare)) if inputs > 2 * (batch_size or 8) else 0


def parse_shard(text: str) -> tuple[int, int]:
    """``K/N`` with 1 <= K <= N, e.g. ``--shard $((SLURM_ARRAY_TASK_ID + 1))/$SLURM_ARRAY_TASK_COUNT``."""
    try:
        k, n = (int(part) for part in text.split("/"))
    except ValueError:
        raise UsageError(f"--shard {text!r}: use K/N, e.g. --shard 2/8") from None
    if n < 1 or not 1 <= k <= n:
        zero_based = " (shards count from 1; with a 0-based index use $((INDEX + 1)))" if k == 0 else ""
        raise UsageError(f"--shard {text!r}: K must be between 1 and N{zero_based}")
    return k, n


def shard_of(paths: Sequence[Path], k: int, n: int) -> list[Path]:
    """The K-th of N slices of the sorted, de-duplicated inputs, in the order given.

    Every N-th input of the sorted list (a folder's large and small images spread
    evenly), so shards 1..N together cover each input exactly once, whatever order
    each shard's own ``find`` listed them in.
    """
    ordered = sorted(set(map(str, paths)))
    mine = {path for position, path in enumerate(ordered) if position % n == k - 1}
    seen: set[str] = set()
    selected = []
    for path in paths:
        if str(path) in mine and str(path) not in seen:
            seen.add(str(path))
            selected.append(path)
    return selected


@dataclass
class BatchOptions:
    """How a batch run reads, batches and writes (the CLI's run options, as the library takes them)."""

    out_dir: Path
    batch_size: int | None = None  # None: default_batch_size for the model's device
    workers: int = 0
    crop: bool = False
    shard: tuple[int, int] | None = None
    skip_existing: bool = False
    overwrite: bool = False
    max_pixels: int | None = None  # larger images are refused (default: Pillow's bomb limit)
    argv: list[str] | None = None  # recorded in the manifest header


@dataclass
class BatchRun:
    """A planned run: what it will do, and the generator of its records."""

    inputs: list[Path]  # this shard's inputs, in order
    skipped: dict[str, dict[str, Any]]  # input -> the manifest record that makes it done
    header: dict[str, Any]
    records: Generator[Record, None, None]
    timings: Timings = field(default_factory=Timings)
    claim: ExitStack = field(default_factory=ExitStack)  # the run's lock on its outputs (locks.claimed)

    @property
    def total(self) -> int:
        return len(self.inputs)

    def close(self) -> None:
        """Stop the run (if it is still going) and release its claim on the output folder."""
        self.records.close()
        self.claim.close()


def plan_batch(paths: Sequence[Path], loaded: LoadedModel, job: Job, options: BatchOptions) -> BatchRun:
    """Check the run can go ahead (shard, existing outputs), write the manifest header, and return the run."""
    if options.skip_existing and options.overwrite:
        raise UsageError("give either --skip-existing or --overwrite, not both")
    inputs = shard_of(paths, *options.shard) if options.shard else list(paths)
    out_dir = prepare_output_dir(options.out_dir)
    manifest = Manifest(out_dir)
    refuse_link(manifest.path)
    key = options_key(job.command, loaded.spec, loaded.preprocessing, options.crop, job.settings())
    run = uuid.uuid4().hex[:12]
    patterns = tuple(job.output_patterns())
    claim = ExitStack()
    # From here until the run ends no other run can write these outputs: checking for existing files,
    # removing temporaries and writing cannot race another run's.
    claim.enter_context(claimed(out_dir, RunClaim(key, options.shard, patterns, run, job.command)))
    try:
        # Over all inputs, so every shard names outputs the same way; folders of earlier runs stay their inputs'.
        recorded = list(manifest.input_entries())  # read once: the manifest of a long-lived folder is long
        identities = {path: input_identity(path) for path in paths}
        stems = output_stems(paths, manifest.folder_owners(recorded), identities)
        skipped = manifest.completed(key, recorded) if options.skip_existing else {}
        to_run = [path for path in inputs if identities[path] not in skipped]
        _refuse_links(to_run, stems, out_dir)
        if not (options.skip_existing or options.overwrite):
            _refuse_overwrite(to_run, stems, out_dir, list(patterns))
        _remove_temporaries(inputs, stems, out_dir, patterns)
        header = _header(run, key, loaded, job, options, inputs, skipped=len(inputs) - len(to_run))
        try:
            manifest.append(header)
        except HookvizError as exc:
            raise UsageError(str(exc)) from None
    except BaseException:
        claim.close()
        raise
    timings = Timings()
    computed = run_job(
        [(path, stems[path]) for path in to_run],
        loaded,
        job,
        crop=options.crop,
        batch_size=header["batch_size"],
        workers=options.workers,
        max_pixels=options.max_pixels,
        timings=timings,
    )
    records = _in_input_order(
        inputs,
        {path: skipped.get(identities[path]) for path in inputs},
        computed,
        manifest,
        run,
        stems,
        identities,
        claim,
    )
    done_before = {str(path): skipped[identities[path]] for path in inputs if identities[path] in skipped}
    return BatchRun(inputs=inputs, skipped=done_before, header=header, records=records, timings=timings, claim=claim)


def _header(
    run: str, key: str, loaded: LoadedModel, job: Job, options: BatchOptions, inputs: list[Path], skipped: int
) -> dict[str, Any]:
    return {
        "type": "run",
        "run": run,
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        **versions(),
        "command": job.command,
        "model": loaded.spec,
        "model_description": loaded.description,
        "device": str(loaded.device),
        "preprocessing": jsonable(loaded.preprocessing),
        "crop": options.crop,
        "settings": job.settings(),
        "key": key,
        "batch_size": options.batch_size or default_batch_size(loaded.device),
        "workers": options.workers,
        "shard": "/".join(map(str, options.shard)) if options.shard else None,
        "inputs": len(inputs),
        "skipped": skipped,
        "argv": options.argv,
    }


def _in_input_order(
    inputs: list[Path],
    skipped: dict[Path, dict[str, Any] | None],
    computed: Generator[Record, None, None],
    manifest: Manifest,
    run: str,
    stems: dict[Path, str],
    identities: dict[Path, str],
    claim: ExitStack,
) -> Generator[Record, None, None]:
    """Skipped inputs' records where they belong among the computed ones; each appended to the manifest.

    The run's claim on the output folder is released when the last record is out (or the run stops).
    """
    try:
        for path in inputs:
            earlier = skipped.get(path)
            if earlier is not None:
                record = Record(
                    input=str(path),
                    status="skipped",
                    outputs=earlier.get("outputs", []),
                    extra={
                        key: value
                        for key, value in earlier.items()
                        if key
                        not in ("type", "run", "input", "status", "error", "outputs", "identity", "folder", "key")
                    },
                )
            else:
                record = next(computed)
            record.identity, record.folder = identities[path], stems[path]
            # Until the consumer asks for the next record (having printed this one), a Ctrl-C waits: the
            # manifest and the consumer's output never disagree about which inputs are done.
            with uninterrupted():
                manifest.append({"type": "input", "run": run, **record.as_json()})
                yield record
    finally:
        computed.close()
        claim.close()


def _remove_temporaries(paths: Sequence[Path], stems: dict[Path, str], out_dir: Path, patterns: Sequence[str]) -> None:
    """Temporary files that a killed run writing these outputs left in the folders this run writes.

    Only the temporaries of this run's own file names (output.atomic_write names them
    ``.<name>.<random>.tmp``): another live run may be writing other files there, and no
    live run writes these (locks.claimed).
    """
    for path in paths:
        folder = out_dir / stems[path]
        if folder.is_dir() and not folder.is_symlink():
            for pattern in patterns:
                for temporary in folder.glob(f".{pattern}.*{TEMPORARY_SUFFIX}"):
                    temporary.unlink(missing_ok=True)


def _refuse_links(paths: Sequence[Path], stems: dict[Path, str], out_dir: Path) -> None:
    """Outputs never escape -o: an input folder that is a symbolic link is refused, not followed."""
    for path in paths:
        refuse_link(out_dir / stems[path])


def _refuse_overwrite(paths: Sequence[Path], stems: dict[Path, str], out_dir: Path, patterns: list[str]) -> None:
    clashes: list[Path] = []
    for path in paths:
        folder = out_dir / stems[path]
        if folder.is_dir():
            clashes.extend(match for pattern in patterns for match in sorted(folder.glob(pattern)))
        if clashes:
            break
    if clashes:
        raise UsageError(
            f"{clashes[0]} already exists; pass --overwrite to replace outputs, "
            f"or --skip-existing to finish an interrupted run"
        )
