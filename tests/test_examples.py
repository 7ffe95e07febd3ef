"""Every example in the README and in each command's --help runs, as written, through a real shell.

`trace --help`'s jq example printed null for every row because its field had been renamed: examples
are code, so they are run. Nothing is downloaded: a `hookviz` wrapper first on PATH turns torchvision
names into the same architectures with random weights at a small size (resnet50 -> resnet18), and the
files the examples name (cat.jpg, photos/, model.pt2, the demo model, sample_images) exist in each
example's own folder. Every example must exit 0 without a traceback, and a jq filter must find
something in every record it reads (no null).
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from cli_helpers import write_noise_image
from process_helpers import hookviz_command, subprocess_env

from hookviz.cli import main

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
SHELL = ("", "bash", "console", "sh")  # the README's fenced blocks whose hookviz lines are run
# Lines that need what this machine has not: GNU parallel (an example of running shards side by side).
NEEDS = {"parallel ": "GNU parallel"}

WRAPPER = """#!{python}
# hookviz, as the examples call it, with models that need no download and run fast.
import os, sys
args = sys.argv[1:]
if len(args) > 1 and args[1] in ("resnet50", "resnet18", "vit_b_16"):
    args[1] = "resnet18" if args[1] != "vit_b_16" else "vit_b_16"
    if "--weights" not in args:
        args += ["--weights", "none"]
    if args[1] == "resnet18" and "--size" not in args:
        args += ["--size", "64"]
    if "--labels" not in args and args[0] != "layers":
        args += ["--labels", "imagenet"]  # random weights carry no class names; the examples use them
# torchvision segmentation and detection models: random weights (backbone too), small inputs.
DENSE = ("deeplabv3_mobilenet_v3_large", "fcn_resnet50", "lraspp_mobilenet_v3_large", "fasterrcnn_mobilenet_v3_large_320_fpn",
         "retinanet_resnet50_fpn", "fcos_resnet50_fpn", "ssdlite320_mobilenet_v3_large")
if len(args) > 1 and args[1] in DENSE and "--weights" not in args:
    args += ["--weights", "none"]
if len(args) > 1 and args[1].startswith("timm:") and "--weights" not in args:  # no pretrained weights cached here
    args += ["--weights", "none"] + (["--size", "64"] if "vit" not in args[1] else [])
args = [arg.replace("/data/", "data/") for arg in args]
# Optimization and sampling loops at a few iterations: the examples check the command lines, the tests the results.
FEW = {{"filters": ("--steps", "4"), "dream": ("--steps", "2"), "saliency": ("--samples", "4"), "evaluate": ("--steps", "5")}}
if args and args[0] in FEW and FEW[args[0]][0] not in args and "--help" not in args:
    args += list(FEW[args[0]])
    if args[0] == "saliency" and "--steps" not in args:
        args += ["--steps", "4"]
os.execv({real!r}, [{real!r}, *args])
"""


def examples() -> list[tuple[str, str]]:
    """(where, command line) for every hookviz example: the README's shell blocks and each --help."""
    found = []
    for command in [main, *main.commands.values()]:
        name = getattr(command, "name", None) or "hookviz"
        for line in (command.help or "").splitlines():
            if line.strip().startswith(("hookviz ", "find ")):
                found.append((f"{name} --help", line.strip()))
    text = README.read_text(encoding="utf-8")
    # Every fenced block, so a ```python block's closing fence is never read as an opening one; shell blocks only.
    shell_blocks = [body for lang, body in re.findall(r"```(\w*)\n(.*?)```", text, flags=re.S) if lang in SHELL]
    for block in shell_blocks:
        joined = re.sub(r"\\\n\s*", " ", block)  # continuation lines
        for line in joined.splitlines():
            line = line.strip().removeprefix("$ ")
            if re.match(r"^(hookviz |find |parallel )", line) and not line.startswith(
                "hookviz gradcam model.pt2 /data"
            ):
                found.append(("README", line))
            elif line.startswith("hookviz gradcam model.pt2 /data"):  # the SLURM array's line
                found.append(("README (SLURM)", line))
    unique: dict[str, tuple[str, str]] = {}
    for where, line in found:  # an example shown in two places runs once
        unique.setdefault(without_comment(line), (where, line))
    return list(unique.values())


def without_comment(line: str) -> str:
    return re.sub(r"\s+#\s.*$", "", line)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """What the examples name, made once: photos, a .pt2 of resnet18, the demo model, sample images."""
    folder = tmp_path_factory.mktemp("example-inputs")
    for name in ("cat.jpg", "photo.jpg", "img.png", "other.jpg"):
        write_noise_image(folder / name, 96, 72, seed=len(name))
    write_noise_image(folder / "street.jpg", 320, 240, seed=5)
    from PIL import Image

    cat = Image.open(ROOT / "sample_images" / "chelsea_cat.png").convert("RGB")
    cat.crop((100, 20, 400, 280)).save(folder / "cat_face.jpg")
    cup = Image.open(ROOT / "sample_images" / "coffee_cup.jpg").convert("RGB").resize(cat.size)
    both = Image.new("RGB", (2 * cat.width, cat.height))
    both.paste(cup, (0, 0))
    both.paste(cat, (cat.width, 0))
    both.save(folder / "cup_and_cat.jpg")
    for i in range(2):
        write_noise_image(folder / "photos" / f"p{i}.jpg", 80, 60, seed=10 + i)
    (folder / "data").mkdir()
    shutil.copytree(folder / "photos", folder / "data" / "photos")
    for index, class_folder in enumerate(("281", "281", "285")):  # a labelled folder: labelled/<class>/*.jpg
        write_noise_image(folder / "labelled" / class_folder / f"l{index}.jpg", 80, 60, seed=20 + index)
    import torchvision

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        resnet = torchvision.models.resnet18(weights=None).eval()
    program = torch.export.export(
        resnet, (torch.randn(2, 3, 64, 64),), dynamic_shapes=({0: torch.export.Dim("batch", min=1)},)
    )
    torch.export.save(program, folder / "model.pt2")
    with torch.random.fork_rng(devices=[]):  # a single-logit (binary) classifier
        torch.manual_seed(0)
        binary = torchvision.models.resnet18(weights=None, num_classes=1).eval()
    program = torch.export.export(
        binary, (torch.randn(2, 3, 64, 64),), dynamic_shapes=({0: torch.export.Dim("batch", min=1)},)
    )
    torch.export.save(program, folder / "binary.pt2")
    transformers = pytest.importorskip("transformers")
    config = transformers.ViTConfig(
        image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, num_labels=3, id2label={0: "cat", 1: "dog", 2: "fox"}, label2id={"cat": 0, "dog": 1, "fox": 2},
    )  # fmt: skip
    transformers.ViTForImageClassification(config).save_pretrained(folder / "my-finetuned-vit")
    transformers.ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder / "my-finetuned-vit")
    pytest.importorskip("efficientnet_lite_pytorch")
    from hookviz.demo import export_efficientnet_lite0

    export_efficientnet_lite0(folder / "efficientnet_lite0.pt2")
    return folder


@pytest.fixture(scope="module")
def wrapper_bin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("bin")
    script = folder / "hookviz"
    real = hookviz_command()[0]
    script.write_text(WRAPPER.format(python=sys.executable, real=real))
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return folder


def test_the_examples_are_found():
    """So that the test below cannot pass by finding nothing."""
    where = {place for place, _ in examples()}
    assert len(examples()) >= 25 and {"trace --help", "gradcam --help", "README"} <= where


@pytest.mark.parametrize(("where", "line"), examples(), ids=[f"{w}: {line[:60]}" for w, line in examples()])
def test_an_example_runs_as_written(tmp_path, inputs, wrapper_bin, where, line):
    needed = next((what for prefix, what in NEEDS.items() if line.startswith(prefix)), None)
    if needed and shutil.which(line.split()[0]) is None:
        pytest.skip(f"needs {needed}")
    work = tmp_path / "work"
    work.mkdir()
    for name in ("cat.jpg", "photo.jpg", "img.png", "other.jpg", "street.jpg", "cat_face.jpg", "cup_and_cat.jpg"):
        (work / name).symlink_to(inputs / name)
    for name in ("model.pt2", "binary.pt2", "my-finetuned-vit"):
        (work / name).symlink_to(inputs / name)
    for name in ("photos", "data", "labelled"):  # copies: `find` does not enter a linked folder
        shutil.copytree(inputs / name, work / name)
    (work / "sample_images").symlink_to(ROOT / "sample_images")
    (work / "out").mkdir()
    shutil.copy(inputs / "efficientnet_lite0.pt2", work / "out" / "efficientnet_lite0.pt2")
    last_run = work / "last_run"
    last_run.touch()
    os.utime(last_run, (0, 0))  # older than every photo: `find -newer last_run` lists them all
    env = {
        **subprocess_env(),
        "PATH": f"{wrapper_bin}{os.pathsep}{os.environ['PATH']}",
        "SLURM_ARRAY_TASK_ID": "0",
        "SLURM_ARRAY_TASK_COUNT": "1",
    }

    done = subprocess.run(
        ["bash", "-o", "pipefail", "-c", without_comment(line)],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )

    assert done.returncode == 0, f"{where}: {line}\n{done.stderr[-3000:]}"
    assert "Traceback" not in done.stderr
    if "| jq" in line:
        printed = done.stdout.split()
        assert printed and "null" not in printed, f"{where}: {line}\n{done.stdout[:2000]}"
