"""Outputs stay inside -o DIR whatever the file and layer names, and existing files are not overwritten:
a second run is refused, --skip-existing leaves them, only --overwrite replaces them.

    hookviz gradcam nets:build_batchnet photos/ --size 32 -l relu2 --json -o OUT
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
from cli_helpers import (
    BATCHNET,
    FMAPS,
    GRADCAM,
    SIZE,
    TINY,
    assert_no_partial_files,
    assert_usage_error,
    hookviz,
    image_folder,
    json_lines,
    mtimes,
    pngs_of,
    write_noise_image,
    write_solid_png,
)
from nets import ODD_LAYER_NEWLINE, ODD_LAYER_UNICODE
from PIL import Image

OUTPUT_NAME = re.compile(r"^gradcam_relu2_c\d+\.png$")


# --- overwrite protection -------------------------------------------------------------------------


@pytest.mark.parametrize("command", [GRADCAM, FMAPS, ["guided", BATCHNET, *SIZE, "-l", "relu2"]], ids=lambda c: c[0])
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


# --- output paths stay inside DIR -----------------------------------------------------------------


def tree(folder: Path, skip: Path) -> set[Path]:
    return {path for path in folder.rglob("*") if skip not in path.parents and path != skip}


def test_odd_file_names_write_only_inside_the_output_directory(project):
    """Names with leading dots, spaces, `!`, a leading `-`, backslashes and non-ASCII letters all get a
    directory of their own inside DIR, and nothing is written anywhere else."""
    odd = project / "odd"
    names = ["-x.png", "café ñ 猫.png", "x\\..\\..\\evil.png", "a b (1).png"]
    images = [write_noise_image(odd / name, seed=i) for i, name in enumerate(names)]
    # A folder listing skips hidden files, so names with leading dots are given one by one.
    explicit = [
        write_noise_image(project / name, seed=10 + i)
        for i, name in enumerate(["..weird name!.png", "...png", "..\\..\\evil.png"])
    ]
    out = project / "out"
    before = tree(project, out)

    result = hookviz(*GRADCAM, odd, *explicit, "--json", "-q", "-o", out)

    assert result.exit_code == 0, result.stderr
    records = json_lines(result.stdout)
    assert [record["input"] for record in records] == [str(path) for path in sorted(images) + explicit]
    pngs = [Path(png).resolve() for png in pngs_of(records)]
    assert len({path.parent for path in pngs}) == 7
    assert all(png.is_file() and png.parent.parent == out.resolve() for png in pngs)
    assert all(not png.parent.name.startswith(".") and OUTPUT_NAME.match(png.name) for png in pngs)
    assert tree(project, out) == before


# --- dangerous file and layer names, and a refused run --------------------------------------------


DANGEROUS_NAMES = [
    "..png",
    "...png",
    "..%2F..%2Fx.png",
    "with space.png",
    "\u00fcn\u00efc\u00f6d\u00e9.png",
    "new\nline.png",
    "-dash.png",
]


def _files_outside(root: Path, *excluded: Path) -> set[Path]:
    return {p for p in root.rglob("*") if not any(p == e or e in p.parents for e in excluded)}


def test_outputs_never_escape_the_output_directory(tmp_path, nets, monkeypatch):
    """Stems like '..', URL-encoded slashes, newlines, a stdin path through 'sub/..', and layer names with
    slashes, spaces and newlines: every file the run writes lies inside -o DIR, and nothing is written elsewhere."""
    monkeypatch.chdir(tmp_path)
    inputs = tmp_path / "in"
    (inputs / "sub").mkdir(parents=True)
    names = []
    for name in DANGEROUS_NAMES:
        try:
            write_solid_png(inputs / name)
        except OSError:  # a filesystem that refuses the name
            continue
        names.append(name)
    write_solid_png(inputs / "evil.png")
    out = tmp_path / "out"
    before = _files_outside(tmp_path, out)
    files = [str(inputs / name) for name in names]

    runs = [
        hookviz(
            "fmaps",
            "nets:build_odd_names",
            "--size",
            "16",
            *files,
            "-",
            "-o",
            out,
            "--json",
            "-q",
            "--save-raw",
            stdin="in/sub/../evil.png\n",
        ),
        hookviz(
            "gradcam",
            "nets:build_odd_names",
            "--size",
            "16",
            *files,
            "-l",
            ODD_LAYER_NEWLINE,
            "--save-raw",
            "-o",
            out,
            "--json",
            "-q",
        ),
        hookviz(
            "guided", "nets:build_odd_names", "--size", "16", *files, "-l", ODD_LAYER_UNICODE, "-o", out, "--json", "-q"
        ),
    ]

    written = []
    for result in runs:
        assert result.exit_code == 0, result.stderr
        records = json_lines(result.stdout)
        assert all(record["status"] == "ok" for record in records)
        written += [
            output[key] for record in records for output in record["outputs"] for key in ("png", "raw") if key in output
        ]
    assert len(written) > 3 * len(names)
    for path in written:
        assert Path(path).resolve().is_relative_to(out.resolve()), path
        assert Path(path).is_file()
    assert all(p.parent.parent == out for p in map(Path, written))  # DIR/<stem>/<file>, no deeper, no higher
    assert _files_outside(tmp_path, out) == before


def test_layers_whose_names_sanitize_alike_get_separate_files(tmp_path, nets):
    """Every (image, layer) grid gets its own file, even when two layer names differ only in unsafe characters."""
    image = write_solid_png(tmp_path / "photo.png")

    result = hookviz("fmaps", "nets:build_odd_names", "--size", "16", image, "-o", tmp_path / "out", "--json", "-q")

    assert result.exit_code == 0, result.stderr
    outputs = json_lines(result.stdout)[0]["outputs"]
    assert {o["layer"] for o in outputs} >= {"stem/conv", "stem_conv"}
    pngs = [o["png"] for o in outputs]
    assert len(set(pngs)) == len(pngs), pngs


def test_a_refused_run_and_skip_existing_leave_an_existing_file_byte_for_byte(tmp_path, nets):
    """A second run into the same DIR is exactly one error line (exit 2); neither it nor --skip-existing changes
    a file at an output path, and only --overwrite replaces it."""
    image = write_solid_png(tmp_path / "photo.png")
    out = tmp_path / "out"
    first = hookviz("gradcam", *TINY, image, "-o", out, "-q")
    assert first.exit_code == 0, first.stderr
    target = Path(first.stdout.strip())
    target.write_bytes(b"the user's own file, not to be lost")

    again = hookviz("gradcam", *TINY, image, "-o", out, "-q")
    skipping = hookviz("gradcam", *TINY, image, "-o", out, "-q", "--skip-existing", "--json")

    assert_usage_error(
        again,
        f"{target} already exists; pass --overwrite to replace outputs, "
        "or --skip-existing to finish an interrupted run",
    )
    assert skipping.exit_code == 0, skipping.stderr
    assert [record["status"] for record in json_lines(skipping.stdout)] == ["skipped"]
    assert target.read_bytes() == b"the user's own file, not to be lost"

    overwriting = hookviz("gradcam", *TINY, image, "-o", out, "-q", "--overwrite")

    assert overwriting.exit_code == 0, overwriting.stderr
    with Image.open(target) as replaced:
        assert replaced.format == "PNG"
