"""Tasks 5 and 7: whole CLI runs over folders of JPEG photos, as subprocesses.

Task 5: ``hookviz gradcam resnet50 --weights none DIR -o OUT -q --overwrite`` vs
gradcam_script_reference.py (pytorch-grad-cam) over the same folder, interleaved.
Task 7: one hookviz run over 300 photos, its VmRSS sampled every 50 ms and
matched to how many output lines (one PNG path per image) had appeared.
Task 5b (``run``/``markdown``, a round task): the EfficientNet-Lite0 demo .pt2 over 64 and 256 photos,
PNG and JPEG, against the pytorch-grad-cam script and the model-only floor, with hookviz's stage breakdown.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import hookviz_adapter as hv
from common import (
    BENCH_DIR,
    HOOKVIZ,
    PYTHON,
    Timed,
    child_env,
    demo_model,
    descendants,
    interleaved,
    log,
    median,
    proc_status,
    run_timed,
)

from tasks import Context

SAMPLE_EVERY = 0.05


def stream(argv: list[str], *, sample_rss: bool = False, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run ``argv``; time each stdout line (from spawn); optionally sample VmRSS every 50 ms. Returns the wall time,
    the line times, the samples and what the command wrote on stderr."""
    line_times: list[float] = []
    samples: list[dict[str, Any]] = []
    started = time.perf_counter()
    process = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env if env is not None else child_env()
    )
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
    return {"wall": wall, "line_times": line_times, "samples": samples, "stderr": "".join(stderr_chunks)}


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


# --- Task 5b: a light model (the EfficientNet-Lite0 demo .pt2), where the model is not the bottleneck ------------

LIGHT_LAYER = "_bn1"  # the head's last normalization (7x7): a module that runs once per forward pass in both tools
LIGHT_COUNTS, QUICK_LIGHT_COUNTS = (64, 256), (8, 16)
LIGHT_BATCH = 8  # hookviz's CPU default, and the script's batch
STAGES = ("model", "decode", "waiting_for_images", "render", "encode", "write")
_TIMING_LINE = re.compile(
    r"time: model (?P<model>[\d.]+) s, (?:decoding (?P<decode>[\d.]+) s, )?waiting for decoded images "
    r"(?P<waiting_for_images>[\d.]+) s; in the background \((?P<writers>\d+) writer threads?\): rendering "
    r"(?P<render>[\d.]+) s, encoding (?P<encode>[\d.]+) s, writing files (?P<write>[\d.]+) s"
)
# What each target compares (issue 19); measured images/s "once running" exclude the start-up (task 6).
LIGHT_TARGETS = {
    "script_256": 5.0,  # hookviz PNG ÷ the pytorch-grad-cam script, 256 photos, whole run
    "floor_256": 0.6,  # hookviz PNG once running ÷ model-only Grad-CAM, 256 photos
    "jpg_vs_png": 1.5,  # hookviz JPEG ÷ hookviz PNG images/s, 256 photos, once running
    "script_64": 2.5,  # hookviz PNG ÷ the script, 64 photos, whole run including start-up
}


def stages_of(stderr: str) -> dict[str, float]:
    """The stage times of ``hookviz ... -v``'s timing line (pipeline.Timings.as_text)."""
    found = _TIMING_LINE.search(stderr)
    if found is None:
        return {}
    return {key: float(value) for key, value in found.groupdict().items() if value is not None}


def hookviz_light_argv(model: Path, folder: Path, out: Path, *extra: str) -> list[str]:
    """``hookviz gradcam MODEL DIR -l _bn1 -o OUT --overwrite -v`` (-v: the timing line; stdout: one path per image)."""
    return [HOOKVIZ, "gradcam", str(model), str(folder), "-l", LIGHT_LAYER, "-o", str(out), "--overwrite", "-v", *extra]


def model_only_floor(model: Path, photos: list[Path], reps: int) -> dict[str, Any]:
    """Model-only Grad-CAM of the same photos in this process: decoded and preprocessed beforehand (untimed), then
    ``compute_cams`` on batches of 8 at the same layer, each image's top-1 class; images/s of the median rep."""
    import torch

    from hookviz.cams import compute_cams
    from hookviz.models import load_model
    from hookviz.pipeline import prepare_image

    loaded = load_model(str(model))
    tensors = [prepare_image(path, path.stem, loaded.preprocessing, False).tensor for path in photos]
    batches = [torch.stack(tensors[i : i + LIGHT_BATCH]) for i in range(0, len(tensors), LIGHT_BATCH)]

    def case() -> None:
        for batch in batches:
            compute_cams(loaded.module, batch, layer=LIGHT_LAYER, top_k=1)

    series = interleaved({"floor": case}, reps, warmup=1, label=f"task5b floor {len(photos)}")["floor"]
    return {**series.as_json(), "images_per_s": len(photos) / series.median}


def floor_in_subprocess(model: Path, photos: list[Path], reps: int) -> dict[str, Any]:
    """``model_only_floor`` in a fresh process with the OpenMP setting the hookviz CLI runs with
    (``OMP_WAIT_POLICY=PASSIVE``, see hookviz/cli/__init__.py), not this benchmark process's."""
    import json

    code = (
        "import json, sys; from pathlib import Path; sys.path.insert(0, sys.argv[1]); "
        "from tasks.cli_end_to_end import model_only_floor; "
        "print(json.dumps(model_only_floor(Path(sys.argv[2]), [Path(p) for p in sys.argv[4:]], int(sys.argv[3]))))"
    )
    argv = [PYTHON, "-c", code, str(BENCH_DIR), str(model), str(reps), *map(str, photos)]
    _, done = run_timed(argv, env=child_env(OMP_WAIT_POLICY="PASSIVE"))
    return json.loads(done.stdout.strip().splitlines()[-1])


def run(ctx: Context) -> dict[str, Any]:
    """Task 5b: the demo model over 64 and 256 photos, PNG and JPEG, against the pytorch-grad-cam script and the
    model-only floor, with hookviz's own stage breakdown; on 256 photos also a run with 2 writer threads."""
    model = demo_model(ctx.tmp)
    counts = QUICK_LIGHT_COUNTS if ctx.quick else LIGHT_COUNTS
    results: dict[str, Any] = {"layer": LIGHT_LAYER, "load_start": os.getloadavg(), "sizes": {}}
    for count in counts:
        folder = _photo_folder(ctx, count)

        def hookviz_case(*extra: str, env: dict[str, str] | None = None, count: int = count, folder: Path = folder):
            def case() -> Timed:
                argv = hookviz_light_argv(model, folder, ctx.tmp / "light_hookviz", *extra)
                result = stream(argv, env=env)
                return Timed(result["wall"], {**throughput(result, count), "stages": stages_of(result["stderr"])})

            return case

        def script_case(count: int = count, folder: Path = folder) -> Timed:
            argv = [
                PYTHON,
                str(BENCH_DIR / "gradcam_script_reference.py"),
                str(folder),
                "-o",
                str(ctx.tmp / "light_ref"),
            ]
            argv += ["--batch-size", str(LIGHT_BATCH), "--model", str(model), "--layer", LIGHT_LAYER]
            env = child_env()
            env.pop("OMP_WAIT_POLICY", None)  # the script runs as a user runs it
            result = stream(argv, env=env)
            return Timed(result["wall"], throughput(result, count))

        cases = {
            "hookviz PNG": hookviz_case(),
            "hookviz JPEG": hookviz_case("--format", "jpg"),
            "pytorch-grad-cam script": script_case,
        }
        if count == max(counts):  # is the default of one writer thread on this machine right?
            cases["hookviz PNG, 2 writer threads"] = hookviz_case(env=child_env(HOOKVIZ_WRITERS="2"))
        log(f"task 5b: EfficientNet-Lite0 .pt2 over {count} JPEGs: {', '.join(cases)}")
        series = interleaved(cases, ctx.heavy_reps, warmup=0, label=f"task5b {count}")
        floor = floor_in_subprocess(model, ctx.photos[:count], ctx.heavy_reps)
        results["sizes"][str(count)] = {
            "images": count,
            "tools": {name: value.as_json() for name, value in series.items()},
            "floor": floor,
        }
        for path in ctx.tmp.glob("light_*"):
            shutil.rmtree(path, ignore_errors=True)
    results["load_end"] = os.getloadavg()
    results["ratios"] = light_ratios(results)
    return results


def _median_extra(tool: dict[str, Any], key: str) -> float:
    values = [extra[key] for extra in tool.get("extra") or [] if extra.get(key) == extra.get(key)]  # not NaN
    return median(values) if values else float("nan")


def light_ratios(results: dict[str, Any]) -> dict[str, float]:
    """The target ratios from the medians: images/s over the whole run, or after the first output."""
    sizes = sorted(results["sizes"].values(), key=lambda size: size["images"])
    small, large = sizes[0], sizes[-1]

    def whole(size: dict[str, Any], tool: str) -> float:
        return size["images"] / size["tools"][tool]["median"]

    def running(size: dict[str, Any], tool: str) -> float:
        return _median_extra(size["tools"][tool], "images_per_s_after_first")

    return {
        "script_256": whole(large, "hookviz PNG") / whole(large, "pytorch-grad-cam script"),
        "script_256_running": running(large, "hookviz PNG") / running(large, "pytorch-grad-cam script"),
        "floor_256": running(large, "hookviz PNG") / large["floor"]["images_per_s"],
        "floor_256_jpeg": running(large, "hookviz JPEG") / large["floor"]["images_per_s"],
        "jpg_vs_png": running(large, "hookviz JPEG") / running(large, "hookviz PNG"),
        "jpg_vs_png_whole": whole(large, "hookviz JPEG") / whole(large, "hookviz PNG"),
        "script_64": whole(small, "hookviz PNG") / whole(small, "pytorch-grad-cam script"),
    }


def markdown(result: dict[str, Any]) -> str:
    ratios = result["ratios"]
    lines = [
        f"### EfficientNet-Lite0 (.pt2, the demo model) over folders of JPEGs: Grad-CAM overlays at `{result['layer']}`",
        "",
        "Whole CLI runs as subprocesses, interleaved, no warm-up: `hookviz gradcam efficientnet_lite0.pt2 DIR "
        f"-l {result['layer']} -o OUT --overwrite -v` (PNG, and `--format jpg`), and "
        "`gradcam_script_reference.py DIR --model efficientnet_lite0.pt2 --layer ...` (pytorch-grad-cam, cv2 PNG). "
        "Floor: model-only Grad-CAM (`compute_cams`, batches of 8) of the same photos, decoded beforehand, in a "
        "process with the CLI's `OMP_WAIT_POLICY=PASSIVE` (the script runs with OpenMP's defaults, as a user runs it). "
        f"Load average {' '.join(f'{v:.2f}' for v in result['load_start'])} at start, "
        f"{' '.join(f'{v:.2f}' for v in result['load_end'])} at end.",
        "",
        "| photos | run | median wall | images/s | first output after | images/s once running | ÷ floor (once running) |",
        "|---:|:---|---:|---:|---:|---:|---:|",
    ]
    for size in sorted(result["sizes"].values(), key=lambda s: s["images"]):
        floor = size["floor"]["images_per_s"]
        for name, tool in size["tools"].items():
            running = _median_extra(tool, "images_per_s_after_first")
            lines.append(
                f"| {size['images']} | {name} | {tool['median']:.2f} s | {size['images'] / tool['median']:.1f} | "
                f"{_median_extra(tool, 'first_output_s'):.2f} s | {running:.1f} | {running / floor:.2f}x |"
            )
        lines.append(
            f"| {size['images']} | model-only Grad-CAM (floor) | {size['floor']['median']:.2f} s | {floor:.1f} | | | 1.00x |"
        )
    lines += [
        "",
        "Where hookviz's time goes (`-v`, median over the runs, seconds; render/encode/write are summed over the writer "
        "threads and overlap the model):",
        "",
        "| photos | run | model | decode | waiting for images | render | encode | write files |",
        "|---:|:---|---:|---:|---:|---:|---:|---:|",
    ]
    for size in sorted(result["sizes"].values(), key=lambda s: s["images"]):
        for name, tool in size["tools"].items():
            stages = [extra.get("stages") or {} for extra in tool.get("extra") or [] if "stages" in extra]
            if not stages:
                continue
            cells = [median([s.get(stage, 0.0) for s in stages]) for stage in STAGES]
            lines.append(f"| {size['images']} | {name} | " + " | ".join(f"{c:.2f}" for c in cells) + " |")
    met = {key: ratios[key] >= limit for key, limit in LIGHT_TARGETS.items()}
    lines += [
        "",
        "| target (issue 19) | measured | limit | status |",
        "|:---|---:|---:|:---|",
        f"| 256 photos: hookviz ÷ pytorch-grad-cam script, images/s, whole run | {ratios['script_256']:.2f}x | "
        f">= {LIGHT_TARGETS['script_256']}x | {'met' if met['script_256'] else 'missed'} |",
        f"| 256 photos: hookviz once running ÷ model-only Grad-CAM | {ratios['floor_256']:.2f}x | "
        f">= {LIGHT_TARGETS['floor_256']}x | {'met' if met['floor_256'] else 'missed'} |",
        f"| 256 photos: `--format jpg` ÷ PNG, images/s once running | {ratios['jpg_vs_png']:.2f}x | "
        f">= {LIGHT_TARGETS['jpg_vs_png']}x | {'met' if met['jpg_vs_png'] else 'missed'} |",
        f"| 64 photos: hookviz ÷ the script, whole run including start-up | {ratios['script_64']:.2f}x | "
        f">= {LIGHT_TARGETS['script_64']}x | {'met' if met['script_64'] else 'missed'} |",
        "",
        f"Also: once running, hookviz PNG ÷ the script {ratios['script_256_running']:.2f}x; JPEG ÷ floor "
        f"{ratios['floor_256_jpeg']:.2f}x; JPEG ÷ PNG over the whole run {ratios['jpg_vs_png_whole']:.2f}x.",
        "",
        *bounds(result, met),
    ]
    return "\n".join(lines)


def bounds(result: dict[str, Any], met: dict[str, bool]) -> list[str]:
    """What bounds each missed target, from the measured stages (the numbers above, not a fixed text)."""
    large = max(result["sizes"].values(), key=lambda size: size["images"])

    def stage(tool: str, name: str) -> float:
        runs = [extra.get("stages") or {} for extra in large["tools"][tool].get("extra") or [] if "stages" in extra]
        return median([run.get(name, 0.0) for run in runs]) if runs else float("nan")

    png = large["tools"]["hookviz PNG"]
    notes = []
    if not met["script_256"] or not met["script_64"]:
        first = _median_extra(png, "first_output_s")
        notes.append(
            f"What bounds the ratios to the script: hookviz runs at {result['ratios']['floor_256']:.2f}x its model-only "
            f"floor once running, after {first:.2f} s to its first output (importing torch and loading the program); "
            "its whole run is start-up plus the model's own Grad-CAM, so a higher ratio needs a slower script, not a "
            "faster hookviz."
        )
    if not met["jpg_vs_png"]:
        notes.append(
            f"What bounds `--format jpg`: it cuts the writer's encoding from {stage('hookviz PNG', 'encode'):.2f} s to "
            f"{stage('hookviz JPEG', 'encode'):.2f} s, but the writer overlaps the model "
            f"({stage('hookviz PNG', 'model'):.2f} s), which bounds both runs on this machine's cores."
        )
    return notes
