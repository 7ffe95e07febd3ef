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

import difflib
from contextlib import contextmanager, nullcontext
from typing import Any, Iterator, Mapping, Sequence

import torch
from torch import nn

from .errors import UsageError


class Activations(dict):
    """Layer name -> captured output tensor (the last call's, when a module runs more than once)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: dict[str, int] = {}
        self.order: list[str] = []  # layer names in the order their calls returned


def resolve_layers(model: nn.Module, names: Sequence[str]) -> dict[str, nn.Module]:
    """Map ``named_modules()`` names to modules; unknown names fail up front with close matches."""
    modules = dict(model.named_modules())
    resolved: dict[str, nn.Module] = {}
    for name in names:
        if name in modules and name != "":
            resolved[name] = modules[name]
            continue
        hint = difflib.get_close_matches(name, [n for n in modules if n], n=3, cutoff=0.5)
        suggestion = f"; did you mean {', '.join(hint)}?" if hint else ""
        raise UsageError(f"unknown layer {name!r}{suggestion} ('hookviz layers MODEL' lists them)")
    return resolved


def first_tensor(output: Any) -> torch.Tensor | None:
    """The tensor a layer produced: itself, or the first tensor in a tuple/list/dict."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, dict):
        output = list(output.values())
    if isinstance(output, (tuple, list)):
        for item in output:
            found = first_tensor(item)
            if found is not None:
                return found
    return None


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
def capture(model: nn.Module, layers: Sequence[str], *, grad: bool = False, eval_mode: bool = True,
            leaf_calls: Mapping[str, int] | None = None) -> Iterator[Activations]:
    """Record the outputs of ``layers`` during the forward passes run inside the block.

    With ``grad=True``, captured tensors can be differentiated against
    (``torch.autograd.grad``); autograd records only the part of the network
    from the first captured layer on.

    ``leaf_calls`` is for a module that runs several times per forward pass (one
    activation module shared by every block), where the last call is the one to
    explain: autograd starts at that layer's given call instead of its first, and
    every later call starts a fresh graph, so neither the forward pass nor the
    backward pass pays for the blocks in between.
    """
    modules = resolve_layers(model, layers)
    activations = Activations()
    leaf_calls = dict(leaf_calls or {})

    def make_hook(name: str):
        def hook(module: nn.Module, inputs: Any, output: Any) -> Any:
            tensor = first_tensor(output)
            if tensor is None:
                return None
            call = activations.calls[name] = activations.calls.get(name, 0) + 1
            activations.order.append(name)
            if name in leaf_calls:
                becomes_leaf = call >= leaf_calls[name]
            else:
                becomes_leaf = not torch.is_grad_enabled()
            if grad and becomes_leaf and tensor.is_floating_point():
                # From here on autograd records: the captured tensor is a leaf, the rest of the network sees a copy.
                tensor = tensor.detach().requires_grad_(True)
                torch.set_grad_enabled(True)
            activations[name] = tensor
            return _replace_tensor(output, tensor.clone())

        return hook

    handles = []
    grad_mode = torch.is_grad_enabled()
    # Inside a caller's torch.inference_mode() no tensor can require grad; lift it for this block.
    inference_off = torch.inference_mode(False) if grad else nullcontext()
    try:
        with inference_off, preserved_state(model, eval_mode=eval_mode):
            for name, module in modules.items():
                handles.append(module.register_forward_hook(make_hook(name)))
            # Each forward pass starts without autograd (a second call in the block must not record everything).
            handles.append(model.register_forward_pre_hook(_start_without_grad))
            torch.set_grad_enabled(False)
            yield activations
    finally:
        for handle in handles:
            handle.remove()
        torch.set_grad_enabled(grad_mode)


def _start_without_grad(module: nn.Module, inputs: Any) -> None:
    torch.set_grad_enabled(False)


def run_model(model: nn.Module, batch: torch.Tensor) -> Any:
    """Call the model; its own failures (wrong input size, wrong channels) become a one-line UsageError."""
    try:
        return model(batch)
    except (RuntimeError, ValueError, TypeError, IndexError, AssertionError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UsageError(
            f"the model failed on an input of shape {tuple(batch.shape)}: {first[:300]}; check --size, --arch or the model"
        ) from None


def _replace_tensor(output: Any, replacement: torch.Tensor) -> Any:
    """``output`` with the tensor ``first_tensor`` finds replaced; containers are rebuilt, other items kept."""
    replaced, _ = _replace_first(output, replacement)
    return replaced


def _replace_first(output: Any, replacement: torch.Tensor) -> tuple[Any, bool]:
    if isinstance(output, torch.Tensor):
        return replacement, True
    if isinstance(output, dict):
        items = dict(output)
        for key, value in items.items():
            new, done = _replace_first(value, replacement)
            if done:
                items[key] = new
                return (type(output)(items) if type(output) is not dict else items), True
        return output, False
    if isinstance(output, (tuple, list)):
        items = list(output)
        for index, value in enumerate(items):
            new, done = _replace_first(value, replacement)
            if done:
                items[index] = new
                if isinstance(output, list):
                    return items, True
                return (type(output)(*items) if hasattr(output, "_fields") else tuple(items)), True
        return output, False
    return output, False
