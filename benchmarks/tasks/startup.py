"""Task 6: start-up costs, each a fresh subprocess timed from spawn to exit.

Also (issue 19): the demo model (EfficientNet-Lite0 .pt2) on one photo against its own floor, and a state_dict
file (resnet18, weights=None) whose architecture hookviz detects, against the same run with ``--arch resnet18``.
"""

from __future__ import annotations

from typing import Any

import hookviz_adapter as hv
import torch
import torchvision
from common import BENCH_DIR, PYTHON, SEED, child_env, demo_model, interleaved, log, run_timed

from tasks import Context


def export_resnet18(path) -> None:
    """resnet18 (weights=None) as a torch.export program with a dynamic batch dimension (example batch 2)."""
    torch.manual_seed(SEED)
    model = torchvision.models.resnet18(weights=None).eval()
    batch = torch.export.Dim("batch", min=1, max=1024)
    program = torch.export.export(model, (torch.randn(2, 3, 224, 224),), dynamic_shapes={"x": {0: batch}})
    torch.export.save(program, str(path))


def save_resnet18_state_dict(path) -> None:
    """resnet18 (weights=None) as a bare state_dict file, whose architecture ``hookviz`` has to detect."""
    torch.manual_seed(SEED)
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), path)


def run(ctx: Context) -> dict[str, Any]:
    pt2 = ctx.tmp / "resnet18.pt2"
    log("task 6: exporting resnet18 to .pt2 (dynamic batch)")
    export_resnet18(pt2)
    demo = demo_model(ctx.tmp)
    state_dict = ctx.tmp / "resnet18_state_dict.pth"
    save_resnet18_state_dict(state_dict)
    image = ctx.photos[0]
    out = ctx.tmp / "startup_out"

    def gradcam_pt2() -> None:
        run_timed(hv.cli_gradcam(str(pt2), [image], out, weights_none=False), env=child_env())

    commands = {
        "hookviz --help": lambda: run_timed(hv.cli_help(), env=child_env()),
        "hookviz layers resnet50": lambda: run_timed(hv.cli_layers("resnet50"), env=child_env()),
        "python -c 'import torch'": lambda: run_timed([PYTHON, "-c", "import torch"], env=child_env()),
        "python -c 'import torch, torchvision'": lambda: run_timed(
            [PYTHON, "-c", "import torch, torchvision"], env=child_env()
        ),
        "hookviz gradcam model.pt2 img.jpg": gradcam_pt2,
        "import torch + load .pt2 + one forward": lambda: run_timed(
            [PYTHON, str(BENCH_DIR / "workers.py"), "pt2", str(pt2)], env=child_env()
        ),
        "hookviz gradcam efficientnet_lite0.pt2 img.jpg": lambda: run_timed(
            hv.cli_gradcam(str(demo), [image], out, weights_none=False), env=child_env()
        ),
        "import torch + load efficientnet_lite0.pt2 + one forward": lambda: run_timed(
            [PYTHON, str(BENCH_DIR / "workers.py"), "pt2", str(demo)], env=child_env()
        ),
        "hookviz gradcam resnet18_state_dict.pth img.jpg (detected)": lambda: run_timed(
            hv.cli_gradcam(str(state_dict), [image], out, weights_none=False), env=child_env()
        ),
        "hookviz gradcam resnet18_state_dict.pth img.jpg --arch resnet18": lambda: run_timed(
            hv.cli_gradcam(str(state_dict), [image], out, "--arch", "resnet18", weights_none=False), env=child_env()
        ),
    }
    log("task 6: start-up times (subprocess wall time)")
    series = interleaved(commands, ctx.heavy_reps, warmup=1, label="task6")
    return {"tools": {k: v.as_json() for k, v in series.items()}}
