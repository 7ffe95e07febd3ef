"""Tensors to pictures: colormaps by lookup table, heat overlays, captions.

Overlays are drawn in one pass at the photo's resolution with 8-bit arithmetic in Pillow (the map upsampled,
looked up in a 256-colour table, composited over the photo); the common colormaps' tables ship with hookviz
(hookviz.colormaps), so matplotlib is imported only for another colormap name.
"""

from __future__ import annotations

import math
from functools import cache, lru_cache

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

from .colormaps import BUILT_IN, builtin_table
from .errors import UsageError, did_you_mean

UNSEEN_DIMMING = 0.35  # what shows of the photo outside the part the model saw (--crop)


@cache
def colormap_lut(name: str) -> torch.Tensor:
    """A matplotlib colormap as a (256, 3) uint8 lookup table (built-in tables need no matplotlib)."""
    return torch.frombuffer(bytearray(colormap_palette(name)), dtype=torch.uint8).view(256, 3)


@cache
def colormap_palette(name: str) -> bytes:
    """A colormap's 256 RGB colours as 768 bytes (a Pillow palette)."""
    table = builtin_table(name)
    if table is not None:
        return table
    try:
        import matplotlib
    except ImportError:  # matplotlib is a dependency, but a trimmed install may lack it
        raise UsageError(
            f"colormap {name!r} needs matplotlib (pip install matplotlib); built in: {', '.join(BUILT_IN)}"
        ) from None
    try:
        cmap = matplotlib.colormaps[name]
    except KeyError:
        hint = did_you_mean(name, list(matplotlib.colormaps))
        raise UsageError(f"unknown colormap {name!r}" + (hint or "; see matplotlib's colormap names")) from None
    rgba = np.asarray(cmap([i / 255 for i in range(256)]))
    return (rgba[:, :3] * 255).round().astype(np.uint8).tobytes()


def apply_colormap(values: torch.Tensor, cmap: str) -> torch.Tensor:
    """Values in [0, 1] of shape (..., H, W) to colours of shape (..., 3, H, W), uint8."""
    index = (values.clamp(0, 1) * 255).round().long()
    colours = colormap_lut(cmap)[index]  # (..., H, W, 3)
    return colours.movedim(-1, -3).contiguous()


def to_pil(image: torch.Tensor) -> Image.Image:
    """uint8 tensor (3, H, W) to a PIL RGB image."""
    return Image.fromarray(image.permute(1, 2, 0).contiguous().cpu().numpy(), mode="RGB")


def normalize_map(heat: torch.Tensor) -> torch.Tensor:
    """Scale each map (..., H, W) to [0, 1]; a flat map becomes all zeros."""
    flat = heat.flatten(-2)
    low = flat.min(dim=-1, keepdim=True).values
    high = flat.max(dim=-1, keepdim=True).values
    span = high - low
    scaled = torch.where(span > 0, (flat - low) / span.clamp_min(torch.finfo(flat.dtype).tiny), torch.zeros_like(flat))
    return scaled.view_as(heat)


def resize_map(heat: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of a (h, w) map to (H, W), pixel centres aligned (align_corners=False)."""
    return F.interpolate(heat[None, None].float(), size=size, mode="bilinear", align_corners=False)[0, 0]


def heat_in_image(
    heat: torch.Tensor, box: tuple[float, float, float, float], image_size: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Place a (h, w) map, which covers ``box`` of the original image, on the original's pixel grid.

    Returns (heat, seen): heat of shape (H, W) in the original's resolution, zero
    outside the box, and a boolean mask of the pixels the model saw.
    """
    width, height = image_size
    left, top, right, bottom = box
    if (left, top, right, bottom) == (0.0, 0.0, float(width), float(height)):
        return resize_map(heat, (height, width)), torch.ones(height, width, dtype=torch.bool)
    # Resize to the box's (fractional) extent, then paste the part that lies inside the image.
    box_w, box_h = max(1, round(right - left)), max(1, round(bottom - top))
    placed = resize_map(heat, (box_h, box_w))
    canvas = torch.zeros(height, width)
    seen = torch.zeros(height, width, dtype=torch.bool)
    x0, y0 = round(left), round(top)
    xs0, ys0 = max(0, x0), max(0, y0)
    xs1, ys1 = min(width, x0 + box_w), min(height, y0 + box_h)
    canvas[ys0:ys1, xs0:xs1] = placed[ys0 - y0 : ys1 - y0, xs0 - x0 : xs1 - x0]
    seen[ys0:ys1, xs0:xs1] = True
    return canvas, seen


def overlay(
    image: torch.Tensor, heat: torch.Tensor, *, alpha: float = 0.5, cmap: str = "jet", seen: torch.Tensor | None = None
) -> torch.Tensor:
    """Blend a heatmap (H, W) in [0, 1] over an RGB uint8 image (3, H, W); dim what the model did not see.

    8-bit arithmetic (see ``overlay_picture``): within one intensity level of the float blend.
    """
    picture = _composited(to_pil(image), _heat_index(heat), alpha, cmap, opacity_from_heat=False)
    blended = torch.from_numpy(np.asarray(picture).copy()).permute(2, 0, 1)
    if seen is not None and not bool(seen.all()):
        blended = torch.where(seen, blended, _dimmed(image))
    return blended


def overlay_picture(
    pixels: torch.Tensor,
    heat: torch.Tensor,
    box: tuple[float, float, float, float],
    *,
    alpha: float = 0.5,
    cmap: str = "jet",
    opacity_from_heat: bool = False,
) -> Image.Image:
    """A heat overlay at the photo's resolution, in one pass: what ``overlay(pixels, *heat_in_image(...))`` draws.

    ``heat`` is the (h, w) map in [0, 1] at the model's resolution, covering ``box`` (left, top, right, bottom)
    of the photo ``pixels`` (3, H, W) uint8. The map is upsampled bilinearly onto the box's pixels (pixel centres
    aligned, as ``resize_map``), turned into colour-table indices and composited over the photo as 8-bit integers
    (Pillow's rounded division by 255): no float image of the photo's size is ever made. ``alpha`` is the heat's
    opacity; with ``opacity_from_heat`` each pixel's opacity is ``alpha`` times its heat (the photo shows as it is
    where there is none). The photo outside the box (what the model did not see) is dimmed.
    """
    photo = to_pil(pixels)
    width, height = photo.size
    left, top, right, bottom = box
    if (left, top, right, bottom) == (0.0, 0.0, float(width), float(height)):
        return _composited(photo, _upsampled_index(heat, (width, height)), alpha, cmap, opacity_from_heat)
    box_w, box_h = max(1, round(right - left)), max(1, round(bottom - top))
    x0, y0 = round(left), round(top)
    xs0, ys0 = max(0, x0), max(0, y0)
    xs1, ys1 = min(width, x0 + box_w), min(height, y0 + box_h)
    picture = photo.point(lambda value: int(value * UNSEEN_DIMMING + 0.5))
    if xs1 > xs0 and ys1 > ys0:
        index = _upsampled_index(heat, (box_w, box_h)).crop((xs0 - x0, ys0 - y0, xs1 - x0, ys1 - y0))
        seen = _composited(photo.crop((xs0, ys0, xs1, ys1)), index, alpha, cmap, opacity_from_heat)
        picture.paste(seen, (xs0, ys0))
    return picture


def _upsampled_index(heat: torch.Tensor, size: tuple[int, int]) -> Image.Image:
    """A (h, w) map in [0, 1] resized to ``size`` (width, height) as colour-table indices 0..255 (mode L)."""
    width, height = size
    heat = heat.detach().float().cpu()
    if width >= heat.shape[1] and height >= heat.shape[0]:
        # Pillow's bilinear upsampling samples at the same positions as resize_map (align_corners=False) and
        # releases the GIL; torch would start its own threads in the writer threads.
        values = Image.fromarray(heat.contiguous().numpy(), mode="F").resize(size, Image.Resampling.BILINEAR)
    else:  # a map larger than its box: Pillow would filter (antialias) where resize_map samples
        values = Image.fromarray(resize_map(heat, (height, width)).numpy(), mode="F")
    return _index_of(values)


def _heat_index(heat: torch.Tensor) -> Image.Image:
    """A (H, W) map in [0, 1] as colour-table indices 0..255 (mode L)."""
    return _index_of(Image.fromarray(heat.detach().float().cpu().contiguous().numpy(), mode="F"))


def _index_of(values: Image.Image) -> Image.Image:
    # round(v * 255), clipped to 0..255: Pillow's float-to-8-bit conversion clips and truncates.
    return values.point(lambda v: v * 255 + 0.5).convert("L")


def _composited(
    photo: Image.Image, index: Image.Image, alpha: float, cmap: str, opacity_from_heat: bool
) -> Image.Image:
    """Colour-table indices (L) coloured by ``cmap`` and composited over ``photo`` with opacity ``alpha``."""
    colours = index.copy()
    colours.putpalette(colormap_palette(cmap))
    opacity = max(0, min(255, round(alpha * 255)))
    if opacity_from_heat:
        mask = index.point([round(opacity * level / 255) for level in range(256)])
    else:
        mask = Image.new("L", photo.size, opacity)
    return Image.composite(colours.convert("RGB"), photo, mask)


def _dimmed(image: torch.Tensor) -> torch.Tensor:
    return (image.float() * UNSEEN_DIMMING).round().to(torch.uint8)


@lru_cache(maxsize=16)
def font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """Pillow's default font at ``size`` pixels (cached), or its bitmap font where Pillow has no FreeType."""
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


MIN_CAPTIONED_SIDE = 256  # a captioned picture is enlarged until its short side is at least this many pixels
MAX_ENLARGED_SIDE = 4096  # ... unless its long side would pass this
MIN_CAPTION_FONT = 10
CAPTION_DIMMING = 0.3  # what shows through the caption band


def captioned(picture: Image.Image, text: str) -> tuple[Image.Image, int]:
    """``picture`` with ``text`` on a dimmed band along its bottom edge, and the factor it was enlarged by.

    A picture whose short side is under ``MIN_CAPTIONED_SIDE`` (and whose long side allows it)
    is first enlarged by a whole factor (nearest neighbour: every original pixel becomes a block, so nothing moves), so
    that the text is readable and its band covers at most an eighth of the height. The
    font shrinks until the text fits the width; text too long even then loses its middle.
    """
    scale = math.ceil(MIN_CAPTIONED_SIDE / min(picture.size)) if min(picture.size) < MIN_CAPTIONED_SIDE else 1
    scale = max(1, min(scale, MAX_ENLARGED_SIDE // max(picture.size)))  # a 4x150000 strip stays a strip
    if scale > 1:
        picture = picture.resize((picture.width * scale, picture.height * scale), Image.Resampling.NEAREST)
    draw = ImageDraw.Draw(picture)
    pad = 4
    size = max(MIN_CAPTION_FONT, min(28, min(picture.size) // 20))
    while size > MIN_CAPTION_FONT and _text_width(draw, text, size) > picture.width - 2 * pad:
        size -= 1
    text = _elided(draw, text, size, picture.width - 2 * pad)
    chosen = font(size)
    left, top, right, bottom = draw.textbbox((0, 0), text, font=chosen)
    band_top = picture.height - int(bottom - top) - 2 * pad
    band = picture.crop((0, band_top, picture.width, picture.height))
    picture.paste(Image.eval(band, lambda value: int(value * CAPTION_DIMMING)), (0, band_top))
    draw.text((pad - left, band_top + pad - top), text, fill=(255, 255, 255), font=chosen)
    return picture, scale


TITLE_FONT = 13
COLORBAR_WIDTH = 14


def titled(picture: Image.Image, title: str, colorbar: tuple[str, float, float] | None = None) -> Image.Image:
    """``picture`` under a white band with ``title`` (elided to fit), and with ``colorbar`` = (cmap, low, high)
    a colour bar on the right labelled with the values of its two ends."""
    probe = ImageDraw.Draw(picture)
    labels = [f"{colorbar[2]:.3g}", f"{colorbar[1]:.3g}"] if colorbar else []
    label_width = max((int(_text_width(probe, text, 11)) for text in labels), default=0)
    bar_space = COLORBAR_WIDTH + label_width + 12 if colorbar else 0
    band = TITLE_FONT + 10
    canvas = Image.new("RGB", (picture.width + bar_space, picture.height + band), (255, 255, 255))
    canvas.paste(picture, (0, band))
    draw = ImageDraw.Draw(canvas)
    text = _elided(draw, title, TITLE_FONT, canvas.width - 8)
    left, top, _, _ = draw.textbbox((0, 0), text, font=font(TITLE_FONT))
    draw.text((4 - left, 5 - top), text, fill=(20, 20, 20), font=font(TITLE_FONT))
    if colorbar:
        cmap, _, _ = colorbar
        height = picture.height
        ramp = torch.linspace(1, 0, height)[:, None].expand(height, COLORBAR_WIDTH)
        canvas.paste(to_pil(apply_colormap(ramp, cmap)), (picture.width + 6, band))
        for text, y in zip(labels, (band, band + height - 12), strict=True):
            draw.text((picture.width + 8 + COLORBAR_WIDTH, y), text, fill=(20, 20, 20), font=font(11))
    return canvas


def _text_width(draw: ImageDraw.ImageDraw, text: str, size: int) -> float:
    left, _, right, _ = draw.textbbox((0, 0), text, font=font(size))
    return right - left


def _elided(draw: ImageDraw.ImageDraw, text: str, size: int, width: int) -> str:
    """``text``, or its start and end around an ellipsis, whichever fits ``width`` pixels."""
    if _text_width(draw, text, size) <= width:
        return text
    keep = len(text)
    while keep > 2:
        keep -= 1
        shortened = text[: (keep + 1) // 2] + "\u2026" + text[len(text) - keep // 2 :]
        if _text_width(draw, shortened, size) <= width:
            return shortened
    return "\u2026"


def draw_labels(image: Image.Image, positions: list[tuple[int, int]], labels: list[str], size: int) -> None:
    """Small labels (e.g. channel indices) at the given top-left positions."""
    draw = ImageDraw.Draw(image)
    chosen = font(size)
    for (x, y), text in zip(positions, labels, strict=True):
        left, top, right, bottom = draw.textbbox((x, y), text, font=chosen)
        draw.rectangle((left - 1, top - 1, right + 1, bottom + 1), fill=(0, 0, 0))
        draw.text((x, y), text, fill=(255, 255, 255), font=chosen)
