"""The audit of a labelled set: how often the model is right, where it goes wrong, and how sure it was.

Made from the records of a labelled run (``LabelledCamJob``: each carries the top-1 prediction, the expected
class, the expected class's probability and rank), so it can be made again from ``DIR/manifest.jsonl`` at
any time: after a resumed run, or once every shard of a sharded run has finished.

    items, failed = audit_items(records)
    result = make_audit(items, loaded.label, failed=failed)
    print(format_summary(result))
    write_audit(result, Path("out"))   # out/audit.json, out/confusion.png, out/per_class.png

What is computed, over the inputs that ran (failed inputs are counted, nothing else):

* accuracy: the fraction whose top-1 prediction is the expected class; top-5 accuracy: whose expected class is
  among the 5 most probable;
* per class (every class expected or predicted): support (inputs expected to be it), predictions of it, precision
  (of the inputs predicted as it, the fraction expected to be it; None when nothing was) and recall (of the inputs
  expected to be it, the fraction predicted as it; None for a class never expected);
* the confusion matrix (rows expected, columns predicted) and the most confused pairs (expected -> predicted,
  most frequent first);
* the most confident mistakes (wrong, by the top-1 probability, highest first) and the lowest-confidence correct
  predictions (right, by that probability, lowest first).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .manifest import Manifest, json_line
from .output import atomic_write, write_png
from .tables import format_table

if TYPE_CHECKING:
    from matplotlib.figure import Figure
    from PIL import Image

AUDIT_NAME = "audit.json"
CONFUSION_NAME = "confusion.png"
PER_CLASS_NAME = "per_class.png"
TOP_K = 5  # top-k accuracy
LISTED = 10  # confused pairs, confident mistakes and unsure correct predictions listed
MATRIX_CLASSES = 50  # up to this many classes, confusion.png is the matrix; beyond, a chart of the top pairs
CHART_PAIRS = 30
PER_CLASS_ROWS = 50


@dataclass(frozen=True)
class AuditItem:
    """One labelled input that ran: what the model predicted, what was expected, and how sure it was."""

    input: str
    expected: int
    predicted: int
    score: float  # the top-1 prediction's probability
    expected_score: float
    expected_rank: int  # 1: the expected class is the most probable
    pictures: tuple[str, ...] = ()  # the input's maps

    @property
    def correct(self) -> bool:
        return self.predicted == self.expected

    def as_json(self, label: Callable[[int], str]) -> dict[str, Any]:
        return {
            "input": self.input,
            "expected": self.expected,
            "expected_label": label(self.expected),
            "predicted": self.predicted,
            "predicted_label": label(self.predicted),
            "score": self.score,
            "expected_score": self.expected_score,
            "expected_rank": self.expected_rank,
            "png": list(self.pictures),
        }


def audit_items(records: Iterable[Mapping[str, Any]]) -> tuple[list[AuditItem], list[Mapping[str, Any]]]:
    """(items, failed records) from the records of a labelled run (``Record.as_json()`` or manifest lines).

    A record that ran (``ok``, or ``skipped`` as done by an earlier run) and names its expected class is an
    item; a record with status ``error`` is a failure; other records (of an unlabelled run) are ignored.
    """
    items: list[AuditItem] = []
    failed: list[Mapping[str, Any]] = []
    for record in records:
        if record.get("status") == "error":
            failed.append(record)
            continue
        predictions = record.get("predictions") or []
        if record.get("expected") is None or not predictions:
            continue
        top = predictions[0]
        items.append(
            AuditItem(
                input=str(record["input"]),
                expected=int(record["expected"]),
                predicted=int(top["class"]),
                score=float(top["score"]),
                expected_score=float(record["expected_score"]),
                expected_rank=int(record["expected_rank"]),
                pictures=tuple(str(output["png"]) for output in record.get("outputs", []) if output.get("png")),
            )
        )
    return items, failed


def manifest_records(out_dir: Path, key: str, identities: Iterable[str] | None = None) -> list[dict[str, Any]]:
    """The latest record of each input that runs with options ``key`` recorded in ``out_dir/manifest.jsonl``
    (every shard's), in input order; only the inputs of ``identities`` (``output.input_identity``) when given."""
    wanted = set(identities) if identities is not None else None
    latest: dict[str, dict[str, Any]] = {}
    for entry in Manifest(Path(out_dir)).input_entries():
        if entry.get("key") == key and (wanted is None or entry["identity"] in wanted):
            latest.pop(entry["identity"], None)
            latest[entry["identity"]] = entry
    if wanted is not None and identities is not None:
        order = {identity: number for number, identity in enumerate(dict.fromkeys(identities))}
        return sorted(latest.values(), key=lambda entry: order[entry["identity"]])
    return list(latest.values())


@dataclass
class ClassStats:
    """One class's counts in an audit."""

    class_index: int
    label: str
    support: int  # inputs expected to be this class
    predicted: int  # inputs predicted as this class
    correct: int  # inputs both

    @property
    def precision(self) -> float | None:
        return self.correct / self.predicted if self.predicted else None

    @property
    def recall(self) -> float | None:
        return self.correct / self.support if self.support else None

    def as_json(self) -> dict[str, Any]:
        return {
            "class": self.class_index,
            "label": self.label,
            "support": self.support,
            "predicted": self.predicted,
            "correct": self.correct,
            "precision": self.precision,
            "recall": self.recall,
        }


@dataclass
class Audit:
    """An audit of a labelled set (see the module's docstring for what each part means)."""

    items: list[AuditItem]
    labels: dict[int, str]  # the name of every class expected or predicted
    failed: list[Mapping[str, Any]] = field(default_factory=list)
    listed: int = LISTED

    @property
    def count(self) -> int:
        return len(self.items)

    @property
    def accuracy(self) -> float | None:
        return sum(item.correct for item in self.items) / self.count if self.items else None

    @property
    def top_k_accuracy(self) -> float | None:
        return sum(item.expected_rank <= TOP_K for item in self.items) / self.count if self.items else None

    @property
    def classes(self) -> list[int]:
        """Every class expected or predicted, in index order: the rows and columns of the confusion matrix."""
        return sorted({item.expected for item in self.items} | {item.predicted for item in self.items})

    @property
    def confusion(self) -> Counter[tuple[int, int]]:
        """(expected, predicted) -> how many inputs."""
        return Counter((item.expected, item.predicted) for item in self.items)

    def matrix(self) -> list[list[int]]:
        """The confusion matrix over ``classes``: rows expected, columns predicted."""
        classes, confusion = self.classes, self.confusion
        return [[confusion[expected, predicted] for predicted in classes] for expected in classes]

    @property
    def per_class(self) -> list[ClassStats]:
        support = Counter(item.expected for item in self.items)
        predicted = Counter(item.predicted for item in self.items)
        correct = Counter(item.expected for item in self.items if item.correct)
        return [
            ClassStats(c, self.labels.get(c, f"class {c}"), support[c], predicted[c], correct[c]) for c in self.classes
        ]

    @property
    def confused_pairs(self) -> list[tuple[int, int, int]]:
        """(expected, predicted, count) of the mistakes, most frequent first (then by class)."""
        pairs = [(e, p, n) for (e, p), n in self.confusion.items() if e != p]
        return sorted(pairs, key=lambda pair: (-pair[2], pair[0], pair[1]))

    @property
    def confident_mistakes(self) -> list[AuditItem]:
        """The mistakes, the most confident (highest top-1 probability) first."""
        return sorted((item for item in self.items if not item.correct), key=lambda item: (-item.score, item.input))

    @property
    def unsure_correct(self) -> list[AuditItem]:
        """The correct predictions, the least confident first."""
        return sorted((item for item in self.items if item.correct), key=lambda item: (item.score, item.input))

    def label(self, class_index: int) -> str:
        return self.labels.get(class_index, f"class {class_index}")

    def as_json(self) -> dict[str, Any]:
        """What ``audit.json`` holds: the summary, the listed pairs and inputs, and the whole confusion matrix."""
        mistakes = self.confident_mistakes
        return {
            "inputs": self.count,
            "failed": len(self.failed),
            "correct": sum(item.correct for item in self.items),
            "accuracy": self.accuracy,
            f"top{TOP_K}_accuracy": self.top_k_accuracy,
            "per_class": [stats.as_json() for stats in self.per_class],
            "confused_pairs": [
                {
                    "expected": e,
                    "expected_label": self.label(e),
                    "predicted": p,
                    "predicted_label": self.label(p),
                    "count": n,
                }
                for e, p, n in self.confused_pairs
            ],
            "confident_mistakes": [item.as_json(self.label) for item in mistakes[: self.listed]],
            "unsure_correct": [item.as_json(self.label) for item in self.unsure_correct[: self.listed]],
            "mistakes": [item.input for item in mistakes],
            "confusion": {
                "classes": self.classes,
                "labels": [self.label(c) for c in self.classes],
                "matrix": self.matrix(),
            },
            "failed_inputs": [{"input": record.get("input"), "error": record.get("error")} for record in self.failed],
        }


def make_audit(
    items: Iterable[AuditItem],
    label: Callable[[int], str],
    *,
    failed: Iterable[Mapping[str, Any]] = (),
    listed: int = LISTED,
) -> Audit:
    """The audit of ``items`` (see ``audit_items``); ``label`` names a class (``LoadedModel.label``);
    ``listed`` is how many confused pairs, mistakes and unsure correct inputs the summary lists."""
    items = list(items)
    classes = {item.expected for item in items} | {item.predicted for item in items}
    return Audit(items, {c: label(c) for c in sorted(classes)}, list(failed), listed)


# --- what the user reads ----------------------------------------------------------------------------


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def format_summary(audit: Audit) -> str:
    """The audit as text: accuracy, per-class precision and recall, the most confused pairs, the most confident
    mistakes and the least confident correct predictions."""
    if not audit.items:
        failed = f"; {len(audit.failed)} input(s) failed" if audit.failed else ""
        return f"no labelled input ran{failed}"
    correct = sum(item.correct for item in audit.items)
    lines = [
        f"accuracy {_percent(audit.accuracy)} ({correct}/{audit.count}), top-{TOP_K} accuracy "
        f"{_percent(audit.top_k_accuracy)}" + (f"; {len(audit.failed)} input(s) failed" if audit.failed else ""),
        "",
    ]
    rows = [["class", "expected", "predicted", "precision", "recall"]]
    rows += [
        [f"{s.class_index} {s.label}", str(s.support), str(s.predicted), _percent(s.precision), _percent(s.recall)]
        for s in audit.per_class
    ]
    lines += [format_table(rows, right=range(1, 5)), ""]
    pairs = audit.confused_pairs[: audit.listed]
    if pairs:
        lines.append("most confused (expected -> predicted):")
        lines += [f"  {n:>4}  {audit.label(e)} -> {audit.label(p)}" for e, p, n in pairs]
        lines.append("")
    for title, listed in (
        ("most confident mistakes:", audit.confident_mistakes[: audit.listed]),
        ("lowest-confidence correct:", audit.unsure_correct[: audit.listed]),
    ):
        if not listed:
            continue
        lines.append(title)
        for item in listed:
            said = f"predicted {audit.label(item.predicted)} {item.score:.1%}"
            if not item.correct:
                said += f", expected {audit.label(item.expected)} {item.expected_score:.1%} (rank {item.expected_rank})"
            lines.append(f"  {item.input}: {said}")
        lines.append("")
    return "\n".join(lines).rstrip()


def write_audit(audit: Audit, out_dir: Path) -> dict[str, Path]:
    """Write ``audit.json``, ``confusion.png`` and ``per_class.png`` into ``out_dir`` (atomically); their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / AUDIT_NAME
    with atomic_write(path, "w", encoding="utf-8") as handle:
        handle.write(json.dumps(json.loads(json_line(audit.as_json())), indent=1, ensure_ascii=False) + "\n")
    return {
        "audit": path,
        "confusion": confusion_figure(audit, out_dir / CONFUSION_NAME),
        "per_class": per_class_figure(audit, out_dir / PER_CLASS_NAME),
    }


# --- figures ----------------------------------------------------------------------------------------

DPI = 100


def _short(text: str, limit: int = 28) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def confusion_figure(audit: Audit, path: Path) -> Path:
    """The confusion matrix (rows expected, columns predicted; colour: the fraction of the row, the count written
    in each cell) for up to ``MATRIX_CLASSES`` classes; for more, a bar chart of the most confused pairs."""
    classes = audit.classes
    shows = "matrix" if len(classes) <= MATRIX_CLASSES else "pairs"
    figure = _matrix_figure(audit) if shows == "matrix" else _pairs_figure(audit)
    metadata = {"hookviz:figure": "confusion", "hookviz:shows": shows, "hookviz:classes": str(len(classes))}
    return write_png(_render(figure), Path(path), metadata)


def _matrix_figure(audit: Audit) -> Figure:
    """Right answers (the diagonal) in blue, mistakes in red, each by its share of the row; counts in the cells."""
    import numpy as np
    from matplotlib.colors import ListedColormap
    from matplotlib.figure import Figure

    # Rows: the classes expected; columns: those first (the diagonal starts top left), then classes only predicted.
    expected = sorted({item.expected for item in audit.items})
    columns = expected + [c for c in audit.classes if c not in set(expected)]
    confusion = audit.confusion
    counts = np.array([[confusion[e, p] for p in columns] for e in expected], dtype=float).reshape(
        len(expected), len(columns)
    )
    rows = counts.sum(axis=1, keepdims=True)
    shares = np.divide(counts, rows, out=np.zeros_like(counts), where=rows > 0)
    diagonal = np.eye(len(expected), len(columns), dtype=bool)
    row_names = [_short(f"{c} {audit.label(c)}") for c in expected]
    column_names = [_short(f"{c} {audit.label(c)}") for c in columns]
    n_rows, n_columns = max(1, len(expected)), max(1, len(columns))
    cell = 0.34 if n_columns > 20 else 0.55
    left = 0.075 * max((len(name) for name in row_names), default=4) + 0.55
    bottom = 0.065 * max((len(name) for name in column_names), default=4) + 0.6  # column names turned 60 degrees
    width, height = left + cell * n_columns + 0.3, bottom + cell * n_rows + 0.45
    figure = Figure(figsize=(width, height), dpi=DPI)
    ax = figure.add_axes((left / width, bottom / height, cell * n_columns / width, cell * n_rows / height))
    ax.imshow(np.ones_like(shares), cmap=ListedColormap(["white"]), aspect="equal")
    ax.imshow(np.ma.masked_where(~diagonal | (counts == 0), shares), cmap="Blues", vmin=-0.15, vmax=1, aspect="equal")
    ax.imshow(np.ma.masked_where(diagonal | (counts == 0), shares), cmap="Reds", vmin=-0.15, vmax=1, aspect="equal")
    font = 7 if n_columns > 20 else 9
    for i in range(len(expected)):
        for j in range(len(columns)):
            if counts[i, j]:
                colour = "white" if shares[i, j] > 0.55 else "black"
                ax.text(j, i, f"{int(counts[i, j])}", ha="center", va="center", fontsize=font, color=colour)
    ax.set_xticks(range(len(columns)), column_names, rotation=60, ha="right", rotation_mode="anchor", fontsize=font)
    ax.set_yticks(range(len(expected)), row_names, fontsize=font)
    ax.set_xticks(np.arange(len(columns) + 1) - 0.5, minor=True)
    ax.set_yticks(np.arange(len(expected) + 1) - 0.5, minor=True)
    ax.grid(which="minor", color="0.88", linewidth=0.6)
    ax.tick_params(which="minor", length=0)
    ax.set_xlabel("predicted", fontsize=10)
    ax.set_ylabel("expected", fontsize=10)
    ax.set_title(
        f"accuracy {_percent(audit.accuracy)} of {audit.count}; blue right, red wrong (shade: share of the row)",
        fontsize=9,
        loc="left",
    )
    return figure


def _pairs_figure(audit: Audit) -> Figure:
    from matplotlib.figure import Figure

    pairs = audit.confused_pairs[:CHART_PAIRS]
    names = [_short(f"{audit.label(e)} -> {audit.label(p)}", 60) for e, p, _ in pairs]
    height = 1.2 + 0.28 * max(1, len(pairs))
    margin = 0.075 * max((len(name) for name in names), default=10) + 0.4
    width = margin + 5.0
    figure = Figure(figsize=(width, height), dpi=DPI)
    ax = figure.add_axes((margin / width, 0.6 / height, 4.6 / width, (height - 1.0) / height))
    ax.barh(range(len(pairs)), [n for _, _, n in pairs], color="#c0392b")
    ax.set_yticks(range(len(pairs)), names, fontsize=8)
    ax.invert_yaxis()
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    for row, (expected, _, n) in enumerate(pairs):
        share = n / max(1, sum(item.expected == expected for item in audit.items))
        ax.text(n, row, f" {n} ({share:.0%} of its class)", va="center", fontsize=7)
    ax.set_xlabel("inputs (expected -> predicted)", fontsize=9)
    ax.tick_params(axis="x", labelsize=8)
    ax.set_title(
        f"the {len(pairs)} most confused pairs of {len(audit.classes)} classes; accuracy {_percent(audit.accuracy)}",
        fontsize=10,
        loc="left",
    )
    if not pairs:
        ax.text(0.5, 0.5, "no mistakes", ha="center", va="center", transform=ax.transAxes)
    return figure


def per_class_figure(audit: Audit, path: Path) -> Path:
    """Precision and recall per expected class, the lowest recall on top (at most ``PER_CLASS_ROWS`` classes)."""
    from matplotlib.figure import Figure

    expected = [s for s in audit.per_class if s.support]
    shown = sorted(expected, key=lambda s: (s.recall or 0.0, s.precision or 0.0, s.class_index))[:PER_CLASS_ROWS]
    names = [_short(f"{s.class_index} {s.label} ({s.support})", 40) for s in shown]
    rows = max(1, len(shown))
    height = 1.3 + 0.36 * rows
    margin = 0.075 * max((len(name) for name in names), default=10) + 0.4
    width = margin + 5.0
    figure = Figure(figsize=(width, height), dpi=DPI)
    ax = figure.add_axes((margin / width, 0.55 / height, 4.0 / width, (height - 1.05) / height))
    positions = list(range(len(shown)))
    ax.barh(
        [p - 0.2 for p in positions], [s.recall or 0.0 for s in shown], height=0.38, color="#2e86c1", label="recall"
    )
    ax.barh(
        [p + 0.2 for p in positions],
        [s.precision or 0.0 for s in shown],
        height=0.38,
        color="#f39c12",
        label="precision",
    )
    for position, stats in zip(positions, shown, strict=True):
        for offset, value in ((-0.2, stats.recall), (0.2, stats.precision)):
            ax.text((value or 0.0) + 0.01, position + offset, _percent(value), va="center", fontsize=7)
    ax.set_yticks(positions, names, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, 1.12)
    ax.set_xticks([0, 0.25, 0.5, 0.75, 1])
    ax.xaxis.set_major_formatter("{x:.0%}")
    ax.tick_params(axis="x", labelsize=8)
    ax.grid(axis="x", color="0.9")
    ax.set_axisbelow(True)
    ax.legend(loc="lower left", bbox_to_anchor=(1.0, 0.0), fontsize=8, frameon=False)
    more = f" (the {len(shown)} lowest of {len(expected)})" if len(expected) > len(shown) else ""
    ax.set_title(f"recall and precision per expected class{more}; (n) = inputs", fontsize=10, loc="left")
    if not shown:
        ax.text(0.5, 0.5, "no labelled input ran", ha="center", va="center", transform=ax.transAxes)
    return write_png(_render(figure), Path(path), {"hookviz:figure": "per-class"})


def _render(figure: Figure) -> Image.Image:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from PIL import Image

    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    return Image.frombuffer("RGBA", canvas.get_width_height(), canvas.buffer_rgba()).convert("RGB")
