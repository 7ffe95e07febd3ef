"""What a batch run prints: results only on stdout (PNG paths, or --json records), messages on stderr,
a progress bar only on a terminal, and a line per input with -v.

The real-process tests run the installed ``hookviz`` script (tests/process_helpers.py), because a
terminal on stderr cannot be faked in-process.

    hookviz gradcam nets:build_batchnet photos/ --size 32 -l relu2 --json -o OUT
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
from cli_helpers import GRADCAM, hookviz, image_folder, inputs_of, json_lines, pngs_of, read_manifest
from process_helpers import hookviz_command, run_with_stderr, subprocess_env

# --- stdout carries only results ------------------------------------------------------------------


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

    completed = subprocess.run(
        [*hookviz_command(), *args], cwd=project, env=subprocess_env(), capture_output=True, text=True, timeout=120
    )

    assert completed.returncode == 0, completed.stderr
    records = json_lines(completed.stdout)
    assert [record["input"] for record in records] == [str(path.relative_to(project)) for path in images]
    assert all(record["status"] == "ok" and record["outputs"] for record in records)
    assert "4 ok, 0 failed, 0 skipped" in completed.stderr and "Traceback" not in completed.stderr
    assert "\r" not in completed.stderr and len(completed.stderr.splitlines()) == 2  # model and summary lines
    header = read_manifest(project / "out")[0]
    assert header["argv"] == args


# --- the progress bar -----------------------------------------------------------------------------


@pytest.mark.parametrize("stderr_kind", ["terminal", "terminal -q", "pipe"])
def test_progress_bar_only_on_a_terminal(project, stderr_kind):
    """A progress bar (position, images/s) is drawn when stderr is a terminal, not with -q, not on a pipe;
    stdout keeps only the PNG paths either way."""
    image_folder(project / "photos", 10)
    quiet = ["-q"] if stderr_kind.endswith("-q") else []

    code, stdout, stderr = run_with_stderr(
        project,
        [*GRADCAM, "photos", "--batch-size", "2", *quiet, "-o", "out"],
        terminal=stderr_kind.startswith("terminal"),
    )

    assert code == 0, stderr
    assert len(stdout.splitlines()) == 10 and all(line.endswith(".png") for line in stdout.splitlines())
    assert "Traceback" not in stderr
    bar = re.search(r"hookviz\s+\[[#-]+\]\s+10/10", stderr)
    if stderr_kind == "terminal":
        assert bar and "images/s" in stderr[bar.end() :].split("\n")[0], stderr
        assert "10 ok, 0 failed" in stderr
    elif stderr_kind == "terminal -q":
        assert stderr == ""
    else:
        assert not bar and "\r" not in stderr and "/10" not in stderr
        lines = stderr.splitlines()
        assert len(lines) == 2 and lines[0].startswith("hookviz: model:")
        assert lines[1].startswith("hookviz: 10 ok, 0 failed, 0 skipped") and "images/s)" in lines[1]


# --- -v -------------------------------------------------------------------------------------------


def test_verbose_prints_a_line_per_input_and_the_timings(project):
    images = image_folder(project / "photos", 3)

    result = hookviz(*GRADCAM, project / "photos", "-v", "-o", project / "out")

    assert result.exit_code == 0, result.stderr
    per_input = [line for line in result.stderr.splitlines() if re.match(r"hookviz: \[\d+/3\] ", line)]
    assert per_input == [f"hookviz: [{i}/3] {path}: ok, 1 output(s)" for i, path in enumerate(images, start=1)]
    assert re.search(r"^hookviz: time: model [\d.]+ s", result.stderr, re.MULTILINE)
    assert len(result.stdout.splitlines()) == 3
