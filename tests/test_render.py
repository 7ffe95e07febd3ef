"""Colormaps, feature-map grids and output names."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib
import numpy as np
import pytest
import torch
from PIL import Image

from hookviz.errors import UsageError
from hookviz.fmaps import MIN_TILE, TILE_GAP, channel_grid, feature_grid
from hookviz.output import output_stems, safe_name
from hookviz.render import apply_colormap, captioned, colormap_lut, normalize_map, titled, to_pil


@pytest.mark.parametrize("index", [0, 1, 64, 128, 200, 254, 255])
def test_colormap_lut_matches_matplotlib(index):
    # viridis is a 256-entry ListedColormap: entry i of the table is entry i of the list.
    expected = np.round(np.asarray(matplotlib.colormaps["viridis"].colors[index]) * 255).astype(int)

    lut = colormap_lut("viridis")

    assert lut.shape == (256, 3) and lut.dtype == torch.uint8
    assert lut[index].tolist() == expected.tolist()


def test_unknown_colormap_suggests_names():
    with pytest.raises(UsageError, match="did you mean.*viridis"):
        colormap_lut("viridiss")


def test_apply_colormap_maps_zero_and_one_to_the_ends():
    values = torch.tensor([[0.0, 1.0]])

    colours = apply_colormap(values, "gray")

    assert colours.shape == (3, 1, 2)
    assert colours[:, 0, 0].tolist() == [0, 0, 0]
    assert colours[:, 0, 1].tolist() == [255, 255, 255]


def test_feature_grid_layout():
    activation = torch.randn(10, 7, 7, generator=torch.Generator().manual_seed(0))

    grid = feature_grid(activation, label_channels=False)

    # 7x7 maps are enlarged by a whole factor to at least MIN_TILE pixels; 10 tiles make a near-square
    # grid of ceil(sqrt(10)) = 4 columns and ceil(10 / 4) = 3 rows, with TILE_GAP pixels around every tile.
    tile = 7 * math.ceil(MIN_TILE / 7)
    assert tile >= MIN_TILE
    columns, rows = 4, 3
    assert grid.image.size == (columns * tile + (columns + 1) * TILE_GAP, rows * tile + (rows + 1) * TILE_GAP)
    assert grid.channels == list(range(10))
    assert grid.total_channels == 10 and not grid.is_subset


def test_feature_grid_tiles_show_their_channels():
    activation = torch.zeros(4, 2, 2)
    activation[1, 0, 0] = 5.0  # channel 1: one bright cell in the top-left corner
    lut = colormap_lut("viridis")

    grid = feature_grid(activation, label_channels=False)
    pixels = np.asarray(grid.image)

    tile = 2 * math.ceil(MIN_TILE / 2)
    second_tile_left = TILE_GAP + tile + TILE_GAP  # tile 1 is in row 0, column 1
    assert pixels[TILE_GAP + 1, second_tile_left + 1].tolist() == lut[255].tolist()  # its maximum
    assert pixels[TILE_GAP + tile - 1, second_tile_left + tile - 1].tolist() == lut[0].tolist()  # its minimum
    assert pixels[0, 0].tolist() == [255, 255, 255]  # the gap


def test_feature_grid_shows_the_most_active_channels_first():
    activation = torch.full((9, 5, 5), 0.1)
    activation[5] = -4.0  # activity is mean |x|, so a strongly negative channel counts
    activation[2] = 3.0
    activation[7, :, :2] = 2.0  # mean |x| = (10 * 2.0 + 15 * 0.1) / 25 = 0.86

    grid = feature_grid(activation, max_channels=3)

    assert grid.channels == [5, 2, 7]
    assert grid.total_channels == 9 and grid.is_subset


def test_a_flat_channel_does_not_produce_nan():
    activation = torch.randn(3, 6, 6)
    activation[1] = 2.5  # constant: zero range

    scaled = normalize_map(activation)
    grid = feature_grid(activation, label_channels=False)

    assert torch.isfinite(scaled).all()
    assert torch.all(scaled[1] == 0)
    assert scaled[0].min() == 0 and scaled[0].max() == 1
    tile = 6 * math.ceil(MIN_TILE / 6)
    middle_of_tile_1 = np.asarray(grid.image)[TILE_GAP + tile // 2, 2 * TILE_GAP + tile + tile // 2]
    assert middle_of_tile_1.tolist() == colormap_lut("viridis")[0].tolist()


def test_feature_grid_rejects_a_batched_activation():
    with pytest.raises(ValueError, match=r"\(C, h, w\)"):
        feature_grid(torch.zeros(1, 3, 4, 4))


def test_output_stems_are_unique_for_colliding_stems():
    paths = [Path("a/cat.jpg"), Path("b/cat.jpg"), Path("a/cat.png"), Path("a/dog.jpg")]

    stems = output_stems(paths)

    assert stems[Path("a/dog.jpg")] == "dog"  # no collision, no suffix
    cats = [stems[p] for p in paths[:3]]
    assert len(set(cats)) == 3
    assert all(stem.startswith("cat") and stem != "cat" for stem in cats)
    assert output_stems(paths) == stems  # the same run twice writes to the same folders


def test_output_stems_collide_after_sanitizing_too():
    paths = [Path("x/my photo.jpg"), Path("y/my_photo.jpg")]

    stems = output_stems(paths)

    assert stems[paths[0]] != stems[paths[1]]


@pytest.mark.parametrize("text", ["../../etc/passwd", "..", ".hidden", "a\\..\\b", "layer:1/x y"])
def test_safe_name_cannot_escape_the_output_directory(tmp_path, text):
    name = safe_name(text)

    assert name and "/" not in name and "\\" not in name
    assert not name.startswith(".")
    assert (tmp_path / name).resolve().parent == tmp_path.resolve()


def test_safe_name_keeps_layer_names_readable():
    assert safe_name("layer1.0.conv1") == "layer1.0.conv1"
    assert safe_name("features.3+skip-1") == "features.3+skip-1"
    assert len(safe_name("x" * 500)) == 120


@pytest.mark.parametrize("size", [(17, 11), (32, 32), (64, 48), (300, 200), (640, 480), (1200, 300)])
def test_a_caption_is_a_small_band_at_the_bottom_of_a_readable_picture(size):
    """Captions used to cover the top half of a 32x32 picture and all of a 17x11 one, and to be cut off on narrow
    ones: the picture is enlarged to >= 256 px on its short side (whole factor, nearest: every pixel a block),
    the band covers at most an eighth of it, and everything above the band is the picture, untouched."""
    width, height = size
    picture = to_pil(torch.randint(0, 256, (3, height, width), generator=torch.Generator().manual_seed(0)).byte())
    text = "Egyptian cat 71.2% | gradcam++ @ _blocks.15._expand_conv"

    result, scale = captioned(picture.copy(), text)

    assert min(result.size) >= 256 and result.size == (width * scale, height * scale)
    enlarged = np.asarray(picture.resize(result.size, Image.Resampling.NEAREST))
    written = np.asarray(result)
    changed_rows = np.nonzero((written != enlarged).any(axis=(1, 2)))[0]
    assert changed_rows.min() >= result.height * 7 / 8  # the band: the bottom eighth at most
    assert changed_rows.max() == result.height - 1


def test_a_caption_too_long_for_the_width_loses_its_middle():
    picture = Image.new("RGB", (256, 400), (90, 140, 200))
    text = "a very long class name 71.2% | gradcam @ " + "a_very_deep.module" * 8 + ".last"

    result, _ = captioned(picture, text)

    band = np.asarray(result)[-20:]
    lit = np.nonzero((band > 200).all(axis=2).any(axis=0))[0]  # columns with white text
    assert lit.min() >= 1 and lit.max() <= result.width - 2  # the text fits inside the width


def test_one_scale_for_the_layer_keeps_strong_and_weak_channels_apart():
    """Per-tile scaling made a channel in [-2, 0.1] look as strong as one in [0, 19]; with scale="layer" one
    range colours every tile, and the grid says which."""
    weak = torch.linspace(-2, 0.1, 49).view(7, 7)
    strong = torch.linspace(0, 19, 49).view(7, 7)

    per_channel = channel_grid(torch.stack([weak, strong]), [0, 1], 2, label_channels=False)
    per_layer = channel_grid(torch.stack([weak, strong]), [0, 1], 2, label_channels=False, scale="layer")

    def brightest(grid, column):  # 7x7 maps become 70 px tiles (10x, nearest)
        left = TILE_GAP + column * (70 + TILE_GAP)
        tile = np.asarray(grid.image)[TILE_GAP : TILE_GAP + 70, left : left + 70]
        return tile.astype(int).sum(axis=2).max()

    assert brightest(per_channel, 0) == brightest(per_channel, 1)  # each tile spans the whole colormap
    assert brightest(per_layer, 0) < brightest(per_layer, 1)
    assert per_layer.value_range == (pytest.approx(-2.0), pytest.approx(19.0)) and per_channel.value_range is None


def test_tiles_take_the_pictures_shape_and_labels_leave_small_tiles_alone():
    maps = torch.rand(4, 7, 7)

    wide = channel_grid(maps, [1000, 1001, 1002, 1003], 2048, aspect=4 / 3)
    tiny = channel_grid(torch.rand(4, 2, 2), [1000, 1001, 1002, 1003], 2048, label_channels=True)

    tile_w = (wide.image.width - 3 * TILE_GAP) // 2
    tile_h = (wide.image.height - 3 * TILE_GAP) // 2
    assert tile_w / tile_h == pytest.approx(4 / 3, rel=0.02)
    plain = channel_grid(torch.rand(4, 2, 2), [1000, 1001, 1002, 1003], 2048, label_channels=False)
    assert tiny.image.size == plain.image.size


def test_a_titled_grid_names_its_layer_above_and_shows_its_scale_on_the_right():
    grid = channel_grid(torch.rand(4, 7, 7), [0, 1, 2, 3], 4, scale="layer")

    picture = titled(grid.image, "layer4 | 4x7x7 | 4 channels | cat.jpg", ("viridis", *grid.value_range))

    assert picture.height > grid.image.height and picture.width > grid.image.width
    band = np.asarray(picture)[: picture.height - grid.image.height]
    assert (band < 128).any()  # dark text on the white band
    np.testing.assert_array_equal(
        np.asarray(picture)[picture.height - grid.image.height :, : grid.image.width], np.asarray(grid.image)
    )


def test_safe_names_keep_letters_of_every_script_within_a_byte_limit():
    """猫.png used to write to `_~f4b200f6/`, café_cat.png to `caf__cat/`: letters and digits of any script stay."""
    assert [safe_name(text) for text in ("猫", "café cat", "über rocket", "コーヒー")] == [
        "猫",
        "café_cat",
        "über_rocket",
        "コーヒー",
    ]
    assert len(safe_name("猫" * 100).encode("utf-8")) <= 120
