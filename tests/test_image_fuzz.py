"""Property-based fuzzing of load_image: any bytes give an RGB image or a one-line InputError, and every image
Pillow can save decodes to RGB at its own size."""

from __future__ import annotations

import io

import numpy as np
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from PIL import Image

from hookviz.errors import InputError
from hookviz.images import load_image


def _encoded_samples() -> dict[str, bytes]:
    """Small real files of every format, the seeds for byte flips and truncation."""
    rng = np.random.default_rng(7)
    pixels = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
    picture, flipped = Image.fromarray(pixels), Image.fromarray(pixels[::-1].copy())
    exif = Image.Exif()
    exif[0x0112] = 6
    samples = {}
    for name, fmt, image, options in [
        ("png", "PNG", picture, {}),
        ("png-16bit", "PNG", Image.fromarray(pixels[..., 0].astype(np.uint16) * 257), {}),
        ("png-palette-transparent", "PNG", picture.quantize(8), {"transparency": 0}),
        ("jpeg-exif", "JPEG", picture, {"exif": exif}),
        ("jpeg-cmyk", "JPEG", picture.convert("CMYK"), {}),
        ("gif-animated", "GIF", picture, {"save_all": True, "append_images": [flipped]}),
        ("bmp", "BMP", picture, {}),
        ("tiff-lzw", "TIFF", picture, {"compression": "tiff_lzw"}),
        ("webp", "WEBP", picture, {}),
        ("webp-animated", "WEBP", picture, {"save_all": True, "append_images": [flipped]}),
    ]:
        buffer = io.BytesIO()
        image.save(buffer, fmt, **options)
        samples[name] = buffer.getvalue()
    return samples


SAMPLES = _encoded_samples()
MAGIC_NUMBERS = [
    b"\x89PNG\r\n\x1a\n",
    b"\xff\xd8\xff\xe0",
    b"GIF89a",
    b"GIF87a",
    b"BM",
    b"II*\x00",
    b"MM\x00*",
    b"RIFF\x24\x00\x00\x00WEBPVP8 ",
]


@st.composite
def damaged_files(draw) -> bytes:
    """A real encoded image with a few random bytes replaced, and maybe cut off at a random point."""
    data = bytearray(SAMPLES[draw(st.sampled_from(sorted(SAMPLES)))])
    for _ in range(draw(st.integers(0, 4))):
        data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    if draw(st.booleans()):
        data = data[: draw(st.integers(0, len(data)))]
    return bytes(data)


HOSTILE_BYTES = st.one_of(
    st.binary(max_size=600),
    st.builds(lambda magic, rest: magic + rest, st.sampled_from(MAGIC_NUMBERS), st.binary(max_size=600)),
    damaged_files(),
)
FUZZ = settings(deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@settings(FUZZ, max_examples=300)
@given(data=HOSTILE_BYTES)
def test_fuzz_any_bytes_give_rgb_or_a_one_line_input_error(tmp_path, data):
    """Random bytes, magic numbers plus noise, damaged real files: an RGB image or an InputError, nothing else."""
    path = tmp_path / "fuzzed.img"
    path.write_bytes(data)

    try:
        image = load_image(path)
    except InputError as exc:
        assert str(exc).startswith(f"{path}: ") and "\n" not in str(exc)
    else:
        assert image.mode == "RGB" and image.width >= 1 and image.height >= 1
        assert len(image.tobytes()) == 3 * image.width * image.height


def _random_image(mode: str, width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    if mode == "I;16":
        return Image.fromarray(rng.integers(0, 65536, (height, width), dtype=np.uint16))
    if mode == "1":
        return Image.fromarray(rng.integers(0, 2, (height, width)).astype(bool))
    bands = len(Image.new(mode, (1, 1)).getbands())
    image = Image.frombytes(
        mode, (width, height), rng.integers(0, 256, (height, width, bands), dtype=np.uint8).tobytes()
    )
    if mode == "P":
        image.putpalette(rng.integers(0, 256, 768, dtype=np.uint8).tobytes())
    return image


FORMATS = {"PNG": ".png", "JPEG": ".jpg", "GIF": ".gif", "BMP": ".bmp", "TIFF": ".tiff", "WEBP": ".webp"}


@settings(FUZZ, max_examples=150)
@given(
    mode=st.sampled_from(["L", "RGB", "RGBA", "P", "I;16", "CMYK", "1", "LA"]),
    fmt=st.sampled_from(sorted(FORMATS)),
    width=st.integers(1, 64),
    height=st.integers(1, 64),
    seed=st.integers(0, 2**32 - 1),
)
def test_fuzz_every_valid_mode_and_format_decodes_to_rgb_of_its_size(tmp_path, mode, fmt, width, height, seed):
    """Any image Pillow can save (mode x format x size) decodes to RGB at its size; lossless RGB exactly."""
    image = _random_image(mode, width, height, seed)
    path = tmp_path / f"picture{FORMATS[fmt]}"
    path.unlink(missing_ok=True)
    try:
        image.save(path, fmt)
    except (OSError, ValueError, KeyError, TypeError):  # a combination Pillow cannot write, e.g. CMYK as PNG
        assume(False)

    decoded = load_image(path)

    assert decoded.mode == "RGB" and decoded.size == (width, height)
    if mode == "RGB" and fmt in ("PNG", "BMP", "TIFF"):
        assert decoded.tobytes() == image.tobytes()
