"""What a demanding user hit in a day with hookviz, each as it was reported, through the CLI on real files.

hookviz gradcam nets:build_tinynet --size 32 photo.png --labels labels.txt -c cat
"""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from cli_helpers import GRADCAM, TINY, hookviz, image_folder, inputs_of, json_lines, read_manifest, write_noise_image
from PIL import Image
from process_helpers import hookviz_command, subprocess_env

from hookviz.cli import trace as trace_command


@pytest.fixture
def photo(tmp_path: Path) -> Path:
    return write_noise_image(tmp_path / "photo.png", seed=0)


def error_line(result) -> str:
    (line,) = result.stderr.splitlines()
    assert line.startswith("hookviz: error: ")
    return line


@pytest.mark.parametrize(
    ("labels", "expected"),
    [
        ("imagenet", "--labels gives 1000 class names but the model has 4 outputs"),
        ("file", "--labels gives 2 class names but the model has 4 outputs"),
    ],
)
def test_class_names_that_do_not_fit_the_model_are_refused(tmp_path, photo, labels, expected):
    """--labels imagenet on a 4-class model captioned "great white shark"; a 2-line file left "class 2"."""
    if labels == "file":
        (tmp_path / "labels.txt").write_text("cat\ndog\n")
        labels = tmp_path / "labels.txt"

    result = hookviz("gradcam", *TINY, photo, "--labels", labels, "-o", tmp_path / "out", "-q")

    assert result.exit_code == 2 and expected in error_line(result)
    assert not (tmp_path / "out" / "manifest.jsonl").exists()


@pytest.fixture
def cat_labels(tmp_path: Path) -> Path:
    path = tmp_path / "labels.txt"
    path.write_text("tiger cat\nEgyptian cat\nPersian cat\ncrate\n")
    return path


def test_a_class_name_that_is_a_word_of_several_lists_them(tmp_path, photo, cat_labels):
    """-c cat used to suggest 'crate', 'oxcart', 'castle'; it is a word of three names here."""
    result = hookviz("gradcam", *TINY, photo, "--labels", cat_labels, "-c", "cat", "-o", tmp_path / "out", "-q")

    assert result.exit_code == 2
    assert error_line(result).endswith(
        "--class 'cat' is not a class name of this model; names with that word: 'tiger cat', 'Egyptian cat', "
        "'Persian cat'"
    )


def test_a_class_name_that_is_a_word_of_one_suggests_it(tmp_path, photo, cat_labels):
    result = hookviz("gradcam", *TINY, photo, "--labels", cat_labels, "-c", "persian", "-o", tmp_path / "out", "-q")

    assert error_line(result).endswith("did you mean 'Persian cat'?")


def test_a_model_file_outside_the_current_folder_can_be_named_by_path(tmp_path, photo, nets, monkeypatch):
    """mynet:build worked only from mynet's folder, and /path/to/mynet.py:build said "model file not found"."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.copy(nets.__file__, elsewhere / "hv_mynet_file.py")
    monkeypatch.chdir(tmp_path)

    by_path = hookviz(
        "gradcam", f"{elsewhere / 'hv_mynet_file.py'}:build_tinynet", "--size", "32", photo, "-o", "out", "-q"
    )
    by_name = hookviz("gradcam", "hv_mynet_unknown:build_tinynet", "--size", "32", photo, "-o", "out", "-q")

    assert by_path.exit_code == 0, by_path.stderr
    assert by_name.exit_code == 2 and "PYTHONPATH" in error_line(by_name)


def test_the_trace_help_example_reads_the_gradient_norms(tmp_path, photo):
    """`trace --help`'s jq example printed null for every backward row: it must name the field the JSON has."""
    example = next(line for line in trace_command.help.splitlines() if "jq" in line)
    path = example.split('select(.direction == "backward") | ')[1].rstrip("'").lstrip(".").split(".")

    result = hookviz("trace", *TINY, photo, "--json", "-q")

    backward = [event for event in json.loads(result.stdout)["events"] if event["direction"] == "backward"]
    values = []
    for event in backward:
        value = event
        for key in path:
            value = value[key]
        values.append(value)
    assert backward and all(isinstance(value, float) for value in values)


def test_an_empty_map_is_flagged_with_its_likely_cause(tmp_path, photo, nets):
    """A head that gives every class the same score (zero-initialised, as torchvision's vit_b_16 --weights none)
    used to write a flat overlay silently with exit 0; now a warning says why and the record says "empty"."""
    model = nets.build_tinynet()
    state = {key: value.zero_() if key.startswith("fc.") else value for key, value in model.state_dict().items()}
    torch.save(state, tmp_path / "zero_head.pt")
    options = ["--size", "32", photo, "--json", "-o", tmp_path / "out"]

    flat = hookviz("gradcam", "nets:build_tinynet", "--state-dict", tmp_path / "zero_head.pt", *options)
    normal = hookviz("gradcam", "nets:build_tinynet", *options, "--overwrite")

    (record,) = json_lines(flat.stdout)
    assert flat.exit_code == 0 and record["outputs"][0]["empty"] is True
    warning = next(line for line in flat.stderr.splitlines() if line.startswith("hookviz: warning: "))
    assert "is empty" in warning and "every class the same score" in warning
    (record,) = json_lines(normal.stdout)
    assert "empty" not in record["outputs"][0] and "warning" not in normal.stderr


def test_a_reader_that_stops_early_does_not_stop_the_run(project):
    """`--json | head -1` used to exit 1 silently with 2 of 6 inputs in the manifest: the run now goes on to the
    end, records every input, and exits as it would have."""
    image_folder(project / "photos", 6)
    command = " ".join(
        shlex.quote(part)
        for part in [*hookviz_command(), *GRADCAM, "photos", "--batch-size", "1", "--json", "-o", "out"]
    )

    done = subprocess.run(
        ["bash", "-c", f"{command} | head -1; exit ${{PIPESTATUS[0]}}"],
        cwd=project,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )

    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr and "Exception ignored" not in done.stderr
    assert len(json_lines(done.stdout)) == 1
    assert [entry["status"] for entry in inputs_of(read_manifest(project / "out"))] == ["ok"] * 6


def test_a_small_picture_is_enlarged_for_its_caption_and_says_so(tmp_path, nets):
    """A 32x24 input: the captioned overlay is enlarged 11x (short side >= 256) and records the factor;
    --no-caption writes it at exactly 32x24."""
    image = write_noise_image(tmp_path / "small.png", 32, 24, seed=4)

    captioned_run = hookviz("gradcam", *TINY, image, "--json", "-o", tmp_path / "a", "-q")
    plain_run = hookviz("gradcam", *TINY, image, "--json", "--no-caption", "-o", tmp_path / "b", "-q")

    (output,) = json_lines(captioned_run.stdout)[0]["outputs"]
    with Image.open(output["png"]) as picture:
        assert picture.size == (32 * 11, 24 * 11) and picture.text["hookviz:scale"] == "11"
    assert output["scale"] == 11
    (output,) = json_lines(plain_run.stdout)[0]["outputs"]
    with Image.open(output["png"]) as picture:
        assert picture.size == (32, 24) and "scale" not in output


def test_class_options_with_eigencam_are_answered_with_a_note(tmp_path, photo):
    """Eigen-CAM ignores the class: --top-k 3 used to pass in silence."""
    result = hookviz("gradcam", *TINY, photo, "-m", "eigencam", "--top-k", "3", "-l", "relu2", "-o", tmp_path / "out")

    assert result.exit_code == 0, result.stderr
    assert "hookviz: eigencam does not depend on the class" in result.stderr
