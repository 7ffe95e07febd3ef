"""Capture the outputs of named layers for one call, and leave the model exactly as it was.

    with capture(model, ["layer4"], grad=True) as activations:
        logits = model(batch)
    gradient, = torch.autograd.grad(logits[:, 243].sum(), activations["layer4"])

Three things other tools get wrong, handled here:

* In-place ops after a layer (``ReLU(inplace=True)``, ``out += identity``) would
  rewrite a captured ``output.detach()``. The hook hands the rest of the network
  a copy, so the captured tensor keeps the layer's true output.
* With ``grad=True`` the forward pass runs without autograd until the first
  captured layer: gradients are only needed above it, so nothing below is
  recorded. The captured tensor is where back-propagation stops.
* Hooks live for one ``with`` block (removed on success, exception or Ctrl-C);
  train/eval flags and parameters' ``.grad`` are restored on exit.
"""

from __future__ import annotations

from collections.abc import Callable, Container, Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from .errors import UsageError, did_you_mean
from .forward import first_tensor, replace_first_tensor


class Activations(dict):
    """Layer name -> captured output tensor (the last call's, when a module runs more than once)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: dict[str, int] = {}
        self.order: list[str] = []  # layer names in the order their calls returned


def split_call(name: str) -> tuple[str, int | None]:
    """A layer name and the call it picks: ``"_swish#2"`` -> ``("_swish", 2)``, ``"layer4"`` -> ``("layer4", None)``.

    A module that runs several times per forward pass (one activation shared by every block)
    is named with ``#N`` for its N-th call (from 1); without it, its last call is meant.
    """
    base, separator, number = name.rpartition("#")
    if separator and base and number.isdigit():
        if int(number) < 1:
            raise UsageError(f"layer {name!r}: calls count from 1, e.g. {base}#1")
        return base, int(number)
    return name, None


def layer_call(name: str, module_names: Container[str]) -> tuple[str, int | None]:
    """The module a layer name means and the call it picks: a module's own name as it is (a name may itself
    hold "#"), else ``name#N`` read by ``split_call``."""
    return (name, None) if name in module_names else split_call(name)


def resolve_layers(model: nn.Module, names: Sequence[str]) -> dict[str, nn.Module]:
    """Map ``named_modules()`` names (with an optional ``#N`` call) to modules; unknown names fail up front
    with close matches."""
    modules = dict(model.named_modules())
    resolved: dict[str, nn.Module] = {}
    for name in names:
        base = layer_call(name, modules)[0]
        if base in modules and base != "":
            resolved[name] = modules[base]
            continue
        suggestion = did_you_mean(base, [n for n in modules if n], cutoff=0.5)
        raise UsageError(f"unknown layer {base!r}{suggestion} ('hookviz layers MODEL' lists them)")
    return resolved


@contextmanager
def hook_handles() -> Iterator[list[RemovableHandle]]:
    """A list to put hook handles in; every handle in it is removed when the block ends, however it ends.

    with hook_handles() as handles:
        handles.append(module.register_forward_hook(hook))
        model(batch)
    """
    handles: list[RemovableHandle] = []
    try:
        yield handles
    finally:
        for handle in handles:
            handle.remove()
        handles.clear()


@contextmanager
def preserved_state(model: nn.Module, eval_mode: bool = True) -> Iterator[None]:
    """Put ``model`` in eval mode for the block; restore every module's mode and every ``.grad`` after."""
    modes = [(module, module.training) for module in model.modules()]
    # Copies, not references: a backward pass inside the block would accumulate into the same tensors.
    grads = [(param, None if param.grad is None else param.grad.clone()) for param in model.parameters()]
    if eval_mode:
        model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training
        for param, grad in grads:
            param.grad = grad


@contextmanager
def capture(
    model: nn.Module,
    layers: Sequence[str],
    *,
    grad: bool = False,
    eval_mode: bool = True,
    leaf_calls: Mapping[str, int] | None = None,
) -> Iterator[Activations]:
    """Record the outputs of ``layers`` during the forward passes run inside the block.

    With ``grad=True``, captured tensors can be differentiated against
    (``torch.autograd.grad``); autograd records only the part of the network
    from the first captured layer on.

    ``leaf_calls`` is for a module that runs several times per forward pass (one
    activation module shared by every block), where the last call is the one to
    explain: autograd starts at that layer's given call instead of its first, and
    every later call starts a fresh graph, so neither the forward pass nor the
    backward pass pays for the blocks in between.

    A layer named ``name#N`` records the module's N-th call only (``split_call``); with
    ``grad=True`` autograd starts at that call and runs through the later ones, so the
    gradient reaching it is the whole of the score's.
    """
    modules = resolve_layers(model, layers)
    module_names = {name for name, _ in model.named_modules()}
    activations = Activations()
    leaf_calls = dict(leaf_calls or {})

    def make_hook(name: str) -> Callable[..., Any]:
        picked = layer_call(name, module_names)[1]

        def hook(module: nn.Module, inputs: Any, output: Any) -> Any:
            tensor = first_tensor(output)
            if tensor is None:
                return None
            call = activations.calls[name] = activations.calls.get(name, 0) + 1
            if picked is not None and call != picked:
                return None
            activations.order.append(name)
            # Once an earlier captured layer has started the graph, later ones stay in it (several layers
            # explained by one backward pass); the first becomes its leaf.
            if torch.is_grad_enabled():
                becomes_leaf = False
            elif picked is not None:
                becomes_leaf = True
            elif name in leaf_calls:
                becomes_leaf = call >= leaf_calls[name]
            else:
                becomes_leaf = True
            if grad and becomes_leaf and tensor.is_floating_point():
                # From here on autograd records: the captured tensor is a leaf, the rest of the network sees a copy.
                tensor = tensor.detach().requires_grad_(True)
                torch.set_grad_enabled(True)
            activations[name] = tensor
            return replace_first_tensor(output, tensor.clone())

        return hook

    grad_mode = torch.is_grad_enabled()
    # Inside a caller's torch.inference_mode() no tensor can require grad; lift it for this block.
    inference_off = torch.inference_mode(False) if grad else nullcontext()
    try:
        with inference_off, preserved_state(model, eval_mode=eval_mode), hook_handles() as handles:
            for name, module in modules.items():
                handles.append(module.register_forward_hook(make_hook(name)))
            # Each forward pass starts without autograd (a second call in the block must not record everything).
            handles.append(model.register_forward_pre_hook(_start_without_grad))
            torch.set_grad_enabled(False)
            yield activations
    finally:
        torch.set_grad_enabled(grad_mode)


def _start_without_grad(module: nn.Module, inputs: Any) -> None:
    torch.set_grad_enabled(False)
