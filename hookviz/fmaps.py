"""Feature-map grids: one tile per channel, built as one tensor (no figure per tile)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from .errors import UsageError
from .hooks import capture, run_model
from .models import LoadedModel
from .output import layer_file_names, write_npy, write_png
from .pipeline import PreparedImage, Record, model_batch
from .spatial import spatial_layout, to_spatial
from .render import apply_colormap, draw_labels, normalize_map, to_pil

MIN_TILE = 64  # small maps (7x7) are enlarged to at least this many pixels so they stay readable
TILE_GAP = 2


@dataclass
class FeatureGrid:
    image: Image.Image
    channels: list[int]  # channel indices shown, in tile order
    total_channels: int

    @property
    def is_subset(self) -> bool:
        return len(self.channels) < self.total_channels


def rank_channels(activation: torch.Tensor, max_channels: int) -> torch.Tensor:
    """The channels to show for each image of a batch ``activation`` (B, C, h, w): indices (B, k).

    All channels (in index order) when they fit, else the most active by mean
    absolute activation, which ranks channels the same way before and after a
    ReLU and does not favour channels with a large offset only.
    """
    batch, count = activation.shape[:2]
    if count <= max_channels:
        return torch.arange(count).expand(batch, count)
    activity = activation.detach().abs().flatten(2).mean(dim=2)
    return activity.topk(max_channels, dim=1).indices.cpu()


def selected_channels(activation: torch.Tensor, max_channels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ranked channels of a batch ``activation`` (B, C, h, w): their maps (B, k, h, w) on the CPU, and indices (B, k)."""
    channels = rank_channels(activation, max_channels)
    index = channels.to(activation.device)[:, :, None, None].expand(-1, -1, *activation.shape[-2:])
    return activation.detach().gather(1, index).float().cpu(), channels


def feature_grid(activation: torch.Tensor, *, max_channels: int = 64, cmap: str = "viridis",
                 label_channels: bool = True) -> FeatureGrid:
    """A near-square grid of the channels of one layer output ``activation`` (C, h, w).

    Each tile is scaled to its own [0, 1] range, so weak channels are still visible.
    """
    if activation.dim() != 3:
        raise ValueError(f"expected a (C, h, w) activation, got shape {tuple(activation.shape)}")
    maps, channels = selected_channels(activation[None], max_channels)
    return channel_grid(maps[0], channels[0].tolist(), activation.shape[0], cmap=cmap, label_channels=label_channels)


def channel_grid(maps: torch.Tensor, channels: list[int], total_channels: int, *, cmap: str = "viridis",
                 label_channels: bool = True) -> FeatureGrid:
    """The grid of already selected channel ``maps`` (k, h, w), labelled with their ``channels`` indices."""
    from torchvision.utils import make_grid

    maps = normalize_map(maps)
    height, width = maps.shape[-2:]
    scale = max(1, math.ceil(MIN_TILE / max(height, width)))
    if scale > 1:  # nearest keeps each activation a visible block instead of blurring a 7x7 map
        maps = maps.repeat_interleave(scale, dim=-2).repeat_interleave(scale, dim=-1)
    tiles = apply_colormap(maps, cmap)  # (n, 3, H, W) uint8
    columns = math.ceil(math.sqrt(len(channels)))
    grid = make_grid(tiles, nrow=columns, padding=TILE_GAP, pad_value=255)
    image = to_pil(grid)
    if label_channels:
        tile_h, tile_w = tiles.shape[-2:]
        positions = [
            (TILE_GAP + (i % columns) * (tile_w + TILE_GAP) + 1, TILE_GAP + (i // columns) * (tile_h + TILE_GAP) + 1)
            for i in range(len(channels))
        ]
        font_size = max(8, min(14, tile_h // 5))
        draw_labels(image, positions, [str(c) for c in channels], font_size)
    return FeatureGrid(image=image, channels=channels, total_channels=total_channels)


@dataclass
class FmapOptions:
    out_dir: Path
    layers: list[str]
    max_channels: int = 64
    cmap: str = "viridis"
    save_raw: bool = False
    label_channels: bool = True
    layers_named: bool = True  # False for the default "every Conv2d": convs that do not run (training-only heads) are skipped
    tensorboard: Any = None  # a hookviz.tensorboard.ImageSink, or None


@dataclass
class LayerMaps:
    maps: torch.Tensor  # (B, k, h, w) the channels to draw, on the CPU
    channels: torch.Tensor  # (B, k) their indices
    shape: tuple[int, ...]  # (C, h, w) of the layer's output
    raw: torch.Tensor | None = None  # (B, C, h, w) everything, for --save-raw


class FmapJob:
    """Feature-map grids: one forward pass per batch captures every layer; one grid per (image, layer)."""

    command = "fmaps"

    def __init__(self, loaded: LoadedModel, options: FmapOptions):
        self.loaded, self.options = loaded, options

    def settings(self) -> dict[str, Any]:
        options = self.options
        return {"layers": options.layers, "max_channels": options.max_channels, "cmap": options.cmap,
                "save_raw": options.save_raw, "label_channels": options.label_channels}

    def output_patterns(self) -> list[str]:
        return [f"fmap_{name}.png" for name in layer_file_names(self.options.layers).values()]

    def compute(self, batch: list[PreparedImage]) -> dict[str, LayerMaps]:
        """Per layer, the channels to draw (and the whole output with --save-raw).

        Only the shown channels are kept for the writer, so batches waiting to be written stay small.
        """
        options = self.options
        with capture(self.loaded.module, options.layers) as activations:
            run_model(self.loaded.module, model_batch(batch, self.loaded))
        layers = options.layers if options.layers_named else [layer for layer in options.layers if layer in activations]
        result = {}
        for layer in layers:
            output = activations.get(layer)
            if output is None:
                raise UsageError(f"layer {layer!r} did not run in the forward pass; choose another with -l")
            layout = spatial_layout(output.shape, self.loaded.preprocessing.input_size)
            if layout is None:
                raise UsageError(f"layer {layer!r} has output shape {tuple(output.shape)}, not (N, C, H, W) maps "
                                 "or patch tokens: it has no feature maps to draw")
            activation = to_spatial(output, layout)  # tokens and channels-last outputs as (B, C, h, w)
            maps, channels = selected_channels(activation, options.max_channels)
            raw = activation.detach().float().cpu() if options.save_raw else None
            result[layer] = LayerMaps(maps=maps, channels=channels, shape=tuple(activation.shape[1:]), raw=raw)
        return result

    def write(self, item: PreparedImage, index: int, result: dict[str, LayerMaps]) -> Record:
        options = self.options
        record = Record(input=str(item.path))
        file_names = layer_file_names(options.layers)
        for layer, layer_maps in result.items():
            shape = layer_maps.shape
            grid = channel_grid(layer_maps.maps[index], layer_maps.channels[index].tolist(), shape[0], cmap=options.cmap,
                                label_channels=options.label_channels)
            folder, name = options.out_dir / item.stem, f"fmap_{file_names[layer]}"
            metadata = {
                "hookviz:layer": layer,
                "hookviz:shape": "x".join(map(str, shape)),
                "hookviz:channels": ",".join(map(str, grid.channels)),
                "hookviz:selection": (f"the {len(grid.channels)} most active of {grid.total_channels} channels (mean |activation|)"
                                      if grid.is_subset else f"all {grid.total_channels} channels"),
                "hookviz:input": str(item.path),
            }
            output = {"kind": "fmap", "layer": layer, "png": str(write_png(grid.image, folder / f"{name}.png", metadata)),
                      "channels": grid.channels}
            if options.tensorboard is not None:
                options.tensorboard.add(f"fmaps/{layer}", grid.image, str(item.path))
            if options.save_raw:
                output["raw"] = str(write_npy(layer_maps.raw[index], folder / f"{name}.npy"))
            record.outputs.append(output)
        return record
