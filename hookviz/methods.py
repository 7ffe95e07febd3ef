"""The names of hookviz's explanation methods, importable without torch (the CLI lists them in ``--help``).

cams.py implements them; each gradient method is one weighting rule in ``cams.GRADIENT_RULES``.
"""

from __future__ import annotations

GRADIENT_METHODS = ("gradcam", "gradcam++", "xgradcam", "layercam", "hirescam")
CAM_METHODS = (*GRADIENT_METHODS, "scorecam", "ablationcam", "eigencam", "cam")
CLASS_INDEPENDENT = ("eigencam",)  # one map per image, whatever the class
# Pixel attribution (attribution.py): the gradient methods work for any activation function; guided (guided.py)
# needs nn.ReLU/ReLU6 modules.
ATTRIBUTION_METHODS = ("gradient", "inputxgradient", "smoothgrad", "integrated-gradients")
SALIENCY_METHODS = (*ATTRIBUTION_METHODS, "guided")
