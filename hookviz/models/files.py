"""Models from files and code: .pt/.pth/.safetensors state_dicts, .pt2 programs, pickled modules,
``package.module:callable``.

Nothing here runs code from a file unless the user said ``trust``: state_dicts
load with ``weights_only=True`` (safetensors files hold no pickle at all), and so
do the pickled parts of a .pt2 archive.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import logging
import os
import pickle
import sys
import zipfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import UsageError
from ..preprocessing import default_preprocessing
from . import LoadedModel
from .zoo import build_arch, detect_torchvision_arch

STATE_DICT_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "net", "weights")


def load_file(path: Path, *, arch: str | None, trust: bool) -> LoadedModel:
    """A model file: a .pt2 program, a state_dict (architecture ``arch`` or detected), or, with ``trust``, a pickle."""
    kind = _image_kind(path)
    if kind is not None:
        raise UsageError(
            f"{path} is a {kind} image, not a model; the model comes first: hookviz COMMAND MODEL IMAGES..."
        )
    if is_safetensors(path):
        state = read_safetensors(path)
        if arch is not None:
            return build_arch(arch, state, str(path), detected=False)
        return _detected(path, state)
    names = _zip_names(path)
    if any(n.endswith("/constants.pkl") or "/code/" in n for n in names):
        raise UsageError(
            f"{path} is a TorchScript file; hooks do not run on TorchScript modules. "
            "Export the model with torch.export to a .pt2 file, or save its state_dict and use --arch"
        )
    if path.suffix == ".pt2" or any(n.endswith("serialized_exported_program.json") or "/models/" in n for n in names):
        return load_exported(path, trust=trust)
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
        raise UsageError(
            f"cannot read {path} as a PyTorch file ({type(exc).__name__}); pass a .pt/.pth state_dict, a .pt2 export, or a model name"
        ) from None
    unwrapped = unwrap_state_dict(obj)
    if unwrapped is None:
        raise UsageError(
            f"{path} holds a {type(obj).__name__}, not a state_dict of tensors; save model.state_dict() or export to .pt2"
        )
    if arch is not None:
        return build_arch(arch, unwrapped, str(path), detected=False)
    return _detected(path, unwrapped)


def _detected(path: Path, state: dict[str, torch.Tensor]) -> LoadedModel:
    found = detect_torchvision_arch(state)
    if found is None:
        raise UsageError(
            f"{path} is a state_dict that matches no torchvision architecture; "
            "pass --arch NAME, use package.module:callable with --state-dict, or export the model to .pt2"
        )
    return build_arch(found[0], state, str(path), detected=True)


SAFETENSORS_MAX_HEADER = 100 * 2**20  # the format's own limit on the JSON header


def is_safetensors(path: Path) -> bool:
    """A ``.safetensors`` file, or a file that starts as one: an 8-byte little-endian header length, then JSON."""
    if path.suffix.lower() == ".safetensors":
        return True
    try:
        with path.open("rb") as stream:
            head = stream.read(9)
            size = os.fstat(stream.fileno()).st_size
    except OSError:
        return False
    if len(head) < 9 or head[8:9] != b"{":
        return False
    length = int.from_bytes(head[:8], "little")
    return 2 <= length <= min(SAFETENSORS_MAX_HEADER, size - 8)


def read_safetensors(path: Path | str, what: str = "") -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file (``safetensors.torch.load_file``: no pickle); a one-line UsageError if the
    package is missing or the file is not a valid safetensors file. ``what`` names the option it came from."""
    name = f"{what} {path}" if what else str(path)
    try:
        from safetensors import SafetensorError
        from safetensors.torch import load_file as load_safetensors
    except ImportError:
        raise UsageError(f"{name} is a safetensors file; reading it needs: pip install safetensors") from None
    try:
        state = load_safetensors(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UsageError(
            f"{name} is not a valid safetensors file ({first[:200]}); save it with safetensors.torch.save_file"
        ) from None
    if not state:
        raise UsageError(f"{name} holds no tensors; save model.state_dict() with safetensors.torch.save_file")
    return unwrap_state_dict(state) or state


# File signatures of the image formats hookviz reads, so that an image given as MODEL is named as one.
IMAGE_SIGNATURES = {
    b"\xff\xd8\xff": "JPEG",
    b"\x89PNG\r\n\x1a\n": "PNG",
    b"GIF87a": "GIF",
    b"GIF89a": "GIF",
    b"BM": "BMP",
    b"II*\x00": "TIFF",
    b"MM\x00*": "TIFF",
}


def _image_kind(path: Path) -> str | None:
    try:
        with path.open("rb") as stream:
            head = stream.read(12)
    except OSError:
        return None
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WebP"
    return next((kind for signature, kind in IMAGE_SIGNATURES.items() if head.startswith(signature)), None)


def _zip_names(path: Path) -> list[str]:
    if not zipfile.is_zipfile(path):
        return []
    with zipfile.ZipFile(path) as archive:
        return archive.namelist()


def unwrap_state_dict(obj: Any) -> dict[str, torch.Tensor] | None:
    """The tensors of a state_dict, also inside common checkpoint layouts and without DataParallel's prefix; else None."""
    if not isinstance(obj, Mapping):
        return None
    if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        state = dict(obj)
    else:
        for key in STATE_DICT_WRAPPER_KEYS:  # common checkpoint layouts: {"state_dict": ..., "epoch": ...}
            if key in obj and isinstance(obj[key], Mapping):
                return unwrap_state_dict(obj[key])
        return None
    if all(k.startswith("module.") for k in state):  # saved from DataParallel
        state = {k[len("module.") :]: v for k, v in state.items()}
    return state


def load_exported(path: Path, trust: bool = False) -> LoadedModel:
    """A .pt2 program, unflattened so its module tree takes hooks.

    torch.export.load unpickles some parts of an archive (sample inputs, opaque
    constants) with full pickle; without ``trust`` those loads are forced to weights-only.
    """
    with _torch_export_log() as messages, _weights_only_unpickling(enabled=not trust):
        try:
            program = torch.export.load(path)
        except Exception as exc:
            raise UsageError(_export_load_error(path, exc, messages, trust)) from None
    # unflatten keeps the module tree (named_modules), so forward hooks and gradients work.
    module = torch.export.unflatten(program)
    shape = _exported_input_shape(program)
    size = None if shape is None or not all(isinstance(d, int) for d in shape[2:]) else (int(shape[2]), int(shape[3]))
    preprocessing = default_preprocessing() if size is None else default_preprocessing(size)
    loaded = LoadedModel(module, str(path), f"torch.export program {path}", preprocessing)
    if shape is not None and isinstance(shape[1], int):
        loaded.input_channels = int(shape[1])
    if shape is not None and isinstance(shape[0], int):
        loaded.fixed_batch = int(shape[0])
        loaded.description += f" (fixed batch size {loaded.fixed_batch})"
    return loaded


def _export_load_error(path: Path, exc: Exception, messages: list[str], trust: bool) -> str:
    details = "\n".join(messages + [str(exc)])
    if not zipfile.is_zipfile(path):
        return f"{path} is not a torch.export .pt2 archive (not a zip file); save one with torch.export.save"
    if not trust and "Weights only load failed" in details:
        return (
            f"{path} holds pickled Python objects and loading them would run code from the file; "
            "if you trust its source re-run with --trust, else re-export it without custom objects"
        )
    first = next((line.strip() for line in str(exc).splitlines() if line.strip()), "")
    return f"cannot load {path} as a torch.export program ({type(exc).__name__}: {first})"


@contextlib.contextmanager
def _torch_export_log() -> Iterator[list[str]]:
    """Collect torch.export's log messages (it logs tracebacks on stderr for broken files) instead of printing them."""
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
        raise UsageError(
            f"cannot unpickle {path} ({type(exc).__name__}: {exc}); the classes it needs must be importable"
        ) from None
    if not isinstance(obj, nn.Module):
        raise UsageError(f"{path} holds a {type(obj).__name__}, not an nn.Module")
    return LoadedModel(obj, str(path), f"pickled {type(obj).__name__} from {path}")


def _import(module_name: str) -> Any:
    """A module by dotted name (also from the current folder, as ``python -m`` would find it) or by file path."""
    if module_name.endswith(".py"):
        path = Path(module_name).resolve()
        if not path.is_file():
            raise ImportError(f"no file {module_name}")
        if str(path.parent) not in sys.path:
            sys.path.insert(0, str(path.parent))  # so the file's own imports of its neighbours work
        spec = importlib.util.spec_from_file_location(path.stem, path)
        if spec is None or spec.loader is None:
            raise ImportError(f"{module_name} is not a Python module")
        module = importlib.util.module_from_spec(spec)
        sys.modules[path.stem] = module  # pickling and dataclasses look classes up by module name
        spec.loader.exec_module(module)
        return module
    if "" not in sys.path and str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))  # so `mymodels:build` finds ./mymodels.py
    return importlib.import_module(module_name)


def load_callable(spec: str, state_dict: str | Path | None) -> LoadedModel:
    """``package.module:callable``: import it (also from the current folder), call it, load ``state_dict`` strictly."""
    module_name, attr = spec.rsplit(":", 1)
    try:
        factory = getattr(_import(module_name), attr)
    except ImportError as exc:
        raise UsageError(
            f"cannot import {module_name!r} for {spec} ({exc}); run hookviz from the module's folder, add that "
            "folder to PYTHONPATH, or name the file: path/to/module.py:callable"
        ) from None
    except AttributeError:
        raise UsageError(f"{module_name!r} has no attribute {attr!r}") from None
    except Exception as exc:  # the user's module failed while it was imported
        raise UsageError(f"importing {module_name!r} for {spec} failed: {type(exc).__name__}: {exc}") from None
    try:
        module = factory()
    except Exception as exc:
        raise UsageError(f"{spec}() failed: {type(exc).__name__}: {exc}") from None
    if not isinstance(module, nn.Module):
        raise UsageError(f"{spec}() returned {type(module).__name__}, not an nn.Module")
    description = f"{type(module).__name__} from {spec}"
    if state_dict is not None:
        state: dict[str, torch.Tensor] | None
        try:
            if Path(state_dict).is_file() and is_safetensors(Path(state_dict)):
                state = read_safetensors(state_dict, "--state-dict")
            else:
                state = unwrap_state_dict(torch.load(state_dict, map_location="cpu", weights_only=True))
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
    return LoadedModel(module, spec, description)
