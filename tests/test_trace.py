"""hookviz.trace: forward and backward events in execution order, checked against plain hooks and autograd."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import torchvision
from cam_models import random_batch
from nets import DictOutput, SmallCNN, seeded
from torch import nn

from hookviz.errors import UsageError
from hookviz.trace import FORWARD, format_trace, trace_model


def small_sequential() -> nn.Sequential:
    with seeded(4):
        return nn.Sequential(
            nn.Conv2d(3, 6, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(6, 4, 3, stride=2),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(4, 5),
        ).eval()


def no_hooks_left(model: nn.Module) -> bool:
    return all(
        not m._forward_hooks and not m._forward_pre_hooks and not m._backward_hooks and not m._backward_pre_hooks
        for m in model.modules()
    )


def call_order(model: nn.Module, x: torch.Tensor) -> list[str]:
    """Module names in the order their forward starts, from plain forward pre-hooks: the independent reference."""
    order: list[str] = []
    handles = [
        module.register_forward_pre_hook(lambda m, i, name=name: order.append(name))
        for name, module in model.named_modules()
    ]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for handle in handles:
            handle.remove()
    return order


def reference_calls(model: nn.Module, x: torch.Tensor, class_index: int):
    """(name, output, d logit / d output) per module call, by plain hooks and one torch.autograd.grad call.

    Values are copied the moment each module returns. Gradients are taken w.r.t. the hooked
    tensors themselves, so run this on a model whose ReLUs are not in place: the only in-place
    op left in a resnet is ``out += identity``, which passes the gradient through unchanged.
    """
    calls: list[tuple[str, torch.Tensor, torch.Tensor]] = []
    handles = [
        module.register_forward_hook(lambda m, i, o, name=name: calls.append((name, o, o.detach().clone())))
        for name, module in model.named_modules()
    ]
    try:
        with torch.enable_grad():
            logits = model(x.clone().requires_grad_(True))
            gradients = torch.autograd.grad(logits[:, class_index].sum(), [o for _, o, _ in calls])
    finally:
        for handle in handles:
            handle.remove()
    return [(name, value, gradient) for (name, _, value), gradient in zip(calls, gradients)]


def without_inplace(model: nn.Module) -> nn.Module:
    twin = copy.deepcopy(model)
    for module in twin.modules():
        if isinstance(module, nn.ReLU):
            module.inplace = False
    return twin


@pytest.fixture(scope="module")
def resnet() -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.resnet18(weights=None).eval()


@pytest.fixture(scope="module")
def image() -> torch.Tensor:
    return torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def resnet_trace(resnet, image):
    return trace_model(resnet, image)


# --- forward --------------------------------------------------------------------------------------


def test_forward_events_come_in_the_order_modules_are_called(resnet, image, resnet_trace):
    names = [event.name for event in resnet_trace.forward]

    assert names == call_order(resnet, image)
    assert names[:3] == ["", "conv1", "bn1"]  # the model itself, then its children as they run
    # resnet18's blocks call their one ReLU module twice: each call is its own event.
    assert [event.call for event in resnet_trace.forward if event.name == "layer1.0.relu"] == [1, 2]


def test_forward_events_of_a_sequential_model():
    model = small_sequential()
    x = random_batch(2, 16, 16)
    trace = trace_model(model, x)

    assert [event.name for event in trace.forward] == call_order(model, x) == ["", "0", "1", "2", "3", "4", "5", "6"]
    assert [event.depth for event in trace.forward] == [0, 1, 1, 1, 1, 1, 1, 1]
    assert [event.output.shape for event in trace.forward] == [
        (2, 5),
        (2, 6, 16, 16),
        (2, 6, 16, 16),
        (2, 4, 7, 7),
        (2, 4, 7, 7),
        (2, 4, 1, 1),
        (2, 4),
        (2, 5),
    ]
    assert trace.forward[1].inputs[0].shape == (2, 3, 16, 16)


def test_reported_values_are_the_true_outputs_despite_inplace_relus(resnet, image, resnet_trace):
    # The same network without in-place ops is the reference: its hooked outputs cannot have been overwritten.
    reference = reference_calls(without_inplace(resnet), image, resnet_trace.classes[0])
    by_call: dict[str, list[torch.Tensor]] = {}
    for name, output, _ in reference:
        by_call.setdefault(name, []).append(output)
    for event in resnet_trace.forward:
        output = by_call[event.name][event.call - 1]
        assert event.output.shape == tuple(output.shape), event.name
        assert event.output.min == pytest.approx(output.min().item(), abs=1e-5), event.name
        assert event.output.max == pytest.approx(output.max().item(), abs=1e-5), event.name
        assert event.output.mean == pytest.approx(output.double().mean().item(), abs=1e-5), event.name
    bn1 = next(event for event in resnet_trace.forward if event.name == "bn1")
    assert bn1.output.min < 0  # before the in-place ReLU, not after it


# --- backward ------------------------------------------------------------------------------------


def test_the_gradient_at_the_logits_is_one_hot(resnet_trace):
    fc = next(event for event in resnet_trace.backward if event.name == "fc")

    assert fc.output.shape == (1, 1000)
    assert fc.output.norm == pytest.approx(1.0)
    assert (fc.output.min, fc.output.max) == (0.0, 1.0)
    assert resnet_trace.backward[0].name == ""  # the model's own output gradient arrives first


def test_gradient_norms_equal_autograds_for_every_module_call(resnet, image, resnet_trace):
    reference = reference_calls(without_inplace(resnet), image, resnet_trace.classes[0])
    norms: dict[str, list[float]] = {}
    for name, _, gradient in reference:
        norms.setdefault(name, []).append(gradient.norm().item())

    assert len(resnet_trace.backward) == len(resnet_trace.forward)  # every call's output got its gradient
    for event in resnet_trace.backward:
        assert event.output.norm == pytest.approx(norms[event.name][event.call - 1], rel=1e-4, abs=1e-7), event.name


def test_gradients_of_a_sequential_model_come_in_reverse_order():
    trace = trace_model(small_sequential(), random_batch(1, 16, 16))
    forward_layers = [event.name for event in trace.forward if event.depth == 1]
    backward_layers = [event.name for event in trace.backward if event.depth == 1]

    assert backward_layers == forward_layers[::-1]


def test_the_score_is_the_chosen_logit_summed_over_the_batch():
    model = SmallCNN()
    x = random_batch(3)
    with torch.no_grad():
        logits = model(x)
    trace = trace_model(model, x, class_index=2)

    assert trace.classes == [2, 2, 2]
    assert trace.score == pytest.approx(logits[:, 2].sum().item(), rel=1e-5)
    fc = next(event for event in trace.backward if event.name == "fc")
    assert fc.output.norm == pytest.approx(math.sqrt(3))  # one 1 per image


def test_the_default_class_is_each_images_top_prediction():
    model = SmallCNN()
    x = random_batch(4)
    with torch.no_grad():
        top = model(x).argmax(dim=1).tolist()

    assert trace_model(model, x).classes == top


def test_a_chosen_output_of_a_dict_model_is_traced():
    model = DictOutput(SmallCNN()).eval()
    trace = trace_model(model, random_batch(1), output_key="aux")
    with_gradient = {event.name for event in trace.backward}

    assert "aux" in with_gradient
    assert "net.fc" not in with_gradient  # the "logits" head does not feed the score
    assert "net.fc" in {event.name for event in trace.forward}


def test_a_zero_gradient_is_flagged():
    with seeded(5):
        model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)).eval()
    with torch.no_grad():
        model[0].bias.fill_(-100.0)  # the ReLU is closed everywhere: nothing flows back below it
    trace = trace_model(model, torch.randn(2, 4))

    notes = {event.name: event.note for event in trace.backward}
    assert notes["0"] == "zero gradient"
    assert notes["2"] is None


def test_a_nonfinite_gradient_is_flagged():
    class Overflow(nn.Module):
        def forward(self, x):
            return x * 1e30 * 1e30  # inf in float32

    model = nn.Sequential(nn.Linear(4, 3), Overflow(), nn.Linear(3, 2)).eval()
    trace = trace_model(model, torch.randn(1, 4), class_index=0)

    overflow = next(event for event in trace.forward if event.name == "1")
    assert "non-finite" in overflow.note
    assert "non-finite gradient" in next(event for event in trace.backward if event.name == "0").note


# --- the model is left alone ---------------------------------------------------------------------


def test_parameters_grad_stays_none_and_no_hooks_remain(resnet, resnet_trace):
    assert all(parameter.grad is None for parameter in resnet.parameters())
    assert no_hooks_left(resnet)


def test_existing_grads_and_train_mode_are_kept():
    model = SmallCNN(batchnorm=True).train()
    for parameter in model.parameters():
        parameter.grad = torch.ones_like(parameter)
    running_mean = model.bn1.running_mean.clone()

    trace = trace_model(model, random_batch(2))

    assert all(torch.equal(parameter.grad, torch.ones_like(parameter)) for parameter in model.parameters())
    assert all(module.training for module in model.modules())
    assert torch.equal(model.bn1.running_mean, running_mean)  # traced in eval mode
    assert trace.input_gradient is not None and trace.input_gradient.shape == (2, 3, 48, 64)


def test_hooks_are_removed_when_the_model_fails():
    model = small_sequential().train()
    with pytest.raises(UsageError, match="the model failed"):
        trace_model(model, torch.randn(1, 5, 16, 16))  # wrong channel count

    assert no_hooks_left(model)
    assert all(module.training for module in model.modules())


def test_frozen_parameters_and_a_callers_inference_mode_still_give_gradients():
    model = small_sequential().requires_grad_(False)
    with torch.inference_mode():
        x = random_batch(1, 16, 16)
        trace = trace_model(model, x)

    assert len(trace.backward) == len(trace.forward)
    assert trace.input_gradient.norm > 0


def test_an_out_of_range_class_is_a_usage_error():
    with pytest.raises(UsageError, match="out of range"):
        trace_model(small_sequential(), random_batch(1, 16, 16), class_index=5)


# --- output -------------------------------------------------------------------------------------


def test_the_text_table_has_a_row_per_event_indented_by_depth(resnet_trace):
    lines = format_trace(resnet_trace).splitlines()

    assert lines[0].split()[:4] == ["dir", "#", "module", "type"]
    assert len(lines) == 1 + len(resnet_trace.events) + 1  # header, events, the input's gradient
    assert lines[1].split()[:4] == ["fwd", "0", "(model)", "ResNet"]
    assert lines[8].split()[:3] == ["fwd", "7", "layer1.0.conv1"]
    assert "  " * 3 + "layer1.0.conv1" in lines[8]  # depth 3: model > layer1 > layer1.0 > conv1
    # A second call is written as -l takes it (layer1.0.relu#2), so a row can be copied into -l.
    assert any(line.split()[:3] == ["fwd", "12", "layer1.0.relu#2"] for line in lines)
    assert lines[-1].split()[:2] == ["bwd", "(input)"]


def test_the_trace_is_strict_json(resnet_trace):
    data = json.loads(json.dumps(resnet_trace.as_json(), allow_nan=False))

    assert data["classes"] == resnet_trace.classes
    assert data["events"][0]["direction"] == FORWARD and data["events"][0]["output"]["shape"] == [1, 1000]
    assert data["events"][-1]["gradient"]["norm"] > 0
