"""The per-image loop every image command shares: decode, batch, run, write, one record per input.

A bad image becomes an error record and the others go on; a usage error stops the run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
from PIL import Image

from .errors import InputError
from .images import ModelView, load_image, model_view, preprocess
from .models import LoadedModel
from .output import output_stems


@dataclass
class PreparedImage:
    path: Path
    stem: str  # the input's own output directory name
    image: Image.Image  # the original, RGB, EXIF-oriented
    tensor: torch.Tensor  # the normalized model input (3, h, w)
    view: ModelView  # where the model input lies in the original


@dataclass
class Record:
    """One input's result, as printed with --json."""

    input: str
    status: str = "ok"
    error: str | None = None
    outputs: list[dict[str, Any]] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        return {"input": self.input, "status": self.status, "error": self.error, **self.extra, "outputs": self.outputs}


def prepare_image(path: Path, stem: str, loaded: LoadedModel, crop: bool) -> PreparedImage:
    image = load_image(path)
    return PreparedImage(
        path=path,
        stem=stem,
        image=image,
        tensor=preprocess(image, loaded.preprocessing, crop=crop),
        view=model_view(image.size, loaded.preprocessing, crop=crop),
    )


def run_batches(
    paths: Sequence[Path],
    loaded: LoadedModel,
    process: Callable[[list[PreparedImage]], list[Record]],
    *,
    crop: bool = False,
    batch_size: int = 8,
) -> Iterator[Record]:
    """Prepare images in batches, hand each batch to ``process``, yield one record per input in order."""
    stems = output_stems(paths)
    if loaded.fixed_batch is not None:  # a .pt2 exported with a static batch dimension
        batch_size = min(batch_size, loaded.fixed_batch)
    slots: list[PreparedImage | Record] = []  # input order: a prepared image, or the record of its failure

    def flush() -> Iterator[Record]:
        prepared = [slot for slot in slots if isinstance(slot, PreparedImage)]
        results = iter(process(prepared) if prepared else [])
        for slot in slots:
            yield next(results) if isinstance(slot, PreparedImage) else slot
        slots.clear()

    for path in paths:
        try:
            slots.append(prepare_image(path, stems[path], loaded, crop))
        except InputError as exc:
            slots.append(Record(input=str(path), status="error", error=str(exc)))
        if len(slots) >= batch_size:
            yield from flush()
    yield from flush()


def model_batch(images: Sequence[PreparedImage], loaded: LoadedModel) -> torch.Tensor:
    return torch.stack([item.tensor for item in images]).to(loaded.device)
