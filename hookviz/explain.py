"""Turn CAMs into files: an overlay per (image, class) at the original photo's resolution."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from .cams import compute_cams
from .images import image_to_tensor
from .models import LoadedModel
from .output import safe_name, write_npy, write_png
from .pipeline import PreparedImage, Record, model_batch
from .render import draw_caption, heat_in_image, normalize_map, overlay, to_pil


@dataclass
class CamOptions:
    out_dir: Path
    layer: str
    method: str = "gradcam"
    classes: Sequence[int] | None = None
    top_k: int = 1
    alpha: float = 0.5
    cmap: str = "jet"
    save_raw: bool = False
    predictions: int = 5  # how many top predictions each JSON record lists
    score_batch_size: int = 32


def write_cams(loaded: LoadedModel, batch: list[PreparedImage], options: CamOptions) -> list[Record]:
    result = compute_cams(
        loaded.module, model_batch(batch, loaded), layer=options.layer, method=options.method,
        classes=options.classes, top_k=options.top_k, output_key=loaded.output_key,
        score_batch_size=options.score_batch_size,
    )
    maps = normalize_map(result.maps.float().cpu())
    probabilities = result.probabilities.float().cpu()
    records = []
    for b, item in enumerate(batch):
        top = probabilities[b].topk(min(options.predictions, probabilities.shape[1]))
        record = Record(input=str(item.path), extra={"predictions": [
            {"class": int(c), "label": loaded.label(int(c)), "score": round(float(p), 6)} for p, c in zip(top.values, top.indices)
        ]})
        original = image_to_tensor(item.image)
        for k, class_index in enumerate(result.classes[b].tolist()):
            heat, seen = heat_in_image(maps[b, k], item.view.box, item.image.size)
            label, probability = loaded.label(class_index), float(probabilities[b, class_index])
            picture = to_pil(overlay(original, heat, alpha=options.alpha, cmap=options.cmap, seen=seen))
            draw_caption(picture, f"{label} {probability:.1%} | {options.method} @ {options.layer}")
            folder = options.out_dir / item.stem
            name = f"{safe_name(options.method)}_{safe_name(options.layer)}_c{class_index}"
            metadata = {"hookviz:method": options.method, "hookviz:layer": options.layer, "hookviz:class": str(class_index),
                        "hookviz:label": label, "hookviz:probability": f"{probability:.6f}", "hookviz:input": str(item.path)}
            output = {"kind": "cam", "method": options.method, "layer": options.layer, "class": class_index,
                      "label": label, "score": round(probability, 6),
                      "png": str(write_png(picture, folder / f"{name}.png", metadata))}
            if options.save_raw:
                output["raw"] = str(write_npy(heat, folder / f"{name}.npy"))
            record.outputs.append(output)
        records.append(record)
    return records
