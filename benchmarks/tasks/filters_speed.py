"""Activation maximization of 16 channels of a middle layer of the demo model (EfficientNet-Lite0 .pt2, 224 px).

* hookviz: ``visualize_channels`` — the 16 pictures as one batch (objective summed), the forward pass stopped
  at the target layer, gradients with respect to the pictures only, batch norms folded into the convolutions
  before them, and (its default, ``precision="auto"``) bfloat16 arithmetic on a CPU that has it natively. A
  second row runs it in float32, to show what the precision contributes.
* classic: the per-channel loop of utkuozbulak/pytorch-cnn-visualizations (``cnn_layer_visualization.py``,
  written here in its style): one picture at a time, a forward hook on the layer, a full forward pass,
  ``loss = -mean(channel)``, ``loss.backward()``, Adam on the pixels (lr 0.1, weight decay 1e-6).

Both run the same number of steps per channel on the same model; the target is hookviz at least 5x faster.
The quick run takes 8 steps instead of 256 (the ratio is per step: both scale linearly with the steps).
"""

from __future__ import annotations

from typing import Any

import torch
from common import SEED, demo_model, interleaved, log

from tasks import Context

LAYER = "_blocks.6"  # the middle of EfficientNet-Lite0's 16 blocks: (N, 80, 14, 14)
CHANNELS = list(range(16))
STEPS, QUICK_STEPS = 256, 8
TARGET = 5.0


def classic_loop(model: torch.nn.Module, layer: str, channels: list[int], steps: int) -> list[float]:
    """The classic toolkit's loop: per channel, one 224 x 224 picture, a full forward pass per step."""
    module = dict(model.named_modules())[layer]
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    reached = []
    for channel in channels:
        captured: dict[str, torch.Tensor] = {}

        def hook(module: torch.nn.Module, inputs: Any, output: torch.Tensor, channel: int = channel) -> None:
            captured["output"] = output[0, channel]

        handle = module.register_forward_hook(hook)
        try:
            generator = torch.Generator().manual_seed(SEED + channel)
            start = torch.rand(1, 3, 224, 224, generator=generator) * (30 / 255) + 150 / 255  # uniform(150, 180)
            picture = ((start - mean) / std).requires_grad_(True)
            optimizer = torch.optim.Adam([picture], lr=0.1, weight_decay=1e-6)
            for _ in range(steps):
                optimizer.zero_grad()
                model(picture)
                loss = -captured["output"].mean()
                loss.backward()
                optimizer.step()
            reached.append(-float(loss.detach()))
        finally:
            handle.remove()
    return reached


def run(ctx: Context) -> dict[str, Any]:
    from hookviz.filters import Settings, visualize_channels
    from hookviz.models import load_model
    from hookviz.precision import native_cpu_bfloat16

    steps = QUICK_STEPS if ctx.quick else STEPS
    path = demo_model(ctx.tmp)
    ours = load_model(str(path))
    theirs = load_model(str(path))  # its own copy: the classic loop's backward() fills the parameters' .grad
    log(f"filters: {len(CHANNELS)} channels of {LAYER} of EfficientNet-Lite0 at 224 px, {steps} steps each")

    def hookviz_case(precision: str) -> Any:
        def run() -> dict[str, Any]:
            result = visualize_channels(
                ours.module,
                LAYER,
                CHANNELS,
                preprocessing=ours.preprocessing,
                settings=Settings(steps=steps, precision=precision),
            )
            return {"precision": result.precision, "activations": result.activations}

        return run

    def classic_case() -> list[float]:
        return classic_loop(theirs.module, LAYER, CHANNELS, steps)

    series = interleaved(
        {
            "hookviz (default precision)": hookviz_case("auto"),
            "hookviz --precision float32": hookviz_case("float32"),
            "classic (per channel, full forward)": classic_case,
        },
        ctx.heavy_reps,
        warmup=0,
        label="filters",
    )
    default = series["hookviz (default precision)"].extra
    return {
        "layer": LAYER,
        "channels": len(CHANNELS),
        "steps": steps,
        "default_precision": default[0]["precision"] if default else "?",
        "native_bfloat16": native_cpu_bfloat16(),
        "tools": {name: value.as_json() for name, value in series.items()},
    }


def markdown(result: dict[str, Any]) -> str:
    """A small table: both loops' times, seconds per step and channel, and the ratio against the target."""
    tools = result["tools"]
    theirs_name = "classic (per channel, full forward)"
    theirs = tools[theirs_name]
    per = result["channels"] * result["steps"]
    lines = [
        f"### filters: {result['channels']} channels of {result['layer']} (EfficientNet-Lite0 .pt2), "
        f"{result['steps']} steps each",
        "",
        "| run | median | per channel-step | speed-up | target |",
        "|:---|---:|---:|---:|:---|",
        f"| {theirs_name} | {theirs['median']:.1f} s | {theirs['median'] / per * 1000:.0f} ms | 1.00x | |",
    ]
    for name, ours in tools.items():
        if name == theirs_name:
            continue
        ratio = theirs["median"] / ours["median"]
        default = "default" in name
        label = f"{name}: {result.get('default_precision', '?')}" if default else name
        verdict = f"{'met' if ratio >= TARGET else 'missed'} (>= {TARGET:g}x)" if default else ""
        lines.append(
            f"| {label} | {ours['median']:.1f} s | {ours['median'] / per * 1000:.0f} ms | {ratio:.2f}x | {verdict} |"
        )
    lines += [
        "",
        "Both hookviz rows fold the batch norms into the convolutions and stop at the layer. The default precision is "
        "bfloat16 on a CPU with native bfloat16 (AVX512-BF16 or AMX), float32 elsewhere; this CPU "
        f"{'has' if result.get('native_bfloat16') else 'does not have'} it.",
    ]
    return "\n".join(lines) + "\n"
