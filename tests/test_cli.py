"""The hookviz command line, run in-process with click's CliRunner (stdout and stderr kept apart)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_helpers import hookviz, json_lines
from PIL import Image
from process_helpers import subprocess_env
from torchvision.transforms import functional as TF

from hookviz.cli import main
from hookviz.preprocessing import IMAGENET_MEAN, IMAGENET_STD

# --- layers --------------------------------------------------------------------------------------


def test_layers_table_marks_the_default_cam_layer():
    result = hookviz("layers", "resnet18", "--weights", "none", "--size", "64")

    assert result.exit_code == 0, result.stderr
    rows = {line[2:].split()[0]: line for line in result.stdout.splitlines()[1:]}
    assert rows["layer4"].startswith("* ")
    assert [name for name, line in rows.items() if line.startswith("*")] == ["layer4"]
    assert "512x2x2" in rows["layer4"]  # 64 px input, total stride 32
    assert "default CAM layer: layer4" in result.stderr


def test_layers_json():
    result = hookviz("layers", "resnet18", "--weights", "none", "--size", "64", "--json")

    assert result.exit_code == 0, result.stderr
    entries = json.loads(result.stdout)
    assert isinstance(entries, list)
    assert [entry["name"] for entry in entries if entry["cam_default"]] == ["layer4"]
    by_name = {entry["name"]: entry for entry in entries}
    assert by_name["layer4"]["output_shape"] == [1, 512, 2, 2]
    assert by_name["conv1"]["conv"] is True and by_name["conv1"]["parameters"] == 64 * 3 * 7 * 7
    assert by_name["fc"]["output_shape"] == [1, 1000]


# --- fmaps ---------------------------------------------------------------------------------------


def test_fmaps_json_records_and_pngs(tmp_images, tmp_path):
    image, out = tmp_images["rgb_jpeg"], tmp_path / "out"

    result = hookviz(
        "fmaps",
        "resnet18",
        image,
        "--weights",
        "none",
        "--size",
        "64",
        "-l",
        "layer1.0.conv1",
        "-l",
        "layer2",
        "-o",
        out,
        "--json",
    )

    assert result.exit_code == 0, result.stderr
    (record,) = json_lines(result.stdout)
    assert record["input"] == str(image)
    assert record["status"] == "ok" and record["error"] is None
    assert [(o["kind"], o["layer"]) for o in record["outputs"]] == [("fmap", "layer1.0.conv1"), ("fmap", "layer2")]
    # 64 px input: conv1 and maxpool halve it twice (16 px) for layer1, layer2 halves again.
    expected_shapes = {"layer1.0.conv1": "64x16x16", "layer2": "128x8x8"}
    for output in record["outputs"]:
        png = out / image.stem / f"fmap_{output['layer']}.png"
        assert output["png"] == str(png)
        with Image.open(png) as grid:
            grid.load()
            assert grid.format == "PNG" and grid.mode == "RGB"
            assert grid.text["hookviz:layer"] == output["layer"]
            assert grid.text["hookviz:shape"] == expected_shapes[output["layer"]]
            assert grid.text["hookviz:channels"] == ",".join(map(str, output["channels"]))
        assert "raw" not in output


def test_fmaps_max_channels(tmp_images, tmp_path):
    result = hookviz(
        "fmaps",
        "resnet18",
        tmp_images["rgb_jpeg"],
        "--weights",
        "none",
        "--size",
        "64",
        "-l",
        "layer2",
        "--max-channels",
        "4",
        "-o",
        tmp_path / "out",
        "--json",
    )

    assert result.exit_code == 0, result.stderr
    (output,) = json_lines(result.stdout)[0]["outputs"]
    assert len(output["channels"]) == 4 and len(set(output["channels"])) == 4
    assert all(0 <= c < 128 for c in output["channels"])
    with Image.open(output["png"]) as grid:
        assert grid.text["hookviz:channels"].split(",") == [str(c) for c in output["channels"]]
        assert "4 most active of 128" in grid.text["hookviz:selection"]


def test_fmaps_save_raw_writes_the_activation(tmp_images, tmp_path, saved_models, resnet18_10):
    image = tmp_images["rgb_jpeg"]

    result = hookviz(
        "fmaps",
        saved_models["state_dict"],
        image,
        "--arch",
        "resnet18",
        "--size",
        "64",
        "-l",
        "layer1.0.conv1",
        "--save-raw",
        "-o",
        tmp_path / "out",
        "--json",
        "-q",
    )

    assert result.exit_code == 0, result.stderr
    (output,) = json_lines(result.stdout)[0]["outputs"]
    raw = np.load(output["raw"])
    assert raw.dtype == np.float32 and raw.shape == (64, 16, 16)
    # The same activation computed here: the whole image resized to 64x64, normalized, run by hand.
    with Image.open(image) as picture:
        pixels = TF.pil_to_tensor(TF.resize(picture.convert("RGB"), [64, 64])).float() / 255
    x = TF.normalize(pixels, list(IMAGENET_MEAN), list(IMAGENET_STD))[None]
    net = resnet18_10
    with torch.no_grad():
        expected = net.layer1[0].conv1(net.maxpool(net.relu(net.bn1(net.conv1(x)))))[0]
    assert np.allclose(raw, expected.numpy(), atol=1e-4)


def test_fmaps_folder_with_a_broken_image(tmp_images, tmp_path):
    folder = tmp_path / "mixed"
    folder.mkdir()
    shutil.copy(tmp_images["rgb_jpeg"], folder / "good.jpg")
    shutil.copy(tmp_images["truncated_jpeg"], folder / "broken.jpg")
    out = tmp_path / "out"

    result = hookviz(
        "fmaps", "resnet18", folder, "--weights", "none", "--size", "64", "-l", "layer1", "-o", out, "--json", "-q"
    )

    assert result.exit_code == 1
    records = {record["input"]: record for record in json_lines(result.stdout)}
    assert set(records) == {str(folder / "good.jpg"), str(folder / "broken.jpg")}
    good, broken = records[str(folder / "good.jpg")], records[str(folder / "broken.jpg")]
    assert good["status"] == "ok" and (out / "good" / "fmap_layer1.png").is_file()
    assert broken["status"] == "error" and broken["outputs"] == []
    assert str(folder / "broken.jpg") in broken["error"]
    assert not (out / "broken").exists()
    (error_line,) = result.stderr.splitlines()
    assert error_line.startswith("hookviz: error: ") and str(folder / "broken.jpg") in error_line


def test_fmaps_without_json_prints_png_paths(tmp_images, tmp_path):
    out = tmp_path / "out"

    result = hookviz(
        "fmaps",
        "resnet18",
        tmp_images["rgb_jpeg"],
        "--weights",
        "none",
        "--size",
        "64",
        "-l",
        "layer1",
        "-l",
        "layer3",
        "-o",
        out,
    )

    assert result.exit_code == 0, result.stderr
    stem = tmp_images["rgb_jpeg"].stem
    assert result.stdout.splitlines() == [str(out / stem / "fmap_layer1.png"), str(out / stem / "fmap_layer3.png")]
    assert "hookviz: model: torchvision resnet18" in result.stderr


def test_fmaps_unknown_layer_is_a_one_line_usage_error(tmp_images, tmp_path):
    result = hookviz(
        "fmaps",
        "resnet18",
        tmp_images["rgb_jpeg"],
        "--weights",
        "none",
        "--size",
        "64",
        "-l",
        "layer5",
        "-o",
        tmp_path / "out",
        "-q",
    )

    assert result.exit_code == 2
    (line,) = result.stderr.splitlines()
    assert line.startswith("hookviz: error:")
    assert "did you mean" in line and "layer4" in line
    assert result.stdout == ""
    assert "Traceback" not in result.output
    assert not (tmp_path / "out").exists()  # it failed before any work


def test_fmaps_missing_model_file(tmp_images, tmp_path):
    missing = tmp_path / "models" / "missing.pt"

    result = hookviz("fmaps", missing, tmp_images["rgb_jpeg"], "-o", tmp_path / "out")

    assert result.exit_code == 2
    assert result.stderr.startswith("hookviz: error:") and "not found" in result.stderr
    assert str(missing) in result.stderr


def test_fmaps_same_stem_in_two_folders_gets_two_output_folders(tmp_images, tmp_path):
    for folder in ("day", "night"):
        (tmp_path / folder).mkdir()
        shutil.copy(tmp_images["rgb_jpeg"], tmp_path / folder / "cat.jpg")
    out = tmp_path / "out"

    result = hookviz(
        "fmaps",
        "resnet18",
        tmp_path / "day" / "cat.jpg",
        tmp_path / "night" / "cat.jpg",
        "--weights",
        "none",
        "--size",
        "64",
        "-l",
        "layer1",
        "-o",
        out,
        "--json",
    )

    assert result.exit_code == 0, result.stderr
    pngs = [record["outputs"][0]["png"] for record in json_lines(result.stdout)]
    assert len(pngs) == 2
    folders = {}
    for png in pngs:
        with Image.open(png) as grid:
            folders[grid.text["hookviz:input"]] = Path(png).parent
    assert len(set(folders.values())) == 2
    assert all(folder.parent == out and folder.name.startswith("cat") for folder in folders.values())
    assert set(folders) == {str(tmp_path / "day" / "cat.jpg"), str(tmp_path / "night" / "cat.jpg")}


def test_fmaps_non_spatial_layer_is_a_usage_error(tmp_images, tmp_path):
    result = hookviz(
        "fmaps",
        "resnet18",
        tmp_images["rgb_jpeg"],
        "--weights",
        "none",
        "--size",
        "64",
        "-l",
        "fc",
        "-o",
        tmp_path / "out",
        "-q",
    )

    assert result.exit_code == 2
    (line,) = result.stderr.splitlines()
    assert line.startswith("hookviz: error:") and "'fc'" in line


def test_bad_size_is_rejected_by_click():
    result = hookviz("layers", "resnet18", "--weights", "none", "--size", "3x")

    assert result.exit_code == 2
    assert "--size" in result.stderr


def test_fmaps_default_layers_skip_convs_that_do_not_run(tmp_images, tmp_path, nets):
    """nets.WithAuxHead has a conv head that runs only in training mode, like googlenet / inception_v3."""
    result = hookviz(
        "fmaps", "nets:build_with_aux_head", tmp_images["rgb_jpeg"], "--size", "32", "-o", tmp_path / "out", "--json"
    )

    assert result.exit_code == 0, result.stderr
    assert [o["layer"] for o in json_lines(result.stdout)[0]["outputs"]] == ["conv"]


@pytest.fixture
def static_batch_program(tmp_path):
    """A .pt2 exported the simplest way, ``torch.export.export(m, (x,))``: its batch size is fixed at 1."""
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(4, 2),
    ).eval()
    path = tmp_path / "static.pt2"
    torch.export.save(torch.export.export(model, (torch.randn(1, 3, 32, 32),)), path)
    return path


def test_fmaps_static_batch_program_one_image_at_a_time(static_batch_program, tmp_images, tmp_path):
    result = hookviz(
        "fmaps",
        static_batch_program,
        tmp_images["rgb_jpeg"],
        tmp_images["bmp"],
        "-l",
        "0",
        "--batch-size",
        "1",
        "-o",
        tmp_path / "out",
        "--json",
    )

    assert result.exit_code == 0, result.stderr
    assert [record["status"] for record in json_lines(result.stdout)] == ["ok", "ok"]


def test_fmaps_static_batch_program_with_several_images(static_batch_program, tmp_images, tmp_path):
    result = hookviz(
        "fmaps",
        static_batch_program,
        tmp_images["rgb_jpeg"],
        tmp_images["bmp"],
        "-l",
        "0",
        "-o",
        tmp_path / "out",
        "--json",
    )

    assert result.exit_code == 0, result.stderr
    assert [record["status"] for record in json_lines(result.stdout)] == ["ok", "ok"]


# --- start-up ------------------------------------------------------------------------------------


def test_importing_the_cli_does_not_import_torch():
    code = "import hookviz.cli, sys; assert 'torch' not in sys.modules, 'torch was imported'"

    completed = subprocess.run(
        [sys.executable, "-c", code], env=subprocess_env(), capture_output=True, text=True, timeout=120
    )

    assert completed.returncode == 0, completed.stderr


def test_python_dash_m_hookviz_help():
    completed = subprocess.run(
        [sys.executable, "-m", "hookviz", "--help"], env=subprocess_env(), capture_output=True, text=True, timeout=120
    )

    assert completed.returncode == 0, completed.stderr
    assert "Usage: hookviz" in completed.stdout
    assert "fmaps" in completed.stdout and "layers" in completed.stdout


@pytest.mark.parametrize("command", sorted(main.commands))
def test_every_command_has_help_with_an_example(command):
    result = hookviz(command, "--help")
    assert result.exit_code == 0
    assert "Example" in result.stdout, f"hookviz {command} --help shows no example"
    assert f"hookviz {command} " in result.stdout
