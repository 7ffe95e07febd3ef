"""Subprocess entry points (each run is a fresh process): prints one JSON object on stdout.

workers.py scorecam TOOL SIZE     Score-CAM of one image: time and peak RSS above the baseline
workers.py forward BATCH ITERS    resnet50 inference_mode forwards (for the malloc settings comparison)
workers.py pt2 PATH               import torch, load a .pt2, one forward (the floor of a one-image CLI run)
"""

from __future__ import annotations

import gc
import json
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import CLASS, SEED, proc_status  # noqa: E402  (common imports nothing heavy)


def _reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where /proc does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def scorecam(tool: str, size: int) -> dict:
    import torch
    import torchvision

    torch.manual_seed(SEED)
    model = torchvision.models.resnet18(weights=None).eval()
    torch.manual_seed(SEED + 1)
    x = torch.randn(1, 3, size, size)
    chunk = 32
    if tool == "hookviz":
        import hookviz_adapter as hv

        def run():
            return hv.cam_maps(model, x, layer="layer4", method="scorecam", classes=[CLASS], score_batch_size=chunk)
    elif tool == "torchcam":
        from torchcam.methods import ScoreCAM

        extractor = ScoreCAM(model, "layer4", batch_size=chunk, input_shape=(3, size, size))

        def run():
            with torch.inference_mode():
                model(x)
            return extractor(class_idx=CLASS)
    elif tool == "pytorch-grad-cam":
        from pytorch_grad_cam import ScoreCAM
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

        cam = ScoreCAM(model=model, target_layers=[model.layer4[-1]])
        cam.batch_size = chunk

        def run():
            return cam(input_tensor=x, targets=[ClassifierOutputTarget(CLASS)])
    else:
        raise SystemExit(f"unknown tool {tool}")
    with torch.inference_mode():  # warm the model's kernels with one plain forward (not the tool itself)
        model(x)
    gc.collect()
    before = proc_status()["VmRSS"]
    maxrss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    reset = _reset_peak()
    started = time.perf_counter()
    run()
    seconds = time.perf_counter() - started
    status = proc_status()
    peak = status["VmHWM"] if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {
        "tool": tool,
        "seconds": seconds,
        "rss_before": before,
        "peak": peak,
        "peak_delta": peak - before,
        "method": "VmHWM after resetting it via /proc/self/clear_refs" if reset else "ru_maxrss",
        "maxrss_before": maxrss_before,
    }


def forward(batch: int, iters: int) -> dict:
    import os

    if os.environ.get("BENCH_HOOKVIZ_MALLOPT"):  # what the hookviz CLI does at start (hookviz/memory.py)
        from hookviz.memory import keep_freed_memory

        assert keep_freed_memory()
    import torch
    import torchvision

    torch.manual_seed(SEED)
    model = torchvision.models.resnet50(weights=None).eval()
    x = torch.randn(batch, 3, 224, 224)
    times, faults = [], []
    with torch.inference_mode():
        model(x)  # warm-up
        for _ in range(iters):
            faults_before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            started = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - started)
            faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults_before)
    return {"times": times, "minor_faults": faults}


def pt2(path: str) -> dict:
    import torch

    program = torch.export.load(path)
    module = program.module()
    with torch.no_grad():
        module(torch.randn(1, 3, 224, 224))
    return {}


def main(argv: list[str]) -> None:
    command, *args = argv
    if command == "scorecam":
        result = scorecam(args[0], int(args[1]))
    elif command == "forward":
        result = forward(int(args[0]), int(args[1]))
    elif command == "pt2":
        result = pt2(args[0])
    else:
        raise SystemExit(__doc__)
    print(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1:])
