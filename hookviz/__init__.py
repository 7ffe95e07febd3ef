"""hookviz: feature maps and CAM heatmaps for PyTorch CNNs.

The library API, importable without the CLI::

    from hookviz import load_model, capture, feature_grid

Attributes are imported on first use (PEP 562), so ``import hookviz`` and the
CLI's ``--help`` do not pay for importing torch.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "load_model": "models",
    "LoadedModel": "models",
    "Preprocessing": "preprocessing",
    "capture": "hooks",
    "resolve_layers": "hooks",
    "run_model": "forward",
    "select_logits": "forward",
    "load_image": "images",
    "collect_inputs": "images",
    "preprocess": "images",
    "trace_layers": "layers",
    "conv_layer_names": "layers",
    "feature_grid": "fmaps",
    "compute_cams": "cams",
    "compute_guided": "guided",
    "StatsCollector": "stats",
    "trace_model": "trace",
    "HookvizError": "errors",
    "UsageError": "errors",
    "InputError": "errors",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'hookviz' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
