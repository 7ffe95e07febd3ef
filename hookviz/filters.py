"""What a filter responds to: activation maximization, class visualization and deep dream.

    result = visualize_channels(model, "_blocks.12", [0, 5, 7])
    result.images  # (3, 3, H, W) in [0, 1]: the picture each channel likes best

Gradient ascent on raw pixels gives grey high-frequency noise. As lucid/lucent do,
each picture is instead parameterized by its Fourier coefficients, scaled by 1/frequency
(so coarse structure is as easy to change as fine), in a decorrelated colour space
(so colours move together as in natural images), and squashed into [0, 1] RGB by a
sigmoid. At every step the model sees the picture randomly shifted, scaled and rotated
(transformation robustness): only features that survive those survive the ascent.

Every requested channel is optimized at once, as one batch (image i for channel i,
the objective summed); the forward pass stops at the target layer, since the rest of
the network plays no part. The model's own normalization is applied, so pictures live
in [0, 1] RGB. The model is never changed: hooks live for one call, modes and
``.grad`` are restored, and gradients are taken with ``torch.autograd.grad`` with
respect to the picture only.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from .errors import UsageError
from .folding import folded_batch_norms
from .forward import first_tensor, run_model, select_logits
from .hooks import hook_handles, layer_call, preserved_state, resolve_layers
from .precision import Scratch, ascent_dtype, dtype_name, lower_precision
from .preprocessing import Preprocessing, default_preprocessing
from .render import draw_labels, to_pil
from .spatial import spatial_layout, to_spatial

# Square roots of the covariance of ImageNet colours (lucid's ``color_correlation_svd_sqrt``): a picture's
# three parameter planes are mixed by this matrix, so one parameter moves a natural colour, not one primary.
_COLOUR_CORRELATION = torch.tensor([[0.26, 0.09, 0.02], [0.27, 0.00, -0.05], [0.27, -0.09, 0.03]])
COLOUR_MIXING = _COLOUR_CORRELATION / _COLOUR_CORRELATION.norm(dim=0).max()
SPECTRUM_SCALE = 4.0  # lucid's constant dividing the inverse FFT: a larger one gives less saturated pictures
INITIAL_SD = 0.01  # standard deviation of the random initial spectrum: the first picture is a grey with faint noise
DEFAULT_CHANNELS = 16  # channels drawn when none are named
TILE_GAP = 2


@dataclass(frozen=True)
class Settings:
    """How a picture is optimized.

    ``steps`` gradient-ascent steps of Adam at learning rate ``lr`` on the picture's Fourier
    coefficients, whose amplitude falls with frequency as 1/f**``decay_power``. Before each
    step the model sees the picture shifted by up to ``jitter`` pixels, scaled by a factor in
    [1 - ``scale``, 1 + ``scale``], rotated by up to ``rotate`` degrees, inside a grey border of
    ``pad`` pixels. ``batch_size`` pictures are optimized at once (memory grows with it).
    ``seed`` fixes the initial pictures and the transformations: the same seed gives the same pictures.
    ``precision`` of the model's arithmetic during the ascent (``precision.PRECISIONS``): ``"auto"`` is bfloat16 on a
    CPU with native bfloat16 instructions and float32 elsewhere. The final pictures' activations are always
    measured in float32.
    """

    steps: int = 64
    lr: float = 0.05
    decay_power: float = 1.25
    jitter: int = 16
    scale: float = 0.1
    rotate: float = 10.0
    pad: int = 16
    batch_size: int = 16
    seed: int = 0
    precision: str = "auto"


@dataclass
class Visualization:
    """Pictures that maximize some unit of a model, one per target.

    ``images`` (N, 3, H, W) in [0, 1]; ``targets`` the channel (or class) index of each;
    ``activations`` the objective each picture reaches as it is (no transformation): a
    channel's mean activation (or its value at the centre with ``neuron``), or a class logit;
    ``probabilities`` (class visualization only) the softmax probability of the class.
    """

    images: torch.Tensor
    targets: list[int]
    activations: list[float]
    steps: int
    layer: str | None = None
    channel_count: int | None = None  # channels of the layer (filters) or classes of the model
    probabilities: list[float] = field(default_factory=list)
    precision: str = "float32"  # the arithmetic of the ascent: "float32" or "bfloat16" (``ascent_dtype``)


class _LayerReached(Exception):
    """Raised by the forward hook once the target layer's output is captured: nothing above it needs to run."""


# --- the picture: Fourier coefficients in a decorrelated colour space -------------------------------------------------


def _frequencies(height: int, width: int) -> torch.Tensor:
    """|f| of each coefficient of a real 2-D FFT of a (height, width) picture, in cycles per pixel."""
    fy = torch.fft.fftfreq(height)[:, None]
    fx = torch.fft.rfftfreq(width)[None, :]
    return (fx * fx + fy * fy).sqrt()


class FourierPicture:
    """A batch of RGB pictures parameterized as scaled Fourier coefficients in a decorrelated colour space.

    ``parameter`` (N, 3, H, W//2+1, 2) is what the optimizer changes; ``pictures()`` is the
    differentiable map to (N, 3, H, W) pictures in [0, 1]. ``generators``: one random stream per picture
    for its initial values (default: torch's global one).
    """

    def __init__(
        self,
        count: int,
        size: tuple[int, int],
        *,
        decay_power: float = 1.0,
        generators: Sequence[torch.Generator] | None = None,
        device: torch.device | None = None,
    ) -> None:
        height, width = size
        self.size = size
        frequencies = _frequencies(height, width)
        shape = (count, 3, *frequencies.shape, 2)
        if generators is None:
            start = torch.randn(shape)
        else:  # one stream per picture: a picture does not depend on which others share its batch
            start = torch.stack([torch.randn(shape[1:], generator=generator) for generator in generators])
        self.parameter = (start * INITIAL_SD).to(device).requires_grad_(True)
        amplitude = 1.0 / frequencies.clamp(min=1.0 / max(height, width)) ** decay_power
        self.amplitude = amplitude[None, None, :, :, None].to(device)
        self.mixing = COLOUR_MIXING.to(device)

    def pictures(self) -> torch.Tensor:
        """The pictures (N, 3, H, W) in [0, 1]; differentiable with respect to ``parameter``."""
        spectrum = torch.view_as_complex((self.parameter * self.amplitude).contiguous())
        planes = torch.fft.irfftn(spectrum, s=self.size, norm="ortho") / SPECTRUM_SCALE
        # The mixing as one broadcast matrix product over the flattened planes (einsum picks a far slower batched one).
        colours = (self.mixing @ planes.flatten(2)).view_as(planes)
        return torch.sigmoid(colours)


# --- transformation robustness ----------------------------------------------------------------------------------------


def random_views(
    pictures: torch.Tensor, settings: Settings, generators: Sequence[torch.Generator] | None = None
) -> torch.Tensor:
    """``pictures`` (N, 3, H, W) each seen through its own random shift, scale and rotation, on a grey background.

    One affine resampling per picture (not a chain of pads, crops and resizes): a point of the
    view at pixel offset ``p`` from the centre shows the picture at ``R(p) / s + t``, where ``s`` is
    the scale (times the zoom-out that leaves a grey border of ``settings.pad`` pixels), ``R`` the
    rotation and ``t`` the shift.
    """
    count, _, height, width = pictures.shape
    device = pictures.device

    streams = list(generators) if generators is not None else [None] * count
    # Four numbers per picture, each from the picture's own stream: (scale, angle, shift x, shift y) in [0, 1).
    draws = torch.stack([torch.rand(4, generator=stream) for stream in streams])
    zoom = min(height, width) / (min(height, width) + 2 * settings.pad)
    scales = (1 + settings.scale * (2 * draws[:, 0] - 1)) * zoom
    angles = settings.rotate * (2 * draws[:, 1] - 1) * math.pi / 180
    # Whole pixels, uniform over -jitter ... jitter.
    shift_x = (draws[:, 2] * (2 * settings.jitter + 1)).floor() - settings.jitter
    shift_y = (draws[:, 3] * (2 * settings.jitter + 1)).floor() - settings.jitter
    cos, sin = angles.cos() / scales, angles.sin() / scales
    # In pixels: [x, y] of the picture = [[cos, -sin], [sin, cos]] @ [x, y] of the view + shift. affine_grid works in
    # coordinates normalized to [-1, 1] per side, so the matrix is conjugated by the half-sizes.
    half_w, half_h = width / 2, height / 2
    theta = torch.stack(
        [
            torch.stack([cos, -sin * half_h / half_w, shift_x / half_w], dim=1),
            torch.stack([sin * half_w / half_h, cos, shift_y / half_h], dim=1),
        ],
        dim=1,
    ).to(device)
    # F.affine_grid's grid (align_corners=False), built by broadcasting: its batched matrix product is several
    # times slower on a CPU for these shapes.
    xs = ((torch.arange(width, device=device) * 2 + 1) / width - 1)[None, None, :]
    ys = ((torch.arange(height, device=device) * 2 + 1) / height - 1)[None, :, None]
    rows = [theta[:, row, :, None, None] for row in range(2)]
    grid = torch.stack([row[:, 0] * xs + row[:, 1] * ys + row[:, 2] for row in rows], dim=-1)
    # Sampling (picture - 0.5) with zero padding puts the picture on a 0.5 grey background.
    return F.grid_sample(pictures - 0.5, grid, mode="bilinear", padding_mode="zeros", align_corners=False) + 0.5


# --- running the model up to a layer ------------------------------------------------------------------------------------


def normalized(pictures: torch.Tensor, preprocessing: Preprocessing) -> torch.Tensor:
    """RGB ``pictures`` (N, 3, H, W) in [0, 1] as the model's input: grey (ITU-R 601 luma) for a one-channel model,
    then normalized with the model's mean and std."""
    if preprocessing.channels == 1:
        luma = torch.tensor([0.299, 0.587, 0.114], device=pictures.device).view(1, 3, 1, 1)
        pictures = (pictures * luma).sum(dim=1, keepdim=True)
    mean = torch.tensor(preprocessing.mean, device=pictures.device).view(1, -1, 1, 1)
    std = torch.tensor(preprocessing.std, device=pictures.device).view(1, -1, 1, 1)
    return (pictures - mean) / std


def channel_view(output: torch.Tensor, input_size: tuple[int, int], layer: str = "") -> torch.Tensor:
    """A layer's output as (N, C, h, w): CNN maps as they are, channels-last maps permuted, the tokens of a vision
    transformer as a grid (C = the last dim), other token sequences as (N, C, T, 1) and vectors as (N, C, 1, 1)."""
    layout = spatial_layout(output.shape, input_size) if output.dim() in (3, 4) else None
    if layout is not None:
        return to_spatial(output, layout)
    if output.dim() == 4:
        return output
    if output.dim() == 3:
        return output.transpose(1, 2)[..., None]
    if output.dim() == 2:
        return output[:, :, None, None]
    raise UsageError(
        f"layer {layer!r} has output shape {tuple(output.shape)}, which has no channels to visualize; "
        "choose another with -l"
    )


def layer_output(
    model: nn.Module, batch: torch.Tensor, layer: str, *, fixed_batch: int | None = None, call: int | None = None
) -> torch.Tensor:
    """The output of ``layer`` (``name#N`` for its N-th call) on ``batch``, running the model only up to that layer.

    Differentiable with respect to ``batch`` when grad is enabled. ``call``: which call of a plain
    name is its last (``layer_calls``); the forward pass stops there (without it, it runs to the end
    to see which call is the last). A model that takes exactly ``fixed_batch`` inputs (a .pt2
    exported with a fixed batch size) is run in padded chunks. A UsageError if the layer does not run.
    """
    if fixed_batch is not None and batch.shape[0] != fixed_batch:
        outputs = []
        for start in range(0, batch.shape[0], fixed_batch):
            chunk = batch[start : start + fixed_batch]
            padding = fixed_batch - chunk.shape[0]
            if padding:
                chunk = torch.cat([chunk, chunk[-1:].expand(padding, *chunk.shape[1:])])
            outputs.append(layer_output(model, chunk, layer, call=call)[: fixed_batch - padding])
        return torch.cat(outputs)
    return _run_to_layer(model, batch, layer, call)[0]


def _run_to_layer(model: nn.Module, batch: torch.Tensor, layer: str, call: int | None) -> tuple[torch.Tensor, int]:
    """``layer``'s output on ``batch`` and how many times its module ran (up to the call captured)."""
    module = resolve_layers(model, [layer])[layer]
    picked = layer_call(layer, {name for name, _ in model.named_modules()})[1] or call
    captured: list[torch.Tensor] = []
    calls = 0

    def hook(module: nn.Module, inputs: Any, output: Any) -> None:
        nonlocal calls
        tensor = first_tensor(output)
        if tensor is None:
            return
        calls += 1
        if picked is None or calls == picked:
            captured.append(tensor)
            if picked is not None:
                raise _LayerReached

    with hook_handles() as handles:
        handles.append(module.register_forward_hook(hook))
        try:
            run_model(model, batch)
        except _LayerReached:
            pass
    if not captured:
        if calls:
            base = layer.rpartition("#")[0]
            raise UsageError(
                f"layer {layer!r}: the module runs {calls} time(s) per forward pass; pick {base}#1 ... {base}#{calls}"
            )
        raise UsageError(f"layer {layer!r} did not run in the forward pass; choose another with -l")
    return captured[-1], calls


def _model_device(model: nn.Module) -> torch.device:
    for parameter in model.parameters():
        return parameter.device
    for buffer in model.buffers():
        return buffer.device
    return torch.device("cpu")


def channel_scores(output: torch.Tensor, channels: torch.Tensor, neuron: bool = False) -> torch.Tensor:
    """For (N, C, h, w) ``output``, the activation of channel ``channels[i]`` in picture i: its mean over the map,
    or with ``neuron`` its value at the map's centre. Shape (N,)."""
    picked = output[torch.arange(output.shape[0], device=output.device), channels.to(output.device)].float()
    if neuron:
        return picked[:, picked.shape[1] // 2, picked.shape[2] // 2]
    return picked.flatten(1).mean(dim=1)


# --- optimization ---------------------------------------------------------------------------------------------------------


Objective = Callable[[torch.Tensor, slice], torch.Tensor]  # (normalized batch, its targets' slice) -> one score each

# Pixels per forward pass on a CPU: eight 224 x 224 pictures. A CPU runs a convolutional network fastest on a few
# pictures at a time, whose activations stay in its caches, in channels-last memory order. Measured on
# EfficientNet-Lite0 up to _blocks.6 (2 cores, forward + backward per picture): batch 16 channels-first 27 ms,
# batch 16 channels-last 21 ms, batch 8 or 4 channels-last 10 ms (8 holds up better on a busy machine: fewer
# thread wake-ups per picture). Each picture's score depends on that picture only (eval mode), so chunks give
# the same gradients.
CPU_CHUNK_PIXELS = 8 * 224 * 224


def forward_chunk(size: tuple[int, int], device: torch.device, fixed_batch: int | None = None) -> int | None:
    """Pictures of ``size`` per forward pass: a few on a CPU (``CPU_CHUNK_PIXELS``), all of a batch (None) elsewhere;
    a whole number of ``fixed_batch`` for a model that takes exactly that many (fewer would be padded)."""
    if device.type != "cpu":
        return None
    chunk = max(1, CPU_CHUNK_PIXELS // (size[0] * size[1]))
    return chunk if fixed_batch is None else max(1, chunk // fixed_batch) * fixed_batch


class _ChunkedObjective:
    """The gradient of an objective's sum with respect to its input batch, run ``chunk`` pictures at a time.

    Inputs go in channels-last memory order (faster convolutions on a CPU); a model that cannot take them (a
    ``view`` of its input, say) fails on the first chunk, and from then on gets ordinary contiguous inputs.
    The model computes in ``dtype`` (autocast: float32 inputs, gradient and scores, bfloat16 arithmetic).
    """

    def __init__(self, objective: Objective, chunk: int | None, dtype: torch.dtype = torch.float32) -> None:
        self.objective = objective
        self.chunk = chunk
        self.dtype = dtype
        self.channels_last: bool | None = None  # None: not tried yet
        self.scratch: Scratch = {}  # lower_precision's buffers, kept from step to step

    def gradient(self, inputs: torch.Tensor, targets: slice) -> torch.Tensor:
        count = inputs.shape[0]
        step = self.chunk or count
        pieces = []
        for first in range(0, count, step):
            last = min(count, first + step)
            piece = inputs[first:last]
            part = slice(targets.start + first, targets.start + last)
            pieces.append(self._piece_gradient(piece, part))
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces)

    def _piece_gradient(self, piece: torch.Tensor, part: slice) -> torch.Tensor:
        if self.channels_last is None:
            self.channels_last = piece.dim() == 4
            if self.channels_last:
                try:
                    return self._run(piece, part)
                except (UsageError, RuntimeError):
                    self.channels_last = False
        return self._run(piece, part)

    def _run(self, piece: torch.Tensor, part: slice) -> torch.Tensor:
        layout = torch.channels_last if self.channels_last else torch.contiguous_format
        leaf = piece.contiguous(memory_format=layout).requires_grad_(True)
        with lower_precision(leaf.device, self.dtype, self.scratch):
            score = self.objective(leaf, part).float().sum()
        (gradient,) = torch.autograd.grad(score, leaf)
        return gradient


def _ascend(
    objective: Objective,
    count: int,
    size: tuple[int, int],
    preprocessing: Preprocessing,
    settings: Settings,
    device: torch.device,
    progress: Callable[[int], None] | None,
    fixed_batch: int | None = None,
    fast_model: Callable[[], AbstractContextManager[Any]] = nullcontext,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pictures maximizing ``objective``, ``settings.batch_size`` at a time; (pictures, their final scores).

    ``fast_model``: a context in which the steps run (the model with its batch norms folded); the steps compute in
    ``dtype`` (``ascent_dtype``). The final scores are measured outside both, on the model as it is, in float32.
    """
    pictures, scores = [], []
    runner = _ChunkedObjective(objective, forward_chunk(size, device, fixed_batch), dtype)
    for start in range(0, count, settings.batch_size):
        targets = slice(start, min(count, start + settings.batch_size))
        # Picture i's random numbers come from its own stream, seeded by (seed, i): the same whatever the batch size.
        generators = [
            torch.Generator().manual_seed((settings.seed * 1_000_003 + i) % 2**63) for i in range(start, targets.stop)
        ]
        picture = FourierPicture(
            targets.stop - start, size, decay_power=settings.decay_power, generators=generators, device=device
        )
        optimizer = torch.optim.Adam([picture.parameter], lr=settings.lr)
        with fast_model():
            for _ in range(settings.steps):
                inputs = normalized(random_views(picture.pictures(), settings, generators), preprocessing)
                # The model's part (most of the time) runs on the inputs cut from the graph, in chunks; one backward
                # pass then carries the inputs' gradient through the transformations and the Fourier parameterization.
                input_gradient = runner.gradient(inputs.detach(), targets)
                (gradient,) = torch.autograd.grad(inputs, picture.parameter, grad_outputs=input_gradient)
                picture.parameter.grad = -gradient  # ascent
                optimizer.step()
                if progress is not None:
                    progress(targets.stop - start)
        with torch.no_grad():
            final = picture.pictures()
            scores.append(objective(normalized(final, preprocessing), targets).detach().float().cpu())
        pictures.append(final.detach().cpu())
    return torch.cat(pictures), torch.cat(scores)


def visualize_channels(
    model: nn.Module,
    layer: str,
    channels: Sequence[int],
    *,
    preprocessing: Preprocessing | None = None,
    settings: Settings = Settings(),
    neuron: bool = False,
    fixed_batch: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> Visualization:
    """The picture that maximizes each of ``channels`` of ``layer`` (a ``named_modules()`` name, ``name#N`` for a call).

    Args:
        model: any module hookviz can hook; it is left as it was (mode, parameters, ``.grad``, hooks).
        layer: the layer whose channels are maximized; the forward pass stops there.
        channels: channel indices (the last dim of a transformer's tokens); checked against the layer.
        preprocessing: the model's input size and normalization (default: ImageNet at 224 x 224).
        settings: steps, learning rate, transformations, batch size and seed (``Settings``).
        neuron: maximize the activation at the map's centre instead of the mean over the map.
        fixed_batch: the batch size a fixed-batch .pt2 program requires (``LoadedModel.fixed_batch``).
        progress: called with the number of pictures after each step of each batch.
    """
    preprocessing = preprocessing or default_preprocessing()
    device = _model_device(model)
    dtype = ascent_dtype(settings.precision, device)  # checks the name before any work
    size = preprocessing.input_size
    probe = probe_layer(model, layer, preprocessing, fixed_batch=fixed_batch)
    count = probe.channels
    for channel in channels:
        if not 0 <= channel < count:
            raise UsageError(f"channel {channel} is out of range: layer {layer!r} has {count} channels (0-{count - 1})")
    wanted = torch.tensor(list(channels), dtype=torch.long)

    def objective(batch: torch.Tensor, targets: slice) -> torch.Tensor:
        output = layer_output(model, batch, layer, fixed_batch=fixed_batch, call=probe.call)
        return channel_scores(channel_view(output, size, layer), wanted[targets], neuron)

    with _gradients_of_pictures_only(model):
        images, scores = _ascend(
            objective,
            len(wanted),
            size,
            preprocessing,
            settings,
            device,
            progress,
            fixed_batch,
            fast_model=lambda: folded_batch_norms(model, keep=[layer]),
            dtype=dtype,
        )
    return Visualization(
        images=images,
        targets=list(channels),
        activations=scores.tolist(),
        steps=settings.steps,
        layer=layer,
        channel_count=count,
        precision=dtype_name(dtype),
    )


def visualize_classes(
    model: nn.Module,
    classes: Sequence[int],
    *,
    preprocessing: Preprocessing | None = None,
    settings: Settings = Settings(),
    output_key: str | None = None,
    fixed_batch: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> Visualization:
    """The picture that maximizes each class logit in ``classes`` (Simonyan et al., 2014), with the regularization
    of ``visualize_channels`` (Fourier colour parameterization, random transformations); the arguments are its."""
    preprocessing = preprocessing or default_preprocessing()
    device = _model_device(model)
    dtype = ascent_dtype(settings.precision, device)  # checks the name before any work
    wanted = torch.tensor(list(classes), dtype=torch.long)
    probabilities: list[torch.Tensor] = []

    def logits_of(batch: torch.Tensor) -> torch.Tensor:
        if fixed_batch is not None and batch.shape[0] != fixed_batch:
            padding = -batch.shape[0] % fixed_batch
            padded = torch.cat([batch, batch[-1:].expand(padding, *batch.shape[1:])]) if padding else batch
            chunks = [logits_of(chunk) for chunk in padded.split(fixed_batch)]
            return torch.cat(chunks)[: batch.shape[0]]
        return select_logits(run_model(model, batch), output_key)

    def objective(batch: torch.Tensor, targets: slice) -> torch.Tensor:
        logits = logits_of(batch)
        picked = wanted[targets].to(logits.device)
        if not torch.is_grad_enabled():  # the final pictures: also their probabilities
            probabilities.append(logits.float().softmax(dim=1).gather(1, picked[:, None])[:, 0].cpu())
        return logits.gather(1, picked[:, None])[:, 0]

    with _gradients_of_pictures_only(model):
        with torch.no_grad():
            grey = torch.full((1, 3, *preprocessing.input_size), 0.5, device=device)
            count = int(logits_of(normalized(grey, preprocessing)).shape[1])
        for index in classes:
            if not 0 <= index < count:
                raise UsageError(f"--class {index} is out of range: this model has classes 0..{count - 1}")
        images, scores = _ascend(
            objective,
            len(wanted),
            preprocessing.input_size,
            preprocessing,
            settings,
            device,
            progress,
            fixed_batch,
            fast_model=lambda: folded_batch_norms(model),
            dtype=dtype,
        )
    return Visualization(
        images=images,
        targets=list(classes),
        activations=scores.tolist(),
        steps=settings.steps,
        channel_count=count,
        probabilities=torch.cat(probabilities).tolist(),
        precision=dtype_name(dtype),
    )


@contextmanager
def _gradients_of_pictures_only(model: nn.Module) -> Iterator[None]:
    """For the block: the model in eval mode with its state restored after, and autograd on (even inside a caller's
    ``torch.no_grad()`` or ``inference_mode()``); gradients are only ever taken with respect to pictures."""
    with torch.inference_mode(False), preserved_state(model), torch.enable_grad():
        yield


@dataclass(frozen=True)
class LayerProbe:
    """What one forward pass on a grey picture tells about a layer: its channels and the call to stop at."""

    channels: int
    call: int | None  # the last call of a plain name (None for ``name#N``, which names its call)


def probe_layer(
    model: nn.Module, layer: str, preprocessing: Preprocessing | None = None, *, fixed_batch: int | None = None
) -> LayerProbe:
    """How many channels ``layer`` has and which call is its last, from one forward pass on a grey picture."""
    preprocessing = preprocessing or default_preprocessing()
    probe = torch.full((fixed_batch or 1, 3, *preprocessing.input_size), 0.5, device=_model_device(model))
    explicit = layer_call(layer, {name for name, _ in model.named_modules()})[1] is not None
    with torch.no_grad(), preserved_state(model):
        output, calls = _run_to_layer(model, normalized(probe, preprocessing), layer, None)
    channels = int(channel_view(output, preprocessing.input_size, layer).shape[1])
    return LayerProbe(channels=channels, call=None if explicit else calls)


def channel_activations(
    model: nn.Module,
    layer: str,
    batch: torch.Tensor,
    *,
    preprocessing: Preprocessing | None = None,
    neuron: bool = False,
    fixed_batch: int | None = None,
) -> torch.Tensor:
    """Every channel's activation (N, C) on a normalized model input ``batch``: its mean over the map, or with
    ``neuron`` its value at the centre (what ``visualize_channels`` maximizes)."""
    preprocessing = preprocessing or default_preprocessing()
    with torch.no_grad(), preserved_state(model):
        output = layer_output(model, batch.to(_model_device(model)), layer, fixed_batch=fixed_batch)
    maps = channel_view(output, preprocessing.input_size, layer).float()
    if neuron:
        return maps[:, :, maps.shape[2] // 2, maps.shape[3] // 2].cpu()
    return maps.flatten(2).mean(dim=2).cpu()


def most_active_channels(activations: torch.Tensor, count: int = DEFAULT_CHANNELS) -> list[int]:
    """The ``count`` channels with the highest mean of ``activations`` (N, C) over the images, most active first."""
    mean = activations.float().mean(dim=0)
    return mean.topk(min(count, mean.numel())).indices.tolist()


# --- channel lists ---------------------------------------------------------------------------------------------------------

_RANGE = re.compile(r"^\s*(\d+)\s*(?:-\s*(\d+)\s*)?$")


def parse_channels(text: str, count: int | None = None, layer: str = "") -> list[int]:
    """``"0-15,42"`` as [0, ..., 15, 42] (each channel once, in the order given); checked against ``count`` channels."""
    channels: dict[int, None] = {}
    for part in text.split(","):
        match = _RANGE.match(part)
        if match is None:
            raise UsageError(f"-f {text!r}: use channel indices and ranges, e.g. 0-15,42")
        first = int(match.group(1))
        last = int(match.group(2)) if match.group(2) is not None else first
        if last < first:
            raise UsageError(f"-f {text!r}: the range {first}-{last} runs backwards; write {last}-{first}")
        if count is not None and last >= count:
            raise UsageError(f"channel {last} is out of range: layer {layer!r} has {count} channels (0-{count - 1})")
        channels.update(dict.fromkeys(range(first, last + 1)))
    return list(channels)


# --- pictures ---------------------------------------------------------------------------------------------------------------


def to_image(picture: torch.Tensor) -> Image.Image:
    """A (3, H, W) picture in [0, 1] as a PIL RGB image."""
    return to_pil((picture.clamp(0, 1) * 255).round().to(torch.uint8))


def picture_grid(pictures: torch.Tensor, labels: Sequence[str]) -> Image.Image:
    """A near-square grid of ``pictures`` (N, 3, H, W) in [0, 1], each labelled at its top-left corner."""
    from torchvision.utils import make_grid

    columns = math.ceil(math.sqrt(len(pictures)))
    tiles = (pictures.clamp(0, 1) * 255).round().to(torch.uint8)
    image = to_pil(make_grid(tiles, nrow=columns, padding=TILE_GAP, pad_value=255))
    height, width = pictures.shape[-2:]
    font_size = max(9, min(16, height // 12))
    positions = [
        (TILE_GAP + (i % columns) * (width + TILE_GAP) + 2, TILE_GAP + (i // columns) * (height + TILE_GAP) + 2)
        for i in range(len(pictures))
    ]
    draw_labels(image, positions, list(labels), font_size)
    return image


# --- deep dream --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DreamSettings:
    """Deep dream: ``octaves`` scales, each ``octave_scale`` times the last, ending at the photo's own size; at each,
    ``steps`` steps of ``lr`` (in [0, 1] pixel units, the gradient normalized to mean magnitude 1) on a randomly
    shifted (by up to ``jitter`` pixels) copy. The photo is cut into tiles of the model's input size."""

    octaves: int = 4
    octave_scale: float = 1.4
    steps: int = 10
    lr: float = 0.01
    jitter: int = 32
    seed: int = 0


def dream(
    model: nn.Module,
    photo: torch.Tensor,
    layer: str,
    *,
    preprocessing: Preprocessing | None = None,
    settings: DreamSettings = DreamSettings(),
    fixed_batch: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """Deep dream (Mordvintsev et al., 2015): ``photo`` (3, H, W) in [0, 1] changed to amplify what ``layer`` sees
    in it (gradient ascent on the mean square of the layer's output), returned at the photo's resolution.

    Args:
        model: any module; left as it was. preprocessing: its input size (the tile size) and normalization.
        layer: a ``named_modules()`` name (``name#N`` for one call); the forward pass stops there.
        settings: octaves, steps, step size, jitter and seed (``DreamSettings``).
        fixed_batch: the batch size a fixed-batch .pt2 program requires. progress: called after each step.
    """
    preprocessing = preprocessing or default_preprocessing()
    device = _model_device(model)
    generator = torch.Generator().manual_seed(settings.seed % 2**63)
    call = probe_layer(model, layer, preprocessing, fixed_batch=fixed_batch).call
    height, width = photo.shape[-2:]
    base = photo.detach().float()[None].to(device)
    sizes = [
        (max(8, round(height / settings.octave_scale**k)), max(8, round(width / settings.octave_scale**k)))
        for k in reversed(range(settings.octaves))
    ]
    smaller = [F.interpolate(base, size=s, mode="bilinear", align_corners=False, antialias=True) for s in sizes]
    detail = torch.zeros_like(smaller[0])
    with _gradients_of_pictures_only(model):
        for octave, size in enumerate(sizes):
            if octave:
                detail = F.interpolate(detail, size=size, mode="bilinear", align_corners=False)
            image = (smaller[octave] + detail).clamp(0, 1)
            for _ in range(settings.steps):
                shift = torch.randint(-settings.jitter, settings.jitter + 1, (2,), generator=generator).tolist()
                image = image.detach().requires_grad_(True)
                tiles = _tiles(torch.roll(image, shifts=shift, dims=(2, 3)), preprocessing.input_size)
                batch = normalized(tiles, preprocessing)
                output = layer_output(model, batch, layer, fixed_batch=fixed_batch, call=call)
                (gradient,) = torch.autograd.grad(output.float().pow(2).mean(), image)
                step = settings.lr * gradient / gradient.abs().mean().clamp_min(1e-12)
                image = (image.detach() + step).clamp(0, 1)
                if progress is not None:
                    progress(1)
            detail = image - smaller[octave]
    return image.detach()[0].cpu()


def _tiles(image: torch.Tensor, tile: tuple[int, int]) -> torch.Tensor:
    """A (1, 3, H, W) ``image`` cut into (n, 3, *tile) tiles, padded by reflection to whole tiles; differentiable."""
    height, width = image.shape[-2:]
    tile_h, tile_w = tile
    pad_h, pad_w = -height % tile_h, -width % tile_w
    if pad_h or pad_w:
        mode = "reflect" if pad_h < height and pad_w < width else "replicate"
        image = F.pad(image, (0, pad_w, 0, pad_h), mode=mode)
    rows, columns = image.shape[-2] // tile_h, image.shape[-1] // tile_w
    tiles = image.reshape(3, rows, tile_h, columns, tile_w).permute(1, 3, 0, 2, 4)
    return tiles.reshape(rows * columns, 3, tile_h, tile_w)
