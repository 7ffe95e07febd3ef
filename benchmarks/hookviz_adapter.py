"""Every call the benchmarks make into hookviz, in one place.

When a hookviz signature changes, fix it here only.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from common import HOOKVIZ
from torch import nn

from hookviz import fmaps as _fmaps
from hookviz import jobs as _jobs
from hookviz import pipeline as _pipeline
from hookviz.cams import compute_cams
from hookviz.hooks import capture
from hookviz.layers import conv_layer_names
from hookviz.models import load_model
from hookviz.output import PNG_COMPRESS_LEVEL

__all__ = [
    "PNG_COMPRESS_LEVEL",
    "cam_maps",
    "load_torchvision",
    "prepare",
    "conv_layers",
    "write_fmaps",
    "fmap_grids",
    "cli_gradcam",
    "cli_layers",
    "cli_help",
]


def cam_maps(
    model: nn.Module,
    batch: torch.Tensor,
    *,
    layer: str = "layer4",
    method: str = "gradcam",
    classes: Sequence[int] | None = None,
    top_k: int = 1,
    score_batch_size: int = 32,
) -> torch.Tensor:
    """hookviz's CAMs of a batch: (B, K, h, w)."""
    return compute_cams(
        model, batch, layer=layer, method=method, classes=classes, top_k=top_k, score_batch_size=score_batch_size
    ).maps


def load_torchvision(name: str):
    """A torchvision model with random weights, loaded as the CLI loads it (call torch.manual_seed first)."""
    return load_model(name, weights="none", device="cpu")


def conv_layers(loaded) -> list[str]:
    return conv_layer_names(loaded.module)


def prepare(path: Path, loaded):
    """The decoded, preprocessed image (whole image resized, the CLI's default)."""
    return _pipeline.prepare_image(Path(path), Path(path).stem, loaded.preprocessing, False)


def _fmap_options(out_dir: Path, layers: list[str]):
    return _jobs.FmapOptions(out_dir=Path(out_dir), layers=layers, layers_named=False)


def write_fmaps(loaded, prepared, out_dir: Path, layers: list[str]) -> int:
    """What ``hookviz fmaps`` does for one image: one forward pass, one PNG grid per layer. Returns the PNG count."""
    job = _jobs.FmapJob(loaded, _fmap_options(out_dir, layers))
    return len(job.write(prepared, 0, job.compute([prepared])).outputs)


def fmap_grids(loaded, prepared, layers: list[str]) -> list:
    """The same grids as PIL images, built but not encoded (for the PNG-encoding floor)."""
    batch = prepared.tensor[None].to(loaded.device)
    with capture(loaded.module, layers) as activations:
        loaded.module(batch)
    return [_fmaps.feature_grid(activations[layer][0]).image for layer in layers if layer in activations]


def cli_gradcam(model: str, inputs: Sequence[str], out_dir: Path, *extra: str, weights_none: bool = True) -> list[str]:
    """``hookviz gradcam MODEL INPUTS -o OUT -q --overwrite``."""
    argv = [HOOKVIZ, "gradcam", model, *map(str, inputs), "-o", str(out_dir), "-q", "--overwrite", *extra]
    if weights_none:
        argv += ["--weights", "none"]
    return argv


def cli_layers(model: str) -> list[str]:
    return [HOOKVIZ, "layers", model, "--weights", "none"]


def cli_help() -> list[str]:
    return [HOOKVIZ, "--help"]
