"""An autograd reference and test batches for the CAM tests (test_cams.py and friends); the models are in nets.py.

Nothing here imports hookviz: the reference activations and gradients are computed with a
plain forward hook and ``torch.autograd.grad``, one (image, class) pair at a time, so the CAM
engine's capture hooks and batched gradients are checked against something independent.
"""

from __future__ import annotations

import torch
from torch import nn


def random_batch(batch: int, height: int = 48, width: int = 64, seed: int = 0) -> torch.Tensor:
    """Noise around a random colour per image (so that images differ in more than their noise)."""
    generator = torch.Generator().manual_seed(seed)
    colour = torch.randn(batch, 3, 1, 1, generator=generator)
    return colour + torch.randn(batch, 3, height, width, generator=generator)


def reference_activations_and_gradients(
    model: nn.Module, x: torch.Tensor, layer: nn.Module, classes: torch.Tensor, pick=lambda output: output
):
    """A (B, C, h, w), G (B, K, C, h, w) with G[b, k] = d logit[b, classes[b, k]] / d A[b], and the logits.

    Plain autograd: a forward hook keeps the layer's output, and each (image, class)
    gradient is its own ``torch.autograd.grad`` call. ``x`` is made to require grad so that
    the layer's output is part of the graph even when every parameter is frozen.
    """
    kept = {}
    handle = layer.register_forward_hook(lambda module, inputs, output: kept.__setitem__("A", output))
    try:
        with torch.enable_grad():
            logits = pick(model(x.clone().requires_grad_(True)))
            A = kept["A"]
            B, K = classes.shape
            G = torch.zeros(B, K, *A.shape[1:], dtype=A.dtype)
            for b in range(B):
                for k in range(K):
                    (g,) = torch.autograd.grad(logits[b, int(classes[b, k])], A, retain_graph=True)
                    G[b, k] = g[b]
    finally:
        handle.remove()
    return A.detach(), G, logits.detach()
