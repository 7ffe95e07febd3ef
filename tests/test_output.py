"""hookviz.output: every file is written whole (temporary file, then rename) with the permissions open() would give."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from cli_helpers import write_noise_image

from hookviz.output import TEMPORARY_SUFFIX, UMASK, atomic_write

HOOKVIZ = Path(sys.executable).parent / "hookviz"


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_atomic_write_replaces_the_file_whole_with_open_permissions(tmp_path):
    target = tmp_path / "deep" / "result.txt"
    with atomic_write(target, "w", encoding="utf-8") as handle:
        handle.write("new")
        assert not target.exists()  # nothing at the final name until the block ends

    assert target.read_text() == "new"
    assert mode(target) == 0o666 & ~UMASK
    assert list(target.parent.iterdir()) == [target]


def test_atomic_write_leaves_the_old_file_and_no_temporary_when_the_block_fails(tmp_path):
    target = tmp_path / "result.txt"
    target.write_text("old")

    with pytest.raises(RuntimeError), atomic_write(target, "w") as handle:
        handle.write("half of the new")
        raise RuntimeError("disk full")

    assert target.read_text() == "old"
    assert not list(tmp_path.glob(f"*{TEMPORARY_SUFFIX}"))


def test_every_output_of_a_run_gets_the_permissions_of_the_users_umask(tmp_path, exported_program):
    """Under umask 027 a plain open() makes 0640 files: PNGs, .npy, the manifest and the gallery all get that
    (temporary files are 0600, which a colleague or a web server could not read)."""
    model, _ = exported_program
    image = write_noise_image(tmp_path / "photo.png", 40, 30, seed=0)
    out = tmp_path / "out"

    done = subprocess.run(
        [str(HOOKVIZ), "gradcam", str(model), str(image), "-o", str(out), "-q", "--save-raw", "--html"],
        capture_output=True,
        text=True,
        preexec_fn=lambda: os.umask(0o027),
        timeout=600,
    )

    assert done.returncode == 0, done.stderr
    files = sorted(path for path in out.rglob("*") if path.is_file())
    assert {path.suffix for path in files} == {".png", ".npy", ".jsonl", ".html", ".lock"}  # .lock: DIR/.hookviz/
    assert {path.name: mode(path) for path in files} == {path.name: 0o640 for path in files}
