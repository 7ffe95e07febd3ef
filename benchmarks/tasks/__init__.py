"""One module per group of benchmark tasks; each has ``run(ctx) -> dict`` (JSON-able results)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass
class Context:
    reps: int  # repetitions of the fast in-process cases
    heavy_reps: int  # repetitions of the slow cases (top-5 with references, end-to-end CLI runs)
    scorecam_reps: int  # repetitions of the Score-CAM subprocess runs (30-60 s each)
    quick: bool
    tmp: Path  # scratch directory, removed at the end
    photos: list[Path]  # the generated JPEGs for the end-to-end tasks (the first ``e2e_count`` are task 5's)
    e2e_count: int
    rss_count: int
