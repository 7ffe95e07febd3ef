"""Model zoos: torchvision's classification models by name, their weights, and architecture detection.

Everything is read from torchvision's registry (``list_models``, ``get_model``,
``get_model_weights``, ``weights.transforms()``, ``weights.meta``): nothing is
hand-written and nothing is downloaded except the weights a user asks for.
New zoos (timm, Hugging Face) plug in here.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

import torch

from ..errors import UsageError, did_you_mean
from ..preprocessing import Preprocessing
from . import LoadedModel


def classification_model_names() -> list[str]:
    """torchvision's classification model names (``resnet50``, ``vit_b_16``, ...)."""
    import torchvision.models

    return torchvision.models.list_models(module=torchvision.models)


def torchvision_weights(name: str, weights: str) -> Any:
    """The weights enum member of model ``name`` for ``weights`` (DEFAULT, a member name, or none -> None)."""
    from torchvision.models import get_model_weights

    enum = get_model_weights(name)
    if weights.lower() == "none":
        return None
    if weights == "DEFAULT":
        return enum.DEFAULT
    member = weights.split(".")[-1]
    try:
        return enum[member]
    except KeyError:
        choices = ", ".join(dict.fromkeys(["DEFAULT", *enum.__members__, "none"]))  # DEFAULT is also an alias member
        raise UsageError(f"--weights {weights!r} is not a weight set of {name}; choose one of: {choices}") from None


def weights_preprocessing(weights: Any) -> Preprocessing:
    """Resize/crop/mean/std from the weights' own eval transform (no download)."""
    transform = weights.transforms()
    crop = transform.crop_size[0]
    return Preprocessing(
        input_size=(crop, crop),
        resize_size=transform.resize_size[0],
        mean=tuple(transform.mean),
        std=tuple(transform.std),
        interpolation=transform.interpolation.value,
    )


def load_torchvision(name: str, weights: str) -> LoadedModel:
    """torchvision model ``name`` with ``weights`` (see ``torchvision_weights``), its preprocessing and class names."""
    names = classification_model_names()
    if name not in names:
        hint = did_you_mean(name, names)
        fix = hint[2:] if hint else "pass a model file, or a torchvision classification model name"
        raise UsageError(f"unknown model {name!r}: not a file and not a torchvision classification model; {fix}")
    from torchvision.models import get_model, get_model_weights

    chosen = torchvision_weights(name, weights)
    try:
        module = get_model(name, weights=chosen)
    except Exception as exc:  # torchvision's own download code: network, disk, checksum
        raise UsageError(
            f"could not get the {chosen} weights for {name} ({type(exc).__name__}: {str(exc).splitlines()[0]}); "
            "check the network or pass --weights none"
        ) from None
    reference = chosen if chosen is not None else get_model_weights(name).DEFAULT
    labels = chosen.meta.get("categories") if chosen is not None else None
    described = f"torchvision {name} ({chosen if chosen is not None else 'random weights'})"
    return LoadedModel(module, name, described, weights_preprocessing(reference), list(labels) if labels else None)


@contextlib.contextmanager
def _skip_weight_init() -> Iterator[None]:
    """Build a model without running torch.nn.init: shapes are all we need, and init is the slow part."""
    from unittest import mock

    import torch.nn.init as init

    names = [n for n in dir(init) if n.endswith("_") and not n.startswith("_")]
    with contextlib.ExitStack() as stack:
        for n in names:
            stack.enter_context(mock.patch.object(init, n, lambda tensor, *args, **kwargs: tensor))
        yield


def _parameter_shapes(name: str, num_classes: int = 1000) -> dict[str, tuple[int, ...]]:
    from torchvision.models import get_model

    try:
        with torch.device("meta"):
            module = get_model(name, weights=None, num_classes=num_classes)
    except (NotImplementedError, RuntimeError):  # e.g. regnet computes widths with real tensors
        with _skip_weight_init(), torch.no_grad():
            module = get_model(name, weights=None, num_classes=num_classes)
    return {key: tuple(value.shape) for key, value in module.state_dict().items()}


def detect_torchvision_arch(state: Mapping[str, torch.Tensor]) -> tuple[str, int] | None:
    """The torchvision architecture (and num_classes) whose parameter names and shapes match ``state``, or None."""
    shapes = {key: tuple(value.shape) for key, value in state.items()}
    for name in classification_model_names():
        try:
            expected = _parameter_shapes(name)
        except Exception:  # an architecture that cannot be built with defaults is simply not a candidate
            continue
        if expected.keys() != shapes.keys():
            continue
        mismatched = [key for key in expected if expected[key] != shapes[key]]
        if not mismatched:
            return name, 1000
        # Only the classifier differs: infer num_classes from its leading dimension.
        if all(expected[key][0] == 1000 for key in mismatched):
            num_classes = shapes[mismatched[0]][0]
            if _parameter_shapes(name, num_classes) == shapes:
                return name, num_classes
    return None


def build_arch(arch: str, state: Mapping[str, torch.Tensor], spec: str, detected: bool) -> LoadedModel:
    """torchvision architecture ``arch`` with the weights ``state`` (read from file ``spec``), strictly loaded."""
    from torchvision.models import get_model, get_model_weights

    names = classification_model_names()
    if arch not in names:
        raise UsageError(f"--arch {arch!r} is not a torchvision classification model" + did_you_mean(arch, names))
    num_classes = _classifier_size(state)
    fix = "leave out --arch to detect the architecture, or export the model to .pt2"
    try:
        module = (
            get_model(arch, weights=None, num_classes=num_classes) if num_classes else get_model(arch, weights=None)
        )
    except (RuntimeError, TypeError, ValueError) as exc:
        raise UsageError(f"{spec} does not fit --arch {arch} ({type(exc).__name__}: {exc}); {fix}") from None
    misfit = state_dict_misfit(module.state_dict(), state)
    if misfit:
        raise UsageError(f"{spec} does not fit --arch {arch} ({misfit}); {fix}")
    module.load_state_dict(state, strict=True)
    reference = get_model_weights(arch).DEFAULT
    categories = reference.meta.get("categories")
    labels = list(categories) if categories and num_classes in (None, len(categories)) else None
    how = "detected" if detected else "given"
    return LoadedModel(
        module,
        spec,
        f"state_dict {spec} as torchvision {arch} ({how}, {num_classes or 1000} classes)",
        weights_preprocessing(reference),
        labels,
    )


def state_dict_misfit(expected: Mapping[str, torch.Tensor], given: Mapping[str, torch.Tensor]) -> str:
    """What keeps ``given`` from loading into a model whose state_dict is ``expected``, in one short phrase ("" if it fits)."""
    missing = [key for key in expected if key not in given]
    unexpected = [key for key in given if key not in expected]
    reshaped = [key for key in expected if key in given and tuple(given[key].shape) != tuple(expected[key].shape)]
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing keys, e.g. {missing[0]}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected keys, e.g. {unexpected[0]}")
    if reshaped:
        key = reshaped[0]
        shapes = "x".join(map(str, given[key].shape)), "x".join(map(str, expected[key].shape))
        parts.append(f"{len(reshaped)} keys of other shapes, e.g. {key}: {shapes[0]} in the file, {shapes[1]} expected")
    return "; ".join(parts)


def _classifier_size(state: Mapping[str, torch.Tensor]) -> int | None:
    """num_classes from the last 2-D or 4-D weight in the state_dict (the classifier)."""
    for key in reversed(list(state)):
        value = state[key]
        if key.endswith("weight") and value.dim() in (2, 4):
            return int(value.shape[0])
    return None
