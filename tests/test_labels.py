"""Expected labels (hookviz.labels) and `hookviz gradcam --expected`: labelled folders, CSV and JSON Lines files.

The model is nets:build_clinet (10 classes, seeded) at 32x32, so every probability and rank in a record is
checked here against the model run directly; the maps against hookviz's own `--class` maps of the same class.

    hookviz gradcam nets:build_clinet photos/ --expected folder --labels labels.txt --size 32 -l relu2 --json
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_helpers import assert_usage_error, hookviz, json_lines, read_manifest, write_noise_image
from nets import build_clinet
from PIL import Image

from hookviz.errors import UsageError
from hookviz.labels import Expected, expected_labels

MODEL = "nets:build_clinet"
SIZE, MEAN, STD = 32, 0.5, 0.25
OPTIONS = ["--size", str(SIZE), "--mean", f"{MEAN},{MEAN},{MEAN}", "--std", f"{STD},{STD},{STD}", "-l", "relu2"]
LABELS = ["cat", "dog", "car", "ship", "tree", "house", "bird", "fish", "tiger cat", "cup"]


@pytest.fixture
def project(project: Path) -> Path:
    (project / "labels.txt").write_text("\n".join(LABELS) + "\n")
    return project


def probabilities_of(path: Path) -> torch.Tensor:
    """The model run directly: the image resized by PIL (bilinear) to 32x32, normalized, softmax."""
    image = Image.open(path).convert("RGB").resize((SIZE, SIZE), Image.Resampling.BILINEAR)
    pixels = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).float() / 255
    with torch.no_grad():
        return build_clinet().eval()(((pixels - MEAN) / STD)[None]).softmax(dim=1)[0]


def labelled_folder(root: Path, layout: dict[str, int]) -> list[Path]:
    """``layout``: class folder name -> how many noise photos in it."""
    paths = []
    for folder, count in layout.items():
        for i in range(count):
            paths.append(write_noise_image(root / folder / f"{folder.replace(' ', '_')}{i}.png", seed=len(paths) + 7))
    return paths


def right_and_wrong(root: Path, right: int = 3, wrong: int = 3) -> tuple[list[Path], list[Path]]:
    """Noise photos in class folders: ``right`` in the folder of the class the model predicts for them, ``wrong``
    in the next class's folder (the model run directly decides)."""
    placed: tuple[list[Path], list[Path]] = ([], [])
    for i in range(right + wrong):
        photo = write_noise_image(root / "pool" / f"photo{i}.png", seed=40 + i)
        predicted = int(probabilities_of(photo).argmax())
        is_wrong = i >= right
        folder = root / "photos" / LABELS[(predicted + is_wrong) % len(LABELS)]
        folder.mkdir(parents=True, exist_ok=True)
        placed[is_wrong].append(photo.rename(folder / photo.name))
    return placed


# --- reading labels ---------------------------------------------------------------------------------


def test_folder_names_match_exactly_or_by_one_case_insensitive_name(tmp_path):
    paths = labelled_folder(tmp_path / "photos", {"cat": 1, "DOG": 1, "tiger_cat": 1, "3": 1})
    labels = expected_labels("folder", [str(tmp_path / "photos")], class_names=LABELS, num_classes=10)
    assert labels.inputs == sorted(paths)
    assert {path.parent.name: labels.of(path).class_index for path in paths} == {
        "cat": 0,
        "DOG": 1,
        "tiger_cat": 8,  # "_" reads as a space
        "3": 3,  # a number is an index
    }


def test_nested_folders_take_the_first_folder_under_the_root_as_the_class(tmp_path):
    (nested,) = labelled_folder(tmp_path / "photos" / "ship" / "2024", {"batch": 1})
    (loose,) = labelled_folder(tmp_path, {"photos": 1})  # an image directly in the root: no class folder
    labels = expected_labels("folder", [str(tmp_path / "photos")], class_names=LABELS, num_classes=10)
    assert labels.of(nested) == Expected(3)
    assert labels.of(loose).class_index is None
    assert labels.of(loose).error == (
        f"{loose}: not in a class folder; put it in {tmp_path / 'photos'}/<class name>/ (the ImageFolder layout)"
    )


def test_a_folder_without_class_folders_is_a_usage_error(tmp_path):
    labelled_folder(tmp_path, {"photos": 2})
    with pytest.raises(UsageError) as caught:
        expected_labels("folder", [str(tmp_path / "photos")], class_names=LABELS, num_classes=10)
    assert str(caught.value) == (
        f"{tmp_path / 'photos'}: no class folders; put the images in {tmp_path / 'photos'}/<class name>/ (the "
        "ImageFolder layout), or give a label file (CSV path,label or JSON Lines)"
    )


@pytest.mark.parametrize(
    ("folder", "message"),
    [
        ("tigr cat", "'tigr cat' is not a class name of this model; did you mean 'tiger cat'?"),
        ("cats", "'cats' is not a class name of this model; did you mean 'cat'?"),
        ("17", "class 17 is out of range: this model has classes 0..9"),
    ],
)
def test_an_unmatched_class_folder_is_a_one_line_usage_error(tmp_path, folder, message):
    labelled_folder(tmp_path / "photos", {"dog": 1, folder: 1})
    with pytest.raises(UsageError) as caught:
        expected_labels("folder", [str(tmp_path / "photos")], class_names=LABELS, num_classes=10)
    assert str(caught.value) == f"--expected folder: {tmp_path / 'photos' / folder}: {message}"


def test_a_name_shared_by_two_classes_asks_for_the_index(tmp_path):
    labelled_folder(tmp_path / "photos", {"crane": 1})
    with pytest.raises(UsageError, match=r"'crane' names classes 1, 2; give the index instead$"):
        expected_labels("folder", [str(tmp_path / "photos")], class_names=["bird", "crane", "crane"], num_classes=3)


def test_without_class_names_a_folder_must_be_an_index(tmp_path):
    labelled_folder(tmp_path / "photos", {"2": 1, "cat": 1})
    with pytest.raises(
        UsageError, match=r"'cat' is not a class index, and this model has no class names; pass --labels"
    ):
        expected_labels("folder", [str(tmp_path / "photos")], class_names=None, num_classes=10)


def test_csv_paths_are_relative_to_the_file_and_labels_are_indices_or_names(tmp_path):
    photos = labelled_folder(tmp_path / "data" / "images", {"a": 3})
    csv_file = tmp_path / "data" / "labels.csv"
    csv_file.write_text("path,label\nimages/a/a0.png,dog\nimages/a/a1.png,4\nimages/a/a2.png,Tiger Cat\n")
    labels = expected_labels(csv_file, (), class_names=LABELS, num_classes=10)
    assert labels.inputs == photos  # the file's order, relative to its folder
    assert [labels.of(path).class_index for path in photos] == [1, 4, 8]


def test_json_lines_labels(tmp_path):
    photos = labelled_folder(tmp_path / "images", {"x": 2})
    file = tmp_path / "labels.jsonl"
    file.write_text(
        json.dumps({"input": "images/x/x0.png", "label": 3})
        + "\n\n"
        + json.dumps({"input": "images/x/x1.png", "label": "cup"})
        + "\n"
    )
    labels = expected_labels(file, (), class_names=LABELS, num_classes=10)
    assert labels.inputs == photos
    assert [labels.of(path).class_index for path in photos] == [3, 9]


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        (
            "labels.csv",
            "file,class\nx.png,cat\n",
            "--expected {file}: no 'path' and no 'label' column in the header line 'file,class'; the first line must "
            "name the columns, e.g. path,label",
        ),
        (
            "labels.csv",
            "path,category\nx.png,cat\n",
            "--expected {file}: no 'label' column in the header line 'path,category'; the first line must name the "
            "columns, e.g. path,label",
        ),
        (
            "labels.csv",
            "path,label\nx.png,kitten\n",
            "{file} line 2: 'kitten' is not a class name of this model; see the names with --labels, or give indices",
        ),
        (
            "labels.csv",
            "path,label\n,cat\n",
            "{file} line 2: no path in column 'path'; give each row a path and a label",
        ),
        ("labels.csv", "path,label\n", "--expected {file}: no rows; write one line per image after the header"),
        (
            "labels.jsonl",
            '{"input": "x.png", "label": 1}\n{"file": "y.png"}\n',
            '{file} line 2: not a JSON object with "input" and "label", e.g. {{"input": "cat.jpg", "label": "tabby"}}',
        ),
    ],
)
def test_a_bad_label_file_is_a_one_line_usage_error(tmp_path, name, text, message):
    file = tmp_path / name
    file.write_text(text)
    with pytest.raises(UsageError) as caught:
        expected_labels(file, (), class_names=LABELS, num_classes=10)
    assert str(caught.value) == message.format(file=file)


def test_a_bad_row_fails_only_its_input(tmp_path):
    file = tmp_path / "labels.csv"
    file.write_text("path,label\na.png,99\nb.png,\nc.png\nd.png,cat\nd.png,dog\ne.png,cup\ne.png,cup\n")
    labels = expected_labels(file, (), class_names=LABELS, num_classes=10)
    assert [path.name for path in labels.inputs] == ["a.png", "b.png", "c.png", "d.png", "e.png"]
    errors = {path.name: labels.of(path).error for path in labels.inputs}
    assert errors == {
        "a.png": f"{file} line 2: class 99 is out of range: this model has classes 0..9",
        "b.png": f"{file} line 3: the label is empty; give a class index or name",
        "c.png": f"{file} line 4: the row has no 'label' column; write path,label",
        "d.png": f"{file} lines 5 and 6 give d.png different labels; keep one",
        "e.png": None,  # listed twice with the same label: fine
    }
    assert (
        labels.of(tmp_path / "unlisted.png").error
        == f"{tmp_path / 'unlisted.png'}: no expected label in {file}; add a row for it"
    )


# --- gradcam --expected -----------------------------------------------------------------------------


def test_records_gain_the_expected_class_its_probability_and_rank(project):
    right, wrong = right_and_wrong(project)
    photos = right + wrong
    result = hookviz(
        "gradcam",
        MODEL,
        project / "photos",
        *OPTIONS,
        "--labels",
        project / "labels.txt",
        "--expected",
        "folder",
        "--json",
        "-q",
        "-o",
        project / "out",
    )
    assert result.exit_code == 0, result.stderr
    records = json_lines(result.stdout)
    assert sorted(record["input"] for record in records) == sorted(str(path) for path in photos)
    for record in records:
        probabilities = probabilities_of(Path(record["input"]))
        expected = LABELS.index(Path(record["input"]).parent.name)
        assert record["expected"] == expected and record["expected_label"] == LABELS[expected]
        assert record["correct"] == (int(probabilities.argmax()) == expected)
        assert record["expected_score"] == pytest.approx(float(probabilities[expected]), abs=2e-6)
        assert record["expected_rank"] == int((probabilities.argsort(descending=True) == expected).nonzero()) + 1
    assert [record["correct"] for record in records if Path(record["input"]) in right] == [True] * len(right)
    assert [record["correct"] for record in records if Path(record["input"]) in wrong] == [False] * len(wrong)
    manifested = [entry for entry in read_manifest(project / "out") if entry["type"] == "input"]
    assert [{k: e[k] for k in ("expected", "correct", "expected_score", "expected_rank")} for e in manifested] == [
        {k: r[k] for k in ("expected", "correct", "expected_score", "expected_rank")} for r in records
    ]
    header = next(entry for entry in read_manifest(project / "out") if entry["type"] == "run")
    assert header["settings"]["expected"] == "folder" and header["settings"]["explain"] == "both"


def test_both_puts_the_predicted_and_the_expected_map_side_by_side_where_they_differ(project):
    right, wrong = right_and_wrong(project)
    photos = right + wrong
    out = project / "out"
    result = hookviz(
        "gradcam",
        MODEL,
        project / "photos",
        *OPTIONS,
        "--labels",
        project / "labels.txt",
        "--expected",
        "folder",
        "--save-raw",
        "--json",
        "-q",
        "-o",
        out,
    )
    assert result.exit_code == 0, result.stderr
    records = {record["input"]: record for record in json_lines(result.stdout)}
    assert [records[str(path)]["correct"] for path in photos] == [True] * len(right) + [False] * len(wrong)
    for path in photos:
        record = records[str(path)]
        (output,) = record["outputs"]
        predicted = record["predictions"][0]["class"]
        width, height = Image.open(path).size
        if record["correct"]:
            assert "expected_class" not in output and output["class"] == predicted
            continue
        assert (output["class"], output["expected_class"]) == (predicted, record["expected"])
        assert Path(output["png"]).name == f"gradcam_relu2_c{predicted}_expected_c{record['expected']}.png"
        picture = Image.open(output["png"])
        assert picture.text["hookviz:layout"] == "predicted | expected"
        assert picture.width > 2 * picture.height * width / height  # two pictures of the image's shape, in a row
        raw = np.load(output["raw"])
        assert raw.shape == (2, height, width)
        for half, class_index in zip(raw, (predicted, record["expected"])):  # each half is gradcam --class's own map
            single = hookviz(
                "gradcam",
                MODEL,
                path,
                *OPTIONS,
                "-c",
                class_index,
                "--save-raw",
                "--json",
                "-q",
                "-o",
                project / f"single{class_index}",
                "--overwrite",
            )
            (alone,) = json_lines(single.stdout)
            np.testing.assert_allclose(half, np.load(alone["outputs"][0]["raw"]), atol=1e-5)  # batched vs alone


@pytest.mark.parametrize("explain", ["expected", "predicted"])
def test_c_expected_or_predicted_explains_that_class_alone(project, explain):
    labelled_folder(project / "photos", {"cat": 3, "ship": 3})
    result = hookviz(
        "gradcam",
        MODEL,
        project / "photos",
        *OPTIONS,
        "--expected",
        "folder",
        "--labels",
        project / "labels.txt",
        "-c",
        explain,
        "--json",
        "-q",
        "-o",
        project / "out",
    )
    assert result.exit_code == 0, result.stderr
    for record in json_lines(result.stdout):
        (output,) = record["outputs"]
        wanted = record["expected"] if explain == "expected" else record["predictions"][0]["class"]
        assert output["class"] == wanted and "expected_class" not in output
        assert output["score"] == pytest.approx(float(probabilities_of(Path(record["input"]))[wanted]), abs=2e-6)


def test_csv_labels_for_the_images_given_and_a_missing_file_fails_alone(project):
    photos = labelled_folder(project / "photos", {"p": 3})
    (project / "labels.csv").write_text("path,label\nphotos/p/p0.png,cat\nphotos/p/p1.png,99\nphotos/p/p2.png,ship\n")
    result = hookviz(
        "gradcam",
        MODEL,
        *photos,
        project / "photos" / "gone.png",
        *OPTIONS,
        "--labels",
        project / "labels.txt",
        "--expected",
        project / "labels.csv",
        "--json",
        "-q",
        "-o",
        project / "out",
    )
    assert result.exit_code == 1
    records = {Path(record["input"]).name: record for record in json_lines(result.stdout)}
    assert [records[name]["status"] for name in ("p0.png", "p1.png", "p2.png", "gone.png")] == [
        "ok",
        "error",
        "ok",
        "error",
    ]
    assert (
        records["p1.png"]["error"]
        == f"{project / 'labels.csv'} line 3: class 99 is out of range: this model has classes 0..9"
    )
    assert records["gone.png"]["error"] == f"{project / 'photos' / 'gone.png'}: file not found"
    assert (records["p0.png"]["expected"], records["p2.png"]["expected"]) == (0, 3)
    assert result.stderr.count("hookviz: error: ") == 2


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["-c", "cat"], "with --expected, -c is one of expected, predicted, both (default both), not '-c cat'"),
        (["-k", "2"], "--expected explains the top-1 prediction and the expected class; leave out --top-k"),
        (["--expected", "nothing.csv"], None),
    ],
)
def test_expected_option_errors(project, extra, message):
    labelled_folder(project / "photos", {"cat": 1})
    args = ["gradcam", MODEL, project / "photos", *OPTIONS, "-q", "-o", project / "out"]
    if "--expected" not in extra:
        args += ["--expected", "folder"]
    result = hookviz(*args, *extra)
    if message is None:
        message = (
            "--expected nothing.csv: no such file; use 'folder' (photos/<class>/*.jpg), a CSV file path,label or a "
            "JSON Lines file"
        )
    assert_usage_error(result, message)


def test_shards_and_resume_keep_the_expected_labels(project):
    right_and_wrong(project)
    out = project / "out"
    common = [
        "gradcam",
        MODEL,
        project / "photos",
        *OPTIONS,
        "--labels",
        project / "labels.txt",
        "--expected",
        "folder",
        "-q",
        "-o",
        out,
    ]
    for shard in ("1/2", "2/2"):
        assert hookviz(*common, "--shard", shard).exit_code == 0
    resumed = hookviz(*common, "--skip-existing", "--json")
    assert resumed.exit_code == 0
    records = json_lines(resumed.stdout)
    assert [record["status"] for record in records] == ["skipped"] * 6
    manifested = {e["input"]: e for e in read_manifest(out) if e["type"] == "input" and e["status"] == "ok"}
    for record in records:
        assert record["expected"] == LABELS.index(Path(record["input"]).parent.name)
        assert {k: record[k] for k in ("expected", "correct", "expected_rank")} == {
            k: manifested[record["input"]][k] for k in ("expected", "correct", "expected_rank")
        }


def test_the_labelled_job_leaves_the_model_as_it_was(project):
    """The library path: LabelledCamJob over prepared images; no hook left, modes and .grad untouched."""
    from hookviz.jobs import CamOptions, LabelledCamJob
    from hookviz.models import load_model
    from hookviz.pipeline import prepare_image

    right, wrong = right_and_wrong(project, right=2, wrong=2)
    loaded = load_model(MODEL, size=(SIZE, SIZE), mean=(MEAN,) * 3, std=(STD,) * 3, labels=str(project / "labels.txt"))
    loaded.module.train()  # whatever mode the user left it in
    labels = expected_labels("folder", [str(project / "photos")], class_names=loaded.labels, num_classes=10)
    job = LabelledCamJob(loaded, CamOptions(out_dir=project / "out", layer="relu2"), labels)
    batch = [prepare_image(path, path.stem, loaded.preprocessing, crop=False) for path in labels.inputs]
    result = job.compute(batch)
    assert result.expected_maps is not None
    for b, item in enumerate(batch):
        predicted = int(result.predicted.classes[b, 0])
        expected = labels.of(item.path).class_index
        assert int(result.expected_maps.classes[b, 0]) == expected
        assert (predicted == expected) == (item.path in right)
    assert loaded.module.training and all(module.training for module in loaded.module.modules())
    assert all(parameter.grad is None for parameter in loaded.module.parameters())
    assert all(not module._forward_hooks and not module._forward_pre_hooks for module in loaded.module.modules())


def test_paths_from_stdin_take_their_class_from_their_folder(project):
    right, wrong = right_and_wrong(project, right=2, wrong=1)
    (stray,) = labelled_folder(project / "photos", {"kitten": 1})
    listed = "".join(f"{path}\n" for path in [*right, *wrong, stray])
    result = hookviz(
        "gradcam",
        MODEL,
        "-",
        *OPTIONS,
        "--labels",
        project / "labels.txt",
        "--expected",
        "folder",
        "--json",
        "-q",
        "-o",
        project / "out",
        stdin=listed,
    )
    assert result.exit_code == 1
    records = {Path(record["input"]): record for record in json_lines(result.stdout)}
    assert [records[path]["correct"] for path in [*right, *wrong]] == [True, True, False]
    assert records[stray]["error"] == (
        f"{stray}: --expected folder: {stray.parent}: 'kitten' is not a class name of this model; see the names "
        "with --labels, or give indices"
    )
