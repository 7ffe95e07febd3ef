"""Batch norms folded into the convolutions before them, for the duration of a block.

In eval mode a batch norm after a convolution is an affine map per channel,
``y = s * (conv(x) + b - mean) + beta`` with ``s = gamma / sqrt(var + eps)``, so
``conv`` with its weights scaled by ``s`` and the bias ``beta + s * (b - mean)``
gives the same output, and the batch norm's forward and backward passes are gone
(a bias costs a convolution nothing; where one cannot be given, a ``ChannelShift``
adds it). Gradient ascent (``hookviz filters``) runs a network thousands of
times, and on EfficientNet-Lite0 the batch norms were a quarter of each step.

    with folded_batch_norms(model, keep=["_blocks.6"]):
        ...  # the model computes the same function, faster

Only pairs whose wiring is visible are folded: consecutive children of an
``nn.Sequential`` (torchvision's ``Conv2dNormActivation``), and a call of a
convolution module feeding only a call of a batch-norm module in an fx graph
(the modules of an unflattened ``.pt2`` program). Elsewhere nothing changes. The
model is changed in place and put back on exit (even on error): parameters are
swapped for folded copies, never written to, and a convolution graph given a bias
gets its own arguments back.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any, NamedTuple

import torch
from torch import nn

_CONVOLUTIONS = (torch.ops.aten.conv2d.default, torch.ops.aten.convolution.default)
_BATCH_NORM = torch.ops.aten.batch_norm.default


class ChannelShift(nn.Module):
    """Adds a constant per channel to an (N, C, H, W) input: what is left of a folded batch norm."""

    shift: torch.Tensor

    def __init__(self, shift: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("shift", shift.reshape(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.shift.to(x.dtype)  # in x's dtype: a float32 constant must not upcast bfloat16 activations


@contextmanager
def folded_batch_norms(model: nn.Module, keep: Iterable[str] = ()) -> Iterator[int]:
    """For the block, ``model`` with its eval-mode batch norms folded into the convolutions before them.

    Args:
        model: in eval mode (a batch norm in training mode is not an affine map and is left alone).
        keep: module names (``named_modules()``, ``name#N`` allowed) whose own output must stay as it is:
            a pair is not folded if either module is one of them or contains one (hooks on them keep working).

    Yields the number of batch norms folded.
    """
    kept = [name.partition("#")[0] for name in keep]
    # How many places each module has: a shared module may be called elsewhere, and is left alone.
    places = Counter(id(module) for _, module in model.named_modules(remove_duplicate=False))
    undo: list[Callable[[], None]] = []
    folded = 0
    try:
        for parent_name, parent in list(model.named_modules()):
            for pair in _pairs(parent):
                names = [_join(parent_name, pair.conv), _join(parent_name, pair.norm)]
                if any(_within(k, name) for k in kept for name in names):
                    continue
                if places[id(getattr(parent, pair.conv))] != 1 or places[id(getattr(parent, pair.norm))] != 1:
                    continue
                _fold(parent, pair, undo)
                folded += 1
        yield folded
    finally:
        for step in reversed(undo):
            step()


def _join(parent: str, child: str) -> str:
    return f"{parent}.{child}" if parent else child


def _within(kept: str, name: str) -> bool:
    return kept == name or kept.startswith(name + ".")


ConvParts = tuple[str, str | None]  # attribute names of a convolution's (weight, bias)
NormParts = tuple[str | None, str | None, torch.Tensor, torch.Tensor, float]  # (gamma, beta names, mean, var, eps)


class _Pair(NamedTuple):
    """A convolution child of a module and the batch-norm child that takes only its output, with their parts."""

    conv: str
    norm: str
    conv_parts: ConvParts
    norm_parts: NormParts


def _pairs(parent: nn.Module) -> list[_Pair]:
    """The (convolution, batch norm) children of ``parent`` where the batch norm takes only the convolution's output."""
    children = dict(parent.named_children())
    found: list[tuple[str, str]] = []
    if isinstance(parent, nn.Sequential):
        names = list(children)
        found = [(a, b) for a, b in zip(names, names[1:], strict=False)]
    graph = getattr(parent, "graph", None)
    if isinstance(graph, torch.fx.Graph):
        calls = Counter(node.target for node in graph.nodes if node.op == "call_module")
        for node in graph.nodes:
            if node.op != "call_module" or len(node.args) != 1 or node.kwargs:
                continue
            (source,) = node.args
            if (
                isinstance(source, torch.fx.Node)
                and source.op == "call_module"
                and len(source.users) == 1
                and calls[source.target] == 1
                and calls[node.target] == 1
            ):
                found.append((str(source.target), str(node.target)))
    pairs = []
    for a, b in found:
        if a in children and b in children:
            conv_parts, norm_parts = _conv_parts(children[a]), _norm_parts(children[b])
            if conv_parts is not None and norm_parts is not None:
                pairs.append(_Pair(a, b, conv_parts, norm_parts))
    return pairs


def _conv_parts(module: nn.Module) -> ConvParts | None:
    """The attribute names of a 2-D convolution module's (weight, bias), if its output is just that convolution."""
    if isinstance(module, nn.Conv2d):
        return "weight", "bias" if module.bias is not None else None
    graph = getattr(module, "graph", None)
    if not isinstance(graph, torch.fx.Graph):
        return None
    result = _returned(graph)
    if result is None or result.target not in _CONVOLUTIONS:
        return None
    args: Any = result.args  # fx arguments are loosely typed: checked one by one below
    weight = args[1] if len(args) > 1 else None
    bias = args[2] if len(args) > 2 else result.kwargs.get("bias")
    if not _own_attribute(weight) or (bias is not None and not _own_attribute(bias)):
        return None
    if result.target is torch.ops.aten.convolution.default and args[6]:  # transposed
        return None
    assert isinstance(weight, torch.fx.Node)
    return str(weight.target), str(bias.target) if isinstance(bias, torch.fx.Node) else None


def _norm_parts(module: nn.Module) -> NormParts | None:
    """(weight name, bias name, running mean, running var, eps) of an eval-mode batch norm module over channels."""
    if isinstance(module, nn.BatchNorm2d):
        if module.training or module.running_mean is None or module.running_var is None:
            return None
        return (
            "weight" if module.weight is not None else None,
            "bias" if module.bias is not None else None,
            module.running_mean,
            module.running_var,
            float(module.eps),
        )
    graph = getattr(module, "graph", None)
    if not isinstance(graph, torch.fx.Graph) or module.training:
        return None
    result = _returned(graph)
    if result is None or result.target is not _BATCH_NORM:
        return None
    args: Any = result.args  # fx arguments are loosely typed: checked one by one below
    if len(args) < 8 or args[5] or not isinstance(args[0], torch.fx.Node) or args[0].op != "placeholder":
        return None  # training mode, or normalizes something computed inside: not a plain batch norm
    weight, bias, mean, var = args[1:5]
    if not all(_own_attribute(node) for node in (mean, var)) or not all(
        node is None or _own_attribute(node) for node in (weight, bias)
    ):
        return None
    running_mean, running_var = getattr(module, mean.target), getattr(module, var.target)
    return (
        str(weight.target) if weight is not None else None,
        str(bias.target) if bias is not None else None,
        running_mean,
        running_var,
        float(args[7]),
    )


def _returned(graph: torch.fx.Graph) -> torch.fx.Node | None:
    """The one node a graph returns (as itself or a one-element tuple), if it is an operator call."""
    output = next((node for node in graph.nodes if node.op == "output"), None)
    if output is None:
        return None
    value = output.args[0]
    if isinstance(value, (tuple, list)):
        value = value[0] if len(value) == 1 else None
    if not isinstance(value, torch.fx.Node) or value.op != "call_function":
        return None
    return value


def _own_attribute(node: Any) -> bool:
    """Whether ``node`` reads a tensor attribute of the module itself (not of a submodule), used only once."""
    return (
        isinstance(node, torch.fx.Node)
        and node.op == "get_attr"
        and "." not in str(node.target)
        and len(node.users) == 1
    )


def _fold(parent: nn.Module, pair: _Pair, undo: list[Callable[[], None]]) -> None:
    """Scale the convolution's weights; its bias (given, or added) takes the rest, else a ``ChannelShift`` does."""
    norm_name = pair.norm
    conv, norm = getattr(parent, pair.conv), getattr(parent, norm_name)
    weight_name, bias_name = pair.conv_parts
    gamma_name, beta_name, mean, var, eps = pair.norm_parts
    weight: torch.Tensor = getattr(conv, weight_name)
    with torch.no_grad():
        gamma = getattr(norm, gamma_name) if gamma_name else torch.ones_like(mean)
        beta = getattr(norm, beta_name) if beta_name else torch.zeros_like(mean)
        scale = gamma.float() / (var.float() + eps).sqrt()
        shift = beta.float() - mean.float() * scale
        if bias_name is not None:
            shift = shift + getattr(conv, bias_name).float() * scale
        scaled = nn.Parameter((weight.float() * scale.view(-1, 1, 1, 1)).to(weight.dtype), requires_grad=False)
        bias = nn.Parameter(shift.to(weight.dtype), requires_grad=False)
    _set(conv, weight_name, scaled, undo)
    if bias_name is not None:
        _set(conv, bias_name, bias, undo)
    elif type(conv).forward is nn.Conv2d.forward:  # its forward passes self.bias to the convolution
        _set(conv, "bias", bias, undo)
    elif not _add_bias_to_graph(conv, bias, undo):
        _set(parent, norm_name, ChannelShift(bias.detach()), undo)
        return
    _set(parent, norm_name, nn.Identity(), undo)


def _add_bias_to_graph(conv: nn.Module, bias: torch.Tensor, undo: list[Callable[[], None]]) -> bool:
    """Give the convolution call a graph module returns a ``bias`` argument (for the block); False where the module
    does not run its graph through an interpreter (a code-generated forward would not see the change)."""
    graph = getattr(conv, "graph", None)
    if not isinstance(graph, torch.fx.Graph) or getattr(conv, "_run_with_interpreter", False) is not True:
        return False
    node = _returned(graph)
    if node is None or node.target is not torch.ops.aten.conv2d.default or node.kwargs:
        return False
    name = "_hookviz_folded_bias"
    conv.register_buffer(name, bias.detach())
    with graph.inserting_before(node):
        # create_node, not get_attr: get_attr looks for the buffer on the graph's code-generated module, while the
        # interpreter (checked above) reads attributes from ``conv`` itself.
        attribute = graph.create_node("get_attr", name)
    original = node.args
    node.args = (original[0], original[1], attribute, *original[3:])

    def put_back() -> None:
        node.args = original
        graph.erase_node(attribute)
        delattr(conv, name)

    undo.append(put_back)
    return True


def _set(owner: nn.Module, name: str, value: Any, undo: list[Callable[[], None]]) -> None:
    original = getattr(owner, name)
    setattr(owner, name, value)
    undo.append(lambda: setattr(owner, name, original))
