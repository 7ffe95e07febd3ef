"""Small models whose right answer is known, for the targets beyond classification (test_targets.py).

Each is trained for a few seconds on synthetic pictures: noise with a coloured square somewhere. The
segmenter labels each pixel background / red square / blue square; the regressor outputs the brightness
of a grey square. A Grad-CAM of the square's class (or of the regressor's output) must then lie on the
square, wherever the square is, for any photo shape.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

SIDE = 64  # the models' input size
BACKGROUND, RED, BLUE = 0, 1, 2
COLOURS = {RED: (0.9, 0.1, 0.1), BLUE: (0.1, 0.15, 0.9)}


class SquareSegmenter(nn.Module):
    """(N, 3, H, W) -> per-pixel logits (N, 3, H, W) of background, red square, blue square."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU())
        self.down = nn.Sequential(nn.Conv2d(16, 24, 3, stride=2, padding=1), nn.ReLU())
        self.features = nn.Sequential(nn.Conv2d(24, 24, 3, padding=1), nn.ReLU())
        self.classifier = nn.Conv2d(24, 3, 1)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        logits = self.classifier(self.features(self.down(self.stem(x))))
        return {"out": F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)}


class SquareBrightness(nn.Module):
    """(N, 3, H, W) -> (N, 1): the brightness of the grey square in a dark picture."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, stride=2, padding=1), nn.ReLU()
        )
        self.head = nn.Linear(16, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.adaptive_max_pool2d(self.features(x), 1).flatten(1))


def square_pictures(count: int, generator: torch.Generator, coloured: bool = True):
    """``count`` noise pictures (count, 3, SIDE, SIDE) in [0, 1], each with one square: its class map (count, SIDE,
    SIDE) and its brightness (count,). Coloured squares are red or blue; otherwise grey, of random brightness."""
    pictures = torch.rand(count, 3, SIDE, SIDE, generator=generator) * 0.35
    labels = torch.zeros(count, SIDE, SIDE, dtype=torch.long)
    brightness = torch.rand(count, generator=generator) * 0.6 + 0.4
    for i in range(count):
        size = int(torch.randint(10, 24, (1,), generator=generator))
        x, y = (int(v) for v in torch.randint(0, SIDE - size, (2,), generator=generator))
        if coloured:
            kind = RED if bool(torch.rand(1, generator=generator) < 0.5) else BLUE
            pictures[i, :, y : y + size, x : x + size] = torch.tensor(COLOURS[kind])[:, None, None]
            labels[i, y : y + size, x : x + size] = kind
        else:
            pictures[i, :, y : y + size, x : x + size] = brightness[i]
    return pictures, labels, brightness


def _trained(model: nn.Module, seed: int, steps: int, loss_of) -> nn.Module:
    """``model`` trained with Adam for ``steps`` steps of ``loss_of(model, generator)`` on fresh pictures (seeded)."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(steps):
        loss = loss_of(model, generator)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


def _seeded(build, seed: int) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def trained_segmenter(steps: int = 80) -> nn.Module:
    """A SquareSegmenter trained on fresh synthetic pictures (seeded: the same weights every time)."""

    def loss_of(model: nn.Module, generator: torch.Generator) -> torch.Tensor:
        pictures, labels, _ = square_pictures(16, generator)
        return F.cross_entropy(model(pictures)["out"], labels)

    return _trained(_seeded(SquareSegmenter, 0), 0, steps, loss_of)


def trained_regressor(steps: int = 120) -> nn.Module:
    """A SquareBrightness trained on fresh synthetic pictures (seeded)."""

    def loss_of(model: nn.Module, generator: torch.Generator) -> torch.Tensor:
        pictures, _, brightness = square_pictures(16, generator, coloured=False)
        return F.mse_loss(model(pictures)[:, 0], brightness)

    return _trained(_seeded(SquareBrightness, 1), 1, steps, loss_of)


class MeanColour(nn.Module):
    """An embedding model with a known answer: each pixel's colour as 3 channels (``features``), averaged."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Conv2d(3, 3, 1)
        with torch.no_grad():
            self.features.weight.copy_(torch.eye(3)[:, :, None, None])
            self.features.bias.zero_()
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.features(x)).mean(dim=(2, 3))
