"""Shared helpers: interleaved timing, subprocess timing, RSS readings, test photos, progress."""

from __future__ import annotations

import gc
import os
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
PYTHON = sys.executable
BIN = Path(PYTHON).parent
HOOKVIZ = str(BIN / "hookviz")
SAMPLES = REPO / "sample_images"
SEED = 0
CLASS = 243  # the class every tool explains where a fixed class is used (bull mastiff in ImageNet)


def demo_model(scratch: Path) -> Path:
    """The pretrained demo model (EfficientNet-Lite0 .pt2): make demo's copy, else exported into ``scratch``."""
    made = REPO / "out" / "efficientnet_lite0.pt2"
    if made.is_file():
        return made
    from hookviz.demo import export_efficientnet_lite0

    log("exporting the demo model (make demo does it once)")
    return export_efficientnet_lite0(scratch / "efficientnet_lite0.pt2")


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


@dataclass
class Series:
    """The repetitions of one case; ``seconds`` is the timed part only."""

    seconds: list[float] = field(default_factory=list)
    extra: list[Any] = field(default_factory=list)  # whatever the case returned, per repetition

    @property
    def median(self) -> float:
        return statistics.median(self.seconds) if self.seconds else float("nan")

    @property
    def minimum(self) -> float:
        return min(self.seconds) if self.seconds else float("nan")

    def as_json(self) -> dict[str, Any]:
        return {
            "median": self.median,
            "min": self.minimum,
            "seconds": self.seconds,
            "extra": [e for e in self.extra if e is not None] or None,
        }


class Timed:
    """A case may return Timed(seconds, extra) to report its own timed span (e.g. measured inside a subprocess)."""

    def __init__(self, seconds: float, extra: Any = None):
        self.seconds, self.extra = seconds, extra


def interleaved(
    cases: dict[str, Callable[[], Any]], reps: int, *, warmup: int = 1, label: str = ""
) -> dict[str, Series]:
    """Run every case ``warmup`` times untimed, then ``reps`` rounds of A, B, C, ... (one repetition each per round)."""
    for _ in range(warmup):
        for case in cases.values():
            case()
    results = {name: Series() for name in cases}
    for rep in range(reps):
        for name, case in cases.items():
            gc.collect()
            started = time.perf_counter()
            returned = case()
            elapsed = time.perf_counter() - started
            if isinstance(returned, Timed):
                elapsed, returned = returned.seconds, returned.extra
            results[name].seconds.append(elapsed)
            results[name].extra.append(returned)
        summary = ", ".join(f"{name} {results[name].seconds[-1]:.3f}s" for name in cases)
        log(f"{label} rep {rep + 1}/{reps}: {summary}")
    return results


def run_timed(
    argv: list[str], *, env: dict[str, str] | None = None, check: bool = True, cwd: Path | None = None
) -> tuple[float, subprocess.CompletedProcess]:
    """Wall time of a subprocess from spawn to exit, with stdout and stderr captured."""
    started = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=cwd)
    elapsed = time.perf_counter() - started
    if check and done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited {done.returncode}:\n{done.stderr[-2000:]}")
    return elapsed, done


def child_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update({"PYTHONUNBUFFERED": "1", "TQDM_DISABLE": "1"})
    env.update(extra)
    return env


def proc_status(pid: int | str = "self") -> dict[str, int]:
    """VmRSS, VmHWM, ... of a process in bytes (from /proc/<pid>/status)."""
    values = {}
    try:
        with open(f"/proc/{pid}/status") as handle:
            for line in handle:
                if line.startswith("Vm"):
                    key, value = line.split(":", 1)
                    parts = value.split()
                    if parts and parts[0].isdigit():
                        values[key] = int(parts[0]) * 1024
    except (FileNotFoundError, ProcessLookupError):
        pass
    return values


def descendants(pid: int) -> list[int]:
    """All descendant process ids of ``pid`` (e.g. hookviz's image-decoding workers)."""
    found, frontier = [], [pid]
    while frontier:
        current = frontier.pop()
        try:
            tasks = os.listdir(f"/proc/{current}/task")
        except FileNotFoundError:
            continue
        for task in tasks:
            try:
                with open(f"/proc/{current}/task/{task}/children") as handle:
                    children = [int(c) for c in handle.read().split()]
            except (FileNotFoundError, ProcessLookupError):
                continue
            found += children
            frontier += children
    return found


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def source_photos() -> list[Path]:
    photos = sorted(p for p in SAMPLES.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    if not photos:
        raise SystemExit(f"no photos in {SAMPLES}")
    return photos


def make_photos(directory: Path, count: int, seed: int = SEED) -> list[Path]:
    """``count`` JPEGs of about 640x480 (varied sizes) cut from the sample photos: random crop, resize, flip."""
    from PIL import Image, ImageOps

    rng = random.Random(seed)
    directory.mkdir(parents=True, exist_ok=True)
    originals = []
    for path in source_photos():
        with Image.open(path) as image:
            originals.append(ImageOps.exif_transpose(image).convert("RGB"))
    paths = []
    for index in range(count):
        image = originals[index % len(originals)]
        width, height = rng.randint(560, 720), rng.randint(400, 540)
        if rng.random() < 0.2:  # some portrait photos
            width, height = height, width
        scale = rng.uniform(0.6, 1.0)
        crop_w, crop_h = int(image.width * scale), int(image.height * scale)
        left, top = rng.randint(0, image.width - crop_w), rng.randint(0, image.height - crop_h)
        picture = image.crop((left, top, left + crop_w, top + crop_h)).resize((width, height), Image.BILINEAR)
        if rng.random() < 0.5:
            picture = ImageOps.mirror(picture)
        path = directory / f"photo_{index:04d}.jpg"
        picture.save(path, quality=90)
        paths.append(path)
    return paths
