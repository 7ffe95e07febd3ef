"""Resolve a MODEL argument into a module, its preprocessing and its class names.

A user passes whatever they have: a torchvision model name, a state_dict file
(with or without ``--arch``), a ``torch.export`` ``.pt2`` program, a pickled
module (only with ``--trust``), or ``package.module:callable``. TorchScript is
refused with the alternatives, because hooks do not run on ScriptModules.

torchvision is imported only when a torchvision model or architecture is asked
for: importing it costs seconds.
"""

from __future__ import annotations

import contextlib
import difflib
import importlib
import pickle
import re
import sys
import zipfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import torch
from torch import nn

from .errors import UsageError

# The defaults of torchvision.transforms._presets.ImageClassification, kept here
# so that models which are not from torchvision do not pay for importing it.
# tests/test_models.py checks that they still equal torchvision's.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_INPUT_SIZE = 224
# ImageNet convention: resize the shorter side to 256 before a 224 center crop.
RESIZE_TO_CROP_RATIO = 256 / 224

CALLABLE_SPEC = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
STATE_DICT_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "net", "weights")


@dataclass(frozen=True)
class Preprocessing:
    """How an image becomes a model input.

    ``input_size`` is (height, width) of the tensor the model sees. With
    ``--crop``, the shorter side is resized to ``resize_size`` and the center
    ``input_size`` is cut out (the weights' own eval transform); without it the
    whole image is resized to ``input_size``.
    """

    input_size: tuple[int, int]
    resize_size: int
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    interpolation: str = "bilinear"


@dataclass
class LoadedModel:
    """A model ready for hooks: in eval mode, on its device, with what it expects."""

    module: nn.Module
    spec: str
    description: str
    preprocessing: Preprocessing
    labels: list[str] | None
    device: torch.device
    output_key: str | None = None
    fixed_batch: int | None = None  # a .pt2 exported without a dynamic batch dimension takes exactly this batch size

    def label(self, class_index: int) -> str:
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
        hint = difflib.get_close_matches(text.lower(), folded, n=3, cutoff=0.6)
        suggestion = f"; did you mean {', '.join(repr(self.labels[folded.index(h)]) for h in hint)}?" if hint else ""
        raise UsageError(f"--class {text!r} is not a class name of this model{suggestion}")

    def logits(self, output: Any) -> torch.Tensor:
        """The class scores in a model's output (a tensor, a tuple or a dict)."""
        return select_logits(output, self.output_key)


def select_logits(output: Any, key: str | None = None) -> torch.Tensor:
    """Pick the score tensor: the tensor itself, ``output[key]``, ``logits``, or the first tensor."""
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


def resolve_device(name: str = "auto") -> torch.device:
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
    mean: tuple[float, float, float] | None = None,
    std: tuple[float, float, float] | None = None,
    labels: str | None = None,
    device: str = "auto",
    output_key: str | None = None,
) -> LoadedModel:
    """Load MODEL as the CLI does. Raises UsageError with a one-line fix on failure."""
    path = Path(spec)
    if CALLABLE_SPEC.match(spec) and not path.exists():
        loaded = _load_callable(spec, state_dict)
    elif path.exists():
        if path.is_dir():
            raise UsageError(f"model {spec!r} is a directory; pass a model file or a torchvision model name")
        if state_dict is not None:
            raise UsageError("--state-dict goes with a package.module:callable MODEL; a file MODEL already holds weights")
        loaded = _load_file(path, arch=arch, trust=trust)
    elif _looks_like_path(spec):
        raise UsageError(f"model file not found: {spec}")
    else:
        if state_dict is not None:
            raise UsageError("--state-dict goes with a package.module:callable MODEL; for torchvision use --weights")
        loaded = _load_torchvision(spec, weights)

    preprocessing = loaded.preprocessing
    if size is not None:
        preprocessing = replace(
            preprocessing, input_size=size, resize_size=round(min(size) * RESIZE_TO_CROP_RATIO)
        )
    if mean is not None:
        preprocessing = replace(preprocessing, mean=mean)
    if std is not None:
        preprocessing = replace(preprocessing, std=std)
    loaded.preprocessing = preprocessing
    if labels is not None:
        loaded.labels = load_labels(labels)
    loaded.device = resolve_device(device)
    loaded.module.to(loaded.device)
    loaded.module.eval()
    loaded.output_key = output_key
    return loaded


def load_labels(source: str) -> list[str]:
    """``imagenet`` (torchvision's categories, no download) or a file: one name per line, or a JSON list."""
    if source == "imagenet":
        from torchvision.models._meta import _IMAGENET_CATEGORIES

        return list(_IMAGENET_CATEGORIES)
    path = Path(source)
    if not path.is_file():
        raise UsageError(f"--labels {source!r}: not a file; use 'imagenet' or a text file with one class name per line")
    text = path.read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        import json

        try:
            names = json.loads(text)
        except json.JSONDecodeError as exc:
            raise UsageError(f"--labels {source}: invalid JSON ({exc.msg}); use a JSON list of names") from None
        if not isinstance(names, list):
            raise UsageError(f"--labels {source}: expected a JSON list of class names")
        return [str(name) for name in names]
    return [line.strip() for line in text.splitlines() if line.strip()]


def _looks_like_path(spec: str) -> bool:
    return "/" in spec or "\\" in spec or Path(spec).suffix.lower() in {".pt", ".pth", ".pt2", ".ckpt", ".bin", ".jit"}


def _default_preprocessing(size: int = DEFAULT_INPUT_SIZE) -> Preprocessing:
    return Preprocessing(input_size=(size, size), resize_size=round(size * RESIZE_TO_CROP_RATIO))


def _loaded(module: nn.Module, spec: str, description: str, preprocessing: Preprocessing | None = None,
            labels: list[str] | None = None) -> LoadedModel:
    return LoadedModel(
        module=module,
        spec=spec,
        description=description,
        preprocessing=preprocessing or _default_preprocessing(),
        labels=labels,
        device=torch.device("cpu"),
    )


# --- torchvision ---------------------------------------------------------------------------------


def classification_model_names() -> list[str]:
    import torchvision.models

    return torchvision.models.list_models(module=torchvision.models)


def _torchvision_weights(name: str, weights: str) -> Any:
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


def _weights_preprocessing(weights: Any) -> Preprocessing:
    """Read resize/crop/mean/std from the weights' own eval transform (no download)."""
    transform = weights.transforms()
    crop = transform.crop_size[0]
    return Preprocessing(
        input_size=(crop, crop),
        resize_size=transform.resize_size[0],
        mean=tuple(transform.mean),
        std=tuple(transform.std),
        interpolation=transform.interpolation.value,
    )


def _load_torchvision(name: str, weights: str) -> LoadedModel:
    names = classification_model_names()
    if name not in names:
        hint = difflib.get_close_matches(name, names, n=3)
        fix = f"did you mean {', '.join(hint)}?" if hint else "pass a model file, or a torchvision classification model name"
        raise UsageError(f"unknown model {name!r}: not a file and not a torchvision classification model; {fix}")
    from torchvision.models import get_model, get_model_weights

    chosen = _torchvision_weights(name, weights)
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
    return _loaded(module, name, described, _weights_preprocessing(reference), list(labels) if labels else None)


@contextlib.contextmanager
def _skip_weight_init() -> Iterator[None]:
    """Build a model without running torch.nn.init: shapes are all we need, and init is the slow part."""
    import torch.nn.init as init
    from unittest import mock

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
    """The torchvision architecture (and num_classes) whose parameter names and shapes match ``state``."""
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


def _build_arch(arch: str, state: Mapping[str, torch.Tensor], spec: str, detected: bool) -> LoadedModel:
    from torchvision.models import get_model, get_model_weights

    names = classification_model_names()
    if arch not in names:
        hint = difflib.get_close_matches(arch, names, n=3)
        raise UsageError(f"--arch {arch!r} is not a torchvision classification model" + (f"; did you mean {', '.join(hint)}?" if hint else ""))
    num_classes = _classifier_size(state)
    try:
        module = get_model(arch, weights=None, num_classes=num_classes) if num_classes else get_model(arch, weights=None)
        module.load_state_dict(state, strict=True)
    except (RuntimeError, TypeError, ValueError) as exc:
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        detail = lines[1] if len(lines) > 1 else lines[0] if lines else type(exc).__name__  # line 0 only names the class
        detail = detail if len(detail) <= 160 else detail[:157] + "..."
        raise UsageError(f"{spec} does not fit --arch {arch} ({detail}); check --arch, or export the model to .pt2") from None
    reference = get_model_weights(arch).DEFAULT
    categories = reference.meta.get("categories")
    labels = list(categories) if categories and num_classes in (None, len(categories)) else None
    how = "detected" if detected else "given"
    return _loaded(module, spec, f"state_dict {spec} as torchvision {arch} ({how}, {num_classes or 1000} classes)",
                   _weights_preprocessing(reference), labels)


def _classifier_size(state: Mapping[str, torch.Tensor]) -> int | None:
    """num_classes from the last 2-D weight or 1-D bias in the state_dict (the classifier)."""
    for key in reversed(list(state)):
        value = state[key]
        if key.endswith("weight") and value.dim() in (2, 4):
            return int(value.shape[0])
    return None


# --- files -----------------------------------------------------------------------------------------


def _zip_names(path: Path) -> list[str]:
    if not zipfile.is_zipfile(path):
        return []
    with zipfile.ZipFile(path) as archive:
        return archive.namelist()


def _load_file(path: Path, *, arch: str | None, trust: bool) -> LoadedModel:
    names = _zip_names(path)
    if any(n.endswith("/constants.pkl") or "/code/" in n for n in names):
        raise UsageError(
            f"{path} is a TorchScript file; hooks do not run on TorchScript modules. "
            "Export the model with torch.export to a .pt2 file, or save its state_dict and use --arch"
        )
    if path.suffix == ".pt2" or any(n.endswith("serialized_exported_program.json") or "/models/" in n for n in names):
        return _load_exported(path, trust=trust)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        if not trust:
            raise UsageError(
                f"{path} is a pickled Python object and loading it would run code from the file; "
                "if you trust its source re-run with --trust, else use a state_dict with --arch or a .pt2 export"
            ) from None
        return _load_pickled_module(path)
    except Exception as exc:
        raise UsageError(f"cannot read {path} as a PyTorch file ({type(exc).__name__}); pass a .pt/.pth state_dict, a .pt2 export, or a model name") from None
    state = _unwrap_state_dict(obj)
    if state is None:
        raise UsageError(f"{path} holds a {type(obj).__name__}, not a state_dict of tensors; save model.state_dict() or export to .pt2")
    if arch is not None:
        return _build_arch(arch, state, str(path), detected=False)
    found = detect_torchvision_arch(state)
    if found is None:
        raise UsageError(
            f"{path} is a state_dict that matches no torchvision architecture; "
            "pass --arch NAME, use package.module:callable with --state-dict, or export the model to .pt2"
        )
    return _build_arch(found[0], state, str(path), detected=True)


def _unwrap_state_dict(obj: Any) -> dict[str, torch.Tensor] | None:
    if not isinstance(obj, Mapping):
        return None
    if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        state = dict(obj)
    else:
        for key in STATE_DICT_WRAPPER_KEYS:  # common checkpoint layouts: {"state_dict": ..., "epoch": ...}
            if key in obj and isinstance(obj[key], Mapping):
                return _unwrap_state_dict(obj[key])
        return None
    if all(k.startswith("module.") for k in state):  # saved from DataParallel
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def _load_exported(path: Path, trust: bool = False) -> LoadedModel:
    """A .pt2 program. torch.export.load unpickles some parts of an archive (sample inputs, opaque
    constants) with full pickle; without --trust those loads are forced to weights-only."""
    with _torch_export_log() as messages, _weights_only_unpickling(enabled=not trust):
        try:
            program = torch.export.load(path)
        except Exception as exc:
            raise UsageError(_export_load_error(path, exc, messages, trust)) from None
    # unflatten keeps the module tree (named_modules), so forward hooks and gradients work.
    module = torch.export.unflatten(program)
    shape = _exported_input_shape(program)
    size = None if shape is None or not all(isinstance(d, int) for d in shape[2:]) else (int(shape[2]), int(shape[3]))
    preprocessing = _default_preprocessing() if size is None else Preprocessing(
        input_size=size, resize_size=round(min(size) * RESIZE_TO_CROP_RATIO)
    )
    loaded = _loaded(module, str(path), f"torch.export program {path}", preprocessing)
    if shape is not None and isinstance(shape[0], int):
        loaded.fixed_batch = int(shape[0])
        loaded.description += f" (fixed batch size {loaded.fixed_batch})"
    return loaded


def _export_load_error(path: Path, exc: Exception, messages: list[str], trust: bool) -> str:
    details = "\n".join(messages + [str(exc)])
    if not zipfile.is_zipfile(path):
        return f"{path} is not a torch.export .pt2 archive (not a zip file); save one with torch.export.save"
    if not trust and "Weights only load failed" in details:
        return (f"{path} holds pickled Python objects and loading them would run code from the file; "
                "if you trust its source re-run with --trust, else re-export it without custom objects")
    first = next((line.strip() for line in str(exc).splitlines() if line.strip()), "")
    return f"cannot load {path} as a torch.export program ({type(exc).__name__}: {first})"


@contextlib.contextmanager
def _torch_export_log() -> Iterator[list[str]]:
    """Collect torch.export's log messages (it logs tracebacks on stderr for broken files) instead of printing them."""
    import logging

    messages: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            text = record.getMessage()
            if record.exc_info and record.exc_info[1] is not None:
                text += f": {record.exc_info[1]}"
            messages.append(text)

    logger = logging.getLogger("torch.export")
    handlers, propagate = logger.handlers[:], logger.propagate  # torch's logging setup gives it a handler of its own
    logger.handlers = [Collect()]
    logger.propagate = False
    try:
        yield messages
    finally:
        logger.handlers = handlers
        logger.propagate = propagate


@contextlib.contextmanager
def _weights_only_unpickling(enabled: bool) -> Iterator[None]:
    """Force every torch.load in the block to weights_only=True (torch's own switch; it overrides explicit False)."""
    import os

    names = ("TORCH_FORCE_WEIGHTS_ONLY_LOAD", "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD")
    saved = {name: os.environ.get(name) for name in names}
    if enabled:
        os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
        os.environ.pop("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", None)  # both set is an error in torch.load
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _exported_input_shape(program: Any) -> tuple[Any, ...] | None:
    """The shape of the program's 4-D image input: ints where fixed, symbols where dynamic."""
    for node in program.graph.nodes:
        if node.op != "placeholder":
            continue
        spec = next((s for s in program.graph_signature.input_specs if s.arg.name == node.name), None)
        if spec is None or spec.kind.name != "USER_INPUT":
            continue
        value = node.meta.get("val")
        if value is not None and value.dim() == 4:
            return tuple(value.shape)
    return None


def _load_pickled_module(path: Path) -> LoadedModel:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise UsageError(f"cannot unpickle {path} ({type(exc).__name__}: {exc}); the classes it needs must be importable") from None
    if not isinstance(obj, nn.Module):
        raise UsageError(f"{path} holds a {type(obj).__name__}, not an nn.Module")
    return _loaded(obj, str(path), f"pickled {type(obj).__name__} from {path}")


def _load_callable(spec: str, state_dict: str | Path | None) -> LoadedModel:
    module_name, attr = spec.split(":")
    if "" not in sys.path and str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))  # so `mymodels:build` finds ./mymodels.py, as `python -m` would
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except ImportError as exc:
        raise UsageError(f"cannot import {module_name!r} for {spec} ({exc}); check the module path") from None
    except AttributeError:
        raise UsageError(f"{module_name!r} has no attribute {attr!r}") from None
    try:
        module = factory()
    except Exception as exc:
        raise UsageError(f"{spec}() failed: {type(exc).__name__}: {exc}") from None
    if not isinstance(module, nn.Module):
        raise UsageError(f"{spec}() returned {type(module).__name__}, not an nn.Module")
    description = f"{type(module).__name__} from {spec}"
    if state_dict is not None:
        try:
            state = _unwrap_state_dict(torch.load(state_dict, map_location="cpu", weights_only=True))
        except pickle.UnpicklingError:
            raise UsageError(f"--state-dict {state_dict} holds pickled code, not a state_dict of tensors") from None
        except FileNotFoundError:
            raise UsageError(f"--state-dict file not found: {state_dict}") from None
        if state is None:
            raise UsageError(f"--state-dict {state_dict} is not a state_dict of tensors")
        try:
            module.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise UsageError(f"--state-dict {state_dict} does not fit {spec} ({str(exc).splitlines()[0]})") from None
        description += f" with weights from {state_dict}"
    return _loaded(module, spec, description)
