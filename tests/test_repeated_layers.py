"""A module that runs more than once per forward pass (one activation shared by every block): one rule
everywhere. ``name#N`` picks its N-th call; ``name`` alone is its last call, with a note saying so.

    hookviz gradcam nets:build_shared_act photo.png --size 32 -l act#1
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from cli_helpers import hookviz, json_lines, write_noise_image

from hookviz.cams import compute_cams

SHARED = ["nets:build_shared_act", "--size", "32"]


@pytest.fixture
def photo(tmp_path: Path) -> Path:
    return write_noise_image(tmp_path / "photo.png", 40, 40, seed=9)


def grad_cam_by_hand(model: torch.nn.Module, x: torch.Tensor, call: int) -> torch.Tensor:
    """Grad-CAM of the top class at the ``call``-th output of ``model.act``: plain hooks and autograd."""
    outputs = []
    handle = model.act.register_forward_hook(lambda module, inputs, output: outputs.append(output))
    try:
        with torch.enable_grad():
            logits = model(x.requires_grad_(True))
            activation = outputs[call - 1]
            (gradient,) = torch.autograd.grad(logits[0, logits[0].argmax()], activation)
    finally:
        handle.remove()
    weights = gradient.mean(dim=(2, 3), keepdim=True)
    return torch.relu((weights * activation).sum(dim=1))[0].detach()


@pytest.mark.parametrize("call", [1, 2])
def test_name_hash_n_explains_that_call(nets, call):
    model = nets.build_shared_act().eval()
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))

    cams = compute_cams(model, x, layer=f"act#{call}")

    expected = grad_cam_by_hand(model, x.clone(), call)
    assert cams.maps.shape[-2:] == expected.shape  # 32x32 for the first call, 16x16 for the second
    torch.testing.assert_close(cams.maps[0, 0], expected, rtol=0, atol=1e-5)


def test_a_name_alone_is_the_last_call_with_a_note(tmp_path, photo, nets):
    plain = hookviz("gradcam", *SHARED, photo, "-l", "act", "--save-raw", "--json", "-o", tmp_path / "a")
    second = hookviz("gradcam", *SHARED, photo, "-l", "act#2", "--save-raw", "--json", "-o", tmp_path / "b")

    assert plain.exit_code == 0 and second.exit_code == 0, plain.stderr + second.stderr
    assert "layer act runs 2 times per forward pass; using its last call (pick one with -l act#1 ... act#2)" in (
        plain.stderr
    )
    (a,) = json_lines(plain.stdout)[0]["outputs"]
    (b,) = json_lines(second.stdout)[0]["outputs"]
    np.testing.assert_array_equal(np.load(a["raw"]), np.load(b["raw"]))


def test_stats_keep_each_call_apart(tmp_path, photo, nets):
    """`stats -l act` aborted: "channel count changed from 8 to 6". Each call now has statistics of its own."""
    result = hookviz("stats", *SHARED, photo, "-l", "act", "--json", "-o", tmp_path / "out", "-q")

    assert result.exit_code == 0, result.stderr
    records = json_lines(result.stdout)
    assert [(record["layer"], record["channels"]) for record in records] == [("act#1", 8), ("act#2", 6)]


def test_fmaps_and_trace_use_the_same_names(tmp_path, photo, nets):
    fmaps = hookviz("fmaps", *SHARED, photo, "-l", "act#1", "--json", "-o", tmp_path / "out", "-q")
    trace = hookviz("trace", *SHARED, photo, "-q")

    assert fmaps.exit_code == 0, fmaps.stderr
    (output,) = json_lines(fmaps.stdout)[0]["outputs"]
    assert output["layer"] == "act#1" and len(output["channels"]) == 8
    assert any(line.split()[2] == "act#2" for line in trace.stdout.splitlines() if line.startswith("fwd"))


def test_a_call_the_module_never_makes_is_one_line(tmp_path, photo, nets):
    result = hookviz("gradcam", *SHARED, photo, "-l", "act#3", "-o", tmp_path / "out", "-q")

    assert result.exit_code == 2
    (line,) = result.stderr.splitlines()
    assert (
        line == "hookviz: error: layer 'act#3': the module runs 2 time(s) per forward pass; pick one of act#1 ... act#2"
    )
