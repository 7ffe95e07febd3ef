"""`hookviz stats --top N`: per channel, the N images that activate it most, kept as the images stream by.

Every choice is checked against a brute-force computation here: every image's whole activation kept, each
channel's maximum over positions, the images ranked by it (ties to the earlier image).

    hookviz stats nets:build_batchnet photos/ --size 32 -l relu1 -l conv2 --top 3 -o OUT
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from cli_helpers import hookviz, image_folder, write_broken
from nets import build_batchnet
from PIL import Image

from hookviz.models import load_model
from hookviz.pipeline import model_batch, prepare_image
from hookviz.stats import StatsCollector, TopActivations, receptive_field

LAYERS = ["relu1", "conv2"]


def brute_force(model: torch.nn.Module, images: torch.Tensor, layer: str, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(images (C, n), values (C, n)): every image's activation at once, each channel's max over positions, ranked
    (a stable sort: equal values keep the earlier image)."""
    kept = {}
    handle = dict(model.named_modules())[layer].register_forward_hook(
        lambda m, i, o: kept.__setitem__("out", o.clone())
    )
    try:
        with torch.no_grad():
            model(images)
    finally:
        handle.remove()
    maxima = kept["out"].flatten(2).max(dim=2).values.T.numpy()  # (C, images)
    order = np.argsort(-maxima, axis=1, kind="stable")[:, :n]
    return order, np.take_along_axis(maxima, order, axis=1)


def random_inputs(count: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(count, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("batch_size", [1, 4, 7, 40])
def test_the_running_top_n_equals_brute_force_whatever_the_batches(batch_size):
    model = build_batchnet().eval()
    images = random_inputs(40)
    collector = StatsCollector(model, LAYERS, top=5)
    for start in range(0, len(images), batch_size):
        collector.update(images[start : start + batch_size])
    tops = collector.top_activations()
    for layer in LAYERS:
        chosen, values = brute_force(model, images, layer, 5)
        assert tops[layer].images is not None and tops[layer].values is not None
        np.testing.assert_array_equal(tops[layer].images.numpy(), chosen)
        np.testing.assert_allclose(tops[layer].values.numpy(), values, rtol=1e-6)


def test_positions_are_where_each_chosen_image_peaks():
    model = build_batchnet().eval()
    images = random_inputs(12, seed=3)
    collector = StatsCollector(model, ["relu2"], top=3)
    collector.update(images[:5])
    collector.update(images[5:])
    top = collector.top_activations()["relu2"]
    kept = {}
    model.relu2.register_forward_hook(lambda m, i, o: kept.__setitem__("out", o.clone()))
    with torch.no_grad():
        model(images)
    output = kept["out"]  # (12, 8, 16, 16)
    assert top.grid == tuple(output.shape[2:])
    assert top.images is not None and top.positions is not None
    for channel in range(output.shape[1]):
        for image, position in zip(top.images[channel].tolist(), top.positions[channel].tolist()):
            assert position == int(output[image, channel].flatten().argmax())


def test_ties_keep_the_earlier_image_and_padding_images_do_not_count():
    top = TopActivations(count=2)
    zeros = torch.zeros(3, 2, 4, 4)  # a dead channel: every image ties at 0
    top.update(zeros, first_image=0)
    top.update(torch.cat([zeros[:2], torch.full((1, 2, 4, 4), 5.0)]), first_image=3)
    assert top.images is not None and top.images.tolist() == [[5, 0], [5, 0]]
    collector = StatsCollector(build_batchnet().eval(), ["relu1"], top=2)
    padded = torch.cat([random_inputs(2), torch.full((2, 3, 32, 32), 50.0)])  # a fixed batch's padding: very bright
    collector.update(padded, count=2)
    chosen = collector.top_activations()["relu1"].images
    assert chosen is not None and set(chosen.flatten().tolist()) <= {0, 1}


def test_memory_does_not_grow_with_the_number_of_images():
    model = build_batchnet().eval()
    collector = StatsCollector(model, LAYERS, top=4)
    sizes = []
    for batch in range(30):  # 300 images
        collector.update(random_inputs(10, seed=batch))
        top = collector.top_activations()["relu1"]
        assert top.values is not None
        sizes.append(sum(t.numel() for t in (top.values, top.images, top.positions)))
    assert set(sizes) == {3 * 8 * 4}  # three numbers per channel and kept image, from the first batch to the last


def test_the_receptive_field_is_where_the_gradient_is(nets):
    model = build_batchnet().eval()
    # conv1 (3x3) then conv2 (3x3, stride 2): a position of conv2 sees 5x5 input pixels, of relu1 3x3.
    assert receptive_field(model, "relu1", (32, 32)) == (3, 3)
    assert receptive_field(model, "conv2", (32, 32)) == (5, 5)
    assert receptive_field(model, "fc", (32, 32)) is None  # no spatial grid: whole images are shown
    assert all(len(module._forward_hooks) == 0 for module in model.modules())


def test_the_cli_writes_a_grid_and_the_chosen_inputs_per_layer(project):
    photos = image_folder(project / "photos", 9)
    write_broken(project / "photos" / "bad")  # failed inputs are skipped in the numbering, not shifted into it
    out = project / "out"
    result = hookviz(
        "stats",
        "nets:build_batchnet",
        project / "photos",
        "--size",
        "32",
        *sum((["-l", layer] for layer in LAYERS), []),
        "--top",
        "3",
        "-o",
        out,
    )
    assert result.exit_code == 1  # the three broken files
    assert "hookviz: top 3 images per channel: " in result.stderr

    loaded = load_model("nets:build_batchnet", size=(32, 32))
    readable = sorted(photos)  # what stats measured, in its order (the broken files in photos/bad/ come after)
    batch = model_batch([prepare_image(path, path.stem, loaded.preprocessing, crop=False) for path in readable], loaded)
    for layer in LAYERS:
        record = json.loads((out / f"top_{layer}.json").read_text())
        chosen, values = brute_force(loaded.module, batch, layer, 3)
        assert [[image["input"] for image in channel["images"]] for channel in record["channels"]] == [
            [str(readable[i]) for i in row] for row in chosen
        ]
        np.testing.assert_allclose(
            [[image["value"] for image in c["images"]] for c in record["channels"]], values, rtol=1e-5
        )
        with Image.open(out / f"top_{layer}.png") as grid:
            assert grid.text["hookviz:layer"] == layer and grid.width > 3 * 56
    assert json.loads((out / "top_relu1.json").read_text())["field"] == [3, 3]
    (out / "stats.png").unlink()  # the grids too are refused without --overwrite
    again = hookviz(
        "stats", "nets:build_batchnet", project / "photos", "--size", "32", "-l", "relu1", "--top", "3", "-o", out, "-q"
    )
    assert again.exit_code == 2 and "top_" in again.stderr and "pass --overwrite" in again.stderr
