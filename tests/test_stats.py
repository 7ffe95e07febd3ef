"""hookviz.stats: per-layer activation statistics, streamed over batches, checked against torch on all values at once."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torchvision
from cam_models import random_batch
from nets import seeded
from PIL import Image
from torch import nn

from hookviz.errors import UsageError
from hookviz.stats import LayerStats, StatsCollector, collect_stats, format_table, histogram_figure, stats_layer_names


class DeadChannelNet(nn.Module):
    """conv1 -> ReLU -> conv2 -> ReLU -> GAP -> fc, with conv1's channel 2 and fc's feature 0 forced dead by a -100 bias."""

    def __init__(self) -> None:
        super().__init__()
        with seeded(3):
            self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
            self.relu1 = nn.ReLU()
            self.conv2 = nn.Conv2d(4, 5, 3, stride=2, padding=1)
            self.relu2 = nn.ReLU(inplace=True)
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.fc = nn.Linear(5, 6)
        with torch.no_grad():
            # Positive weights, no bias, on pooled ReLU outputs: every other feature is > 0 for any image.
            self.fc.weight.abs_()
            self.fc.bias.zero_()
            self.conv1.bias[2] = -100.0  # far below anything w . x reaches on these inputs
            self.fc.bias[0] = -100.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Doubled after fc, so fc is an inner layer whose dead features count (the model's own output has none).
        return 2 * self.fc(self.pool(self.relu2(self.conv2(self.relu1(self.conv1(x))))).flatten(1))


@pytest.fixture
def net() -> DeadChannelNet:
    return DeadChannelNet().eval()


@pytest.fixture
def batches() -> list[torch.Tensor]:
    # Uneven batch sizes on purpose: streaming must not assume equal batches.
    return [random_batch(3, 16, 20, seed=1), random_batch(1, 16, 20, seed=2), random_batch(4, 16, 20, seed=3)]


def all_outputs(model: nn.Module, layer: str, batches: list[torch.Tensor]) -> torch.Tensor:
    """The layer's outputs for every image, concatenated: the reference the streamed statistics must match."""
    kept = []
    module = dict(model.named_modules())[layer]
    handle = module.register_forward_hook(lambda m, i, o: kept.append(o.detach().clone()))
    try:
        with torch.no_grad():
            for batch in batches:
                model(batch)
    finally:
        handle.remove()
    return torch.cat(kept)


def no_hooks_left(model: nn.Module) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks and not m._backward_hooks for m in model.modules())


# --- what is computed ---------------------------------------------------------------------------------


def test_layer_stats_of_one_tensor():
    stats = LayerStats(channel_dim=1)
    stats.update(torch.tensor([[-1.0, 0.0, 2.0, 3.0]]))  # one sample, four features

    assert (stats.mean, stats.min, stats.max) == (1.0, -1.0, 3.0)
    assert stats.std == pytest.approx(torch.tensor([-1.0, 0.0, 2.0, 3.0]).std(correction=0).item())
    assert stats.zero_fraction == 0.5  # -1 and 0: what a ReLU would zero
    assert stats.dead_channels == [0, 1]
    assert stats.channels == 4


CONV_AND_LINEAR = ["conv1", "conv2", "fc"]


def test_default_layers_are_the_activations(net):
    """A dead unit is an activation's output that is never positive: activations are measured by default."""
    assert stats_layer_names(net) == ["relu1", "relu2"]
    assert set(collect_stats(net, [random_batch(1, 16, 20)])) == {"relu1", "relu2"}


def test_default_layers_without_activation_modules_are_the_conv_and_linear_layers():
    class FunctionalNet(nn.Module):  # activations as functions: no module to hook
        def __init__(self) -> None:
            super().__init__()
            self.conv1, self.fc = nn.Conv2d(3, 4, 3), nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(torch.relu(self.conv1(x)).mean(dim=(2, 3)))

    assert stats_layer_names(FunctionalNet()) == ["conv1", "fc"]


def test_default_layers_of_an_exported_program(exported_program):
    path, _ = exported_program
    model = torch.export.unflatten(torch.export.load(path))

    assert stats_layer_names(model) == ["features.1"]  # the ReLU between the two convolutions


def test_the_models_own_output_has_no_dead_channels(batches):
    """Logits below zero are votes against a class, not dead units: the layer whose output the model returns is
    measured but never flagged (it used to report "dead: 93/1000" in red for the demo model's classifier)."""
    with seeded(3):
        model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 5)).eval()
    with torch.no_grad():
        model[3].bias.fill_(-100.0)  # every logit negative for every image

    results = collect_stats(model, batches, layers=["0", "3"])

    assert results["3"].is_output and results["3"].dead_channels == [] and results["3"].max < 0
    assert not results["0"].is_output
    assert format_table(results).splitlines()[2].split()[6] == "-"


@pytest.mark.parametrize("layer", ["conv1", "relu1", "conv2", "fc"])
def test_statistics_equal_torchs_over_all_images_concatenated(net, batches, layer):
    results = collect_stats(net, batches, layers=[layer])
    reference = all_outputs(net, layer, batches).double()
    stats = results[layer]

    assert stats.count == reference.numel()
    assert stats.mean == pytest.approx(reference.mean().item(), rel=1e-9, abs=1e-12)
    assert stats.std == pytest.approx(reference.std(correction=0).item(), rel=1e-9)
    assert stats.min == reference.min().item()
    assert stats.max == reference.max().item()
    assert stats.zero_fraction == pytest.approx((reference <= 0).double().mean().item())
    channel_dim = -1 if layer == "fc" else 1
    never_positive = ~(reference > 0).movedim(channel_dim, 0).flatten(1).any(dim=1)
    assert stats.dead_channels == torch.nonzero(never_positive).flatten().tolist()


def test_dead_channels_are_exactly_the_ones_forced_dead(net, batches):
    results = collect_stats(net, batches, layers=CONV_AND_LINEAR)

    assert results["conv1"].dead_channels == [2]
    assert results["conv2"].dead_channels == []
    assert results["fc"].dead_channels == [0]  # for a linear layer: per output feature
    assert (results["conv1"].channels, results["fc"].channels) == (4, 6)


def test_the_true_output_is_measured_where_an_inplace_relu_follows():
    torch.manual_seed(0)
    resnet = torchvision.models.resnet18(weights=None).eval()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = resnet.bn1(resnet.conv1(x))  # resnet18 overwrites this with ReLU(inplace=True)

    stats = collect_stats(resnet, [x], layers=["bn1"])["bn1"]

    assert stats.min == pytest.approx(expected.min().item()) and stats.min < 0
    assert stats.zero_fraction == pytest.approx((expected <= 0).double().mean().item())


def test_nonfinite_values_are_counted_apart_from_the_rest():
    stats = LayerStats()
    stats.update(torch.tensor([[1.0, float("nan")], [float("inf"), 3.0]]))

    assert (stats.count, stats.nonfinite) == (2, 2)
    assert (stats.mean, stats.min, stats.max) == (2.0, 1.0, 3.0)
    assert json.loads(json.dumps(stats.as_dict()))["values"] == 2


# --- streaming --------------------------------------------------------------------------------------


def test_histogram_counts_sum_to_the_number_of_values(net, batches):
    for stats in collect_stats(net, batches).values():
        counts, edges = stats.histogram()
        assert int(counts.sum()) == stats.count
        assert edges.numel() == counts.numel() + 1
        assert edges[0] <= stats.min and stats.max < edges[-1]


def test_two_batches_give_exactly_what_one_batch_of_both_gives(net, batches):
    # In float64: float32 convolutions may round differently at another batch size (oneDNN picks kernels by shape),
    # and this test is about how statistics are merged, not about the convolution.
    net = net.double()
    first, second = batches[0].double(), batches[2].double()
    streamed = collect_stats(net, [first, second])
    at_once = collect_stats(net, [torch.cat([first, second])])

    for layer in streamed:
        a, b = streamed[layer].as_dict(), at_once[layer].as_dict()
        assert a["histogram"] == b["histogram"]  # same bins and counts, not just similar
        for key in ("values", "min", "max", "zero_fraction", "channels", "dead_channels"):
            assert a[key] == b[key], key
        assert a["mean"] == pytest.approx(b["mean"], rel=1e-9, abs=1e-12)
        assert a["std"] == pytest.approx(b["std"], rel=1e-9)


def test_a_wider_later_batch_widens_the_bins_without_dropping_a_value():
    narrow = torch.linspace(-0.01, 0.02, 500).reshape(500, 1)  # 500 samples of one feature
    wide = torch.linspace(-30.0, 70.0, 300).reshape(300, 1)
    stats = LayerStats(bins=50)
    stats.update(narrow)
    stats.update(wide)

    counts, edges = stats.histogram()
    # Every value lands in the bin of the final grid that contains it.
    everything = torch.cat([narrow.flatten(), wide.flatten()]).double()
    expected = torch.bincount(torch.bucketize(everything, edges, right=True) - 1, minlength=50)
    assert torch.equal(counts, expected)
    assert (counts > 0).sum() >= 25  # the values span at least half of the bins


def test_memory_does_not_grow_with_the_number_of_updates(net):
    def footprint(collector: StatsCollector) -> int:
        """Every number the collector holds: tensor elements plus lengths of any containers."""
        total = 0
        for stats in collector.stats.values():
            for value in vars(stats).values():
                if isinstance(value, torch.Tensor):
                    total += value.numel()
                elif isinstance(value, (list, dict, tuple)):
                    total += len(value)
        return total

    collector = StatsCollector(net)
    collector.update(random_batch(2, 16, 20, seed=0))
    after_one = footprint(collector)
    for seed in range(1, 11):
        collector.update(random_batch(2, 16, 20, seed=seed))

    assert footprint(collector) == after_one
    assert collector.images == 22


# --- the model is left alone ---------------------------------------------------------------------


def test_hooks_are_removed_and_modes_and_running_statistics_are_untouched():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(inplace=True)).train()
    running_mean = model[1].running_mean.clone()
    collector = StatsCollector(model, ["0", "1"])
    collector.update(random_batch(2, 16, 20))

    assert no_hooks_left(model)
    assert all(module.training for module in model.modules())
    assert torch.equal(model[1].running_mean, running_mean)  # the forward ran in eval mode


def test_hooks_are_removed_when_the_model_fails(net):
    collector = StatsCollector(net)
    with pytest.raises(UsageError, match="the model failed"):
        collector.update(torch.randn(1, 5, 16, 16))  # wrong channel count

    assert no_hooks_left(net)


def test_an_unknown_layer_fails_up_front_with_a_suggestion(net):
    with pytest.raises(UsageError, match="did you mean conv1"):
        StatsCollector(net, ["conv_1"])


def test_a_layer_that_does_not_run_is_reported_as_such(net, batches):
    net.unused = nn.Conv2d(3, 3, 1)
    results = collect_stats(net, batches[:1], layers=[*CONV_AND_LINEAR, "unused"])

    assert not results["unused"].ran
    assert "did not run" in format_table(results)
    assert results["unused"].as_dict()["mean"] is None


# --- reporting --------------------------------------------------------------------------------------


def test_the_table_has_one_line_per_layer_with_its_dead_count(net, batches):
    table = format_table(collect_stats(net, batches, layers=CONV_AND_LINEAR))
    lines = table.splitlines()

    assert lines[0].split()[0] == "layer"
    assert [line.split()[0] for line in lines[1:]] == ["conv1", "conv2", "fc"]
    assert "1/4" in lines[1] and "0/5" in lines[2] and "1/6" in lines[3]


def test_the_figure_has_one_row_per_layer(net, batches, tmp_path: Path):
    results = collect_stats(net, batches, layers=["conv1", "relu1", "conv2", "fc"])
    heights = []
    for rows in (1, 2, 4):
        path = histogram_figure(dict(list(results.items())[:rows]), tmp_path / f"rows{rows}.png")
        with Image.open(path) as image:
            image.load()
            heights.append(image.height)
            assert image.format == "PNG" and image.width > 600
            assert image.text["hookviz:layers"] == ",".join(list(results)[:rows])

    one_row = heights[1] - heights[0]
    assert one_row > 100
    assert heights[2] - heights[1] == 2 * one_row
    assert not list(tmp_path.glob(".*.tmp"))  # written atomically: no temporary file left behind
