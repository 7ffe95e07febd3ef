"""`hookviz audit`: a labelled set in; accuracy, confusion, per-class precision/recall and the mistakes out.

Two models whose answers are known:

* a tiny CNN trained here for a few seconds to tell a red, green or blue square on grey noise (exported as a .pt2,
  as a user would ship it). It is right on every fresh image, so when some images are put in the wrong class
  folder on purpose, the audit must list exactly those as the mistakes;
* the pretrained demo model (EfficientNet-Lite0) on the sample photos, under ImageNet class names, with one
  folder deliberately wrong: the audit must agree with the model run directly in this test.

    hookviz audit model.pt2 photos/ --labels labels.txt --mean 0.5 --std 0.5 -o OUT
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from cli_helpers import hookviz, read_manifest
from nets import seeded
from PIL import Image
from torch import nn

from hookviz.audit import AuditItem, make_audit, write_audit

COLOURS = {"red": (0.85, 0.15, 0.15), "green": (0.15, 0.75, 0.2), "blue": (0.15, 0.2, 0.85)}
SIZE = 32
NORMALIZED = ["--mean", "0.5", "--std", "0.5"]
SAMPLES = Path(__file__).resolve().parent.parent / "sample_images"


class ColourNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.relu1 = nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.relu2 = nn.ReLU()
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, len(COLOURS))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu2(self.conv2(self.pool(self.relu1(self.conv1(x)))))
        return self.fc(self.gap(x).flatten(1))


def scenes(rng: np.random.Generator, classes: np.ndarray) -> np.ndarray:
    """(n, 32, 32, 3) in [0, 1]: a square of 8-16 px of each class's colour, anywhere, on grey noise."""
    n = len(classes)
    images = rng.uniform(0.3, 0.7, (n, 1, 1, 1)) + 0.1 * rng.standard_normal((n, SIZE, SIZE, 3))
    palette = np.array(list(COLOURS.values()))
    for i, c in enumerate(classes):
        side = rng.integers(8, 17)
        top, left = rng.integers(0, SIZE - side + 1, 2)
        images[i, top : top + side, left : left + side] = palette[c] + rng.uniform(-0.08, 0.08, 3)
    return np.clip(images, 0, 1)


def as_input(images: np.ndarray) -> torch.Tensor:
    return (torch.from_numpy(images).float().permute(0, 3, 1, 2) - 0.5) / 0.5


@pytest.fixture(scope="module")
def colour_model(tmp_path_factory) -> Path:
    """A folder with model.pt2 (the trained ColourNet, dynamic batch) and labels.txt (red, green, blue)."""
    folder = tmp_path_factory.mktemp("colours")
    (folder / "labels.txt").write_text("\n".join(COLOURS) + "\n")
    rng = np.random.default_rng(0)
    with seeded(0):
        model = ColourNet()
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
        for _ in range(80):
            classes = rng.integers(0, len(COLOURS), 32)
            loss = F.cross_entropy(model(as_input(scenes(rng, classes))), torch.from_numpy(classes))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.eval()
    classes = rng.integers(0, len(COLOURS), 300)
    with torch.no_grad():
        accuracy = (model(as_input(scenes(rng, classes))).argmax(1) == torch.from_numpy(classes)).float().mean()
    assert accuracy == 1.0, f"the model did not learn the colours (accuracy {accuracy:.3f})"
    program = torch.export.export(
        model, (torch.randn(2, 3, SIZE, SIZE),), dynamic_shapes=({0: torch.export.Dim("batch", min=1)},)
    )
    torch.export.save(program, folder / "model.pt2")
    return folder


def labelled_photos(root: Path, per_class: int, mislabelled: dict[tuple[str, int], str]) -> dict[Path, str]:
    """PNGs root/<folder>/<colour><i>.png, each in its colour's folder except the ``mislabelled`` ones ((colour, i)
    -> the folder it is put in). Returns path -> its true colour."""
    rng = np.random.default_rng(7)
    truth = {}
    for c, colour in enumerate(COLOURS):
        for i, pixels in enumerate(scenes(rng, np.full(per_class, c))):
            folder = root / mislabelled.get((colour, i), colour)
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / f"{colour}{i}.png"
            Image.fromarray((pixels * 255).round().astype(np.uint8)).save(path)
            truth[path] = colour
    return truth


def run_audit(model: Path, source: Path, out: Path, *extra: object) -> tuple[dict, object]:
    result = hookviz(
        "audit",
        model / "model.pt2",
        source,
        "--labels",
        model / "labels.txt",
        *NORMALIZED,
        "-l",
        "relu2",
        "-o",
        out,
        *extra,
    )
    return json.loads((out / "audit.json").read_text()), result


MISLABELLED = {("red", 1): "blue", ("green", 3): "red"}


def test_the_audit_lists_exactly_the_images_put_in_the_wrong_folder(colour_model, tmp_path):
    truth = labelled_photos(tmp_path / "photos", 4, MISLABELLED)
    wrong = sorted(str(path) for path in truth if path.parent.name != truth[path])
    audit, result = run_audit(colour_model, tmp_path / "photos", tmp_path / "out")
    assert result.exit_code == 0, result.stderr
    assert (
        sorted(audit["mistakes"])
        == wrong
        == sorted(str(tmp_path / "photos" / folder / f"{colour}{i}.png") for (colour, i), folder in MISLABELLED.items())
    )
    assert (audit["inputs"], audit["correct"], audit["failed"]) == (12, 10, 0)
    assert audit["accuracy"] == pytest.approx(10 / 12)
    assert audit["top5_accuracy"] == 1.0  # three classes: every class is in the top 5
    names = list(COLOURS)
    # Rows expected (the folder), columns predicted (the true colour, as the model is always right).
    matrix = np.zeros((3, 3), dtype=int)
    for path, colour in truth.items():
        matrix[names.index(path.parent.name), names.index(colour)] += 1
    assert audit["confusion"] == {"classes": [0, 1, 2], "labels": names, "matrix": matrix.tolist()}
    assert {(p["expected_label"], p["predicted_label"], p["count"]) for p in audit["confused_pairs"]} == {
        ("blue", "red", 1),
        ("red", "green", 1),
    }
    recall = {s["label"]: s["recall"] for s in audit["per_class"]}
    precision = {s["label"]: s["precision"] for s in audit["per_class"]}
    assert recall == {"red": 3 / 4, "green": 3 / 3, "blue": 4 / 5}  # red's folder holds a green square
    assert precision == {"red": 3 / 4, "green": 3 / 4, "blue": 4 / 4}  # a red square sits in the blue folder
    # The summary on stdout says the same.
    assert result.stdout.startswith("accuracy 83.3% (10/12), top-5 accuracy 100.0%\n")
    assert "most confused (expected -> predicted):" in result.stdout
    for path in wrong:
        assert f"  {path}: predicted " in result.stdout


def test_confident_mistakes_come_most_confident_first_and_unsure_correct_least_first(colour_model, tmp_path):
    truth = labelled_photos(tmp_path / "photos", 4, MISLABELLED)
    audit, result = run_audit(colour_model, tmp_path / "photos", tmp_path / "out", "-q")
    assert result.exit_code == 0, result.stderr
    records = {e["input"]: e for e in read_manifest(tmp_path / "out") if e["type"] == "input"}
    mistakes = [item["input"] for item in audit["confident_mistakes"]]
    assert mistakes == sorted(mistakes, key=lambda name: -records[name]["predictions"][0]["score"])
    unsure = [item["input"] for item in audit["unsure_correct"]]
    assert len(unsure) == 10 and set(unsure).isdisjoint(mistakes)
    assert unsure == sorted(unsure, key=lambda name: records[name]["predictions"][0]["score"])
    for item in audit["confident_mistakes"]:
        path = Path(item["input"])
        assert (item["expected_label"], item["predicted_label"]) == (path.parent.name, truth[path])
        (png,) = item["png"]  # the predicted | expected picture
        assert Path(png).name == f"gradcam_relu2_c{item['predicted']}_expected_c{item['expected']}.png"


@pytest.mark.parametrize("kind", ["csv", "jsonl"])
def test_a_label_file_gives_the_same_audit_as_the_folder(colour_model, tmp_path, kind):
    truth = labelled_photos(tmp_path / "data" / "photos", 3, {("blue", 0): "green"})
    rows = [(path.relative_to(tmp_path / "data").as_posix(), path.parent.name) for path in sorted(truth)]
    if kind == "csv":
        source = tmp_path / "data" / "labels.csv"
        source.write_text("path,label\n" + "".join(f"{p},{label}\n" for p, label in rows))
    else:
        source = tmp_path / "data" / "labels.jsonl"
        source.write_text(
            "".join(json.dumps({"input": p, "label": list(COLOURS).index(label)}) + "\n" for p, label in rows)
        )
    from_file, result = run_audit(colour_model, source, tmp_path / "file", "-q")
    assert result.exit_code == 0, result.stderr
    from_folder, _ = run_audit(colour_model, tmp_path / "data" / "photos", tmp_path / "folder", "-q")
    for key in ("accuracy", "confusion", "confused_pairs", "per_class", "mistakes"):
        assert from_file[key] == from_folder[key]
    assert from_file["mistakes"] == [str(tmp_path / "data" / "photos" / "green" / "blue0.png")]


def test_a_missing_file_fails_alone_and_the_audit_counts_it(colour_model, tmp_path):
    truth = labelled_photos(tmp_path / "photos", 2, {})
    source = tmp_path / "labels.csv"
    source.write_text(
        "path,label\n" + "".join(f"{p},{p.parent.name}\n" for p in sorted(truth)) + "photos/red/gone.png,red\n"
    )
    audit, result = run_audit(colour_model, source, tmp_path / "out", "-q")
    assert result.exit_code == 1
    assert result.stderr == f"hookviz: error: {tmp_path / 'photos' / 'red' / 'gone.png'}: file not found\n"
    assert (audit["inputs"], audit["failed"], audit["accuracy"]) == (6, 1, 1.0)
    assert result.stdout.startswith("accuracy 100.0% (6/6), top-5 accuracy 100.0%; 1 input(s) failed\n")


def test_shards_then_a_resumed_run_make_the_whole_audit(colour_model, tmp_path):
    labelled_photos(tmp_path / "photos", 3, MISLABELLED)
    whole, _ = run_audit(colour_model, tmp_path / "photos", tmp_path / "whole", "-q")
    first, result = run_audit(colour_model, tmp_path / "photos", tmp_path / "sharded", "--shard", "1/2")
    assert result.exit_code == 0 and first["inputs"] == 5
    assert "hookviz: the audit covers 5 of 9 inputs" in result.stderr
    second, _ = run_audit(colour_model, tmp_path / "photos", tmp_path / "sharded", "--shard", "2/2", "-q")
    assert second["inputs"] == 9  # the last shard to finish sees every shard's records
    resumed, result = run_audit(
        colour_model, tmp_path / "photos", tmp_path / "sharded", "--skip-existing", "--json", "-q"
    )
    assert result.exit_code == 0
    assert json.loads(result.stdout) == resumed
    for key in ("accuracy", "confusion", "confused_pairs", "per_class", "mistakes"):
        assert resumed[key] == whole[key], key
    unplaced = [{k: v for k, v in item.items() if k != "png"} for item in resumed["confident_mistakes"]]
    assert unplaced == [{k: v for k, v in item.items() if k != "png"} for item in whole["confident_mistakes"]]


# --- the audit's arithmetic, against scikit-learn ---------------------------------------------------


def random_items(count: int, classes: int, seed: int) -> list[AuditItem]:
    rng = np.random.default_rng(seed)
    items = []
    for i in range(count):
        expected = int(rng.integers(0, classes))
        predicted = expected if rng.random() < 0.6 else int(rng.integers(0, classes))
        score = float(rng.uniform(0.2, 1.0))
        rank = 1 if predicted == expected else int(rng.integers(2, 9))
        items.append(AuditItem(f"img{i:03d}.png", expected, predicted, score, score if rank == 1 else score / 3, rank))
    return items


def test_confusion_precision_and_recall_equal_scikit_learns():
    metrics = pytest.importorskip("sklearn.metrics")
    items = random_items(300, 12, seed=1)
    audit = make_audit(items, lambda c: f"name {c}")
    expected = [item.expected for item in items]
    predicted = [item.predicted for item in items]
    classes = sorted(set(expected) | set(predicted))
    assert audit.classes == classes
    np.testing.assert_array_equal(audit.matrix(), metrics.confusion_matrix(expected, predicted, labels=classes))
    precision, recall, _, support = metrics.precision_recall_fscore_support(
        expected, predicted, labels=classes, zero_division=np.nan
    )
    for stats, p, r, s in zip(audit.per_class, precision, recall, support):
        assert stats.support == s
        assert (stats.precision is None and np.isnan(p)) or stats.precision == pytest.approx(p)
        assert (stats.recall is None and np.isnan(r)) or stats.recall == pytest.approx(r)
    assert audit.accuracy == pytest.approx(metrics.accuracy_score(expected, predicted))
    assert audit.top_k_accuracy == pytest.approx(np.mean([item.expected_rank <= 5 for item in items]))


def test_confusion_png_is_a_matrix_up_to_50_classes_and_the_top_pairs_beyond(tmp_path):
    for classes, shows in ((12, "matrix"), (80, "pairs")):
        audit = make_audit(random_items(400, classes, seed=2), lambda c: f"class name {c}")
        written = write_audit(audit, tmp_path / str(classes))
        with Image.open(written["confusion"]) as picture:
            assert picture.text["hookviz:shows"] == shows
            assert picture.text["hookviz:classes"] == str(len(audit.classes))
        assert json.loads(written["audit"].read_text())["confusion"]["matrix"] == audit.matrix()


# --- the pretrained demo model on real photos -------------------------------------------------------

RIGHT = {  # ImageNet names of what the sample photos show (the demo model's top-1 for each)
    "Egyptian cat": "chelsea_cat.png",
    "espresso": "coffee_cup.jpg",
    "military uniform": "grace_hopper.jpg",
    "missile": "rocket.jpg",
}
WRONG = {"golden retriever": ["coffee_cup.jpg", "astronaut.jpg"]}  # deliberately wrong


def test_the_demo_models_audit_equals_a_direct_computation(demo_model, tmp_path):
    from hookviz.models import load_model
    from hookviz.pipeline import model_batch, prepare_image

    photos = tmp_path / "photos"
    expected = {}
    for name, files in {**{k: [v] for k, v in RIGHT.items()}, **WRONG}.items():
        (photos / name).mkdir(parents=True)
        for file in files:
            shutil.copy(SAMPLES / file, photos / name / file)
            expected[photos / name / file] = name
    result = hookviz("audit", demo_model, photos, "--labels", "imagenet", "-o", tmp_path / "out", "-q")
    assert result.exit_code == 0, result.stderr
    audit = json.loads((tmp_path / "out" / "audit.json").read_text())

    # The model run directly on the same model inputs.
    loaded = load_model(str(demo_model), labels="imagenet")
    paths = sorted(expected)
    batch = model_batch([prepare_image(p, p.stem, loaded.preprocessing, crop=False) for p in paths], loaded)
    with torch.no_grad():
        probabilities = loaded.module(batch).softmax(dim=1)
    names = loaded.labels
    assert names is not None
    truth = [names.index(expected[p]) for p in paths]
    predicted = probabilities.argmax(dim=1).tolist()
    correct = [t == p for t, p in zip(truth, predicted)]
    assert correct == [path.parent.name in RIGHT for path in paths]  # the right folders are right, the wrong wrong
    assert audit["accuracy"] == pytest.approx(sum(correct) / len(paths))
    ranks = [int((probabilities[i] > probabilities[i, t]).sum()) + 1 for i, t in enumerate(truth)]
    assert audit["top5_accuracy"] == pytest.approx(np.mean([r <= 5 for r in ranks]))
    pairs = {}
    for t, p in zip(truth, predicted):
        if t != p:
            pairs[names[t], names[p]] = pairs.get((names[t], names[p]), 0) + 1
    assert {(p["expected_label"], p["predicted_label"]): p["count"] for p in audit["confused_pairs"]} == pairs
    mistakes = sorted((i for i in range(len(paths)) if not correct[i]), key=lambda i: -float(probabilities[i].max()))
    assert [item["input"] for item in audit["confident_mistakes"]] == [str(paths[i]) for i in mistakes]
    for item, i in zip(audit["confident_mistakes"], mistakes):
        assert item["score"] == pytest.approx(float(probabilities[i].max()), abs=1e-4)
        assert item["expected_score"] == pytest.approx(float(probabilities[i, truth[i]]), abs=1e-4)
        assert item["expected_rank"] == ranks[i]
    classes = sorted(set(truth) | set(predicted))
    matrix = [[sum(t == r and p == c for t, p in zip(truth, predicted)) for c in classes] for r in classes]
    assert audit["confusion"]["classes"] == classes and audit["confusion"]["matrix"] == matrix


# --- the gallery of an audit ------------------------------------------------------------------------

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def cards_in(html: str) -> dict[str, dict[str, str]]:
    """Each card's id -> its data-* attributes and classes, in page order."""
    cards = {}
    for tag in re.findall(r"<article [^>]*>", html):
        attributes = dict(re.findall(r'([\w-]+)="([^"]*)"', tag))
        cards[attributes["id"]] = attributes
    return cards


def browsed(page: Path, query: str, tmp_path: Path) -> dict[str, dict[str, str]]:
    """The cards of ``page?query`` after a headless chromium ran its scripts."""
    assert CHROMIUM is not None
    dom = subprocess.run(
        [
            CHROMIUM,
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            f"--user-data-dir={tmp_path / 'profile'}",
            "--virtual-time-budget=5000",
            "--dump-dom",
            page.as_uri() + query,
        ],
        capture_output=True,
        text=True,
        timeout=90,
        env={**os.environ, "HOME": str(tmp_path)},
    ).stdout
    assert "<article" in dom, "chromium printed no page"
    return cards_in(dom)


def test_the_gallery_filters_mistakes_and_classes_and_sorts_by_confidence(colour_model, tmp_path):
    truth = labelled_photos(tmp_path / "photos", 4, MISLABELLED)
    _, result = run_audit(colour_model, tmp_path / "photos", tmp_path / "out", "--html", "-q")
    assert result.exit_code == 0, result.stderr
    page = tmp_path / "out" / "index.html"
    html = page.read_text()
    assert "mistakes only (2 of 12)" in html
    assert '<option value="blue">blue (5)</option>' in html  # expected: 4 blue squares and a red one
    cards = cards_in(html)
    assert sorted(card["data-expected"] for card in cards.values()) == sorted(p.parent.name for p in truth)
    assert sorted(card["data-predicted"] for card in cards.values()) == sorted(truth.values())
    assert sum(card["data-correct"] == "0" for card in cards.values()) == 2
    assert html.count('<figure class="pair">') == 2  # each mistake's predicted | expected picture, two columns wide
    if CHROMIUM is None:
        pytest.skip("chromium is not installed: the filters' script is not run")
    for query, shown in (("?mistakes=1", 2), ("?expected=blue", 5), ("?predicted=red&mistakes=1", 1), ("", 12)):
        visible = [card for card in browsed(page, query, tmp_path).values() if "filtered" not in card["class"]]
        assert len(visible) == shown, query
        if "mistakes" in query:
            assert {card["data-correct"] for card in visible} == {"0"}
        if "expected=blue" in query:
            assert {card["data-expected"] for card in visible} == {"blue"}
    in_order = [float(card["data-score"]) for card in browsed(page, "?sort=-confidence", tmp_path).values()]
    assert in_order == sorted(in_order) and len(in_order) == 12  # least confident first
