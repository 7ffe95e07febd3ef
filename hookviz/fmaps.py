"""Feature-map grids: one tile per channel, built as one tensor (no figure per tile)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from pathlib import Path

import torch
from PIL import Image

from .errors import UsageError
from .hooks import capture, run_model
from .models import LoadedModel
from .output import safe_name, write_npy, write_png
from .pipeline import PreparedImage, Record, model_batch
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


def rank_channels(activation: torch.Tensor, max_channels: int) -> list[int]:
    """The channels to show: all (in index order) when they fit, else the most active.

    Activity is the mean absolute activation, which ranks channels the same way
    before and after a ReLU and does not favour channels with a large offset only.
    """
    count = activation.shape[0]
    if count <= max_channels:
        return list(range(count))
    activity = activation.abs().flatten(1).mean(dim=1)
    return activity.topk(max_channels).indices.tolist()


def feature_grid(activation: torch.Tensor, *, max_channels: int = 64, cmap: str = "viridis",
                 label_channels: bool = True) -> FeatureGrid:
    """A near-square grid of the channels of one layer output ``activation`` (C, h, w).

    Each tile is scaled to its own [0, 1] range, so weak channels are still visible.
    """
    from torchvision.utils import make_grid

    if activation.dim() != 3:
        raise ValueError(f"expected a (C, h, w) activation, got shape {tuple(activation.shape)}")
    activation = activation.detach().float().cpu()
    channels = rank_channels(activation, max_channels)
    maps = normalize_map(activation[channels])
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
    return FeatureGrid(image=image, channels=channels, total_channels=activation.shape[0])


@dataclass
class FmapOptions:
    out_dir: Path
    layers: list[str]
    max_channels: int = 64
    cmap: str = "viridis"
    save_raw: bool = False
    label_channels: bool = True
    layers_named: bool = True  # False for the default "every Conv2d": convs that do not run (training-only heads) are skipped


def write_feature_maps(loaded: LoadedModel, batch: list[PreparedImage], options: FmapOptions) -> list[Record]:
    """Capture every requested layer for a batch in one forward pass; write one grid per (image, layer)."""
    with capture(loaded.module, options.layers) as activations:
        run_model(loaded.module, model_batch(batch, loaded))
    layers = [layer for layer in options.layers if options.layers_named or layer in activations]
    for layer in layers:
        found = activations.get(layer)
        if found is None:
            raise UsageError(f"layer {layer!r} did not run in the forward pass; choose another with -l")
        if found.dim() != 4:
            raise UsageError(f"layer {layer!r} has output shape {tuple(found.shape)}, not (N, C, H, W): it has no feature maps to draw")
    records = []
    for index, item in enumerate(batch):
        record = Record(input=str(item.path))
        for layer in layers:
            activation = activations[layer][index]
            grid = feature_grid(activation, max_channels=options.max_channels, cmap=options.cmap,
                                label_channels=options.label_channels)
            folder, name = options.out_dir / item.stem, f"fmap_{safe_name(layer)}"
            metadata = {
                "hookviz:layer": layer,
                "hookviz:shape": "x".join(map(str, activation.shape)),
                "hookviz:channels": ",".join(map(str, grid.channels)),
                "hookviz:selection": (f"the {len(grid.channels)} most active of {grid.total_channels} channels (mean |activation|)"
                                      if grid.is_subset else f"all {grid.total_channels} channels"),
                "hookviz:input": str(item.path),
            }
            output = {"kind": "fmap", "layer": layer, "png": str(write_png(grid.image, folder / f"{name}.png", metadata)),
                      "channels": grid.channels}
            if options.save_raw:
                output["raw"] = str(write_npy(activation, folder / f"{name}.npy"))
            record.outputs.append(output)
        records.append(record)
    return records
