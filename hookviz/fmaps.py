"""Feature-map grids: one tile per channel, built as one tensor (no figure per tile)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from PIL import Image

from .render import apply_colormap, draw_labels, normalize_map, to_pil

SCALES = ("channel", "layer")
MIN_TILE = 64  # small maps (7x7) are enlarged to at least this many pixels so they stay readable
TILE_GAP = 2


@dataclass
class FeatureGrid:
    """A grid picture of one layer output, and which channels its tiles show."""

    image: Image.Image
    channels: list[int]  # channel indices shown, in tile order
    total_channels: int
    value_range: tuple[float, float] | None = None  # with scale="layer": the activation values of colour 0 and 1

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


def feature_grid(
    activation: torch.Tensor, *, max_channels: int = 64, cmap: str = "viridis", label_channels: bool = True
) -> FeatureGrid:
    """A near-square grid of the channels of one layer output ``activation`` (C, h, w).

    Each tile is scaled to its own [0, 1] range, so weak channels are still visible.
    """
    if activation.dim() != 3:
        raise ValueError(f"expected a (C, h, w) activation, got shape {tuple(activation.shape)}")
    maps, channels = selected_channels(activation[None], max_channels)
    return channel_grid(maps[0], channels[0].tolist(), activation.shape[0], cmap=cmap, label_channels=label_channels)


def channel_grid(
    maps: torch.Tensor,
    channels: list[int],
    total_channels: int,
    *,
    cmap: str = "viridis",
    label_channels: bool = True,
    scale: str = "channel",
    aspect: float | None = None,
    layer_range: tuple[float, float] | None = None,
) -> FeatureGrid:
    """The grid of already selected channel ``maps`` (k, h, w), labelled with their ``channels`` indices.

    ``scale="channel"`` scales each tile to its own range (weak channels stay visible);
    ``"layer"`` uses one range for every tile, so strong and weak channels compare (the
    range is returned in ``FeatureGrid.value_range``; ``layer_range`` gives it, e.g. over all of
    the layer's channels rather than those shown). ``aspect`` (width / height) stretches
    the tiles to the picture's own shape: a model fed a 4:3 photo as a square sees it squeezed.
    Channel indices are drawn only where they leave most of a tile visible.
    """
    from torchvision.utils import make_grid

    if scale not in SCALES:
        raise ValueError(f"scale must be one of {SCALES}, got {scale!r}")
    value_range = None
    if scale == "layer":
        low, high = layer_range if layer_range is not None else (float(maps.min()), float(maps.max()))
        value_range = (low, high)
        maps = (maps - low) / (high - low) if high > low else torch.zeros_like(maps)
    else:
        maps = normalize_map(maps)
    height, width = maps.shape[-2:]
    factor = max(1, math.ceil(MIN_TILE / max(height, width)))
    if factor > 1:  # nearest keeps each activation a visible block instead of blurring a 7x7 map
        maps = maps.repeat_interleave(factor, dim=-2).repeat_interleave(factor, dim=-1)
    if aspect is not None and abs(math.log(aspect * height / width)) > 0.01:
        tile_h = maps.shape[-2]
        tile_w = max(1, round(tile_h * aspect))
        if tile_w < MIN_TILE // 2:  # a tall picture: grow the height rather than shrink the width to nothing
            tile_w, tile_h = MIN_TILE // 2, max(1, round(MIN_TILE // 2 / aspect))
        maps = torch.nn.functional.interpolate(maps[None].float(), size=(tile_h, tile_w), mode="nearest")[0]
    tiles = apply_colormap(maps, cmap)  # (n, 3, H, W) uint8
    columns = math.ceil(math.sqrt(len(channels)))
    grid = make_grid(tiles, nrow=columns, padding=TILE_GAP, pad_value=255)
    image = to_pil(grid)
    tile_h, tile_w = tiles.shape[-2:]
    font_size = max(8, min(14, tile_h // 5))
    widest = max((len(str(c)) for c in channels), default=1)
    # A label is drawn only when it covers at most about a third of its tile (a 4-digit index hid a 7x7 tile).
    if label_channels and widest * font_size * 0.6 <= tile_w * 0.6 and font_size <= tile_h * 0.4:
        positions = [
            (TILE_GAP + (i % columns) * (tile_w + TILE_GAP) + 1, TILE_GAP + (i // columns) * (tile_h + TILE_GAP) + 1)
            for i in range(len(channels))
        ]
        draw_labels(image, positions, [str(c) for c in channels], font_size)
    return FeatureGrid(image=image, channels=channels, total_channels=total_channels, value_range=value_range)
