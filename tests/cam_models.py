"""Small seeded CNNs and an autograd reference for the CAM tests (test_cams.py and friends).

Nothing here imports hookviz: the reference activations and gradients are computed with a
plain forward hook and ``torch.autograd.grad``, one (image, class) pair at a time, so the CAM
engine's capture hooks and batched gradients are checked against something independent.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn


@contextmanager
def seeded(seed: int):
    """Seed torch's CPU RNG for the block, without disturbing the global RNG state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


class SmallCNN(nn.Module):
    """conv-relu-conv-relu-GAP-linear. Each stage is its own named module, so every stage is a layer.

    On a (B, 3, 48, 64) input ``conv2``/``relu2`` give (B, channels[1], 12, 16) maps.
    ``batchnorm=True`` adds ``bn1`` (with non-trivial running statistics) after ``conv1``;
    ``inplace=True`` makes ``relu2`` overwrite ``conv2``'s output.
    """

    def __init__(self, num_classes: int = 4, channels: tuple[int, int] = (8, 6), *, seed: int = 2,
                 batchnorm: bool = False, inplace: bool = False) -> None:
        super().__init__()
        with seeded(seed):
            self.conv1 = nn.Conv2d(3, channels[0], 3, stride=2, padding=1)
            self.bn1 = nn.BatchNorm2d(channels[0]) if batchnorm else nn.Identity()
            self.relu1 = nn.ReLU()
            self.conv2 = nn.Conv2d(channels[0], channels[1], 3, stride=2, padding=1)
            self.relu2 = nn.ReLU(inplace=inplace)
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.fc = nn.Linear(channels[1], num_classes)
            self.fc.weight.data.mul_(10)  # a strong head: the prediction depends on the image, not on the bias
            if batchnorm:
                self.bn1.running_mean.uniform_(-0.3, 0.3)
                self.bn1.running_var.uniform_(0.5, 2.0)
                self.bn1.weight.data.uniform_(0.5, 1.5)
                self.bn1.bias.data.uniform_(-0.2, 0.2)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu2(self.conv2(self.relu1(self.bn1(self.conv1(x)))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.features(x)).flatten(1))


class TupleOutput(nn.Module):
    """Returns (logits, pooled features): the logits are the first tensor of a tuple."""

    def __init__(self, net: SmallCNN) -> None:
        super().__init__()
        self.net = net

    def forward(self, x):
        pooled = self.net.pool(self.net.features(x)).flatten(1)
        return self.net.fc(pooled), pooled


class DictOutput(nn.Module):
    """Returns {"pooled", "logits", "aux"}: "logits" is not the first entry, "aux" is a second head."""

    def __init__(self, net: SmallCNN, seed: int = 1) -> None:
        super().__init__()
        self.net = net
        with seeded(seed):
            self.aux = nn.Linear(net.fc.in_features, net.fc.out_features)

    def forward(self, x):
        pooled = self.net.pool(self.net.features(x)).flatten(1)
        return {"pooled": pooled, "logits": self.net.fc(pooled), "aux": self.aux(pooled)}


def random_batch(batch: int, height: int = 48, width: int = 64, seed: int = 0) -> torch.Tensor:
    """Noise around a random colour per image (so that images differ in more than their noise)."""
    generator = torch.Generator().manual_seed(seed)
    colour = torch.randn(batch, 3, 1, 1, generator=generator)
    return colour + torch.randn(batch, 3, height, width, generator=generator)


def reference_activations_and_gradients(model: nn.Module, x: torch.Tensor, layer: nn.Module,
                                        classes: torch.Tensor, pick=lambda output: output):
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
