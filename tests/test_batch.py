"""Runs over many inputs: the manifest, clean stdout, broken files, resuming, Ctrl-C, shards, workers, progress.

Everything runs on real files: a small seeded CNN given as ``hv_batchnet:build`` (written to a
project folder, importable in-process and from a subprocess), 64x48 images written here, and a
few broken files. The subprocess tests run the installed ``hookviz`` script, because a kill, a
Ctrl-C or a terminal on stderr cannot be faked in-process.

    hookviz gradcam hv_batchnet:build photos/ --size 32 -l relu2 --json -o OUT
"""

from __future__ import annotations

import json
import os
import pty
import re
import select
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections import Counter
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from cli_helpers import hookviz, json_lines
from hookviz.batch import BatchOptions, parse_shard, plan_batch, shard_of
from hookviz.manifest import Manifest
from hookviz.errors import UsageError
from hookviz.jobs import CamJob, CamOptions
from hookviz.models import load_model
from hookviz.pipeline import prepare_image

MODULE = "hv_batchnet"  # a module name no other test uses: sys.modules caches it
MODEL = f"{MODULE}:build"
# The model sleeps HV_BATCHNET_DELAY seconds per forward pass (read at call time), so a subprocess run is slow
# enough to kill mid-way without burning CPU; `interrupt_on_call` makes its N-th forward pass raise Ctrl-C.
SOURCE = textwrap.dedent(
    """
    import os
    import time

    import torch
    from torch import nn


    class BatchNet(nn.Module):
        def __init__(self, num_classes=4):
            super().__init__()
            self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
            self.relu1 = nn.ReLU()
            self.conv2 = nn.Conv2d(8, 8, 3, stride=2, padding=1)
            self.relu2 = nn.ReLU()
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.fc = nn.Linear(8, num_classes)
            self.calls = 0
            self.interrupt_on_call = None

        def forward(self, x):
            self.calls += 1
            if self.calls == self.interrupt_on_call:
                raise KeyboardInterrupt
            time.sleep(float(os.environ.get("HV_BATCHNET_DELAY", "0")))
            x = self.relu2(self.conv2(self.relu1(self.conv1(x))))
            return self.fc(self.pool(x).flatten(1))


    def build():
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(5)
            net = BatchNet()
            net.fc.weight.data.mul_(4)
        return net
    """
)
SIZE = ["--size", "32"]
GRADCAM = ["gradcam", MODEL, *SIZE, "-l", "relu2"]
FMAPS = ["fmaps", MODEL, *SIZE, "-l", "conv2", "--max-channels", "4"]
OUTPUT_NAME = re.compile(r"^gradcam_relu2_c\d+\.png$")


# --- helpers -------------------------------------------------------------------------------------


@pytest.fixture
def project(tmp_path, monkeypatch):
    """tmp_path/project holding hv_batchnet.py, importable here; sys.path is restored afterwards."""
    folder = tmp_path / "project"
    folder.mkdir()
    (folder / f"{MODULE}.py").write_text(SOURCE)
    monkeypatch.setattr(sys, "path", [str(folder), *sys.path])  # hookviz also adds the cwd to sys.path
    monkeypatch.delitem(sys.modules, MODULE, raising=False)
    yield folder
    sys.modules.pop(MODULE, None)


def write_image(path: Path, seed: int, size: tuple[int, int] = (64, 48)) -> Path:
    """Seeded noise with a flat blob, so predictions and maps differ from image to image."""
    rng = np.random.default_rng(seed)
    width, height = size
    pixels = rng.uniform(0, 255, (height, width, 3))
    cy, cx = rng.integers(0, height), rng.integers(0, width)
    yy, xx = np.mgrid[:height, :width]
    pixels[(yy - cy) ** 2 + (xx - cx) ** 2 < (min(size) // 3) ** 2] = rng.uniform(0, 255, 3)
    path.parent.mkdir(parents=True, exist_ok=True)
    options = {"format": "JPEG", "quality": 90} if path.suffix == ".jpg" else {"format": "PNG"}
    Image.fromarray(pixels.astype(np.uint8)).save(path, **options)  # a format: PIL reads no suffix in "...png"
    return path


def image_folder(folder: Path, count: int, seed: int = 0) -> list[Path]:
    """``count`` PNGs img00.png, img01.png, ... in ``folder``: the order hookviz lists the folder in."""
    return [write_image(folder / f"img{i:02d}.png", seed + i) for i in range(count)]


def write_broken(folder: Path) -> dict[str, Path]:
    """Three files with image suffixes that do not decode: zero bytes, text, a JPEG cut in half."""
    folder.mkdir(parents=True, exist_ok=True)
    whole = write_image(folder.parent / "whole.jpg", seed=99, size=(256, 192))
    data = whole.read_bytes()
    whole.unlink()
    broken = {"empty": folder / "empty.png", "text": folder / "text.jpg", "truncated": folder / "truncated.jpg"}
    broken["empty"].write_bytes(b"")
    broken["text"].write_text("this is not a JPEG, just text\n")
    broken["truncated"].write_bytes(data[: len(data) // 2])
    return broken


def read_manifest(out: Path) -> list[dict]:
    """DIR/manifest.jsonl as a list: asserts it is valid JSON Lines (whole lines only, each an object)."""
    text = (out / "manifest.jsonl").read_text(encoding="utf-8")
    assert text.endswith("\n"), "the manifest ends in a half-written line"
    entries = [json.loads(line) for line in text.splitlines()]
    assert all(isinstance(entry, dict) and entry.get("type") in ("run", "input") for entry in entries)
    return entries


def inputs_of(entries: list[dict]) -> list[dict]:
    return [entry for entry in entries if entry["type"] == "input"]


def assert_no_partial_files(out: Path) -> None:
    """No temporary file is left and every PNG under ``out`` is complete."""
    assert sorted(out.rglob("*.tmp")) == []
    assert_pngs_complete(out)


def assert_pngs_complete(out: Path) -> None:
    for png in out.rglob("*.png"):
        with Image.open(png) as image:
            image.verify()  # raises on a truncated or corrupt file


def mtimes(paths) -> dict[str, int]:
    return {str(path): os.stat(path).st_mtime_ns for path in paths}


def pngs_of(records: list[dict]) -> list[str]:
    return [output["png"] for record in records for output in record["outputs"]]


# --- subprocess helpers --------------------------------------------------------------------------


def hookviz_command() -> list[str]:
    """The installed ``hookviz`` script of this venv (``python -m hookviz`` where there is none)."""
    script = Path(sys.executable).with_name("hookviz")
    return [str(script)] if script.exists() else [sys.executable, "-m", "hookviz"]


def subprocess_env(project: Path, delay: float = 0.0) -> dict[str, str]:
    path = os.pathsep.join(filter(None, [str(project), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1", "HV_BATCHNET_DELAY": str(delay)}


@contextmanager
def running(project: Path, args: list, delay: float, log: Path) -> Iterator[subprocess.Popen]:
    """``hookviz ARGS`` running in its own process group (stdout to log.out, stderr to log.err);
    the group is killed on the way out if it is still running."""
    with open(log.with_suffix(".out"), "wb") as stdout, open(log.with_suffix(".err"), "wb") as stderr:
        process = subprocess.Popen([*hookviz_command(), *map(str, args)], cwd=project,
                                   env=subprocess_env(project, delay), stdin=subprocess.DEVNULL, stdout=stdout,
                                   stderr=stderr, start_new_session=True)
    try:
        yield process
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def wait_for_records(process: subprocess.Popen, out: Path, count: int, timeout: float = 60) -> None:
    """Poll DIR/manifest.jsonl until it has ``count`` input records (the run is under way)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, "the run finished before it could be stopped mid-way"
        manifest = out / "manifest.jsonl"
        if manifest.exists():
            lines = manifest.read_text(encoding="utf-8").splitlines(keepends=True)
            if sum(line.endswith("\n") and json.loads(line)["type"] == "input" for line in lines) >= count:
                return
        time.sleep(0.02)
    raise AssertionError(f"no {count} records in {out / 'manifest.jsonl'} after {timeout} s")


def stop(process: subprocess.Popen, sig: int) -> int:
    """Send ``sig`` to the run's process group (as a terminal's Ctrl-C does) and return its exit status."""
    os.killpg(process.pid, sig)
    return process.wait(timeout=60)


# --- 1. the manifest -----------------------------------------------------------------------------


def test_manifest_has_a_header_per_run_and_a_record_per_input(project):
    """manifest.jsonl: one `run` header (versions, model, command, settings, key, shard, inputs), then one
    `input` record per input equal to the --json line; a second run appends a second header."""
    images = image_folder(project / "photos", 3)
    out = project / "out"

    first = hookviz(*GRADCAM, project / "photos", "--json", "-o", out)
    assert first.exit_code == 0, first.stderr
    entries = read_manifest(out)

    header, *records = entries
    assert header["type"] == "run" and len(records) == 3
    assert {key: header[key] for key in ("hookviz", "torch", "torchvision")} == {
        package: metadata.version(package) for package in ("hookviz", "torch", "torchvision")}
    assert header["command"] == "gradcam" and header["model"] == MODEL
    assert header["settings"]["method"] == "gradcam" and header["settings"]["layer"] == "relu2"
    assert re.fullmatch(r"[0-9a-f]{16}", header["key"])
    assert header["shard"] is None and header["inputs"] == 3 and header["skipped"] == 0
    stdout_records = json_lines(first.stdout)
    assert records == [{"type": "input", "run": header["run"], **record} for record in stdout_records]
    assert [record["input"] for record in records] == [str(path) for path in images]

    second = hookviz(*GRADCAM, project / "photos", "--json", "--overwrite", "-o", out)
    assert second.exit_code == 0, second.stderr
    entries = read_manifest(out)
    headers = [entry for entry in entries if entry["type"] == "run"]
    assert len(entries) == 8 and [entries.index(h) for h in headers] == [0, 4]
    assert headers[0]["run"] != headers[1]["run"] and headers[0]["key"] == headers[1]["key"]
    assert [entry["run"] for entry in entries[5:]] == [headers[1]["run"]] * 3


def test_manifest_key_changes_with_the_options_that_decide_the_outputs(project):
    """A different method gives a different key (so --skip-existing never mistakes one run for another);
    the batch size does not."""
    image_folder(project / "photos", 2)
    out = project / "out"
    for extra in (["--batch-size", "1"], ["--batch-size", "2", "--overwrite"], ["-m", "gradcam++"]):
        assert hookviz(*GRADCAM, project / "photos", *extra, "-q", "-o", out).exit_code == 0
    keys = [entry["key"] for entry in read_manifest(out) if entry["type"] == "run"]
    assert keys[0] == keys[1] != keys[2]


def _append_many(directory: str, writer: int, count: int) -> None:
    manifest = Manifest(Path(directory))
    for i in range(count):
        manifest.append({"type": "input", "run": f"w{writer}", "input": f"{i}", "padding": "x" * 8000})


def test_manifest_appends_from_parallel_processes_stay_whole_lines(tmp_path):
    """Shards running at the same time share DIR/manifest.jsonl: their lines never interleave."""
    import multiprocessing

    context = multiprocessing.get_context("fork")
    writers = [context.Process(target=_append_many, args=(str(tmp_path), w, 150)) for w in range(3)]
    for process in writers:
        process.start()
    for process in writers:
        process.join(timeout=60)
        assert process.exitcode == 0

    entries = read_manifest(tmp_path)
    assert Counter(entry["run"] for entry in entries) == {"w0": 150, "w1": 150, "w2": 150}
    for w in range(3):
        assert [entry["input"] for entry in entries if entry["run"] == f"w{w}"] == [str(i) for i in range(150)]


# --- 2. stdout carries only results --------------------------------------------------------------


def test_json_stdout_is_one_line_per_input_in_input_order(project):
    """With --json, stdout is exactly N JSON objects in input order; messages go to stderr."""
    images = image_folder(project / "photos", 5)

    result = hookviz(*GRADCAM, project / "photos", "--json", "-o", project / "out")

    assert result.exit_code == 0, result.stderr
    records = json_lines(result.stdout)
    assert [record["input"] for record in records] == [str(path) for path in images]
    assert all(record["status"] == "ok" for record in records)
    assert "hookviz: model:" in result.stderr and "5 ok, 0 failed, 0 skipped" in result.stderr


def test_without_json_stdout_is_only_png_paths(project):
    """Without --json, stdout holds one PNG path per line and nothing else."""
    image_folder(project / "photos", 4)
    out = project / "out"

    result = hookviz(*GRADCAM, project / "photos", "-o", out)

    assert result.exit_code == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines == pngs_of(inputs_of(read_manifest(out)))
    assert len(lines) == 4 and all(line.endswith(".png") and Path(line).is_file() for line in lines)
    assert "hookviz: model:" in result.stderr and "4 ok" in result.stderr


def test_json_stdout_of_a_real_process_parses_line_by_line(project):
    """`hookviz gradcam ... --json` as a real process: every stdout line is a JSON record, one per input,
    the summary is on stderr, and the manifest header records the argv."""
    images = image_folder(project / "photos", 4)
    args = [*GRADCAM, "photos", "--json", "-o", "out"]

    completed = subprocess.run([*hookviz_command(), *args], cwd=project, env=subprocess_env(project),
                               capture_output=True, text=True, timeout=120)

    assert completed.returncode == 0, completed.stderr
    records = json_lines(completed.stdout)
    assert [record["input"] for record in records] == [str(path.relative_to(project)) for path in images]
    assert all(record["status"] == "ok" and record["outputs"] for record in records)
    assert "4 ok, 0 failed, 0 skipped" in completed.stderr and "Traceback" not in completed.stderr
    assert "\r" not in completed.stderr and len(completed.stderr.splitlines()) == 2  # model and summary lines
    header = read_manifest(project / "out")[0]
    assert header["argv"] == args


# --- 3. broken images ----------------------------------------------------------------------------


def test_broken_images_get_error_records_and_the_rest_goes_on(project):
    """A folder with an empty, a text and a truncated "image": exit 1, one-line error records naming each
    bad file (stdout, manifest and stderr), outputs for every good image, no traceback."""
    folder = project / "photos"
    good = image_folder(folder, 3)
    broken = write_broken(folder)
    out = project / "out"

    result = hookviz(*GRADCAM, folder, "--json", "-o", out)

    assert result.exit_code == 1
    records = {record["input"]: record for record in json_lines(result.stdout)}
    assert set(records) == {str(path) for path in [*good, *broken.values()]}
    for path in good:
        assert records[str(path)]["status"] == "ok"
        assert all(Path(png).is_file() for png in pngs_of([records[str(path)]]))
    for path in broken.values():
        record = records[str(path)]
        assert record["status"] == "error" and record["outputs"] == []
        assert record["error"].startswith(str(path)) and "\n" not in record["error"]
        assert f"hookviz: error: {path}" in result.stderr
        assert not (out / path.stem).exists()
    manifest = {entry["input"]: entry for entry in inputs_of(read_manifest(out))}
    assert {key: manifest[key]["status"] for key in manifest} == {key: records[key]["status"] for key in records}
    assert "3 ok, 3 failed" in result.stderr


@pytest.mark.parametrize("workers", [0, 2])
def test_fail_fast_stops_at_the_first_failure(project, workers):
    """--fail-fast: the first broken input ends the run (exit 1), so there are fewer records than inputs."""
    folder = project / "photos"
    image_folder(folder, 4)  # img00..img03 sort after the broken empty.png
    write_broken(folder)
    out = project / "out"

    result = hookviz(*GRADCAM, folder, "--json", "--fail-fast", "--workers", workers, "--batch-size", "2", "-o", out)

    assert result.exit_code == 1
    records = json_lines(result.stdout)
    assert [record["status"] for record in records] == ["error"]
    assert records[0]["input"] == str(folder / "empty.png")
    assert "--fail-fast" in result.stderr
    assert inputs_of(read_manifest(out)) == [{"type": "input", "run": read_manifest(out)[0]["run"], **records[0]}]


# --- 4. overwrite protection ---------------------------------------------------------------------


@pytest.mark.parametrize("command", [GRADCAM, FMAPS, ["guided", MODEL, *SIZE, "-l", "relu2"]], ids=lambda c: c[0])
def test_second_run_refuses_to_overwrite_and_touches_nothing(project, command):
    """Running again into the same DIR is exit 2 naming an existing file and both flags; no file changes,
    and no header is appended for the refused run."""
    image_folder(project / "photos", 3)
    out = project / "out"
    first = hookviz(*command, project / "photos", "-o", out)
    assert first.exit_code == 0, first.stderr
    outputs = first.stdout.splitlines()
    before, manifest_before = mtimes(outputs), (out / "manifest.jsonl").read_bytes()

    again = hookviz(*command, project / "photos", "-o", out)

    assert again.exit_code == 2 and again.stdout == ""
    named = re.search(r"hookviz: error: (\S+) already exists", again.stderr)
    assert named and named.group(1) in outputs
    assert "--overwrite" in again.stderr and "--skip-existing" in again.stderr
    assert mtimes(outputs) == before
    assert (out / "manifest.jsonl").read_bytes() == manifest_before


def test_overwrite_replaces_the_outputs(project):
    image_folder(project / "photos", 3)
    out = project / "out"
    outputs = hookviz(*GRADCAM, project / "photos", "-o", out).stdout.splitlines()
    inodes = {png: os.stat(png).st_ino for png in outputs}

    result = hookviz(*GRADCAM, project / "photos", "--overwrite", "-o", out)

    assert result.exit_code == 0, result.stderr
    assert result.stdout.splitlines() == outputs
    assert all(os.stat(png).st_ino != inodes[png] for png in outputs)  # written anew (atomically, by rename)
    assert_no_partial_files(out)


def test_skip_existing_with_overwrite_is_a_usage_error(project):
    image_folder(project / "photos", 1)

    result = hookviz(*GRADCAM, project / "photos", "--skip-existing", "--overwrite", "-o", project / "out")

    assert result.exit_code == 2 and result.stdout == ""
    assert "--skip-existing" in result.stderr and "--overwrite" in result.stderr


# --- 5. resuming a killed run --------------------------------------------------------------------


def test_resume_after_sigkill_with_skip_existing(project, monkeypatch):
    """A run killed with SIGKILL mid-way leaves a valid manifest and only complete PNGs; rerun with
    --skip-existing, it skips what the manifest records as done (files untouched) and does the rest."""
    images = image_folder(project / "photos", 40)
    out = project / "out"
    args = [*FMAPS, "photos", "--batch-size", "2", "--json", "-q", "-o", "out"]

    with running(project, args, delay=0.08, log=project / "killed") as process:
        wait_for_records(process, out, count=4)
        assert stop(process, signal.SIGKILL) == -signal.SIGKILL

    done = [entry for entry in inputs_of(read_manifest(out)) if entry["status"] == "ok"]
    assert 4 <= len(done) < len(images)
    assert_pngs_complete(out)  # written by rename: a killed run leaves no half-written PNG
    # A SIGKILL can land while the writer thread encodes a PNG; all it may leave is that PNG's hidden temp file.
    for leftover in out.rglob("*.tmp"):
        assert re.fullmatch(r"\.fmap_conv2\.png\..+\.tmp", leftover.name), leftover
    done_pngs = mtimes(project / png for png in pngs_of(done))

    monkeypatch.chdir(project)  # the same relative paths as the killed run
    rerun = hookviz(*FMAPS, "photos", "--batch-size", "2", "--skip-existing", "--json", "-o", "out")

    assert rerun.exit_code == 0, rerun.stderr
    records = json_lines(rerun.stdout)
    assert [record["input"] for record in records] == [str(path.relative_to(project)) for path in images]
    skipped = {record["input"] for record in records if record["status"] == "skipped"}
    assert skipped == {entry["input"] for entry in done}
    assert all(record["status"] == "ok" for record in records if record["input"] not in skipped)
    assert mtimes(project / png for png in pngs_of(done)) == done_pngs
    for path in images:
        assert (out / path.stem / "fmap_conv2.png").is_file()
    assert_pngs_complete(out)
    header = read_manifest(out)[-len(images) - 1]
    assert header["type"] == "run" and header["skipped"] == len(done)


def test_resume_removes_temp_files_a_killed_run_left(project, monkeypatch):
    """What write_png leaves when SIGKILL lands between creating its temp file and renaming it
    (about every other kill in test_resume_after_sigkill_with_skip_existing) is gone once the run is resumed."""
    image_folder(project / "photos", 3)
    monkeypatch.chdir(project)
    assert hookviz(*FMAPS, "photos", "-q", "-o", "out").exit_code == 0
    leftover = project / "out" / "img01" / ".fmap_conv2.png.k1ll3d0x.tmp"
    leftover.write_bytes(b"\x89PNG\r\n\x1a\n half an image")

    result = hookviz(*FMAPS, "photos", "--skip-existing", "-q", "-o", "out")

    assert result.exit_code == 0, result.stderr
    assert sorted((project / "out").rglob("*.tmp")) == []


def test_skip_existing_redoes_failed_and_missing_inputs_only(project):
    """--skip-existing skips inputs recorded ok whose files still exist; an input that failed, or whose output
    was deleted, runs again; once everything is done, another resume only skips."""
    folder = project / "photos"
    image_folder(folder, 4)
    (folder / "img04.png").write_bytes(b"")
    out = project / "out"
    first = json_lines(hookviz(*GRADCAM, folder, "--json", "-q", "-o", out).stdout)
    assert [record["status"] for record in first] == ["ok"] * 4 + ["error"]
    write_image(folder / "img04.png", seed=4)  # the broken file is fixed
    Path(first[1]["outputs"][0]["png"]).unlink()  # and one output is lost
    untouched = mtimes(pngs_of([first[0], first[2], first[3]]))

    resumed = hookviz(*GRADCAM, folder, "--skip-existing", "--json", "-q", "-o", out)

    assert resumed.exit_code == 0, resumed.stderr
    records = json_lines(resumed.stdout)
    assert [record["status"] for record in records] == ["skipped", "ok", "skipped", "skipped", "ok"]
    assert records[0] == {**first[0], "status": "skipped"}
    assert mtimes(untouched) == untouched
    assert all(Path(png).is_file() for png in pngs_of(records))

    again = hookviz(*GRADCAM, folder, "--skip-existing", "--json", "-o", out)
    assert again.exit_code == 0, again.stderr
    assert [record["status"] for record in json_lines(again.stdout)] == ["skipped"] * 5
    assert "0 ok, 0 failed, 5 skipped" in again.stderr
    assert [entry["skipped"] for entry in read_manifest(out) if entry["type"] == "run"] == [0, 3, 5]


def test_skip_existing_does_not_skip_a_run_with_other_options(project):
    """Outputs made with another method are not "done" for this one."""
    image_folder(project / "photos", 2)
    out = project / "out"
    assert hookviz(*GRADCAM, project / "photos", "-q", "-o", out).exit_code == 0

    result = hookviz(*GRADCAM, project / "photos", "-m", "layercam", "--skip-existing", "--json", "-q", "-o", out)

    assert result.exit_code == 0, result.stderr
    records = json_lines(result.stdout)
    assert [record["status"] for record in records] == ["ok", "ok"]
    assert all(output["method"] == "layercam" for record in records for output in record["outputs"])


# --- 6. Ctrl-C -----------------------------------------------------------------------------------


def test_ctrl_c_exits_130_without_a_traceback(project):
    """SIGINT to a running `hookviz gradcam` (to its process group, as a terminal's Ctrl-C does): exit 130,
    `hookviz: interrupted` on stderr, no traceback, a valid manifest, no temp files, complete PNGs.

    --workers 0: with decoding workers a traceback can appear, see the test below."""
    image_folder(project / "photos", 40)
    out = project / "out"
    args = [*GRADCAM, "photos", "--batch-size", "2", "--workers", "0", "--json", "-o", "out"]

    with running(project, args, delay=0.08, log=project / "interrupted") as process:
        wait_for_records(process, out, count=3)
        status = stop(process, signal.SIGINT)

    stderr = (project / "interrupted.err").read_text()
    assert status == 130, stderr
    assert stderr.splitlines()[-1] == "hookviz: interrupted"
    assert "Traceback" not in stderr
    recorded = inputs_of(read_manifest(out))
    assert 3 <= len(recorded) < 40
    assert json_lines((project / "interrupted.out").read_text()) == [
        {key: value for key, value in entry.items() if key not in ("type", "run")} for entry in recorded]
    assert_no_partial_files(out)


# Ctrl-C at one precise moment: while the main process receives a decoded image from a DataLoader worker.
# Tensors would travel as file descriptors over a connection to the worker's multiprocessing resource_sharer
# thread, which printed a traceback when Ctrl-C cut the hand-over (seen about 1 run in 10 with --workers 1);
# hookviz sends arrays by value instead, and the script counts the file-descriptor hand-overs.
CTRL_C_WHILE_RECEIVING = textwrap.dedent(
    """
    import multiprocessing.connection as connection
    import os
    import sys

    from torch.utils.data import dataloader

    MAIN, calls, try_get_data = os.getpid(), 0, dataloader._MultiProcessingDataLoaderIter._try_get_data
    fd_transfers = 0
    answer_challenge = connection.answer_challenge

    def counting_answer_challenge(*args, **kwargs):  # used when a tensor travels as a file descriptor
        global fd_transfers
        fd_transfers += 1
        return answer_challenge(*args, **kwargs)

    def ctrl_c_while_receiving(self, *args, **kwargs):
        global calls
        calls += 1
        if calls == 4:
            print(f"fd transfers before Ctrl-C: {fd_transfers}", file=sys.stderr)
            raise KeyboardInterrupt
        return try_get_data(self, *args, **kwargs)

    connection.answer_challenge = counting_answer_challenge
    dataloader._MultiProcessingDataLoaderIter._try_get_data = ctrl_c_while_receiving
    sys.argv = ["hookviz", *sys.argv[1:]]
    from hookviz.cli import main
    main()
    """
)


def test_ctrl_c_with_decoding_workers_prints_no_traceback(project):
    image_folder(project / "photos", 20)
    (project / "ctrl_c.py").write_text(CTRL_C_WHILE_RECEIVING)

    completed = subprocess.run([sys.executable, "ctrl_c.py", *GRADCAM, "photos", "--batch-size", "2", "--workers", "1",
                                "--json", "-o", "out"], cwd=project, env=subprocess_env(project),
                               capture_output=True, text=True, timeout=120)

    assert completed.returncode == 130, completed.stderr
    assert "hookviz: interrupted" in completed.stderr
    assert "Traceback" not in completed.stderr, completed.stderr
    # Decoded images come back by value: no file-descriptor hand-over that Ctrl-C could cut in half.
    assert "fd transfers before Ctrl-C: 0" in completed.stderr


def test_keyboard_interrupt_in_the_library_leaves_the_model_clean(project, tmp_path):
    """Ctrl-C during the 3rd batch (raised inside the model's forward pass) propagates out of iterating
    `plan_batch(...).records`; no hook stays on the model, the writer thread is gone, and the manifest
    records exactly the inputs whose records were handed out."""
    images = image_folder(project / "photos", 10)
    loaded = load_model(MODEL, size=(32, 32), device="cpu")
    loaded.module.interrupt_on_call = 3
    job = CamJob(loaded, CamOptions(out_dir=tmp_path / "out", layer="relu2"))
    run = plan_batch(images, loaded, job, BatchOptions(out_dir=tmp_path / "out", batch_size=2))

    finished = []
    with pytest.raises(KeyboardInterrupt):
        for record in run.records:
            finished.append(record)

    assert loaded.module.calls == 3 and len(finished) <= 4
    for name, module in loaded.module.named_modules():
        assert not module._forward_hooks and not module._forward_pre_hooks, f"hook left on {name or 'the model'}"
        assert not module._backward_hooks
    assert torch.is_grad_enabled()
    assert not [thread.name for thread in threading.enumerate() if thread.name.startswith("hookviz-writer")]
    header, *recorded = read_manifest(tmp_path / "out")
    assert header["inputs"] == 10
    assert recorded == [{"type": "input", "run": header["run"], **record.as_json()} for record in finished]
    assert_no_partial_files(tmp_path / "out")


# --- 7. shards -----------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 3, 4])
def test_shards_cover_every_input_once_whatever_the_order(n):
    """shard_of: shards 1..N together hold each input exactly once, and the same inputs when the list
    is given in another order (each shard keeps the order it was given)."""
    paths = [Path(f"photos/{name}.jpg") for name in ("zebra", "ant", "cat", "dog", "eel", "fox", "gnu", "hen",
                                                      "ibis", "jay", "kiwi")]
    shards = [shard_of(paths, k, n) for k in range(1, n + 1)]
    assert Counter(path for shard in shards for path in shard) == Counter(paths)
    assert all(shard == [path for path in paths if path in shard] for shard in shards)
    for k, shard in enumerate(shards, start=1):
        assert set(shard_of(paths[::-1], k, n)) == set(shard)
        assert set(shard_of(sorted(paths, key=lambda p: p.name[::-1]), k, n)) == set(shard)
    sizes = [len(shard) for shard in shards]
    assert max(sizes) - min(sizes) <= 1


@pytest.mark.parametrize("n", [1, 3, 4])
def test_cli_shards_cover_a_folder_exactly_once(project, n):
    """`--shard K/N` for K = 1..N into the same DIR: every input of the folder appears in exactly one shard's
    --json output, and the manifest holds one header per shard."""
    images = image_folder(project / "photos", 10)
    out = project / "out"

    seen = []
    for k in range(1, n + 1):
        result = hookviz(*GRADCAM, project / "photos", "--shard", f"{k}/{n}", "--json", "-q", "-o", out)
        assert result.exit_code == 0, result.stderr
        seen.append([record["input"] for record in json_lines(result.stdout)])

    assert Counter(path for shard in seen for path in shard) == Counter(str(path) for path in images)
    headers = [entry for entry in read_manifest(out) if entry["type"] == "run"]
    assert [header["shard"] for header in headers] == [f"{k}/{n}" for k in range(1, n + 1)]
    assert [header["inputs"] for header in headers] == [len(shard) for shard in seen]


def test_cli_shard_does_not_depend_on_the_order_of_the_inputs(project):
    images = [str(path) for path in image_folder(project / "photos", 10)]

    def shard_inputs(paths: list[str], k: int, out: str) -> list[str]:
        result = hookviz(*GRADCAM, *paths, "--shard", f"{k}/3", "--json", "-q", "-o", project / out)
        assert result.exit_code == 0, result.stderr
        return [record["input"] for record in json_lines(result.stdout)]

    for k in (1, 2, 3):
        forward, backward = shard_inputs(images, k, "forward"), shard_inputs(images[::-1], k, "backward")
        assert backward == forward[::-1]  # the same inputs, in the order given


@pytest.mark.parametrize("value", ["0/4", "5/4", "x", "1/0", "2"])
def test_bad_shard_is_a_usage_error(project, value):
    image_folder(project / "photos", 2)

    result = hookviz(*GRADCAM, project / "photos", "--shard", value, "-o", project / "out")

    assert result.exit_code == 2 and result.stdout == ""
    assert f"--shard {value!r}" in result.stderr
    assert not (project / "out" / "manifest.jsonl").exists()
    if value == "0/4":
        assert "from 1" in result.stderr


def test_parse_shard():
    assert parse_shard("2/8") == (2, 8) and parse_shard("1/1") == (1, 1)
    with pytest.raises(UsageError, match="K/N"):
        parse_shard("2-8")


def test_shards_name_outputs_like_an_unsharded_run(project):
    """Two inputs with the same stem in different folders get distinct directories, and two shards writing
    to the same DIR name every input's directory exactly as one unsharded run does."""
    folder = project / "photos"
    for i, name in enumerate(["a/cat.png", "b/cat.png", "dog.png", "eel.png", "fox.png"]):
        write_image(folder / name, seed=i)

    def directories(*extra: str, out: str) -> dict[str, str]:
        result = hookviz(*GRADCAM, folder, *extra, "--json", "-q", "-o", project / out)
        assert result.exit_code == 0, result.stderr
        return {record["input"]: str(Path(png).parent.relative_to(project / out))
                for record in json_lines(result.stdout) for png in pngs_of([record])}

    unsharded = directories(out="whole")
    sharded = {**directories("--shard", "1/2", out="sharded"), **directories("--shard", "2/2", out="sharded")}

    assert sharded == unsharded and len(unsharded) == 5
    assert len(set(unsharded.values())) == 5
    assert unsharded[str(folder / "dog.png")] == "dog"
    assert unsharded[str(folder / "a/cat.png")] != unsharded[str(folder / "b/cat.png")]
    assert all(name.startswith("cat-") for key, name in unsharded.items() if key.endswith("cat.png"))
    assert len(inputs_of(read_manifest(project / "sharded"))) == 5


# --- 8. decoding workers -------------------------------------------------------------------------


def test_workers_give_identical_records_and_pngs(project):
    """--workers 2 decodes in background processes; the PNG bytes and the records (a broken file's error
    record included, in its place) are the same as with --workers 0."""
    folder = project / "photos"
    image_folder(folder, 6)
    (folder / "img02b.jpg").write_text("not an image")  # sorts between img02.png and img03.png

    def run(workers: int) -> tuple[list[dict], dict[str, bytes]]:
        out = project / f"w{workers}"
        result = hookviz(*GRADCAM, folder, "--workers", workers, "--batch-size", "3", "--json", "-q", "-o", out)
        assert result.exit_code == 1, result.stderr
        records = json.loads(json.dumps(json_lines(result.stdout)).replace(str(out), "DIR"))
        return records, {str(png.relative_to(out)): png.read_bytes() for png in sorted(out.rglob("*.png"))}

    serial, in_workers = run(0), run(2)

    assert in_workers[0] == serial[0]
    assert [record["status"] for record in serial[0]] == ["ok"] * 3 + ["error"] + ["ok"] * 3
    assert serial[0][3]["input"] == str(folder / "img02b.jpg")
    assert len(in_workers[1]) == 6 and in_workers[1] == serial[1]


# --- 9. the progress bar -------------------------------------------------------------------------


def run_with_stderr(project: Path, args: list, terminal: bool) -> tuple[int, str, str]:
    """Run ``hookviz ARGS`` with stderr on a pseudo-terminal (or a pipe): (exit code, stdout, stderr)."""
    command = [*hookviz_command(), *map(str, args)]
    if not terminal:
        completed = subprocess.run(command, cwd=project, env=subprocess_env(project), capture_output=True,
                                   text=True, timeout=120)
        return completed.returncode, completed.stdout, completed.stderr
    master, slave = pty.openpty()
    process = subprocess.Popen(command, cwd=project, env=subprocess_env(project), stdin=subprocess.DEVNULL,
                               stdout=subprocess.PIPE, stderr=slave)
    os.close(slave)
    chunks, deadline = [], time.monotonic() + 120
    try:
        while time.monotonic() < deadline:
            if not select.select([master], [], [], 1)[0]:
                continue
            try:
                data = os.read(master, 4096)
            except OSError:  # EIO: the process closed its end of the terminal
                break
            if not data:
                break
            chunks.append(data)
    finally:
        os.close(master)
        if process.poll() is None and time.monotonic() >= deadline:
            process.kill()
    stdout = process.stdout.read().decode()
    process.stdout.close()
    return process.wait(timeout=60), stdout, b"".join(chunks).decode(errors="replace")


@pytest.mark.parametrize("stderr_kind", ["terminal", "terminal -q", "pipe"])
def test_progress_bar_only_on_a_terminal(project, stderr_kind):
    """A progress bar (position, images/s) is drawn when stderr is a terminal, not with -q, not on a pipe;
    stdout keeps only the PNG paths either way."""
    image_folder(project / "photos", 10)
    quiet = ["-q"] if stderr_kind.endswith("-q") else []

    code, stdout, stderr = run_with_stderr(project, [*GRADCAM, "photos", "--batch-size", "2", *quiet, "-o", "out"],
                                           terminal=stderr_kind.startswith("terminal"))

    assert code == 0, stderr
    assert len(stdout.splitlines()) == 10 and all(line.endswith(".png") for line in stdout.splitlines())
    assert "Traceback" not in stderr
    bar = re.search(r"hookviz\s+\[[#-]+\]\s+10/10", stderr)
    if stderr_kind == "terminal":
        assert bar and "images/s" in stderr[bar.end():].split("\n")[0], stderr
        assert "10 ok, 0 failed" in stderr
    elif stderr_kind == "terminal -q":
        assert stderr == ""
    else:
        assert not bar and "\r" not in stderr and "/10" not in stderr
        lines = stderr.splitlines()
        assert len(lines) == 2 and lines[0].startswith("hookviz: model:")
        assert lines[1].startswith("hookviz: 10 ok, 0 failed, 0 skipped") and "images/s)" in lines[1]


# --- 10. -v --------------------------------------------------------------------------------------


def test_verbose_prints_a_line_per_input_and_the_timings(project):
    images = image_folder(project / "photos", 3)

    result = hookviz(*GRADCAM, project / "photos", "-v", "-o", project / "out")

    assert result.exit_code == 0, result.stderr
    per_input = [line for line in result.stderr.splitlines() if re.match(r"hookviz: \[\d+/3\] ", line)]
    assert per_input == [f"hookviz: [{i}/3] {path}: ok, 1 output(s)" for i, path in enumerate(images, start=1)]
    assert re.search(r"^hookviz: time: model [\d.]+ s", result.stderr, re.MULTILINE)
    assert len(result.stdout.splitlines()) == 3


# --- 11. output paths stay inside DIR ------------------------------------------------------------


def tree(folder: Path, skip: Path) -> set[Path]:
    return {path for path in folder.rglob("*") if skip not in path.parents and path != skip}


def test_odd_file_names_write_only_inside_the_output_directory(project):
    """Names with leading dots, spaces, `!`, a leading `-`, backslashes and non-ASCII letters all get a
    directory of their own inside DIR, and nothing is written anywhere else."""
    odd = project / "odd"
    names = ["-x.png", "café ñ 猫.png", "x\\..\\..\\evil.png", "a b (1).png"]
    images = [write_image(odd / name, seed=i) for i, name in enumerate(names)]
    # A folder listing skips hidden files, so names with leading dots are given one by one.
    explicit = [write_image(project / name, seed=10 + i)
                for i, name in enumerate(["..weird name!.png", "...png", "..\\..\\evil.png"])]
    out = project / "out"
    before = tree(project, out)

    result = hookviz(*GRADCAM, odd, *explicit, "--json", "-q", "-o", out)

    assert result.exit_code == 0, result.stderr
    records = json_lines(result.stdout)
    assert [record["input"] for record in records] == [str(path) for path in sorted(images) + explicit]
    pngs = [Path(png).resolve() for png in pngs_of(records)]
    assert len(set(path.parent for path in pngs)) == 7
    assert all(png.is_file() and png.parent.parent == out.resolve() for png in pngs)
    assert all(not png.parent.name.startswith(".") and OUTPUT_NAME.match(png.name) for png in pngs)
    assert tree(project, out) == before


# --- 12. a .pt2 with a fixed batch size ----------------------------------------------------------


class FixedNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(6, 6, 3, padding=1)
        self.relu2 = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.relu2(self.conv2(self.relu1(self.conv1(x))))).flatten(1))


@pytest.fixture(scope="module")
def fixed_batch_program(tmp_path_factory) -> tuple[Path, nn.Module]:
    """(a .pt2 exported with a static batch of 2 at 32x32, the eager model)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(7)
        model = FixedNet().eval()
    path = tmp_path_factory.mktemp("fixed") / "fixed2.pt2"
    torch.export.save(torch.export.export(model, (torch.randn(2, 3, 32, 32),)), path)
    return path, model


@pytest.mark.parametrize("command", [["gradcam", "-l", "relu2"], ["fmaps", "-l", "conv2"]])
def test_short_last_batch_on_a_fixed_batch_program(fixed_batch_program, tmp_path, command):
    """3 images through a .pt2 that only takes batches of 2: the last batch is padded, every image gets
    its own, correct result."""
    path, model = fixed_batch_program
    images = image_folder(tmp_path / "photos", 3)

    result = hookviz(command[0], path, *images, *command[1:], "--json", "-o", tmp_path / "out")

    assert result.exit_code == 0, result.stderr
    assert "fixed batch size 2" in result.stderr
    records = json_lines(result.stdout)
    assert [(record["input"], record["status"]) for record in records] == [(str(p), "ok") for p in images]
    assert all(Path(png).is_file() for png in pngs_of(records))
    if command[0] == "gradcam":
        loaded = load_model(str(path), device="cpu")
        for image, record in zip(images, records):
            with torch.no_grad():
                probabilities = model(prepare_image(image, "x", loaded.preprocessing, crop=False).tensor[None])[0]
            probabilities = probabilities.softmax(0)
            assert [p["class"] for p in record["predictions"]] == probabilities.argsort(descending=True).tolist()
            assert [p["score"] for p in record["predictions"]] == pytest.approx(
                probabilities.sort(descending=True).values.tolist(), abs=2e-6)


def test_scorecam_on_a_fixed_batch_program(fixed_batch_program, tmp_path):
    path, _ = fixed_batch_program
    images = image_folder(tmp_path / "photos", 3)

    result = hookviz("gradcam", path, *images, "-l", "relu2", "-m", "scorecam", "--json", "-o", tmp_path / "out")

    assert result.exit_code == 0, result.stderr
    assert [record["status"] for record in json_lines(result.stdout)] == ["ok"] * 3
