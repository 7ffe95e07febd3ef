"""The package's shape: imports run one way, nothing reaches into another module's private names, lists agree.

Read from the source with ``ast`` (every import, also those inside functions), so a
lazy import that runs backwards is caught as well as a top-level one.
"""

from __future__ import annotations

import ast
from pathlib import Path

import hookviz
from hookviz import cams, methods

PACKAGE = Path(hookviz.__file__).parent

# Data flows one way: CLI -> jobs/batch -> pipeline -> methods -> hooks/models -> images, output, ... -> errors.
# A module may import modules of its own rank or lower, never higher.
RANKS = {
    "errors": 0,
    "interrupts": 0,
    "methods": 0,
    "preprocessing": 0,
    "tables": 0,
    "memory": 0,
    "forward": 1,
    "folding": 1,  # batch norms folded into convolutions for a block (fast gradient ascent)
    "precision": 1,  # bfloat16 arithmetic for gradient ascent, with its fast strided depthwise gradient
    "spatial": 1,
    "output": 1,
    "images": 1,
    "render": 1,
    "colormaps": 0,  # the built-in colour tables
    "targets": 2,  # what a map explains: class logits, a single output's sides, segmentation, similarity
    "models": 2,
    "hooks": 2,
    "layers": 3,
    "cams": 3,
    "guided": 3,
    "fmaps": 3,
    "stats": 3,
    "trace": 3,
    "attribution": 3,  # pixel attribution: saliency, SmoothGrad, Integrated Gradients
    "filters": 3,  # activation maximization and deep dream
    "metrics": 3,  # faithfulness metrics and sanity checks of maps
    "labels": 3,  # expected labels: ImageFolder layouts, CSV and JSON Lines label files
    "pipeline": 4,
    "manifest": 4,
    "locks": 4,
    "tensorboard": 4,
    "jobs": 5,
    "batch": 5,
    "gallery": 5,
    "evaluation": 5,  # the evaluate run: maps, metrics, ranking, plots
    "audit": 5,  # the audit of a labelled set
    "detection": 5,  # per-box maps of torchvision detectors and their job
    "cli": 6,
    "demo": 6,
    "__init__": 6,
    "__main__": 6,
}


def modules() -> dict[str, Path]:
    """Dotted names inside hookviz (``cli.options``, ``models.zoo``, ``cams``) -> file."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
        if parts[-1] == "__init__" and len(parts) > 1:
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def imports(name: str, path: Path) -> list[tuple[str, list[str]]]:
    """(imported hookviz module, names taken from it) for every import in the file."""
    package = name.split(".")[:-1] if path.name != "__init__.py" else name.split(".")
    if name == "__init__":
        package = []
    result = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)] if node.level > 1 else package
                target = ".".join([*base, *(node.module.split(".") if node.module else [])])
            elif node.module and node.module.startswith("hookviz"):
                target = node.module.removeprefix("hookviz").lstrip(".")
            else:
                continue
            names = [alias.name for alias in node.names]
            if not target:  # `from . import tables`: each name is a module
                result.extend((alias, []) for alias in names)
            else:
                result.append((target, names))
        elif isinstance(node, ast.Import):
            result.extend(
                (alias.name.removeprefix("hookviz."), []) for alias in node.names if alias.name.startswith("hookviz.")
            )
    return result


def rank(module: str) -> int:
    return RANKS[module.split(".")[0]]


def test_every_module_has_a_rank():
    assert {name.split(".")[0] for name in modules()} <= set(RANKS)


def test_imports_run_one_way():
    backwards = [
        f"{name} imports {target}"
        for name, path in modules().items()
        for target, _ in imports(name, path)
        if target and rank(target) > rank(name)
    ]
    assert backwards == []


def test_no_module_imports_a_private_name_of_another():
    private = [
        f"{name}: from {target} import {item}"
        for name, path in modules().items()
        for target, items in imports(name, path)
        for item in items
        if item.startswith("_")
    ]
    assert private == []


def test_the_method_list_is_the_rule_list():
    """The CLI's choices (methods.py, no torch) and the implementations (cams.py) name the same methods."""
    assert tuple(cams.GRADIENT_RULES) == methods.GRADIENT_METHODS
    assert cams.METHODS == methods.CAM_METHODS
