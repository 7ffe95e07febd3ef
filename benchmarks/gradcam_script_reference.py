"""The end-to-end reference for task 5: what a user writes with pytorch-grad-cam to do what
``hookviz gradcam resnet50 --weights none DIR -o OUT`` does (or, with ``--model FILE.pt2 --layer NAME``,
``hookviz gradcam FILE.pt2 DIR -l NAME -o OUT``: the program loaded with torch.export.load and unflattened,
as a user must to hook one of its layers).

Decode each photo with PIL (EXIF-oriented, RGB), resize the whole image to 224x224,
normalize with ImageNet's mean/std, batch, run pytorch-grad-cam's GradCAM on
layer4[-1] for each image's top-1 class, resize the map to the photo's size,
overlay it with show_cam_on_image and write a PNG with cv2.imwrite (as the
pytorch-grad-cam README does). Prints each written path on stdout, like hookviz.

    python benchmarks/gradcam_script_reference.py DIR -o OUT [--batch-size 8] [--model FILE.pt2 --layer NAME]
"""

from __future__ import annotations

import argparse
from pathlib import Path

SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff"}
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("directory", type=Path)
    parser.add_argument("-o", "--out-dir", type=Path, default=Path("out"))
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--model", default="resnet50", help="resnet50 (random weights) or a .pt2 file")
    parser.add_argument("--layer", default="layer4", help="the target layer's module name")
    args = parser.parse_args()

    import cv2
    import numpy as np
    import torch
    import torchvision
    import torchvision.transforms.functional as TF
    from PIL import Image, ImageOps
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.image import show_cam_on_image

    torch.manual_seed(0)
    if args.model.endswith(".pt2"):
        model = torch.export.unflatten(torch.export.load(args.model))
    else:
        model = torchvision.models.resnet50(weights=None).eval()
    target_layer = dict(model.named_modules())[args.layer]
    paths = sorted(p for p in args.directory.rglob("*") if p.is_file() and p.suffix.lower() in SUFFIXES)

    if args.layer == "layer4":
        target_layer = model.layer4[-1]  # what the pytorch-grad-cam README hooks
    with GradCAM(model=model, target_layers=[target_layer]) as cam:
        for start in range(0, len(paths), args.batch_size):
            chunk = paths[start : start + args.batch_size]
            images = []
            for path in chunk:
                with Image.open(path) as opened:
                    images.append(ImageOps.exif_transpose(opened).convert("RGB"))
            batch = torch.stack(
                [TF.normalize(TF.to_tensor(image.resize((224, 224), Image.BILINEAR)), MEAN, STD) for image in images]
            )
            maps = cam(input_tensor=batch, targets=None)  # None: each image's top-1 class
            classes = cam.outputs.argmax(dim=1).tolist()
            for path, image, heat, class_index in zip(chunk, images, maps, classes, strict=True):
                rgb = np.asarray(image, dtype=np.float32) / 255
                heat = cv2.resize(heat, image.size, interpolation=cv2.INTER_LINEAR)
                picture = show_cam_on_image(rgb, heat, use_rgb=True)
                target = args.out_dir / path.stem / f"gradcam_{args.layer}_c{class_index}.png"
                target.parent.mkdir(parents=True, exist_ok=True)
                cv2.imwrite(str(target), cv2.cvtColor(picture, cv2.COLOR_RGB2BGR))
                print(target, flush=True)


if __name__ == "__main__":
    main()
