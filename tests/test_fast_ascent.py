"""What makes gradient ascent fast, checked against the plain computation it replaces.

* ``folded_batch_norms``: eval-mode batch norms folded into the convolutions before them, for a block;
  the model computes the same function (eager ``nn.Sequential`` pairs and the modules of a ``.pt2``) and
  is put back exactly.
* ``lower_precision``: bfloat16 arithmetic (autocast) with the strided depthwise convolutions' input
  gradient taken from a stride-1 convolution of the zero-interleaved output gradient; that gradient is
  checked against autograd's in float32 to 1e-5.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from cli_helpers import hookviz, json_lines
from torch import nn

from hookviz import folding, precision
from hookviz.errors import UsageError
from hookviz.filters import Settings, visualize_channels, visualize_classes
from hookviz.folding import ChannelShift, folded_batch_norms
from hookviz.models import load_model
from hookviz.precision import ascent_dtype, lower_precision, strided_depthwise_input_gradient
from hookviz.preprocessing import default_preprocessing


class SamePadding(nn.Module):
    """TensorFlow's "same" padding for a stride-2 kernel-3 convolution on an even size: one row and column after."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x, (0, 1, 0, 1))


class PaddedConv(nn.Conv2d):
    """A convolution holding its padding module, as efficientnet-lite-pytorch's ``Conv2dStaticSamePadding`` does."""

    def __init__(self, channels: int, kernel: int, stride: int) -> None:
        super().__init__(channels, channels, kernel, stride, groups=channels, bias=False)
        self.static_padding = SamePadding()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(self.static_padding(x), self.weight, None, self.stride, 0, self.dilation, self.groups)


class InvertedResidual(nn.Module):
    """A MobileNet block: expand (1x1), strided depthwise (3x3), project (1x1), each followed by a batch norm."""

    def __init__(self, inputs: int, outputs: int, expand: int = 4) -> None:
        super().__init__()
        hidden = inputs * expand
        self._expand_conv = nn.Conv2d(inputs, hidden, 1, bias=False)
        self._bn0 = nn.BatchNorm2d(hidden)
        self._depthwise_conv = PaddedConv(hidden, 3, stride=2)
        self._bn1 = nn.BatchNorm2d(hidden)
        self._project_conv = nn.Conv2d(hidden, outputs, 1, bias=True)
        self._bn2 = nn.BatchNorm2d(outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu6(self._bn0(self._expand_conv(x)))
        x = F.relu6(self._bn1(self._depthwise_conv(x)))
        return self._bn2(self._project_conv(x))


class MobileNetLike(nn.Module):
    """A stem as torchvision builds it (an ``nn.Sequential`` of conv, batch norm, ReLU6), then two blocks."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU6())
        self.blocks = nn.Sequential(InvertedResidual(8, 12), InvertedResidual(12, 16))
        self.head = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)).mean(dim=(2, 3)))


def mobilenet_like() -> MobileNetLike:
    """With batch norm statistics far from the identity, so that a fold that forgets one shows."""
    torch.manual_seed(0)
    model = MobileNetLike()
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-1, 1)
            module.running_var.uniform_(0.5, 2)
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.uniform_(-0.5, 0.5)
    return model.eval()


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[nn.Module, nn.Module]:
    """(the eager model, the same model saved as a .pt2 and loaded by hookviz: fx graphs of modules)."""
    model = mobilenet_like()
    program = torch.export.export(
        model, (torch.randn(2, 3, 32, 32),), dynamic_shapes=({0: torch.export.Dim("batch", min=1)},)
    )
    path = tmp_path_factory.mktemp("fold") / "mobilenet_like.pt2"
    torch.export.save(program, path)
    return model, load_model(str(path)).module


def test_folding_keeps_the_function_and_puts_the_model_back(exported):
    eager, program = exported
    batch = torch.randn(3, 3, 32, 32)
    # Eager, only the stem's pair is visible (an nn.Sequential); the blocks' wiring is Python code. In the .pt2 every
    # module call is a node of its parent's graph: the stem's pair and all six of the blocks'.
    for model, expected_folds in ((eager, 1), (program, 7)):
        before = dict(model.state_dict(keep_vars=True))
        modules = dict(model.named_modules())
        graphs = {name: str(m.graph) for name, m in modules.items() if hasattr(m, "graph")}
        with torch.no_grad():
            expected = model(batch)
            with folded_batch_norms(model) as folded:
                got = model(batch)
                now = dict(model.named_modules())
                gone = [name for name, module in modules.items() if now.get(name) is not module]
            after = model(batch)
        assert folded == len(gone) == expected_folds  # each batch norm folded is out of the model for the block
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        assert torch.equal(after, expected)
        assert dict(model.named_modules()) == modules
        assert {name: str(m.graph) for name, m in model.named_modules() if hasattr(m, "graph")} == graphs
        assert all(tensor is before[name] for name, tensor in model.state_dict(keep_vars=True).items())


def test_a_convolution_whose_forward_takes_no_bias_is_followed_by_a_channel_shift():
    """A convolution subclass with its own forward may ignore ``self.bias``: its batch norm becomes an addition."""
    torch.manual_seed(2)
    model = nn.Sequential(PaddedConv(8, 3, 2), nn.BatchNorm2d(8)).eval()
    model[1].running_mean.uniform_(-1, 1)
    model[1].running_var.uniform_(0.5, 2)
    batch = torch.randn(2, 8, 16, 16)
    with torch.no_grad():
        expected = model(batch)
        with folded_batch_norms(model) as folded:
            assert folded == 1 and isinstance(model[1], ChannelShift) and model[0].bias is None
            got = model(batch)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert isinstance(model[1], nn.BatchNorm2d)


def test_a_kept_layer_keeps_its_own_output(exported):
    """A hooked layer's output is what it is without folding: its pair is left alone, the others are folded."""
    _, program = exported
    batch = torch.randn(2, 3, 32, 32)
    layer = "blocks.0._bn1"
    seen: list[torch.Tensor] = []
    module = dict(program.named_modules())[layer]
    handle = module.register_forward_hook(lambda m, i, o: seen.append(o.clone()))
    try:
        with torch.no_grad():
            program(batch)
            with folded_batch_norms(program, keep=[layer]) as folded:
                program(batch)
                assert dict(program.named_modules())[layer] is module
    finally:
        handle.remove()
    assert folded == 6
    torch.testing.assert_close(seen[1], seen[0], rtol=1e-5, atol=1e-5)


def test_batch_norms_in_training_mode_and_shared_modules_are_not_folded():
    model = mobilenet_like().train()
    with folded_batch_norms(model) as folded:
        assert folded == 0
    shared = nn.BatchNorm2d(8).eval()
    twice = nn.Sequential(nn.Conv2d(3, 8, 1), shared, nn.Conv2d(8, 8, 1), shared).eval()
    with folded_batch_norms(twice) as folded:
        assert folded == 0 and twice[1] is shared


def test_the_model_is_put_back_when_the_block_fails(exported):
    eager, _ = exported
    with pytest.raises(KeyboardInterrupt), folded_batch_norms(eager):
        raise KeyboardInterrupt
    assert isinstance(eager.stem[1], nn.BatchNorm2d) and eager.stem[0].weight.requires_grad


@pytest.mark.parametrize(
    ("size", "kernel", "stride", "padding"),
    [
        ((6, 6), 3, 2, 1),
        ((7, 9), 3, 2, 0),
        ((113, 113), 3, 2, 0),
        ((59, 40), 5, 2, 2),
        ((9, 11), 3, 3, 1),
        ((8, 8), (3, 5), (2, 1), (1, 2)),
    ],
)
def test_the_strided_depthwise_input_gradient_is_autograds(size, kernel, stride, padding):
    torch.manual_seed(1)
    kernel_hw = kernel if isinstance(kernel, tuple) else (kernel, kernel)
    stride_hw = stride if isinstance(stride, tuple) else (stride, stride)
    padding_hw = padding if isinstance(padding, tuple) else (padding, padding)
    x = torch.randn(2, 4, *size, requires_grad=True)
    weight = torch.randn(4, 1, *kernel_hw)
    y = F.conv2d(x, weight, stride=stride_hw, padding=padding_hw, groups=4)
    gradient = torch.randn_like(y)
    (expected,) = torch.autograd.grad(y, x, gradient)
    got = strided_depthwise_input_gradient(gradient, weight, size, stride_hw, padding_hw)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_bfloat16_gradients_point_where_float32_ones_do(exported, monkeypatch):
    """Through the whole model, in bfloat16 (with the strided depthwise convolutions' own input gradient), the input
    gradient keeps float32's direction; the weight gradient, when asked for, is autograd's."""
    eager, _ = exported
    calls = []
    real = precision.strided_depthwise_input_gradient
    monkeypatch.setattr(precision, "strided_depthwise_input_gradient", lambda *a: calls.append(a) or real(*a))
    batch = torch.randn(4, 3, 32, 32)

    def gradients(dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        leaf = batch.clone().requires_grad_(True)
        weight = eager.blocks[0]._depthwise_conv.weight
        with lower_precision(torch.device("cpu"), dtype):
            score = eager(leaf)[:, 2].float().sum()
        return torch.autograd.grad(score, [leaf, weight])

    (reference, reference_weight), (low, low_weight) = gradients(torch.float32), gradients(torch.bfloat16)
    assert len(calls) == 2  # both blocks' strided depthwise convolutions
    assert low.dtype == torch.float32
    assert F.cosine_similarity(low.flatten(), reference.flatten(), dim=0) > 0.98
    assert F.cosine_similarity(low_weight.flatten(), reference_weight.flatten(), dim=0) > 0.98


def test_ascent_precision_names():
    cpu = torch.device("cpu")
    assert ascent_dtype("float32", cpu) == torch.float32
    assert ascent_dtype("bfloat16", cpu) == torch.bfloat16
    assert ascent_dtype("auto", cpu) == (torch.bfloat16 if precision.native_cpu_bfloat16() else torch.float32)
    assert ascent_dtype("auto", torch.device("cuda")) == torch.float32
    with pytest.raises(UsageError, match="float16.*auto, float32, bfloat16"):
        ascent_dtype("float16", cpu)


def test_folding_does_not_change_the_pictures(exported, monkeypatch):
    """In float32 the ascent with its batch norms folded gives the pictures the model as it is gives."""
    eager, _ = exported
    settings = Settings(steps=4, precision="float32")
    preprocessing = default_preprocessing((32, 32))
    folded = visualize_channels(eager, "blocks.1", [0, 5], preprocessing=preprocessing, settings=settings)
    monkeypatch.setattr(folding, "_pairs", lambda parent: [])  # nothing to fold
    plain = visualize_channels(eager, "blocks.1", [0, 5], preprocessing=preprocessing, settings=settings)
    torch.testing.assert_close(folded.images, plain.images, atol=1e-4, rtol=0)
    assert folded.activations == pytest.approx(plain.activations, rel=1e-5)
    assert folded.precision == "float32"


def test_bfloat16_pictures_excite_their_channel_as_float32_ones_do(exported):
    """The same steps in bfloat16 reach the channels about as far; the activations reported are float32's."""
    eager, _ = exported
    preprocessing = default_preprocessing((32, 32))
    channels = [0, 3, 7, 11]
    low = visualize_channels(
        eager, "blocks.1", channels, preprocessing=preprocessing, settings=Settings(steps=24, precision="bfloat16")
    )
    full = visualize_channels(
        eager, "blocks.1", channels, preprocessing=preprocessing, settings=Settings(steps=24, precision="float32")
    )
    assert low.precision == "bfloat16" and full.precision == "float32"
    start = visualize_channels(eager, "blocks.1", channels, preprocessing=preprocessing, settings=Settings(steps=1))
    for reached, reference, first in zip(low.activations, full.activations, start.activations, strict=True):
        assert reached > first + 0.5 * (reference - first)  # bfloat16 climbs at least half as far as float32
    classes = visualize_classes(
        eager, [1, 4], preprocessing=preprocessing, settings=Settings(steps=16, precision="bfloat16")
    )
    assert classes.precision == "bfloat16" and len(classes.probabilities) == 2


def test_cli_records_the_precision(project: Path):
    result = hookviz(
        "filters",
        "nets:build_tinynet",
        "--size",
        "32",
        "-l",
        "conv2",
        "-f",
        "0-1",
        "--steps",
        "2",
        "--precision",
        "float32",
        "--json",
        "-o",
        project / "out",
        "-q",
    )
    assert result.exit_code == 0, result.stderr
    assert [record["precision"] for record in json_lines(result.stdout)] == ["float32", "float32"]
    bad = hookviz("filters", "nets:build_tinynet", "-l", "conv2", "--precision", "half", "-o", project / "bad")
    assert bad.exit_code == 2 and "half" in bad.stderr


@pytest.mark.parametrize("channels_last", [True, False])
def test_constant_padding_in_lower_precision_is_f_pads(channels_last):
    """Under lower_precision, constant padding writes its border and copies the inside: the same values and
    gradient as F.pad, in the input's memory order."""
    torch.manual_seed(3)
    x = torch.randn(2, 5, 7, 6)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    gradient = torch.randn(2, 5, 7 + 2 + 3, 6 + 0 + 1)
    expected_leaf = x.clone().requires_grad_(True)
    expected = F.pad(expected_leaf, (0, 1, 2, 3), value=0.5)
    (expected_gradient,) = torch.autograd.grad(expected, expected_leaf, gradient)
    for pad in (
        lambda t: F.pad(t, (0, 1, 2, 3), value=0.5),
        lambda t: torch.ops.aten.pad.default(t, [0, 1, 2, 3], "constant", 0.5),
    ):
        leaf = x.clone().requires_grad_(True)
        with lower_precision(torch.device("cpu"), torch.bfloat16):
            padded = pad(leaf)
        assert type(padded.grad_fn).__name__ == "_ConstantPadBackward"  # hookviz's, not F.pad's
        assert padded.is_contiguous(memory_format=torch.channels_last) == channels_last
        torch.testing.assert_close(padded, expected.detach(), rtol=0, atol=0)
        (got,) = torch.autograd.grad(padded, leaf, gradient)
        torch.testing.assert_close(got, expected_gradient, rtol=0, atol=0)
