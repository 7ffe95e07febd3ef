"""The commands beyond fmaps/gradcam, end to end: `hookviz stats`, `hookviz trace`, `--tensorboard`,
vision transformers (torchvision vit_b_16 and swin_t), and how layer outputs are read as maps.

Everything runs through click's CliRunner on real image files and real torchvision models
(``--weights none``, random weights; seeded where a value is compared). Expected values are
computed here with plain torch hooks, TensorBoard's own event reader and pytorch-grad-cam.
The library-level behaviour of hookviz.stats and hookviz.trace is covered by test_stats.py
and test_trace.py; this file checks what the commands make of it.
"""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from cli_helpers import write_noise_image as write_image
from click.testing import CliRunner
from PIL import Image
from test_trace import call_order
from torch import nn

from hookviz.cli import main
from hookviz.models import load_model
from hookviz.pipeline import prepare_image
from hookviz.spatial import Layout, spatial_layout

SMALL = ["--weights", "none", "--size", "64"]  # resnet18 at 64x64: a real torchvision model, fast on a CPU
SEED = 7


def conv_and_linear(name: str) -> list[str]:
    """The Conv2d and Linear layers of a torchvision model, in named_modules() order (built on the meta device: no init)."""
    with torch.device("meta"):
        model = torchvision.models.get_model(name, weights=None)
    return [layer for layer, module in model.named_modules() if isinstance(module, (nn.Conv2d, nn.Linear))]


RESNET18_CONVS = [name for name in conv_and_linear("resnet18") if name != "fc"]
SIZES = [(64, 48), (48, 64), (70, 40)]  # (width, height): distinct, so each output is tied to its input by size


def run(*args: str) -> tuple[int, str, str]:
    """`hookviz ARGS` in-process: (exit code, stdout, stderr); any exception other than SystemExit is raised."""
    result = CliRunner().invoke(main, list(args))
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stdout, result.stderr


@pytest.fixture
def images(tmp_path: Path) -> list[Path]:
    folder = tmp_path / "images"
    folder.mkdir()
    return [write_image(folder / f"img{i}.png", w, h, seed=i) for i, (w, h) in enumerate(SIZES)]


@pytest.fixture
def broken(tmp_path: Path) -> Path:
    path = tmp_path / "broken.png"
    path.write_text("not a PNG, just text\n")
    return path


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("hookviz: error:")]


def events(log_dir: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(log_dir), size_guidance={"images": 0, "histograms": 0, "scalars": 0})
    accumulator.Reload()
    return accumulator


def decoded(event) -> np.ndarray:
    with Image.open(io.BytesIO(event.encoded_image_string)) as picture:
        return np.asarray(picture.convert("RGB"))


def pixels_of(path: str | Path) -> np.ndarray:
    with Image.open(path) as picture:
        return np.asarray(picture.convert("RGB"))


def seeded_resnet18() -> nn.Module:
    """The model `hookviz ... resnet18 --weights none` builds right after torch.manual_seed(SEED)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        return torchvision.models.resnet18(weights=None).eval()


# --- hookviz stats ----------------------------------------------------------------------------------


def test_stats_prints_a_table_row_per_conv_and_linear_layer_and_writes_the_figure(tmp_path, images):
    # alexnet: 5 Conv2d and 3 Linear layers (the figure draws a row per layer; resnet18's 21 take long to draw).
    layers = conv_and_linear("alexnet")
    assert len(layers) == 8
    chosen = [option for layer in layers for option in ("-l", layer)]  # the default is every activation
    code, stdout, stderr = run("stats", "alexnet", str(images[0]), *SMALL, *chosen, "-o", str(tmp_path / "out"))
    assert code == 0, stderr

    header, *rows = stdout.strip().splitlines()
    assert header.split() == ["layer", "mean", "std", "min", "max", "<=0", "dead", "values"]
    assert [row.split()[0] for row in rows] == layers
    logits = rows[-1].split()
    # The model's own output is never flagged "dead" (a negative logit is a vote against a class); one image, 1000 logits.
    assert logits[6] == "-" and logits[7] == "1,000"
    conv1 = rows[0].split()  # 64 channels of 15x15 (11x11 kernel, stride 4, padding 2, on 64x64)
    assert conv1[6].endswith("/64") and conv1[7] == f"{64 * 15 * 15:,}"

    figure = tmp_path / "out" / "stats.png"
    with Image.open(figure) as png:
        png.load()
        assert png.format == "PNG" and png.width > 100 and png.height > 100
        assert png.text["hookviz:layers"] == ",".join(layers)
    assert str(figure) in stderr


def test_stats_json_is_one_object_per_selected_layer(tmp_path, images):
    code, stdout, stderr = run(
        "stats",
        "resnet18",
        *map(str, images[:2]),
        *SMALL,
        "-l",
        "layer4.1.conv2",
        "-l",
        "fc",
        "--json",
        "-q",
        "-o",
        str(tmp_path / "out"),
    )
    assert code == 0, stderr
    assert stderr == ""
    records = [json.loads(line) for line in stdout.splitlines()]
    assert [record["layer"] for record in records] == ["layer4.1.conv2", "fc"]
    for record in records:
        assert {"layer", "mean", "std", "min", "max", "zero_fraction", "dead_channels", "histogram"} <= set(record)
        assert record["min"] <= record["mean"] <= record["max"] and record["std"] > 0
        assert 0 <= record["zero_fraction"] <= 1
        assert sum(record["histogram"]["counts"]) == record["values"]
        assert len(record["histogram"]["edges"]) == len(record["histogram"]["counts"]) + 1
    conv, fc = records
    assert conv["values"] == 2 * 512 * 2 * 2 and fc["values"] == 2 * 1000  # two images; 64 px in, 2x2 maps at layer4
    assert all(0 <= c < 512 for c in conv["dead_channels"]) and all(0 <= c < 1000 for c in fc["dead_channels"])
    with Image.open(tmp_path / "out" / "stats.png") as png:
        assert png.text["hookviz:layers"] == "layer4.1.conv2,fc"


def test_stats_over_good_and_broken_images_measures_the_good_ones(tmp_path, images, broken):
    inputs = [images[0], broken, images[2]]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)  # the random weights hookviz builds, rebuilt below for the reference
        code, stdout, stderr = run(
            "stats",
            "resnet18",
            *map(str, inputs),
            *SMALL,
            "-l",
            "layer1.0.conv1",
            "--json",
            "-o",
            str(tmp_path / "out"),
        )
    assert code == 1
    (error,) = error_lines(stderr)
    assert str(broken) in error
    assert "Traceback" not in stderr
    (record,) = [json.loads(line) for line in stdout.splitlines()]

    # The reference: the same seeded model on exactly the tensors hookviz feeds it for the two good images.
    preprocessing = load_model("resnet18", weights="none", size=(64, 64)).preprocessing
    batch = torch.stack(
        [prepare_image(path, path.stem, preprocessing, crop=False).tensor for path in (images[0], images[2])]
    )
    model = seeded_resnet18()
    kept = []
    model.layer1[0].conv1.register_forward_hook(lambda m, i, o: kept.append(o.detach().double()))
    with torch.no_grad():
        model(batch)
    (reference,) = kept
    assert record["values"] == reference.numel() == 2 * 64 * 16 * 16
    assert record["mean"] == pytest.approx(reference.mean().item(), rel=1e-5, abs=1e-7)
    assert record["std"] == pytest.approx(reference.std(correction=0).item(), rel=1e-5)
    assert record["min"] == pytest.approx(reference.min().item(), rel=1e-5)
    assert record["max"] == pytest.approx(reference.max().item(), rel=1e-5)
    assert (tmp_path / "out" / "stats.png").is_file()


def test_stats_with_only_broken_images_is_a_usage_error(tmp_path, broken):
    code, stdout, stderr = run(
        "stats", "resnet18", str(broken), *SMALL, "-l", "conv1", "-q", "-o", str(tmp_path / "out")
    )
    assert code == 2
    assert stdout == ""
    assert "no image could be read" in stderr
    assert not (tmp_path / "out" / "stats.png").exists()


def test_stats_refuses_to_replace_an_existing_figure_without_overwrite(tmp_path, images):
    out = tmp_path / "out"
    out.mkdir()
    (out / "stats.png").write_bytes(b"an earlier figure")
    code, stdout, stderr = run("stats", "resnet18", str(images[0]), *SMALL, "-l", "conv1", "-q", "-o", str(out))
    assert code == 2
    assert stdout == ""
    (error,) = stderr.strip().splitlines()
    assert "stats.png" in error and "--overwrite" in error
    assert (out / "stats.png").read_bytes() == b"an earlier figure"

    code, stdout, stderr = run(
        "stats", "resnet18", str(images[0]), *SMALL, "-l", "conv1", "-q", "--overwrite", "-o", str(out)
    )
    assert code == 0, stderr
    with Image.open(out / "stats.png") as png:
        assert png.format == "PNG"


def test_stats_unknown_layer_is_a_usage_error_with_a_suggestion(tmp_path, images):
    code, stdout, stderr = run(
        "stats", "resnet18", str(images[0]), *SMALL, "-l", "layer1.0.conv", "-q", "-o", str(tmp_path / "out")
    )
    assert code == 2
    assert stdout == ""
    (error,) = stderr.strip().splitlines()
    assert "unknown layer 'layer1.0.conv'" in error and "did you mean" in error and "layer1.0.conv1" in error
    assert not (tmp_path / "out" / "stats.png").exists()


# --- hookviz trace ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def resnet18_calls() -> int:
    """How many module calls (the model itself included) one forward pass makes, by plain pre-hooks."""
    return len(call_order(torchvision.models.resnet18(weights=None).eval(), torch.randn(1, 3, 64, 64)))


def test_trace_table_has_the_forward_rows_then_the_backward_rows(images, resnet18_calls):
    code, stdout, stderr = run("trace", "resnet18", str(images[0]), *SMALL)
    assert code == 0, stderr
    header, *rows = stdout.strip().splitlines()
    assert header.split()[:4] == ["dir", "#", "module", "type"]
    directions = [row.split()[0] for row in rows]
    assert set(directions) == {"fwd", "bwd"}
    first_backward = directions.index("bwd")
    assert directions[:first_backward] == ["fwd"] * resnet18_calls
    assert set(directions[first_backward:]) == {"bwd"}
    assert [int(row.split()[1]) for row in rows[:first_backward]] == list(range(resnet18_calls))
    assert rows[0].split()[2:4] == ["(model)", "ResNet"]
    assert rows[first_backward].split()[2:4] == ["(model)", "ResNet"]  # the logits' gradient comes back first
    assert "(input)" in rows[-1]  # the gradient at the input closes the table
    assert f"traced {resnet18_calls} module calls" in stderr


def test_trace_json_counts_every_module_call_and_takes_the_class(images, resnet18_calls):
    code, stdout, stderr = run("trace", "resnet18", str(images[0]), *SMALL, "--json", "-c", "3", "-q")
    assert code == 0, stderr
    assert stderr == ""
    trace = json.loads(stdout)
    assert trace["classes"] == [3]
    forward = [event for event in trace["events"] if event["direction"] == "forward"]
    backward = [event for event in trace["events"] if event["direction"] == "backward"]
    assert len(forward) == resnet18_calls
    assert backward and trace["events"] == forward + backward
    assert forward[0]["output"]["shape"] == [1, 1000]
    logits_gradient = backward[0]["gradient"]  # d logit_3 / d logits: one-hot
    assert (backward[0]["name"], logits_gradient["min"], logits_gradient["max"], logits_gradient["norm"]) == (
        "",
        0,
        1,
        1,
    )
    assert trace["input_gradient"]["shape"] == [1, 3, 64, 64]


@pytest.mark.parametrize("value", ["1000", "-1"])
def test_trace_class_out_of_range_is_one_line_exit_2(images, value):
    code, stdout, stderr = run("trace", "resnet18", str(images[0]), *SMALL, "-c", value, "-q")
    assert code == 2
    assert stdout == ""
    (error,) = stderr.strip().splitlines()
    assert error.startswith("hookviz: error:") and value in error and "out of range" in error


def test_trace_missing_image_is_one_line_exit_1(tmp_path):
    missing = tmp_path / "nowhere.png"
    code, stdout, stderr = run("trace", "resnet18", str(missing), *SMALL, "-q")
    assert code == 1
    assert stdout == ""
    (error,) = stderr.strip().splitlines()
    assert error.startswith("hookviz: error:") and str(missing) in error and "not found" in error


# --- --tensorboard ----------------------------------------------------------------------------------


def test_gradcam_tensorboard_holds_each_overlay_at_its_input_step(tmp_path, images):
    log_dir = tmp_path / "tb"
    code, stdout, stderr = run(
        "gradcam",
        "resnet18",
        *map(str, images),
        *SMALL,
        "--json",
        "-q",
        "--no-caption",  # each picture at its input's size
        "-o",
        str(tmp_path / "out"),
        "--tensorboard",
        str(log_dir),
    )
    assert code == 0, stderr
    records = [json.loads(line) for line in stdout.splitlines()]
    assert [record["input"] for record in records] == list(map(str, images))
    assert {output["layer"] for record in records for output in record["outputs"]} == {"layer4"}  # the default layer

    accumulator = events(log_dir)
    assert accumulator.Tags()["images"] == ["gradcam/layer4"]
    pictures = accumulator.Images("gradcam/layer4")
    assert [picture.step for picture in pictures] == [0, 1, 2]
    for picture, record, (width, height) in zip(pictures, records, SIZES):
        assert (picture.width, picture.height) == (width, height)
        (output,) = record["outputs"]
        written = pixels_of(output["png"])
        assert written.shape == (height, width, 3)
        np.testing.assert_array_equal(decoded(picture), written)


def test_fmaps_tensorboard_has_one_tag_per_layer(tmp_path, images):
    log_dir = tmp_path / "tb"
    code, stdout, stderr = run(
        "fmaps",
        "resnet18",
        str(images[0]),
        *SMALL,
        "--json",
        "-q",
        "--max-channels",
        "4",
        "-o",
        str(tmp_path / "out"),
        "--tensorboard",
        str(log_dir),
    )
    assert code == 0, stderr
    (record,) = [json.loads(line) for line in stdout.splitlines()]
    accumulator = events(log_dir)
    assert sorted(accumulator.Tags()["images"]) == sorted(f"fmaps/{name}" for name in RESNET18_CONVS)
    assert [output["layer"] for output in record["outputs"]] == RESNET18_CONVS
    for output in record["outputs"]:
        (picture,) = accumulator.Images(f"fmaps/{output['layer']}")
        assert picture.step == 0
        np.testing.assert_array_equal(decoded(picture), pixels_of(output["png"]))


def test_stats_tensorboard_histograms_and_scalars_match_the_json(tmp_path, images):
    log_dir = tmp_path / "tb"
    layers = ["conv1", "layer2.0.conv2", "fc"]
    code, stdout, stderr = run(
        "stats",
        "resnet18",
        *map(str, images[:2]),
        *SMALL,
        *[a for n in layers for a in ("-l", n)],
        "--json",
        "-q",
        "-o",
        str(tmp_path / "out"),
        "--tensorboard",
        str(log_dir),
    )
    assert code == 0, stderr
    records = {record["layer"]: record for record in map(json.loads, stdout.splitlines())}
    assert list(records) == layers

    accumulator = events(log_dir)
    tags = accumulator.Tags()
    assert sorted(tags["histograms"]) == sorted(f"activations/{name}" for name in layers)
    for name, record in records.items():
        (event,) = accumulator.Histograms(f"activations/{name}")
        histogram = event.histogram_value
        assert event.step == 0
        assert sum(histogram.bucket) == histogram.num == record["values"]
        assert list(histogram.bucket) == record["histogram"]["counts"]
        np.testing.assert_allclose(histogram.bucket_limit, record["histogram"]["edges"][1:])
        assert (histogram.min, histogram.max) == pytest.approx((record["min"], record["max"]))
        assert histogram.sum == pytest.approx(record["mean"] * record["values"], rel=1e-6, abs=1e-6)
        for key in ("mean", "std", "zero_fraction"):
            (scalar,) = accumulator.Scalars(f"{key}/{name}")
            assert scalar.value == pytest.approx(record[key], rel=1e-6, abs=1e-7)  # float32 in the event file
        (dead,) = accumulator.Scalars(f"dead_channels/{name}")
        assert dead.value == len(record["dead_channels"])


@pytest.mark.parametrize("command", ["gradcam", "fmaps", "stats"])
def test_tensorboard_option_without_tensorboard_is_a_usage_error(tmp_path, images, monkeypatch, command):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # what `import` sees when it is not installed
    layer = ["-l", "conv1"]
    code, stdout, stderr = run(
        command,
        "resnet18",
        str(images[0]),
        *SMALL,
        *layer,
        "-q",
        "-o",
        str(tmp_path / "out"),
        "--tensorboard",
        str(tmp_path / "tb"),
    )
    assert code == 2
    (error,) = stderr.strip().splitlines()
    assert error.startswith("hookviz: error:") and "hookviz[tensorboard]" in error and "--tensorboard" in error
    assert not (tmp_path / "tb").exists()


def test_stats_without_tensorboard_fails_before_writing_anything(tmp_path, images, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    code, _, _ = run(
        "stats",
        "resnet18",
        str(images[0]),
        *SMALL,
        "-l",
        "conv1",
        "-q",
        "-o",
        str(tmp_path / "out"),
        "--tensorboard",
        str(tmp_path / "tb"),
    )
    assert code == 2
    assert not (tmp_path / "out" / "stats.png").exists()


# --- vision transformers ----------------------------------------------------------------------------

VIT_LAYER = "encoder.layers.encoder_layer_11.ln_1"


@pytest.fixture(scope="module")
def vits(nets):
    """The module behind `nets:build_vit` and `nets:build_swin`; the two big models are dropped after this file."""
    yield nets
    nets.build_vit.cache_clear()
    nets.build_swin.cache_clear()


@pytest.fixture(scope="module")
def vit_image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_image(tmp_path_factory.mktemp("vit_images") / "photo.png", 64, 48, seed=11)


@pytest.mark.parametrize(("factory", "expected"), [("vit", VIT_LAYER), ("swin", "permute")])
def test_layers_marks_the_default_cam_layer_of_a_transformer(vits, factory, expected):
    code, stdout, stderr = run("layers", f"nets:build_{factory}", "--json")
    assert code == 0, stderr
    layers = json.loads(stdout)
    assert [layer["name"] for layer in layers if layer["cam_default"]] == [expected]
    (chosen,) = [layer for layer in layers if layer["cam_default"]]
    assert chosen["output_shape"] == ([1, 197, 768] if factory == "vit" else [1, 768, 7, 7])


@pytest.mark.parametrize(("factory", "layer"), [("vit", VIT_LAYER), ("swin", "permute")])
def test_gradcam_on_a_transformer_with_the_default_layer(tmp_path, vits, vit_image, factory, layer):
    code, stdout, stderr = run(
        "gradcam",
        f"nets:build_{factory}",
        str(vit_image),
        "--save-raw",
        "--json",
        "--no-caption",
        "-o",
        str(tmp_path / "out"),
    )
    assert code == 0, stderr
    assert f"layer: {layer} (default" in stderr
    (record,) = [json.loads(line) for line in stdout.splitlines()]
    (output,) = record["outputs"]
    assert output["layer"] == layer
    with Image.open(output["png"]) as overlay:
        assert overlay.size == (64, 48)
    heat = np.load(output["raw"])
    assert heat.shape == (48, 64)
    assert heat.min() >= 0 and heat.max() <= 1
    assert heat.max() - heat.min() > 0.5 and heat.std() > 0.05  # a map with structure, not a blank or flat one


def test_fmaps_of_vit_patch_tokens_are_a_14x14_grid(tmp_path, vits, vit_image):
    code, stdout, stderr = run(
        "fmaps",
        "nets:build_vit",
        str(vit_image),
        "-l",
        VIT_LAYER,
        "--max-channels",
        "16",
        "--json",
        "-q",
        "--no-caption",  # the grid alone, without its title band
        "-o",
        str(tmp_path / "out"),
    )
    assert code == 0, stderr
    (record,) = [json.loads(line) for line in stdout.splitlines()]
    (output,) = record["outputs"]
    with Image.open(output["png"]) as grid:
        assert grid.text["hookviz:shape"] == "768x14x14"  # 196 patch tokens; the class token is dropped
        assert grid.text["hookviz:layer"] == VIT_LAYER
        # 16 tiles in 4 columns, each 14x14 map enlarged 5x to 70 px and widened to the 64x48 photo's 4:3
        # (93 px: the model saw the photo squeezed into a square), 2 px gaps.
        assert grid.size == (4 * (93 + 2) + 2, 4 * 72 + 2)
    assert len(output["channels"]) == 16


def test_vit_gradcam_matches_pytorch_grad_cam(vits, vit_image):
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    from hookviz.cams import compute_cams

    model = vits.build_vit()
    preprocessing = load_model("nets:build_vit").preprocessing
    batch = prepare_image(vit_image, vit_image.stem, preprocessing, crop=False).tensor[None]
    result = compute_cams(model, batch, layer=VIT_LAYER, method="gradcam")  # the top-1 class
    (target,) = result.classes[0].tolist()
    mine = result.maps[0, 0]
    assert mine.shape == (14, 14) and mine.max() > 0

    def reshape_transform(tensor, height=14, width=14):  # pytorch-grad-cam's documented ViT recipe
        result = tensor[:, 1:, :].reshape(tensor.size(0), height, width, tensor.size(2))
        return result.transpose(2, 3).transpose(1, 2)

    layer = model.encoder.layers.encoder_layer_11.ln_1
    # Only the last block and the head need gradients: the same result without a backward pass through all 12 blocks.
    frozen = [
        p
        for name, p in model.named_parameters()
        if not name.startswith(("encoder.layers.encoder_layer_11.", "encoder.ln.", "heads."))
    ]
    for parameter in frozen:
        parameter.requires_grad_(False)
    try:
        with GradCAM(model=model, target_layers=[layer], reshape_transform=reshape_transform) as cam:
            theirs = cam(input_tensor=batch, targets=[ClassifierOutputTarget(target)])[0]  # (224, 224), min-max scaled
            activations = cam.activations_and_grads.activations
            gradients = cam.activations_and_grads.gradients
            theirs_raw = np.maximum(
                cam.get_cam_image(
                    batch, layer, [ClassifierOutputTarget(target)], activations[0].numpy(), gradients[0].numpy(), False
                ),
                0,
            )[0]
    finally:
        for parameter in frozen:
            parameter.requires_grad_(True)
        model.zero_grad(set_to_none=True)

    pearson = lambda a, b: float(np.corrcoef(np.ravel(a), np.ravel(b))[0, 1])  # noqa: E731
    assert theirs_raw.shape == (14, 14)
    assert pearson(mine.numpy(), theirs_raw) > 0.99
    upsampled = F.interpolate(mine[None, None], size=(224, 224), mode="bilinear", align_corners=False)[0, 0].numpy()
    upsampled = (upsampled - upsampled.min()) / (upsampled.max() - upsampled.min())
    assert theirs.shape == (224, 224)
    assert pearson(upsampled, theirs) > 0.98


def test_swin_stage_one_at_a_non_square_size_is_read_channels_last(vits):
    with torch.no_grad():
        first_stage = vits.build_swin().features[0](torch.zeros(1, 3, 224, 320))
    assert tuple(first_stage.shape) == (1, 56, 80, 96)  # (N, h, w, C): a 4x4 patch embedding, channels last
    assert spatial_layout(first_stage.shape, (224, 320)) == Layout("nhwc", 56, 80)


# --- reading outputs as maps ------------------------------------------------------------------------

B = 2


def case(name: str, shape: tuple[int, ...], input_size: tuple[int, int], expected: Layout | None, *marks):
    return pytest.param(shape, input_size, expected, id=name, marks=marks)


@pytest.mark.parametrize(
    ("shape", "input_size", "expected"),
    [
        case("nchw-7x7", (B, 768, 7, 7), (224, 224), Layout("nchw", 7, 7)),
        case("nhwc-7x7", (B, 7, 7, 768), (224, 224), Layout("nhwc", 7, 7)),
        case("vit-class-token", (B, 197, 768), (224, 224), Layout("tokens", 14, 14, prefix=1)),
        case("deit-class-and-distillation-tokens", (B, 198, 768), (224, 224), Layout("tokens", 14, 14, prefix=2)),
        case("patch-tokens-only", (B, 196, 768), (224, 224), Layout("tokens", 14, 14, prefix=0)),
        case("logits", (B, 1000), (224, 224), None),
        case("pooled-1x1", (B, 512, 1, 1), (224, 224), None),
        case("swin_t-last-stage-224x320", (B, 7, 10, 768), (224, 320), Layout("nhwc", 7, 10)),
        case("resnet50-layer4-224x320", (B, 2048, 7, 10), (224, 320), Layout("nchw", 7, 10)),
        case("vit-tokens-224x320", (B, 1 + 14 * 20, 768), (224, 320), Layout("tokens", 14, 20, prefix=1)),
        case("swin_t-stage1-224", (B, 56, 56, 96), (224, 224), Layout("nhwc", 56, 56)),
        case("resnet-layer1-224", (B, 64, 56, 56), (224, 224), Layout("nchw", 56, 56)),
        case("swin_t-stage1-224x320", (B, 56, 80, 96), (224, 320), Layout("nhwc", 56, 80)),
        case("resnet-layer1-224x320", (B, 64, 56, 80), (224, 320), Layout("nchw", 56, 80)),
    ],
)
def test_spatial_layout(shape, input_size, expected):
    assert spatial_layout(shape, input_size) == expected
