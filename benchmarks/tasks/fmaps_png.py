"""Task 4: feature maps of every Conv2d of resnet50 (53 layers) for one image, as PNG grids.

hookviz: the library path ``hookviz fmaps`` runs for a batch (one capturing forward
pass, 53 grids, 53 PNG files). Floor: PNG-encoding the very same grids (built
beforehand, untimed) with PIL at hookviz's compress level, to files in a temp dir.
A plain inference_mode forward of the same image is timed too, for context.
"""

from __future__ import annotations

import shutil
from typing import Any

import hookviz_adapter as hv
import torch
from common import SEED, interleaved, log

from tasks import Context


def run(ctx: Context) -> dict[str, Any]:
    torch.manual_seed(SEED)
    loaded = hv.load_torchvision("resnet50")
    prepared = hv.prepare(ctx.photos[0], loaded)
    layers = hv.conv_layers(loaded)
    grids = hv.fmap_grids(loaded, prepared, layers)
    out_hv, out_floor = ctx.tmp / "fmaps_hookviz", ctx.tmp / "fmaps_floor"
    out_floor.mkdir(parents=True, exist_ok=True)
    pixels = sum(g.width * g.height for g in grids)
    log(
        f"task 4: feature-map grids of {len(layers)} Conv2d layers of resnet50, one image "
        f"({len(grids)} grids, {pixels / 1e6:.1f} Mpixel in all)"
    )

    def hookviz_case() -> int:
        written = hv.write_fmaps(loaded, prepared, out_hv, layers)
        assert written == len(layers), (written, len(layers))
        return written

    def floor() -> None:
        for index, grid in enumerate(grids):
            grid.save(out_floor / f"grid_{index:02d}.png", format="PNG", compress_level=hv.PNG_COMPRESS_LEVEL)

    batch = prepared.tensor[None]

    def forward() -> None:
        with torch.inference_mode():
            loaded.module(batch)

    series = interleaved(
        {"hookviz": hookviz_case, "floor (PNG encode)": floor, "forward only": forward}, ctx.reps, label="task4"
    )
    shutil.rmtree(out_hv, ignore_errors=True)
    shutil.rmtree(out_floor, ignore_errors=True)
    return {
        "layers": len(layers),
        "grids": len(grids),
        "megapixels": pixels / 1e6,
        "compress_level": hv.PNG_COMPRESS_LEVEL,
        "tools": {k: v.as_json() for k, v in series.items()},
    }
