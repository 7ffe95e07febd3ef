"""Resolve a MODEL argument into a module, its preprocessing and its class names.

A user passes whatever they have: a torchvision model name (``zoo``:
classification, segmentation and detection), ``timm:NAME`` or a Hugging Face
image classifier (``hub``), a state_dict file (.pth or .safetensors, with or
without ``arch``), a ``torch.export`` ``.pt2`` program, a pickled module (only
with ``trust``), or ``package.module:callable`` (``files``). TorchScript is refused with the alternatives, because hooks do not
run on ScriptModules.

torchvision, timm, transformers and safetensors are imported only when a model
that needs them is asked for: importing them costs seconds.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import UsageError, close_matches
from ..forward import run_model, select_logits
from ..preprocessing import Preprocessing, default_preprocessing, for_channels

# package.module:callable, or path/to/file.py:callable
CALLABLE_SPEC = re.compile(r"^(?:[A-Za-z_][\w.]*|.+\.py):[A-Za-z_]\w*$")
MAX_LISTED = 8  # class names listed in one message
MODEL_FILE_SUFFIXES = frozenset({".pt", ".pth", ".pt2", ".ckpt", ".bin", ".jit", ".safetensors"})
HUB_PREFIXES = ("timm:", "hf:")  # timm:NAME, hf:ORG/NAME


@dataclass
class LoadedModel:
    """A model ready for hooks: in eval mode, on its device, with what it expects."""

    module: nn.Module
    spec: str  # the MODEL argument as given
    description: str  # one line for people: what was loaded, from where
    preprocessing: Preprocessing = field(default_factory=default_preprocessing)
    labels: list[str] | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    output_key: str | None = None
    fixed_batch: int | None = None  # a .pt2 exported without a dynamic batch dimension takes exactly this batch size
    input_channels: int | None = None  # as the file records it (a .pt2's input spec); None: read from the first conv
    task: str = "classification"  # "classification", "segmentation" ({"out": (N, C, H, W)}) or "detection" (boxes)
    prefix_tokens: int | None = (
        None  # tokens before the patch grid (class, register, distillation), when the model says
    )
    _output_shape: tuple[int, ...] | None = field(default=None, repr=False)

    def label(self, class_index: int) -> str:
        """The class name of ``class_index``, or ``class N`` when the model has no name for it."""
        if self.labels is not None and 0 <= class_index < len(self.labels):
            return self.labels[class_index]
        return f"class {class_index}"

    def class_index(self, value: str | int) -> int:
        """A class given as an index (``243``) or a label (``"bull mastiff"``, case-insensitive)."""
        text = str(value).strip()
        if text.lstrip("-").isdigit():
            return int(text)
        if self.labels is None:
            raise UsageError(f"--class {text!r}: this model has no class names; give an index, or names with --labels")
        folded = [name.lower() for name in self.labels]
        if text.lower() in folded:
            return folded.index(text.lower())
        # "cat" is a word of "tiger cat", "Persian cat", ...: more useful than names spelled alike ("crate").
        with_word = [name for name in self.labels if text.lower() in re.split(r"[\W_]+", name.lower())]
        if len(with_word) > 1:
            listed = ", ".join(map(repr, with_word[:MAX_LISTED])) + (
                f" and {len(with_word) - MAX_LISTED} more" if len(with_word) > MAX_LISTED else ""
            )
            raise UsageError(f"--class {text!r} is not a class name of this model; names with that word: {listed}")
        hint = with_word or close_matches(text, self.labels, fold_case=True)
        suggestion = f"; did you mean {', '.join(map(repr, hint))}?" if hint else ""
        raise UsageError(f"--class {text!r} is not a class name of this model{suggestion}")

    def output_shape(self) -> tuple[int, ...] | None:
        """The shape of the model's scores (``logits``) for one input batch of zeros, from one forward pass
        (remembered, shared with ``output_count``); None for a detector's list of boxes."""
        if self._output_shape is None:
            height, width = self.preprocessing.input_size
            probe = torch.zeros(self.fixed_batch or 1, self.preprocessing.channels, height, width, device=self.device)
            with torch.no_grad():
                output = run_model(self.module, probe)
            self._output_shape = () if _is_detection_output(output) else tuple(self.logits(output).shape)
        return self._output_shape or None

    def output_count(self) -> int | None:
        """How many class scores the model gives per input, from one forward pass on zeros (remembered).

        For an output (N, C, H, W), a segmentation model's, the number of classes scored at each pixel; None
        for anything else, e.g. a detector's list of boxes. Lets a run check --class, --top-k and --labels
        before it does any work.
        """
        shape = self.output_shape()
        return int(shape[1]) if shape is not None and len(shape) in (2, 4) else None

    def logits(self, output: Any) -> torch.Tensor:
        """The class scores in a model's output (a tensor, a tuple or a dict)."""
        return select_logits(output, self.output_key)


def _is_detection_output(output: Any) -> bool:
    """A torchvision detector's output: one dict (``boxes``, ``labels``, ``scores``) per image."""
    return (
        isinstance(output, (list, tuple))
        and len(output) > 0
        and all(isinstance(item, Mapping) and "boxes" in item for item in output)
    )


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` (CUDA when available, else CPU), ``cpu``, ``cuda`` or ``mps``; a UsageError if it is not there."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available here; use --device cpu")
    if name == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise UsageError("--device mps: MPS is not available here; use --device cpu")
    if name not in ("cpu", "cuda", "mps"):
        raise UsageError(f"--device {name!r}: choose auto, cpu, cuda or mps")
    return torch.device(name)


def load_model(
    spec: str,
    *,
    weights: str = "DEFAULT",
    arch: str | None = None,
    state_dict: str | Path | None = None,
    trust: bool = False,
    size: tuple[int, int] | None = None,
    mean: tuple[float, ...] | None = None,
    std: tuple[float, ...] | None = None,
    labels: str | None = None,
    device: str = "auto",
    output_key: str | None = None,
) -> LoadedModel:
    """Load MODEL as the CLI does, in eval mode on its device. Raises UsageError with a one-line fix on failure.

    Args:
        spec: a torchvision model name (classification, segmentation or detection), ``timm:NAME``,
            ``hf:ORG/NAME`` (a cached Hugging Face image classifier) or a directory saved with ``save_pretrained``,
            a model file (.pt/.pth/.safetensors state_dict, .pt2, pickled module with ``trust``), or
            ``package.module:callable`` returning an ``nn.Module``.
        weights: ``DEFAULT`` (torchvision's, timm's or the Hugging Face model's own), a torchvision enum member
            name, or ``none`` for random weights.
        arch: the torchvision architecture of a state_dict file (detected when None).
        state_dict: weights for a ``package.module:callable`` model.
        trust: allow unpickling, which runs code from the file.
        size: model input (height, width); default from the weights or the .pt2, else 224x224.
        mean, std: normalization, one value (for every channel) or one per input channel; default from the
            weights, else ImageNet's (for a grayscale model, the mean of ImageNet's three).
        labels: ``imagenet`` or a file of class names (default: the weights' categories).
        device: ``auto``, ``cpu``, ``cuda`` or ``mps``.
        output_key: which part of a tuple/dict model output holds the class scores.

    Returns:
        The ``LoadedModel``: module, preprocessing, labels, device and what the file fixes (batch size).
    """
    from . import files, zoo

    path = Path(spec)
    hub_prefix = next((prefix for prefix in HUB_PREFIXES if spec.startswith(prefix)), None)
    if hub_prefix is not None and not path.exists():
        from . import hub

        if state_dict is not None or arch is not None:
            option = "--state-dict" if state_dict is not None else "--arch"
            raise UsageError(
                f"{option} does not go with a {hub_prefix} MODEL; it names its own architecture and weights"
            )
        name = spec[len(hub_prefix) :]
        loaded = hub.load_timm(name, weights) if hub_prefix == "timm:" else hub.load_hf(name, weights, local=False)
    elif CALLABLE_SPEC.match(spec) and not path.exists():
        loaded = files.load_callable(spec, state_dict)
    elif path.exists():
        if path.is_dir():
            if not (path / "config.json").is_file():
                raise UsageError(
                    f"model {spec!r} is a directory without a config.json; pass a model file, a torchvision model "
                    "name, or a Hugging Face model directory (saved with save_pretrained)"
                )
            from . import hub

            if state_dict is not None or arch is not None:
                option = "--state-dict" if state_dict is not None else "--arch"
                raise UsageError(f"{option} does not go with a Hugging Face model directory; it holds its own weights")
            return _finish(hub.load_hf(str(path), weights, local=True), size, mean, std, labels, device, output_key)
        if state_dict is not None:
            raise UsageError(
                "--state-dict goes with a package.module:callable MODEL; a file MODEL already holds weights"
            )
        loaded = files.load_file(path, arch=arch, trust=trust)
    elif _looks_like_path(spec):
        raise UsageError(f"model file not found: {spec}")
    else:
        if state_dict is not None:
            raise UsageError("--state-dict goes with a package.module:callable MODEL; for torchvision use --weights")
        loaded = zoo.load_torchvision(spec, weights)
    return _finish(loaded, size, mean, std, labels, device, output_key)


def _finish(
    loaded: LoadedModel,
    size: tuple[int, int] | None,
    mean: tuple[float, ...] | None,
    std: tuple[float, ...] | None,
    labels: str | None,
    device: str,
    output_key: str | None,
) -> LoadedModel:
    """The options every kind of MODEL takes: size, normalization, labels, device, output key."""
    if size is not None:
        loaded.preprocessing = loaded.preprocessing.with_input_size(size)
        if loaded.task == "detection":
            from .zoo import resize_detector

            resize_detector(loaded.module, size)
    channels = loaded.input_channels or first_conv_channels(loaded.module) or 3
    if channels not in (1, 3):
        raise UsageError(
            f"the model takes {channels}-channel input; hookviz reads images as 1 (grayscale) or 3 (RGB) channels"
        )
    loaded.preprocessing = for_channels(loaded.preprocessing, channels)
    for name, values in (("mean", mean), ("std", std)):
        if values is not None:
            if len(values) not in (1, channels):
                raise UsageError(
                    f"--{name} gives {len(values)} values but the model takes {channels}-channel input; "
                    + ("give 1 value" if channels == 1 else f"give 1 value or {channels}")
                )
            per_channel = tuple(values) * (channels // len(values))
            if name == "mean":
                loaded.preprocessing = replace(loaded.preprocessing, mean=per_channel)
            else:
                loaded.preprocessing = replace(loaded.preprocessing, std=per_channel)
    if labels is not None:
        loaded.labels = load_labels(labels)
    loaded.device = resolve_device(device)
    loaded.module.to(loaded.device)
    loaded.module.eval()
    if output_key is not None:  # else the loader's own (a segmentation model's "out")
        loaded.output_key = output_key
    return loaded


def first_conv_channels(module: nn.Module) -> int | None:
    """The input channels of the model's first 2-D convolution (in definition order), or None without one."""
    for child in module.modules():
        if isinstance(child, nn.Conv2d):
            return int(child.in_channels)
        weight = getattr(child, "_parameters", {}).get("weight")
        if weight is not None and weight.dim() == 4 and hasattr(child, "graph"):  # an unflattened .pt2 conv
            return int(weight.shape[1]) * int(getattr(child, "groups", 1))
    return None


def load_labels(source: str) -> list[str]:
    """Class names from ``imagenet`` (torchvision's categories, no download) or a file: one name per line, or a JSON list."""
    if source == "imagenet":
        from torchvision.models import ResNet50_Weights

        return list(ResNet50_Weights.DEFAULT.meta["categories"])
    path = Path(source)
    if not path.is_file():
        raise UsageError(f"--labels {source!r}: not a file; use 'imagenet' or a text file with one class name per line")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UsageError(
            f"--labels {source}: not a UTF-8 text file; use one class name per line, or a JSON list"
        ) from None
    if text.lstrip().startswith("["):
        try:
            names = json.loads(text)
        except json.JSONDecodeError as exc:
            raise UsageError(f"--labels {source}: invalid JSON ({exc.msg}); use a JSON list of names") from None
        if not isinstance(names, list):
            raise UsageError(f"--labels {source}: expected a JSON list of class names")
        return [str(name) for name in names]
    return [line.strip() for line in text.splitlines() if line.strip()]


def _looks_like_path(spec: str) -> bool:
    return "/" in spec or "\\" in spec or Path(spec).suffix.lower() in MODEL_FILE_SUFFIXES
