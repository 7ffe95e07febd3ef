"""Seeing a layer's output as a (N, C, h, w) map, whatever its layout.

CNN layers give (N, C, h, w). Vision transformers give tokens (N, T, C): prefix
tokens -- a class token, DeiT's distillation token, register tokens (timm's
``*_reg4_*`` and DINOv2 with registers: 1 + 4) -- followed by one token per patch
of an h x w grid (torchvision ``vit_b_16``: 1 + 14 x 14 at 224 px). Swin's stages
give channels-last (N, h, w, C). The layout is found from the shape and the model
input's size: the patch grid has the input's aspect ratio. When the model says how
many prefix tokens it has (timm's ``num_prefix_tokens``), pass it as ``prefix``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from .errors import UsageError

MAX_PREFIX_TOKENS = 16  # class token, distillation token, register tokens (4 or 8 in timm and DINOv2 models)


@dataclass(frozen=True)
class Layout:
    """How an output reads as a (N, C, h, w) map: its kind and the map's height and width."""

    kind: str  # "nchw", "nhwc" or "tokens"
    height: int
    width: int
    prefix: int = 0  # tokens before the patch grid (dropped)


def _aspect_error(height: int, width: int, input_size: tuple[int, int]) -> float:
    return abs(math.log((height / width) / (input_size[0] / input_size[1])))


def spatial_layout(
    shape: tuple[int, ...] | torch.Size, input_size: tuple[int, int], prefix: int | None = None
) -> Layout | None:
    """How to read an output of ``shape`` (batch first) as a map over an input of ``input_size`` (h, w).

    None when it has no spatial extent (a vector, a 1x1 map, a token count with no grid).
    ``prefix``: how many tokens come before the patch grid, when the model says so; else it is inferred.
    """
    shape = tuple(shape)
    tolerance = math.log(1.5)  # pooling and odd sizes round a map's sides; a wrong reading is off by far more
    if len(shape) == 4:
        candidates = [Layout("nchw", shape[2], shape[3]), Layout("nhwc", shape[1], shape[2])]
        candidates = [
            c for c in candidates if c.height * c.width > 1 and c.height <= input_size[0] and c.width <= input_size[1]
        ]
        candidates = [c for c in candidates if _aspect_error(c.height, c.width, input_size) <= tolerance]
        # The reading closer to the input's aspect ratio wins; on a tie (channels equal to a side) NCHW, the convention.
        candidates.sort(key=lambda c: _aspect_error(c.height, c.width, input_size))
        return candidates[0] if candidates else None
    if len(shape) == 3:
        tokens = shape[1]
        if prefix is not None:
            known = _token_grid(tokens, prefix, input_size, tolerance)
            if known is not None:
                return known
        # tokens = prefix + h * w with h / w the input's aspect: the prefix whose grid fits the aspect best wins,
        # the fewer prefix tokens on a tie. A wrong prefix p - d (0 < d < h) leaves d tokens over: no grid.
        grids = [_token_grid(tokens, p, input_size, tolerance) for p in range(min(MAX_PREFIX_TOKENS, tokens) + 1)]
        found = [grid for grid in grids if grid is not None]
        if found:
            return min(found, key=lambda g: (round(_aspect_error(g.height, g.width, input_size), 6), g.prefix))
    return None


def _token_grid(tokens: int, prefix: int, input_size: tuple[int, int], tolerance: float) -> Layout | None:
    """``tokens`` read as ``prefix`` tokens and then an h x w grid near the input's aspect ratio, or None."""
    patches = tokens - prefix
    if prefix < 0 or patches < 2:
        return None
    height = round(math.sqrt(patches * input_size[0] / input_size[1]))
    if height >= 1 and patches % height == 0:
        width = patches // height
        if _aspect_error(height, width, input_size) <= tolerance:
            return Layout("tokens", height, width, prefix)
    return None


def to_spatial(tensor: torch.Tensor, layout: Layout) -> torch.Tensor:
    """``tensor`` (N, ...) in ``layout`` as (N, C, h, w); differentiable, leading dims beyond N kept as N."""
    if layout.kind == "nchw":
        return tensor
    if layout.kind == "nhwc":
        return tensor.permute(0, 3, 1, 2)
    patches = tensor[:, layout.prefix :]
    return patches.transpose(1, 2).reshape(tensor.shape[0], tensor.shape[2], layout.height, layout.width)


def spatial_output(
    activations: Mapping[str, torch.Tensor],
    layer: str,
    input_size: tuple[int, int],
    calls: int = 0,
    prefix: int | None = None,
) -> tuple[torch.Tensor, Layout]:
    """The captured output of ``layer`` and how it reads as a map; a UsageError if it did not run or has no map.

    ``calls``: how many times the layer's module ran (for a ``name#N`` that asks for a call it never made).
    ``prefix``: the model's prefix-token count, when known (``LoadedModel.prefix_tokens``).
    """
    output = activations.get(layer)
    if output is None and calls:
        base = layer.rpartition("#")[0] or layer
        choices = f"{base}#1" if calls == 1 else f"{base}#1 ... {base}#{calls}"
        raise UsageError(f"layer {layer!r}: the module runs {calls} time(s) per forward pass; pick one of {choices}")
    if output is None:
        raise UsageError(f"layer {layer!r} did not run in the forward pass; choose another with -l")
    layout = spatial_layout(output.shape, input_size, prefix)
    if layout is None:
        raise UsageError(
            f"layer {layer!r} has output shape {tuple(output.shape)}, not a spatial map "
            "(N, C, H, W) or patch tokens; choose another with -l"
        )
    return output, layout
