"""Activation statistics per layer over any number of images, streamed batch by batch.

    collector = StatsCollector(model)                 # every Conv2d and Linear by default
    for batch in batches:
        collector.update(batch)
    results = collector.results()                     # layer name -> LayerStats
    print(format_table(results))
    histogram_figure(results, Path("stats.png"))

Memory does not grow with the number of images: each layer keeps a handful of
float64 running values, one boolean per channel and a fixed number of histogram
bins. Each layer's output is reduced inside its forward hook, the moment the
layer returns, so no batch of activations is kept and in-place ops that run
later (``ReLU(inplace=True)``) cannot change what is measured.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure
    from PIL import Image

from . import tables
from .forward import first_tensor, run_model
from .hooks import hook_handles, layer_call, preserved_state, resolve_layers
from .layers import is_activation_layer, is_conv_layer, is_linear_layer
from .tables import json_float, short_number

DEFAULT_BINS = 100
# Bins narrower than float32's spacing at the data's magnitude would only show rounding.
_FLOAT32_MANTISSA_BITS = 24
_SMALLEST_BIN_EXPONENT = -1000  # for all-zero data; keeps 2**k a normal float64


# --- which layers -------------------------------------------------------------------------------------


def stats_layer_names(model: nn.Module) -> list[str]:
    """The default layers for statistics: every activation module (what a "dead unit" means: an activation's
    output that is never positive), in ``named_modules()`` order; every conv and linear layer for a model whose
    activations are functions, not modules."""
    activations = [name for name, module in model.named_modules() if name and is_activation_layer(module)]
    return activations or [
        name for name, module in model.named_modules() if name and (is_conv_layer(module) or is_linear_layer(module))
    ]


# --- one layer's running statistics ----------------------------------------------------------------


@dataclass
class LayerStats:
    """Running statistics of one layer's output values, updated one tensor at a time.

    What is computed, over every finite value the layer produced for every image:

    * ``mean``, ``std`` (population std, i.e. ``correction=0``: the values are
      all the values, not a sample), ``min``, ``max``. Batches are merged with
      Chan et al.'s parallel update in float64, which stays accurate where a
      plain sum of squares would cancel.
    * ``zero_fraction``: the fraction of output values ``<= 0``, i.e. the
      fraction a ReLU applied to this output would set to zero.
    * ``dead_channels``: channels (dim 1 of a conv output; the last dim, one
      per output feature, of a linear output) with no value ``> 0`` for any
      input at any position: a ReLU after them always outputs zero.
    * ``nonfinite``: NaN and infinite values are counted here and left out of
      everything else, so one overflow does not turn every statistic into NaN.

    Histogram bins: ``bins`` bins of width ``2**k`` whose edges are multiples of
    the width. ``k`` is the smallest exponent for which such bins cover the
    values seen so far (but never narrower than float32 resolution). When new
    values fall outside, ``k`` grows and the old counts are merged exactly into
    the wider bins (each new bin is a union of whole old bins, because all edges
    lie on one power-of-two grid). So no value is ever clamped or dropped, memory
    is fixed, the values always span at least half of the bins, and the
    histogram depends only on the values, not on how they were split into
    batches: two updates give exactly the counts of one update with both.
    """

    bins: int = DEFAULT_BINS
    channel_dim: int = 1  # -1 for a linear layer's output features
    is_output: bool = field(default=False, init=False)  # the model's own output (its logits): "dead" means nothing
    values_seen: int = field(default=0, init=False)  # every value, finite or not; 0 means the layer never ran
    count: int = field(default=0, init=False)  # finite values
    nonpositive: int = field(default=0, init=False)
    _mean: float = field(default=0.0, init=False, repr=False)
    _m2: float = field(default=0.0, init=False, repr=False)  # sum of squared deviations from the mean
    _min: float = field(default=math.inf, init=False, repr=False)
    _max: float = field(default=-math.inf, init=False, repr=False)
    _active: torch.Tensor | None = field(default=None, init=False, repr=False)  # (channels,) bool: ever > 0
    _counts: torch.Tensor = field(init=False, repr=False)
    _exponent: int = field(default=_SMALLEST_BIN_EXPONENT, init=False, repr=False)  # bin width is 2**_exponent
    _first_bin: int = field(default=0, init=False, repr=False)  # left edge of bin 0 is _first_bin * 2**_exponent

    def __post_init__(self) -> None:
        if self.bins < 2:
            raise ValueError(f"bins must be at least 2, got {self.bins}")
        self._counts = torch.zeros(self.bins, dtype=torch.int64)

    def update(self, tensor: torch.Tensor) -> None:
        """Add every value of ``tensor`` (a layer's output for a batch) to the statistics."""
        values = tensor.detach()
        if not values.is_floating_point():
            values = values.double()
        self.values_seen += values.numel()
        self._update_channels(values)
        finite = values.flatten()
        if not bool(torch.isfinite(finite).all()):
            finite = finite[torch.isfinite(finite)]
        if finite.numel() == 0:
            return
        finite = finite.double()
        self._update_moments(finite)
        self.nonpositive += int((finite <= 0).sum())
        self._update_histogram(finite)

    def _update_channels(self, values: torch.Tensor) -> None:
        # A 0-D or 1-D output has no channel axis: the whole output counts as one channel.
        per_channel = (
            values.gt(0).reshape(1, -1) if values.dim() < 2 else values.gt(0).movedim(self.channel_dim, 0).flatten(1)
        )
        active = per_channel.any(dim=1).cpu()
        if self._active is None:
            self._active = active
        elif self._active.shape != active.shape:
            raise ValueError(f"the layer's channel count changed from {self._active.numel()} to {active.numel()}")
        else:
            self._active |= active

    def _update_moments(self, values: torch.Tensor) -> None:
        n = values.numel()
        batch_mean = float(values.mean())
        batch_m2 = float((values - batch_mean).square().sum())
        total = self.count + n
        delta = batch_mean - self._mean
        self._mean += delta * n / total
        self._m2 += batch_m2 + delta * delta * self.count * n / total
        self.count = total
        self._min = min(self._min, float(values.min()))
        self._max = max(self._max, float(values.max()))

    def _update_histogram(self, values: torch.Tensor) -> None:
        """Called after _update_moments: the grid must hold every value seen so far, these included."""
        exponent, first = _bin_grid(self._min, self._max, self.bins)
        self._regrid(exponent, first)
        # Dividing by a power of two is exact, so a value's bin index is exact too; the clamp is only a guard.
        index = torch.floor(values / math.ldexp(1.0, exponent)).long() - first
        self._counts += torch.bincount(index.clamp_(0, self.bins - 1), minlength=self.bins).cpu()

    def _regrid(self, exponent: int, first: int) -> None:
        """Move the counts onto a grid at least as coarse; every old bin lies inside one new bin."""
        if (exponent, first) == (self._exponent, self._first_bin):
            return
        shift = exponent - self._exponent
        counts = torch.zeros_like(self._counts)
        for old in torch.nonzero(self._counts).flatten().tolist():
            # Python's >> floors, also for negative bin numbers.
            counts[((self._first_bin + old) >> shift) - first] += self._counts[old]
        self._counts, self._exponent, self._first_bin = counts, exponent, first

    # --- results ---------------------------------------------------------------------------------------

    @property
    def ran(self) -> bool:
        return self.values_seen > 0

    @property
    def mean(self) -> float:
        return self._mean if self.count else math.nan

    @property
    def std(self) -> float:
        return math.sqrt(max(self._m2, 0.0) / self.count) if self.count else math.nan

    @property
    def min(self) -> float:
        return self._min if self.count else math.nan

    @property
    def max(self) -> float:
        return self._max if self.count else math.nan

    @property
    def nonfinite(self) -> int:
        return self.values_seen - self.count

    @property
    def zero_fraction(self) -> float:
        """Fraction of the (finite) output values that are <= 0: what a ReLU would zero."""
        return self.nonpositive / self.count if self.count else math.nan

    @property
    def channels(self) -> int:
        return 0 if self._active is None else self._active.numel()

    @property
    def dead_channels(self) -> list[int]:
        """Channels never > 0 for any input at any position (none for the model's output: logits below 0 are
        not dead, they are votes against a class)."""
        if self._active is None or self.is_output:
            return []
        return torch.nonzero(~self._active).flatten().tolist()

    def histogram(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(counts, edges): ``bins`` int64 counts and ``bins + 1`` float64 edges; counts sum to ``count``."""
        width = math.ldexp(1.0, self._exponent)
        edges = (torch.arange(self.bins + 1, dtype=torch.float64) + self._first_bin) * width
        return self._counts.clone(), edges

    def as_dict(self) -> dict[str, Any]:
        """JSON-friendly: plain numbers and lists; NaN/inf become None."""
        counts, edges = self.histogram()
        return {
            "values": self.count,
            "nonfinite": self.nonfinite,
            "mean": json_float(self.mean),
            "std": json_float(self.std),
            "min": json_float(self.min),
            "max": json_float(self.max),
            "zero_fraction": json_float(self.zero_fraction),
            "channels": self.channels,
            "dead_channels": self.dead_channels,
            "model_output": self.is_output,
            "histogram": {"counts": counts.tolist(), "edges": edges.tolist()},
        }


def _bin_grid(low: float, high: float, bins: int) -> tuple[int, int]:
    """(k, first): the smallest power-of-two width 2**k whose aligned bins [first*2**k, (first+bins)*2**k) hold [low, high].

    A pure function of (low, high), and never smaller for a wider range; this is
    what makes the histogram independent of how values are split into batches.
    """
    magnitude = max(abs(low), abs(high))
    exponent = (
        _SMALLEST_BIN_EXPONENT
        if magnitude == 0
        else max(_SMALLEST_BIN_EXPONENT, math.frexp(magnitude)[1] - _FLOAT32_MANTISSA_BITS)
    )
    if high > low:
        # Narrower bins cannot cover the span ((bins + 1) * 2**k > high - low); two less for log2's rounding.
        exponent = max(exponent, math.ceil(math.log2((high - low) / bins)) - 2)
    while True:
        width = math.ldexp(1.0, exponent)
        first = math.floor(low / width)
        if math.floor(high / width) - first < bins:
            return exponent, first
        exponent += 1


# --- running a model --------------------------------------------------------------------------------


class StatsCollector:
    """Feed batches through a model and accumulate per-layer statistics.

    Each ``update`` is one forward pass without autograd, in eval mode; hooks
    exist only during that pass and modes/``.grad`` are restored after it. A
    module that runs several times in one forward pass (one activation shared by
    every block) gets statistics of its own per call, reported as ``name#1``,
    ``name#2``, ...; ``name#N`` measures only its N-th call.
    """

    def __init__(
        self, model: nn.Module, layers: Sequence[str] | None = None, bins: int = DEFAULT_BINS, top: int = 0
    ) -> None:
        names = list(layers) if layers is not None else stats_layer_names(model)
        self.model = model
        self.bins = bins
        self.top = top  # > 0: also keep each channel's ``top`` most activating images (``top_activations()``)
        self.modules = resolve_layers(model, names)  # unknown names fail here, with suggestions
        plain = {name for name, _ in model.named_modules()}
        self.picked = {name: layer_call(name, plain)[1] for name in self.modules}
        # layer name -> call number -> statistics (a module that runs once has only call 1)
        self._by_call: dict[str, dict[int, LayerStats]] = {name: {} for name in self.modules}
        self._top_by_call: dict[str, dict[int, TopActivations]] = {name: {} for name in self.modules}
        self._seen: list[tuple[torch.Tensor, LayerStats]] = []  # this update's outputs, to find the model's own
        self.images = 0

    def update(self, batch: torch.Tensor, count: int | None = None) -> None:
        """Run ``batch`` (N, C, H, W) through the model and add every layer's output to its statistics.

        ``count``: only the first ``count`` images are real (the rest pads the batch for a
        model that takes a fixed batch size); only their outputs are counted.
        """
        self._seen = []
        with torch.no_grad(), preserved_state(self.model), hook_handles() as handles:
            for name in self.modules:
                handles.append(self.modules[name].register_forward_hook(self._hook(name, count)))
            output = first_tensor(run_model(self.model, batch))
        for tensor, stats in self._seen:  # the layer whose output the model returns as it is: its logits
            stats.is_output = stats.is_output or tensor is output
        self._seen = []
        self.images += batch.shape[0] if count is None else count

    def _hook(self, name: str, count: int | None) -> Callable[..., None]:
        module, picked, calls = self.modules[name], self.picked[name], [0]
        channel_dim = -1 if is_linear_layer(module) else 1

        def hook(module: nn.Module, inputs: Any, output: Any) -> None:
            calls[0] += 1
            if picked is not None and calls[0] != picked:
                return
            # Reduced right here, before any later in-place op can overwrite the output.
            tensor = first_tensor(output)
            if tensor is not None:
                stats = self._by_call[name].setdefault(calls[0], LayerStats(bins=self.bins, channel_dim=channel_dim))
                stats.update(tensor if count is None else tensor[:count])
                self._seen.append((tensor, stats))
                if self.top:
                    top = self._top_by_call[name].setdefault(calls[0], TopActivations(self.top, channel_dim))
                    top.update(tensor if count is None else tensor[:count], first_image=self.images)

        return hook

    @property
    def stats(self) -> dict[str, LayerStats]:
        """The statistics so far, as ``results()`` gives them."""
        return self.results()

    def results(self) -> dict[str, LayerStats]:
        """Layer name (``name#N`` per call of a module that ran several times) -> statistics, in the order the
        layers were given; a layer that never ran has ``ran == False``."""
        results: dict[str, LayerStats] = {}
        for name, by_call in self._by_call.items():
            if len(by_call) <= 1:
                channel_dim = -1 if is_linear_layer(self.modules[name]) else 1
                results[name] = next(iter(by_call.values()), None) or LayerStats(
                    bins=self.bins, channel_dim=channel_dim
                )
            else:
                results.update((f"{name}#{call}", stats) for call, stats in sorted(by_call.items()))
        return results

    def top_activations(self) -> dict[str, TopActivations]:
        """Layer name (``name#N`` as in ``results()``) -> each channel's most activating images so far (with
        ``top`` > 0); image numbers count the images given to ``update`` in order, from 0."""
        found: dict[str, TopActivations] = {}
        for name, by_call in self._top_by_call.items():
            if len(by_call) == 1:
                found[name] = next(iter(by_call.values()))
            else:
                found.update((f"{name}#{call}", top) for call, top in sorted(by_call.items()))
        return found


def collect_stats(
    model: nn.Module, batches: Any, layers: Sequence[str] | None = None, bins: int = DEFAULT_BINS
) -> dict[str, LayerStats]:
    """Statistics over an iterable of batches, in one call."""
    collector = StatsCollector(model, layers, bins=bins)
    for batch in batches:
        collector.update(batch)
    return collector.results()


# --- reporting ------------------------------------------------------------------------------------


def format_table(results: Mapping[str, LayerStats]) -> str:
    """An aligned text table: one line per layer."""
    header = ["layer", "mean", "std", "min", "max", "<=0", "dead", "values"]
    rows = [header]
    for name, stats in results.items():
        if not stats.ran:
            rows.append([name, "did not run", "", "", "", "", "", "0"])
            continue
        values = f"{stats.count:,}" + (f" (+{stats.nonfinite:,} non-finite)" if stats.nonfinite else "")
        rows.append(
            [
                name,
                short_number(stats.mean),
                short_number(stats.std),
                short_number(stats.min),
                short_number(stats.max),
                _percent(stats.zero_fraction),
                "-" if stats.is_output else f"{len(stats.dead_channels)}/{stats.channels}",
                values,
            ]
        )
    return tables.format_table(rows, right=range(1, len(header) - 1))


def _percent(value: float) -> str:
    return "nan" if math.isnan(value) else f"{value:.1%}"


ROW_HEIGHT_INCHES = 1.9  # one layer's histogram, with its title and tick labels
ROW_GAP_INCHES = 0.55
TOP_INCHES = 0.35  # room for the first row's title
BOTTOM_INCHES = 0.4  # room for the last row's tick labels
FIGURE_WIDTH_INCHES = 9.0
FIGURE_DPI = 100


def histogram_figure(results: Mapping[str, LayerStats], path: Path) -> Path:
    """One PNG, one histogram row per layer (log-scale counts), written atomically."""
    from .output import write_png

    figure = _histogram_figure(results)
    image = _render(figure)
    return write_png(image, Path(path), {"hookviz:layers": ",".join(results)})


def _histogram_figure(results: Mapping[str, LayerStats]) -> Figure:
    from matplotlib.figure import Figure

    rows = max(1, len(results))
    height = TOP_INCHES + BOTTOM_INCHES + ROW_HEIGHT_INCHES * rows - ROW_GAP_INCHES
    figure = Figure(figsize=(FIGURE_WIDTH_INCHES, height), dpi=FIGURE_DPI)
    # Margins fixed in inches rather than constrained layout: the same look at any row count, and 5x faster to draw.
    axes = figure.subplots(
        rows,
        1,
        squeeze=False,
        gridspec_kw={
            "left": 0.8 / FIGURE_WIDTH_INCHES,
            "right": 1 - 0.2 / FIGURE_WIDTH_INCHES,
            "top": 1 - TOP_INCHES / height,
            "bottom": BOTTOM_INCHES / height,
            "hspace": ROW_GAP_INCHES / (ROW_HEIGHT_INCHES - ROW_GAP_INCHES),
        },
    )[:, 0]
    for ax, (name, stats) in zip(axes, results.items(), strict=False):
        _draw_histogram(ax, name, stats)
    if not results:
        axes[0].set_axis_off()
        axes[0].text(0.5, 0.5, "no layers", ha="center", va="center")
    return figure


def _draw_histogram(ax: Axes, name: str, stats: LayerStats) -> None:
    if not stats.count:
        ax.set_title(name, loc="left", fontsize=10, fontweight="bold")
        ax.text(
            0.5,
            0.5,
            "did not run" if not stats.ran else "no finite values",
            ha="center",
            va="center",
            transform=ax.transAxes,
        )
        ax.set_yticks([])
        ax.set_xticks([])
        return
    counts, edges = _trimmed(*stats.histogram())
    # Counts span orders of magnitude (a spike at 0 after a ReLU); a log axis keeps the tails visible.
    ax.stairs(counts.tolist(), edges.tolist(), fill=True, color="tab:blue", baseline=0.5)
    ax.set_yscale("log")
    ax.set_ylim(bottom=0.5, top=max(2.0, float(counts.max()) * 2))
    if edges[0] < 0 < edges[-1]:
        ax.axvline(0.0, color="0.3", linewidth=0.8, linestyle="--")
    ax.set_xlim(float(edges[0]), float(edges[-1]))
    ax.set_ylabel("count", fontsize=8)
    ax.tick_params(labelsize=8)
    dead = len(stats.dead_channels)
    ax.set_title(name + ("  (model output)" if stats.is_output else ""), loc="left", fontsize=10, fontweight="bold")
    ax.set_title(
        f"mean {stats.mean:.3g}  std {stats.std:.3g}  range [{stats.min:.3g}, {stats.max:.3g}]  "
        f"<=0: {stats.zero_fraction:.1%}" + ("" if stats.is_output else f"  dead: {dead}/{stats.channels}"),
        loc="right",
        fontsize=8,
        color="tab:red" if dead else "black",
    )


def _trimmed(counts: torch.Tensor, edges: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop the empty bins at both ends, so the axis shows where the values are."""
    filled = torch.nonzero(counts).flatten()
    start, stop = int(filled[0]), int(filled[-1]) + 1
    return counts[start:stop], edges[start : stop + 1]


def _render(figure: Figure) -> Image.Image:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from PIL import Image

    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    return Image.frombuffer("RGBA", canvas.get_width_height(), canvas.buffer_rgba()).convert("RGB")


# --- what activates each channel most: stats --top N ------------------------------------------------

TOP_TILE = 56  # px: one image's crop in a top-images grid
TOP_ROWS = 64  # channels drawn per layer at most: the most active ones
TOP_IMAGE_AREA = 640 * 640  # images are read back at about this size to cut the crops
TOP_CACHE = 128  # images kept decoded while the grids are drawn
TOP_WIDTH = 1200  # px: a grid of narrow rows puts them side by side up to about this width


@dataclass
class TopActivations:
    """Each channel's ``count`` most activating images of one layer, kept as images stream by.

    An image activates a channel by the channel's largest value anywhere in the image's output; ``positions``
    says where (a flat index into the output's spatial ``grid``, (h, w) for a conv layer, () for a vector).
    Memory: three numbers per channel and kept image, however many images pass. Equal values keep the
    earlier image, and within an image the first position.
    """

    count: int
    channel_dim: int = 1
    values: torch.Tensor | None = field(default=None, repr=False)  # (C, k), largest first
    images: torch.Tensor | None = field(default=None, repr=False)  # (C, k) image numbers, from 0
    positions: torch.Tensor | None = field(default=None, repr=False)  # (C, k)
    grid: tuple[int, ...] = ()

    def update(self, output: torch.Tensor, first_image: int) -> None:
        """Add a batch's output of the layer; its images are numbered ``first_image``, ``first_image + 1``, ..."""
        values = output.detach()
        if values.dim() < 2:
            return
        values = values.movedim(self.channel_dim, 1)
        self.grid = tuple(values.shape[2:])
        flat = values.flatten(2).float() if values.dim() > 2 else values.float()[:, :, None]
        best, where = torch.nan_to_num(flat, nan=-math.inf).max(dim=2)  # (B, C)
        channels, batch = best.shape[1], best.shape[0]
        numbers = torch.arange(first_image, first_image + batch).expand(channels, batch)
        merged = [best.T.cpu(), numbers, where.T.cpu()]
        if self.values is not None and self.images is not None and self.positions is not None:
            merged = [
                torch.cat(pair, dim=1) for pair in zip((self.values, self.images, self.positions), merged, strict=True)
            ]
        # Stable: among equal values the kept (earlier) images stay first.
        order = torch.sort(merged[0], dim=1, descending=True, stable=True).indices[:, : self.count]
        self.values, self.images, self.positions = (part.gather(1, order) for part in merged)

    @property
    def channels(self) -> int:
        return 0 if self.values is None else self.values.shape[0]


def receptive_field(
    model: nn.Module, layer: str, input_size: tuple[int, int], device: Any = "cpu", channels: int = 3
) -> tuple[int, int] | None:
    """(height, width) in model-input pixels of what one position of ``layer``'s output mostly looks at: its
    effective receptive field, the smallest span around the position holding ``RECEPTIVE_MASS`` of the
    gradient's magnitude (of the centre position's channels' sum, by the input, over a few random inputs) along
    each axis, and never smaller than one output cell. (The theoretical field of a deep layer is the whole image;
    the gradient falls off fast away from the centre.) None when the output has no spatial grid. The model's modes
    and ``.grad`` are left as they were.
    """
    modules = resolve_layers(model, [layer])
    picked = layer_call(layer, {name for name, _ in model.named_modules()})[1]
    kept: list[torch.Tensor] = []
    calls = [0]

    def hook(module: nn.Module, inputs: Any, output: Any) -> None:
        calls[0] += 1
        tensor = first_tensor(output)
        if tensor is not None and calls[0] == (picked or 1):  # the call measured (a layer name#N: its N-th)
            kept.append(tensor)
            raise _Reached  # nothing after it is needed: the forward pass stops here

    height, width = input_size
    generator = torch.Generator().manual_seed(0)
    probe = torch.randn(RECEPTIVE_PROBES, channels, height, width, generator=generator).to(device)
    probe.requires_grad_(True)
    with preserved_state(model), hook_handles() as handles, torch.enable_grad():
        handles.append(modules[layer].register_forward_hook(hook))
        try:
            run_model(model, probe)
        except _Reached:
            pass
    if not kept or kept[-1].dim() != 4 or not kept[-1].requires_grad:
        return None
    output = kept[-1]
    rows, columns = output.shape[2], output.shape[3]
    centre = output[:, :, rows // 2, columns // 2].sum()
    (gradient,) = torch.autograd.grad(centre, probe)
    magnitude = gradient.detach().abs().sum(dim=(0, 1)).double().cpu()  # (H, W)
    if float(magnitude.sum()) == 0:
        return None
    span_y, span_x = _mass_span(magnitude.sum(dim=1)), _mass_span(magnitude.sum(dim=0))
    return max(span_y, math.ceil(height / rows)), max(span_x, math.ceil(width / columns))


RECEPTIVE_MASS = 0.9
RECEPTIVE_PROBES = 2


class _Reached(Exception):
    """Raised by receptive_field's hook once it has the layer's output."""


def _mass_span(mass: torch.Tensor) -> int:
    """The length in pixels of the smallest span of ``mass`` (1-D, >= 0, one value per pixel) centred on its centre
    of mass holding RECEPTIVE_MASS of it."""
    total = float(mass.sum())
    positions = torch.arange(mass.numel(), dtype=torch.float64) + 0.5
    centre = float((positions * mass).sum()) / total
    distance = (positions - centre).abs()
    order = torch.argsort(distance, stable=True)
    reached = torch.cumsum(mass[order], dim=0) >= RECEPTIVE_MASS * total
    needed = int(torch.nonzero(reached).flatten()[0]) if bool(reached.any()) else mass.numel() - 1
    included = order[: needed + 1]
    return int(included.max() - included.min()) + 1


class _Originals:
    """Images read back (at about TOP_IMAGE_AREA pixels) with the part the model saw; the last TOP_CACHE kept."""

    def __init__(self, preprocessing: Any, crop: bool):
        self.preprocessing, self.crop = preprocessing, crop
        self.kept: dict[Path, Any] = {}

    def get(self, path: Path) -> Any:
        from .errors import InputError
        from .images import load_image, model_view

        if path in self.kept:
            self.kept[path] = self.kept.pop(path)  # the most recently used last
            return self.kept[path]
        try:
            image = load_image(path, max_area=TOP_IMAGE_AREA)
            found = (image, model_view(image.size, self.preprocessing, self.crop))
        except InputError:  # changed or gone since the run: a blank tile
            found = None
        self.kept[path] = found
        if len(self.kept) > TOP_CACHE:
            self.kept.pop(next(iter(self.kept)))
        return found


def top_grid(
    layer: str,
    top: TopActivations,
    paths: Sequence[Path],
    preprocessing: Any,
    *,
    crop: bool = False,
    field_size: tuple[int, int] | None = None,
    originals: _Originals | None = None,
) -> Image.Image:
    """One row per channel (its index on the left), the channel's most activating images left to right, each the
    crop of ``field_size`` (model-input pixels, centred on the maximum) or the whole image the model saw.

    ``paths[n]`` is image number n of ``top``; ``preprocessing`` and ``crop`` as in the run. At most TOP_ROWS
    channels: beyond, the ones with the largest activations, in index order.
    """
    from PIL import Image, ImageOps

    from .render import draw_labels, titled

    originals = originals or _Originals(preprocessing, crop)
    if top.values is None or top.images is None or top.positions is None:
        return titled(Image.new("RGB", (400, 40), (255, 255, 255)), f"{layer}: no images")
    channels = top.values.shape[0]
    rows = list(range(channels))
    if channels > TOP_ROWS:
        strongest = torch.topk(top.values[:, 0], TOP_ROWS).indices
        rows = sorted(strongest.tolist())
    height, width = preprocessing.input_size
    label_width, gap, kept = 52, 2, top.values.shape[1]
    row_width = label_width + kept * (TOP_TILE + gap) + 12
    # Narrow rows go side by side in blocks (channels down each block, then on to the next): about TOP_WIDTH px wide.
    blocks = max(1, min(math.ceil(len(rows) / 8), TOP_WIDTH // row_width))
    per_block = math.ceil(len(rows) / blocks)
    sheet = Image.new("RGB", (blocks * row_width, per_block * (TOP_TILE + gap)), (255, 255, 255))
    places = [((n // per_block) * row_width, (n % per_block) * (TOP_TILE + gap)) for n in range(len(rows))]
    draw_labels(sheet, [(x + 4, y + TOP_TILE // 2 - 8) for x, y in places], [f"c{c}" for c in rows], 13)
    for (x, y), channel in zip(places, rows, strict=True):
        for k in range(kept):
            value = float(top.values[channel, k])
            if not math.isfinite(value):
                continue
            found = originals.get(Path(paths[int(top.images[channel, k])]))
            tile = Image.new("RGB", (TOP_TILE, TOP_TILE), (200, 200, 200))
            if found is not None:
                image, view = found
                box = _crop_box(int(top.positions[channel, k]), top.grid, (height, width), field_size, view.box)
                part = ImageOps.contain(image.crop(box), (TOP_TILE, TOP_TILE))  # small crops enlarged to fill it
                tile.paste(part, ((TOP_TILE - part.width) // 2, (TOP_TILE - part.height) // 2))
            sheet.paste(tile, (x + label_width + k * (TOP_TILE + gap), y))
    shown = f"{len(rows)} of {channels} channels (the most active)" if len(rows) < channels else f"{channels} channels"
    seen = (
        f"crops of the effective receptive field ({field_size[0]}x{field_size[1]} of {height}x{width})"
        if field_size
        else "whole images"
    )
    return titled(sheet, f"{layer} | top {kept} images per channel | {shown} | {seen}")


def _crop_box(
    position: int,
    grid: tuple[int, ...],
    input_size: tuple[int, int],
    field_size: tuple[int, int] | None,
    view: tuple[float, float, float, float],
) -> tuple[int, int, int, int]:
    """The part of the original around output ``position``: ``field_size`` model-input pixels centred on it,
    inside the part of the original the model saw (``view``), in the original's pixels."""
    left, top, right, bottom = view
    if field_size is None or len(grid) != 2:
        return round(left), round(top), round(right), round(bottom)
    height, width = input_size
    y, x = divmod(position, grid[1])
    centre_y, centre_x = (y + 0.5) * height / grid[0], (x + 0.5) * width / grid[1]
    field_h, field_w = min(field_size[0], height), min(field_size[1], width)
    y0 = min(max(0.0, centre_y - field_h / 2), height - field_h)
    x0 = min(max(0.0, centre_x - field_w / 2), width - field_w)
    scale_x, scale_y = (right - left) / width, (bottom - top) / height
    return (
        round(left + x0 * scale_x),
        round(top + y0 * scale_y),
        max(round(left + (x0 + field_w) * scale_x), round(left + x0 * scale_x) + 1),
        max(round(top + (y0 + field_h) * scale_y), round(top + y0 * scale_y) + 1),
    )


def top_grids(
    model: nn.Module,
    tops: Mapping[str, TopActivations],
    paths: Sequence[Path],
    preprocessing: Any,
    out_dir: Path,
    *,
    crop: bool = False,
    device: Any = "cpu",
) -> list[Path]:
    """Write ``out_dir/top_<layer>.png`` (see ``top_grid``) and ``top_<layer>.json`` (see ``top_record``) for each
    layer of ``tops``; the PNGs' paths."""
    import json

    from .output import atomic_write, layer_file_names, write_png

    names = layer_file_names(list(tops))
    originals = _Originals(preprocessing, crop)
    written = []
    for layer, top in tops.items():
        field_size = receptive_field(model, layer, preprocessing.input_size, device, preprocessing.channels)
        picture = top_grid(layer, top, paths, preprocessing, crop=crop, field_size=field_size, originals=originals)
        metadata = {"hookviz:layer": layer, "hookviz:top": str(top.count)}
        written.append(write_png(picture, Path(out_dir) / f"top_{names[layer]}.png", metadata))
        with atomic_write(Path(out_dir) / f"top_{names[layer]}.json", "w", encoding="utf-8") as handle:
            json.dump(top_record(layer, top, paths, preprocessing.input_size, field_size), handle, indent=1)
    return written


def top_record(
    layer: str,
    top: TopActivations,
    paths: Sequence[Path],
    input_size: tuple[int, int],
    field_size: tuple[int, int] | None,
) -> dict[str, Any]:
    """``top_<layer>.json``: per channel, its most activating inputs with the value, the position of the maximum
    in the layer's output grid and the crop drawn, in model-input pixels (x0, y0, x1, y1)."""
    height, width = input_size
    channels = []
    if top.values is not None and top.images is not None and top.positions is not None:
        for channel in range(top.values.shape[0]):
            images = []
            for value, image, position in zip(
                top.values[channel].tolist(), top.images[channel].tolist(), top.positions[channel].tolist(), strict=True
            ):
                if not math.isfinite(value):
                    continue
                where = list(divmod(position, top.grid[1])) if len(top.grid) == 2 else None
                box = _crop_box(position, top.grid, input_size, field_size, (0.0, 0.0, float(width), float(height)))
                images.append({"input": str(paths[image]), "value": value, "position": where, "box": list(box)})
            channels.append({"channel": channel, "images": images})
    return {"layer": layer, "top": top.count, "grid": list(top.grid), "field": field_size, "channels": channels}
