"""Expected labels: which class each input should be, from a labelled folder or a label file.

Three ways a user labels a set of images:

* ``folder``: the ImageFolder layout, ``photos/<class name>/*.jpg`` (the class is the first folder under the
  folder given; a file given on its own takes its parent folder's name);
* a CSV file whose first line names the columns ``path,label`` (``input`` may stand for ``path``); paths are
  relative to the CSV file's folder;
* a JSON Lines file, one ``{"input": PATH, "label": LABEL}`` object per line, paths relative to the file's folder.

A label is a class index (``281``) or a class name of the model, matched exactly, else by a unique
case-insensitive match (``_`` read as a space, so a folder ``tiger_cat`` is ``tiger cat``). A name that
matches nothing stops the run with one line listing the names it resembles: a typo in a class folder would
otherwise count every image in it as a mistake. A row that cannot be used (a label out of range, a label
missing, the same file listed twice with different labels) makes only that input fail; a row that names no
input, or a file that lacks a column, stops the run.

    labels = expected_labels("photos.csv", [], class_names=loaded.labels, num_classes=1000)
    labels.inputs                      # the files the CSV lists, in its order
    labels.of(Path("photos/cat.jpg"))  # Expected(class_index=281, error=None)
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .errors import UsageError, close_matches, shown
from .images import STDIN, collect_inputs
from .output import input_identity

FOLDER = "folder"  # --expected folder: the ImageFolder layout
PATH_COLUMNS = ("path", "input")
LABEL_COLUMN = "label"
JSON_LINES_SUFFIXES = frozenset({".jsonl", ".ndjson"})
MAX_LISTED = 8


@dataclass(frozen=True)
class Expected:
    """One input's expected class, or (``class_index`` None) the one-line reason it has none."""

    class_index: int | None
    error: str | None = None


@dataclass
class ExpectedLabels:
    """The expected class of every input of a run (looked up by the input's resolved path)."""

    source: str  # "folder", or the label file as given
    inputs: list[Path]  # the inputs, in order: the folder's images, or the files the label file lists
    by_identity: dict[str, Expected] = field(default_factory=dict)
    by_parent: _ClassNames | None = None  # folder layout, inputs read from stdin: the parent folder names the class

    def of(self, path: Path | str) -> Expected:
        """The expected class of ``path`` (an input of the run); an ``error`` when it has none."""
        found = self.by_identity.get(input_identity(path))
        if found is not None:
            return found
        if self.by_parent is not None:
            where = f"--expected folder: {shown(Path(path).parent)}"
            try:
                return Expected(self.by_parent.index(Path(path).parent.name, where))
            except (ValueError, UsageError) as exc:  # read from stdin as the run goes: this input fails
                return Expected(None, f"{shown(path)}: {exc}")
        return Expected(None, f"{shown(path)}: no expected label in {shown(self.source)}; add a row for it")


def expected_labels(
    source: str | Path,
    arguments: Sequence[str] = (),
    *,
    class_names: Sequence[str] | None,
    num_classes: int | None,
) -> ExpectedLabels:
    """The expected labels of a run.

    Args:
        source: ``"folder"`` (the ImageFolder layout of ``arguments``), a folder in that layout, or a CSV or
            JSON Lines label file (``.jsonl``/``.ndjson``; anything else is read as CSV).
        arguments: for ``"folder"``, the run's inputs as given on the command line (files, folders, ``-``:
            paths read from stdin are labelled as the run reads them); a label file lists its own inputs.
        class_names: the model's class names (``LoadedModel.labels``), or None for indices only.
        num_classes: how many classes the model has (``LoadedModel.output_count()``), to check indices.

    Raises:
        UsageError: a label file that cannot be read or lacks a column, a row that names no input, a class
            name that matches no class of the model (with the names it resembles).
    """
    names = _ClassNames(class_names, num_classes)
    if str(source) == FOLDER or Path(source).is_dir():
        arguments = list(arguments) if str(source) == FOLDER else [str(source)]
        return _from_folders(arguments, names)
    path = Path(source)
    if not path.is_file():
        raise UsageError(
            f"--expected {shown(source)}: no such file; use 'folder' (photos/<class>/*.jpg), a CSV file path,label "
            "or a JSON Lines file"
        )
    rows = _json_lines(path) if path.suffix.lower() in JSON_LINES_SUFFIXES else _csv_rows(path)
    return _from_rows(path, rows, names)


# --- class names ------------------------------------------------------------------------------------


class _ClassNames:
    """Turns a label (an index or a class name) into a class index of the model, remembering each name's answer."""

    def __init__(self, names: Sequence[str] | None, count: int | None):
        self.names = list(names) if names is not None else None
        self.count = count if count is not None else (len(self.names) if self.names is not None else None)
        self.matched: dict[str, int] = {}

    def index(self, label: object, where: str) -> int:
        """The class index of ``label``; a UsageError for a name that is no class's, an InputError-style
        ValueError (the input fails) for an index out of range or an empty label."""
        if isinstance(label, bool) or label is None:
            raise ValueError(f"{where}: the label is missing; give a class index or name")
        if isinstance(label, int):
            return self._checked(label, where)
        if isinstance(label, float) and label.is_integer():
            return self._checked(int(label), where)
        text = str(label).strip()
        if not text:
            raise ValueError(f"{where}: the label is empty; give a class index or name")
        if text in self.matched:
            return self.matched[text]
        index = self._matched(text, where)
        self.matched[text] = index
        return index

    def _checked(self, index: int, where: str) -> int:
        if index < 0 or (self.count is not None and index >= self.count):
            span = f"0..{self.count - 1}" if self.count is not None else "0 or more"
            raise ValueError(f"{where}: class {index} is out of range: this model has classes {span}")
        return index

    def _matched(self, text: str, where: str) -> int:
        if self.names is not None:
            exact = [i for i, name in enumerate(self.names) if name == text]
            if len(exact) == 1:
                return exact[0]
            if len(exact) > 1:
                raise UsageError(f"{where}: {text!r} names classes {_listed(map(str, exact))}; give the index instead")
        if re.fullmatch(r"[0-9]+", text):
            return self._checked(int(text), where)
        if self.names is None:
            raise UsageError(
                f"{where}: {text!r} is not a class index, and this model has no class names; pass --labels FILE "
                "(one name per line, in the model's class order)"
            )
        folded = _folded(text)
        found = [i for i, name in enumerate(self.names) if _folded(name) == folded]
        if len(found) == 1:
            return found[0]
        if len(found) > 1:
            raise UsageError(
                f"{where}: {text!r} matches classes {_listed(f'{i} {self.names[i]!r}' for i in found)}; "
                "give the index or the exact name"
            )
        raise UsageError(f"{where}: {text!r} is not a class name of this model{self._hint(text)}")

    def _hint(self, text: str) -> str:
        """Names spelled alike; else the names sharing a word with ``text`` (a folder ``cats`` -> ``tiger cat``)."""
        assert self.names is not None
        hint = close_matches(text.replace("_", " "), self.names, fold_case=True)
        if not hint:
            words = {word for word in re.split(r"[\W_]+", text.lower()) if len(word) > 2}
            hint = [name for name in self.names if words & set(re.split(r"[\W_]+", name.lower()))][:MAX_LISTED]
        return (
            f"; did you mean {_listed(map(repr, hint))}?" if hint else "; see the names with --labels, or give indices"
        )


def _folded(name: str) -> str:
    return " ".join(name.replace("_", " ").lower().split())


def _listed(items: object) -> str:
    listed = list(items)  # type: ignore[call-overload]
    more = f" and {len(listed) - MAX_LISTED} more" if len(listed) > MAX_LISTED else ""
    return ", ".join(listed[:MAX_LISTED]) + more


# --- folders ----------------------------------------------------------------------------------------


def _from_folders(arguments: Sequence[str], names: _ClassNames) -> ExpectedLabels:
    """The ImageFolder layout: under a folder given, an image's class is the first folder it is in."""
    inputs: list[Path] = []
    labels = ExpectedLabels(FOLDER, inputs)
    for argument in arguments:
        if argument == STDIN:  # read by the run itself, once: each path's parent folder names its class
            labels.by_parent = names
            continue
        found = collect_inputs([argument])
        inputs.extend(found)
        root = Path(argument)
        if root.is_dir() and found and all(path.parent == root for path in found):
            raise UsageError(
                f"{shown(root)}: no class folders; put the images in {shown(root)}/<class name>/ (the ImageFolder "
                "layout), or give a label file (CSV path,label or JSON Lines)"
            )
        for path in found:
            if root.is_dir():
                parts = path.relative_to(root).parts
                if len(parts) < 2:
                    labels.by_identity[input_identity(path)] = Expected(
                        None,
                        f"{shown(path)}: not in a class folder; put it in {shown(root)}/<class name>/ "
                        "(the ImageFolder layout)",
                    )
                    continue
                class_folder = root / parts[0]
            else:
                class_folder = path.parent
            where = f"--expected folder: {shown(class_folder)}"
            try:
                expected = Expected(names.index(class_folder.name, where))
            except ValueError as exc:
                raise UsageError(str(exc)) from None
            labels.by_identity[input_identity(path)] = expected
    return labels


# --- label files ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Row:
    line: int
    path: str
    label: object
    error: str | None = None  # the row is bad: its input fails with this


def _read_text(path: Path) -> list[str]:
    try:
        return path.read_text(encoding="utf-8-sig").splitlines()
    except UnicodeDecodeError:
        raise UsageError(f"--expected {shown(path)}: not a UTF-8 text file; use a CSV or JSON Lines file") from None
    except OSError as exc:
        raise UsageError(f"--expected {shown(path)}: cannot read it ({exc.strerror or exc})") from None


def _csv_rows(path: Path) -> list[_Row]:
    lines = _read_text(path)
    reader = csv.reader(lines)
    header = next(reader, None)
    if header is None:
        raise UsageError(
            f"--expected {shown(path)}: the file is empty; write a header line path,label and a row per image"
        )
    columns = [name.strip().lower() for name in header]
    path_column = next((columns.index(name) for name in PATH_COLUMNS if name in columns), -1)
    missing = [
        name for name, there in (("path", path_column >= 0), (LABEL_COLUMN, LABEL_COLUMN in columns)) if not there
    ]
    if missing:
        raise UsageError(
            f"--expected {shown(path)}: no {' and no '.join(repr(name) for name in missing)} column in the header line "
            f"{','.join(header)!r}; the first line must name the columns, e.g. path,label"
        )
    label_column = columns.index(LABEL_COLUMN)
    rows = []
    for fields in reader:
        line = reader.line_num
        if not any(value.strip() for value in fields):
            continue
        where = f"{shown(path)} line {line}"
        file = fields[path_column].strip() if path_column < len(fields) else ""
        if not file:
            raise UsageError(f"{where}: no path in column {PATH_COLUMNS[0]!r}; give each row a path and a label")
        if label_column >= len(fields):
            rows.append(_Row(line, file, None, f"{where}: the row has no {LABEL_COLUMN!r} column; write path,label"))
            continue
        rows.append(_Row(line, file, fields[label_column]))
    return rows


def _json_lines(path: Path) -> list[_Row]:
    rows = []
    for line, text in enumerate(_read_text(path), start=1):
        if not text.strip():
            continue
        where = f"{shown(path)} line {line}"
        try:
            entry = json.loads(text)
        except json.JSONDecodeError:
            entry = None
        if not isinstance(entry, dict) or not isinstance(entry.get("input"), str) or not entry["input"].strip():
            raise UsageError(
                f'{where}: not a JSON object with "input" and "label", e.g. {{"input": "cat.jpg", "label": "tabby"}}'
            )
        if "label" not in entry:
            rows.append(_Row(line, entry["input"], None, f'{where}: no "label"; add the class index or name'))
            continue
        rows.append(_Row(line, entry["input"], entry["label"]))
    return rows


def _from_rows(file: Path, rows: list[_Row], names: _ClassNames) -> ExpectedLabels:
    """Each row's input (relative to the file's folder) and class; an input listed twice must agree with itself."""
    inputs: list[Path] = []
    labels = ExpectedLabels(str(file), inputs)
    lines: dict[str, int] = {}
    for row in rows:
        given = Path(row.path)
        path = given if given.is_absolute() else file.parent / given
        identity = input_identity(path)
        if row.error is not None:
            expected = Expected(None, row.error)
        else:
            where = f"{shown(file)} line {row.line}"
            try:
                expected = Expected(names.index(row.label, where))
            except ValueError as exc:
                expected = Expected(None, str(exc))
        earlier = labels.by_identity.get(identity)
        if earlier is None:
            inputs.append(path)
        elif earlier != expected and earlier.error is None:
            expected = Expected(
                None,
                f"{shown(file)} lines {lines[identity]} and {row.line} give {shown(row.path)} different labels; "
                "keep one",
            )
        elif earlier.error is not None:
            expected = earlier
        lines.setdefault(identity, row.line)
        labels.by_identity[identity] = expected
    if not inputs:
        raise UsageError(f"--expected {shown(file)}: no rows; write one line per image after the header")
    return labels
