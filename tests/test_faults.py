"""Faults a hostile user or a busy cluster brings, each as it was reported, through real processes and real files.

Outputs that must not get mixed up (identity across runs, crafted names, concurrent runs, links in -o),
stopping (SIGTERM, SIGKILL of the parent, a double Ctrl-C, a FIFO), one line instead of a traceback
(file names that are not UTF-8, full disks, absurd options, NaN), and memory (--crop on long strips).

    hookviz gradcam nets:build_batchnet photos/ --size 32 -l relu2 --json -o OUT

A run to be stopped is made to hang after N forward passes (process_helpers); the first forward pass is the
probe that counts the model's outputs, and a batch's records are reported once the next batch has run, so N
leaves room for a few batches to be recorded.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from cli_helpers import (
    BATCHNET,
    GRADCAM,
    assert_no_partial_files,
    hookviz,
    image_folder,
    inputs_of,
    json_lines,
    pngs_of,
    read_manifest,
    write_noise_image,
)
from PIL import Image
from process_helpers import hookviz_command, running, stop, subprocess_env, wait_for_records


def strict_json_lines(text: str) -> list[dict]:
    """JSON Lines as a strict parser reads them: NaN and Infinity are errors."""

    def refuse(constant: str) -> None:
        raise AssertionError(f"{constant} in JSON output")

    return [json.loads(line, parse_constant=refuse) for line in text.splitlines()]


def run_process(cwd: Path, args: list, timeout: float = 300, **options) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*hookviz_command(), *map(str, args)],
        cwd=cwd,
        env=subprocess_env(),
        capture_output=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
        **options,
    )


def one_error_line(stderr: str) -> str:
    lines = stderr.splitlines()
    assert "Traceback" not in stderr and len(lines) == 1, stderr
    assert lines[0].startswith("hookviz: error: "), stderr
    return lines[0]


# --- outputs that get mixed up ---------------------------------------------------------------------------------


def test_skip_existing_never_overwrites_another_inputs_outputs(project):
    """x/pic.png in one run and y/pic.png in a later run share a stem: y gets a folder of its own, x's picture
    stays x's, and x resumed with --skip-existing is skipped with its own picture."""
    x = write_noise_image(project / "x" / "pic.png", seed=1)
    y = write_noise_image(project / "y" / "pic.png", seed=2)
    out = project / "out"

    first = hookviz(*GRADCAM, x, "--class", "1", "-o", out, "-q", "--json")
    x_png = Path(pngs_of(json_lines(first.stdout))[0])
    x_bytes = x_png.read_bytes()
    second = hookviz(*GRADCAM, y, "--class", "1", "-o", out, "-q", "--json", "--skip-existing")
    third = hookviz(*GRADCAM, x, "--class", "1", "-o", out, "-q", "--json", "--skip-existing")

    assert (first.exit_code, second.exit_code, third.exit_code) == (0, 0, 0), second.stderr + third.stderr
    y_png = Path(pngs_of(json_lines(second.stdout))[0])
    assert y_png.parent != x_png.parent and y_png.parent.parent == out
    assert x_png.read_bytes() == x_bytes
    (resumed,) = json_lines(third.stdout)
    assert resumed["status"] == "skipped" and resumed["outputs"][0]["png"] == str(x_png)


def test_resuming_with_an_absolute_path_recognises_the_same_input(project, monkeypatch):
    """The same file given as photos/img00.png and as /abs/.../photos/img00.png is one input."""
    image_folder(project / "photos", 2)
    monkeypatch.chdir(project)
    hookviz(*GRADCAM, "photos", "-o", "out", "-q")

    resumed = hookviz(*GRADCAM, project / "photos", "-o", "out", "-q", "--json", "--skip-existing")

    assert [record["status"] for record in json_lines(resumed.stdout)] == ["skipped", "skipped"]


def test_a_crafted_name_cannot_take_another_inputs_folder(project):
    """d1/cat.png and d2/cat.png get cat~<hash> folders; a file named like one of them still gets its own."""
    for folder, seed in (("d1", 1), ("d2", 2)):
        write_noise_image(project / "photos" / folder / "cat.png", seed=seed)
    first = hookviz(*GRADCAM, project / "photos", "-o", project / "probe", "-q", "--json")
    taken = [Path(png).parent.name for png in pngs_of(json_lines(first.stdout))]
    for name in taken:
        write_noise_image(project / "photos" / f"{name}.png", seed=3)

    result = hookviz(*GRADCAM, project / "photos", "-o", project / "out", "-q", "--json")

    assert result.exit_code == 0, result.stderr
    folders = [Path(png).parent for png in pngs_of(json_lines(result.stdout))]
    assert len(folders) == 4 and len(set(folders)) == 4


def test_a_second_run_on_the_same_outputs_is_refused_while_the_first_runs(project):
    """Two runs into one -o with other options (--cmap) would overwrite each other's PNGs: the second is refused
    with one line naming the first, which goes on and finishes its work untouched."""
    image_folder(project / "photos", 12)
    out = project / "out"
    with running(project, [*GRADCAM, "photos", "--batch-size", "2", "-o", "out"], log=project / "a", hang_after=6) as a:
        wait_for_records(a, out, count=2)
        second = run_process(project, [*GRADCAM, "photos", "--cmap", "gray", "-o", "out", "-q"])
        still_running = a.poll() is None
        status = stop(a, signal.SIGINT)

    line = one_error_line(second.stderr.decode())
    assert second.returncode == 2 and "another hookviz run is writing the same outputs" in line and "pid" in line
    assert still_running and status == 130
    assert_no_partial_files(out)


def test_shards_into_one_folder_run_side_by_side(project):
    """Shard 2/2 runs to the end while shard 1/2 is still running in the same -o."""
    image_folder(project / "photos", 8)
    out = project / "out"
    with running(
        project,
        [*GRADCAM, "photos", "--batch-size", "1", "--shard", "1/2", "-o", "out"],
        log=project / "a",
        hang_after=5,
    ) as first:
        wait_for_records(first, out, count=1)
        second = run_process(project, [*GRADCAM, "photos", "--shard", "2/2", "-o", "out", "-q"])
        stop(first, signal.SIGTERM)

    assert second.returncode == 0, second.stderr.decode()
    assert len([entry for entry in inputs_of(read_manifest(out)) if entry["status"] == "ok"]) >= 4 + 1


def test_a_killed_runs_claim_does_not_block_the_next_run(project):
    image_folder(project / "photos", 6)
    with running(project, [*GRADCAM, "photos", "--batch-size", "1", "-o", "out"], log=project / "a", hang_after=5) as a:
        wait_for_records(a, project / "out", count=1)
        stop(a, signal.SIGKILL)

    after = run_process(project, [*GRADCAM, "photos", "-o", "out", "-q", "--skip-existing"])

    assert after.returncode == 0, after.stderr.decode()


def test_links_inside_the_output_folder_are_not_followed(project):
    """A folder link DIR/<stem> -> elsewhere, and DIR/manifest.jsonl -> a victim file: refused, nothing written
    outside -o."""
    image = write_noise_image(project / "photos" / "im00.png", seed=0)
    elsewhere, victim = project / "elsewhere", project / "victim.txt"
    elsewhere.mkdir()
    victim.write_text("precious\n")
    out = project / "out"
    out.mkdir()
    (out / "im00").symlink_to(elsewhere)

    folder_link = hookviz(*GRADCAM, image, "-o", out, "-q")
    (out / "im00").unlink()
    (out / "manifest.jsonl").symlink_to(victim)
    manifest_link = hookviz(*GRADCAM, image, "-o", out, "-q")

    assert folder_link.exit_code == 2 and "symbolic link" in one_error_line(folder_link.stderr)
    assert manifest_link.exit_code == 2 and "symbolic link" in one_error_line(manifest_link.stderr)
    assert list(elsewhere.iterdir()) == [] and victim.read_text() == "precious\n"


# --- stopping ---------------------------------------------------------------------------------------------------


def test_sigterm_stops_like_ctrl_c(project):
    """SLURM, Kubernetes and `timeout` send SIGTERM: exit 143, 'hookviz: terminated', a valid manifest, no temporaries."""
    image_folder(project / "photos", 20)
    out = project / "out"
    with running(
        project, [*GRADCAM, "photos", "--batch-size", "2", "--json", "-o", "out"], log=project / "t", hang_after=6
    ) as process:
        wait_for_records(process, out, count=2)
        status = stop(process, signal.SIGTERM)

    stderr = (project / "t.err").read_text()
    assert status == 143, stderr
    assert stderr.splitlines()[-1] == "hookviz: terminated" and "Traceback" not in stderr
    recorded = inputs_of(read_manifest(out))
    assert json_lines((project / "t.out").read_text()) == [
        {key: value for key, value in entry.items() if key not in ("type", "run")} for entry in recorded
    ]
    assert_no_partial_files(out)


def children_of(pid: int) -> set[int]:
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.add(int(entry.name))
    return found


def alive(pid: int) -> bool:
    try:
        state = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads processes from /proc")
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_decoding_workers_die_with_their_parent(project, sig):
    """A parent killed with SIGKILL (or stopped with SIGTERM) leaves no decoding worker behind."""
    image_folder(project / "photos", 30)
    with running(
        project,
        [*GRADCAM, "photos", "--batch-size", "2", "--workers", "1", "-o", "out"],
        log=project / "w",
        hang_after=6,
    ) as process:
        wait_for_records(process, project / "out", count=2)
        workers = children_of(process.pid)
        assert workers, "the run has no decoding worker"
        os.kill(process.pid, sig)  # the parent only, as the OOM killer or a scheduler would
        process.wait(timeout=120)
        deadline = time.monotonic() + 60
        while any(alive(pid) for pid in workers) and time.monotonic() < deadline:
            time.sleep(0.1)

    assert not any(alive(pid) for pid in workers)


def test_a_double_ctrl_c_with_workers_leaves_no_traceback_and_no_temporary(project):
    image_folder(project / "photos", 30)
    out = project / "out"
    with running(
        project,
        [*GRADCAM, "photos", "--batch-size", "2", "--workers", "1", "-o", "out"],
        log=project / "d",
        hang_after=6,
    ) as process:
        wait_for_records(process, out, count=2)
        os.killpg(process.pid, signal.SIGINT)
        time.sleep(0.05)
        status = stop(process, signal.SIGINT)

    stderr = (project / "d.err").read_text()
    assert status == 130 and "Traceback" not in stderr and "Exception ignored" not in stderr, stderr
    assert stderr.splitlines()[-1] == "hookviz: interrupted"
    read_manifest(out)
    assert_no_partial_files(out)


def test_a_fifo_fails_at_once_and_the_next_image_is_written(project):
    fifo = project / "fifo.jpg"
    os.mkfifo(fifo)
    good = write_noise_image(project / "good.png", seed=1)

    done = run_process(project, [*GRADCAM, fifo, good, "-o", "out", "-q", "--json"], timeout=120)

    assert done.returncode == 1
    records = strict_json_lines(done.stdout.decode())
    assert [record["status"] for record in records] == ["error", "ok"]
    assert "not a regular file" in one_error_line(done.stderr.decode())


# --- one line, never a traceback ---------------------------------------------------------------------------------


def test_a_file_name_that_is_not_utf8_is_recorded_and_the_run_goes_on(project):
    folder = project / "photos"
    write_noise_image(folder / "good.png", seed=1)
    odd = Path(os.fsdecode(folder / os.fsdecode(b"bad\xff.png")))
    write_noise_image(odd, seed=2)

    done = run_process(project, [*GRADCAM, "photos", "-o", "out", "--json"])

    assert done.returncode == 0, done.stderr.decode(errors="replace")
    records = strict_json_lines(done.stdout.decode("utf-8"))
    assert sorted(os.fsencode(record["input"]) for record in records) == [b"photos/bad\xff.png", b"photos/good.png"]
    assert all((project / png).is_file() for png in pngs_of(records))
    assert len(inputs_of(read_manifest(project / "out"))) == 2


@pytest.mark.parametrize(
    "case",
    [
        "manifest-is-a-directory",
        "disk-full-at-start",
        "gallery-cannot-be-written",
        "size-100000",
        "binary-labels",
        "nan-mean",
    ],
)
def test_what_used_to_be_a_traceback_is_one_line(project, case):
    image = write_noise_image(project / "im.png", seed=0)
    out = project / "out"
    args, options, expected_code = [*GRADCAM, image, "-o", out, "-q"], {}, 2
    if case == "manifest-is-a-directory":
        (out / "manifest.jsonl").mkdir(parents=True)
    elif case == "disk-full-at-start":

        def no_room() -> None:  # a file-size limit of 0 bytes: every write fails as on a full disk
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (0, 0))

        options = {"preexec_fn": no_room}
    elif case == "gallery-cannot-be-written":
        (out / "index.html").mkdir(parents=True)
        args, expected_code = [*args, "--html"], 1
    elif case == "size-100000":
        args = ["layers", BATCHNET, "--size", "100000"]
    elif case == "nan-mean":  # gave "score": NaN on stdout with status ok
        args = [*args, "--mean", "nan,nan,nan"]
    elif case == "binary-labels":
        (project / "labels.bin").write_bytes(bytes(range(256)) * 4)
        args = [*args, "--labels", project / "labels.bin"]

    done = run_process(project, args, **options)

    assert done.returncode == expected_code, done.stderr.decode()
    one_error_line(done.stderr.decode())


def test_nan_weights_fail_the_input_and_json_stays_strict(project, nets):
    weights = {key: value * float("nan") for key, value in nets.build_batchnet().state_dict().items()}
    torch.save(weights, project / "nan.pt")
    image = write_noise_image(project / "im.png", seed=0)

    done = run_process(
        project,
        [
            "gradcam",
            BATCHNET,
            "--state-dict",
            "nan.pt",
            "--size",
            "32",
            "-l",
            "relu2",
            image,
            "-o",
            "out",
            "--json",
            "-q",
        ],
    )

    assert done.returncode == 1
    (record,) = strict_json_lines(done.stdout.decode())
    assert record["status"] == "error" and "not finite" in record["error"]
    assert not list((project / "out").rglob("*.png"))
    read_manifest(project / "out")


# --- memory ---------------------------------------------------------------------------------------------------------


def test_crop_on_a_long_strip_needs_memory_for_the_model_input_only(project):
    """A 4x150000 PNG (0.6 megapixels) resized to 256 px on its short side before cropping would be 9.6 billion
    pixels; a 1x200000 one cannot be centre-cropped at all and is refused as that input's error."""
    Image.new("RGB", (4, 150_000), (200, 40, 40)).save(project / "strip.png")
    Image.new("RGB", (1, 200_000), (40, 200, 40)).save(project / "thread.png")

    with open(project / "run.out", "wb") as stdout:
        process = subprocess.Popen(
            [*hookviz_command(), *GRADCAM, "strip.png", "thread.png", "--crop", "-o", "out", "-q", "--json"],
            cwd=project,
            env=subprocess_env(),
            stdout=stdout,
            stdin=subprocess.DEVNULL,
        )
        _, status, usage = os.wait4(process.pid, 0)  # this process's own peak memory, not any other test's
    process.returncode = os.waitstatus_to_exitcode(status)

    peak_bytes = usage.ru_maxrss * 1024
    assert process.returncode == 1
    strip, thread = strict_json_lines((project / "run.out").read_text())
    assert strip["status"] == "ok" and thread["status"] == "error" and "too narrow for --crop" in thread["error"]
    assert peak_bytes < 3 * 2**30  # torch and the model take about 0.4 GB; resizing the strip first, 29 GB


# --- smaller -------------------------------------------------------------------------------------------------------


def test_a_newline_in_a_file_name_stays_on_one_error_line(project):
    broken = project / "two\nlines.png"
    broken.write_bytes(b"not a png")

    done = run_process(project, [*GRADCAM, broken, "-o", "out", "-q"])

    assert done.returncode == 1
    assert "two\\nlines.png" in one_error_line(done.stderr.decode())


def test_an_image_given_as_the_model_is_named_as_one(project):
    image = write_noise_image(project / "photo.jpg", seed=0)

    result = hookviz("gradcam", image, image, "-o", project / "out", "-q")

    assert result.exit_code == 2
    assert "is a JPEG image, not a model; the model comes first" in one_error_line(result.stderr)


@pytest.mark.parametrize(
    ("option", "message"),
    [(["--class", "5000"], "--class 5000 is out of range"), (["--top-k", "2000"], "--top-k 2000 is more than")],
)
def test_class_options_are_checked_before_any_work(project, option, message):
    image = write_noise_image(project / "im.png", seed=0)

    result = hookviz(*GRADCAM, image, *option, "-o", project / "out", "-q")

    assert result.exit_code == 2 and message in one_error_line(result.stderr)
    assert not (project / "out" / "manifest.jsonl").exists()


def test_the_summary_counts_images_per_second_of_images_done(project):
    image_folder(project / "photos", 2)

    result = hookviz(*GRADCAM, project / "photos", "--max-pixels", "100", "-o", project / "out")

    assert result.exit_code == 1
    summary = result.stderr.splitlines()[-1]
    assert summary.startswith("hookviz: 0 ok, 2 failed") and "images/s" not in summary


def test_a_huge_jpeg_is_decoded_at_reduced_size_and_says_so(project):
    """A 9000x6000 JPEG (54 megapixels) used to take its full size several times over while its overlay was drawn;
    it is decoded at reduced size (JPEG draft), drawn at about 16.8 megapixels (4096x4096) in its own shape, and
    the record says from what."""
    Image.new("RGB", (9000, 6000), (180, 90, 40)).save(project / "huge.jpg", quality=80)

    with open(project / "run.out", "wb") as stdout:
        process = subprocess.Popen(
            [*hookviz_command(), *GRADCAM, "huge.jpg", "-o", "out", "-q", "--json"],
            cwd=project,
            env=subprocess_env(),
            stdout=stdout,
            stdin=subprocess.DEVNULL,
        )
        _, status, usage = os.wait4(process.pid, 0)

    assert os.waitstatus_to_exitcode(status) == 0
    (record,) = strict_json_lines((project / "run.out").read_text())
    assert record["downscaled_from"] == [9000, 6000]
    with Image.open(project / record["outputs"][0]["png"]) as overlay:
        assert overlay.size == (5017, 3344) and overlay.width * overlay.height <= 4096 * 4096
    assert usage.ru_maxrss * 1024 < 3 * 2**30  # about 2 GB; drawing the photo at its full size took over 5 GB
