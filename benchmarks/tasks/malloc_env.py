"""glibc malloc settings: batch-16 resnet50 inference_mode forwards in a subprocess, default vs raised thresholds.

With the defaults, glibc returns large freed blocks to the kernel (mmap'd
allocations, heap trimming), so each forward pass page-faults its activations
in again; raising MALLOC_MMAP_THRESHOLD_ and MALLOC_TRIM_THRESHOLD_ keeps them.
Minor page faults per forward show whether the setting took effect.
"""

from __future__ import annotations

import json
import statistics
from typing import Any

from common import BENCH_DIR, PYTHON, Timed, child_env, interleaved, log, run_timed

from tasks import Context

LARGE = str(4 * 2**30)  # 4 GiB
VARIANTS = {
    "default malloc": {},
    "MALLOC_MMAP_THRESHOLD_/MALLOC_TRIM_THRESHOLD_=4GiB": {
        "MALLOC_MMAP_THRESHOLD_": LARGE,
        "MALLOC_TRIM_THRESHOLD_": LARGE,
    },
    "hookviz CLI's mallopt (1 GiB thresholds)": {"BENCH_HOOKVIZ_MALLOPT": "1"},
}


def run(ctx: Context) -> dict[str, Any]:
    batch, iters = (4, 2) if ctx.quick else (16, 3)

    def case(extra: dict[str, str]):
        def run_once() -> Timed:
            _, done = run_timed(
                [PYTHON, str(BENCH_DIR / "workers.py"), "forward", str(batch), str(iters)], env=child_env(**extra)
            )
            result = json.loads(done.stdout.strip().splitlines()[-1])
            return Timed(statistics.median(result["times"]), result)

        return run_once

    log(f"malloc: resnet50 batch {batch} forwards, {iters} per process, default vs raised thresholds")
    series = interleaved(
        {name: case(extra) for name, extra in VARIANTS.items()}, ctx.heavy_reps, warmup=0, label="malloc"
    )
    out = {"batch": batch, "iters": iters, "env": VARIANTS, "tools": {}}
    for name, s in series.items():
        times = [t for e in s.extra for t in e["times"]]
        faults = [f for e in s.extra for f in e["minor_faults"]]
        out["tools"][name] = {
            **s.as_json(),
            "median": statistics.median(times),
            "min": min(times),
            "all_forward_times": times,
            "minor_faults_per_forward": statistics.median(faults),
            "extra": None,
        }
    return out
