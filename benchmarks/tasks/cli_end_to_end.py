"""Tasks 5 and 7: whole CLI runs over folders of JPEG photos, as subprocesses.

Task 5: ``hookviz gradcam resnet50 --weights none DIR -o OUT -q --overwrite`` vs
gradcam_script_reference.py (pytorch-grad-cam) over the same folder, interleaved.
Task 7: one hookviz run over 300 photos, its VmRSS sampled every 50 ms and
matched to how many output lines (one PNG path per image) had appeared.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import hookviz_adapter as hv
from common import BENCH_DIR, PYTHON, Timed, child_env, descendants, interleaved, log, proc_status

from tasks import Context

SAMPLE_EVERY = 0.05


def stream(argv: list[str], *, sample_rss: bool = False) -> dict[str, Any]:
    """Run ``argv``; time each stdout line (from spawn); optionally sample VmRSS every 50 ms."""
    line_times: list[float] = []
    samples: list[dict[str, Any]] = []
    started = time.perf_counter()
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=child_env())
    stderr_chunks: list[str] = []

    def read_stdout() -> None:
        for _ in process.stdout:
            line_times.append(time.perf_counter() - started)

    def read_stderr() -> None:
        stderr_chunks.append(process.stderr.read())

    threads = [threading.Thread(target=read_stdout, daemon=True), threading.Thread(target=read_stderr, daemon=True)]
    for thread in threads:
        thread.start()
    while process.poll() is None:
        if sample_rss:
            main = proc_status(process.pid)
            if main:
                children = [proc_status(child).get("VmRSS", 0) for child in descendants(process.pid)]
                samples.append(
                    {
                        "t": time.perf_counter() - started,
                        "lines": len(line_times),
                        "rss": main.get("VmRSS", 0),
                        "hwm": main.get("VmHWM", 0),
                        "children_rss": sum(children),
                        "children": len(children),
                    }
                )
        time.sleep(SAMPLE_EVERY)
    wall = time.perf_counter() - started
    for thread in threads:
        thread.join()
    if process.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited {process.returncode}:\n{''.join(stderr_chunks)[-2000:]}")
    return {"wall": wall, "line_times": line_times, "samples": samples}


def throughput(result: dict[str, Any], images: int) -> dict[str, float]:
    """images/s over the whole run, time to the first output, and images/s after the first output's batch."""
    times = result["line_times"]
    first = times[0] if times else float("nan")
    first_burst = sum(1 for t in times if t <= first + 0.05)
    after = (
        (len(times) - first_burst) / (times[-1] - first)
        if len(times) > first_burst and times[-1] > first
        else float("nan")
    )
    return {
        "images_per_s": images / result["wall"],
        "first_output_s": first,
        "images_per_s_after_first": after,
        "lines": len(times),
    }


def _fresh(directory: Path) -> Path:
    shutil.rmtree(directory, ignore_errors=True)
    return directory


def _photo_folder(ctx: Context, count: int) -> Path:
    """A folder holding the first ``count`` generated photos (hard links, made once)."""
    folder = ctx.tmp / f"photos{count}"
    folder.mkdir(parents=True, exist_ok=True)
    for photo in ctx.photos[:count]:
        target = folder / photo.name
        if not target.exists():
            os.link(photo, target)
    return folder


def run_e2e(ctx: Context) -> dict[str, Any]:
    count = ctx.e2e_count
    folder = _photo_folder(ctx, count)

    def out_dir(tool: str) -> Path:
        return ctx.tmp / f"e2e_{tool}"  # the same directory every run, replaced (both tools)

    def hookviz_case() -> Timed:
        result = stream(hv.cli_gradcam("resnet50", [folder], out_dir("hookviz")))
        return Timed(result["wall"], throughput(result, count))

    def reference_case() -> Timed:
        result = stream(
            [
                PYTHON,
                str(BENCH_DIR / "gradcam_script_reference.py"),
                str(folder),
                "-o",
                str(out_dir("reference")),
                "--batch-size",
                "8",
            ]
        )
        return Timed(result["wall"], throughput(result, count))

    log(f"task 5: end-to-end Grad-CAM over {count} JPEGs, hookviz CLI vs a pytorch-grad-cam script")
    series = interleaved(
        {"hookviz CLI": hookviz_case, "pytorch-grad-cam script": reference_case},
        ctx.heavy_reps,
        warmup=0,
        label="task5",
    )
    for path in ctx.tmp.glob("e2e_*"):
        shutil.rmtree(path, ignore_errors=True)
    return {"images": count, "tools": {k: v.as_json() for k, v in series.items()}}


def _rss_at(samples: list[dict[str, Any]], lines: int) -> dict[str, Any] | None:
    for sample in samples:
        if sample["lines"] >= lines:
            return sample
    return samples[-1] if samples else None


def run_rss(ctx: Context) -> dict[str, Any]:
    count = ctx.rss_count
    early = min(50, count // 4) if ctx.quick else 50
    folder = _photo_folder(ctx, count)
    out = _fresh(ctx.tmp / "rss_out")
    log(f"task 7: hookviz gradcam over {count} JPEGs, VmRSS sampled every {SAMPLE_EVERY * 1000:.0f} ms")
    result = stream(hv.cli_gradcam("resnet50", [folder], out), sample_rss=True)
    shutil.rmtree(out, ignore_errors=True)
    samples = result["samples"]
    at_early, at_end = _rss_at(samples, early), _rss_at(samples, count)
    log(
        f"task 7: {len(samples)} samples, RSS {at_early and at_early['rss'] / 2**20:.0f} MiB after image "
        f"{at_early and at_early['lines']}, {at_end and at_end['rss'] / 2**20:.0f} MiB after image {at_end and at_end['lines']}"
    )
    return {
        "images": count,
        "early": early,
        "wall": result["wall"],
        "at_early": at_early,
        "at_end": at_end,
        "peak_hwm": max((s["hwm"] for s in samples), default=0),
        "max_children_rss": max((s["children_rss"] for s in samples), default=0),
        "max_children": max((s["children"] for s in samples), default=0),
        "lines": len(result["line_times"]),
        "samples": len(samples),
        "curve": [(round(s["t"], 2), s["lines"], s["rss"]) for s in samples[:: max(1, len(samples) // 60)]],
    }
