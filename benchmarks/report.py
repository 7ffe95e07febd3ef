"""RESULTS.md from the results dict; every "met"/"missed" is computed here from the numbers."""

from __future__ import annotations

import math
import statistics
from typing import Any

REFS = ("pytorch-grad-cam", "torchcam", "Captum")
TARGET_TOP5 = 1.5
TARGET_E2E = 0.7
TARGET_FLOOR = 1.15
TARGET_E2E_VS_SCRIPT = 3.0
TARGET_RSS = 0.10
IMPORT_TORCHVISION = "python -c 'import torch, torchvision'"


def fmt_s(seconds: float | None) -> str:
    if seconds is None or (isinstance(seconds, float) and math.isnan(seconds)):
        return "—"
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms" if seconds >= 0.01 else f"{seconds * 1000:.1f} ms"
    return f"{seconds:.2f} s" if seconds < 100 else f"{seconds:.0f} s"


def fmt_x(ratio: float | None) -> str:
    if ratio is None or math.isnan(ratio):
        return "—"
    return f"{ratio:.2f}x"


def mib(value: float | None) -> str:
    return "—" if value is None else f"{value / 2**20:.0f} MiB"


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0 or math.isnan(a) or math.isnan(b):
        return None
    return a / b


def med(section: dict[str, Any] | None, tool: str) -> float | None:
    if not section or "tools" not in section or tool not in section["tools"]:
        return None
    return section["tools"][tool]["median"]


def _min(section: dict[str, Any] | None, tool: str) -> float | None:
    if not section or tool not in section.get("tools", {}):
        return None
    return section["tools"][tool].get("min")


def status(ok: bool | None) -> str:
    return "—" if ok is None else ("met" if ok else "missed")


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def failed(section: Any) -> str | None:
    if section is None:
        return "not run"
    if isinstance(section, dict) and "error" in section:
        return f"failed: `{section['error']}`"
    return None


# Tasks of the features added after the first rounds: name -> (module in tasks/, section title). Each module
# renders its own table (markdown(result)) with its target met or missed.
ROUND_TASKS = {
    "smoothing": ("smoothing_speed", "Sharper maps: --aug-smooth and Ablation-CAM vs pytorch-grad-cam"),
    "attribution": ("attribution_speed", "Integrated Gradients vs Captum"),
    "metrics": ("metrics_speed", "Faithfulness metrics vs pytorch-grad-cam and torchcam"),
    "filters": ("filters_speed", "Activation maximization vs the classic per-channel loop"),
    "audit": ("audit_speed", "Audit and stats --top vs the runs they build on"),
    "detection": ("detection_speed", "Detection: Grad-CAM per box vs pytorch-grad-cam"),
    "light": ("cli_end_to_end", "A light model end to end: EfficientNet-Lite0 overlays, PNG and JPEG, vs the script"),
}


def section_round(results: dict[str, Any]) -> list[str]:
    import importlib

    out: list[str] = []
    for name, (module, title) in ROUND_TASKS.items():
        section = results.get(name)
        out += [f"## {title}", ""]
        problem = failed(section)
        if problem:
            out += [problem, ""]
            continue
        out += [importlib.import_module(f"tasks.{module}").markdown(section), ""]
    return out


def render(results: dict[str, Any]) -> str:
    meta = results["meta"]
    out: list[str] = ["# hookviz benchmarks", ""]
    out += [
        f"Written by `make bench` (`benchmarks/run.py{' --quick' if meta['quick'] else ''}`) on {meta['date']}; "
        f"the whole run took {meta['total_seconds'] / 60:.1f} min. Every case runs in one process run, interleaved "
        f"(tool A rep 1, tool B rep 1, ..., tool A rep 2, ...) after one untimed warm-up round unless noted; times are "
        f"medians of {meta['reps']} repetitions (slow cases: {meta['heavy_reps']}, Score-CAM: {meta['scorecam_reps']}). "
        "**hookviz ÷ X** is hookviz's median time divided by X's: below 1.00x hookviz is faster.",
        "",
    ]
    if meta.get("merged"):
        dates = ", ".join(f"{name} {date}" for name, date in meta["merged"].items())
        out += [
            "**Merged run (`--only ... --merge`):** the tasks were measured in separate runs on the same machine; "
            f"each section's numbers come from one run (task: date): {dates}. The machine table is the latest run's.",
            "",
        ]
    if meta["quick"]:
        out += [
            "**Quick smoke run (`--quick`): 1 repetition and smaller sizes; the numbers are not comparable "
            "with a full run.**",
            "",
        ]
    out += ["## Machine", ""]
    out += table(["", ""], [[k, str(v)] for k, v in meta["machine"].items()])
    out.append("")

    targets = compute_targets(results)
    out += ["## Targets", ""]
    out += table(
        ["target", "measured", "limit", "status"],
        [[t["name"], t["value"], t["limit"], status(t["ok"])] for t in targets],
    )
    missed = [t for t in targets if t["ok"] is False and t.get("why")]
    if missed:
        out += ["", "Why the missed targets are missed:", ""]
        out += [f"- {t['name']}: {t['why']}." for t in missed]
    out.append("")

    out += summary(results)
    out += section_gradcam(results.get("gradcam"))
    out += section_scorecam(results.get("scorecam"))
    out += section_fmaps(results.get("fmaps"))
    out += section_e2e(results.get("e2e"), results.get("gradcam"))
    out += section_startup(results.get("startup"))
    out += section_rss(results.get("rss"))
    out += section_malloc(results.get("malloc"))
    out += section_round(results)
    out += ["## Method notes", ""]
    out += [f"- {note}" for note in NOTES]
    out.append("")
    return "\n".join(out)


def compute_targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    targets = []
    gradcam = results.get("gradcam") or {}
    largest = max(((gradcam.get("task1") or {}).values()), key=lambda section: section["batch"], default=None)
    if largest:
        batch = largest["batch"]
        r = ratio(med(largest, "hookviz"), med(largest, "floor"))
        targets.append(
            {
                "name": f"1. Grad-CAM resnet50 batch {batch}, hookviz vs the inference_mode forward",
                "value": fmt_x(r),
                "limit": f"<= {TARGET_FLOOR}x",
                "ok": None if r is None else r <= TARGET_FLOOR,
                "why": "the floor's own median varies from run to run (see its min in section 1)",
            }
        )
        for tool in ("pytorch-grad-cam", "torchcam", "Captum"):
            r = ratio(med(largest, "hookviz"), med(largest, tool))
            targets.append(
                {
                    "name": f"1. Grad-CAM resnet50 batch {batch}, hookviz vs {tool}",
                    "value": fmt_x(r),
                    "limit": "< 1.00x",
                    "ok": None if r is None else r < 1.0,
                    "why": f"{tool} also backpropagates only down to the layer (autograd.grad), so the backward "
                    "work is the same; hookviz saves recording the graph below the layer, which costs little "
                    f"on a CPU. Fastest runs: hookviz {fmt_s(_min(largest, 'hookviz'))}, "
                    f"{tool} {fmt_s(_min(largest, tool))}",
                }
            )
    task2 = gradcam.get("task2")
    r = ratio(med(task2, "hookviz top-5"), med(task2, "hookviz top-1"))
    targets.append(
        {
            "name": f"2. Grad-CAM top-5 vs top-1, batch {task2['batch'] if task2 else '?'} (hookviz)",
            "value": fmt_x(r),
            "limit": f"<= {TARGET_TOP5}x",
            "ok": None if r is None else r <= TARGET_TOP5,
        }
    )
    e2e = e2e_numbers(results.get("e2e"), gradcam)
    steady = ratio(e2e.get("hookviz_after_first"), e2e.get("model_ips"))
    targets.append(
        {
            "name": "5. hookviz CLI images/s once running (after the first output) vs model-only Grad-CAM "
            "images/s (task 1, largest batch)",
            "value": fmt_x(steady),
            "limit": f">= {TARGET_E2E}x",
            "ok": None if steady is None else steady >= TARGET_E2E,
        }
    )
    startup = results.get("startup") or {}
    imports = med(startup, "python -c 'import torch, torchvision'")
    targets.append(
        {
            "name": "5. the same, whole run including start-up (imports, model build: see task 6)",
            "value": fmt_x(e2e.get("vs_model")),
            "limit": f">= {TARGET_E2E}x",
            "ok": None if e2e.get("vs_model") is None else e2e["vs_model"] >= TARGET_E2E,
            "why": (
                f"the first overlay appears after {e2e.get('hookviz_first_output') or float('nan'):.1f} s "
                f"(importing torch and torchvision alone takes {imports or float('nan'):.1f} s), while "
                f"the model needs {e2e.get('model_floor_seconds') or float('nan'):.1f} s for all "
                f"{(results.get('e2e') or {}).get('images', '?')} images: on a folder this small no tool "
                "can amortize the start-up"
            ),
        }
    )
    for label, key in (("whole run", ""), ("once running", "_after_first")):
        versus = ratio(e2e.get(f"hookviz{key}"), e2e.get(f"reference{key}"))
        targets.append(
            {
                "name": f"5. hookviz CLI images/s vs the pytorch-grad-cam script, {label}",
                "value": fmt_x(versus),
                "limit": f">= {TARGET_E2E_VS_SCRIPT}x",
                "ok": None if versus is None else versus >= TARGET_E2E_VS_SCRIPT,
                "why": "rendering and PNG-encoding the overlays runs on a thread that shares the 2 cores with "
                "torch, and both tools pay the same start-up (imports, model build)",
            }
        )
    rss = results.get("rss")
    change = None
    if rss and not failed(rss) and rss.get("at_early") and rss.get("at_end"):
        change = rss["at_end"]["rss"] / rss["at_early"]["rss"] - 1
    targets.append(
        {
            "name": f"7. RSS after image {rss.get('images', '?') if rss else '?'} vs after image "
            f"{rss.get('early', '?') if rss else '?'} (hookviz gradcam)",
            "value": "—" if change is None else f"{change:+.1%}",
            "limit": f"within ±{TARGET_RSS:.0%}",
            "ok": None if change is None else abs(change) <= TARGET_RSS,
        }
    )
    return targets


def e2e_numbers(e2e: dict[str, Any] | None, gradcam: dict[str, Any] | None) -> dict[str, Any]:
    found: dict[str, Any] = {}
    if not e2e or failed(e2e):
        return found
    images = e2e["images"]
    for tool, key in (("hookviz CLI", "hookviz"), ("pytorch-grad-cam script", "reference")):
        series = e2e["tools"].get(tool)
        if series:
            found[key] = images / series["median"]
            extras = series.get("extra") or []
            after = [
                e["images_per_s_after_first"] for e in extras if e and not math.isnan(e["images_per_s_after_first"])
            ]
            first = [e["first_output_s"] for e in extras if e]
            found[f"{key}_after_first"] = statistics.median(after) if after else None
            found[f"{key}_first_output"] = statistics.median(first) if first else None
    task1 = (gradcam or {}).get("task1") or {}
    if task1:
        largest = max(task1.values(), key=lambda s: s["batch"])
        hv = med(largest, "hookviz")
        if hv:
            found["model_batch"] = largest["batch"]
            found["model_ips"] = largest["batch"] / hv
            found["model_floor_seconds"] = images * hv / largest["batch"]
            if "hookviz" in found:
                found["vs_model"] = found["hookviz"] / found["model_ips"]
    return found


def summary(results: dict[str, Any]) -> list[str]:
    header = ["task", "hookviz", *REFS, "floor", *[f"hookviz ÷ {r}" for r in REFS], "hookviz ÷ floor"]
    rows = []

    def row(name: str, hv: float | None, refs: dict[str, float | None], floor: float | None) -> None:
        rows.append(
            [
                name,
                fmt_s(hv),
                *[fmt_s(refs.get(r)) for r in REFS],
                fmt_s(floor),
                *[fmt_x(ratio(hv, refs.get(r))) for r in REFS],
                fmt_x(ratio(hv, floor)),
            ]
        )

    gradcam = results.get("gradcam")
    if gradcam and not failed(gradcam):
        for section in gradcam["task1"].values():
            row(
                f"1. Grad-CAM resnet50, batch {section['batch']}",
                med(section, "hookviz"),
                {r: med(section, r) for r in REFS},
                med(section, "floor"),
            )
        t2 = gradcam["task2"]
        row(
            f"2. Grad-CAM top-5, batch {t2['batch']} (floor: hookviz top-1)",
            med(t2, "hookviz top-5"),
            {r: med(t2, r) for r in REFS},
            med(t2, "hookviz top-1"),
        )
    sc = results.get("scorecam")
    if sc and not failed(sc):
        row(f"3. Score-CAM resnet18, 1 image {sc['size']}px", med(sc, "hookviz"), {r: med(sc, r) for r in REFS}, None)
    fm = results.get("fmaps")
    if fm and not failed(fm):
        row(
            f"4. Feature-map PNGs, {fm['layers']} layers (floor: PNG encode)",
            med(fm, "hookviz"),
            {},
            med(fm, "floor (PNG encode)"),
        )
    e2e = results.get("e2e")
    if e2e and not failed(e2e):
        numbers = e2e_numbers(e2e, gradcam)
        row(
            f"5. CLI end-to-end, {e2e['images']} JPEGs (pytorch-grad-cam: script; floor: model-only Grad-CAM)",
            med(e2e, "hookviz CLI"),
            {"pytorch-grad-cam": med(e2e, "pytorch-grad-cam script")},
            numbers.get("model_floor_seconds"),
        )
    st = results.get("startup")
    if st and not failed(st):
        row(
            "6. `hookviz gradcam model.pt2 img.jpg` (floor: import torch + load .pt2 + forward)",
            med(st, "hookviz gradcam model.pt2 img.jpg"),
            {},
            med(st, "import torch + load .pt2 + one forward"),
        )
        row(
            "6. `hookviz layers resnet50` (floor: import torch, torchvision)",
            med(st, "hookviz layers resnet50"),
            {},
            med(st, IMPORT_TORCHVISION),
        )
    out = ["## Summary (median times)", ""]
    out += table(header, rows) if rows else ["(no results)"]
    return out + [""]


def tool_table(section: dict[str, Any], hv_name: str, floor_name: str | None = None) -> list[str]:
    hv = med(section, hv_name)
    floor = med(section, floor_name) if floor_name else None
    rows = []
    for name, series in section["tools"].items():
        rows.append(
            [
                name,
                fmt_s(series["median"]),
                fmt_s(series["min"]),
                str(len(series["seconds"])),
                fmt_x(ratio(hv, series["median"])),
                fmt_x(ratio(series["median"], floor)) if floor else "—",
            ]
        )
    return table(
        [
            "tool",
            "median",
            "min",
            "reps",
            f"{hv_name} ÷ tool",
            f"tool ÷ {floor_name}" if floor_name else "tool ÷ floor",
        ],
        rows,
    )


def section_gradcam(gradcam: dict[str, Any] | None) -> list[str]:
    out = ["## 1. Grad-CAM, resnet50, layer4, 224x224, class 243", ""]
    if failed(gradcam):
        return out + [failed(gradcam), ""]
    out += [
        "Each tool on its own copy of the same seeded model (`weights=None`, eval), same input tensor. "
        "hookviz: `compute_cams(model, x, layer='layer4', classes=[243])`; pytorch-grad-cam: "
        "`GradCAM(model, target_layers=[model.layer4[-1]])(input_tensor=x, targets=[ClassifierOutputTarget(243)] * B)`; "
        "torchcam: `GradCAM(model, 'layer4')`, `scores = model(x)`, `extractor(class_idx=243, scores=scores)`; "
        "Captum: `LayerGradCam(model, model.layer4).attribute(x, target=243)`. Floor: `model(x)` under "
        "`torch.inference_mode()`.",
        "",
    ]
    if gradcam.get("agreement"):
        out += [
            "Untimed check that all tools compute the same Grad-CAM (2 images, class 243): Pearson correlation of "
            "each reference's map with hookviz's: "
            + ", ".join(f"{k} {v:.4f}" for k, v in gradcam["agreement"].items())
            + ".",
            "",
        ]
    for section in gradcam["task1"].values():
        out += [f"Batch {section['batch']}:", ""]
        out += tool_table(section, "hookviz", "floor")
        out.append("")
    t2 = gradcam["task2"]
    out += [
        f"## 2. Grad-CAM of the top-5 classes, batch {t2['batch']}",
        "",
        "hookviz finds each image's top-5 itself (`top_k=5`: one forward, one batched backward). The references get "
        "the top-5 classes precomputed (untimed) and do them the way their APIs allow: pytorch-grad-cam 5 calls "
        "(one target list per class rank), torchcam one forward and 5 extractor calls (`retain_graph=True` but the "
        "last), Captum 5 `attribute` calls with a per-image target tensor.",
        "",
    ]
    out += tool_table(t2, "hookviz top-5", "hookviz top-1")
    return out + [""]


def section_scorecam(sc: dict[str, Any] | None) -> list[str]:
    out = ["## 3. Score-CAM, resnet18, layer4, one image: time and peak memory", ""]
    if failed(sc):
        return out + [failed(sc), ""]
    out += [
        f"One {sc['size']}x{sc['size']} image, class 243, {sc['chunk']} masked inputs per forward for every tool "
        "(hookviz `score_batch_size=32`, torchcam `ScoreCAM(model, 'layer4', batch_size=32)` after an "
        "inference_mode forward, pytorch-grad-cam `ScoreCAM(...)` with `cam.batch_size = 32`). "
        "Each run is a fresh process; no warm-up round (the model gets one plain forward first). "
        "Peak memory = VmHWM - VmRSS just before the call, with VmHWM reset via `/proc/self/clear_refs` "
        "(torch allocations are invisible to tracemalloc). Note torchcam's Score-CAM weights are a softmax over "
        "channels of score differences, hookviz's the masked input's class probability.",
        "",
    ]
    hv = med(sc, "hookviz")
    peaks = {
        name: statistics.median([e["peak_delta"] for e in s["extra"]]) if s["extra"] else None
        for name, s in sc["tools"].items()
    }
    hv_p = peaks.get("hookviz")
    rows = []
    for name, series in sc["tools"].items():
        peak = peaks[name]
        rows.append(
            [
                name,
                fmt_s(series["median"]),
                fmt_s(series["min"]),
                str(len(series["seconds"])),
                fmt_x(ratio(hv, series["median"])),
                mib(peak),
                fmt_x(ratio(hv_p, peak)),
            ]
        )
    out += table(
        [
            "tool",
            "median",
            "min",
            "reps",
            "hookviz ÷ tool (time)",
            "peak RSS above baseline (median)",
            "hookviz ÷ tool (memory)",
        ],
        rows,
    )
    return out + [""]


def section_fmaps(fm: dict[str, Any] | None) -> list[str]:
    out = ["## 4. Feature maps of every Conv2d of resnet50, one image, PNG grids", ""]
    if failed(fm):
        return out + [failed(fm), ""]
    out += [
        f"{fm['layers']} layers, {fm['grids']} grids, {fm['megapixels']:.1f} Mpixel in all. hookviz: the library path "
        "of `hookviz fmaps` for one prepared image (capturing forward, grids, atomic PNG writes with metadata). "
        f"Floor: PIL encoding of the same grids (built beforehand) at compress level {fm['compress_level']}. "
        "`forward only` is a plain inference_mode forward, for context.",
        "",
    ]
    out += tool_table(fm, "hookviz", "floor (PNG encode)")
    hv, floor, fwd = med(fm, "hookviz"), med(fm, "floor (PNG encode)"), med(fm, "forward only")
    if hv and floor and fwd:
        out += ["", f"hookviz ÷ (PNG encode + forward) = {fmt_x(ratio(hv, floor + fwd))}."]
    return out + [""]


def section_e2e(e2e: dict[str, Any] | None, gradcam: dict[str, Any] | None) -> list[str]:
    out = ["## 5. End-to-end CLI over a folder of JPEGs", ""]
    if failed(e2e):
        return out + [failed(e2e), ""]
    n = e2e_numbers(e2e, gradcam)
    out += [
        f"{e2e['images']} JPEGs of about 640x480 (crops, resizes and flips of `sample_images/`), Grad-CAM of each "
        "image's top-1 class at layer4 of resnet50 (random weights), one overlay PNG per image at the photo's size. "
        "`hookviz gradcam resnet50 --weights none DIR -o OUT -q --overwrite` vs `benchmarks/gradcam_script_reference.py` "
        "(PIL decode, resize to 224, pytorch-grad-cam GradCAM in batches of 8, show_cam_on_image, cv2.imwrite), "
        "both as subprocesses, wall time from spawn to exit, interleaved, no warm-up.",
        "",
    ]
    rows = []
    for tool, key in (("hookviz CLI", "hookviz"), ("pytorch-grad-cam script", "reference")):
        series = e2e["tools"].get(tool)
        if not series:
            continue
        rows.append(
            [
                tool,
                fmt_s(series["median"]),
                str(len(series["seconds"])),
                f"{n.get(key, float('nan')):.2f}",
                fmt_s(n.get(f"{key}_first_output")),
                "—" if n.get(f"{key}_after_first") is None else f"{n[f'{key}_after_first']:.2f}",
            ]
        )
    out += table(
        ["tool", "median wall", "reps", "images/s", "first output after", "images/s after the first output"], rows
    )
    if "model_ips" in n:
        out += [
            "",
            f"Model-only Grad-CAM (task 1, hookviz, batch {n['model_batch']}): {n['model_ips']:.2f} images/s. "
            f"hookviz CLI ÷ that: {fmt_x(n.get('vs_model'))} (target >= {TARGET_E2E}x); "
            f"pytorch-grad-cam script ÷ that: {fmt_x(ratio(n.get('reference'), n['model_ips']))}. "
            f"hookviz CLI ÷ script (images/s): {fmt_x(ratio(n.get('hookviz'), n.get('reference')))}.",
        ]
    return out + [""]


def section_startup(st: dict[str, Any] | None) -> list[str]:
    out = ["## 6. Start-up (subprocess wall time, spawn to exit)", ""]
    if failed(st):
        return out + [failed(st), ""]
    out += [
        "`model.pt2` is resnet18 (`weights=None`) from `torch.export.export` (example batch 2, dynamic batch "
        "`torch.export.Dim`) and `torch.export.save`; `img.jpg` is one of the 640x480 JPEGs. The floor for it is "
        "`python benchmarks/workers.py pt2 model.pt2`: import torch, `torch.export.load(...).module()`, one forward "
        "of a 1x3x224x224 tensor.",
        "",
    ]
    floor = med(st, "python -c 'import torch'")
    rows = [
        [
            name,
            fmt_s(series["median"]),
            fmt_s(series["min"]),
            str(len(series["seconds"])),
            fmt_x(ratio(series["median"], floor)),
        ]
        for name, series in st["tools"].items()
    ]
    out += table(["command", "median", "min", "reps", "÷ `import torch`"], rows)
    hv, ref = med(st, "hookviz gradcam model.pt2 img.jpg"), med(st, "import torch + load .pt2 + one forward")
    layers, imports = med(st, "hookviz layers resnet50"), med(st, IMPORT_TORCHVISION)
    out += [
        "",
        f"`hookviz gradcam model.pt2 img.jpg` ÷ (import torch + load .pt2 + one forward): {fmt_x(ratio(hv, ref))}; "
        f"`hookviz layers resnet50` ÷ `import torch, torchvision`: {fmt_x(ratio(layers, imports))}.",
    ]
    return out + [""]


def section_rss(rss: dict[str, Any] | None) -> list[str]:
    out = ["## 7. Memory over a long CLI run", ""]
    if failed(rss):
        return out + [failed(rss), ""]
    e, z = rss.get("at_early") or {}, rss.get("at_end") or {}
    out += [
        f"`hookviz gradcam resnet50 --weights none DIR -o OUT -q` over {rss['images']} JPEGs (about 640x480), "
        f"{rss['wall']:.1f} s; the main process's VmRSS read from `/proc/<pid>/status` every 50 ms "
        f"({rss['samples']} samples) and matched to the number of output lines (one PNG path per image) seen so far.",
        "",
    ]
    out += table(
        ["point", "output lines seen", "VmRSS (main process)", "decoding workers' RSS (sum)"],
        [
            [f"after image {rss['early']}", str(e.get("lines", "—")), mib(e.get("rss")), mib(e.get("children_rss"))],
            [f"after image {rss['images']}", str(z.get("lines", "—")), mib(z.get("rss")), mib(z.get("children_rss"))],
            ["peak (VmHWM)", "", mib(rss.get("peak_hwm")), mib(rss.get("max_children_rss"))],
        ],
    )
    if e.get("rss") and z.get("rss"):
        out += [
            "",
            f"Change from image {rss['early']} to image {rss['images']}: {z['rss'] / e['rss'] - 1:+.1%} "
            f"(target within ±{TARGET_RSS:.0%}). Up to {rss['max_children']} child process(es) seen.",
        ]
    return out + [""]


def section_malloc(ma: dict[str, Any] | None) -> list[str]:
    out = ["## glibc malloc thresholds (resnet50 forward in a subprocess)", ""]
    if failed(ma):
        return out + [failed(ma), ""]
    out += [
        f"resnet50 batch {ma['batch']}, `torch.inference_mode()` forwards, {ma['iters']} timed per process after "
        "one warm-up, processes interleaved; median over all timed forwards. Minor page faults per forward "
        "(`ru_minflt`) show whether the setting took effect.",
        "",
    ]
    names = list(ma["tools"])
    base = ma["tools"][names[0]]["median"]
    rows = [
        [
            name,
            fmt_s(s["median"]),
            fmt_s(s["min"]),
            str(len(s["all_forward_times"])),
            f"{s['minor_faults_per_forward']:,.0f}",
            fmt_x(ratio(s["median"], base)),
        ]
        for name, s in ma["tools"].items()
    ]
    out += table(
        ["malloc setting", "median forward", "min", "forwards", "minor faults / forward", f"÷ {names[0]}"], rows
    )
    out += [
        "",
        "What hookviz does with this: the CLI raises glibc's mmap and trim thresholds to 1 GiB with `mallopt` "
        "at start (`hookviz/memory.py`; the last row), unless the user set `MALLOC_*` variables; the library "
        "leaves its host program's allocator alone. Freed activations are then reused instead of being "
        "returned to the kernel and page-faulted in again by the next batch.",
    ]
    return out + [""]


NOTES = [
    "Models are torchvision's with `weights=None` after `torch.manual_seed(0)`, in eval mode; no downloads. "
    "`torch.set_num_threads` is left at its default.",
    "The benchmark process keeps freed memory (`hookviz.memory.keep_freed_memory`, as the hookviz CLI does), so that "
    "in-process cases do not page-fault activations in again depending on which tool ran before; subprocesses "
    "(Score-CAM, the reference script) run with glibc's defaults, the hookviz CLI with its own setting.",
    "In-process cases get `gc.collect()` before each timed call. Subprocess cases are timed from spawn to exit, "
    "so they include interpreter start-up and imports.",
    "The machine may be shared while the benchmark runs; the load averages at start and end are in the machine table. "
    "Medians damp, but do not remove, that noise.",
    "Each tool produces what its README shows: pytorch-grad-cam returns maps upsampled to the input size as numpy, "
    "torchcam normalized maps at layer resolution, Captum raw maps at layer resolution, hookviz raw maps at layer "
    "resolution with the class probabilities.",
]
