"""DIR/manifest.jsonl: a header per run, a record per input, whole lines even from parallel shards.

Runs use the small seeded CNN ``nets:build_batchnet`` (tests/nets.py) on 64x48 noise photos written here:

    hookviz gradcam nets:build_batchnet photos/ --size 32 -l relu2 --json -o OUT
"""

from __future__ import annotations

import re
from collections import Counter
from importlib import metadata
from pathlib import Path

from cli_helpers import BATCHNET, GRADCAM, hookviz, image_folder, json_lines, read_manifest

from hookviz.manifest import Manifest


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
        package: metadata.version(package) for package in ("hookviz", "torch", "torchvision")
    }
    assert header["command"] == "gradcam" and header["model"] == BATCHNET
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
