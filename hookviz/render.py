"""Tensors to pictures: colormaps by lookup table, heat overlays, captions.

Everything stays in torch and PIL (RGB); matplotlib is used only to read a
colormap's 256 colours once.
"""

from __future__ import annotations

import math
from functools import cache, lru_cache

import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

from .errors import UsageError, did_you_mean


@cache
def colormap_lut(name: str) -> torch.Tensor:
    """A matplotlib colormap as a (256, 3) uint8 lookup table."""
    import matplotlib

    try:
        cmap = matplotlib.colormaps[name]
    except KeyError:
        hint = did_you_mean(name, list(matplotlib.colormaps))
        raise UsageError(f"unknown colormap {name!r}" + (hint or "; see matplotlib's colormap names")) from None
    rgba = cmap([i / 255 for i in range(256)])
    return (torch.tensor(rgba[:, :3]) * 255).round().to(torch.uint8)


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
    """Blend a heatmap (H, W) in [0, 1] over an RGB uint8 image (3, H, W); dim what the model did not see."""
    colours = apply_colormap(heat, cmap).float()
    blended = image.float() * (1 - alpha) + colours * alpha
    if seen is not None and not bool(seen.all()):
        blended = torch.where(seen, blended, image.float() * 0.35)
    return blended.round().clamp(0, 255).to(torch.uint8)


@lru_cache(maxsize=16)
def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
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
    font = _font(size)
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    band_top = picture.height - int(bottom - top) - 2 * pad
    band = picture.crop((0, band_top, picture.width, picture.height))
    picture.paste(Image.eval(band, lambda value: int(value * CAPTION_DIMMING)), (0, band_top))
    draw.text((pad - left, band_top + pad - top), text, fill=(255, 255, 255), font=font)
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
    left, top, _, _ = draw.textbbox((0, 0), text, font=_font(TITLE_FONT))
    draw.text((4 - left, 5 - top), text, fill=(20, 20, 20), font=_font(TITLE_FONT))
    if colorbar:
        cmap, _, _ = colorbar
        height = picture.height
        ramp = torch.linspace(1, 0, height)[:, None].expand(height, COLORBAR_WIDTH)
        canvas.paste(to_pil(apply_colormap(ramp, cmap)), (picture.width + 6, band))
        for text, y in zip(labels, (band, band + height - 12), strict=True):
            draw.text((picture.width + 8 + COLORBAR_WIDTH, y), text, fill=(20, 20, 20), font=_font(11))
    return canvas


def _text_width(draw: ImageDraw.ImageDraw, text: str, size: int) -> float:
    left, _, right, _ = draw.textbbox((0, 0), text, font=_font(size))
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
    font = _font(size)
    for (x, y), text in zip(positions, labels, strict=True):
        left, top, right, bottom = draw.textbbox((x, y), text, font=font)
        draw.rectangle((left - 1, top - 1, right + 1, bottom + 1), fill=(0, 0, 0))
        draw.text((x, y), text, fill=(255, 255, 255), font=font)
