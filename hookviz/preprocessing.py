"""How an image becomes a model input: the ``Preprocessing`` type and its defaults.

The defaults are those of ``torchvision.transforms._presets.ImageClassification``,
kept here so that models which are not from torchvision do not pay for importing
it; tests/test_models.py checks that they still equal torchvision's.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_INPUT_SIZE = 224
# ImageNet convention: resize the shorter side to 256 before a 224 center crop.
RESIZE_TO_CROP_RATIO = 256 / 224


@dataclass(frozen=True)
class Preprocessing:
    """How an image becomes a model input.

    ``input_size`` is (height, width) of the tensor the model sees. With
    ``--crop``, the shorter side is resized to ``resize_size`` and the center
    ``input_size`` is cut out (the weights' own eval transform); without it the
    whole image is resized to ``input_size``.
    """

    input_size: tuple[int, int]
    resize_size: int
    mean: tuple[float, ...] = IMAGENET_MEAN  # one value per channel
    std: tuple[float, ...] = IMAGENET_STD
    interpolation: str = "bilinear"
    channels: int = 3  # 3: RGB; 1: grayscale (ITU-R 601 luma, as Pillow converts)

    def with_input_size(self, size: tuple[int, int]) -> Preprocessing:
        """The same preprocessing for another input size (height, width); the crop's resize follows it."""
        return replace(self, input_size=size, resize_size=round(min(size) * RESIZE_TO_CROP_RATIO))


def for_channels(preprocessing: Preprocessing, channels: int) -> Preprocessing:
    """``preprocessing`` for a model that takes ``channels`` (1 or 3) input channels.

    Grayscale models get the mean of the three ImageNet values (what those statistics are for
    a gray image) unless their normalization was set otherwise.
    """
    if channels == preprocessing.channels:
        return preprocessing
    mean, std = preprocessing.mean, preprocessing.std
    if channels == 1 and len(mean) == 3:
        mean, std = (sum(mean) / 3,), (sum(std) / 3,)
    return replace(preprocessing, channels=channels, mean=mean, std=std)


def default_preprocessing(size: tuple[int, int] = (DEFAULT_INPUT_SIZE, DEFAULT_INPUT_SIZE)) -> Preprocessing:
    """ImageNet normalization at ``size`` (height, width), with the ImageNet resize-to-crop ratio."""
    return Preprocessing(input_size=size, resize_size=0).with_input_size(size)
