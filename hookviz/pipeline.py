"""The per-image loop every image command shares: decode, batch, run the model, write.

Three stages overlap so the model is rarely idle: images are decoded and
preprocessed ahead of time (in DataLoader worker processes with ``workers > 0``),
the model runs one batch at a time in the calling thread, and writer threads
render and encode the previous batch's pictures, one image per task (Pillow,
zlib, libjpeg and libwebp release the GIL). One writer thread on 2 cores, where
torch's own threads take both; one per core beyond the first, up to 4, elsewhere.

A command plugs in as a ``Job``: ``compute`` runs the model on a batch,
``write`` turns one image's part of the result into files and a ``Record``.
A bad image becomes an error record and the others go on; a usage error stops the run.
"""

from __future__ import annotations

import ctypes
import functools
import os
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Generator, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from .errors import InputError, shown
from .images import ModelView, image_to_tensor, load_image, model_view, preprocess
from .models import LoadedModel
from .output import CLOCK
from .preprocessing import Preprocessing

WRITES_IN_FLIGHT = 2  # batches handed to the writers and not yet reported; bounds memory
MAX_WRITERS = 4
WRITERS_VARIABLE = "HOOKVIZ_WRITERS"  # the number of writer threads, to measure other settings than the default
# Pictures are drawn at the photo's own resolution up to this many pixels (4096 x 4096): beyond it a picture costs
# memory and disk (a 64-megapixel overlay took 5 GB) without showing the viewer more. A long thin strip is not
# reduced: it is small however long it is.
MAX_PICTURE_AREA = 4096 * 4096


@dataclass
class PreparedImage:
    """A decoded input: the original pixels (overlays are drawn on them) and the model input made from them."""

    path: Path
    stem: str  # the input's own output directory name
    pixels: torch.Tensor  # the original as uint8 (3, H, W), RGB, EXIF-oriented: overlays are drawn on it
    tensor: torch.Tensor  # the normalized model input (3, h, w)
    view: ModelView  # where the model input lies in the original
    original_size: tuple[int, int] | None = None  # (width, height) in the file, when the pixels are reduced from it

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) of the original."""
        return self.pixels.shape[2], self.pixels.shape[1]


@dataclass
class Record:
    """One input's result, as printed with --json and appended to the manifest."""

    input: str
    status: str = "ok"  # ok, error, or skipped (done by an earlier run)
    error: str | None = None
    outputs: list[dict[str, Any]] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    identity: str | None = None  # the input's resolved path: the same file across runs (output.input_identity)
    folder: str | None = None  # the input's folder under the output directory

    def as_json(self) -> dict[str, Any]:
        """The record as printed with --json and appended to the manifest."""
        where = {
            key: value for key, value in (("identity", self.identity), ("folder", self.folder)) if value is not None
        }
        return {
            "input": self.input,
            **where,
            "status": self.status,
            "error": self.error,
            **self.extra,
            "outputs": self.outputs,
        }


class Job(Protocol):
    """What an image command does with a batch. See jobs.py."""

    command: str

    def compute(self, batch: list[PreparedImage]) -> Any:
        """Run the model on the batch (in the calling thread)."""

    def write(self, item: PreparedImage, index: int, result: Any) -> Record:
        """Render and write the outputs of ``batch[index]`` (in the writer thread)."""

    def output_patterns(self) -> list[str]:
        """Glob patterns, relative to DIR/<stem>/, of the files this job writes per input."""

    def settings(self) -> dict[str, Any]:
        """The options that decide the outputs (for the manifest and --skip-existing)."""


@dataclass
class Timings:
    """Where a run spent its time, in seconds (shown with -v).

    ``model`` and ``waiting_for_images`` are spans of the calling thread; ``decode`` is decoding and
    preprocessing done in this process (none with decoding workers); ``render``, ``encode`` and ``write``
    are summed over the writer threads, which overlap the model.
    """

    waiting_for_images: float = 0.0
    model: float = 0.0
    decode: float = 0.0
    render: float = 0.0  # drawing the pictures (writer threads)
    encode: float = 0.0  # PNG/JPEG/WebP encoding (writer threads)
    write: float = 0.0  # writing the files (writer threads)
    writers: int = 1
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    @property
    def writing(self) -> float:
        """Everything the writer threads did: rendering, encoding and writing."""
        return self.render + self.encode + self.write

    def add_written(self, render: float, encode: float, write: float) -> None:
        with self.lock:
            self.render += render
            self.encode += encode
            self.write += write

    def as_text(self) -> str:
        decoded = f"decoding {self.decode:.2f} s, " if self.decode else ""
        threads = f"{self.writers} writer thread{'s' if self.writers != 1 else ''}"
        return (
            f"model {self.model:.2f} s, {decoded}waiting for decoded images {self.waiting_for_images:.2f} s; "
            f"in the background ({threads}): rendering {self.render:.2f} s, encoding {self.encode:.2f} s, "
            f"writing files {self.write:.2f} s"
        )

    def as_json(self) -> dict[str, float | int]:
        names = ("model", "decode", "waiting_for_images", "render", "encode", "write", "writers")
        return {name: round(getattr(self, name), 4) for name in names}


def writer_threads() -> int:
    """Writer threads for a run: ``HOOKVIZ_WRITERS`` if set, else one per core beyond the first, 1 to 4.

    Measured on 2 cores (benchmarks/RESULTS.md, task 5b, 256 photos): 17.3 images/s with one writer thread,
    18.0 with two; the model bounds the run once torch's idle threads stop spinning (hookviz.cli sets
    OMP_WAIT_POLICY=PASSIVE), so the default stays at one there.
    """
    value = os.environ.get(WRITERS_VARIABLE, "").strip()
    if value.isdigit() and int(value) > 0:
        return min(int(value), 32)
    return max(1, min(MAX_WRITERS, (os.cpu_count() or 1) - 1))


def prepare_image(
    path: Path, stem: str, preprocessing: Preprocessing, crop: bool, max_pixels: int | None = None
) -> PreparedImage:
    """Decode ``path`` and make its model input; ``stem`` names its output folder. Raises InputError."""
    image = load_image(path, max_pixels=max_pixels, max_area=MAX_PICTURE_AREA)
    try:
        tensor = preprocess(image, preprocessing, crop=crop)
    except InputError as exc:
        raise InputError(f"{shown(path)}: {exc}") from None
    return PreparedImage(
        path=path,
        stem=stem,
        pixels=image_to_tensor(image),
        tensor=tensor,
        view=model_view(image.size, preprocessing, crop=crop),
        original_size=image.info["original_size"] if image.info.get("original_size") != image.size else None,
    )


class _PreparedImages(torch.utils.data.Dataset):
    """Decoding and preprocessing as a Dataset, so DataLoader workers can run it."""

    def __init__(
        self, inputs: Sequence[tuple[Path, str]], preprocessing: Preprocessing, crop: bool, max_pixels: int | None
    ):
        self.inputs, self.preprocessing, self.crop, self.max_pixels = list(inputs), preprocessing, crop, max_pixels
        self.decode_seconds = 0.0

    def __len__(self) -> int:
        return len(self.inputs)

    def __getitem__(self, index: int) -> PreparedImage | Record:
        path, stem = self.inputs[index]
        started = time.perf_counter()
        try:
            prepared = prepare_image(path, stem, self.preprocessing, self.crop, self.max_pixels)
        except InputError as exc:
            return Record(input=str(path), status="error", error=str(exc))
        finally:
            self.decode_seconds += time.perf_counter() - started  # in a worker process: that process's copy
        if torch.utils.data.get_worker_info() is not None:
            # In a worker process, send arrays by value: a tensor would travel as a file descriptor through a
            # helper thread that prints a traceback when Ctrl-C interrupts the main process mid-transfer.
            prepared.pixels, prepared.tensor = prepared.pixels.numpy(), prepared.tensor.numpy()  # type: ignore[assignment]
        return prepared


PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _worker_started(parent: int, worker_id: int) -> None:
    """In each decoding worker: die with the parent process, and leave Ctrl-C to it.

    A worker blocked writing to a full pipe never reaches DataLoader's own check that its
    parent lives, so a parent killed with SIGKILL left it running forever; the kernel's
    parent-death signal ends it wherever it is. Ctrl-C reaches the whole process group:
    the parent stops its workers itself, and a worker's own KeyboardInterrupt was a traceback.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent:  # the parent died before the signal was set up
        os._exit(0)


def _as_is(item: Any) -> Any:  # DataLoader's collate step for one item at a time; module-level so workers can pickle it
    return item


def prepared_images(
    inputs: Sequence[tuple[Path, str]],
    preprocessing: Preprocessing,
    *,
    crop: bool = False,
    workers: int = 0,
    prefetch: int = 8,
    max_pixels: int | None = None,
    timings: Timings | None = None,
) -> Generator[PreparedImage | Record, None, None]:
    """Each input decoded and preprocessed, in input order; ``workers`` > 0 does it in background processes.
    ``timings.decode`` gains the time spent decoding in this process."""
    dataset = _PreparedImages(inputs, preprocessing, crop, max_pixels)
    if workers <= 0 or len(dataset) == 0:
        for i in range(len(dataset)):
            before = dataset.decode_seconds
            item = dataset[i]
            if timings is not None:
                timings.decode += dataset.decode_seconds - before
            yield item
        return
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=None,
        collate_fn=_as_is,
        num_workers=workers,
        prefetch_factor=max(2, prefetch // workers),
        worker_init_fn=functools.partial(_worker_started, os.getpid()),
    )
    for item in loader:
        if isinstance(item, PreparedImage):
            item.pixels, item.tensor = torch.from_numpy(item.pixels), torch.from_numpy(item.tensor)
        yield item


def image_batches(
    inputs: Sequence[tuple[Path, str]],
    loaded: LoadedModel,
    *,
    crop: bool = False,
    batch_size: int = 8,
    workers: int = 0,
    max_pixels: int | None = None,
    timings: Timings | None = None,
) -> Generator[list[PreparedImage | Record], None, None]:
    """The inputs in batches of ``batch_size``, in input order: each a prepared image, or the record of its failure.

    A .pt2 exported with a static batch dimension caps the batch size at it.
    """
    if loaded.fixed_batch is not None:
        batch_size = min(batch_size, loaded.fixed_batch)
    images = prepared_images(
        inputs,
        loaded.preprocessing,
        crop=crop,
        workers=workers,
        prefetch=batch_size,
        max_pixels=max_pixels,
        timings=timings,
    )
    slots: list[PreparedImage | Record] = []
    try:
        for slot in images:
            slots.append(slot)
            if len(slots) >= batch_size:
                yield slots
                slots = []
        if slots:
            yield slots
    finally:
        images.close()  # stops decoding workers at once when the run stops early


def run_job(
    inputs: Sequence[tuple[Path, str]],
    loaded: LoadedModel,
    job: Job,
    *,
    crop: bool = False,
    batch_size: int = 8,
    workers: int = 0,
    max_pixels: int | None = None,
    timings: Timings | None = None,
    writers: int | None = None,
) -> Generator[Record, None, None]:
    """Run ``job`` over ``inputs`` ((path, output stem) pairs); yield one record per input, in input order.

    Stopping early (``close()``, Ctrl-C) waits for the images being written and drops the rest:
    every file is written atomically, so nothing half-written is left. ``writers``: writer threads
    (default ``writer_threads()``).
    """
    timings = timings if timings is not None else Timings()
    timings.writers = writers if writers is not None else writer_threads()
    pool = ThreadPoolExecutor(max_workers=timings.writers, thread_name_prefix="hookviz-writer")
    in_flight: deque[tuple[list[PreparedImage | Record], list[Future[Record]]]] = deque()

    def write_one(item: PreparedImage, index: int, result: Any) -> Record:
        started, encode, write = time.perf_counter(), CLOCK.encode, CLOCK.write
        record = _write_one(job, item, index, result)
        encoded, written = CLOCK.encode - encode, CLOCK.write - write
        timings.add_written(time.perf_counter() - started - encoded - written, encoded, written)
        return record

    def submit(slots: list[PreparedImage | Record]) -> None:
        prepared = [slot for slot in slots if isinstance(slot, PreparedImage)]
        result = None
        if prepared:
            started = time.perf_counter()
            result = job.compute(prepared)
            timings.model += time.perf_counter() - started
        in_flight.append((slots, [pool.submit(write_one, item, index, result) for index, item in enumerate(prepared)]))

    def report(wait: bool) -> Iterator[Record]:
        while in_flight and (wait or len(in_flight) > WRITES_IN_FLIGHT or all(f.done() for f in in_flight[0][1])):
            batch_slots, futures = in_flight.popleft()
            written = iter(futures)
            for slot in batch_slots:
                yield next(written).result() if isinstance(slot, PreparedImage) else slot

    batches = image_batches(
        inputs,
        loaded,
        crop=crop,
        batch_size=batch_size,
        workers=workers,
        max_pixels=max_pixels,
        timings=timings,
    )
    try:
        while True:
            started = time.perf_counter()
            slots = next(batches, None)
            timings.waiting_for_images += time.perf_counter() - started
            if slots is None:
                break
            submit(slots)
            yield from report(wait=False)
        yield from report(wait=True)
    finally:
        for _, futures in in_flight:
            for future in futures:
                future.cancel()
        pool.shutdown(wait=True)
        batches.close()


def _write_one(job: Job, item: PreparedImage, index: int, result: Any) -> Record:
    try:
        return job.write(item, index, result)
    except OSError as exc:  # disk full, permissions: this input failed, the run goes on
        return Record(
            input=str(item.path),
            status="error",
            error=f"{shown(item.path)}: cannot write outputs ({exc.strerror or exc})",
        )


def model_batch(images: Sequence[PreparedImage], loaded: LoadedModel) -> torch.Tensor:
    """Stack model inputs; a short last batch for a fixed-batch .pt2 is padded by repeating its last image."""
    tensors = [item.tensor for item in images]
    if loaded.fixed_batch is not None and len(tensors) < loaded.fixed_batch:
        tensors += [tensors[-1]] * (loaded.fixed_batch - len(tensors))
    return torch.stack(tensors).to(loaded.device)
