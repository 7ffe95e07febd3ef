"""Calling a model and reading what it returns: the class scores, a layer's tensor, and replacing it.

Models return a tensor, a tuple, a dict or an output object; layers likewise.
These helpers find the tensor that matters in any of those, so hooks, methods
and commands all read outputs the same way.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from .errors import UsageError


def run_model(model: nn.Module, batch: torch.Tensor) -> Any:
    """Call ``model`` on ``batch``; its own failures (wrong input size, wrong channels) become a one-line UsageError."""
    try:
        return model(batch)
    except (RuntimeError, ValueError, TypeError, IndexError, AssertionError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UsageError(
            f"the model failed on an input of shape {tuple(batch.shape)}: {first[:300]}; check --size, --arch or the model"
        ) from None


def select_logits(output: Any, key: str | None = None) -> torch.Tensor:
    """The score tensor in a model's ``output``: the tensor itself, ``output[key]``, ``logits``, or the first tensor.

    ``key`` names a dict entry or a tuple index (as text); without it a dict's
    ``logits`` entry, or else the first tensor, is taken.
    """
    if isinstance(output, torch.Tensor):
        if key is not None:
            raise UsageError(f"--output {key!r} was given but the model returns a single tensor; drop --output")
        return output
    if isinstance(output, Mapping):
        if key is not None:
            if key not in output:
                raise UsageError(f"the model's output has no key {key!r}; it has: {', '.join(map(str, output))}")
            return select_logits(output[key])
        if "logits" in output:
            return select_logits(output["logits"])
        values: Sequence[Any] = list(output.values())
    elif isinstance(output, (tuple, list)):
        if key is not None:
            if not key.isdigit() or int(key) >= len(output):
                raise UsageError(f"--output {key!r}: the model returns a sequence of {len(output)}; use an index")
            return select_logits(output[int(key)])
        values = output
    elif hasattr(output, "logits"):  # e.g. a dataclass-style output object
        return select_logits(output.logits)
    else:
        raise UsageError(f"the model returned {type(output).__name__}, not a tensor of class scores")
    for value in values:
        if isinstance(value, torch.Tensor):
            return value
    raise UsageError("the model's output holds no tensor; use --output KEY to choose one")


def first_tensor(output: Any) -> torch.Tensor | None:
    """The tensor a layer produced: itself, or the first tensor in a tuple/list/dict (None if there is none)."""
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


def replace_first_tensor(output: Any, replacement: torch.Tensor) -> Any:
    """``output`` with the tensor ``first_tensor`` finds replaced by ``replacement``.

    Containers are rebuilt (dicts, lists, tuples and named tuples keep their
    type); every other item is kept as it is. A forward hook returns this to hand
    the rest of the network a copy of a layer's output.
    """
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
        sequence = list(output)
        for index, value in enumerate(sequence):
            new, done = _replace_first(value, replacement)
            if done:
                sequence[index] = new
                if isinstance(output, list):
                    return sequence, True
                return (type(output)(*sequence) if hasattr(output, "_fields") else tuple(sequence)), True
        return output, False
    return output, False
