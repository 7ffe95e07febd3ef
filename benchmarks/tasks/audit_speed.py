"""The audit and `stats --top` cost about what the runs they build on cost: whole CLI runs, interleaved.

* ``hookviz audit`` of 64 labelled photos vs ``hookviz gradcam`` of the same photos, on the pretrained demo
  model (EfficientNet-Lite0 .pt2, ImageNet labels). The photos are the benchmark's JPEGs cut from the sample
  photos, each filed under the ImageNet class of the photo it was cut from, so the model gets some of them
  wrong, as on any real labelled set. ``-c predicted`` draws the same maps as gradcam: the audit's own cost
  (labels, records, audit.json, two figures) must stay within 1.1x. The default ``-c both`` also explains the
  expected class of each mistake (one more forward and backward pass for those images): reported with the
  mistake rate.
* ``hookviz stats --top 9`` vs ``hookviz stats`` on 300 photos (the same layers): within 1.3x. The peak RSS of
  ``--top`` runs on a third of the photos and on all of them shows that memory does not grow with the photos.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from common import HOOKVIZ, SAMPLES, Timed, child_env, demo_model, interleaved, log, run_timed

from tasks import Context

AUDIT_TARGET = 1.1
STATS_TARGET = 1.3
TOP = 9
# The ImageNet class of what each sample photo shows (the demo model's top-1 on the whole photo).
CLASS_OF = {
    "astronaut": "space shuttle",  # no ImageNet class for an astronaut: the photo shows one behind her
    "chelsea_cat": "Egyptian cat",
    "coffee_cup": "espresso",
    "grace_hopper": "military uniform",
    "rocket": "missile",
}
STATS_LAYERS = ["_blocks.2", "_blocks.6", "_blocks.12"]  # early, middle, late (the default is every activation)


def _sources() -> list[str]:
    """The sample photos' stems, in the order make_photos cuts from them."""
    return [p.stem for p in sorted(SAMPLES.iterdir()) if p.suffix.lower() in (".jpg", ".jpeg", ".png")]


def _folders(ctx: Context, count: int) -> tuple[Path, Path]:
    """(a flat folder of the first ``count`` photos, the same photos filed under their class names)."""
    flat, labelled = ctx.tmp / f"audit_flat{count}", ctx.tmp / f"audit_labelled{count}"
    sources = _sources()
    for index, photo in enumerate(ctx.photos[:count]):
        for target in (flat / photo.name, labelled / CLASS_OF[sources[index % len(sources)]] / photo.name):
            target.parent.mkdir(parents=True, exist_ok=True)
            if not target.exists():
                os.link(photo, target)
    return flat, labelled


def _timed(argv: list[str]) -> Timed:
    seconds, _ = run_timed(argv, env=child_env())
    return Timed(seconds)


def _peak_rss(argv: list[str]) -> int:
    """The peak resident memory of a run (its own VmHWM, read by a Python wrapper as the run ends)."""
    import subprocess
    import sys

    wrapper = (
        "import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL, "
        "stderr=subprocess.DEVNULL); print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024)"
    )
    done = subprocess.run([sys.executable, "-c", wrapper, *argv], capture_output=True, text=True, env=child_env())
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed:\n{done.stderr[-2000:]}")
    return int(done.stdout.strip().splitlines()[-1])


def run(ctx: Context) -> dict[str, Any]:
    model = str(demo_model(ctx.tmp))
    count = min(ctx.e2e_count, len(ctx.photos))
    flat, labelled = _folders(ctx, count)
    outputs = {name: ctx.tmp / f"audit_out_{name}" for name in ("gradcam", "predicted", "both")}
    common = ["--labels", "imagenet", "-q", "--overwrite"]

    def gradcam() -> Timed:
        return _timed([HOOKVIZ, "gradcam", model, str(flat), "-o", str(outputs["gradcam"]), *common])

    def audit(explain: str) -> Timed:
        return _timed([HOOKVIZ, "audit", model, str(labelled), "-c", explain, "-o", str(outputs[explain]), *common])

    log(f"audit of {count} labelled photos vs gradcam")
    series = interleaved(
        {
            "gradcam": gradcam,
            "audit -c predicted": lambda: audit("predicted"),
            "audit -c both": lambda: audit("both"),
        },
        ctx.heavy_reps,
        warmup=0 if ctx.quick else 1,
        label="audit",
    )
    summary = json.loads((outputs["both"] / "audit.json").read_text())
    results: dict[str, Any] = {
        "audit": {
            "photos": count,
            "accuracy": summary["accuracy"],
            "mistakes": len(summary["mistakes"]),
            "tools": {name: s.as_json() for name, s in series.items()},
        }
    }

    stats_count = min(ctx.rss_count, len(ctx.photos))
    stats_flat, _ = _folders(ctx, stats_count)
    layers = [part for layer in STATS_LAYERS for part in ("-l", layer)]
    stats_out = {name: ctx.tmp / f"stats_out_{name}" for name in ("plain", "top")}

    def stats(top: bool) -> Timed:
        extra = ["--top", str(TOP)] if top else []
        name = "top" if top else "plain"
        argv = [HOOKVIZ, "stats", model, str(stats_flat), *layers, "-o", str(stats_out[name]), "-q", "--overwrite"]
        return _timed(argv + extra)

    log(f"stats --top {TOP} vs stats on {stats_count} photos")
    series = interleaved(
        {"stats": lambda: stats(False), f"stats --top {TOP}": lambda: stats(True)},
        ctx.heavy_reps,
        warmup=0 if ctx.quick else 1,
        label="stats --top",
    )
    third = max(1, stats_count // 3)
    small, _ = _folders(ctx, third)
    rss = {}
    for n, folder in ((third, small), (stats_count, stats_flat)):
        out = ctx.tmp / f"stats_rss_{n}"
        shutil.rmtree(out, ignore_errors=True)
        rss[n] = _peak_rss([HOOKVIZ, "stats", model, str(folder), *layers, "--top", str(TOP), "-o", str(out), "-q"])
    results["stats_top"] = {
        "photos": stats_count,
        "layers": STATS_LAYERS,
        "top": TOP,
        "tools": {name: s.as_json() for name, s in series.items()},
        "peak_rss": {str(n): value for n, value in rss.items()},
    }
    return results


def markdown(result: dict[str, Any]) -> str:
    """Two small tables: audit vs gradcam, stats --top vs stats (times, ratios, targets), and the peak RSS."""
    audit = result["audit"]
    tools = audit["tools"]
    base = tools["gradcam"]["median"]
    lines = [
        f"### Audit of {audit['photos']} labelled photos vs gradcam (EfficientNet-Lite0 .pt2, whole CLI runs)",
        "",
        f"The model gets {audit['mistakes']} of the {audit['photos']} photos wrong (accuracy {audit['accuracy']:.0%}); "
        "`-c both` also explains the expected class of each of those.",
        "",
        "| run | median | / gradcam | target |",
        "|:---|---:|---:|:---|",
        f"| gradcam | {base:.2f} s | 1.00x | |",
    ]
    for name in ("audit -c predicted", "audit -c both"):
        ratio = tools[name]["median"] / base
        target = (
            f"{'met' if ratio <= AUDIT_TARGET else 'missed'} (<= {AUDIT_TARGET}x)"
            if name.endswith("predicted")
            else "(+ the mistakes' expected maps)"
        )
        lines.append(f"| {name} | {tools[name]['median']:.2f} s | {ratio:.2f}x | {target} |")
    top = result["stats_top"]
    plain = top["tools"]["stats"]["median"]
    with_top = top["tools"][f"stats --top {top['top']}"]["median"]
    ratio = with_top / plain
    rss = top["peak_rss"]
    counts = sorted(rss, key=int)
    lines += [
        "",
        f"### stats --top {top['top']} vs stats on {top['photos']} photos (layers {', '.join(top['layers'])})",
        "",
        "| run | median | / stats | target |",
        "|:---|---:|---:|:---|",
        f"| stats | {plain:.2f} s | 1.00x | |",
        f"| stats --top {top['top']} | {with_top:.2f} s | {ratio:.2f}x | "
        f"{'met' if ratio <= STATS_TARGET else 'missed'} (<= {STATS_TARGET}x) |",
        "",
        "Peak RSS of `stats --top`: "
        + ", ".join(f"{rss[n] / 2**20:.0f} MiB on {n} photos" for n in counts)
        + " (memory does not grow with the photos).",
    ]
    return "\n".join(lines) + "\n"
