"""Detecting the torchvision architecture of a state_dict (issue #13.12): from parameter names and shapes, with the
signatures of all architectures built once per process and cached on disk, quietly, with the same answers as when
every model was built for every file.

Nothing here is timed: the speed-up is measured, not asserted. Every test keeps its cache in a temporary folder
($XDG_CACHE_HOME), never in the user's own.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.nn.init as init
import torchvision
from process_helpers import subprocess_env
from torchvision.models import get_model

from hookviz.errors import UsageError
from hookviz.models import load_model, zoo

NO_MATCH = (
    "{path} is a state_dict that matches no torchvision architecture; "
    "pass --arch NAME, use package.module:callable with --state-dict, or export the model to .pt2"
)


@pytest.fixture(scope="module", autouse=True)
def _private_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """The whole module caches signatures in a temporary folder, not in ~/.cache/hookviz."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("xdg-cache")))
        yield


@pytest.fixture
def cold(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A process that has built no signature yet and an empty cache dir, as in a first run; returns the cache dir."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache))
    monkeypatch.setattr(zoo, "_signatures", {})
    return cache


def _shapes_only_state(name: str, num_classes: int) -> dict[str, torch.Tensor]:
    """The state_dict of torchvision ``name``: on the meta device (detection reads only names and shapes), or with
    real tensors for the architectures that cannot be built there (regnet)."""
    try:
        with torch.device("meta"):
            return get_model(name, weights=None, num_classes=num_classes).state_dict()
    except (NotImplementedError, RuntimeError):
        return get_model(name, weights=None, num_classes=num_classes).state_dict()


def _resnet18_state(num_classes: int = 10) -> dict[str, torch.Tensor]:
    return _shapes_only_state("resnet18", num_classes)


# --- the same answers ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "num_classes"),
    [
        ("resnet18", 10),
        ("resnet18", 1000),
        ("mobilenet_v3_small", 7),
        ("squeezenet1_0", 5),  # the classifier is a 1x1 conv: a 4-D weight
        ("wide_resnet50_2", 10),  # the same parameter names as resnet50 and resnext50_32x4d: told apart by shapes
        ("resnet50", 10),
        ("regnet_x_400mf", 3),  # cannot be built on the meta device: the fallback path
    ],
)
def test_detects_the_architecture_and_num_classes(name: str, num_classes: int) -> None:
    # These are the answers the old detection (build every model, compare) gave for the same state_dicts.
    assert zoo.detect_torchvision_arch(_shapes_only_state(name, num_classes)) == (name, num_classes)


def test_names_that_fit_with_shapes_that_do_not_match_nothing() -> None:
    state = _resnet18_state()
    state["layer1.0.conv1.weight"] = torch.empty(32, 64, 3, 3)  # a body layer, not the classifier
    missing = _resnet18_state()
    del missing["layer4.1.bn2.running_var"]

    assert zoo.detect_torchvision_arch(state) is None
    assert zoo.detect_torchvision_arch(missing) is None


def test_a_scalar_where_the_classifier_has_a_matrix_matches_nothing() -> None:
    # The old detection raised IndexError here (num_classes read from the file's 0-d shape); now simply no match.
    state = _resnet18_state(1000)
    state["fc.weight"] = torch.empty(())

    assert zoo.detect_torchvision_arch(state) is None


@pytest.mark.parametrize(("name", "num_classes"), [("mobilenet_v3_small", 7), ("squeezenet1_0", 5)])
def test_a_state_dict_file_loads_as_the_detected_architecture_without_warnings(
    tmp_path: Path, cold: Path, name: str, num_classes: int
) -> None:
    torch.manual_seed(0)
    original = get_model(name, weights=None, num_classes=num_classes).eval()
    path = tmp_path / "weights.pt"
    torch.save(original.state_dict(), path)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = load_model(str(path), device="cpu")

    # googlenet's and inception_v3's FutureWarnings came from building every candidate: none of them now.
    assert [f"{w.category.__name__}: {w.message}" for w in caught] == []
    assert loaded.description == f"state_dict {path} as torchvision {name} (detected, {num_classes} classes)"
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(loaded.module(x), original(x), atol=1e-5)


def test_detection_writes_nothing_on_stderr(tmp_path: Path) -> None:
    # The symptom of the issue, in a real process where Python's default filters print FutureWarnings.
    path = tmp_path / "resnet18_10.pt"
    torch.save(torchvision.models.resnet18(weights=None, num_classes=10).state_dict(), path)
    env = {**subprocess_env(), "XDG_CACHE_HOME": str(tmp_path / "cache")}
    env.pop("PYTHONWARNINGS", None)
    code = f"from hookviz.models import load_model; print(load_model({str(path)!r}, device='cpu').description)"

    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)

    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert "as torchvision resnet18 (detected, 10 classes)" in result.stdout


def test_a_state_dict_matching_nothing_gives_the_same_error(tmp_path: Path, cold: Path) -> None:
    path = tmp_path / "unknown.pt"
    torch.save({"encoder.weight": torch.randn(4, 3, 3, 3), "decoder.bias": torch.randn(4)}, path)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(UsageError) as info:
            load_model(str(path))

    assert str(info.value) == NO_MATCH.format(path=path)
    assert [str(w.message) for w in caught] == []


# --- the on-disk cache ---------------------------------------------------------------------------


def test_signatures_are_cached_on_disk_and_read_back(cold: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert zoo.detect_torchvision_arch(_resnet18_state()) == ("resnet18", 10)
    (path,) = (cold / "hookviz").iterdir()  # one file, and no temporary file left behind
    data = json.loads(path.read_text())
    assert data["torchvision"] == torchvision.__version__ and data["torch"] == str(torch.__version__)
    assert set(data["signatures"]) == set(zoo.classification_model_names())
    assert data["signatures"]["resnet18"]["fc.weight"] == [1000, 512]

    # A new process (no signatures in memory) builds only the one candidate it confirms, not every model.
    built: list[tuple[str, int]] = []
    build = zoo._parameter_shapes

    def counting(name: str, num_classes: int = 1000) -> dict[str, tuple[int, ...]]:
        built.append((name, num_classes))
        return build(name, num_classes)

    monkeypatch.setattr(zoo, "_signatures", {})
    monkeypatch.setattr(zoo, "_parameter_shapes", counting)

    assert zoo.detect_torchvision_arch(_shapes_only_state("mobilenet_v3_small", 7)) == ("mobilenet_v3_small", 7)
    assert built == [("mobilenet_v3_small", 7)]


def test_signatures_are_built_once_per_process(monkeypatch: pytest.MonkeyPatch) -> None:
    zoo.detect_torchvision_arch(_resnet18_state())  # whatever earlier tests did, the signatures are in memory now
    monkeypatch.setattr(zoo, "_read_signature_cache", lambda path: pytest.fail("read the cache again"))
    monkeypatch.setattr(zoo, "_write_signature_cache", lambda path, signatures: pytest.fail("wrote the cache again"))

    assert zoo.detect_torchvision_arch(_resnet18_state(3)) == ("resnet18", 3)


@pytest.mark.parametrize(
    "content",
    [
        b"\x00\xff not JSON, not even UTF-8",
        b'{"format": 1, "signatures": {"resnet18": {"fc.weight": [1000,',  # cut short by a crash
        b"[1, 2, 3]",
        b'{"format": 999, "signatures": {}}',
        "header with bad entries",
    ],
    ids=["binary", "truncated", "a-list", "other-format", "bad-entries"],
)
def test_a_corrupt_cache_is_ignored_and_replaced(cold: Path, content: bytes | str) -> None:
    path = zoo._signature_cache_path()
    assert path is not None and path.is_relative_to(cold / "hookviz")
    if content == "header with bad entries":
        bad = {"resnet18": "nonsense", "alexnet": {"features.0.weight": [64, -3, "x"]}, "vgg11": [[1]]}
        content = json.dumps({**zoo._signature_cache_header(), "signatures": bad}).encode()
    path.parent.mkdir(parents=True)
    path.write_bytes(content)

    assert zoo.detect_torchvision_arch(_resnet18_state()) == ("resnet18", 10)
    assert json.loads(path.read_text())["signatures"]["resnet18"]["fc.weight"] == [1000, 512]


def test_a_stale_cache_cannot_make_detection_answer_wrongly(cold: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Same versions, other signatures (a torchvision edited in place): alexnet, the first name tried, now claims
    # resnet18's. Building the candidate once more refuses it, and resnet18 is still found.
    zoo._architecture_signatures()
    path = zoo._signature_cache_path()
    assert path is not None
    data = json.loads(path.read_text())
    data["signatures"]["alexnet"] = data["signatures"]["resnet18"]
    path.write_text(json.dumps(data))
    monkeypatch.setattr(zoo, "_signatures", {})

    assert next(iter(zoo._architecture_signatures())) == "alexnet"
    assert zoo.detect_torchvision_arch(_resnet18_state()) == ("resnet18", 10)
    assert zoo.detect_torchvision_arch(_resnet18_state(1000)) == ("resnet18", 1000)


def test_an_unwritable_cache_dir_does_not_break_detection(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("the cache dir would have to be inside this file\n")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker))  # a regular file: mkdir fails, even for root
    monkeypatch.setattr(zoo, "_signatures", {})

    assert zoo.detect_torchvision_arch(_resnet18_state()) == ("resnet18", 10)
    assert blocker.read_text() == "the cache dir would have to be inside this file\n"
    assert list(tmp_path.iterdir()) == [blocker]  # no temporary file left anywhere


def test_the_cache_dir_follows_xdg_and_the_versions(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    path = zoo._signature_cache_path()
    assert path is not None and path.parent == tmp_path / "xdg" / "hookviz"
    assert torchvision.__version__ in path.name and str(torch.__version__) in path.name

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    for unset_or_relative in ("", "relative/cache"):  # the XDG spec: a relative path is ignored
        monkeypatch.setenv("XDG_CACHE_HOME", unset_or_relative)
        path = zoo._signature_cache_path()
        assert path is not None and path.parent == tmp_path / "home" / ".cache" / "hookviz"


# --- building without init -----------------------------------------------------------------------


def test_skipping_init_is_for_this_thread_only_and_undone() -> None:
    originals = {name: getattr(init, name) for name in ("constant_", "kaiming_normal_", "trunc_normal_")}
    here, there = torch.zeros(3), torch.zeros(3)

    with zoo._skip_weight_init():
        init.constant_(here, 1.0)  # skipped: only shapes are wanted
        other = threading.Thread(target=init.constant_, args=(there, 1.0))
        other.start()
        other.join()

    assert here.tolist() == [0.0, 0.0, 0.0]
    assert there.tolist() == [1.0, 1.0, 1.0]  # a model built meanwhile in another thread is still initialised
    assert all(getattr(init, name) is function for name, function in originals.items())
