"""Model zoos and formats beyond torchvision classifiers, loaded as a user would load them.

* torchvision segmentation and detection models by name, built with ``--weights none`` without any download;
* ``timm:NAME`` (random weights, and pretrained weights from a Hugging Face cache laid out as the hub lays it out);
* Hugging Face image classifiers: a ``save_pretrained`` directory and ``hf:ORG/NAME`` from the cache;
* ``.safetensors`` state_dicts (architecture detected as for ``.pth``, ``--arch``, ``--state-dict``);
* vision transformers with several prefix tokens (class + registers, class + distillation) read as patch grids.

Every model has random weights; every file is written into tmp_path; nothing touches the network.
"""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_helpers import assert_usage_error, hookviz, json_lines, write_noise_image
from PIL import Image

from hookviz.cams import compute_cams
from hookviz.errors import UsageError
from hookviz.images import preprocess
from hookviz.layers import trace_layers
from hookviz.models import load_model, zoo
from hookviz.spatial import Layout, spatial_layout, to_spatial

SNAPSHOT = "0123456789abcdef0123456789abcdef01234567"  # a commit hash, as the hub cache names snapshot folders


def assert_same_maps(first: torch.nn.Module, second: torch.nn.Module, batch: torch.Tensor, layer: str) -> None:
    """Grad-CAM of the same class at ``layer`` from two modules: equal to 1e-5 (and not blank)."""
    ours = compute_cams(first.eval(), batch, layer=layer, classes=[0, 1])
    theirs = compute_cams(second.eval(), batch, layer=layer, classes=[0, 1])
    assert ours.maps.shape == theirs.maps.shape
    assert float(ours.maps.max()) > 0
    assert float((ours.maps - theirs.maps).abs().max()) < 1e-5


def hub_cache(root: Path, repo: str, files: dict[str, bytes | Path]) -> Path:
    """Lay ``files`` out as huggingface_hub caches a download of ``repo``; return the snapshot folder."""
    folder = root / ("models--" + repo.replace("/", "--"))
    snapshot = folder / "snapshots" / SNAPSHOT
    snapshot.mkdir(parents=True)
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text(SNAPSHOT)
    for name, content in files.items():
        (snapshot / name).write_bytes(content.read_bytes() if isinstance(content, Path) else content)
    return snapshot


@pytest.fixture
def empty_hub_cache(tmp_path, monkeypatch) -> Path:
    """An empty Hugging Face cache (and torch hub dir) in tmp_path, as HF_HUB_CACHE would point to."""
    huggingface_hub = pytest.importorskip("huggingface_hub")
    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    saved = torch.hub.get_dir()
    torch.hub.set_dir(str(tmp_path / "torch-hub"))
    yield cache
    torch.hub.set_dir(saved)


@pytest.fixture
def photo(tmp_path) -> Path:
    return write_noise_image(tmp_path / "photo.jpg", 80, 60, seed=3)


@pytest.fixture
def no_downloads(monkeypatch):
    """Any attempt to fetch weights fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"a download was attempted: {args} {kwargs}")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse)
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)


# --- torchvision segmentation and detection ------------------------------------------------------

SEGMENTATION = ["fcn_resnet50", "deeplabv3_mobilenet_v3_large", "lraspp_mobilenet_v3_large"]
DETECTION = [
    "fasterrcnn_mobilenet_v3_large_320_fpn",
    "retinanet_resnet50_fpn",
    "fcos_resnet50_fpn",
    "ssdlite320_mobilenet_v3_large",
]


def test_segmentation_and_detection_names_are_in_the_zoo():
    assert set(SEGMENTATION) <= set(zoo.task_model_names("segmentation"))
    assert set(DETECTION) <= set(zoo.task_model_names("detection"))
    assert zoo.model_task("fcn_resnet50") == "segmentation"
    assert zoo.model_task("retinanet_resnet50_fpn") == "detection"
    assert zoo.model_task("resnet18") == "classification"
    assert zoo.model_task("no_such_net") is None


@pytest.mark.parametrize("name", SEGMENTATION)
def test_segmentation_model_builds_with_random_weights_and_no_download(name, no_downloads):
    loaded = load_model(name, weights="none", device="cpu")

    assert loaded.task == "segmentation"
    assert loaded.output_key == "out"
    assert loaded.labels is None  # random weights: no class names
    # The weights' own transform: ImageNet statistics, the shorter side resized to 520.
    assert loaded.preprocessing.input_size == (520, 520)
    assert loaded.preprocessing.mean == (0.485, 0.456, 0.406)
    assert "random weights" in loaded.description


@pytest.mark.parametrize("name", DETECTION)
def test_detection_model_builds_with_random_weights_and_no_download(name, no_downloads):
    loaded = load_model(name, weights="none", device="cpu")

    assert loaded.task == "detection"
    # Images in [0, 1]: the detector normalizes (and resizes) inside, with its own statistics.
    assert loaded.preprocessing.mean == (0.0, 0.0, 0.0)
    assert loaded.preprocessing.std == (1.0, 1.0, 1.0)
    side = 320 if "320" in name else 800
    assert loaded.preprocessing.input_size == (side, side)
    transform = loaded.module.transform
    assert (transform.fixed_size or (transform.min_size[-1],) * 2) == (side, side)


@pytest.mark.parametrize(("name", "count"), [("fcn_resnet50", 21), ("fasterrcnn_mobilenet_v3_large_320_fpn", 91)])
def test_category_names_of_the_default_weights_are_read_without_download(name, count, no_downloads):
    names = zoo.category_names(name)

    assert names is not None and len(names) == count
    assert names[0] == "__background__"
    assert "person" in names


@pytest.mark.parametrize(
    ("name", "build", "count"),
    [
        ("lraspp_mobilenet_v3_large", {}, 21),
        ("deeplabv3_mobilenet_v3_large", {"aux_loss": True}, 21),  # the DEFAULT weights have the aux head
        ("fasterrcnn_mobilenet_v3_large_320_fpn", {}, 91),
    ],
)
def test_default_weights_bring_their_category_names(name, build, count, monkeypatch):
    # The DEFAULT weights' file is replaced by a random state_dict of the same model: the code path is the
    # user's (get_model with the weights enum), without the download.
    from torchvision.models import get_model
    from torchvision.models._api import WeightsEnum

    torch.manual_seed(0)
    stand_in = get_model(name, weights=None, weights_backbone=None, **build).state_dict()
    monkeypatch.setattr(WeightsEnum, "get_state_dict", lambda self, *args, **kwargs: stand_in)

    loaded = load_model(name, device="cpu")

    assert loaded.labels is not None and len(loaded.labels) == count
    assert loaded.label(15 if count == 21 else 1) == "person"
    assert "_Weights.COCO" in loaded.description or "_Weights.COCO_WITH_VOC_LABELS" in loaded.description
    assert loaded.task == ("detection" if count == 91 else "segmentation")
    key = next(iter(stand_in))
    assert torch.equal(loaded.module.state_dict()[key].cpu(), stand_in[key])


def test_detector_output_count_is_none_and_segmentation_counts_classes_per_pixel():
    detector = load_model("fasterrcnn_mobilenet_v3_large_320_fpn", weights="none", device="cpu")
    segmenter = load_model("lraspp_mobilenet_v3_large", weights="none", size=(64, 64), device="cpu")

    assert detector.output_count() is None  # a list of {"boxes", "labels", "scores"}: no per-class scores
    assert segmenter.output_count() == 21  # (N, 21, H, W)


@pytest.mark.parametrize(
    ("name", "layer", "grid"),
    [("fcos_resnet50_fpn", "backbone.fpn", [12, 16]), ("ssdlite320_mobilenet_v3_large", "backbone", [6, 8])],
)
def test_size_sets_the_size_the_detector_runs_at(name, layer, grid):
    # Without this the detector would resize a 96x128 input to its own 800 px (SSDlite: 320x320) inside.
    result = hookviz("layers", name, "--weights", "none", "--size", "96x128", "--json")

    assert result.exit_code == 0, result.stderr
    (marked,) = [record for record in json.loads(result.stdout) if record["cam_default"]]
    assert marked["name"] == layer
    assert marked["output_shape"][2:] == grid  # stride 8 (FCOS P3) and 16 (SSDlite) of 96x128
    loaded = load_model(name, weights="none", size=(96, 128), device="cpu")
    with torch.no_grad():
        boxes = loaded.module(torch.rand(1, 3, 96, 128, generator=torch.Generator().manual_seed(0)))[0]["boxes"]
    if len(boxes):  # boxes are in input pixels
        assert float(boxes[:, 2].max()) <= 128 and float(boxes[:, 3].max()) <= 96


def test_detection_preprocessing_gives_the_image_in_0_1_at_the_detector_size(photo):
    loaded = load_model("ssdlite320_mobilenet_v3_large", weights="none", device="cpu")
    image = Image.open(photo).convert("RGB")

    tensor = preprocess(image, loaded.preprocessing)

    expected = np.asarray(image.resize((320, 320), Image.Resampling.BILINEAR), dtype=np.float32) / 255
    assert tuple(tensor.shape) == (3, 320, 320)
    assert np.abs(tensor.permute(1, 2, 0).numpy() - expected).max() < 1e-6


@pytest.mark.parametrize(
    ("name", "size", "layer", "shape"),
    [
        ("fcn_resnet50", "64", "backbone.layer4", [1, 2048, 8, 8]),  # dilated: stride 8
        ("lraspp_mobilenet_v3_large", "64", "backbone.16", [1, 960, 4, 4]),
        ("fasterrcnn_mobilenet_v3_large_320_fpn", None, "backbone.fpn", [1, 256, 10, 10]),  # FPN level "0"
        ("ssdlite320_mobilenet_v3_large", None, "backbone", [1, 672, 20, 20]),
    ],
)
def test_layers_lists_the_model_and_marks_its_default_cam_layer(name, size, layer, shape):
    result = hookviz("layers", name, "--weights", "none", "--json", *(["--size", size] if size else []))

    assert result.exit_code == 0, result.stderr
    records = json.loads(result.stdout)
    marked = [record for record in records if record["cam_default"]]
    assert [record["name"] for record in marked] == [layer]
    assert marked[0]["output_shape"] == shape
    assert len(records) > 50  # every module is listed


def test_unknown_model_name_suggests_segmentation_and_detection_names():
    with pytest.raises(UsageError, match="did you mean") as info:
        load_model("fcn_resnet5", weights="none")

    assert "fcn_resnet50" in str(info.value)


# --- timm ----------------------------------------------------------------------------------------


def test_timm_model_with_random_weights_from_the_cli(photo, tmp_path):
    pytest.importorskip("timm")

    result = hookviz("gradcam", "timm:resnet18", photo, "--weights", "none", "--size", "64", "-o", tmp_path / "out",
                     "--json")  # fmt: skip

    assert result.exit_code == 0, result.stderr
    (record,) = json_lines(result.stdout)
    assert record["status"] == "ok"
    assert record["outputs"][0]["layer"] == "layer4"
    assert record["outputs"][0]["label"] == f"class {record['outputs'][0]['class']}"  # random weights: no names
    assert "timm resnet18 (random weights)" in result.stderr


def test_timm_preprocessing_is_timms_data_config():
    timm = pytest.importorskip("timm")

    loaded = load_model("timm:vit_tiny_patch16_224", weights="none", device="cpu")

    config = timm.data.resolve_data_config(model=timm.create_model("vit_tiny_patch16_224"))
    assert loaded.preprocessing.input_size == config["input_size"][1:]
    assert loaded.preprocessing.mean == config["mean"] == (0.5, 0.5, 0.5)
    assert loaded.preprocessing.interpolation == config["interpolation"] == "bicubic"
    assert loaded.preprocessing.resize_size == int(224 / config["crop_pct"])  # timm: floor(size / crop_pct)
    assert loaded.prefix_tokens == 1


def test_timm_pretrained_weights_missing_from_the_cache_is_one_line(empty_hub_cache):
    pytest.importorskip("timm")

    result = hookviz("layers", "timm:resnet18")

    assert_usage_error(
        result,
        f"timm:resnet18: the pretrained weights (timm/resnet18.a1_in1k) are not in the local cache ({empty_hub_cache}); "
        "download them once with network (python -c \"import timm; timm.create_model('resnet18', pretrained=True)\"), "
        "or pass --weights none for random weights",
    )


def test_timm_pretrained_weights_are_read_from_the_hub_cache(empty_hub_cache, tmp_path):
    timm = pytest.importorskip("timm")
    from safetensors.torch import save_file

    torch.manual_seed(0)
    trained = timm.create_model("resnet18").eval()  # stands in for the weights timm would have downloaded
    weights = tmp_path / "model.safetensors"
    save_file(trained.state_dict(), str(weights))
    hub_cache(empty_hub_cache, "timm/resnet18.a1_in1k", {"model.safetensors": weights})

    loaded = load_model("timm:resnet18", device="cpu")  # --weights DEFAULT

    assert loaded.description == "timm resnet18 (a1_in1k pretrained weights)"
    assert loaded.labels is not None and len(loaded.labels) == 1000
    assert loaded.labels[:2] == ["tench", "goldfish"]
    batch = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    assert_same_maps(trained, loaded.module, batch, "layer4")


def test_timm_bad_names_and_weights_are_one_line_errors():
    pytest.importorskip("timm")

    with pytest.raises(UsageError, match=r"unknown timm model 'resnet1'; did you mean resnet18"):
        load_model("timm:resnet1", weights="none")
    with pytest.raises(UsageError, match="choose DEFAULT .* or none"):
        load_model("timm:resnet18", weights="IMAGENET1K_V1")


def test_missing_timm_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # import timm fails as when it is not installed

    result = hookviz("layers", "timm:resnet18", "--weights", "none")

    assert_usage_error(result, "timm: models need the timm package: pip install 'hookviz[timm]'")


# --- vision transformers with several prefix tokens ----------------------------------------------

TINY_VITS = """
import timm


def with_registers():
    # a class token and 4 register tokens before a 4x4 grid of 8x8 patches (as in timm's *_reg4_* models)
    return timm.create_model(
        "vit_small_patch16_224", img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2,
        reg_tokens=4, num_classes=5, dynamic_img_size=True,
    )


def distilled():
    # DeiT: a class token and a distillation token
    return timm.create_model(
        "deit_tiny_distilled_patch16_224", img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2,
        num_classes=5,
    )
"""


@pytest.fixture
def tiny_vits(tmp_path, monkeypatch):
    pytest.importorskip("timm")
    (tmp_path / "tiny_vits.py").write_text(textwrap.dedent(TINY_VITS))
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    torch.manual_seed(0)
    import tiny_vits

    yield tiny_vits
    sys.modules.pop("tiny_vits", None)


@pytest.mark.parametrize(("builder", "prefix"), [("with_registers", 5), ("distilled", 2)])
def test_prefix_tokens_are_dropped_and_the_patches_read_as_a_grid(tiny_vits, builder, prefix):
    model = getattr(tiny_vits, builder)().eval()
    assert model.num_prefix_tokens == prefix
    tokens = model.blocks[-1].norm1(model.blocks[-1](model._pos_embed(model.patch_embed(torch.zeros(1, 3, 32, 32)))))

    layout = spatial_layout(tokens.shape, (32, 32))

    assert tokens.shape[1] == prefix + 16
    assert layout == Layout("tokens", 4, 4, prefix=prefix)
    assert spatial_layout(tokens.shape, (32, 32), prefix=prefix) == layout


def test_register_tokens_at_a_non_square_size():
    # 1 class + 4 registers + a 4x8 grid; read with at most 2 prefix tokens it was a wrong 4x9 grid after 1.
    assert spatial_layout((2, 5 + 4 * 8, 32), (32, 64)) == Layout("tokens", 4, 8, prefix=5)
    assert spatial_layout((2, 5 + 16, 32), (32, 32)) == Layout("tokens", 4, 4, prefix=5)
    assert spatial_layout((2, 5 + 16, 32), (32, 32), prefix=5) == Layout("tokens", 4, 4, prefix=5)


def test_gradcam_on_register_tokens_matches_a_direct_computation(tiny_vits):
    model = tiny_vits.with_registers().eval()
    batch = torch.rand(2, 3, 32, 64, generator=torch.Generator().manual_seed(2))  # non-square: a 4x8 grid
    layer = "blocks.1.norm1"

    cams = compute_cams(model, batch, layer=layer, classes=list(range(5)))

    captured = {}
    handle = model.blocks[1].norm1.register_forward_hook(lambda m, i, o: captured.setdefault("tokens", o))
    try:
        logits = model(batch)
    finally:
        handle.remove()
    tokens = captured["tokens"]
    grid = lambda t: t[:, 5:].transpose(1, 2).reshape(2, 32, 4, 8)  # noqa: E731  drop class + 4 registers
    expected = []
    for index in range(5):
        (gradient,) = torch.autograd.grad(logits[:, index].sum(), tokens, retain_graph=True)
        weights = grid(gradient).mean(dim=(2, 3), keepdim=True)
        expected.append(torch.relu((weights * grid(tokens)).sum(dim=1)).detach())
    expected = torch.stack(expected, dim=1)
    assert tuple(cams.maps.shape) == (2, 5, 4, 8)
    assert float((cams.maps - expected).abs().max()) < 1e-5
    assert float(expected.max()) > 0


def test_timm_vit_with_registers_from_the_cli(tiny_vits, tmp_path, photo):
    result = hookviz("gradcam", "tiny_vits:with_registers", photo, "--size", "32", "-o", tmp_path / "out", "--json")

    assert result.exit_code == 0, result.stderr
    (record,) = json_lines(result.stdout)
    assert record["outputs"][0]["layer"] == "blocks.1.norm1"  # the last block's input norm, as for torchvision's ViT
    png = Path(record["outputs"][0]["png"])
    with Image.open(png) as image:
        assert image.size[0] * 60 == image.size[1] * 80  # the photo's 80x60, scaled up for a small photo


# --- Hugging Face --------------------------------------------------------------------------------

LABELS = {0: "cat", 1: "dog", 2: "fox"}


def tiny_vit(folder: Path) -> torch.nn.Module:
    """A random 2-layer ViT on 32x32 images (8x8 patches), saved with its image processor into ``folder``."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.ViTConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=32,
        patch_size=8, num_labels=3, id2label=LABELS, label2id={v: k for k, v in LABELS.items()},
    )  # fmt: skip
    model = transformers.ViTForImageClassification(config).eval()
    model.save_pretrained(folder)
    transformers.ViTImageProcessor(size={"height": 32, "width": 32}, image_mean=[0.4, 0.5, 0.6]).save_pretrained(folder)
    return model


def tiny_convnext(folder: Path) -> torch.nn.Module:
    """A random ConvNeXt with 4 stages of one block, 4 classes, processor resizing to 64 / crop_pct."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.ConvNextConfig(hidden_sizes=[8, 16, 32, 64], depths=[1, 1, 1, 1], num_labels=4)
    model = transformers.ConvNextForImageClassification(config).eval()
    model.save_pretrained(folder)
    transformers.ConvNextImageProcessor(size={"shortest_edge": 64}, crop_pct=0.8).save_pretrained(folder)
    return model


def test_hugging_face_vit_directory_from_the_cli(tmp_path, photo):
    folder = tmp_path / "my-vit"
    tiny_vit(folder)

    result = hookviz("gradcam", folder, photo, "-o", tmp_path / "out", "--json", "-k", "3")

    assert result.exit_code == 0, result.stderr
    (record,) = json_lines(result.stdout)
    assert {p["label"] for p in record["predictions"]} == {"cat", "dog", "fox"}  # config.id2label
    assert {o["layer"] for o in record["outputs"]} == {"vit.layers.1.layernorm_before"} or {
        o["layer"] for o in record["outputs"]
    } == {"vit.encoder.layer.1.layernorm_before"}  # transformers 5 / 4
    assert "Hugging Face ViTForImageClassification" in result.stderr


def test_hugging_face_preprocessing_and_labels(tmp_path):
    vit, convnext = tmp_path / "vit", tmp_path / "convnext"
    tiny_vit(vit)
    tiny_convnext(convnext)

    loaded_vit = load_model(str(vit), device="cpu")
    loaded_convnext = load_model(str(convnext), device="cpu")

    assert loaded_vit.preprocessing.input_size == (32, 32)  # size {"height": 32, "width": 32}
    assert loaded_vit.preprocessing.mean == pytest.approx((0.4, 0.5, 0.6))
    assert loaded_vit.labels == ["cat", "dog", "fox"]
    assert loaded_vit.prefix_tokens == 1
    assert loaded_vit.output_count() == 3
    assert loaded_convnext.preprocessing.input_size == (64, 64)  # size {"shortest_edge": 64}
    assert loaded_convnext.preprocessing.resize_size == 80  # 64 / crop_pct 0.8
    assert loaded_convnext.preprocessing.interpolation == "bicubic"
    assert loaded_convnext.labels is None  # LABEL_0 ... LABEL_3 are placeholders
    assert loaded_convnext.output_count() == 4


@pytest.mark.parametrize(
    ("config", "model", "extra", "prefix"),
    [
        ("Dinov2WithRegistersConfig", "Dinov2WithRegistersForImageClassification", {"num_register_tokens": 4}, 5),
        ("DeiTConfig", "DeiTForImageClassificationWithTeacher", {}, 2),  # class + distillation token
    ],
)
def test_hugging_face_vits_with_several_prefix_tokens(tmp_path, config, model, extra, prefix):
    transformers = pytest.importorskip("transformers")
    if not hasattr(transformers, model):
        pytest.skip(f"this transformers has no {model}")
    settings = {
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "intermediate_size": 64,
        "image_size": 32,
    }
    built = getattr(transformers, config)(**settings, patch_size=8, num_labels=3, **extra)
    torch.manual_seed(0)
    getattr(transformers, model)(built).save_pretrained(tmp_path / "vit")
    transformers.ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(tmp_path / "vit")

    loaded = load_model(str(tmp_path / "vit"), device="cpu")
    trace = trace_layers(loaded.module, (32, 32))

    assert loaded.prefix_tokens == prefix
    layer = trace.default_cam_layer()
    assert layer is not None and layer.endswith((".1.norm1", ".1.layernorm_before"))  # the last block's first norm
    (info,) = [info for info in trace.layers if info.name == layer]
    assert info.output_shape == (1, prefix + 16, 32)
    assert info.layout == Layout("tokens", 4, 4, prefix=prefix)


def test_hugging_face_maps_agree_with_the_module_that_was_saved(tmp_path):
    vit_folder, convnext_folder = tmp_path / "vit", tmp_path / "convnext"
    vit, convnext = tiny_vit(vit_folder), tiny_convnext(convnext_folder)
    batch = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(4))

    loaded = load_model(str(vit_folder), device="cpu")
    layer = trace_layers(loaded.module, (32, 32)).default_cam_layer()
    assert layer is not None and layer.endswith("1.layernorm_before")
    assert_same_maps(vit, loaded.module, batch, layer)

    loaded = load_model(str(convnext_folder), device="cpu")
    layer = trace_layers(loaded.module, (64, 64)).default_cam_layer()
    assert layer == "convnext.encoder"  # not "convnext": its first output is not what the head reads
    assert_same_maps(convnext, loaded.module, torch.rand(2, 3, 64, 64), layer)


def test_hugging_face_weights_none_gives_random_weights_of_the_same_architecture(tmp_path):
    saved = tiny_vit(tmp_path / "vit")

    loaded = load_model(str(tmp_path / "vit"), weights="none", device="cpu")

    assert type(loaded.module) is type(saved)
    assert "random weights" in loaded.description
    assert loaded.labels == ["cat", "dog", "fox"]  # the config's names, even without its weights
    assert not torch.equal(loaded.module.classifier.weight, saved.classifier.weight)


def test_hugging_face_hub_id_from_the_cache(empty_hub_cache, tmp_path, photo):
    saved = tmp_path / "saved"
    tiny_vit(saved)
    hub_cache(empty_hub_cache, "someone/tiny-vit", {f.name: f for f in saved.iterdir()})

    result = hookviz("gradcam", "hf:someone/tiny-vit", photo, "-o", tmp_path / "out", "--json")

    assert result.exit_code == 0, result.stderr
    (record,) = json_lines(result.stdout)
    assert record["predictions"][0]["label"] in LABELS.values()


def test_hugging_face_hub_id_not_in_the_cache_is_one_line(empty_hub_cache):
    pytest.importorskip("transformers")

    result = hookviz("layers", "hf:someone/absent")

    assert_usage_error(
        result,
        f"hf:someone/absent is not in the local Hugging Face cache ({empty_hub_cache}); download it once with "
        "network (hf download someone/absent), or pass a directory saved with save_pretrained",
    )


def test_a_directory_without_config_json_is_refused(tmp_path):
    result = hookviz("layers", tmp_path)

    assert_usage_error(
        result,
        f"model {str(tmp_path)!r} is a directory without a config.json; pass a model file, a torchvision model name, "
        "or a Hugging Face model directory (saved with save_pretrained)",
    )


def test_missing_transformers_names_the_extra(tmp_path, monkeypatch):
    (tmp_path / "config.json").write_text("{}")
    monkeypatch.setitem(sys.modules, "transformers", None)

    result = hookviz("layers", tmp_path)

    assert_usage_error(result, "Hugging Face models need the transformers package: pip install 'hookviz[hf]'")


# --- safetensors ---------------------------------------------------------------------------------


@pytest.fixture
def resnet18_10() -> torch.nn.Module:
    from torchvision.models import resnet18

    torch.manual_seed(0)
    return resnet18(weights=None, num_classes=10).eval()


def test_safetensors_state_dict_is_detected_and_its_maps_agree_with_the_pth(tmp_path, resnet18_10, photo):
    from safetensors.torch import save_file

    save_file(resnet18_10.state_dict(), str(tmp_path / "model.safetensors"))
    torch.save(resnet18_10.state_dict(), tmp_path / "model.pth")

    from_safetensors = load_model(str(tmp_path / "model.safetensors"), device="cpu")
    from_pth = load_model(str(tmp_path / "model.pth"), device="cpu")

    assert from_safetensors.description.endswith("as torchvision resnet18 (detected, 10 classes)")
    batch = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    assert_same_maps(from_pth.module, from_safetensors.module, batch, "layer4")
    assert_same_maps(resnet18_10, from_safetensors.module, batch, "layer4")

    result = hookviz("gradcam", tmp_path / "model.safetensors", photo, "--arch", "resnet18", "--size", "64",
                     "-o", tmp_path / "out", "--json")  # fmt: skip
    assert result.exit_code == 0, result.stderr
    assert json_lines(result.stdout)[0]["outputs"][0]["layer"] == "layer4"


def test_a_timm_safetensors_state_dict_loads_with_its_callable(tmp_path, monkeypatch, photo):
    timm = pytest.importorskip("timm")
    from safetensors.torch import save_file

    (tmp_path / "my_timm.py").write_text(
        "import timm\n\ndef build():\n    return timm.create_model('resnet18', num_classes=7)\n"
    )
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    trained = timm.create_model("resnet18", num_classes=7).eval()
    save_file(trained.state_dict(), str(tmp_path / "weights.safetensors"))

    loaded = load_model("my_timm:build", state_dict=str(tmp_path / "weights.safetensors"), device="cpu")

    assert_same_maps(trained, loaded.module, torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(6)),
                     "layer4")  # fmt: skip
    sys.modules.pop("my_timm", None)


def test_an_invalid_safetensors_file_is_one_line(tmp_path):
    bad = tmp_path / "broken.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")

    result = hookviz("layers", bad)

    assert result.exit_code == 2
    line = result.stderr.strip()
    assert "\n" not in line
    assert line.startswith(f"hookviz: error: {bad} is not a valid safetensors file (")
    assert line.endswith("); save it with safetensors.torch.save_file")


def test_a_safetensors_file_without_the_package_names_it(tmp_path, resnet18_10, monkeypatch):
    from safetensors.torch import save_file

    save_file(resnet18_10.state_dict(), str(tmp_path / "model.safetensors"))
    monkeypatch.setitem(sys.modules, "safetensors", None)
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)

    result = hookviz("layers", tmp_path / "model.safetensors")

    assert_usage_error(
        result, f"{tmp_path / 'model.safetensors'} is a safetensors file; reading it needs: pip install safetensors"
    )


def test_a_safetensors_file_under_another_suffix_is_recognised(tmp_path, resnet18_10):
    from safetensors.torch import save_file

    save_file(resnet18_10.state_dict(), str(tmp_path / "weights.bin"))

    loaded = load_model(str(tmp_path / "weights.bin"), device="cpu")

    assert "resnet18" in loaded.description
    assert torch.equal(loaded.module.fc.weight, resnet18_10.fc.weight)


def test_token_layout_is_read_back_through_to_spatial():
    tokens = torch.arange(2 * 21 * 3, dtype=torch.float32).reshape(2, 21, 3)
    layout = spatial_layout(tokens.shape, (32, 32))

    grid = to_spatial(tokens, layout)

    assert tuple(grid.shape) == (2, 3, 4, 4)
    assert torch.equal(grid[:, :, 0, 0], tokens[:, 5])  # the first patch comes after 5 prefix tokens


# --- fine-tuned segmentation and detection state_dicts with --arch -------------------------------


def test_a_fine_tuned_detector_in_safetensors_loads_with_arch(tmp_path):
    from safetensors.torch import save_file
    from torchvision.models import get_model

    torch.manual_seed(0)
    name = "fasterrcnn_mobilenet_v3_large_320_fpn"
    tuned = get_model(name, weights=None, weights_backbone=None, num_classes=5).eval()
    save_file(tuned.state_dict(), str(tmp_path / "boxes.safetensors"))

    loaded = load_model(str(tmp_path / "boxes.safetensors"), arch=name, device="cpu")
    listed = hookviz("layers", tmp_path / "boxes.safetensors", "--arch", name, "--json")

    assert loaded.task == "detection"
    assert loaded.description.endswith(f"as torchvision {name} (given, 5 classes)")
    assert loaded.preprocessing.std == (1.0, 1.0, 1.0)
    assert torch.equal(
        loaded.module.roi_heads.box_predictor.cls_score.weight, tuned.roi_heads.box_predictor.cls_score.weight
    )
    assert listed.exit_code == 0, listed.stderr
    assert [r["name"] for r in json.loads(listed.stdout) if r["cam_default"]] == ["backbone.fpn"]


def test_a_fine_tuned_segmentation_model_with_its_aux_head_loads_with_arch(tmp_path):
    from torchvision.models import get_model

    torch.manual_seed(0)
    tuned = get_model("fcn_resnet50", weights=None, weights_backbone=None, num_classes=2, aux_loss=True).eval()
    torch.save(tuned.state_dict(), tmp_path / "fcn.pth")

    loaded = load_model(str(tmp_path / "fcn.pth"), arch="fcn_resnet50", size=(64, 64), device="cpu")

    assert loaded.task == "segmentation"
    assert loaded.output_key == "out"
    assert loaded.labels is None  # 2 classes: not the 21 of the DEFAULT weights
    assert loaded.output_count() == 2
    with torch.no_grad():
        batch = torch.rand(1, 3, 64, 64)
        assert torch.equal(loaded.module(batch)["out"], tuned(batch)["out"])


def test_an_arch_that_is_no_torchvision_model_suggests_names(tmp_path, resnet18_10):
    torch.save(resnet18_10.state_dict(), tmp_path / "model.pth")

    with pytest.raises(UsageError, match=r"--arch 'fcn_resnet5' is not a torchvision model; did you mean fcn_resnet50"):
        load_model(str(tmp_path / "model.pth"), arch="fcn_resnet5")
