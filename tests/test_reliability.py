"""Reliability: hostile model files and images, bad arguments, leaks, side effects on the user's model, output paths.

Each test proves one promise of the README ("no code execution from model files by default",
"errors are one line, never a traceback", "the model is not changed", "no accidental overwrites", ...)
and would fail without the behaviour.

Everything runs on tiny seeded models given as ``package.module:callable`` (written to disk by the
``nets`` fixture) or built here, and on images of a few pixels, so the whole file stays fast.
"""

from __future__ import annotations

import gc
import importlib
import io
import json
import shutil
import struct
import sys
import textwrap
import tracemalloc
import warnings
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from PIL import Image
from torch import nn

from cli_helpers import hookviz, json_lines
from hookviz.cams import compute_cams
from hookviz.errors import InputError, UsageError
from hookviz.guided import compute_guided
from hookviz.hooks import capture
from hookviz.images import load_image
from hookviz.layers import trace_layers
from hookviz.models import load_model

RED, BLUE = (220, 30, 30), (30, 40, 220)

# --- a small importable model module (MODEL = hv_reliability_nets:build) -----------------------------

NETS = "hv_reliability_nets"  # a module name no other test uses: sys.modules caches it
NETS_SOURCE = textwrap.dedent(
    """
    import torch
    from torch import nn


    class TinyNet(nn.Module):
        # input (an Identity, so --save-raw of 'inp' is the model input) -> conv-relu -> conv-relu -> GAP -> linear
        def __init__(self, num_classes=4):
            super().__init__()
            self.inp = nn.Identity()
            self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
            self.relu1 = nn.ReLU()
            self.conv2 = nn.Conv2d(4, 6, 3, stride=2, padding=1)
            self.relu2 = nn.ReLU()
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.fc = nn.Linear(6, num_classes)

        def forward(self, x):
            x = self.relu2(self.conv2(self.relu1(self.conv1(self.inp(x)))))
            return self.fc(self.pool(x).flatten(1))


    class ConvHead(nn.Module):
        # SqueezeNet-style: the classifier is a 1x1 convolution before the pooling; there is no linear layer.
        def __init__(self, num_classes=4):
            super().__init__()
            self.conv = nn.Conv2d(3, 6, 3, padding=1)
            self.relu = nn.ReLU()
            self.classifier = nn.Conv2d(6, num_classes, 1)
            self.pool = nn.AdaptiveAvgPool2d(1)

        def forward(self, x):
            return self.pool(self.classifier(self.relu(self.conv(x)))).flatten(1)


    class OddNames(nn.Module):
        # Layer names with a slash, a space, non-ASCII letters and a newline: legal in PyTorch, unsafe in a path.
        def __init__(self):
            super().__init__()
            self.add_module("stem/conv", nn.Conv2d(3, 4, 3, padding=1))
            self.add_module("stem_conv", nn.Conv2d(4, 4, 3, padding=1))
            self.add_module("\u00fcn\u00ef c\u00f6d\u00e9", nn.ReLU())
            self.add_module("new\\nline", nn.Conv2d(4, 5, 3, stride=2, padding=1))
            self.blocks = nn.Sequential(nn.Conv2d(5, 6, 3, padding=1), nn.ReLU())
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.fc = nn.Linear(6, 3)

        def forward(self, x):
            x = self._modules["stem/conv"](x)
            x = self._modules["\u00fcn\u00ef c\u00f6d\u00e9"](self._modules["stem_conv"](x))
            x = self.blocks(self._modules["new\\nline"](x))
            return self.fc(self.pool(x).flatten(1))


    def _seeded(cls):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            return cls()


    def build():
        return _seeded(TinyNet)


    def build_conv_head():
        return _seeded(ConvHead)


    def build_odd_names():
        return _seeded(OddNames)
    """
)
TINY = [f"{NETS}:build", "--size", "32"]  # MODEL and its input size, for the CLI
ODD_LAYER_NEWLINE, ODD_LAYER_UNICODE = "new\nline", "\u00fcn\u00ef c\u00f6d\u00e9"


@pytest.fixture
def nets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Write hv_reliability_nets.py into tmp_path/helpers and make it importable; yield the module."""
    folder = tmp_path / "helpers"
    folder.mkdir()
    (folder / f"{NETS}.py").write_text(NETS_SOURCE, encoding="utf-8")
    monkeypatch.syspath_prepend(str(folder))
    monkeypatch.delitem(sys.modules, NETS, raising=False)
    yield importlib.import_module(NETS)
    sys.modules.pop(NETS, None)


def assert_usage_error(result, expected_line: str) -> None:
    """Exit code 2, nothing on stdout, and stderr is exactly the one error line."""
    assert result.exit_code == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr == f"hookviz: error: {expected_line}\n"
    assert result.stdout == ""


def write_png(path: Path, size=(40, 30), colour=RED) -> Path:
    Image.new("RGB", size, colour).save(path, "PNG")
    return path


# === 1. no code execution from model files ==========================================================


class TouchesAFileWhenUnpickled:
    """Stands for any pickled payload: unpickling it calls ``Path(marker).touch()``.

    ``__reduce__`` makes the pickle name only ``pathlib``, not this class, as a real attack file would.
    """

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def save_malicious_checkpoint(path: Path, marker: Path, legacy: bool = False) -> Path:
    """A checkpoint that looks like one ({"state_dict": ..., "epoch": ...}) with the payload inside."""
    checkpoint = {"state_dict": {"fc.weight": torch.zeros(2, 2)}, "epoch": 3, "extra": TouchesAFileWhenUnpickled(marker)}
    torch.save(checkpoint, path, _use_new_zipfile_serialization=not legacy)
    return path


def refusal(path: Path) -> str:
    return (f"{path} is a pickled Python object and loading it would run code from the file; "
            "if you trust its source re-run with --trust, else use a state_dict with --arch or a .pt2 export")


def test_the_malicious_checkpoint_really_runs_code_when_unpickled(tmp_path):
    """Control for the tests below: an unsafe torch.load of the payload does create the marker."""
    marker = tmp_path / "pwned"
    path = save_malicious_checkpoint(tmp_path / "model.pt", marker)

    torch.load(path, weights_only=False)

    assert marker.exists()


@pytest.mark.parametrize("legacy", [False, True], ids=["zip-format", "legacy-format"])
def test_cli_refuses_a_pickled_checkpoint_without_running_it(tmp_path, legacy):
    """`hookviz layers evil.pt` exits 2 with one line naming --trust, .pt2 and --arch; the payload never runs."""
    marker = tmp_path / "pwned"
    path = save_malicious_checkpoint(tmp_path / "model.pt", marker, legacy=legacy)

    result = hookviz("layers", path)

    assert_usage_error(result, refusal(path))
    for alternative in ("--trust", ".pt2", "--arch"):
        assert alternative in result.stderr
    assert not marker.exists()


@pytest.mark.parametrize("force_unsafe_env", [False, True], ids=["default-env", "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1"])
def test_load_model_refuses_a_pickled_checkpoint_without_running_it(tmp_path, monkeypatch, force_unsafe_env):
    """The library refuses too, even when the environment asks torch to default to unsafe loading."""
    if force_unsafe_env:
        monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    marker = tmp_path / "pwned"
    path = save_malicious_checkpoint(tmp_path / "model.pt", marker)

    with pytest.raises(UsageError) as info:
        load_model(str(path), device="cpu")

    assert str(info.value) == refusal(path)
    assert not marker.exists()


def test_state_dict_option_refuses_a_pickled_file_without_running_it(tmp_path, nets):
    """`MODEL=pkg.mod:callable --state-dict evil.pt`: exit 2, one line, and the payload never runs."""
    marker = tmp_path / "pwned"
    path = save_malicious_checkpoint(tmp_path / "weights.pt", marker)

    result = hookviz("layers", f"{NETS}:build", "--state-dict", path)

    assert_usage_error(result, f"--state-dict {path} holds pickled code, not a state_dict of tensors")
    with pytest.raises(UsageError, match="pickled code"):
        load_model(f"{NETS}:build", state_dict=str(path), device="cpu")
    assert not marker.exists()


def test_a_pickle_renamed_to_pt2_is_refused_without_running_it(tmp_path):
    """A .pt2 suffix routes the file to torch.export.load; a plain pickle there must not run either."""
    marker = tmp_path / "pwned"
    path = save_malicious_checkpoint(tmp_path / "model.pt2", marker)

    result = hookviz("layers", path)

    assert result.exit_code == 2
    assert not marker.exists()


def test_a_broken_pt2_file_is_a_one_line_error(tmp_path):
    """A .pt2 that is not an export (here: a text file) gives exit 2 and exactly one line on stderr."""
    path = tmp_path / "model.pt2"
    path.write_text("not an exported program\n")

    result = hookviz("layers", path)

    assert result.exit_code == 2
    assert "Traceback" not in result.stderr
    line, = result.stderr.splitlines()
    assert line == f"hookviz: error: {path} is not a torch.export .pt2 archive (not a zip file); save one with torch.export.save"


def _rewrite_zip(source: Path, target: Path, replace) -> None:
    """Copy a zip archive entry by entry, passing each entry's bytes through ``replace(name, data)``."""
    with zipfile.ZipFile(source) as old, zipfile.ZipFile(target, "w", zipfile.ZIP_STORED) as new:
        for info in old.infolist():
            new.writestr(info.filename, replace(info.filename, old.read(info.filename)))


def _pickled_payload(marker: Path, wrap=tuple) -> bytes:
    buffer = io.BytesIO()
    torch.save(wrap([TouchesAFileWhenUnpickled(marker)]), buffer)
    return buffer.getvalue()


def _payload_in_sample_inputs(name: str, data: bytes, marker: Path) -> bytes:
    # torch's deserialize_torch_artifact retries a failed weights_only load with weights_only=False.
    return _pickled_payload(marker) if name.endswith("/sample_inputs/model.pt") else data


def _payload_as_pickled_weight(name: str, data: bytes, marker: Path) -> bytes:
    # A weight whose payload config says use_pickle=True is loaded with torch.load(weights_only=False).
    if name.endswith("/model_weights_config.json"):
        config = json.loads(data)
        first = next(iter(config["config"].values()))
        first["use_pickle"] = True
        return json.dumps(config).encode()
    if name.endswith("/data/weights/weight_0"):
        return _pickled_payload(marker)
    return data


@pytest.mark.parametrize("plant", [_payload_in_sample_inputs, _payload_as_pickled_weight],
                         ids=["sample-inputs", "pickled-weight"])
def test_a_crafted_pt2_does_not_run_code(tmp_path, exported_program, plant):
    """.pt2 is the safe alternative the refusal message recommends: loading one must not run a pickled payload."""
    valid, _ = exported_program
    marker = tmp_path / "pwned"
    crafted = tmp_path / "model.pt2"
    _rewrite_zip(valid, crafted, lambda name, data: plant(name, data, marker))

    hookviz("layers", crafted)

    assert not marker.exists()


# === 2. hostile and broken images ===================================================================


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def bomb_png(width: int, height: int) -> bytes:
    """A 100-byte PNG whose header declares width x height RGB pixels (its pixel data is a few bytes)."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + _png_chunk(b"IEND", b""))


def truncated_png() -> bytes:
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(noise).save(buffer, "PNG")
    return buffer.getvalue()[: len(buffer.getvalue()) // 2]


@pytest.fixture
def hostile_folder(tmp_path, tmp_images) -> tuple[Path, dict[str, str | None]]:
    """A folder of images, good and bad: (folder, {file name: expected error fragment, or None if it decodes})."""
    folder = tmp_path / "hostile"
    folder.mkdir()
    expected: dict[str, str | None] = {}

    def copy(kind: str, name: str, error: str | None) -> None:
        shutil.copy(tmp_images[kind], folder / name)
        expected[name] = error

    def write(name: str, data: bytes, error: str | None) -> None:
        (folder / name).write_bytes(data)
        expected[name] = error

    write_png(folder / "good.png")
    expected["good.png"] = None
    copy("truncated_jpeg", "truncated.jpg", "cannot decode image")
    write("truncated.png", truncated_png(), "cannot decode image (image file is truncated)")
    copy("fake_jpeg", "text.jpg", "not an image hookviz can read")
    copy("empty_png", "empty.png", "not an image hookviz can read")
    write("bomb.png", bomb_png(20000, 20000), "possible decompression bomb; if you trust it, raise the limit with --max-pixels")
    write_png(folder / "one_pixel.png", size=(1, 1))
    expected["one_pixel.png"] = None
    write_png(folder / "long.png", size=(10000, 100))
    expected["long.png"] = None
    copy("gray16_png", "gray16.png", None)
    copy("cmyk_jpeg", "cmyk.jpg", None)
    copy("animated_gif", "animated.gif", None)  # frame 0 RED, frame 1 BLUE
    return folder, expected


@pytest.mark.parametrize("name, size", [("one_pixel.png", (1, 1)), ("long.png", (10000, 100))])
def test_extreme_sizes_decode_to_rgb(hostile_folder, name, size):
    """A 1x1 and a 10000x100 image decode to RGB at their own size."""
    folder, _ = hostile_folder

    image = load_image(folder / name)

    assert image.mode == "RGB" and image.size == size
    assert image.getpixel((size[0] - 1, size[1] - 1)) == RED


@pytest.mark.parametrize("name", ["truncated.png", "bomb.png"])
def test_truncated_png_and_decompression_bomb_raise_one_line_input_errors(hostile_folder, name):
    """A PNG cut in half, and a 100-byte PNG declaring 20000x20000 pixels, are one-line InputErrors naming the file."""
    folder, expected = hostile_folder

    with pytest.raises(InputError) as info:
        load_image(folder / name)

    message = str(info.value)
    assert message.startswith(f"{folder / name}: ") and expected[name] in message
    assert "\n" not in message


@pytest.mark.parametrize("workers", [0, 1], ids=["in-process", "worker-process"])
def test_a_folder_of_hostile_images_fails_only_the_bad_ones(hostile_folder, tmp_path, nets, workers):
    """One folder run: each bad image is one error line, the good ones are written, the exit code is 1."""
    folder, expected = hostile_folder
    out = tmp_path / "out"

    result = hookviz("fmaps", *TINY, folder, "-l", "inp", "-l", "relu2", "--mean", "0,0,0", "--std", "1,1,1",
                     "--save-raw", "--workers", workers, "-o", out, "--json", "-q")

    assert result.exit_code == 1, result.stderr
    records = json_lines(result.stdout)
    assert [Path(record["input"]).name for record in records] == sorted(expected)
    errors = []
    for record in records:
        name = Path(record["input"]).name
        if expected[name] is None:
            assert record["status"] == "ok", record
            assert all(Path(output["png"]).is_file() for output in record["outputs"])
        else:
            assert record["status"] == "error" and record["outputs"] == []
            assert record["error"].startswith(f"{folder / name}: ") and expected[name] in record["error"]
            assert not (out / Path(name).stem).exists()
            errors.append(f"hookviz: error: {record['error']}")
    assert result.stderr.splitlines() == errors  # one line per failed image, nothing else
    assert "Traceback" not in result.stderr

    # The animated GIF's first frame (red) is what the model saw: --save-raw of the Identity input layer
    # with mean 0 and std 1 is the model input in [0, 1].
    gif, = (record for record in records if record["input"].endswith("animated.gif"))
    pixels = np.load(next(output["raw"] for output in gif["outputs"] if output["layer"] == "inp"))
    assert pixels.shape == (3, 32, 32)
    assert abs(pixels[0].mean() - RED[0] / 255) < 0.03 and abs(pixels[2].mean() - RED[2] / 255) < 0.03


def test_max_pixels_refuses_a_larger_image_and_a_higher_limit_accepts_it(tmp_path, nets):
    """`--max-pixels 1000` makes a 300x300 image one error mentioning --max-pixels; `--max-pixels 100000` accepts it."""
    image = write_png(tmp_path / "square.png", size=(300, 300))
    out = tmp_path / "out"

    refused = hookviz("gradcam", *TINY, image, "--max-pixels", "1000", "-o", out, "-q")
    accepted = hookviz("gradcam", *TINY, image, "--max-pixels", "100000", "-o", out, "-q")

    assert refused.exit_code == 1
    assert refused.stderr == (f"hookviz: error: {image}: image has more than 1,000 pixels, a possible decompression bomb; "
                              "if you trust it, raise the limit with --max-pixels\n")
    assert accepted.exit_code == 0, accepted.stderr
    assert accepted.stderr == ""
    assert len(accepted.stdout.splitlines()) == 1 and Path(accepted.stdout.strip()).is_file()


def test_max_pixels_applies_to_one_call_and_leaves_pillows_global_limit_alone(tmp_path, hostile_folder):
    """load_image(max_pixels=N) refuses above N (also between N and 2N, where Pillow only warns), accepts at N,
    and Image.MAX_IMAGE_PIXELS is the same afterwards, after a success or a failure."""
    folder, _ = hostile_folder
    square = write_png(tmp_path / "square.png", size=(300, 300))  # 90,000 pixels
    global_limit = Image.MAX_IMAGE_PIXELS

    for limit in (1_000, 60_000):  # 60,000 < 90,000 < 2 x 60,000: Pillow's warning range
        with pytest.raises(InputError, match="--max-pixels"):
            load_image(square, max_pixels=limit)
        assert Image.MAX_IMAGE_PIXELS == global_limit
    assert load_image(square, max_pixels=90_000).size == (300, 300)
    assert Image.MAX_IMAGE_PIXELS == global_limit
    with pytest.raises(InputError, match="decompression bomb"):
        load_image(folder / "bomb.png")
    assert Image.MAX_IMAGE_PIXELS == global_limit
    with pytest.raises(InputError, match="truncated"):  # past the check with a high limit, then the data runs out
        load_image(folder / "bomb.png", max_pixels=10**9)
    assert Image.MAX_IMAGE_PIXELS == global_limit


# === 3. property-based fuzzing of load_image ========================================================


def _encoded_samples() -> dict[str, bytes]:
    """Small real files of every format, the seeds for byte flips and truncation."""
    rng = np.random.default_rng(7)
    pixels = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
    picture, flipped = Image.fromarray(pixels), Image.fromarray(pixels[::-1].copy())
    exif = Image.Exif()
    exif[0x0112] = 6
    samples = {}
    for name, fmt, image, options in [
        ("png", "PNG", picture, {}),
        ("png-16bit", "PNG", Image.fromarray((pixels[..., 0].astype(np.uint16) * 257)), {}),
        ("png-palette-transparent", "PNG", picture.quantize(8), {"transparency": 0}),
        ("jpeg-exif", "JPEG", picture, {"exif": exif}),
        ("jpeg-cmyk", "JPEG", picture.convert("CMYK"), {}),
        ("gif-animated", "GIF", picture, {"save_all": True, "append_images": [flipped]}),
        ("bmp", "BMP", picture, {}),
        ("tiff-lzw", "TIFF", picture, {"compression": "tiff_lzw"}),
        ("webp", "WEBP", picture, {}),
        ("webp-animated", "WEBP", picture, {"save_all": True, "append_images": [flipped]}),
    ]:
        buffer = io.BytesIO()
        image.save(buffer, fmt, **options)
        samples[name] = buffer.getvalue()
    return samples


SAMPLES = _encoded_samples()
MAGIC_NUMBERS = [b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff\xe0", b"GIF89a", b"GIF87a", b"BM", b"II*\x00", b"MM\x00*",
                 b"RIFF\x24\x00\x00\x00WEBPVP8 "]


@st.composite
def damaged_files(draw) -> bytes:
    """A real encoded image with a few random bytes replaced, and maybe cut off at a random point."""
    data = bytearray(SAMPLES[draw(st.sampled_from(sorted(SAMPLES)))])
    for _ in range(draw(st.integers(0, 4))):
        data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    if draw(st.booleans()):
        data = data[: draw(st.integers(0, len(data)))]
    return bytes(data)


HOSTILE_BYTES = st.one_of(
    st.binary(max_size=600),
    st.builds(lambda magic, rest: magic + rest, st.sampled_from(MAGIC_NUMBERS), st.binary(max_size=600)),
    damaged_files(),
)
FUZZ = settings(deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@settings(FUZZ, max_examples=300)
@given(data=HOSTILE_BYTES)
def test_fuzz_any_bytes_give_rgb_or_a_one_line_input_error(tmp_path, data):
    """Random bytes, magic numbers plus noise, damaged real files: an RGB image or an InputError, nothing else."""
    path = tmp_path / "fuzzed.img"
    path.write_bytes(data)

    try:
        image = load_image(path)
    except InputError as exc:
        assert str(exc).startswith(f"{path}: ") and "\n" not in str(exc)
    else:
        assert image.mode == "RGB" and image.width >= 1 and image.height >= 1
        assert len(image.tobytes()) == 3 * image.width * image.height


def _random_image(mode: str, width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    if mode == "I;16":
        return Image.fromarray(rng.integers(0, 65536, (height, width), dtype=np.uint16))
    if mode == "1":
        return Image.fromarray(rng.integers(0, 2, (height, width)).astype(bool))
    bands = len(Image.new(mode, (1, 1)).getbands())
    image = Image.frombytes(mode, (width, height), rng.integers(0, 256, (height, width, bands), dtype=np.uint8).tobytes())
    if mode == "P":
        image.putpalette(rng.integers(0, 256, 768, dtype=np.uint8).tobytes())
    return image


FORMATS = {"PNG": ".png", "JPEG": ".jpg", "GIF": ".gif", "BMP": ".bmp", "TIFF": ".tiff", "WEBP": ".webp"}


@settings(FUZZ, max_examples=150)
@given(mode=st.sampled_from(["L", "RGB", "RGBA", "P", "I;16", "CMYK", "1", "LA"]), fmt=st.sampled_from(sorted(FORMATS)),
       width=st.integers(1, 64), height=st.integers(1, 64), seed=st.integers(0, 2**32 - 1))
def test_fuzz_every_valid_mode_and_format_decodes_to_rgb_of_its_size(tmp_path, mode, fmt, width, height, seed):
    """Any image Pillow can save (mode x format x size) decodes to RGB at its size; lossless RGB exactly."""
    image = _random_image(mode, width, height, seed)
    path = tmp_path / f"picture{FORMATS[fmt]}"
    path.unlink(missing_ok=True)
    try:
        image.save(path, fmt)
    except (OSError, ValueError, KeyError, TypeError):  # a combination Pillow cannot write, e.g. CMYK as PNG
        assume(False)

    decoded = load_image(path)

    assert decoded.mode == "RGB" and decoded.size == (width, height)
    if mode == "RGB" and fmt in ("PNG", "BMP", "TIFF"):
        assert decoded.tobytes() == image.tobytes()


# === 4. bad arguments: exit 2 and exactly one line ==================================================


@pytest.fixture
def cli_case(tmp_path, nets):
    """What the bad-argument cases need: an image, labels, a regular file, an output dir."""
    (tmp_path / "labels.txt").write_text("cat\ndog\ncar\nship\n")
    (tmp_path / "a_file").write_text("I am a file, not a directory\n")
    return {"image": write_png(tmp_path / "photo.png"), "labels": tmp_path / "labels.txt",
            "file": tmp_path / "a_file", "out": tmp_path / "out", "missing": tmp_path / "models" / "missing.pt"}


BAD_ARGUMENTS = {
    "unknown-layer": (
        lambda c: ["gradcam", *TINY, c["image"], "-l", "relu3"],
        lambda c: "unknown layer 'relu3'; did you mean relu2, relu1? ('hookviz layers MODEL' lists them)"),
    "class-index-out-of-range": (
        lambda c: ["gradcam", *TINY, c["image"], "--class", "7"],
        lambda c: "--class 7 is out of range: this model has classes 0..3"),
    "unknown-class-name": (
        lambda c: ["gradcam", *TINY, c["image"], "--labels", c["labels"], "--class", "dgo"],
        lambda c: "--class 'dgo' is not a class name of this model; did you mean 'dog'?"),
    "class-name-without-labels": (
        lambda c: ["gradcam", *TINY, c["image"], "--class", "dog"],
        lambda c: "--class 'dog': this model has no class names; give an index, or names with --labels"),
    "cam-without-linear-head": (
        lambda c: ["gradcam", f"{NETS}:build_conv_head", "--size", "32", c["image"], "-m", "cam"],
        lambda c: ("method cam needs layer 'classifier' to be followed only by global average pooling and one linear "
                   "layer; pick that layer with -l (see 'hookviz layers'), or use -m gradcam")),
    "gradcam-non-spatial-layer": (
        lambda c: ["gradcam", *TINY, c["image"], "-l", "fc"],
        lambda c: "layer 'fc' has output shape (1, 4), not a spatial map (N, C, H, W) or patch tokens; choose another with -l"),
    "guided-non-spatial-layer": (
        lambda c: ["guided", *TINY, c["image"], "-l", "fc"],
        lambda c: "layer 'fc' has output shape (1, 4), not a spatial map (N, C, H, W) or patch tokens; choose another with -l"),
    "output-dir-under-a-file": (
        lambda c: ["gradcam", *TINY, c["image"], "-o", c["file"] / "out"],
        lambda c: f"cannot create output directory {c['file'] / 'out'} (Not a directory); choose another with -o"),
    "missing-model-file": (
        lambda c: ["gradcam", c["missing"], c["image"]],
        lambda c: f"model file not found: {c['missing']}"),
}


@pytest.mark.parametrize("case", list(BAD_ARGUMENTS))
def test_bad_argument_is_exactly_one_error_line_and_exit_2(cli_case, case):
    """Each bad argument pins its message: exit 2, stderr is the one line, nothing written."""
    arguments, expected = BAD_ARGUMENTS[case]
    arguments = arguments(cli_case)
    if "-o" not in arguments:
        arguments += ["-o", cli_case["out"]]

    result = hookviz(*arguments, "-q")

    assert_usage_error(result, expected(cli_case))
    assert not list(cli_case["out"].rglob("*.png"))


def test_state_dict_with_the_wrong_arch_is_exactly_one_error_line(saved_models, cli_case):
    """A resnet18 state_dict with --arch resnet34: exit 2 and the pinned one-line message."""
    state_dict = saved_models["state_dict"]

    result = hookviz("fmaps", state_dict, cli_case["image"], "--arch", "resnet34", "-o", cli_case["out"], "-q")

    assert_usage_error(result, f'{state_dict} does not fit --arch resnet34 (Missing key(s) in state_dict: "layer1.2.conv1.weight", '
                               '"layer1.2.bn1.weight", "layer1.2.bn1.bias", "layer1.2.bn1.running_mean", "layer1.2.bn1.running_var", "...); '
                               "check --arch, or export the model to .pt2")


def test_state_dict_with_the_wrong_arch_says_what_does_not_fit(saved_models):
    """The message names what did not fit (missing/unexpected keys or a size mismatch), not just that something did."""
    with pytest.raises(UsageError) as info:
        load_model(str(saved_models["state_dict"]), arch="resnet34")

    message = str(info.value)
    assert ":)" not in message  # a detail cut off after its colon
    assert any(word in message.lower() for word in ("missing", "unexpected", "size mismatch"))


# === 5. no leaks over many calls ====================================================================


class UserNet(nn.Module):
    """A user's small CNN: conv-bn-relu-conv-relu-GAP-linear, every stage a named module."""

    def __init__(self) -> None:
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(5)
            self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
            self.bn1 = nn.BatchNorm2d(6)
            self.relu1 = nn.ReLU()
            self.conv2 = nn.Conv2d(6, 8, 3, stride=2, padding=1)
            self.relu2 = nn.ReLU()
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu2(self.conv2(self.relu1(self.bn1(self.conv1(x)))))
        return self.fc(self.pool(x).flatten(1))


HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
              "_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs", "_forward_hooks_always_called")
GLOBAL_HOOK_DICTS = ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
                     "_global_backward_pre_hooks", "_global_forward_hooks_always_called")


def module_hooks(model: nn.Module) -> dict[tuple[str, str], list]:
    """Every hook registered on every module: {(module name, hook dict): [(handle id, hook), ...]}."""
    return {(name, kind): list(getattr(module, kind).items()) for name, module in model.named_modules()
            for kind in HOOK_DICTS if getattr(module, kind, None)}


def global_hooks() -> dict[str, list]:
    registry = torch.nn.modules.module
    return {kind: list(getattr(registry, kind).items()) for kind in GLOBAL_HOOK_DICTS if hasattr(registry, kind)}


def live_tensor_count() -> int:
    gc.collect()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # isinstance() on some torch module proxies warns about deprecations
        return sum(1 for obj in gc.get_objects() if isinstance(obj, torch.Tensor))


def rss_bytes() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmRSS from /proc")
def test_500_library_calls_leave_no_hooks_and_no_growing_memory():
    """compute_cams, capture, compute_guided and failing calls, 500 times: no hooks left, tensors and memory flat."""
    model = UserNet().eval()
    x, wrong_channels = torch.randn(2, 3, 32, 32), torch.randn(1, 5, 32, 32)
    globals_before = global_hooks()
    measured = {}

    for call in range(1, 501):
        if call % 10 == 0:
            compute_guided(model, x, layer="relu2")
        elif call % 2:
            compute_cams(model, x, layer="relu2", method="gradcam", top_k=2)
        else:
            with capture(model, ["relu1", "relu2"], grad=call % 4 == 0) as activations:
                logits = model(x)
                if call % 4 == 0:
                    torch.autograd.grad(logits[:, 0].sum(), activations["relu2"])
        if call % 25 == 0:
            with pytest.raises(UsageError):
                compute_cams(model, x, layer="relu3")  # unknown layer
            with pytest.raises(UsageError):
                compute_cams(model, wrong_channels, layer="relu2")  # the model fails on the input
        if call in (100, 500):
            measured[call] = (live_tensor_count(), rss_bytes())
            if call == 100:
                tracemalloc.start()
                before = tracemalloc.take_snapshot()
            else:
                after = tracemalloc.take_snapshot()
                tracemalloc.stop()

    assert module_hooks(model) == {}
    assert global_hooks() == globals_before
    (tensors_100, rss_100), (tensors_500, rss_500) = measured[100], measured[500]
    assert abs(tensors_500 - tensors_100) <= 2, (tensors_100, tensors_500)
    python_growth = sum(stat.size_diff for stat in after.compare_to(before, "filename"))
    assert python_growth < 1_000_000, python_growth  # about 5 kB in practice
    assert rss_500 - rss_100 < 20 * 2**20, (rss_100, rss_500)


# === 6. the user's model is untouched =================================================================


class UserState:
    """Everything about a model a hookviz call must leave as it was."""

    def __init__(self, model: nn.Module) -> None:
        self.parameters = {name: (p, p.detach().clone(), p.requires_grad, None if p.grad is None else p.grad.clone())
                           for name, p in model.named_parameters()}
        self.buffers = {name: b.clone() for name, b in model.named_buffers()}
        self.training = {name: m.training for name, m in model.named_modules()}
        self.hooks = module_hooks(model)
        self.global_hooks = global_hooks()
        self.grad_enabled = torch.is_grad_enabled()

    def assert_unchanged(self, model: nn.Module) -> None:
        now = dict(model.named_parameters())
        assert now.keys() == self.parameters.keys()
        for name, (param, value, requires_grad, grad) in self.parameters.items():
            assert now[name] is param, f"{name} was replaced"
            assert torch.equal(param.detach(), value), f"{name} changed"
            assert param.requires_grad is requires_grad, f"{name}.requires_grad changed"
            if grad is None:
                assert param.grad is None, f"{name}.grad appeared"
            else:
                assert param.grad is not None and torch.equal(param.grad, grad), f"{name}.grad changed"
        for name, buffer in model.named_buffers():
            assert torch.equal(buffer, self.buffers[name]), f"buffer {name} changed"
        assert {name: m.training for name, m in model.named_modules()} == self.training
        assert module_hooks(model) == self.hooks  # the user's hooks, the same objects, nothing more
        assert global_hooks() == self.global_hooks
        assert torch.is_grad_enabled() is self.grad_enabled


@pytest.fixture
def user_model():
    """UserNet in TRAIN mode, conv1 frozen, .grad on fc.weight and conv2.bias, and the user's own hooks."""
    model = UserNet().train()
    model.conv1.requires_grad_(False)
    model.fc.weight.grad = torch.randn_like(model.fc.weight)
    model.conv2.bias.grad = torch.randn_like(model.conv2.bias)
    calls = []
    model.relu2.register_forward_hook(lambda module, inputs, output: calls.append("relu2"))
    model.register_forward_pre_hook(lambda module, inputs: calls.append("model"))
    return model, calls


def _raises(call):
    def run(model, x):
        with pytest.raises(UsageError):
            call(model, x)
    return run


def _capture(model, x, grad=False):
    with capture(model, ["bn1", "relu2"], grad=grad) as activations:
        logits = model(x)
        if grad:
            torch.autograd.grad(logits[:, 1].sum(), activations["relu2"])


HOOKVIZ_CALLS = {
    "gradcam": lambda model, x: compute_cams(model, x, layer="relu2", method="gradcam", top_k=2),
    "scorecam": lambda model, x: compute_cams(model, x, layer="relu2", method="scorecam", score_batch_size=3),
    "cam": lambda model, x: compute_cams(model, x, layer="relu2", method="cam"),
    "capture": _capture,
    "capture-with-grad": lambda model, x: _capture(model, x, grad=True),
    "guided": lambda model, x: compute_guided(model, x, layer="relu2", top_k=2),
    "trace_layers": lambda model, x: trace_layers(model, (32, 32)),
    "error-unknown-layer": _raises(lambda model, x: compute_cams(model, x, layer="relu3")),
    "error-non-spatial-layer": _raises(lambda model, x: compute_cams(model, x, layer="fc")),
    "error-wrong-input-shape": _raises(lambda model, x: compute_cams(model, torch.randn(1, 5, 32, 32), layer="relu2")),
    "guided-error-wrong-input-shape": _raises(lambda model, x: compute_guided(model, torch.randn(1, 5, 32, 32), layer="relu2")),
    "cam-error-no-linear-head-after-layer": _raises(lambda model, x: compute_cams(model, x, layer="relu1", method="cam")),
}


@pytest.mark.parametrize("call", list(HOOKVIZ_CALLS))
def test_the_users_model_is_untouched(user_model, call):
    """Parameters, .grad, requires_grad, train/eval flags, buffers, the user's hooks and grad mode are as before."""
    model, calls = user_model
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    before = UserState(model)

    HOOKVIZ_CALLS[call](model, x)

    before.assert_unchanged(model)
    calls.clear()
    model(x)
    assert calls == ["model", "relu2"]  # the user's hooks still run, once per forward


# === 7. outputs stay inside -o DIR, and existing files are not overwritten ===========================


DANGEROUS_NAMES = ["..png", "...png", "..%2F..%2Fx.png", "with space.png", "\u00fcn\u00efc\u00f6d\u00e9.png",
                   "new\nline.png", "-dash.png"]


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
            write_png(inputs / name)
        except OSError:  # a filesystem that refuses the name
            continue
        names.append(name)
    write_png(inputs / "evil.png")
    out = tmp_path / "out"
    before = _files_outside(tmp_path, out, tmp_path / "helpers")
    files = [str(inputs / name) for name in names]

    runs = [
        hookviz("fmaps", f"{NETS}:build_odd_names", "--size", "16", *files, "-", "-o", out, "--json", "-q",
                "--save-raw", stdin="in/sub/../evil.png\n"),
        hookviz("gradcam", f"{NETS}:build_odd_names", "--size", "16", *files, "-l", ODD_LAYER_NEWLINE, "--save-raw",
                "-o", out, "--json", "-q"),
        hookviz("guided", f"{NETS}:build_odd_names", "--size", "16", *files, "-l", ODD_LAYER_UNICODE,
                "-o", out, "--json", "-q"),
    ]

    written = []
    for result in runs:
        assert result.exit_code == 0, result.stderr
        records = json_lines(result.stdout)
        assert all(record["status"] == "ok" for record in records)
        written += [output[key] for record in records for output in record["outputs"] for key in ("png", "raw")
                    if key in output]
    assert len(written) > 3 * len(names)
    for path in written:
        assert Path(path).resolve().is_relative_to(out.resolve()), path
        assert Path(path).is_file()
    assert all(p.parent.parent == out for p in map(Path, written))  # DIR/<stem>/<file>, no deeper, no higher
    assert _files_outside(tmp_path, out, tmp_path / "helpers") == before


def test_layers_whose_names_sanitize_alike_get_separate_files(tmp_path, nets):
    """Every (image, layer) grid gets its own file, even when two layer names differ only in unsafe characters."""
    image = write_png(tmp_path / "photo.png")

    result = hookviz("fmaps", f"{NETS}:build_odd_names", "--size", "16", image, "-o", tmp_path / "out", "--json", "-q")

    assert result.exit_code == 0, result.stderr
    outputs = json_lines(result.stdout)[0]["outputs"]
    assert {o["layer"] for o in outputs} >= {"stem/conv", "stem_conv"}
    pngs = [o["png"] for o in outputs]
    assert len(set(pngs)) == len(pngs), pngs


def test_a_refused_run_and_skip_existing_leave_an_existing_file_byte_for_byte(tmp_path, nets):
    """A second run into the same DIR is exactly one error line (exit 2); neither it nor --skip-existing changes
    a file at an output path, and only --overwrite replaces it."""
    image = write_png(tmp_path / "photo.png")
    out = tmp_path / "out"
    first = hookviz("gradcam", *TINY, image, "-o", out, "-q")
    assert first.exit_code == 0, first.stderr
    target = Path(first.stdout.strip())
    target.write_bytes(b"the user's own file, not to be lost")

    again = hookviz("gradcam", *TINY, image, "-o", out, "-q")
    skipping = hookviz("gradcam", *TINY, image, "-o", out, "-q", "--skip-existing", "--json")

    assert_usage_error(again, f"{target} already exists; pass --overwrite to replace outputs, "
                              "or --skip-existing to finish an interrupted run")
    assert skipping.exit_code == 0, skipping.stderr
    assert [record["status"] for record in json_lines(skipping.stdout)] == ["skipped"]
    assert target.read_bytes() == b"the user's own file, not to be lost"

    overwriting = hookviz("gradcam", *TINY, image, "-o", out, "-q", "--overwrite")

    assert overwriting.exit_code == 0, overwriting.stderr
    with Image.open(target) as replaced:
        assert replaced.format == "PNG"
