"""How a run is cut up: shards (--shard K/N), decoding workers (--workers), and batches padded for a .pt2
exported with a fixed batch size.

    hookviz gradcam nets:build_batchnet photos/ --size 32 -l relu2 --json -o OUT
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import torch
from cli_helpers import (
    BATCHNET,
    GRADCAM,
    SIZE,
    hookviz,
    image_folder,
    inputs_of,
    json_lines,
    pngs_of,
    read_manifest,
    write_noise_image,
)
from torch import nn

from hookviz.batch import parse_shard, shard_of
from hookviz.errors import UsageError
from hookviz.models import load_model
from hookviz.pipeline import prepare_image

# --- shards ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 3, 4])
def test_shards_cover_every_input_once_whatever_the_order(n):
    """shard_of: shards 1..N together hold each input exactly once, and the same inputs when the list
    is given in another order (each shard keeps the order it was given)."""
    paths = [
        Path(f"photos/{name}.jpg")
        for name in ("zebra", "ant", "cat", "dog", "eel", "fox", "gnu", "hen", "ibis", "jay", "kiwi")
    ]
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
        write_noise_image(folder / name, seed=i)

    def directories(*extra: str, out: str) -> dict[str, str]:
        result = hookviz(*GRADCAM, folder, *extra, "--json", "-q", "-o", project / out)
        assert result.exit_code == 0, result.stderr
        return {
            record["input"]: str(Path(png).parent.relative_to(project / out))
            for record in json_lines(result.stdout)
            for png in pngs_of([record])
        }

    unsharded = directories(out="whole")
    sharded = {**directories("--shard", "1/2", out="sharded"), **directories("--shard", "2/2", out="sharded")}

    assert sharded == unsharded and len(unsharded) == 5
    assert len(set(unsharded.values())) == 5
    assert unsharded[str(folder / "dog.png")] == "dog"
    assert unsharded[str(folder / "a/cat.png")] != unsharded[str(folder / "b/cat.png")]
    # "~" joins a stem and its hash: no plain file name can give one (a file named "cat-1863a7f7.jpg" could).
    assert all(name.startswith("cat~") for key, name in unsharded.items() if key.endswith("cat.png"))
    assert len(inputs_of(read_manifest(project / "sharded"))) == 5


# --- decoding workers -----------------------------------------------------------------------------


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


# --- a .pt2 with a fixed batch size ---------------------------------------------------------------


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
                probabilities.sort(descending=True).values.tolist(), abs=2e-6
            )


def test_scorecam_on_a_fixed_batch_program(fixed_batch_program, tmp_path):
    path, _ = fixed_batch_program
    images = image_folder(tmp_path / "photos", 3)

    result = hookviz("gradcam", path, *images, "-l", "relu2", "-m", "scorecam", "--json", "-o", tmp_path / "out")

    assert result.exit_code == 0, result.stderr
    assert [record["status"] for record in json_lines(result.stdout)] == ["ok"] * 3


def test_stats_on_a_fixed_batch_program_counts_only_the_real_images(fixed_batch_program, tmp_path):
    """3 images through a .pt2 that only takes batches of 2 (it used to fail on the short last batch): the padding
    image is not counted, and the statistics are those of the eager model on exactly these 3 images."""
    path, model = fixed_batch_program
    images = image_folder(tmp_path / "photos", 3)

    result = hookviz("stats", path, *images, "-l", "conv2", "--json", "-o", tmp_path / "out")

    assert result.exit_code == 0, result.stderr
    (record,) = json_lines(result.stdout)
    loaded = load_model(str(path), device="cpu")
    batch = torch.stack([prepare_image(image, "x", loaded.preprocessing, crop=False).tensor for image in images])
    with torch.no_grad():
        expected = model.conv2(model.relu1(model.conv1(batch)))
    assert record["values"] == expected.numel()
    assert record["max"] == pytest.approx(float(expected.max()), abs=1e-5)
    assert record["mean"] == pytest.approx(float(expected.double().mean()), abs=1e-5)


def test_stats_closes_its_tensorboard_writer_when_the_run_fails(tmp_path, monkeypatch):
    """Every image unreadable: a one-line error, and the TensorBoard writer is closed anyway."""
    pytest.importorskip("tensorboard")
    from torch.utils.tensorboard import SummaryWriter

    closed = []
    monkeypatch.setattr(SummaryWriter, "close", lambda self: closed.append(self))
    (tmp_path / "broken.png").write_bytes(b"not a png")

    result = hookviz(
        "stats",
        BATCHNET,
        *SIZE,
        tmp_path / "broken.png",
        "--tensorboard",
        tmp_path / "tb",
        "-o",
        tmp_path / "out",
        "-q",
    )

    assert result.exit_code == 2 and "no image could be read" in result.stderr
    assert len(closed) == 1
