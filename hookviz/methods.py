"""The names of hookviz's explanation methods, importable without torch (the CLI lists them in ``--help``).

cams.py implements them; each gradient method is one weighting rule in ``cams.GRADIENT_RULES``.
"""

from __future__ import annotations

GRADIENT_METHODS = ("gradcam", "gradcam++", "xgradcam", "layercam", "hirescam")
CAM_METHODS = (*GRADIENT_METHODS, "scorecam", "eigencam", "cam")
CLASS_INDEPENDENT = ("eigencam",)  # one map per image, whatever the class
