"""Turn CAMs into files: an overlay per (image, class) at the original photo's resolution."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from PIL import Image

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
        record = Record(input=str(item.path), extra={"predictions": _predictions(loaded, probabilities[b], options.predictions)})
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


def _gradient_picture(gradient: torch.Tensor, item: PreparedImage) -> Image.Image:
    """A guided gradient (3, h, w) drawn over the part of the original image the model saw; grey elsewhere."""
    from .guided import gradient_image

    pixels = gradient_image(gradient.float().cpu())
    channels, seen = [], None
    for channel in pixels:
        placed, seen = heat_in_image(channel, item.view.box, item.image.size)
        channels.append(placed)
    picture = torch.stack(channels)
    picture = torch.where(seen, picture, torch.full_like(picture, 0.5))
    return to_pil((picture * 255).round().clamp(0, 255).to(torch.uint8))


def write_guided(loaded: LoadedModel, batch: list[PreparedImage], options: CamOptions) -> list[Record]:
    """Guided backprop and guided Grad-CAM images per (image, class), at the original's resolution."""
    from .guided import compute_guided

    result = compute_guided(loaded.module, model_batch(batch, loaded), layer=options.layer, classes=options.classes,
                            top_k=options.top_k, output_key=loaded.output_key)
    probabilities = result.probabilities.float().cpu()
    records = []
    for b, item in enumerate(batch):
        record = Record(input=str(item.path), extra={"predictions": _predictions(loaded, probabilities[b], options.predictions)})
        for k, class_index in enumerate(result.classes[b].tolist()):
            label, probability = loaded.label(class_index), float(probabilities[b, class_index])
            for method, gradients in (("guided", result.guided), ("guided-gradcam", result.guided_gradcam)):
                picture = _gradient_picture(gradients[b, k], item)
                draw_caption(picture, f"{label} {probability:.1%} | {method}" + (f" @ {options.layer}" if method != "guided" else ""))
                name = f"{method}_c{class_index}" if method == "guided" else f"{method}_{safe_name(options.layer)}_c{class_index}"
                metadata = {"hookviz:method": method, "hookviz:layer": options.layer, "hookviz:class": str(class_index),
                            "hookviz:label": label, "hookviz:probability": f"{probability:.6f}", "hookviz:input": str(item.path)}
                record.outputs.append({"kind": "guided", "method": method, "layer": options.layer, "class": class_index,
                                       "label": label, "score": round(probability, 6),
                                       "png": str(write_png(picture, options.out_dir / item.stem / f"{name}.png", metadata))})
        records.append(record)
    return records


def _predictions(loaded: LoadedModel, probabilities: torch.Tensor, count: int) -> list[dict]:
    top = probabilities.topk(min(count, probabilities.shape[0]))
    return [{"class": int(c), "label": loaded.label(int(c)), "score": round(float(p), 6)} for p, c in zip(top.values, top.indices)]
