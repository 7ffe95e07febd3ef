"""Decoding every kind of image file to RGB, finding inputs, and turning images into model inputs."""

from __future__ import annotations

import io
from dataclasses import replace

import pytest
import torch
from cli_helpers import BLUE, GREEN, RED
from PIL import Image
from torchvision.models import ResNet18_Weights
from torchvision.transforms import functional as TF

from hookviz.errors import InputError, UsageError
from hookviz.images import collect_inputs, load_image, model_view, preprocess
from hookviz.preprocessing import Preprocessing

WHITE = (255, 255, 255)


def close(pixel, expected, tolerance=0):
    return all(abs(a - b) <= tolerance for a, b in zip(pixel, expected))


# (kind, colour in the left half, colour in the right half, tolerance): see the tmp_images fixture.
HALVES = [
    ("rgb_jpeg", RED, BLUE, 8),
    ("gray_png", (40, 40, 40), (200, 200, 200), 0),
    ("rgba_png", WHITE, GREEN, 0),  # transparent pixels are composited over white
    ("palette_png", RED, BLUE, 8),
    ("palette_transparent_png", WHITE, BLUE, 0),
    ("webp", RED, BLUE, 0),
    ("bmp", RED, BLUE, 0),
    ("tiff", RED, BLUE, 0),
    ("cmyk_jpeg", (255, 0, 0), (255, 0, 0), 8),  # CMYK (0, 255, 255, 0) is pure red
    ("animated_gif", RED, RED, 4),  # the first frame; the second one is blue
]


@pytest.mark.parametrize("kind, left, right, tolerance", HALVES, ids=[row[0] for row in HALVES])
def test_every_kind_decodes_to_rgb(tmp_images, image_size, kind, left, right, tolerance):
    image = load_image(tmp_images[kind])

    assert image.mode == "RGB"
    assert image.size == image_size
    width, height = image_size
    assert close(image.getpixel((width // 4, height // 2)), left, tolerance), image.getpixel((width // 4, height // 2))
    assert close(image.getpixel((3 * width // 4, height // 2)), right, tolerance)


def test_exif_orientation_is_applied(tmp_images, image_size):
    width, height = image_size

    image = load_image(tmp_images["exif_rotated_jpeg"])

    # Stored landscape with its left quarter red; orientation 6 turns it 90 degrees clockwise,
    # so the picture is portrait and the red strip is at the top.
    assert image.size == (height, width)
    assert close(image.getpixel((height // 2, width // 8)), RED, 8)
    assert close(image.getpixel((height // 2, width - 4)), BLUE, 8)


def test_16_bit_grayscale_is_scaled_not_clipped(tmp_images):
    image = load_image(tmp_images["gray16_png"])

    assert image.mode == "RGB"
    assert image.getpixel((5, 10)) == (255, 255, 255)  # 65535
    assert all(abs(v - 128) <= 1 for v in image.getpixel((30, 10)))  # 32768 / 65535 * 255 = 127.5
    assert image.getpixel((50, 10)) == (0, 0, 0)
    # What a plain Pillow conversion would have done: everything above 255 becomes white.
    assert Image.open(tmp_images["gray16_png"]).convert("L").getpixel((30, 10)) == 255


@pytest.mark.parametrize("mode, transparent, opaque", [("L", 0, 200), ("RGB", (0, 0, 0), GREEN)])
def test_a_transparent_colour_key_becomes_white(tmp_path, mode, transparent, opaque):
    # Not a P/LA/RGBA image, yet it has transparency: the PNG tRNS colour key of an L or RGB image.
    image = Image.new(mode, (40, 30), transparent)
    image.paste(opaque, (20, 0, 40, 30))
    path = tmp_path / f"keyed_{mode}.png"
    image.save(path, transparency=transparent)  # PNG tRNS: this colour is fully transparent

    decoded = load_image(path)

    assert decoded.getpixel((5, 5)) == WHITE
    assert decoded.getpixel((30, 5)) == (image.convert("RGB").getpixel((30, 5)))


@pytest.mark.parametrize("kind", ["truncated_jpeg", "empty_png", "fake_jpeg"])
def test_broken_files_raise_input_error_naming_the_path(tmp_images, kind):
    path = tmp_images[kind]

    with pytest.raises(InputError) as info:
        load_image(path)

    assert type(info.value) is InputError
    assert str(path) in str(info.value)
    assert "\n" not in str(info.value)


def test_missing_file_and_directory_raise_input_error(tmp_path):
    missing = tmp_path / "gone.jpg"
    with pytest.raises(InputError, match="not found") as info:
        load_image(missing)
    assert str(missing) in str(info.value)

    with pytest.raises(InputError, match="directory") as info:
        load_image(tmp_path)
    assert str(tmp_path) in str(info.value)


# --- collect_inputs ------------------------------------------------------------------------------


def test_collect_inputs_expands_directories_recursively_and_sorted(tmp_path):
    root = tmp_path / "photos"
    (root / "sub" / "deeper").mkdir(parents=True)
    (root / "a_dir").mkdir()
    for name in ["b.png", "a.jpg", "notes.txt", "sub/c.JPG", "sub/features.npy", "sub/deeper/d.webp", "a_dir/e.bmp"]:
        (root / name).write_bytes(b"x")

    found = collect_inputs([str(root)])

    # Sorted as paths: a_dir/e.bmp comes between a.jpg and b.png, although a walk would list it after them.
    assert found == [
        root / "a.jpg",
        root / "a_dir" / "e.bmp",
        root / "b.png",
        root / "sub" / "c.JPG",
        root / "sub" / "deeper" / "d.webp",
    ]


def test_collect_inputs_keeps_explicit_files_even_if_they_are_not_images(tmp_path):
    readme = tmp_path / "readme.txt"
    readme.write_text("hi")
    missing = tmp_path / "missing.jpg"

    assert collect_inputs([str(readme), str(missing)]) == [readme, missing]


def test_collect_inputs_reads_paths_from_stdin():
    stdin = io.StringIO("first.jpg\n\n  dir/second.png  \n")

    assert [str(p) for p in collect_inputs(["-"], stdin=stdin)] == ["first.jpg", "dir/second.png"]


def test_collect_inputs_with_nothing_to_do_is_a_usage_error(tmp_path):
    (tmp_path / "only.txt").write_text("no images here")

    with pytest.raises(UsageError, match="no input images"):
        collect_inputs([str(tmp_path)])


# --- preprocessing -------------------------------------------------------------------------------


@pytest.fixture
def landscape() -> Image.Image:
    """A 400x300 image with structure everywhere, so resampling and cropping differences show."""
    x = torch.linspace(0, 1, 400).view(1, 1, 400)
    y = torch.linspace(0, 1, 300).view(1, 300, 1)
    pixels = torch.cat([x.expand(1, 300, 400), y.expand(1, 300, 400), (torch.sin(40 * x) * torch.cos(30 * y) + 1) / 2])
    return TF.to_pil_image((pixels * 255).round().to(torch.uint8))


RESNET18_PREP = Preprocessing(input_size=(224, 224), resize_size=256)


def test_preprocess_with_crop_equals_torchvision_eval_transform(landscape):
    expected = ResNet18_Weights.DEFAULT.transforms()(landscape)

    actual = preprocess(landscape, RESNET18_PREP, crop=True)

    assert actual.shape == expected.shape == (3, 224, 224)
    assert torch.allclose(actual, expected, atol=1e-5)


def test_preprocess_without_crop_resizes_the_whole_image(landscape):
    prep = replace(RESNET18_PREP, input_size=(64, 48))
    resized = TF.resize(landscape, [64, 48])  # PIL bilinear, like torchvision's transform
    expected = TF.normalize(TF.pil_to_tensor(resized).float() / 255, list(prep.mean), list(prep.std))

    actual = preprocess(landscape, prep, crop=False)

    assert actual.shape == (3, 64, 48)
    assert torch.allclose(actual, expected, atol=1e-5)


def test_model_view_with_crop_is_the_centre_region():
    view = model_view((400, 300), RESNET18_PREP, crop=True)

    # By hand: the shorter side 300 -> 256, so the image becomes int(400 * 256 / 300) = 341 x 256.
    # The 224 x 224 crop starts at left = round((341 - 224) / 2) = round(58.5) = 58, top = (256 - 224) / 2 = 16.
    # Back in original pixels: x * 400 / 341, y * 300 / 256.
    assert view.box == pytest.approx((58 * 400 / 341, 16 * 300 / 256, 282 * 400 / 341, 240 * 300 / 256))
    assert view.box == pytest.approx((68.035, 18.75, 330.792, 281.25), abs=1e-3)
    assert view.image_size == (400, 300)
    assert not view.is_whole_image


def test_model_view_without_crop_is_the_whole_image():
    view = model_view((400, 300), RESNET18_PREP, crop=False)

    assert view.box == (0.0, 0.0, 400.0, 300.0)
    assert view.is_whole_image


def test_model_view_matches_the_pixels_preprocess_keeps(landscape):
    # The crop's top-left model pixel comes from the box's top-left corner of the original.
    view = model_view(landscape.size, RESNET18_PREP, crop=True)
    cropped = preprocess(landscape, RESNET18_PREP, crop=True)
    left, top, right, bottom = view.box
    from_box = landscape.resize((224, 224), Image.Resampling.BILINEAR, box=(left, top, right, bottom))
    expected = TF.normalize(TF.pil_to_tensor(from_box).float() / 255, list(RESNET18_PREP.mean), list(RESNET18_PREP.std))

    # Not bit-identical (one resampling instead of resize-then-crop), but the same picture.
    assert (cropped - expected).abs().mean() < 0.01  # a box shifted by 4 pixels gives ~0.13
