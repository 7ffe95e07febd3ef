"""Every small model the tests run, in one importable module: ``nets``.

A MODEL argument names a builder here as ``nets:build_batchnet``. The ``nets`` fixture (conftest.py)
makes the module importable in the test process and in the subprocesses a test starts (the
installed ``hookviz`` script), and tests that check loading a user's own module from the current
directory copy this file there under another name (``mymod.py``).

Each builder returns a new model, seeded where the tests compare values, so no state (such as
``BatchNet.calls``) carries over from one test to the next; only the two vision transformers, too big
to build for every test, are built once and kept until ``cache_clear()``. Nothing here imports hookviz.
"""

from __future__ import annotations

import functools
import os
import time
from contextlib import contextmanager

import torch
from torch import nn


@contextmanager
def seeded(seed: int):
    """Seed torch's CPU RNG for the block, without disturbing the global RNG state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


# --- forms of MODEL: pickled module, TorchScript, .pt2, `mymod:...` (conftest.py, test_models.py, test_cli.py) ---


class TinyConvNet(nn.Module):
    def __init__(self, num_classes=5):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(8, 6, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(6, num_classes)

    def forward(self, x):
        x = self.relu(self.conv1(x))
        x = self.conv2(x)
        return self.head(self.pool(x).flatten(1))


def build_tinyconvnet():
    """Unseeded on purpose: each call is a new random init (test_models checks --state-dict restores the weights)."""
    return TinyConvNet()


class SmallConvNet(nn.Module):
    """Exported with torch.export by the ``exported_program`` fixture (the .pt2 needs no importable class)."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 3, padding=1))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(self.features(x)).flatten(1))


class WithAuxHead(nn.Module):
    # Like googlenet / inception_v3: a conv head that runs only in training mode.
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.aux = nn.Conv2d(4, 2, 1)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        features = torch.relu(self.conv(x))
        out = self.head(features.mean((2, 3)))
        return (out, self.aux(features)) if self.training else out


def build_with_aux_head():
    return WithAuxHead()


# --- the CAM engine, checked against autograd (test_cams.py, test_trace.py, cam_models.py) ------------------------


class SmallCNN(nn.Module):
    """conv-relu-conv-relu-GAP-linear. Each stage is its own named module, so every stage is a layer.

    On a (B, 3, 48, 64) input ``conv2``/``relu2`` give (B, channels[1], 12, 16) maps.
    ``batchnorm=True`` adds ``bn1`` (with non-trivial running statistics) after ``conv1``;
    ``inplace=True`` makes ``relu2`` overwrite ``conv2``'s output.
    """

    def __init__(
        self,
        num_classes: int = 4,
        channels: tuple[int, int] = (8, 6),
        *,
        seed: int = 2,
        batchnorm: bool = False,
        inplace: bool = False,
    ) -> None:
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


# --- `hookviz gradcam` checked value by value (test_gradcam_cli.py) -----------------------------------------------


class CliNet(nn.Module):
    def __init__(self, num_classes=10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(8, 12, 3, stride=2, padding=1)
        self.relu2 = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(12, num_classes)

    def forward(self, x):
        x = self.relu2(self.conv2(self.relu1(self.conv1(x))))
        return self.fc(self.pool(x).flatten(1))


def build_clinet():
    with seeded(3):
        net = CliNet()
        net.fc.weight.data.mul_(5)
    return net


# --- the heat sits on the object (test_localization.py trains it) -------------------------------------------------


class ColourNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.relu1 = nn.ReLU()
        self.pool1 = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.relu2 = nn.ReLU()
        self.pool2 = nn.MaxPool2d(2)
        self.conv3 = nn.Conv2d(16, 16, 3, padding=1)
        self.relu3 = nn.ReLU()
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, 2)

    def forward(self, x):
        x = self.pool1(self.relu1(self.conv1(x)))
        x = self.pool2(self.relu2(self.conv2(x)))
        x = self.relu3(self.conv3(x))
        return self.fc(self.gap(x).flatten(1))


def build_colournet():
    """Unseeded: the test seeds, then trains it and loads the weights with --state-dict."""
    return ColourNet()


# --- batch runs: manifest, resume, Ctrl-C, shards, progress (test_manifest.py, test_resume.py, ...) ---------------


class BatchNet(nn.Module):
    """A small seeded CNN (layers conv1, relu1, conv2, relu2, pool, fc) with two ways for a test to stop it.

    * ``interrupt_on_call = N`` (in-process): the N-th forward pass raises KeyboardInterrupt, as Ctrl-C would.
    * ``HV_BATCHNET_HANG_AFTER=N`` (environment, for a subprocess): every forward pass after the N-th hangs,
      sleeping in short steps, until the process is stopped. The run then certainly has done N forward
      passes and is still running when the test sends it SIGINT or SIGKILL, however fast or slow the machine is.
    """

    def __init__(self, num_classes=4):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.relu2 = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, num_classes)
        self.calls = 0
        self.interrupt_on_call = None

    def forward(self, x):
        self.calls += 1
        if self.calls == self.interrupt_on_call:
            raise KeyboardInterrupt
        _hang_after(self.calls)
        x = self.relu2(self.conv2(self.relu1(self.conv1(x))))
        return self.fc(self.pool(x).flatten(1))


def _hang_after(calls: int) -> None:
    after = os.environ.get("HV_BATCHNET_HANG_AFTER")
    if after is not None and calls > int(after):
        while True:
            time.sleep(0.01)  # a signal lands here: SIGINT raises KeyboardInterrupt out of the forward pass


def build_batchnet():
    with seeded(5):
        net = BatchNet()
        net.fc.weight.data.mul_(4)
    return net


# --- hostile inputs, bad arguments, output paths (test_hostile_images.py, test_errors.py, ...) --------------------


class TinyNet(nn.Module):
    # input (an Identity, so --save-raw of 'inp' is the model input) -> conv-relu -> conv-relu -> GAP -> linear
    def __init__(self, num_classes=4):
        super().__init__()
        self.inp = nn.Identity()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(4, 6, 3, stride=2, padding=1)
        self.relu2 = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(6, num_classes)

    def forward(self, x):
        x = self.relu2(self.conv2(self.relu1(self.conv1(self.inp(x)))))
        return self.fc(self.pool(x).flatten(1))


class ConvHead(nn.Module):
    # SqueezeNet-style: the classifier is a 1x1 convolution before the pooling; there is no linear layer.
    def __init__(self, num_classes=4):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.relu = nn.ReLU()
        self.classifier = nn.Conv2d(6, num_classes, 1)
        self.pool = nn.AdaptiveAvgPool2d(1)

    def forward(self, x):
        return self.pool(self.classifier(self.relu(self.conv(x)))).flatten(1)


ODD_LAYER_NEWLINE, ODD_LAYER_UNICODE = "new\nline", "\u00fcn\u00ef c\u00f6d\u00e9"


class OddNames(nn.Module):
    # Layer names with a slash, a space, non-ASCII letters and a newline: legal in PyTorch, unsafe in a path.
    def __init__(self):
        super().__init__()
        self.add_module("stem/conv", nn.Conv2d(3, 4, 3, padding=1))
        self.add_module("stem_conv", nn.Conv2d(4, 4, 3, padding=1))
        self.add_module(ODD_LAYER_UNICODE, nn.ReLU())
        self.add_module(ODD_LAYER_NEWLINE, nn.Conv2d(4, 5, 3, stride=2, padding=1))
        self.blocks = nn.Sequential(nn.Conv2d(5, 6, 3, padding=1), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        x = self._modules["stem/conv"](x)
        x = self._modules[ODD_LAYER_UNICODE](self._modules["stem_conv"](x))
        x = self.blocks(self._modules[ODD_LAYER_NEWLINE](x))
        return self.fc(self.pool(x).flatten(1))


def build_tinynet():
    with seeded(0):
        return TinyNet()


def build_conv_head():
    with seeded(0):
        return ConvHead()


def build_odd_names():
    with seeded(0):
        return OddNames()


# --- vision transformers (test_beyond_cli.py) ---------------------------------------------------------------------
# Built once and kept (vit_b_16 alone is 86M parameters); test_beyond_cli calls cache_clear() when it is done.


@functools.cache
def build_vit():
    import torchvision

    with seeded(0):
        model = torchvision.models.vit_b_16(weights=None)
        # torchvision zero-initializes the head: every gradient, and so every CAM, would be zero.
        torch.nn.init.normal_(model.heads.head.weight, std=0.02)
        return model.eval()


@functools.cache
def build_swin():
    import torchvision

    with seeded(0):
        return torchvision.models.swin_t(weights=None).eval()


# --- one and four input channels (test_channels.py) ---------------------------------------------------------------


class GrayNet(nn.Module):
    """An MNIST-style CNN: one input channel (grayscale), conv-relu-conv-relu-GAP-linear, 10 classes."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 6, 3, padding=1)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(6, 8, 3, stride=2, padding=1)
        self.relu2 = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x):
        x = self.relu2(self.conv2(self.relu1(self.conv1(x))))
        return self.fc(self.pool(x).flatten(1))


def build_graynet():
    with seeded(11):
        net = GrayNet()
        net.fc.weight.data.mul_(5)
    return net


def build_four_channel_net():
    with seeded(12):
        return GrayNet(in_channels=4)


# --- a module that runs twice (test_repeated_layers.py) --------------------------------------------------------------


class SharedActNet(nn.Module):
    """One ReLU module applied after both convolutions (as EfficientNet's shared `_swish`): `act` runs twice,
    on 8 channels at 32x32 and then on 6 channels at 16x16."""

    def __init__(self, num_classes: int = 4):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 6, 3, stride=2, padding=1)
        self.act = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(6, num_classes)

    def forward(self, x):
        x = self.act(self.conv2(self.act(self.conv1(x))))
        return self.fc(self.pool(x).flatten(1))


def build_shared_act():
    with seeded(13):
        net = SharedActNet()
        net.fc.weight.data.mul_(5)
    return net
