"""The user's model is untouched by every hookviz call (parameters, .grad, flags, buffers, hooks, grad mode),
and 500 library calls leave no hooks and no growing memory."""

from __future__ import annotations

import gc
import tracemalloc
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from hookviz.cams import compute_cams
from hookviz.errors import UsageError
from hookviz.guided import compute_guided
from hookviz.hooks import capture
from hookviz.layers import trace_layers

# --- no leaks over many calls ---------------------------------------------------------------------


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


HOOK_DICTS = (
    "_forward_hooks",
    "_forward_pre_hooks",
    "_backward_hooks",
    "_backward_pre_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_pre_hooks_with_kwargs",
    "_forward_hooks_always_called",
)
GLOBAL_HOOK_DICTS = (
    "_global_forward_hooks",
    "_global_forward_pre_hooks",
    "_global_backward_hooks",
    "_global_backward_pre_hooks",
    "_global_forward_hooks_always_called",
)


def module_hooks(model: nn.Module) -> dict[tuple[str, str], list]:
    """Every hook registered on every module: {(module name, hook dict): [(handle id, hook), ...]}."""
    return {
        (name, kind): list(getattr(module, kind).items())
        for name, module in model.named_modules()
        for kind in HOOK_DICTS
        if getattr(module, kind, None)
    }


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


# --- the user's model is untouched ----------------------------------------------------------------


class UserState:
    """Everything about a model a hookviz call must leave as it was."""

    def __init__(self, model: nn.Module) -> None:
        self.parameters = {
            name: (p, p.detach().clone(), p.requires_grad, None if p.grad is None else p.grad.clone())
            for name, p in model.named_parameters()
        }
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
    "guided-error-wrong-input-shape": _raises(
        lambda model, x: compute_guided(model, torch.randn(1, 5, 32, 32), layer="relu2")
    ),
    "cam-error-no-linear-head-after-layer": _raises(
        lambda model, x: compute_cams(model, x, layer="relu1", method="cam")
    ),
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
