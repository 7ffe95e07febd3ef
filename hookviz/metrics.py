"""How faithful is a saliency map to the model? Perturbation metrics, the randomization sanity check, pointing games.

Every metric takes the model, a batch of model inputs (B, C, H, W), maps (B, M, h, w) (any
resolution: they are upsampled bilinearly to the input's size; M maps per image, e.g. every
method's) and the class each map explains (B, M). The perturbed inputs of all maps and all steps
of a batch are built chunk by chunk and go through the model as batched forward passes under
``torch.inference_mode`` (``Scorer``), so memory is bounded by the chunk size, whatever the number
of steps and maps; the maps themselves are never recomputed.

* ``deletion`` / ``insertion`` (Petsiuk et al., RISE, BMVC 2018): pixels ordered by the map, most
  important first, are replaced by a blurred copy of the image (deletion) or restored from the image
  into its blurred copy (insertion) in ``steps`` steps; the score is the area under the class
  probability curve over the fraction of pixels changed. Lower deletion, higher insertion is better.
* ``drop`` / ``increase`` (Chattopadhay et al., Grad-CAM++, WACV 2018): the model's input multiplied
  by the map scaled to [0, 1]; Average Drop = max(0, p - o) / p and Increase in Confidence = [o > p],
  with p the class probability of the input and o that of the product.
* ``road`` (Rong et al., ROAD, ICML 2022): the p% most (MoRF) or least (LeRF) relevant pixels are
  replaced by noisy linear imputation (each removed pixel the weighted mean of its 8 neighbours, solved
  as one sparse linear system, plus Gaussian noise) for several p; the class probability averaged over p.
  Lower MoRF, higher LeRF, and a higher difference LeRF - MoRF is better.
* ``sanity`` (Adebayo et al., Sanity Checks for Saliency Maps, NeurIPS 2018): the parameters of a copy of
  the model are randomized block by block from the output down; after each step the map is compared with
  the original one (Spearman rank correlation, SSIM). A map that stays the same does not explain the model.
* ``pointing`` (Zhang et al., Top-down Neural Attention by Excitation Backprop, ECCV 2016) and ``energy``
  (the energy-based pointing game of Wang et al., Score-CAM, CVPRW 2020): with a ground-truth region,
  whether the map's maximum falls in it, and the share of the map's mass inside it.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .cams import compute_cams
from .errors import UsageError, did_you_mean
from .forward import run_model, select_logits
from .guided import guided_backprop
from .hooks import capture
from .methods import CAM_METHODS
from .spatial import spatial_output, to_spatial

METRICS = ("deletion", "insertion", "drop", "increase", "road", "sanity", "pointing", "energy")
DEFAULT_METRICS = ("deletion", "insertion", "drop", "increase", "road")
TRUTH_METRICS = ("pointing", "energy")  # need a ground-truth box or mask per image
# The numbers each metric adds to a map's record, and which way is better.
SCORES = {
    "deletion": ("deletion",),
    "insertion": ("insertion",),
    "drop": ("drop",),
    "increase": ("increase",),
    "road": ("road", "road_morf", "road_lerf"),
    "sanity": ("sanity_spearman", "sanity_ssim"),
    "pointing": ("pointing",),
    "energy": ("energy",),
}
LOWER_IS_BETTER = frozenset({"deletion", "drop", "road_morf", "sanity_spearman", "sanity_ssim"})
MAP_METHODS = (*CAM_METHODS, "guided", "random")  # what saliency_maps can draw
ROAD_PERCENTILES = (10, 20, 30, 40, 50, 60, 70, 80, 90)
ROAD_NOISE = 0.01  # the ROAD paper's noise: standard deviation added to imputed pixels (model-input units)
BLUR_KERNEL, BLUR_SIGMA = 11, 5.0  # RISE's blurred canvas (gkern(klen=11, nsig=5))
POINTING_TOLERANCE = 15  # pixels of the original image around the truth that still count as a hit (Zhang et al.)
INSENSITIVE_SPEARMAN = 0.5  # a map this rank-correlated with itself after full randomization is flagged


def check_metrics(names: Iterable[str]) -> list[str]:
    """The metric names in order, each once; an unknown name is a UsageError with close matches."""
    chosen = []
    for name in names:
        if name not in METRICS:
            hint = did_you_mean(name, METRICS) or f"; choose from {', '.join(METRICS)}"
            raise UsageError(f"unknown metric {name!r}{hint}")
        if name not in chosen:
            chosen.append(name)
    return chosen


def score_names(metrics: Iterable[str]) -> list[str]:
    """The numbers the given metrics produce per map, e.g. ``road`` -> road, road_morf, road_lerf."""
    return [score for metric in metrics for score in SCORES[metric]]


# --- running the model on many perturbed inputs -----------------------------------------------------


@dataclass
class Scorer:
    """Class probabilities of many inputs, ``chunk`` inputs per forward pass under ``torch.inference_mode``.

    ``pad_to``: the model takes exactly that many inputs (a .pt2 with a static batch); chunks are padded.

    Image batches go to the model in channels-last memory order, which a CPU's convolutions run faster
    (resnet50 at 224 px, 2 cores: 143 instead of 206 ms per image; the probabilities differ by < 1e-6).
    A model that cannot take such a tensor (one that ``view``s its input) gets ordinary contiguous ones.
    """

    model: nn.Module
    output_key: str | None = None
    chunk: int = 32
    pad_to: int | None = None
    channels_last: bool | None = None  # None: try it on the first batch

    def probabilities(self, inputs: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        """(N,) softmax probability of ``classes[n]`` for ``inputs[n]``, in one forward pass."""
        count = inputs.shape[0]
        if self.pad_to is not None and count < self.pad_to:
            inputs = torch.cat([inputs, inputs[-1:].expand(self.pad_to - count, *inputs.shape[1:])])
        with torch.inference_mode():
            logits = self._logits(inputs)[:count]
            return logits.float().softmax(dim=1).gather(1, classes.view(-1, 1).to(logits.device))[:, 0]

    def _logits(self, inputs: torch.Tensor) -> torch.Tensor:
        if self.channels_last is None:
            self.channels_last = inputs.dim() == 4
            if self.channels_last:
                try:
                    return self._logits(inputs)
                except (UsageError, RuntimeError):
                    self.channels_last = False
        if self.channels_last:
            inputs = inputs.contiguous(memory_format=torch.channels_last)
        return select_logits(run_model(self.model, inputs), self.output_key)

    def all_probabilities(self, inputs: torch.Tensor) -> torch.Tensor:
        """(N, num_classes) softmax of the model's scores for ``inputs``, ``chunk`` inputs per forward pass."""
        size = self.pad_to or self.chunk
        parts = []
        for start in range(0, inputs.shape[0], size):
            part = inputs[start : start + size]
            count = part.shape[0]
            if self.pad_to is not None and count < self.pad_to:
                part = torch.cat([part, part[-1:].expand(self.pad_to - count, *part.shape[1:])])
            with torch.inference_mode():
                logits = self._logits(part)[:count]
                parts.append(logits.float().softmax(dim=1))
        return torch.cat(parts)

    def stream(
        self, count: int, build: Callable[[int, int], tuple[torch.Tensor, torch.Tensor]], device: torch.device
    ) -> torch.Tensor:
        """(count,) probabilities of ``count`` inputs, built by ``build(start, stop)`` -> (inputs, classes)
        one chunk at a time, so only a chunk of perturbed inputs exists at once."""
        size = self.pad_to or self.chunk
        scores = torch.empty(count, device=device)
        for start in range(0, count, size):
            stop = min(count, start + size)
            inputs, classes = build(start, stop)
            scores[start:stop] = self.probabilities(inputs, classes)
        return scores


# --- maps at the input's resolution --------------------------------------------------------------------


def _size(inputs: torch.Tensor) -> tuple[int, int]:
    return int(inputs.shape[-2]), int(inputs.shape[-1])


def input_maps(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Maps (B, M, h, w) upsampled bilinearly (pixel centres aligned) to ``size`` = (H, W), as float32."""
    maps = maps.float()
    if tuple(maps.shape[-2:]) == tuple(size):
        return maps
    return F.interpolate(maps, size=size, mode="bilinear", align_corners=False)


def scaled_maps(maps: torch.Tensor) -> torch.Tensor:
    """Each map (..., H, W) min-max scaled to [0, 1]; a constant map becomes zeros."""
    flat = maps.flatten(-2)
    low, high = flat.min(dim=-1, keepdim=True).values, flat.max(dim=-1, keepdim=True).values
    span = high - low
    return torch.where(span > 0, (flat - low) / span.clamp_min(1e-30), torch.zeros_like(flat)).view_as(maps)


def pixel_ranks(maps: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """(B, M, H*W) long: each pixel's place when the map's pixels are ordered most important first.

    Ties (the zeros of a ReLU'd map) are ordered at random (seeded), not in raster order: removing
    the tied pixels row by row from the top would be a structured occlusion the map never asked for.
    """
    flat = maps.flatten(2)
    count = flat.shape[-1]
    generator = torch.Generator().manual_seed(seed)
    shuffle = torch.randperm(count, generator=generator).to(flat.device)
    order = shuffle[torch.argsort(flat[..., shuffle], dim=-1, descending=True, stable=True)]
    ranks = torch.empty_like(order)
    ranks.scatter_(-1, order, torch.arange(count, device=flat.device).expand_as(order))
    return ranks


def blurred(inputs: torch.Tensor, kernel_size: int = BLUR_KERNEL, sigma: float = BLUR_SIGMA) -> torch.Tensor:
    """A Gaussian-blurred copy of ``inputs`` (B, C, H, W) (RISE's canvas), edges padded by reflection."""
    radius = kernel_size // 2
    offsets = torch.arange(kernel_size, dtype=torch.float32, device=inputs.device) - radius
    weights = torch.exp(-(offsets**2) / (2 * sigma**2))
    weights = (weights / weights.sum()).to(inputs.dtype)
    batch, channels, height, width = inputs.shape
    planes = inputs.reshape(batch * channels, 1, height, width)
    mode = "reflect" if min(height, width) > radius else "replicate"
    planes = F.conv2d(F.pad(planes, (radius, radius, 0, 0), mode=mode), weights.view(1, 1, 1, -1))
    planes = F.conv2d(F.pad(planes, (0, 0, radius, radius), mode=mode), weights.view(1, 1, -1, 1))
    return planes.view(batch, channels, height, width)


# --- deletion and insertion (RISE) ---------------------------------------------------------------------


@dataclass
class Curves:
    """Deletion and insertion curves: ``deletion[b, m, s]`` is the class probability with a fraction
    ``fractions[s]`` of the pixels replaced by the blurred copy; insertion likewise with them restored.
    A curve that was not asked for (``deletion_insertion(curves=...)``) is None."""

    fractions: torch.Tensor  # (S + 1,) from 0 to 1
    deletion: torch.Tensor | None  # (B, M, S + 1)
    insertion: torch.Tensor | None  # (B, M, S + 1)

    def area(self, curve: torch.Tensor) -> torch.Tensor:
        """(B, M): the area under ``curve`` over the fraction of pixels (trapezoidal rule)."""
        return torch.trapezoid(curve, self.fractions.to(curve), dim=-1)


def pixel_counts(pixels: int, steps: int) -> list[int]:
    """How many pixels are changed at each of the ``steps`` + 1 points: 0, N/steps, ..., N (rounded down)."""
    return [step * pixels // steps for step in range(steps + 1)]


def deletion_insertion(
    scorer: Scorer,
    inputs: torch.Tensor,
    maps: torch.Tensor,
    classes: torch.Tensor,
    *,
    steps: int = 20,
    baseline: torch.Tensor | None = None,
    probabilities: torch.Tensor | None = None,
    seed: int = 0,
    curves: Sequence[str] = ("deletion", "insertion"),
) -> Curves:
    """RISE's deletion and insertion curves of every map, with ``steps`` steps.

    Args:
        scorer: the model (see ``Scorer``).
        inputs: model inputs (B, C, H, W).
        maps: (B, M, h, w) saliency maps, any resolution, higher = more important.
        classes: (B, M) the class each map explains.
        steps: the curves have ``steps`` + 1 points, from nothing to every pixel changed.
        baseline: the value of a removed pixel (B, C, H, W); default the blurred copy (``blurred``).
        probabilities: (B, num_classes) of the unchanged inputs, when already known.
        seed: orders tied pixels (``pixel_ranks``).
        curves: the curves to draw, ``deletion`` and/or ``insertion`` (each costs ``steps`` - 1 forward
            passes per map; the other is None in the result).
    """
    wanted = [curve for curve in ("deletion", "insertion") if curve in curves]
    if not wanted:
        raise ValueError(f"curves={tuple(curves)!r}: ask for deletion and/or insertion")
    batch, maps_per_image = classes.shape
    height, width = inputs.shape[-2:]
    pixels = height * width
    baseline = blurred(inputs) if baseline is None else baseline
    ranks = pixel_ranks(input_maps(maps, (height, width)), seed)
    counts = pixel_counts(pixels, steps)
    device = inputs.device
    original = (scorer.all_probabilities(inputs) if probabilities is None else probabilities.to(device)).float()
    ends = original.gather(1, classes.to(device))
    # The fully blurred input does not depend on the map: one forward pass per image.
    canvas = scorer.all_probabilities(baseline).gather(1, classes.to(device))
    interior = counts[1:-1]
    # Jobs: (image, map, point, curve) with curve 0 deletion, 1 insertion; only the curves asked for.
    kinds = torch.tensor([("deletion", "insertion").index(curve) for curve in wanted])
    jobs = torch.cartesian_prod(
        torch.arange(batch), torch.arange(maps_per_image), torch.arange(len(interior)), kinds
    ).to(device)
    interior_counts = torch.tensor(interior, device=device)
    flat_inputs, flat_baseline = inputs.flatten(2), baseline.flatten(2)

    def build(start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        b, m, point, curve = jobs[start:stop].unbind(1)
        changed = ranks[b, m] < interior_counts[point][:, None]  # (n, H*W): the most important pixels
        keep_original = torch.where(curve[:, None] == 0, ~changed, changed)[:, None]
        perturbed = torch.where(keep_original, flat_inputs[b], flat_baseline[b])
        return perturbed.view(-1, *inputs.shape[1:]), classes.to(device)[b, m]

    scores = scorer.stream(jobs.shape[0], build, device).view(batch, maps_per_image, len(interior), len(wanted))
    deletion = insertion = None
    if "deletion" in wanted:
        deletion = torch.cat([ends[..., None], scores[..., wanted.index("deletion")], canvas[..., None]], dim=-1)
    if "insertion" in wanted:
        insertion = torch.cat([canvas[..., None], scores[..., wanted.index("insertion")], ends[..., None]], dim=-1)
    fractions = torch.tensor(counts, dtype=torch.float64) / pixels
    return Curves(fractions=fractions.float(), deletion=deletion, insertion=insertion)


# --- Average Drop and Increase in Confidence (Grad-CAM++) ------------------------------------------------


def confidence_change(
    scorer: Scorer,
    inputs: torch.Tensor,
    maps: torch.Tensor,
    classes: torch.Tensor,
    probabilities: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(drop, increase), each (B, M): Grad-CAM++'s Average Drop max(0, p - o) / p and Increase in
    Confidence [o > p] per map, o the class probability of the input times the map scaled to [0, 1]."""
    batch, maps_per_image = classes.shape
    device = inputs.device
    scaled = scaled_maps(input_maps(maps, _size(inputs)))
    original = (scorer.all_probabilities(inputs) if probabilities is None else probabilities.to(device)).float()
    original = original.gather(1, classes.to(device))
    pairs = torch.cartesian_prod(torch.arange(batch), torch.arange(maps_per_image)).to(device)

    def build(start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        b, m = pairs[start:stop].unbind(1)
        return inputs[b] * scaled[b, m][:, None].to(inputs.dtype), classes.to(device)[b, m]

    explained = scorer.stream(pairs.shape[0], build, device).view(batch, maps_per_image)
    drop = (original - explained).clamp_min(0) / original.clamp_min(1e-12)
    return drop, (explained > original).float()


# --- ROAD: remove and debias -------------------------------------------------------------------------


def _neighbour_sum(values: torch.Tensor) -> torch.Tensor:
    """Weighted sum of each pixel's 8 neighbours (1/6 sideways, 1/12 diagonally; zero beyond the edge)."""
    height, width = values.shape[-2:]
    p = F.pad(values, (1, 1, 1, 1))
    sides = p[..., 0:height, 1 : width + 1] + p[..., 2:, 1 : width + 1]
    sides += p[..., 1 : height + 1, 0:width]
    sides += p[..., 1 : height + 1, 2:]
    corners = p[..., 0:height, 0:width] + p[..., 0:height, 2:]
    corners += p[..., 2:, 0:width]
    corners += p[..., 2:, 2:]
    return sides.mul_(2).add_(corners).div_(12)


def linear_imputation(
    inputs: torch.Tensor,
    removed: torch.Tensor,
    *,
    noise: float = ROAD_NOISE,
    generator: torch.Generator | None = None,
    tolerance: float = 1e-4,
    max_iterations: int = 2000,
) -> torch.Tensor:
    """ROAD's noisy linear imputation: every removed pixel becomes the weighted mean of its 8 neighbours
    (removed or not), plus Gaussian noise of standard deviation ``noise``.

    The means form one sparse symmetric positive definite system per image; it is solved for all channels
    at once by conjugate gradients (Jacobi preconditioned) to a relative residual of ``tolerance`` (pixel
    values then within about 3e-3 of the exact solution, well under the noise), where pytorch-grad-cam
    builds and factorizes a scipy matrix per image.

    Args:
        inputs: (N, C, H, W) model inputs.
        removed: (N, 1, H, W) bool, the pixels to replace.
    """
    values = inputs.float()

    def fill(n: int) -> torch.Tensor:
        return _cropped_fill(values[n : n + 1], removed[n : n + 1], tolerance, max_iterations)

    workers = min(len(values), _imputation_workers(values.device))  # (before _one_thread: torch's own count)
    with _one_thread():
        if workers > 1:  # each image on a core of its own (torch's ops release the GIL): the same numbers
            with ThreadPoolExecutor(workers) as pool:
                solved = torch.cat(list(pool.map(fill, range(len(values)))))
        else:
            solved = torch.cat([fill(n) for n in range(len(values))])
    if noise:
        solved = solved + noise * torch.randn(solved.shape, generator=generator).to(solved.device)
    return torch.where(removed, solved, values).to(inputs.dtype)


def _cropped_fill(values: torch.Tensor, removed: torch.Tensor, tolerance: float, max_iterations: int) -> torch.Tensor:
    """``_harmonic_fill`` on the smallest box holding the removed pixels and their neighbours: the solution
    elsewhere is the image itself, and a removed pixel's equation involves only its 8 neighbours."""
    rows = removed[0, 0].any(dim=1).nonzero()
    columns = removed[0, 0].any(dim=0).nonzero()
    if rows.numel() == 0:
        return values.clone()
    height, width = values.shape[-2:]
    top, bottom = max(0, int(rows[0]) - 1), min(height, int(rows[-1]) + 2)
    left, right = max(0, int(columns[0]) - 1), min(width, int(columns[-1]) + 2)
    solved = values.clone()
    box = (..., slice(top, bottom), slice(left, right))
    inside = _harmonic_fill(values[box], removed[box], tolerance, max_iterations)
    solved[box] = torch.where(removed[box], inside, values[box])
    return solved


def _imputation_workers(device: torch.device) -> int:
    """Threads solving imputations side by side: the process's torch threads (its share of the CPU) on a CPU."""
    return max(1, torch.get_num_threads()) if device.type == "cpu" else 1


@contextmanager
def _one_thread() -> Iterator[None]:
    """Torch on one thread for the block: the solver's many small ops (a few thousand per image) pay more for
    waking intra-op threads than they gain (on a busy 2-core machine, 4.5 s per 112x112 image instead of 0.1 s)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _harmonic_fill(values: torch.Tensor, removed: torch.Tensor, tolerance: float, max_iterations: int) -> torch.Tensor:
    """Conjugate gradients for one image (1, C, H, W): each image stops at its own convergence, and one image's
    vectors stay in the CPU's cache (a batch of 8 took twice as long per image)."""
    unknown = removed.to(values.dtype)
    weight = _neighbour_sum(torch.ones_like(unknown))  # the weights of neighbours inside the image
    inverse = unknown / weight  # Jacobi preconditioner (the weights differ only along the edges)
    right = unknown * _neighbour_sum(values * (1 - unknown))
    solution = torch.zeros_like(values)
    residual = right.clone()
    preconditioned = residual * inverse
    direction = preconditioned.clone()
    rz = (residual * preconditioned).sum(dim=(-2, -1), keepdim=True)
    limit = (right * right).sum(dim=(-2, -1), keepdim=True).clamp_min(1e-24) * tolerance**2
    for iteration in range(max_iterations):
        if iteration % 10 == 0 and bool(((residual * residual).sum(dim=(-2, -1), keepdim=True) <= limit).all()):
            break
        product = weight * direction
        product -= _neighbour_sum(direction)
        product *= unknown
        step = rz / (direction * product).sum(dim=(-2, -1), keepdim=True).clamp_min(1e-30)
        solution += step * direction
        residual -= step * product
        torch.mul(residual, inverse, out=preconditioned)
        rz_next = (residual * preconditioned).sum(dim=(-2, -1), keepdim=True)
        direction.mul_(rz_next / rz.clamp_min(1e-30)).add_(preconditioned)
        rz = rz_next
    return solution


@dataclass
class RoadScores:
    """ROAD's class probabilities after removing ``percentiles[p]``% of the pixels: ``morf[b, m, p]`` the most
    relevant first, ``lerf[b, m, p]`` the least relevant first."""

    percentiles: tuple[int, ...]
    morf: torch.Tensor  # (B, M, P)
    lerf: torch.Tensor  # (B, M, P)

    @property
    def difference(self) -> torch.Tensor:
        """(B, M): mean LeRF - mean MoRF; higher is better (pytorch-grad-cam's ROADCombined is half of it)."""
        return self.lerf.mean(dim=-1) - self.morf.mean(dim=-1)


def road(
    scorer: Scorer,
    inputs: torch.Tensor,
    maps: torch.Tensor,
    classes: torch.Tensor,
    *,
    percentiles: Sequence[int] = ROAD_PERCENTILES,
    noise: float = ROAD_NOISE,
    seed: int = 0,
) -> RoadScores:
    """ROAD (remove and debias): the class probability with the ``p``% most and least relevant pixels
    replaced by noisy linear imputation (``linear_imputation``), for each ``p`` in ``percentiles``.

    Args: as ``deletion_insertion``; ``noise`` is the imputation noise, ``seed`` seeds it and the ties.
    """
    batch, maps_per_image = classes.shape
    height, width = inputs.shape[-2:]
    pixels = height * width
    device = inputs.device
    ranks = pixel_ranks(input_maps(maps, (height, width)), seed)
    removed_counts = torch.tensor([round(p * pixels / 100) for p in percentiles], device=device)
    jobs = torch.cartesian_prod(
        torch.arange(batch), torch.arange(maps_per_image), torch.arange(len(percentiles)), torch.arange(2)
    ).to(device)
    generator = torch.Generator().manual_seed(seed)

    def build(start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        b, m, p, order = jobs[start:stop].unbind(1)
        count = removed_counts[p][:, None]
        rank = ranks[b, m]
        removed = torch.where(order[:, None] == 0, rank < count, rank >= pixels - count)
        imputed = linear_imputation(inputs[b], removed.view(-1, 1, height, width), noise=noise, generator=generator)
        return imputed, classes.to(device)[b, m]

    scores = scorer.stream(jobs.shape[0], build, device).view(batch, maps_per_image, len(percentiles), 2)
    return RoadScores(percentiles=tuple(percentiles), morf=scores[..., 0], lerf=scores[..., 1])


# --- pointing game and energy -------------------------------------------------------------------------


def pointing_game(maps: torch.Tensor, truth: torch.Tensor, near: torch.Tensor | None = None) -> torch.Tensor:
    """(B, M) 1.0 where the map's maximum lies in the truth region, else 0.0 (NaN without a region).

    Args:
        maps: (B, M, H, W) at the resolution of ``truth``.
        truth: (B, H, W) bool, the object's pixels.
        near: (B, H, W) bool, the region with the pointing game's tolerance (default ``truth``).
    """
    region = truth if near is None else near
    peak = maps.flatten(2).argmax(dim=-1)  # (B, M)
    hit = region.flatten(1).gather(1, peak).float()
    return torch.where(truth.flatten(1).any(dim=1, keepdim=True), hit, torch.full_like(hit, math.nan))


def energy_game(maps: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """(B, M) the share of each map's mass (scaled to [0, 1]) inside the truth region (NaN without one)."""
    scaled = scaled_maps(maps.float()).flatten(2)
    inside = (scaled * truth.flatten(1)[:, None].float()).sum(dim=-1)
    share = inside / scaled.sum(dim=-1).clamp_min(1e-12)
    return torch.where(truth.flatten(1).any(dim=1, keepdim=True), share, torch.full_like(share, math.nan))


# --- sanity: cascading model-parameter randomization -------------------------------------------------


def saliency_maps(
    model: nn.Module,
    inputs: torch.Tensor,
    classes: torch.Tensor,
    *,
    method: str,
    layer: str | None,
    output_key: str | None = None,
    seed: int = 0,
) -> torch.Tensor:
    """(B, K, h, w) maps of ``method`` for ``classes`` (B, K): a CAM method at ``layer``, ``guided``
    (guided backprop's |gradient| summed over colour channels, at the input's resolution) or ``random``
    (uniform noise at ``layer``'s resolution: the baseline every method should beat)."""
    if method == "guided":
        gradients, _, _ = guided_backprop(model, inputs, classes, output_key=output_key)
        return gradients.abs().sum(dim=2)
    if layer is None:
        raise UsageError(f"method {method} needs a layer")
    if method == "random":
        generator = torch.Generator().manual_seed(seed)
        noise = torch.rand((*classes.shape, *layer_size(model, inputs, layer)), generator=generator)
        return noise.to(inputs.device)
    if method not in CAM_METHODS:
        raise UsageError(f"unknown method {method!r}; choose one of: {', '.join(MAP_METHODS)}")
    maps = torch.empty(0)
    # compute_cams explains the same classes for every image: images are grouped by their classes.
    for row in torch.unique(classes.cpu(), dim=0):
        members = (classes.cpu() == row).all(dim=1).nonzero()[:, 0].to(inputs.device)
        part = compute_cams(
            model, inputs[members], layer=layer, method=method, classes=row.tolist(), output_key=output_key
        )
        if maps.numel() == 0:
            maps = part.maps.new_empty((classes.shape[0], *part.maps.shape[1:]))
        maps[members] = part.maps
    return maps


def layer_size(model: nn.Module, inputs: torch.Tensor, layer: str) -> tuple[int, int]:
    """(h, w) of ``layer``'s output as a map, for ``inputs``."""
    with capture(model, [layer]) as activations:
        run_model(model, inputs)
    output, layout = spatial_output(activations, layer, _size(inputs), activations.calls.get(layer, 0))
    height, width = to_spatial(output, layout).shape[-2:]
    return int(height), int(width)


def parameter_blocks(model: nn.Module) -> list[list[str]]:
    """The model's parameterized modules grouped into blocks, from the output down (the cascade's order).

    A block is a module name up to its first numeric part (``layer4.1``, ``_blocks.15``), or a top-level
    module (``fc``, ``_conv_head``); blocks are ordered by their last module's place in ``named_modules``.
    """
    blocks: dict[str, list[str]] = {}
    for name, module in model.named_modules():
        if not any(True for _ in module.parameters(recurse=False)):
            continue
        parts = name.split(".")
        cut = next((i + 1 for i, part in enumerate(parts) if part.isdigit()), 1)
        key = ".".join(parts[:cut])
        blocks.setdefault(key, []).append(name)
    ordered = sorted(blocks.items(), key=lambda item: _last_index(model, item[1][-1]))
    return [names for _, names in reversed(ordered)]


def _last_index(model: nn.Module, name: str) -> int:
    return [n for n, _ in model.named_modules()].index(name)


def model_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model``'s module tree with parameters and buffers of its own (the original is never changed).

    Each module is copied shallowly and given copies of its parameter, buffer and child dictionaries, so
    models that ``copy.deepcopy`` cannot copy (a torch.export program, whose graph holds fake tensors)
    copy too; a parameter shared by two modules stays shared in the copy.
    """
    copies: dict[int, object] = {}

    def copied(module: nn.Module) -> nn.Module:
        if id(module) in copies:
            return copies[id(module)]  # type: ignore[return-value]
        new = copy.copy(module)
        copies[id(module)] = new
        parameters = {}
        for key, parameter in module._parameters.items():
            if parameter is not None and id(parameter) not in copies:
                copies[id(parameter)] = nn.Parameter(parameter.detach().clone(), requires_grad=parameter.requires_grad)
            parameters[key] = None if parameter is None else copies[id(parameter)]
        new.__dict__["_parameters"] = parameters
        new.__dict__["_buffers"] = {key: None if b is None else b.clone() for key, b in module._buffers.items()}
        new.__dict__["_modules"] = {key: None if c is None else copied(c) for key, c in module._modules.items()}
        for name, value in module.__dict__.items():  # hook dictionaries of its own: hooks added to the copy stay there
            if name.endswith("hooks") and isinstance(value, dict):
                new.__dict__[name] = type(value)(value)
        return new

    return copied(model)


def randomize_parameters(module: nn.Module, generator: torch.Generator) -> None:
    """Replace each parameter of ``module`` (not its children) by Gaussian noise with the parameter's own mean
    and standard deviation, so activations keep their scale (Adebayo et al. re-initialize; a model file
    carries no initializer, and this needs none)."""
    with torch.no_grad():
        for parameter in module.parameters(recurse=False):
            values = parameter.detach().float()
            spread = values.std() if values.numel() > 1 else values.abs().clamp_min(1e-3)
            noise = torch.randn(values.shape, generator=generator).to(values.device)
            parameter.copy_((values.mean() + spread * noise).to(parameter.dtype))


@dataclass
class SanityCurves:
    """How each map changes as the model is randomized: after step s (``blocks[s]`` and every block above it
    randomized), ``spearman[b, k, s]`` and ``ssim[b, k, s]`` compare the map with the original one."""

    blocks: list[str]  # the block randomized at each step, from the output down
    spearman: torch.Tensor  # (B, K, S)
    ssim: torch.Tensor  # (B, K, S)


def cascading_randomization(
    model: nn.Module,
    inputs: torch.Tensor,
    classes: torch.Tensor,
    *,
    method: str,
    layer: str | None,
    original: torch.Tensor | None = None,
    output_key: str | None = None,
    max_steps: int | None = 8,
    seed: int = 0,
) -> SanityCurves:
    """Adebayo et al.'s cascading model-parameter randomization test on a copy of ``model``.

    Blocks (``parameter_blocks``) are randomized cumulatively from the output down; after each step the
    map of ``method`` for the same ``classes`` is compared with ``original`` (computed when None) at the
    input's resolution, each scaled to [0, 1]. ``max_steps`` spreads at most that many comparisons over the
    cascade (always including the first block and the whole model).
    """
    size = _size(inputs)
    if original is None:
        original = saliency_maps(model, inputs, classes, method=method, layer=layer, output_key=output_key, seed=seed)
    reference = scaled_maps(input_maps(original, size))
    randomized = model_copy(model)
    modules = dict(randomized.named_modules())
    blocks = parameter_blocks(randomized)
    checkpoints = set(range(len(blocks)))
    if max_steps is not None and len(blocks) > max_steps:
        checkpoints = {round(i * (len(blocks) - 1) / (max_steps - 1)) for i in range(max_steps)}
    generator = torch.Generator().manual_seed(seed)
    names, spearman, ssim = [], [], []
    for step, block in enumerate(blocks):
        for name in block:
            randomize_parameters(modules[name], generator)
        if step not in checkpoints:
            continue
        changed = saliency_maps(
            randomized, inputs, classes, method=method, layer=layer, output_key=output_key, seed=seed
        )
        changed = scaled_maps(input_maps(changed, size))
        names.append(block[0].rsplit(".", 1)[0] if len(block) > 1 else block[0])
        spearman.append(spearman_correlation(reference, changed))
        ssim.append(structural_similarity(reference, changed))
    return SanityCurves(blocks=names, spearman=torch.stack(spearman, dim=-1), ssim=torch.stack(ssim, dim=-1))


def _average_ranks(values: torch.Tensor) -> torch.Tensor:
    """Ranks (from 0) along the last dimension, ties given their mean rank (as scipy.stats.rankdata)."""
    flat = values.reshape(-1, values.shape[-1])
    ranks = torch.empty_like(flat, dtype=torch.float64)
    for row, (sorted_values, order) in enumerate(zip(*flat.sort(dim=-1), strict=True)):
        _, inverse, counts = torch.unique_consecutive(sorted_values, return_inverse=True, return_counts=True)
        ends = counts.cumsum(0).double()
        mean_rank = ends - (counts.double() + 1) / 2
        ranks[row, order] = mean_rank[inverse]
    return ranks.view(values.shape)


def spearman_correlation(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """(...,) Spearman rank correlation of maps (..., H, W) pixel by pixel (0 when a map is constant)."""
    a, b = _average_ranks(first.flatten(-2)), _average_ranks(second.flatten(-2))
    a, b = a - a.mean(dim=-1, keepdim=True), b - b.mean(dim=-1, keepdim=True)
    denominator = (a.square().sum(dim=-1) * b.square().sum(dim=-1)).sqrt()
    return torch.where(denominator > 0, (a * b).sum(dim=-1) / denominator.clamp_min(1e-30), 0.0).float()


def structural_similarity(
    first: torch.Tensor, second: torch.Tensor, window: int = 11, sigma: float = 1.5
) -> torch.Tensor:
    """(...,) mean SSIM (Wang et al. 2004: Gaussian window 11 x 11, sigma 1.5, K1 = 0.01, K2 = 0.03) of maps
    (..., H, W) with values in [0, 1]; the window shrinks for maps smaller than it."""
    shape = first.shape[:-2]
    height, width = first.shape[-2:]
    x = first.reshape(-1, 1, height, width).double()
    y = second.reshape(-1, 1, height, width).double()
    window = min(window, height, width)
    offsets = torch.arange(window, dtype=torch.float64) - (window - 1) / 2
    g = torch.exp(-(offsets**2) / (2 * sigma**2))
    kernel = (g / g.sum()).to(x.device)
    kernel = (kernel[:, None] * kernel[None, :])[None, None]

    def local(v: torch.Tensor) -> torch.Tensor:
        return F.conv2d(v, kernel)  # valid windows only, as skimage and the paper

    mu_x, mu_y = local(x), local(y)
    var_x = local(x * x) - mu_x**2
    var_y = local(y * y) - mu_y**2
    cov = local(x * y) - mu_x * mu_y
    c1, c2 = 0.01**2, 0.03**2
    ssim = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return ssim.mean(dim=(1, 2, 3)).float().view(shape)


def map_scores(
    scorer: Scorer,
    inputs: torch.Tensor,
    maps: torch.Tensor,
    classes: torch.Tensor,
    metrics: Sequence[str],
    *,
    steps: int = 20,
    probabilities: torch.Tensor | None = None,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """The numbers of the perturbation ``metrics`` (deletion, insertion, drop, increase, road) for maps
    (B, K, h, w) of ``classes`` (B, K): name -> (B, K), as ``score_names`` lists them."""
    scores: dict[str, torch.Tensor] = {}
    if probabilities is None:
        probabilities = scorer.all_probabilities(inputs)
    if "deletion" in metrics or "insertion" in metrics:
        asked = [name for name in ("deletion", "insertion") if name in metrics]
        curves = deletion_insertion(
            scorer, inputs, maps, classes, steps=steps, probabilities=probabilities, seed=seed, curves=asked
        )
        for name, curve in (("deletion", curves.deletion), ("insertion", curves.insertion)):
            if curve is not None:
                scores[name] = curves.area(curve)
    if "drop" in metrics or "increase" in metrics:
        drop, increase = confidence_change(scorer, inputs, maps, classes, probabilities)
        for name, values in (("drop", drop), ("increase", increase)):
            if name in metrics:
                scores[name] = values
    if "road" in metrics:
        removed = road(scorer, inputs, maps, classes, seed=seed)
        scores |= {"road": removed.difference, "road_morf": removed.morf.mean(-1), "road_lerf": removed.lerf.mean(-1)}
    return {name: values.float().cpu() for name, values in scores.items()}
