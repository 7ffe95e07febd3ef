"""No code execution from model files by default: pickled checkpoints are refused without running their payload,
and a .pt2 (the safe alternative the refusal recommends) never runs one either."""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import pytest
import torch
from cli_helpers import assert_usage_error, hookviz

from hookviz.errors import UsageError
from hookviz.models import load_model


class TouchesAFileWhenUnpickled:
    """Stands for any pickled payload: unpickling it calls ``Path(marker).touch()``.

    ``__reduce__`` makes the pickle name only ``pathlib``, not this class, as a real attack file would.
    """

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def save_malicious_checkpoint(path: Path, marker: Path, legacy: bool = False) -> Path:
    """A checkpoint that looks like one ({"state_dict": ..., "epoch": ...}) with the payload inside."""
    checkpoint = {
        "state_dict": {"fc.weight": torch.zeros(2, 2)},
        "epoch": 3,
        "extra": TouchesAFileWhenUnpickled(marker),
    }
    torch.save(checkpoint, path, _use_new_zipfile_serialization=not legacy)
    return path


def refusal(path: Path) -> str:
    return (
        f"{path} is a pickled Python object and loading it would run code from the file; "
        "if you trust its source re-run with --trust, else use a state_dict with --arch or a .pt2 export"
    )


def test_the_malicious_checkpoint_really_runs_code_when_unpickled(tmp_path):
    """Control for the tests below: an unsafe torch.load of the payload does create the marker."""
    marker = tmp_path / "pwned"
    path = save_malicious_checkpoint(tmp_path / "model.pt", marker)

    torch.load(path, weights_only=False)

    assert marker.exists()


@pytest.mark.parametrize("legacy", [False, True], ids=["zip-format", "legacy-format"])
def test_cli_refuses_a_pickled_checkpoint_without_running_it(tmp_path, legacy):
    """`hookviz layers evil.pt` exits 2 with one line naming --trust, .pt2 and --arch; the payload never runs."""
    marker = tmp_path / "pwned"
    path = save_malicious_checkpoint(tmp_path / "model.pt", marker, legacy=legacy)

    result = hookviz("layers", path)

    assert_usage_error(result, refusal(path))
    for alternative in ("--trust", ".pt2", "--arch"):
        assert alternative in result.stderr
    assert not marker.exists()


@pytest.mark.parametrize("force_unsafe_env", [False, True], ids=["default-env", "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1"])
def test_load_model_refuses_a_pickled_checkpoint_without_running_it(tmp_path, monkeypatch, force_unsafe_env):
    """The library refuses too, even when the environment asks torch to default to unsafe loading."""
    if force_unsafe_env:
        monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    marker = tmp_path / "pwned"
    path = save_malicious_checkpoint(tmp_path / "model.pt", marker)

    with pytest.raises(UsageError) as info:
        load_model(str(path), device="cpu")

    assert str(info.value) == refusal(path)
    assert not marker.exists()


def test_state_dict_option_refuses_a_pickled_file_without_running_it(tmp_path, nets):
    """`MODEL=pkg.mod:callable --state-dict evil.pt`: exit 2, one line, and the payload never runs."""
    marker = tmp_path / "pwned"
    path = save_malicious_checkpoint(tmp_path / "weights.pt", marker)

    result = hookviz("layers", "nets:build_tinynet", "--state-dict", path)

    assert_usage_error(result, f"--state-dict {path} holds pickled code, not a state_dict of tensors")
    with pytest.raises(UsageError, match="pickled code"):
        load_model("nets:build_tinynet", state_dict=str(path), device="cpu")
    assert not marker.exists()


def test_a_pickle_renamed_to_pt2_is_refused_without_running_it(tmp_path):
    """A .pt2 suffix routes the file to torch.export.load; a plain pickle there must not run either."""
    marker = tmp_path / "pwned"
    path = save_malicious_checkpoint(tmp_path / "model.pt2", marker)

    result = hookviz("layers", path)

    assert result.exit_code == 2
    assert not marker.exists()


def test_a_broken_pt2_file_is_a_one_line_error(tmp_path):
    """A .pt2 that is not an export (here: a text file) gives exit 2 and exactly one line on stderr."""
    path = tmp_path / "model.pt2"
    path.write_text("not an exported program\n")

    result = hookviz("layers", path)

    assert result.exit_code == 2
    assert "Traceback" not in result.stderr
    (line,) = result.stderr.splitlines()
    assert (
        line
        == f"hookviz: error: {path} is not a torch.export .pt2 archive (not a zip file); save one with torch.export.save"
    )


def _rewrite_zip(source: Path, target: Path, replace) -> None:
    """Copy a zip archive entry by entry, passing each entry's bytes through ``replace(name, data)``."""
    with zipfile.ZipFile(source) as old, zipfile.ZipFile(target, "w", zipfile.ZIP_STORED) as new:
        for info in old.infolist():
            new.writestr(info.filename, replace(info.filename, old.read(info.filename)))


def _pickled_payload(marker: Path, wrap=tuple) -> bytes:
    buffer = io.BytesIO()
    torch.save(wrap([TouchesAFileWhenUnpickled(marker)]), buffer)
    return buffer.getvalue()


def _payload_in_sample_inputs(name: str, data: bytes, marker: Path) -> bytes:
    # torch's deserialize_torch_artifact retries a failed weights_only load with weights_only=False.
    return _pickled_payload(marker) if name.endswith("/sample_inputs/model.pt") else data


def _payload_as_pickled_weight(name: str, data: bytes, marker: Path) -> bytes:
    # A weight whose payload config says use_pickle=True is loaded with torch.load(weights_only=False).
    if name.endswith("/model_weights_config.json"):
        config = json.loads(data)
        first = next(iter(config["config"].values()))
        first["use_pickle"] = True
        return json.dumps(config).encode()
    if name.endswith("/data/weights/weight_0"):
        return _pickled_payload(marker)
    return data


@pytest.mark.parametrize(
    "plant", [_payload_in_sample_inputs, _payload_as_pickled_weight], ids=["sample-inputs", "pickled-weight"]
)
def test_a_crafted_pt2_does_not_run_code(tmp_path, exported_program, plant):
    """.pt2 is the safe alternative the refusal message recommends: loading one must not run a pickled payload."""
    valid, _ = exported_program
    marker = tmp_path / "pwned"
    crafted = tmp_path / "model.pt2"
    _rewrite_zip(valid, crafted, lambda name, data: plant(name, data, marker))

    hookviz("layers", crafted)

    assert not marker.exists()
