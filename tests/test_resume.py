"""Resuming: a run killed with SIGKILL leaves a valid manifest and complete PNGs, and --skip-existing finishes it,
redoing only what failed or is missing.

The killed run is the installed ``hookviz`` script (tests/process_helpers.py), made to hang after
a number of batches so that it is certainly still running when it is killed.

    hookviz gradcam nets:build_batchnet photos/ --size 32 -l relu2 --json -o OUT
"""

from __future__ import annotations

import re
import signal
from pathlib import Path

from cli_helpers import (
    FMAPS,
    GRADCAM,
    assert_pngs_complete,
    hookviz,
    image_folder,
    inputs_of,
    json_lines,
    mtimes,
    pngs_of,
    read_manifest,
    write_noise_image,
)
from process_helpers import running, stop, wait_for_records


def test_resume_after_sigkill_with_skip_existing(project, monkeypatch):
    """A run killed with SIGKILL mid-way leaves a valid manifest and only complete PNGs; rerun with
    --skip-existing, it skips what the manifest records as done (files untouched) and does the rest."""
    images = image_folder(project / "photos", 40)
    out = project / "out"
    args = [*FMAPS, "photos", "--batch-size", "2", "--json", "-q", "-o", "out"]

    # 40 inputs in batches of 2 are 20 forward passes, and the 11th never returns: when the run is killed it has
    # recorded 16 to 20 inputs and is certainly not finished, on a fast machine as on a busy one.
    with running(project, args, log=project / "killed", hang_after=10) as process:
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
    (as it can in test_resume_after_sigkill_with_skip_existing) is gone once the run is resumed."""
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
    write_noise_image(folder / "img04.png", seed=4)  # the broken file is fixed
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
