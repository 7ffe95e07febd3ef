"""``hookviz evaluate``: the claims the ranking rests on, proven on the pretrained demo model and photos where the
object is known, and the command's records, files, resume and one-line errors on a small model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from cli_helpers import BATCHNET, SIZE, assert_usage_error, hookviz, image_folder, inputs_of, json_lines, read_manifest
from PIL import Image

from hookviz import metrics
from hookviz.evaluation import summarize
from hookviz.models import load_model
from hookviz.pipeline import model_batch, prepare_image

SMALL = [BATCHNET, *SIZE, "-l", "relu2"]  # MODEL and its options for the command's plumbing


def _composites(demo_model: Path, cat_composites):
    loaded = load_model(str(demo_model), labels="imagenet")
    items = [prepare_image(path, path.stem, loaded.preprocessing, crop=False) for path, _ in cat_composites]
    return loaded, items, model_batch(items, loaded)


def test_a_map_on_the_cat_beats_the_same_map_flipped_to_the_other_half(demo_model: Path, cat_composites) -> None:
    """On a cat photo beside an unrelated photo, the model's top class is a cat; a map covering the cat's box must
    delete the cat faster, insert it faster and pass ROAD better than the same map mirrored onto the other photo."""
    loaded, items, inputs = _composites(demo_model, cat_composites)
    scorer = metrics.Scorer(loaded.module, chunk=16)
    probabilities = scorer.all_probabilities(inputs)
    classes = probabilities.argmax(dim=1, keepdim=True)
    assert all("cat" in loaded.label(int(c)) for c in classes[:, 0])
    height, width = inputs.shape[-2:]
    on_cat = torch.zeros(len(items), 1, height, width)
    for b, ((_, (x0, _, x1, _)), item) in enumerate(zip(cat_composites, items, strict=True)):
        scale = width / item.size[0]  # the whole photo is resized to the model's input
        on_cat[b, 0, :, round(x0 * scale) : round(x1 * scale)] = 1.0
    on_cat = on_cat + 0.1 * torch.rand(on_cat.shape, generator=torch.Generator().manual_seed(0))  # an order inside
    maps = torch.cat([on_cat, on_cat.flip(-1)], dim=1)  # (B, 2, H, W): on the cat, mirrored
    both = classes.repeat(1, 2)
    curves = metrics.deletion_insertion(scorer, inputs, maps, both, steps=8, probabilities=probabilities)
    deletion, insertion = curves.area(curves.deletion), curves.area(curves.insertion)
    removed = metrics.road(scorer, inputs, maps, both, percentiles=(20, 50, 80))
    assert (deletion[:, 0] < deletion[:, 1]).all(), deletion
    assert (insertion[:, 0] > insertion[:, 1]).all(), insertion
    assert (removed.difference[:, 0] > removed.difference[:, 1]).all(), removed.difference


def test_the_random_baseline_ranks_last(demo_model: Path, cat_composites, tmp_path: Path) -> None:
    photos = [str(path) for path, _ in cat_composites]
    result = hookviz(
        "evaluate", demo_model, *photos, "-m", "gradcam", "-m", "layercam", "-m", "random",
        "--metric", "deletion", "--metric", "insertion", "--steps", "8", "--json", "-q", "-o", tmp_path / "out",
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    summary = json_lines(result.stdout)[-1]
    assert summary["type"] == "summary" and summary["images"] == 2
    assert [row["method"] for row in summary["rows"]][-1] == "random"
    random_row = summary["rows"][-1]
    assert random_row["scores"]["deletion"]["rank"] == 3 and random_row["scores"]["insertion"]["rank"] == 3


def test_sanity_flags_guided_backprop_not_gradcam(demo_model: Path, cat_composites, tmp_path: Path) -> None:
    """Adebayo et al.: guided backprop's map hardly changes when the model's weights are randomized, Grad-CAM's
    does. The summary flags the one whose map stays rank-correlated with the original."""
    out = tmp_path / "out"
    result = hookviz(
        "evaluate", demo_model, cat_composites[0][0], "-m", "gradcam", "-m", "guided", "--metric", "sanity",
        "--json", "-o", out,
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    rows = {row["method"]: row for row in json_lines(result.stdout)[-1]["rows"]}
    guided, gradcam = rows["guided"], rows["gradcam"]
    assert guided["scores"]["sanity_spearman"]["mean"] > gradcam["scores"]["sanity_spearman"]["mean"] + 0.3
    assert guided["flags"] == ["insensitive"] and gradcam["flags"] == []
    assert "sanity: the map of guided hardly changes when the model is randomized" in result.stderr
    assert Image.open(out / "sanity.png").size[0] > 400


def test_records_files_and_summary(project: Path) -> None:
    photos = image_folder(project / "photos", 3)
    out = project / "out"
    result = hookviz(
        "evaluate", *SMALL, project / "photos", "-m", "gradcam", "-m", "random", "--steps", "4", "--json", "-o", out
    )
    assert result.exit_code == 0, result.stderr
    *records, summary = json_lines(result.stdout)
    assert [record["input"] for record in records] == [str(path) for path in photos]
    scored = records[0]["outputs"][0]
    assert scored["kind"] == "evaluate" and Path(scored["png"]).is_file()
    assert [entry["method"] for entry in scored["maps"]] == ["gradcam", "random"]
    numbers = scored["maps"][0]
    assert set(metrics.score_names(metrics.DEFAULT_METRICS)) <= set(numbers)
    assert len(numbers["deletion_curve"]) == 5 and numbers["deletion_curve"][0] == pytest.approx(
        scored["score"], abs=1e-5
    )
    assert numbers["road"] == pytest.approx(numbers["road_lerf"] - numbers["road_morf"], abs=2e-6)
    # The manifest holds the same numbers, and the summary is their mean.
    assert inputs_of(read_manifest(out))[0]["outputs"] == records[0]["outputs"]
    row = next(row for row in summary["rows"] if row["method"] == "gradcam")
    mean = sum(record["outputs"][0]["maps"][0]["insertion"] for record in records) / 3
    assert row["scores"]["insertion"]["mean"] == pytest.approx(mean, abs=1e-6)
    assert row["scores"]["insertion"]["low"] <= mean <= row["scores"]["insertion"]["high"]
    assert json.loads((out / "evaluate.json").read_text())["rows"] == summary["rows"]
    assert Image.open(out / "evaluate.png").size[0] >= 600


def test_a_resumed_run_summarizes_every_input(project: Path) -> None:
    image_folder(project / "photos", 3)
    out = project / "out"
    args = ["evaluate", *SMALL, "-m", "gradcam", "--metric", "insertion", "--steps", "3", "--json", "-o", out]
    first = hookviz(*args, project / "photos" / "img00.png")
    second = hookviz(*args, project / "photos", "--skip-existing")
    assert first.exit_code == second.exit_code == 0
    *records, summary = json_lines(second.stdout)
    assert [record["status"] for record in records] == ["skipped", "ok", "ok"]
    assert summary["images"] == 3 and summary["rows"][0]["scores"]["insertion"]["count"] == 3


def test_pointing_and_energy_with_truth_boxes(project: Path) -> None:
    photos = image_folder(project / "photos", 2)
    truth = project / "boxes.csv"
    truth.write_text("path,x0,y0,x1,y1\n" + "".join(f"{path},0,0,32,48\n" for path in photos))
    result = hookviz(
        "evaluate", *SMALL, project / "photos", "-m", "gradcam", "--truth", truth, "--json", "-o", project / "out"
    )
    assert result.exit_code == 0, result.stderr
    *records, summary = json_lines(result.stdout)
    numbers = records[0]["outputs"][0]["maps"][0]
    assert numbers["pointing"] in (0.0, 1.0) and 0.0 <= numbers["energy"] <= 1.0
    assert {"pointing", "energy"} <= set(summary["scores"])


def test_a_truth_box_outside_the_image_fails_that_image(project: Path) -> None:
    photos = image_folder(project / "photos", 2)
    truth = project / "boxes.csv"
    truth.write_text(f"{photos[0]},0,0,100,10\n{photos[1]},0,0,10,10\n")
    result = hookviz(
        "evaluate", *SMALL, project / "photos", "-m", "gradcam", "--metric", "pointing", "--truth", truth,
        "--json", "-q", "-o", project / "out",
    )  # fmt: skip
    assert result.exit_code == 1
    *records, _ = json_lines(result.stdout)
    assert records[0]["error"] == (
        f"{photos[0]}: truth box 0,0,100,10 lies outside the image (64x48 pixels); "
        "boxes are x0,y0,x1,y1 in the image's pixels"
    )
    assert records[1]["status"] == "ok"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--metric", "delet"], "unknown metric 'delet'; did you mean deletion?"),
        (
            ["--metric", "pointing"],
            "metric pointing needs to know where the object is: give --truth FILE.csv (path,x0,y0,x1,y1) "
            "or --truth-masks DIR",
        ),
        (["--truth", "t.csv", "--truth-masks", "."], "give either --truth or --truth-masks, not both"),
    ],
)
def test_one_line_errors(project: Path, args: list[str], message: str) -> None:
    photo = image_folder(project / "photos", 1)[0]
    assert_usage_error(hookviz("evaluate", *SMALL, photo, *args, "-o", project / "out"), message)


def test_summary_ranks_by_mean_rank_with_the_direction_of_each_number() -> None:
    def record(deletion_a: float, deletion_b: float) -> dict:
        maps = [
            {"method": "a", "layer": "l", "deletion": deletion_a, "insertion": 0.9},
            {"method": "b", "layer": "l", "deletion": deletion_b, "insertion": 0.1},
        ]
        return {"status": "ok", "outputs": [{"kind": "evaluate", "maps": maps}]}

    summary = summarize([record(0.1, 0.5), record(0.2, 0.4)], ["deletion", "insertion"])
    assert [(row.method, row.rank) for row in summary.rows] == [("a", 1), ("b", 2)]
    assert summary.rows[0].scores["deletion"].mean == pytest.approx(0.15)
    assert summary.rows[0].scores["deletion"].low >= 0.1 and summary.rows[0].scores["deletion"].high <= 0.2


def test_gradcam_metric_attaches_the_numbers_evaluate_gives(project: Path) -> None:
    photos = image_folder(project / "photos", 2)
    scored = ["--metric", "deletion", "--metric", "insertion", "--metric", "drop"]
    cams = hookviz("gradcam", *SMALL, project / "photos", *scored, "--json", "-o", project / "cams")
    evaluated = hookviz(
        "evaluate", *SMALL, project / "photos", "-m", "gradcam", *scored, "--json", "-o", project / "ev"
    )
    assert cams.exit_code == evaluated.exit_code == 0, cams.stderr + evaluated.stderr
    *records, _ = json_lines(evaluated.stdout)
    for cam_record, record in zip(json_lines(cams.stdout), records, strict=True):
        overlay, numbers = cam_record["outputs"][0], record["outputs"][0]["maps"][0]
        assert Path(overlay["png"]).is_file()
        for name in ("deletion", "insertion", "drop"):
            assert overlay[name] == pytest.approx(numbers[name], abs=1e-6), name
    assert len(records) == len(photos)
    error = hookviz("gradcam", *SMALL, photos[0], "--metric", "pointing", "-o", project / "cams2")
    assert_usage_error(error, "gradcam --metric pointing: use 'hookviz evaluate --metric pointing' for it")


def test_html_shows_the_ranking_and_the_curves(project: Path) -> None:
    image_folder(project / "photos", 2)
    out = project / "out"
    result = hookviz("evaluate", *SMALL, project / "photos", "-m", "gradcam", "-m", "random", "--metric", "insertion",
                     "--steps", "3", "--html", "-q", "-o", out)  # fmt: skip
    assert result.exit_code == 0, result.stderr
    page = (out / "index.html").read_text()
    assert "Which map to trust" in page and 'src="evaluate.png"' in page
    assert page.count("evaluate_c") >= 2  # each image's curves picture is on its card


def test_by_default_every_cam_method_but_the_per_channel_ones_and_the_random_baseline_are_ranked(
    project: Path,
) -> None:
    from hookviz.methods import CAM_METHODS

    image_folder(project / "photos", 1)
    result = hookviz("evaluate", *SMALL, project / "photos", "--metric", "insertion", "--steps", "2", "--json", "-q",
                     "-o", project / "out")  # fmt: skip
    assert result.exit_code == 0, result.stderr
    rows = json_lines(result.stdout)[-1]["rows"]
    per_channel = {"scorecam", "ablationcam"}  # a forward pass per channel: only with -m
    assert sorted(row["method"] for row in rows) == sorted([*(set(CAM_METHODS) - per_channel), "random"])
    assert sorted(row["rank"] for row in rows)[0] == 1


def test_truth_masks_are_read_by_image_name(project: Path) -> None:
    photos = image_folder(project / "photos", 2)
    masks = project / "masks"
    masks.mkdir()
    mask = Image.new("L", (64, 48), 0)
    mask.paste(255, (0, 0, 32, 48))
    mask.save(masks / "img00.png")  # img01 has no mask: its numbers are null
    result = hookviz("evaluate", *SMALL, project / "photos", "-m", "gradcam", "--metric", "energy",
                     "--truth-masks", masks, "--json", "-o", project / "out")  # fmt: skip
    assert result.exit_code == 0, result.stderr
    first, second, summary = json_lines(result.stdout)
    assert 0.0 <= first["outputs"][0]["maps"][0]["energy"] <= 1.0
    assert second["outputs"][0]["maps"][0]["energy"] is None
    assert summary["rows"][0]["scores"]["energy"]["count"] == 1
    assert [record["input"] for record in (first, second)] == [str(path) for path in photos]
