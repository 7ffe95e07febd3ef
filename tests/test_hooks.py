"""hookviz.hooks.capture: true layer outputs, gradients at a layer, and a model left exactly as it was."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from hookviz.errors import UsageError
from hookviz.hooks import capture


@pytest.fixture
def resnet() -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.resnet18(weights=None).eval()


@pytest.fixture
def batch() -> torch.Tensor:
    return torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))


def no_hooks_left(model: nn.Module) -> bool:
    return all(len(m._forward_hooks) == 0 and len(m._forward_pre_hooks) == 0 for m in model.modules())


def reference_layer_gradient(model: nn.Module, x: torch.Tensor, layer: str, class_index: int):
    """(output, d logit / d output) of ``layer`` from an ordinary full-autograd forward pass."""
    kept = {}
    handle = dict(model.named_modules())[layer].register_forward_hook(lambda m, i, o: kept.update(out=o))
    try:
        with torch.enable_grad():
            logits = model(x.clone().requires_grad_(True))
            (gradient,) = torch.autograd.grad(logits[0, class_index], kept["out"])
    finally:
        handle.remove()
    return kept["out"].detach(), gradient


# --- the in-place trap ---------------------------------------------------------------------------


def test_captured_output_survives_the_inplace_relu_after_it(resnet, batch):
    # resnet18 runs bn1 -> ReLU(inplace=True): the ReLU overwrites bn1's output tensor.
    with torch.no_grad():
        expected = resnet.bn1(resnet.conv1(batch))

    with capture(resnet, ["bn1"]) as activations:
        resnet(batch)

    assert torch.allclose(activations["bn1"], expected, atol=1e-6)
    assert activations["bn1"].min() < 0  # batch norm outputs are negative about half the time


def test_a_naive_detach_hook_falls_into_the_inplace_trap(resnet, batch):
    # The contrast: what a hand-written hook records for the same layer.
    with torch.no_grad():
        expected = resnet.bn1(resnet.conv1(batch))
    recorded = {}
    handle = resnet.bn1.register_forward_hook(lambda module, inputs, output: recorded.update(bn1=output.detach()))
    try:
        with torch.no_grad():
            resnet(batch)
    finally:
        handle.remove()

    assert recorded["bn1"].min().item() == 0.0  # rewritten by the in-place ReLU
    assert not torch.allclose(recorded["bn1"], expected)


def test_capture_does_not_change_the_models_output(resnet, batch):
    with torch.no_grad():
        expected = resnet(batch)

    with capture(resnet, ["bn1", "layer1.0", "layer4"]) as activations:
        logits = resnet(batch)

    assert torch.allclose(logits, expected, atol=1e-6)
    assert activations["layer4"].shape == (1, 512, 2, 2)


# --- leaving the model as it was -----------------------------------------------------------------


def test_hooks_are_removed_after_success(resnet, batch):
    with capture(resnet, ["conv1", "layer2", "layer4.1.bn2"]):
        assert not no_hooks_left(resnet)
        resnet(batch)

    assert no_hooks_left(resnet)


def test_hooks_are_removed_after_an_exception_in_the_block(resnet, batch):
    with pytest.raises(KeyError, match="boom"), capture(resnet, ["conv1", "layer2"], grad=True):
        resnet(batch)
        raise KeyError("boom")

    assert no_hooks_left(resnet)


def test_unknown_layer_suggests_close_names_and_registers_nothing(resnet):
    with pytest.raises(UsageError, match="did you mean") as info, capture(resnet, ["conv1", "layer5"]):
        pass  # pragma: no cover

    assert "'layer5'" in str(info.value) and "layer4" in str(info.value)
    assert no_hooks_left(resnet)


def test_train_and_eval_flags_are_restored(resnet, batch):
    resnet.train()
    resnet.layer2.eval()  # a mixed state, as while fine-tuning with frozen batch norm
    before = {name: module.training for name, module in resnet.named_modules()}
    assert len(set(before.values())) == 2

    with capture(resnet, ["layer3"]):
        assert not any(module.training for module in resnet.modules())
        resnet(batch)
    assert {name: module.training for name, module in resnet.named_modules()} == before

    with pytest.raises(RuntimeError), capture(resnet, ["layer3"]):
        resnet(torch.zeros(1, 5, 64, 64))  # wrong number of channels
    assert {name: module.training for name, module in resnet.named_modules()} == before


def test_capture_in_eval_mode_does_not_update_batch_norm_statistics(resnet, batch):
    resnet.train()
    running_mean = resnet.bn1.running_mean.clone()

    with capture(resnet, ["layer1"]):
        resnet(batch)

    assert torch.equal(resnet.bn1.running_mean, running_mean)
    assert resnet.training


def test_parameter_grads_stay_none(resnet, batch):
    with capture(resnet, ["layer4"], grad=True) as activations:
        logits = resnet(batch)
        torch.autograd.grad(logits[0, 3], activations["layer4"], retain_graph=True)
        logits[0, 3].backward()  # even an explicit backward inside the block leaves no trace
        assert resnet.fc.bias.grad is not None  # (it did reach the parameters above layer4)

    assert all(p.grad is None for p in resnet.parameters())


def test_existing_parameter_grads_keep_their_values(resnet, batch):
    # A backward in the block accumulates into existing .grad tensors in place; their values must come back.
    resnet.fc.weight.grad = torch.full_like(resnet.fc.weight, 7.0)

    with capture(resnet, ["layer4"], grad=True):
        resnet(batch)[0, 3].backward()

    assert torch.all(resnet.fc.weight.grad == 7.0)


@pytest.mark.parametrize("outer_grad_mode", [True, False])
def test_grad_mode_is_restored(resnet, batch, outer_grad_mode):
    with torch.set_grad_enabled(outer_grad_mode):
        with capture(resnet, ["layer3"], grad=True):
            resnet(batch)
        assert torch.is_grad_enabled() is outer_grad_mode

        with capture(resnet, ["layer3"]):
            resnet(batch)
        assert torch.is_grad_enabled() is outer_grad_mode

        with pytest.raises(ZeroDivisionError), capture(resnet, ["layer3"], grad=True):
            resnet(batch)
            1 / 0
        assert torch.is_grad_enabled() is outer_grad_mode


# --- gradients at a layer ------------------------------------------------------------------------


def test_gradient_at_a_captured_layer_equals_full_autograd(resnet, batch):
    expected_output, expected_gradient = reference_layer_gradient(resnet, batch, "layer3", class_index=42)

    with capture(resnet, ["layer3"], grad=True) as activations:
        logits = resnet(batch)
    (gradient,) = torch.autograd.grad(logits[0, 42], activations["layer3"])

    assert torch.allclose(activations["layer3"], expected_output, atol=1e-6)
    assert torch.allclose(gradient, expected_gradient, atol=1e-6)
    assert gradient.abs().sum() > 0


def test_gradient_works_with_frozen_parameters(resnet, batch):
    for parameter in resnet.parameters():
        parameter.requires_grad_(False)
    expected_output, expected_gradient = reference_layer_gradient(resnet, batch, "layer4", class_index=7)

    with capture(resnet, ["layer4"], grad=True) as activations:
        logits = resnet(batch)
    (gradient,) = torch.autograd.grad(logits[0, 7], activations["layer4"])

    assert torch.allclose(gradient, expected_gradient, atol=1e-6)
    assert not any(p.requires_grad for p in resnet.parameters())


def test_without_grad_nothing_is_recorded(resnet, batch):
    with capture(resnet, ["layer4"]) as activations:
        logits = resnet(batch)

    assert not logits.requires_grad
    assert not activations["layer4"].requires_grad


# --- modules that run more than once, and unusual outputs ----------------------------------------


class SharedConv(nn.Module):
    """One conv applied twice, with an in-place ReLU after each call."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.conv(self.relu(self.conv(x))))


def test_a_module_called_twice_keeps_the_last_call(batch):
    torch.manual_seed(0)
    model = SharedConv().eval()
    with torch.no_grad():
        second_call = model.conv(torch.relu(model.conv(batch)))

    with capture(model, ["conv", "relu"]) as activations:
        model(batch)

    assert activations.calls == {"conv": 2, "relu": 2}
    assert torch.allclose(activations["conv"], second_call, atol=1e-6)
    assert activations["conv"].min() < 0  # before the in-place ReLU
    assert activations.order == ["conv", "relu", "conv", "relu"]


class PairOfPairs(nn.Module):
    def forward(self, x: torch.Tensor):
        return (x * 2, x * 3), x * 5


class UsesPairs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.pairs = PairOfPairs()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        (a, b), c = self.pairs(x)
        return a + b + c


def test_capture_leaves_a_nested_tuple_output_intact():
    # The captured tensor is the first one found depth-first (a); the copy must go back in a's place, not c's.
    model = UsesPairs()
    x = torch.ones(1)

    with capture(model, ["pairs"]) as activations:
        output = model(x)

    assert torch.equal(activations["pairs"], x * 2)
    assert torch.equal(output, x * (2 + 3 + 5))


class DictBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"features": self.linear(x)}


class UsesDict(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block = DictBlock()
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.block(x)["features"]
        return self.head(features.relu_())


def test_capture_protects_a_dict_output_from_inplace_ops():
    torch.manual_seed(0)
    model = UsesDict().eval()
    x = torch.randn(3, 4)
    with torch.no_grad():
        expected = model.block.linear(x)
    assert expected.min() < 0

    with capture(model, ["block"]) as activations:
        model(x)

    assert torch.allclose(activations["block"], expected)


def test_gradient_through_a_dict_output_layer():
    torch.manual_seed(0)
    model = UsesDict().eval()
    x = torch.randn(1, 4)

    with capture(model, ["block"], grad=True) as activations:
        output = model(x)
    (gradient,) = torch.autograd.grad(output[0, 1], activations["block"])

    # d head(relu(f))[1] / d f = head.weight[1] where f > 0, else 0
    expected = model.head.weight[1] * (activations["block"] > 0)
    assert torch.allclose(gradient, expected.detach())
