"""Find input images, decode them to RGB, and turn them into model inputs.

Decoding applies EXIF orientation and converts every mode (grayscale, RGBA,
palette, 16-bit, CMYK) to 8-bit RGB, so what the model sees and what the
overlay is drawn on are the same picture the user sees in a viewer.
"""

from __future__ import annotations

import math
import sys
import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import InputError, UsageError, shown
from .preprocessing import Preprocessing

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif"})
STDIN = "-"
ORIENTATION_TAG = 0x0112  # EXIF
# --crop resizes the whole image before cropping (as torchvision does) up to this aspect ratio; longer strips
# are resampled only where the crop keeps them.
MAX_RESIZED_ASPECT = 8
DEFAULT_MAX_PIXELS = Image.MAX_IMAGE_PIXELS or 89_478_485  # Pillow's own default


@dataclass(frozen=True)
class ModelView:
    """Which part of the original image the model saw, in original pixel coordinates.

    ``box`` is (left, top, right, bottom); the whole image without ``--crop``.
    """

    box: tuple[float, float, float, float]
    image_size: tuple[int, int]  # (width, height) of the original

    @property
    def is_whole_image(self) -> bool:
        width, height = self.image_size
        return self.box == (0.0, 0.0, float(width), float(height))


def collect_inputs(arguments: Iterable[str], stdin: TextIO | None = None) -> list[Path]:
    """Expand files, directories (recursive, sorted) and ``-`` (paths on stdin) into a list of paths.

    Explicit files are kept even when they do not exist or are not images, so each
    gets its own error; directories contribute only files with image suffixes, and
    skip hidden files and folders (macOS ``._photo.jpg`` forks, ``.ipynb_checkpoints``).
    """
    paths: list[Path] = []
    for argument in arguments:
        if argument == STDIN:
            stream = stdin if stdin is not None else sys.stdin
            paths.extend(Path(line.strip()) for line in stream if line.strip())
            continue
        path = Path(argument)
        if path.is_dir():
            paths.extend(sorted(p for p in path.rglob("*") if _is_listed_image(p, path)))
        else:
            paths.append(path)
    if not paths:
        raise UsageError("no input images: pass image files, directories, or - to read paths from stdin")
    return paths


def _is_listed_image(path: Path, folder: Path) -> bool:
    hidden = any(part.startswith(".") for part in path.relative_to(folder).parts)
    return not hidden and path.suffix.lower() in IMAGE_SUFFIXES and path.is_file()


def load_image(path: Path | str, max_pixels: int | None = None, max_area: int | None = None) -> Image.Image:
    """Decode an image file to 8-bit RGB with EXIF orientation applied. Raises InputError.

    Images larger than ``max_pixels`` (default: Pillow's decompression-bomb limit,
    about 89 megapixels) are refused before they are decoded. With ``max_area``, a
    picture of more pixels comes back reduced to about that many, keeping its shape (a
    JPEG is decoded at reduced size to begin with, so a 64-megapixel photo never takes
    its full size in memory); ``image.info["original_size"]`` keeps its size in the file.
    """
    path = Path(path)
    limit = max_pixels if max_pixels is not None else DEFAULT_MAX_PIXELS
    if not path.exists():
        raise InputError(f"{shown(path)}: file not found")
    if path.is_dir():
        raise InputError(f"{shown(path)}: is a directory")
    if not path.is_file():  # opening a FIFO would wait for a writer forever
        raise InputError(f"{shown(path)}: not a regular file (a FIFO, socket or device); pass image files")
    try:
        with warnings.catch_warnings():
            # Pillow warns (rather than fails) on oversized images below 2x the limit: treat it as the error it is.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with _pixel_limit(limit), Image.open(path) as image:
                image.seek(0)  # animated GIF/WebP/TIFF: the first frame
                turned = image.getexif().get(ORIENTATION_TAG) in (5, 6, 7, 8)  # a quarter turn swaps the sides
                original_size = (image.height, image.width) if turned else image.size
                if max_area is not None and image.width * image.height > max_area and image.format == "JPEG":
                    factor = math.sqrt(max_area / (image.width * image.height))  # draft: 1/2, 1/4, 1/8, not below
                    image.draft("RGB", (math.ceil(image.width * factor), math.ceil(image.height * factor)))
                image.load()
                decoded = to_rgb(ImageOps.exif_transpose(image))
            if max_area is not None and decoded.width * decoded.height > max_area:
                factor = math.sqrt(max_area / (decoded.width * decoded.height))
                size = (max(1, round(decoded.width * factor)), max(1, round(decoded.height * factor)))
                decoded = decoded.resize(size, Image.Resampling.BILINEAR, reducing_gap=2.0)
            decoded.info["original_size"] = original_size
            return decoded
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise InputError(
            f"{shown(path)}: image has more than {limit:,} pixels, a possible decompression bomb; "
            f"if you trust it, raise the limit with --max-pixels"
        ) from None
    except UnidentifiedImageError:
        raise InputError(f"{shown(path)}: not an image hookviz can read (JPEG, PNG, WebP, BMP, TIFF, GIF)") from None
    except (OSError, SyntaxError, ValueError) as exc:  # truncated or corrupt data
        raise InputError(f"{shown(path)}: cannot decode image ({exc})") from None


@contextmanager
def _pixel_limit(limit: int) -> Iterator[None]:
    """Pillow's bomb check reads a module global; set it for this decode only (images decode in one thread per process)."""
    previous, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, limit
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = previous


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB; transparency is composited over white."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        image = _high_bit_depth_to_l(image)
    if image.mode in ("P", "L", "RGB") and "transparency" in image.info:
        image = image.convert("RGBA")  # a palette or colour-key transparency (PNG tRNS)
    if image.mode == "P":
        image = image.convert("RGB")
    if image.mode in ("LA", "PA", "La"):
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "RGBa"):
        background = Image.new("RGB", image.size, (255, 255, 255))
        background.paste(image.convert("RGBA"), mask=image.convert("RGBA").getchannel("A"))
        return background
    if image.mode != "RGB":
        image = image.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV
    return image


def _high_bit_depth_to_l(image: Image.Image) -> Image.Image:
    """16-bit and 32-bit grayscale to 8-bit, scaling by the format's range (Pillow's convert clips instead)."""
    values = torch.from_numpy(__import__("numpy").array(image, dtype="float32"))
    if image.mode.startswith("I;16"):
        scale = 65535.0
    elif image.mode == "F":
        scale = 1.0 if float(values.max()) <= 1.0 else 255.0
    else:  # "I": 32-bit container, usually holding 16-bit data
        scale = 255.0 if float(values.max()) <= 255.0 else 65535.0
    eight_bit = (values / scale * 255.0).clamp(0, 255).round().to(torch.uint8)
    return Image.fromarray(eight_bit.numpy(), mode="L")


def image_to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image to a uint8 tensor of shape (3, H, W)."""
    data = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
    return data.view(image.height, image.width, 3).permute(2, 0, 1)


_RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
    "lanczos": Image.Resampling.LANCZOS,
}


def model_view(image_size: tuple[int, int], preprocessing: Preprocessing, crop: bool) -> ModelView:
    """The region of the original image the model input covers (same arithmetic as torchvision's resize + center crop)."""
    width, height = image_size
    if not crop:
        return ModelView(box=(0.0, 0.0, float(width), float(height)), image_size=image_size)
    resized_w, resized_h = _resized_shorter_side(width, height, preprocessing.resize_size)
    crop_h, crop_w = preprocessing.input_size
    top = int(round((resized_h - crop_h) / 2.0))
    left = int(round((resized_w - crop_w) / 2.0))
    scale_x, scale_y = width / resized_w, height / resized_h
    return ModelView(
        box=(left * scale_x, top * scale_y, (left + crop_w) * scale_x, (top + crop_h) * scale_y),
        image_size=image_size,
    )


def _resized_shorter_side(width: int, height: int, size: int) -> tuple[int, int]:
    """torchvision's resize of the shorter side to ``size``, keeping the aspect ratio."""
    if width <= height:
        return size, int(size * height / width)
    return int(size * width / height), size


def preprocess(image: Image.Image, preprocessing: Preprocessing, crop: bool = False) -> torch.Tensor:
    """PIL RGB image to a normalized float tensor (3, h, w) for the model.

    Without ``crop`` the whole image is resized to the model's input size, so every
    pixel of the original is explained; with ``crop`` this is the weights' own eval
    transform (resize the shorter side, then center crop).
    """
    resample = _RESAMPLE.get(preprocessing.interpolation, Image.Resampling.BILINEAR)
    height, width = preprocessing.input_size
    if crop:
        resized_size = _resized_shorter_side(image.width, image.height, preprocessing.resize_size)
        if resized_size[0] * resized_size[1] <= MAX_RESIZED_ASPECT * preprocessing.resize_size**2:
            # Exactly the weights' own transform (tests compare with torchvision's to 1e-5).
            resized = image.resize(resized_size, resample)
            left = int(round((resized.width - width) / 2.0))
            top = int(round((resized.height - height) / 2.0))
            model_image = resized.crop((left, top, left + width, top + height))
        else:
            # A long strip: resizing all of it first would take memory without bound (a 1x200000 PNG resized to
            # 256 px on its short side is 40 GB). Resample only the region the crop keeps, straight to the model's
            # size: the same sampling positions and filter (Pillow's filters reach past the box into the image),
            # equal up to one intensity level in a few pixels.
            box = model_view(image.size, preprocessing, crop=True).box
            if min(box[2] - box[0], box[3] - box[1]) < 1:
                raise InputError(
                    f"a {image.width}x{image.height} image is too narrow for --crop: the centre crop would keep "
                    "less than one pixel of its short side; run without --crop"
                )
            model_image = image.resize((width, height), resample, box=box)
    else:
        model_image = image.resize((width, height), resample)
    if preprocessing.channels == 1:
        gray = model_image.convert("L")
        pixels = torch.frombuffer(bytearray(gray.tobytes()), dtype=torch.uint8).view(1, gray.height, gray.width)
        pixels = pixels.float().div_(255.0)
    else:
        pixels = image_to_tensor(model_image).float().div_(255.0)
    mean = torch.tensor(preprocessing.mean, dtype=torch.float32).view(-1, 1, 1)
    std = torch.tensor(preprocessing.std, dtype=torch.float32).view(-1, 1, 1)
    return pixels.sub_(mean).div_(std)
