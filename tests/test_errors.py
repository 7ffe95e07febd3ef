"""Bad arguments: exit 2 and exactly one error line on stderr, never a traceback, nothing written."""

from __future__ import annotations

import pytest
from cli_helpers import TINY, assert_usage_error, hookviz, write_solid_png

from hookviz.errors import UsageError
from hookviz.models import load_model


@pytest.fixture
def cli_case(tmp_path, nets):
    """What the bad-argument cases need: an image, labels, a regular file, an output dir."""
    (tmp_path / "labels.txt").write_text("cat\ndog\ncar\nship\n")
    (tmp_path / "a_file").write_text("I am a file, not a directory\n")
    return {
        "image": write_solid_png(tmp_path / "photo.png"),
        "labels": tmp_path / "labels.txt",
        "file": tmp_path / "a_file",
        "out": tmp_path / "out",
        "missing": tmp_path / "models" / "missing.pt",
    }


BAD_ARGUMENTS = {
    "unknown-layer": (
        lambda c: ["gradcam", *TINY, c["image"], "-l", "relu3"],
        lambda c: "unknown layer 'relu3'; did you mean relu2, relu1? ('hookviz layers MODEL' lists them)",
    ),
    "class-index-out-of-range": (
        lambda c: ["gradcam", *TINY, c["image"], "--class", "7"],
        lambda c: "--class 7 is out of range: this model has classes 0..3",
    ),
    "unknown-class-name": (
        lambda c: ["gradcam", *TINY, c["image"], "--labels", c["labels"], "--class", "dgo"],
        lambda c: "--class 'dgo' is not a class name of this model; did you mean 'dog'?",
    ),
    "class-name-without-labels": (
        lambda c: ["gradcam", *TINY, c["image"], "--class", "dog"],
        lambda c: "--class 'dog': this model has no class names; give an index, or names with --labels",
    ),
    "cam-without-linear-head": (
        lambda c: ["gradcam", "nets:build_conv_head", "--size", "32", c["image"], "-m", "cam"],
        lambda c: (
            "method cam needs layer 'classifier' to be followed only by global average pooling and one linear "
            "layer; pick that layer with -l (see 'hookviz layers'), or use -m gradcam"
        ),
    ),
    "gradcam-non-spatial-layer": (
        lambda c: ["gradcam", *TINY, c["image"], "-l", "fc"],
        lambda c: (
            "layer 'fc' has output shape (1, 4), not a spatial map (N, C, H, W) or patch tokens; choose another with -l"
        ),
    ),
    "guided-non-spatial-layer": (
        lambda c: ["guided", *TINY, c["image"], "-l", "fc"],
        lambda c: (
            "layer 'fc' has output shape (1, 4), not a spatial map (N, C, H, W) or patch tokens; choose another with -l"
        ),
    ),
    "output-dir-under-a-file": (
        lambda c: ["gradcam", *TINY, c["image"], "-o", c["file"] / "out"],
        lambda c: f"cannot create output directory {c['file'] / 'out'} (Not a directory); choose another with -o",
    ),
    "missing-model-file": (
        lambda c: ["gradcam", c["missing"], c["image"]],
        lambda c: f"model file not found: {c['missing']}",
    ),
}


@pytest.mark.parametrize("case", list(BAD_ARGUMENTS))
def test_bad_argument_is_exactly_one_error_line_and_exit_2(cli_case, case):
    """Each bad argument pins its message: exit 2, stderr is the one line, nothing written."""
    arguments, expected = BAD_ARGUMENTS[case]
    arguments = arguments(cli_case)
    if "-o" not in arguments:
        arguments += ["-o", cli_case["out"]]

    result = hookviz(*arguments, "-q")

    assert_usage_error(result, expected(cli_case))
    assert not list(cli_case["out"].rglob("*.png"))


def test_state_dict_with_the_wrong_arch_is_exactly_one_error_line(saved_models, cli_case):
    """A resnet18 state_dict with --arch resnet34: exit 2 and the pinned one-line message."""
    state_dict = saved_models["state_dict"]

    result = hookviz("fmaps", state_dict, cli_case["image"], "--arch", "resnet34", "-o", cli_case["out"], "-q")

    assert_usage_error(
        result,
        f"{state_dict} does not fit --arch resnet34 (96 missing keys, e.g. layer1.2.conv1.weight); "
        "leave out --arch to detect the architecture, or export the model to .pt2",
    )


def test_state_dict_with_the_wrong_arch_says_what_does_not_fit(saved_models):
    """The message names what did not fit (missing/unexpected keys or a size mismatch), not just that something did."""
    with pytest.raises(UsageError) as info:
        load_model(str(saved_models["state_dict"]), arch="resnet34")

    message = str(info.value)
    assert ":)" not in message  # a detail cut off after its colon
    assert any(word in message.lower() for word in ("missing", "unexpected", "size mismatch"))
