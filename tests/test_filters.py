"""hookviz filters / dream: pictures that excite a channel (or a class) more than any photo does, and deep dream.

The activations are measured here with a plain forward hook, independently of hookviz's own
stop-at-the-layer forward pass, on the pictures as they are written (8-bit PNG).
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest
import torch
from cli_helpers import assert_usage_error, hookviz, json_lines
from PIL import Image
from torch import nn

from hookviz import filters
from hookviz.filters import DreamSettings, Settings, dream, parse_channels, visualize_channels, visualize_classes
from hookviz.images import image_to_tensor, load_image, preprocess
from hookviz.models import load_model
from hookviz.preprocessing import default_preprocessing

SAMPLES = Path(__file__).resolve().parent.parent / "sample_images"
TINY = ["nets:build_tinynet", "--size", "32"]


def hooked_output(model: nn.Module, layer: str, batch: torch.Tensor) -> torch.Tensor:
    """The output of ``layer`` on ``batch`` from a full forward pass with a plain hook (no hookviz code)."""
    seen: list[torch.Tensor] = []
    handle = dict(model.named_modules())[layer].register_forward_hook(lambda m, i, o: seen.append(o.detach().clone()))
    try:
        with torch.no_grad():
            model(batch)
    finally:
        handle.remove()
    return seen[-1]


def as_input(pictures: torch.Tensor, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)) -> torch.Tensor:
    """[0, 1] pictures quantized to 8 bits (as the PNG stores them), then normalized."""
    quantized = (pictures.clamp(0, 1) * 255).round() / 255
    return (quantized - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1])


def no_hooks(model: nn.Module) -> bool:
    return all(
        not (m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks)
        for m in model.modules()
    )


# --- the demo model: activation reached, specificity, classes -----------------------------------------------------


@pytest.fixture(scope="module")
def demo(demo_model: Path):
    return load_model(str(demo_model), labels="imagenet")


def test_optimized_pictures_excite_their_channel_beyond_every_photo_and_beyond_the_other_pictures(demo):
    layer, channels = "_blocks.3", [2, 11, 30]
    photos = sorted(p for p in SAMPLES.iterdir() if p.suffix in (".jpg", ".png"))
    batch = torch.stack([preprocess(load_image(p), demo.preprocessing) for p in photos])
    photo_means = hooked_output(demo.module, layer, batch).mean(dim=(2, 3))  # (photos, C)

    result = visualize_channels(
        demo.module, layer, channels, preprocessing=demo.preprocessing, settings=Settings(steps=32)
    )

    reached = hooked_output(demo.module, layer, as_input(result.images)).mean(dim=(2, 3))  # (pictures, C)
    for row, channel in enumerate(channels):
        # What hookviz reports is what the written picture really does (8-bit rounding aside) ...
        assert result.activations[row] == pytest.approx(float(reached[row, channel]), rel=0.05)
        # ... far above the best natural photo ...
        assert reached[row, channel] > photo_means[:, channel].max() * 1.5
    # ... and specific: channel j responds to its own picture more than to the pictures made for the others.
    matrix = reached[:, channels]  # matrix[i, j]: picture i, channel j
    assert torch.equal(matrix.argmax(dim=0), torch.arange(len(channels)))


def test_class_visualization_is_classified_as_its_class(demo):
    classes = [demo.class_index("tabby"), demo.class_index("goldfish")]
    result = visualize_classes(demo.module, classes, preprocessing=demo.preprocessing, settings=Settings(steps=24))
    probabilities = demo.module(as_input(result.images)).softmax(dim=1).detach()
    for row, index in enumerate(classes):
        assert probabilities[row].argmax() == index
        assert probabilities[row, index] > 0.9
        assert result.probabilities[row] == pytest.approx(float(probabilities[row, index]), abs=0.05)


# --- the user's model, hooks, determinism ----------------------------------------------------------------------------


def test_the_model_is_left_as_it_was_even_when_interrupted(nets):
    model = nets.build_tinynet().train()
    model.fc.weight.grad = torch.ones_like(model.fc.weight)
    before = {key: value.clone() for key, value in model.state_dict().items()}
    preprocessing = default_preprocessing((32, 32))

    visualize_channels(model, "conv2", [0, 3], preprocessing=preprocessing, settings=Settings(steps=3))

    def interrupt(done: int) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        visualize_classes(model, [1], preprocessing=preprocessing, settings=Settings(steps=3), progress=interrupt)
    with pytest.raises(KeyboardInterrupt):
        dream(model, torch.rand(3, 40, 50), "relu2", preprocessing=preprocessing, progress=interrupt)

    assert all(m.training for m in model.modules())
    assert torch.equal(model.fc.weight.grad, torch.ones_like(model.fc.weight))
    assert model.conv1.weight.grad is None
    assert all(torch.equal(before[key], value) for key, value in model.state_dict().items())
    assert no_hooks(model)


def test_the_same_seed_gives_the_same_png_bytes(project: Path):
    def run(out: str, seed: int) -> bytes:
        result = hookviz("filters", *TINY, "-l", "conv2", "--steps", "4", "--seed", seed, "-o", project / out, "-q")
        assert result.exit_code == 0, result.stderr
        return (project / out / "filters_conv2.png").read_bytes()

    first = run("a", 1)
    assert run("b", 1) == first
    assert run("c", 2) != first


def test_batches_give_the_pictures_one_batch_gives(nets):
    """Channels optimized in batches of 2 get the same pictures as in one batch: a picture depends on its own
    channel and the seed, not on which others share its batch (the objective is a sum of independent terms)."""
    model, preprocessing = nets.build_tinynet(), default_preprocessing((32, 32))
    whole = visualize_channels(model, "conv2", [0, 1, 2, 3], preprocessing=preprocessing, settings=Settings(steps=3))
    halves = visualize_channels(
        model, "conv2", [0, 1, 2, 3], preprocessing=preprocessing, settings=Settings(steps=3, batch_size=2)
    )
    assert whole.images.shape == halves.images.shape == (4, 3, 32, 32)
    torch.testing.assert_close(whole.images, halves.images, atol=1e-4, rtol=0)
    assert whole.channel_count == 6 and whole.layer == "conv2" and whole.steps == 3


def test_neuron_maximizes_the_centre_of_the_map(nets):
    model, preprocessing = nets.build_tinynet(), default_preprocessing((32, 32))
    result = visualize_channels(
        model, "conv2", [1, 4], preprocessing=preprocessing, settings=Settings(steps=4), neuron=True
    )
    maps = hooked_output(model, "conv2", as_input(result.images))  # (2, 6, 16, 16)
    assert result.activations == pytest.approx([float(maps[0, 1, 8, 8]), float(maps[1, 4, 8, 8])], abs=1e-2)


def test_pictures_do_not_depend_on_how_many_share_a_forward_pass(nets, monkeypatch):
    """On a CPU the pictures of a batch go through the model a few at a time (in channels-last memory order): one
    picture per forward pass gives the pictures the whole batch in one pass gives."""
    model, preprocessing = nets.build_tinynet(), default_preprocessing((32, 32))
    whole = visualize_channels(model, "conv2", [0, 1, 2, 3], preprocessing=preprocessing, settings=Settings(steps=3))
    monkeypatch.setattr(filters, "CPU_CHUNK_PIXELS", 32 * 32)  # one picture per forward pass
    assert filters.forward_chunk((32, 32), torch.device("cpu")) == 1
    single = visualize_channels(model, "conv2", [0, 1, 2, 3], preprocessing=preprocessing, settings=Settings(steps=3))
    torch.testing.assert_close(single.images, whole.images, atol=1e-4, rtol=0)
    assert single.activations == pytest.approx(whole.activations, abs=1e-4)
    # A .pt2 that takes exactly N inputs gets whole multiples of N (fewer would be padded); a GPU takes the batch.
    assert filters.forward_chunk((8, 8), torch.device("cpu")) == 16  # 32 x 32 pixels per pass
    assert filters.forward_chunk((8, 8), torch.device("cpu"), fixed_batch=3) == 15
    assert filters.forward_chunk((32, 32), torch.device("cpu"), fixed_batch=3) == 3
    assert filters.forward_chunk((32, 32), torch.device("cuda")) is None


class FlattensItsInput(nn.Module):
    """A model that ``view``s its input as rows: it cannot take a channels-last tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3 * 32 * 32, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.view(x.shape[0], -1))


def test_a_model_that_cannot_take_channels_last_inputs_gets_contiguous_ones():
    torch.manual_seed(0)
    model = FlattensItsInput().eval()
    with pytest.raises(RuntimeError, match="view"):
        model(torch.rand(1, 3, 32, 32).contiguous(memory_format=torch.channels_last))
    result = visualize_channels(
        model, "fc", [2, 5], preprocessing=default_preprocessing((32, 32)), settings=Settings(steps=4)
    )
    reached = hooked_output(model, "fc", as_input(result.images))  # (2, 8)
    assert result.activations == pytest.approx([float(reached[0, 2]), float(reached[1, 5])], abs=0.05)


# --- layers of every kind --------------------------------------------------------------------------------------------


def test_channels_of_a_vision_transformer_token_layer_are_its_last_dimension(nets):
    model = nets.build_vit()
    layer = "encoder.layers.encoder_layer_0"
    result = visualize_channels(model, layer, [5, 700], settings=Settings(steps=2))
    assert result.channel_count == 768
    tokens = hooked_output(model, layer, as_input(result.images))  # (2, 1 + 14 * 14, 768)
    patch_means = tokens[:, 1:].mean(dim=1)  # the class token is not part of the map
    assert result.activations == pytest.approx([float(patch_means[0, 5]), float(patch_means[1, 700])], rel=0.05)


def test_a_exported_program_with_a_fixed_input_size(exported_program):
    path, _ = exported_program
    loaded = load_model(str(path))
    result = visualize_channels(
        loaded.module, "features.2", [0, 1, 2, 3], preprocessing=loaded.preprocessing, settings=Settings(steps=2)
    )
    assert result.images.shape == (4, 3, 32, 32)
    assert no_hooks(loaded.module)


# --- deep dream -----------------------------------------------------------------------------------------------------------


def test_dream_amplifies_the_layer_and_keeps_the_photo_resolution(exported_program):
    path, model = exported_program  # a .pt2 that only takes 32 x 32 inputs: the photo is cut into tiles
    loaded = load_model(str(path))
    photo = image_to_tensor(load_image(SAMPLES / "chelsea_cat.png").resize((90, 60))).float() / 255
    dreamt = dream(
        loaded.module, photo, "features.2", preprocessing=loaded.preprocessing, settings=DreamSettings(octaves=3)
    )
    assert dreamt.shape == photo.shape == (3, 60, 90)
    assert 0 <= float(dreamt.min()) and float(dreamt.max()) <= 1

    def energy(picture: torch.Tensor) -> float:  # the dream's objective, on the whole picture in the eager model
        return float(hooked_output(model, "features.2", as_input(picture[None])).pow(2).mean())

    assert energy(dreamt) > 1.5 * energy(photo)
    # Still the photo: it correlates with the original far more than with another photo.
    other = image_to_tensor(load_image(SAMPLES / "rocket.jpg").resize((90, 60))).float() / 255
    assert correlation(dreamt, photo) > 0.5 > correlation(dreamt, other)


def test_dream_command_writes_the_photo_resolution(project: Path):
    photo = project / "wide.png"
    Image.open(SAMPLES / "chelsea_cat.png").resize((75, 50)).save(photo)
    result = hookviz(
        "dream", *TINY, photo, "-l", "relu2", "--octaves", 2, "--steps", 2, "-o", project / "out", "--json"
    )
    assert result.exit_code == 0, result.stderr
    (record,) = json_lines(result.stdout)
    assert record["png"] == str(project / "out" / "dream_wide_relu2.png")
    assert Image.open(record["png"]).size == (75, 50)


# --- the command ----------------------------------------------------------------------------------------------------------


def test_json_records_and_one_png_per_channel(project: Path):
    out = project / "out"
    result = hookviz("filters", *TINY, "-l", "conv2", "-f", "4,1", "--steps", 2, "--save-each", "-o", out, "--json")
    assert result.exit_code == 0, result.stderr
    records = json_lines(result.stdout)
    assert [(r["layer"], r["channel"], r["steps"]) for r in records] == [("conv2", 4, 2), ("conv2", 1, 2)]
    assert {r["png"] for r in records} == {str(out / "filters_conv2.png")}
    assert [r["image"] for r in records] == [str(out / "filters_conv2_c4.png"), str(out / "filters_conv2_c1.png")]
    for record in records:
        assert isinstance(record["activation"], float)
        assert Image.open(record["image"]).size == (32, 32)
    assert sorted(p.name for p in out.iterdir()) == [
        "filters_conv2.png",
        "filters_conv2_c1.png",
        "filters_conv2_c4.png",
    ]


def test_default_channels_are_the_most_active_on_the_images(project: Path, nets):
    out = project / "out"
    photo = SAMPLES / "rocket.jpg"
    result = hookviz("filters", *TINY, photo, "-l", "conv2", "--steps", 1, "-o", out, "--json")
    shown = [r["channel"] for r in json_lines(result.stdout)]
    batch = preprocess(load_image(photo), default_preprocessing((32, 32)))[None]
    means = hooked_output(nets.build_tinynet(), "conv2", batch).mean(dim=(0, 2, 3))
    assert shown == means.argsort(descending=True).tolist()  # 6 channels: all, most active first
    # Without images: the first channels in order.
    result = hookviz("filters", *TINY, "-l", "conv2", "--steps", 1, "-o", project / "plain", "--json")
    assert [r["channel"] for r in json_lines(result.stdout)] == [0, 1, 2, 3, 4, 5]


def test_images_with_chosen_channels_give_each_channel_its_natural_maximum(project: Path, nets):
    photos = [SAMPLES / "rocket.jpg", SAMPLES / "chelsea_cat.png"]
    result = hookviz("filters", *TINY, *photos, "-l", "conv2", "-f", "3,0", "--steps", 2, "-o", project, "--json")
    assert result.exit_code == 0, result.stderr
    batch = torch.stack([preprocess(load_image(p), default_preprocessing((32, 32))) for p in photos])
    means = hooked_output(nets.build_tinynet(), "conv2", batch).mean(dim=(2, 3))  # (photos, channels)
    records = json_lines(result.stdout)
    assert [r["channel"] for r in records] == [3, 0]  # -f picks the channels, the images still count
    assert [r["natural_max"] for r in records] == pytest.approx([float(means[:, 3].max()), float(means[:, 0].max())])
    # Without images there is nothing to compare with.
    plain = hookviz("filters", *TINY, "-l", "conv2", "-f", "3", "--steps", 1, "-o", project / "plain", "--json")
    assert "natural_max" not in json_lines(plain.stdout)[0]


def test_the_natural_maximum_is_far_below_what_the_pictures_reach_on_the_demo_model(project: Path, demo_model: Path):
    result = hookviz("filters", demo_model, SAMPLES, "-l", "_blocks.3", "-f", "2,11", "--steps", 24, "-o", project,
                     "--json")  # fmt: skip
    assert result.exit_code == 0, result.stderr
    records = json_lines(result.stdout)
    for record in records:  # (a layer without an activation function: a natural maximum may be negative)
        assert record["activation"] > record["natural_max"] + max(5.0, abs(record["natural_max"]))
    assert "_blocks.3: 2 channel(s) in" in result.stderr
    assert "s; 2 of 2 channel(s) beyond the images' maximum" in result.stderr


def test_html_gallery_shows_each_grid_and_each_channel_beside_other_runs(project: Path):
    out = project / "out"
    photo = SAMPLES / "rocket.jpg"
    assert hookviz("gradcam", *TINY, photo, "-o", out, "--html", "-q").exit_code == 0
    result = hookviz("filters", *TINY, photo, "-l", "conv2", "-l", "conv1", "-f", "1,3", "--steps", 2,
                     "-o", out, "--html", "--json")  # fmt: skip
    assert result.exit_code == 0, result.stderr
    records = json_lines(result.stdout)
    # --html implies one picture per channel: the page links each of them.
    assert [Path(r["image"]).name for r in records] == [
        "filters_conv2_c1.png",
        "filters_conv2_c3.png",
        "filters_conv1_c1.png",
        "filters_conv1_c3.png",
    ]
    page = (out / "index.html").read_text()
    for name in ("filters_conv2.png", "filters_conv1.png", *(Path(r["image"]).name for r in records)):
        assert f'href="{name}"' in page
    assert f"channel 3: {records[1]['activation']:.4g} (images at most {records[1]['natural_max']:.4g})" in page
    assert "rocket.jpg" in page  # the gradcam run's card is still there
    commands = [
        e["command"] for e in map(json.loads, (out / "manifest.jsonl").read_text().splitlines()) if "command" in e
    ]
    assert commands == ["gradcam", "filters"]
    assert f"gallery: {out / 'index.html'}" in result.stderr


def test_html_gallery_of_classes(project: Path):
    result = hookviz("filters", *TINY, "-c", "1", "-c", "3", "--steps", 2, "-o", project, "--html", "-q")
    assert result.exit_code == 0, result.stderr
    page = (project / "index.html").read_text()
    assert 'href="classes.png"' in page and 'href="class_1_class_1.png"' in page and "p = 0." in page


def test_layer_names_unsafe_in_a_path_get_distinct_safe_file_names(project: Path):
    out = project / "out"
    result = hookviz("filters", "nets:build_odd_names", "--size", "32", "-l", "stem/conv", "-l", "stem_conv",
                     "--steps", 1, "-o", out, "--json")  # fmt: skip
    assert result.exit_code == 0, result.stderr
    written = {Path(r["png"]) for r in json_lines(result.stdout)}
    assert len(written) == 2 and all(p.parent == out and p.exists() for p in written)


def test_classes_by_name_with_one_png_each(project: Path):
    out = project / "out"
    result = hookviz("filters", *TINY, "-c", "2", "-c", "0", "--steps", 2, "--save-each", "-o", out, "--json")
    assert result.exit_code == 0, result.stderr
    records = json_lines(result.stdout)
    assert [(r["class"], r["label"]) for r in records] == [(2, "class 2"), (0, "class 0")]
    assert all(0 < r["probability"] < 1 and Path(r["image"]).exists() for r in records)
    assert records[0]["png"] == str(out / "classes.png")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["-l", "conv3"], "unknown layer 'conv3'; did you mean conv2, conv1? ('hookviz layers MODEL' lists them)"),
        (["-l", "conv2", "-f", "0-6"], "channel 6 is out of range: layer 'conv2' has 6 channels (0-5)"),
        (["-l", "conv2", "-f", "2,x"], "-f '2,x': use channel indices and ranges, e.g. 0-15,42"),
        (["-l", "conv2", "-f", "5-2"], "-f '5-2': the range 5-2 runs backwards; write 2-5"),
        ([], "name a layer with -l (see 'hookviz layers MODEL'), or classes with --class"),
        (["-l", "conv2", "-c", "1"], "give either -l (channels of a layer) or --class (classes), not both"),
        (["-c", "7"], "--class 7 is out of range: this model has classes 0..3"),
        (["-c", "tabby"], "--class 'tabby': this model has no class names; give an index, or names with --labels"),
    ],
)
def test_errors_are_one_line(project: Path, args: list[str], message: str):
    assert_usage_error(hookviz("filters", *TINY, *args, "-o", project / "out", "-q"), message)
    assert not (project / "out").exists()


def test_a_layer_that_does_not_run(project: Path):
    result = hookviz("filters", "nets:build_with_aux_head", "--size", "32", "-l", "aux", "-o", project, "-q")
    assert_usage_error(result, "layer 'aux' did not run in the forward pass; choose another with -l")


def test_existing_outputs_are_kept_without_overwrite(project: Path):
    args = ["filters", *TINY, "-l", "conv2", "--steps", 1, "-o", project, "-q"]
    assert hookviz(*args).exit_code == 0
    assert_usage_error(
        hookviz(*args),
        f"{project / 'filters_conv2.png'} already exists; pass --overwrite to replace it, or choose another -o",
    )
    assert hookviz(*args, "--overwrite").exit_code == 0


def test_parse_channels():
    assert parse_channels("0-3,42, 7 ,2") == [0, 1, 2, 3, 42, 7]
    assert parse_channels("5", count=6) == [5]


def test_cli_defaults_are_the_library_defaults():
    filters_cli = importlib.import_module("hookviz.cli.filters")  # (hookviz.cli.filters is also the command's name)
    assert (filters_cli.DEFAULT_STEPS, filters_cli.DEFAULT_LR, filters_cli.DEFAULT_JITTER) == (
        Settings.steps,
        Settings.lr,
        Settings.jitter,
    )
    assert filters_cli.DEFAULT_BATCH == Settings.batch_size
    assert (filters_cli.DEFAULT_DREAM_OCTAVES, filters_cli.DEFAULT_DREAM_STEPS, filters_cli.DEFAULT_DREAM_LR) == (
        DreamSettings.octaves,
        DreamSettings.steps,
        DreamSettings.lr,
    )
    assert filters.DEFAULT_CHANNELS == 16
