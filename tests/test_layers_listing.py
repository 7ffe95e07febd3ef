"""`hookviz layers` lists modules in the order they run, with their original class names, also for a
torch.export .pt2 program (where every unflattened module is an InterpreterModule)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import torchvision
from cli_helpers import hookviz
from torch import nn

from hookviz.layers import trace_layers
from hookviz.models.files import load_exported


class Block(nn.Module):
    """A residual block of the user's own: x + ReLU6(bn(conv(x)))."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.bn = nn.BatchNorm2d(channels)
        self.act = nn.ReLU6()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.act(self.bn(self.conv(x)))


class ShuffledNet(nn.Module):
    """Modules defined in another order than they run, as in EfficientNet: ``head`` is defined first and runs
    after the blocks; one ``act`` (like EfficientNet's ``_swish``), defined last, runs after the stem and again
    after the head, where it is the default CAM layer; ``unused`` never runs."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Conv2d(8, 16, 1)
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.blocks = nn.Sequential(Block(8), nn.Sequential(Block(8), nn.Identity()))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, 5)
        self.unused = nn.Linear(3, 3)
        self.act = nn.ReLU6()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.stem(x))
        x = self.blocks(x)
        x = self.act(self.head(x))
        return self.fc(self.pool(x).flatten(1))


def shuffled_net() -> ShuffledNet:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return ShuffledNet().eval()


# (name, original class) of every module that runs, in the order each one's first call starts.
EXECUTION_ORDER = [
    ("stem", "Conv2d"),
    ("act", "ReLU6"),
    ("blocks", "Sequential"),
    ("blocks.0", "Block"),
    ("blocks.0.conv", "Conv2d"),
    ("blocks.0.bn", "BatchNorm2d"),
    ("blocks.0.act", "ReLU6"),
    ("blocks.1", "Sequential"),
    ("blocks.1.0", "Block"),
    ("blocks.1.0.conv", "Conv2d"),
    ("blocks.1.0.bn", "BatchNorm2d"),
    ("blocks.1.0.act", "ReLU6"),
    ("head", "Conv2d"),
    ("pool", "AdaptiveAvgPool2d"),
    ("fc", "Linear"),
]


def export(path: Path, **options: Any) -> Path:
    program = torch.export.export(shuffled_net(), (torch.randn(1, 3, 32, 32),), **options)
    torch.export.save(program, path)
    return path


@pytest.fixture(scope="module")
def shuffled_pt2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A .pt2 export of ShuffledNet, 32x32 input, batch 1."""
    return export(tmp_path_factory.mktemp("export") / "shuffled.pt2")


def table_rows(stdout: str) -> list[list[str]]:
    """The rows of the `hookviz layers` table, each as [marker, name, type, shape, params, ...]."""
    lines = stdout.splitlines()
    assert lines[0].split() == ["layer", "type", "output", "shape", "params"]
    return [[line[0], *line[2:].split()] for line in lines[1:]]


def test_layers_of_an_exported_program_show_original_types_in_execution_order(shuffled_pt2):
    result = hookviz("layers", shuffled_pt2)

    assert result.exit_code == 0, result.stderr
    rows = table_rows(result.stdout)
    assert [(row[1], row[2]) for row in rows] == EXECUTION_ORDER
    assert "InterpreterModule" not in result.stdout
    by_name = {row[1]: row for row in rows}
    assert by_name["act"][0] == "*"  # the default CAM layer: act's last call, after head
    assert [row[1] for row in rows if row[0] == "*"] == ["act"]
    assert by_name["act"][3:] == ["16x32x32", "0", "(runs", "2x)"]
    assert by_name["blocks.0"][3:] == ["8x32x32", f"{sum(p.numel() for p in Block(8).parameters()):,}"]
    assert "default CAM layer: act" in result.stderr


def test_layers_json_of_an_exported_program_has_the_same_order_and_types(shuffled_pt2):
    result = hookviz("layers", shuffled_pt2, "--json")

    assert result.exit_code == 0, result.stderr
    records = json.loads(result.stdout)
    assert [(record["name"], record["type"]) for record in records] == EXECUTION_ORDER
    by_name = {record["name"]: record for record in records}
    assert [record["name"] for record in records if record["cam_default"]] == ["act"]
    assert by_name["act"]["calls"] == 2 and by_name["act"]["output_shape"] == [1, 16, 32, 32]
    assert by_name["head"]["conv"] is True and by_name["head"]["parameters"] == 8 * 16 + 16


def test_layers_all_lists_the_modules_that_did_not_run_last_in_definition_order(shuffled_pt2):
    listed = hookviz("layers", shuffled_pt2, "--all", "--json")
    table = hookviz("layers", shuffled_pt2, "--all")

    records = json.loads(listed.stdout)
    ran = len(EXECUTION_ORDER)
    assert [(record["name"], record["type"]) for record in records[:ran]] == EXECUTION_ORDER
    # The Identity has no ops, so the export keeps no call of it; unused never ran.
    assert [record["name"] for record in records[ran:]] == ["blocks.1.1", "unused"]
    assert all(record["output_shape"] is None and record["calls"] == 0 for record in records[ran:])
    assert [row[1] for row in table_rows(table.stdout)] == [record["name"] for record in records]


def test_the_exported_listing_matches_the_eager_models():
    """Eager modules keep their own class names; the order is the same as the exported program's."""
    model = shuffled_net()
    layers = trace_layers(model, (32, 32)).layers

    modules = dict(model.named_modules())
    assert all(info.type == type(modules[info.name]).__name__ for info in layers)
    ran = [(info.name, info.type) for info in layers if info.output_shape is not None]
    identity = ("blocks.1.1", "Identity")  # an eager Identity runs: after the block before it
    assert ran == [*EXECUTION_ORDER[:12], identity, *EXECUTION_ORDER[12:]]
    assert [info.name for info in layers if info.output_shape is None] == ["unused"]


@pytest.mark.filterwarnings("ignore:Attempted to insert a get_attr Node:UserWarning")  # torch's unflatten
def test_a_module_exported_as_a_dispatcher_keeps_its_type(tmp_path):
    """With its call signature preserved, a module that runs twice becomes an InterpreterModuleDispatcher."""
    path = export(tmp_path / "dispatch.pt2", preserve_module_call_signature=("act",))
    module = load_exported(path).module

    layers = trace_layers(module, (32, 32)).layers

    assert [(info.name, info.type) for info in layers if info.output_shape is not None] == EXECUTION_ORDER
    assert type(module.get_submodule("act")).__name__ != "ReLU6"  # the listing does not read it off the module


def test_tracing_an_exported_program_leaves_no_hooks(shuffled_pt2):
    module = load_exported(shuffled_pt2).module

    trace_layers(module, (32, 32))

    for name, submodule in module.named_modules():
        assert not submodule._forward_pre_hooks and not submodule._forward_hooks, name


def test_an_eager_resnet_lists_its_layers_in_definition_order():
    """torchvision's resnet18 defines its modules in the order they run, so the listing order is unchanged."""
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None).eval()

    layers = trace_layers(model, (64, 64)).layers

    assert [info.name for info in layers] == [name for name, _ in model.named_modules() if name]
    assert [info.type for info in layers][:4] == ["Conv2d", "BatchNorm2d", "ReLU", "MaxPool2d"]
