"""Task 3: Score-CAM of one image (resnet18, layer4): time and peak memory, one fresh subprocess per tool run.

Peak memory: torch's allocations are invisible to tracemalloc, so each run is a
fresh process (workers.py scorecam) that builds the model, warms it with one
plain forward, records VmRSS, resets the kernel's peak counter (VmHWM, by writing
5 to /proc/self/clear_refs), runs the tool once, and reports VmHWM - VmRSS before:
the extra resident memory the Score-CAM call needed at its peak.
"""

from __future__ import annotations

import json
from typing import Any

from common import BENCH_DIR, PYTHON, Timed, child_env, interleaved, log, run_timed

from tasks import Context

TOOLS = ("hookviz", "torchcam", "pytorch-grad-cam")
CHUNK = 32  # masked inputs per forward pass, the same for every tool


def run(ctx: Context) -> dict[str, Any]:
    size = 112 if ctx.quick else 224

    def case(tool: str):
        def run_once() -> Timed:
            _, done = run_timed([PYTHON, str(BENCH_DIR / "workers.py"), "scorecam", tool, str(size)], env=child_env())
            result = json.loads(done.stdout.strip().splitlines()[-1])
            return Timed(result["seconds"], result)

        return run_once

    log(
        f"task 3: Score-CAM resnet18 layer4, one {size}x{size} image, a fresh process per run "
        f"(about 30-60 s per run at 224)"
    )
    series = interleaved({tool: case(tool) for tool in TOOLS}, ctx.scorecam_reps, warmup=0, label="task3")
    return {"size": size, "chunk": CHUNK, "tools": {k: v.as_json() for k, v in series.items()}}
