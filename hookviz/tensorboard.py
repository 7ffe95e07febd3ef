"""TensorBoard export: the same grids, overlays and histograms as the PNGs, as event files.

Images go under one tag per command and layer (``gradcam/layer4``, ``fmaps/layer1.0.conv1``)
with the input's position in the run as the step, so TensorBoard's slider walks through
the images; a text entry per step names the input file.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy
from PIL import Image

from .errors import UsageError


def summary_writer(log_dir: Path) -> Any:
    """A ``torch.utils.tensorboard.SummaryWriter``; a usage error naming the extra when tensorboard is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise UsageError("--tensorboard needs the tensorboard package: pip install 'hookviz[tensorboard]'") from None
    try:
        return SummaryWriter(log_dir=str(log_dir))
    except OSError as exc:
        raise UsageError(
            f"cannot write TensorBoard events to {log_dir} ({exc.strerror or exc}); choose another --tensorboard DIR"
        ) from None


class ImageSink:
    """Adds each written picture to TensorBoard; steps count inputs in the order they are written."""

    def __init__(self, writer: Any):
        self.writer = writer
        self.steps: dict[str, int] = {}
        self.lock = threading.Lock()  # written from the writer thread, closed from the main one

    def step_for(self, input_path: str) -> int:
        with self.lock:
            if input_path not in self.steps:
                self.steps[input_path] = len(self.steps)
                self.writer.add_text("input", input_path, global_step=self.steps[input_path])
            return self.steps[input_path]

    def add(self, tag: str, picture: Image.Image, input_path: str) -> None:
        step = self.step_for(input_path)
        with self.lock:
            self.writer.add_image(tag, numpy.asarray(picture.convert("RGB")), global_step=step, dataformats="HWC")

    def close(self) -> None:
        with self.lock:
            self.writer.close()


def add_layer_statistics(writer: Any, results: Mapping[str, Any], step: int = 0) -> None:
    """Each layer's fixed-bin histogram and summary numbers (hookviz.stats.LayerStats)."""
    for name, stats in results.items():
        if not stats.ran or stats.count == 0:
            continue
        counts, edges = stats.histogram()
        values = float(stats.count)
        writer.add_histogram_raw(
            f"activations/{name}",
            min=stats.min,
            max=stats.max,
            num=values,
            sum=stats.mean * values,
            sum_squares=(stats.std**2 + stats.mean**2) * values,
            bucket_limits=edges[1:].tolist(),
            bucket_counts=counts.tolist(),
            global_step=step,
        )
        writer.add_scalar(f"mean/{name}", stats.mean, step)
        writer.add_scalar(f"std/{name}", stats.std, step)
        writer.add_scalar(f"zero_fraction/{name}", stats.zero_fraction, step)
        writer.add_scalar(f"dead_channels/{name}", float(len(stats.dead_channels)), step)
    writer.flush()
