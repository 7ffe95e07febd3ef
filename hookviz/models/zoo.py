"""Model zoos: torchvision's classification models by name, their weights, and architecture detection.

Everything is read from torchvision's registry (``list_models``, ``get_model``,
``get_model_weights``, ``weights.transforms()``, ``weights.meta``): nothing is
hand-written and nothing is downloaded except the weights a user asks for.
Segmentation and detection models come by name too; timm and Hugging Face models are in ``hub``.

Detecting the architecture of a state_dict keeps each architecture's parameter
names and shapes in memory and in the user's cache dir ($XDG_CACHE_HOME or
~/.cache, then hookviz/), one file per torch and torchvision version.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import re
import tempfile
import threading
import warnings
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from ..errors import UsageError, did_you_mean
from ..preprocessing import Preprocessing
from . import LoadedModel

TASKS = ("classification", "segmentation", "detection")


def classification_model_names() -> list[str]:
    """torchvision's classification model names (``resnet50``, ``vit_b_16``, ...)."""
    import torchvision.models

    return torchvision.models.list_models(module=torchvision.models)


def task_model_names(task: str) -> list[str]:
    """torchvision's model names of ``task``: classification, segmentation (``fcn_resnet50``, ...) or detection
    (``fasterrcnn_mobilenet_v3_large_320_fpn``, ``retinanet_resnet50_fpn``, ``ssdlite320_mobilenet_v3_large``, ...)."""
    if task == "classification":
        return classification_model_names()
    import torchvision.models

    module = {"segmentation": torchvision.models.segmentation, "detection": torchvision.models.detection}[task]
    return torchvision.models.list_models(module=module)


def model_task(name: str) -> str | None:
    """The task of torchvision model ``name`` (one of ``TASKS``), or None when torchvision has no such model."""
    return next((task for task in TASKS if name in task_model_names(task)), None)


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


def segmentation_preprocessing(weights: Any) -> Preprocessing:
    """A square input at the size the weights' transform resizes the shorter side to (520 for torchvision's)."""
    transform = weights.transforms()
    side = int(transform.resize_size[0]) if transform.resize_size else 520
    return Preprocessing(
        input_size=(side, side),
        resize_size=side,
        mean=tuple(transform.mean),
        std=tuple(transform.std),
        interpolation=transform.interpolation.value,
    )


def detection_preprocessing(module: Any) -> Preprocessing:
    """Images in [0, 1] (mean 0, std 1: torchvision detectors normalize inside), square at the detector's own size.

    The detector's ``transform`` resizes every image so that its shorter side is ``min_size`` (SSD: to
    ``fixed_size``). A square input of that side goes through that resize unchanged, so the boxes the model returns
    are in the input's pixels and map to the original image by one scale per axis.
    """
    transform = getattr(module, "transform", None)
    fixed = getattr(transform, "fixed_size", None)
    if fixed:
        width, height = int(fixed[0]), int(fixed[1])  # torchvision's fixed_size is (width, height)
    else:
        sizes = getattr(transform, "min_size", None) or (800,)
        side = int(sizes[-1])  # eval uses the last of several training sizes (keypointrcnn: 640 ... 800)
        height, width = side, side
    return Preprocessing(input_size=(height, width), resize_size=min(height, width), mean=(0.0,) * 3, std=(1.0,) * 3)


def resize_detector(module: Any, size: tuple[int, int]) -> None:
    """Make a torchvision detector's own resize keep an input of ``size`` (height, width) as it is, so ``--size``
    sets the size the detector runs at (it would otherwise resize every input to its ``min_size``, e.g. 800)."""
    transform = getattr(module, "transform", None)
    if transform is None or not hasattr(transform, "min_size"):
        return
    if getattr(transform, "fixed_size", None):
        transform.fixed_size = (int(size[1]), int(size[0]))  # (width, height), as torchvision's transform reads it
    transform.min_size = (int(min(size)),)
    transform.max_size = int(max(size))


def load_torchvision(name: str, weights: str) -> LoadedModel:
    """torchvision model ``name`` with ``weights`` (see ``torchvision_weights``), its preprocessing and class names.

    Classification, segmentation and detection models: ``none`` builds them with random weights and no download
    at all (segmentation and detection models also get no backbone weights).
    """
    task = model_task(name)
    if task is None:
        names = [n for t in TASKS for n in task_model_names(t)]
        hint = did_you_mean(name, names)
        fix = (
            hint[2:]
            if hint
            else "pass a model file, or a torchvision classification, segmentation or detection model name"
        )
        raise UsageError(f"unknown model {name!r}: not a file and not a torchvision model; {fix}")
    from torchvision.models import get_model, get_model_weights

    chosen = torchvision_weights(name, weights)
    # Segmentation and detection builders fetch ImageNet backbone weights by default, even with weights=None.
    extra = {} if task == "classification" else {"weights_backbone": None}
    try:
        module = get_model(name, weights=chosen, **extra)
    except Exception as exc:  # torchvision's own download code: network, disk, checksum
        raise UsageError(
            f"could not get the {chosen} weights for {name} ({type(exc).__name__}: {str(exc).splitlines()[0]}); "
            "check the network or pass --weights none"
        ) from None
    reference = chosen if chosen is not None else get_model_weights(name).DEFAULT
    labels = chosen.meta.get("categories") if chosen is not None else None
    described = f"torchvision {name} ({chosen if chosen is not None else 'random weights'})"
    if task == "segmentation":
        preprocessing = segmentation_preprocessing(reference)
    elif task == "detection":
        preprocessing = detection_preprocessing(module)
    else:
        preprocessing = weights_preprocessing(reference)
    loaded = LoadedModel(module, name, described, preprocessing, list(labels) if labels else None, task=task)
    if task == "segmentation":
        loaded.output_key = "out"  # {"out": (N, C, H, W), "aux": ...}: "aux" is a training-time head
    return loaded


def category_names(name: str, weights: str = "DEFAULT") -> list[str] | None:
    """The class names the weights ``weights`` of torchvision model ``name`` were trained on, read without a download."""
    chosen = torchvision_weights(name, weights)
    categories = chosen.meta.get("categories") if chosen is not None else None
    return list(categories) if categories else None


# --- architecture detection ----------------------------------------------------------------------
#
# A state_dict names its architecture only through its parameter names and shapes. Building every
# torchvision model to compare them took seconds (most of it in weight init, even on the meta device),
# so each architecture's signature -- its state_dict's names and shapes with the default 1000 classes --
# is built at most once per process (_signatures) and once per torch/torchvision version on disk
# (_signature_cache_path). A state_dict is compared only with the architectures whose names equal its
# own, and the one that fits is built once more to confirm it: a stale or tampered cache can make
# detection miss, never make it answer wrongly.

Shapes = dict[str, tuple[int, ...]]

SIGNATURE_CACHE_FORMAT = 1  # bump when the file's layout or the meaning of a signature changes
MAX_SIGNATURE_CACHE_BYTES = 64 * 2**20  # the real file is a few MB: anything far larger is not ours to parse

_signatures: dict[str, Shapes] = {}  # architecture name -> its signature, for the life of the process
_signatures_lock = threading.Lock()  # one thread builds the signatures; another waits for them, not builds them twice
_init_patch_lock = threading.Lock()  # torch.nn.init is patched process-wide: one patcher at a time restores it right
_skipping_init = threading.local()  # .active: this thread is building a model only for its shapes


@contextlib.contextmanager
def _skip_weight_init() -> Iterator[None]:
    """Build a model without running torch.nn.init in this thread: shapes are all we need, and init is the slow part.

    The init functions are module attributes, so they are replaced for every thread; the replacements skip only in
    the thread that entered here, so a model another thread builds meanwhile is still initialised.
    """
    from unittest import mock

    import torch.nn.init as init

    def skipping(original: Callable[..., Any]) -> Callable[..., Any]:
        def maybe_skip(tensor: Any, *args: Any, **kwargs: Any) -> Any:
            return tensor if getattr(_skipping_init, "active", False) else original(tensor, *args, **kwargs)

        return maybe_skip

    with _init_patch_lock, contextlib.ExitStack() as stack:
        for n in [n for n in dir(init) if n.endswith("_") and not n.startswith("_")]:
            stack.enter_context(mock.patch.object(init, n, skipping(getattr(init, n))))
        _skipping_init.active = True
        try:
            yield
        finally:
            _skipping_init.active = False


def _parameter_shapes(name: str, num_classes: int = 1000) -> Shapes:
    """The names and shapes of the state_dict of torchvision's ``name`` with ``num_classes``, built without weights."""
    from torchvision.models import get_model

    with warnings.catch_warnings(), _skip_weight_init(), torch.no_grad():
        # googlenet and inception_v3 warn (FutureWarning) that their default init will change: it is not used here,
        # and a user who asked for fmaps of a state_dict should not read about it on stderr.
        warnings.simplefilter("ignore")
        try:
            with torch.device("meta"):  # no memory and no arithmetic for the weights
                module = get_model(name, weights=None, num_classes=num_classes)
        except (NotImplementedError, RuntimeError):  # e.g. regnet computes widths with real tensors
            module = get_model(name, weights=None, num_classes=num_classes)
    return {key: tuple(value.shape) for key, value in module.state_dict().items()}


def _architecture_signatures() -> dict[str, Shapes]:
    """Each buildable torchvision classification architecture's signature, in ``classification_model_names`` order.

    From memory, else from the on-disk cache, else built (and then the cache is rewritten). An architecture that
    cannot be built with defaults is left out -- it is not a candidate -- and tried again in the next process.
    """
    names = classification_model_names()
    with _signatures_lock:
        missing = [name for name in names if name not in _signatures]
        if missing:
            path = _signature_cache_path()
            stored = _read_signature_cache(path) if path is not None else {}
            built = False
            for name in missing:
                if name in stored:
                    _signatures[name] = stored[name]
                    continue
                try:
                    _signatures[name] = _parameter_shapes(name)
                except Exception:  # an architecture that cannot be built with defaults is simply not a candidate
                    continue
                built = True
            if built and path is not None:
                _write_signature_cache(path, {name: _signatures[name] for name in names if name in _signatures})
        return {name: _signatures[name] for name in names if name in _signatures}


def _signature_cache_path() -> Path | None:
    """The signature cache of this torch and torchvision under the user's cache dir, or None if there is no such dir.

    The versions are in the file name, so an upgrade starts a new file instead of trusting the old one.
    """
    import torchvision

    try:
        base = os.environ.get("XDG_CACHE_HOME", "")
        root = Path(base) if os.path.isabs(base) else Path.home() / ".cache"  # XDG: a relative path is ignored
    except Exception:  # no home directory (RuntimeError, KeyError): work without a cache
        return None
    versions = f"torchvision-{torchvision.__version__}-torch-{torch.__version__}"
    safe = re.sub(r"[^A-Za-z0-9.+_-]", "_", versions)
    return root / "hookviz" / f"arch-signatures-{safe}-v{SIGNATURE_CACHE_FORMAT}.json"


def _signature_cache_header() -> dict[str, object]:
    """What a cache file must say about itself to be used: its format and the versions its signatures came from."""
    import torchvision

    return {
        "format": SIGNATURE_CACHE_FORMAT,
        "torch": str(torch.__version__),
        "torchvision": str(torchvision.__version__),
    }


def _read_signature_cache(path: Path) -> dict[str, Shapes]:
    """The signatures stored at ``path``; {} for a file that is absent, unreadable, corrupt or from other versions.

    A cache only saves time: nothing in it may stop detection, so every failure means "not cached". An entry
    that is not a mapping of names to lists of sizes is dropped on its own (and built again).
    """
    try:
        with path.open("rb") as stream:
            if os.fstat(stream.fileno()).st_size > MAX_SIGNATURE_CACHE_BYTES:
                return {}
            text = stream.read()
        with _no_cyclic_gc():
            data = json.loads(text)
            if not isinstance(data, dict) or any(data.get(k) != v for k, v in _signature_cache_header().items()):
                return {}
            entries = data.get("signatures")
            if not isinstance(entries, dict):
                return {}
            parsed = {name: _parse_signature(stored) for name, stored in entries.items()}
    except Exception:  # OSError, ValueError (not JSON, not UTF-8), RecursionError (absurd nesting), ...
        return {}
    return {name: shapes for name, shapes in parsed.items() if shapes is not None}


@contextlib.contextmanager
def _no_cyclic_gc() -> Iterator[None]:
    """Pause the cyclic garbage collector (if it runs) while reading the cache.

    Reading it makes ~100k small lists and tuples, which set off full collections over every object torch and
    torchvision made: 0.14 s against 0.02 s for the read itself. They hold no cycles, so nothing is lost.
    """
    collecting = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if collecting:
            gc.enable()


def _parse_signature(stored: object) -> Shapes | None:
    """A signature read back from JSON ({name: [sizes]}), or None if ``stored`` is not one."""
    if not isinstance(stored, dict):
        return None
    shapes: Shapes = {}
    for key, sizes in stored.items():
        if not isinstance(sizes, list) or not all(type(n) is int and n >= 0 for n in sizes):
            return None
        shapes[key] = tuple(sizes)
    return shapes


def _write_signature_cache(path: Path, signatures: Mapping[str, Shapes]) -> None:
    """Store ``signatures`` at ``path`` atomically (a temporary file renamed over it), or silently not at all.

    Concurrent runs each rename a complete file, so a reader sees an old file, a new one or none, never half of
    one. An unwritable or full cache dir costs the next run its speed, not its answer.
    """
    data = {
        **_signature_cache_header(),
        "signatures": {
            name: {key: list(sizes) for key, sizes in shapes.items()} for name, shapes in signatures.items()
        },
    }
    temporary = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(
            "w", encoding="utf-8", dir=path.parent, prefix=f".{path.name}.", suffix=".tmp", delete=False
        ) as stream:
            temporary = stream.name
            json.dump(data, stream, separators=(",", ":"))
        os.replace(temporary, path)
    except Exception:  # OSError (read-only, full, not a dir), ...: detection already has its answer
        if temporary is not None:
            with contextlib.suppress(OSError):
                os.unlink(temporary)


def detect_torchvision_arch(state: Mapping[str, torch.Tensor]) -> tuple[str, int] | None:
    """The torchvision architecture (and num_classes) whose parameter names and shapes match ``state``, or None.

    The first match in ``classification_model_names`` order wins, as when every model was built in turn.
    """
    shapes = {key: tuple(value.shape) for key, value in state.items()}
    for name, expected in _architecture_signatures().items():
        if expected.keys() != shapes.keys():  # names first: they rule out all but a few architectures
            continue
        mismatched = [key for key in expected if expected[key] != shapes[key]]
        if not mismatched:
            num_classes = 1000
        # Only the classifier differs: infer num_classes from its leading dimension (which a 0-d tensor lacks).
        elif all(expected[key][:1] == (1000,) and len(shapes[key]) > 0 for key in mismatched):
            num_classes = shapes[mismatched[0]][0]
        else:
            continue
        if _builds_with_shapes(name, num_classes, shapes):
            return name, num_classes
    return None


def _builds_with_shapes(name: str, num_classes: int, shapes: Shapes) -> bool:
    """Whether ``name`` built with ``num_classes`` has exactly ``shapes``: the check of a candidate found by signature
    (for num_classes other than 1000, and against a cached signature that is stale)."""
    try:
        return _parameter_shapes(name, num_classes) == shapes
    except Exception:  # e.g. a num_classes the architecture refuses: then it is not this architecture
        return False


def build_arch(arch: str, state: Mapping[str, torch.Tensor], spec: str, detected: bool) -> LoadedModel:
    """torchvision architecture ``arch`` with the weights ``state`` (read from file ``spec``), strictly loaded."""
    from torchvision.models import get_model

    names = classification_model_names()
    if arch not in names:
        task = model_task(arch)
        if task is not None:
            return _build_task_arch(arch, task, state, spec)
        every = [name for task in TASKS for name in task_model_names(task)]
        raise UsageError(f"--arch {arch!r} is not a torchvision model" + did_you_mean(arch, every))
    num_classes = _classifier_size(state, arch)
    fix = "leave out --arch to detect the architecture, or export the model to .pt2"
    try:
        module = (
            get_model(arch, weights=None, num_classes=num_classes) if num_classes else get_model(arch, weights=None)
        )
    except (RuntimeError, TypeError, ValueError) as exc:
        raise UsageError(f"{spec} does not fit --arch {arch} ({type(exc).__name__}: {exc}); {fix}") from None
    reference, labels = _loaded_checked(module, state, spec, arch, fix, num_classes)
    how = "detected" if detected else "given"
    return LoadedModel(
        module,
        spec,
        f"state_dict {spec} as torchvision {arch} ({how}, {num_classes or 1000} classes)",
        weights_preprocessing(reference),
        labels,
    )


def _build_task_arch(arch: str, task: str, state: Mapping[str, torch.Tensor], spec: str) -> LoadedModel:
    """A segmentation or detection architecture with the weights ``state``: its number of classes is read from the
    parameters whose size is a multiple of the default's (a box regressor has 4 per class, RetinaNet 9 anchors per
    class), and a segmentation model gets its auxiliary head when the file has one."""
    from torchvision.models import get_model

    fix = "check --arch, or export the model to .pt2"
    options: dict[str, Any] = {"weights": None, "weights_backbone": None}
    if any(key.startswith("aux_classifier.") for key in state):
        options["aux_loss"] = True

    def build(**extra: Any) -> Any:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return get_model(arch, **options, **extra)
        except (RuntimeError, TypeError, ValueError) as exc:
            raise UsageError(f"{spec} does not fit --arch {arch} ({type(exc).__name__}: {exc}); {fix}") from None

    module = build()
    default = 21 if task == "segmentation" else 91
    expected = module.state_dict()
    num_classes = default
    for key, value in expected.items():
        given = state.get(key)
        if given is None or given.dim() == 0 or value.dim() == 0 or tuple(given.shape) == tuple(value.shape):
            continue
        rows, default_rows = int(given.shape[0]), int(value.shape[0])
        if default_rows % default == 0 and (rows * default) % default_rows == 0:
            num_classes = rows * default // default_rows
            break
    if num_classes != default:
        module = build(num_classes=num_classes)
    reference, labels = _loaded_checked(module, state, spec, arch, fix, num_classes)
    if task == "segmentation":
        preprocessing = segmentation_preprocessing(reference)
    else:
        preprocessing = detection_preprocessing(module)
    described = f"state_dict {spec} as torchvision {arch} (given, {num_classes} classes)"
    loaded = LoadedModel(module, spec, described, preprocessing, labels, task=task)
    if task == "segmentation":
        loaded.output_key = "out"
    return loaded


def _loaded_checked(
    module: torch.nn.Module, state: Mapping[str, torch.Tensor], spec: str, arch: str, fix: str, num_classes: int | None
) -> tuple[Any, list[str] | None]:
    """Load ``state`` into ``module`` (a one-line UsageError naming the misfit when it does not fit); return the
    architecture's DEFAULT weights (for their transforms) and their category names when the class count agrees."""
    from torchvision.models import get_model_weights

    misfit = state_dict_misfit(module.state_dict(), state)
    if misfit:
        raise UsageError(f"{spec} does not fit --arch {arch} ({misfit}); {fix}")
    module.load_state_dict(state, strict=True)
    reference = get_model_weights(arch).DEFAULT
    categories = reference.meta.get("categories")
    labels = list(categories) if categories and num_classes in (None, len(categories)) else None
    return reference, labels


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


def _classifier_size(state: Mapping[str, torch.Tensor], arch: str | None = None) -> int | None:
    """num_classes: the leading size of the parameters that have 1000 rows in ``arch`` with its default classes and
    another number in ``state``; else from the last 2-D or 4-D weight in the state_dict (the classifier).

    The first rule does not depend on the order of the keys: a safetensors file lists them sorted by name.
    """
    if arch is not None:
        try:
            expected = _signatures.get(arch) or _parameter_shapes(arch)
        except Exception:  # an architecture that cannot be built with defaults: fall back on the key order
            expected = {}
        for key, shape in expected.items():
            given = state.get(key)
            if shape[:1] == (1000,) and given is not None and given.dim() > 0 and tuple(given.shape) != shape:
                return int(given.shape[0])
        if expected and all(key in state and tuple(state[key].shape) == shape for key, shape in expected.items()):
            return 1000
    for key in reversed(list(state)):
        value = state[key]
        if key.endswith("weight") and value.dim() in (2, 4):
            return int(value.shape[0])
    return None
