"""hookviz side-by-side benchmark: ``make bench`` (or ``.venv/bin/python benchmarks/run.py``).

Runs every task in this one process run (subprocess cases are spawned from it),
the tools of a task interleaved over several repetitions, and writes
benchmarks/RESULTS.md (tables, machine info, targets met/missed) and
benchmarks/results.json (every timing). ``--quick`` is a smoke run: 1
repetition, smaller sizes, written to RESULTS.quick.md / results.quick.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import BENCH_DIR, REPO, log, make_photos  # noqa: E402
from report import ROUND_TASKS  # noqa: E402

TASKS = ("gradcam", "scorecam", "fmaps", "e2e", "startup", "rss", "malloc", *ROUND_TASKS)


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def git_state() -> str:
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "hookviz"], cwd=REPO, capture_output=True, text=True
        ).stdout.strip()
        return f"{commit}{' (hookviz/ has uncommitted changes)' if dirty else ''}"
    except OSError:
        return "unknown"


def machine_info() -> dict[str, str]:
    import torch

    memory = ""
    try:
        with open("/proc/meminfo") as handle:
            memory = f"{int(handle.readline().split()[1]) / 2**20:.1f} GiB"
    except OSError:
        pass
    return {
        "CPU": cpu_model(),
        "cores (os.cpu_count)": str(os.cpu_count()),
        "torch threads": str(torch.get_num_threads()),
        "memory": memory,
        "OS": platform.platform(),
        "libc": " ".join(platform.libc_ver()),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": version("torchvision"),
        "hookviz": f"{version('hookviz')} at {git_state()}",
        "grad-cam (pytorch-grad-cam)": version("grad-cam"),
        "torchcam": version("torchcam"),
        "captum": version("captum"),
        "pillow": version("pillow"),
        "load average at start": "",
        "load average at end": "",
    }


def load_average() -> str:
    try:
        return " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "unknown"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5, help="repetitions of the fast cases (default 5)")
    parser.add_argument("--heavy-reps", type=int, default=3, help="repetitions of the slow cases (default 3)")
    parser.add_argument(
        "--scorecam-reps", type=int, default=2, help="repetitions of each Score-CAM subprocess (default 2)"
    )
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 repetition, smaller sizes")
    parser.add_argument("--only", help=f"comma-separated subset of: {','.join(TASKS)}")
    parser.add_argument("--out", type=Path, help="Markdown output (default benchmarks/RESULTS.md, or RESULTS.quick.md)")
    parser.add_argument(
        "--merge",
        action="store_true",
        help="with --only: keep the other tasks' results of the last run (results.json), each marked with its run",
    )
    args = parser.parse_args()
    # In-process cases share one allocator: with glibc's defaults, whether a tool's activations must be
    # page-faulted in again depends on which tool ran before it. Keeping freed memory (as the hookviz CLI
    # does) gives every tool the same conditions; the malloc task measures the setting on its own.
    from hookviz.memory import keep_freed_memory

    keep_freed_memory()
    if args.quick:
        args.reps = args.heavy_reps = args.scorecam_reps = 1
    chosen = args.only.split(",") if args.only else list(TASKS)
    unknown = set(chosen) - set(TASKS)
    if unknown:
        parser.error(f"unknown task(s): {', '.join(sorted(unknown))}")
    suffix = ".quick" if args.quick else ""
    out_md = args.out or BENCH_DIR / f"RESULTS{suffix}.md"
    out_json = out_md.with_name(f"results{suffix}.json") if not args.out else out_md.with_suffix(".json")

    started = time.perf_counter()
    meta = {
        "quick": args.quick,
        "reps": args.reps,
        "heavy_reps": args.heavy_reps,
        "scorecam_reps": args.scorecam_reps,
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine_info(),
    }
    meta["machine"]["load average at start"] = load_average()
    results: dict = {"meta": meta}

    import importlib

    from tasks import Context, cli_end_to_end, fmaps_png, gradcam_speed, malloc_env, scorecam_memory, startup

    tmp = Path(tempfile.mkdtemp(prefix="hookviz-bench-"))
    try:
        e2e_count, rss_count = (8, 40) if args.quick else (64, 300)
        log(f"generating {rss_count} JPEGs in {tmp}")
        photos = make_photos(tmp / "photos", max(e2e_count, rss_count))
        ctx = Context(
            reps=args.reps,
            heavy_reps=args.heavy_reps,
            scorecam_reps=args.scorecam_reps,
            quick=args.quick,
            tmp=tmp,
            photos=photos,
            e2e_count=e2e_count,
            rss_count=rss_count,
        )
        runners = {
            "gradcam": gradcam_speed.run,
            "scorecam": scorecam_memory.run,
            "fmaps": fmaps_png.run,
            "e2e": cli_end_to_end.run_e2e,
            "startup": startup.run,
            "rss": cli_end_to_end.run_rss,
            "malloc": malloc_env.run,
            # Each feature's own task module: tasks/<module>.py with run(ctx) and markdown(result).
            **{name: importlib.import_module(f"tasks.{module}").run for name, (module, _) in ROUND_TASKS.items()},
        }
        for name in TASKS:
            if name not in chosen:
                continue
            task_started = time.perf_counter()
            try:
                results[name] = runners[name](ctx)
            except Exception as exc:  # one broken tool or hookviz option must not lose the other results
                traceback.print_exc()
                results[name] = {
                    "error": f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
                }
            log(f"{name}: done in {time.perf_counter() - task_started:.0f} s")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    meta["machine"]["load average at end"] = load_average()
    meta["total_seconds"] = time.perf_counter() - started
    for name in chosen:
        if isinstance(results.get(name), dict):
            results[name]["measured"] = meta["date"]
    if args.merge and out_json.exists():
        # Tasks not run now keep the last run's numbers; each task records the date of the run that measured it.
        earlier = json.loads(out_json.read_text())
        for name in TASKS:
            if name not in chosen and name in earlier:
                results[name] = earlier[name]
                results[name].setdefault("measured", earlier["meta"]["date"])
        meta["merged"] = {name: results[name]["measured"] for name in TASKS if isinstance(results.get(name), dict)}
    from report import render

    out_md.write_text(render(results))
    out_json.write_text(json.dumps(results, indent=1, default=str))
    log(f"wrote {out_md} and {out_json} in {meta['total_seconds'] / 60:.1f} min")
    return 1 if any(isinstance(results.get(t), dict) and "error" in results[t] for t in chosen) else 0


if __name__ == "__main__":
    sys.exit(main())
