"""Pixel attribution for any activation function: gradient, input x gradient, SmoothGrad, Integrated Gradients.

Each method is a weighted sum of input gradients of a class score over some set of
model inputs ("rows"): the image itself (gradient, input x gradient), noisy copies
of it (SmoothGrad, Smilkov et al. 2017) or points on the straight path from a
baseline to it (Integrated Gradients, Sundararajan et al. 2017). The rows of a whole
batch go through the model ``batch_size`` at a time, each chunk with one forward
pass and one batched backward (``torch.autograd.grad``, ``is_grads_batched`` for K
classes); their gradients are added up per image as they come, so memory is bounded
by ``batch_size`` however many samples or steps are asked for.

Nothing here depends on the activation functions: unlike guided backpropagation,
which rewrites ReLUs, these work on SiLU, GELU and functional activations alike.

Shapes: inputs (B, C, H, W); attributions (B, K, C, H, W) for the K classes explained per image.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .cams import batched_gradients, compute_cams
from .errors import UsageError, did_you_mean
from .forward import run_model, select_logits
from .guided import guided_backprop
from .hooks import preserved_state
from .methods import SALIENCY_METHODS
from .targets import choose_classes

BASELINES = ("black", "blur", "noise")
# How Integrated Gradients approximates its path integral (Captum's names). Captum's "riemann_trapezoid" weighs
# its n points 1/n with halved ends, which sums to (n - 1)/n; here the trapezoid rule weighs them 1/(n - 1)
# (halved ends), which sums to 1, so ours is Captum's times n / (n - 1).
RULES = ("gausslegendre", "riemann_left", "riemann_middle", "riemann_right", "riemann_trapezoid")
BLUR_SIGMA = 1 / 20  # the blur baseline's Gaussian sigma, as a fraction of the input's longer side


def check_method(method: str) -> str:
    """``method`` if it is one of ``SALIENCY_METHODS``; else a UsageError with the close matches."""
    if method in SALIENCY_METHODS:
        return method
    hint = did_you_mean(method, SALIENCY_METHODS, fold_case=True)
    raise UsageError(f"unknown method {method!r}" + (hint or f"; choose one of: {', '.join(SALIENCY_METHODS)}"))


def check_settings(*, samples: int = 25, noise: float = 0.15, steps: int = 32, baseline: str = "black") -> None:
    """One-line UsageErrors for settings no method can use: samples or steps under 1, negative noise, an
    unknown baseline."""
    if samples < 1:
        raise UsageError(f"--samples must be 1 or more (got {samples})")
    if steps < 1:
        raise UsageError(f"--steps must be 1 or more (got {steps})")
    if not (math.isfinite(noise) and noise >= 0):
        raise UsageError(f"--noise must be a number 0 or more (got {noise})")
    if baseline not in BASELINES:
        hint = did_you_mean(baseline, BASELINES, fold_case=True)
        raise UsageError(f"unknown baseline {baseline!r}" + (hint or f"; choose one of: {', '.join(BASELINES)}"))


def integration_points(steps: int, rule: str = "gausslegendre") -> tuple[torch.Tensor, torch.Tensor]:
    """(alphas, weights) in float64: the path integral over alpha in [0, 1] is approximated by sum(w * f(alpha))."""
    if rule not in RULES:
        raise UsageError(f"unknown integration rule {rule!r}; choose one of: {', '.join(RULES)}")
    n = steps
    if rule == "gausslegendre":
        import numpy as np

        nodes, gauss_weights = np.polynomial.legendre.leggauss(n)
        return torch.from_numpy(0.5 * (1 + nodes)), torch.from_numpy(0.5 * gauss_weights)
    index = torch.arange(n, dtype=torch.float64)
    if rule == "riemann_trapezoid":
        if n < 2:
            raise UsageError("the trapezoid rule needs --steps 2 or more")
        weights = torch.full((n,), 1 / (n - 1), dtype=torch.float64)
        weights[[0, -1]] /= 2
        return index / (n - 1), weights
    offset = {"riemann_left": 0.0, "riemann_middle": 0.5, "riemann_right": 1.0}[rule]
    return (index + offset) / n, torch.full((n,), 1 / n, dtype=torch.float64)


def baseline_image(
    kind: str,
    inputs: torch.Tensor,
    mean: Sequence[float],
    std: Sequence[float],
    seed: int = 0,
) -> torch.Tensor:
    """The Integrated Gradients starting point for normalized ``inputs`` (B, C, H, W), in the same space.

    black: an all-black picture (pixel 0 normalized with ``mean``/``std``, not a zero tensor);
    blur: the input under a Gaussian blur (sigma = ``BLUR_SIGMA`` of the longer side);
    noise: uniform random pixels in [0, 1], normalized; drawn on the CPU with ``seed``, the same for every image.
    """
    check_settings(baseline=kind)
    shape = (1, inputs.shape[1], 1, 1)
    mean_t = torch.as_tensor(mean, dtype=inputs.dtype, device=inputs.device).reshape(-1)
    std_t = torch.as_tensor(std, dtype=inputs.dtype, device=inputs.device).reshape(-1)
    mean_t, std_t = mean_t.expand(inputs.shape[1]).reshape(shape), std_t.expand(inputs.shape[1]).reshape(shape)
    if kind == "black":
        return ((0 - mean_t) / std_t).expand_as(inputs).clone()
    if kind == "noise":
        generator = torch.Generator().manual_seed(seed)
        pixels = torch.rand(inputs.shape[1:], generator=generator).to(inputs)[None]
        return ((pixels - mean_t) / std_t).expand_as(inputs).clone()
    return gaussian_blur(inputs, BLUR_SIGMA * max(inputs.shape[-2:]))


def gaussian_blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    """A separable Gaussian blur of (B, C, H, W) with edge replication (so a constant image stays constant and
    blurring commutes with per-channel normalization)."""
    radius = max(1, math.ceil(3 * sigma))
    offsets = torch.arange(-radius, radius + 1, dtype=images.dtype, device=images.device)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    kernel = kernel / kernel.sum()
    channels = images.shape[1]
    out = F.pad(images, (radius, radius, 0, 0), mode="replicate")
    out = F.conv2d(out, kernel.view(1, 1, 1, -1).expand(channels, 1, 1, -1), groups=channels)
    out = F.pad(out, (0, 0, radius, radius), mode="replicate")
    return F.conv2d(out, kernel.view(1, 1, -1, 1).expand(channels, 1, -1, 1), groups=channels)


@dataclass
class Gradients:
    """Per image, the weighted sum of its rows' input gradients, and what the clean pass gave."""

    sums: torch.Tensor  # (B, K, C, H, W)
    classes: torch.Tensor  # (B, K)
    logits: torch.Tensor | None = None  # (B, num_classes) when the rows were the inputs themselves


def summed_gradients(
    model: nn.Module,
    rows: Callable[[int, int], torch.Tensor],
    count: int,
    per_image: int,
    classes: torch.Tensor | None,
    weights: torch.Tensor | None = None,
    *,
    top_k: int = 1,
    output_key: str | None = None,
    batch_size: int = 32,
    pad_to: int | None = None,
) -> Gradients:
    """Sum ``weights[s] * d score_k / d row`` over each image's ``per_image`` rows, ``batch_size`` rows per pass.

    Args:
        rows: ``rows(start, stop)`` builds model inputs ``start..stop-1`` (row r belongs to image
            ``r // per_image`` and is its sample/step ``r % per_image``), so they exist a chunk at a time.
        count: how many images (there are ``count * per_image`` rows).
        classes: (count, K) classes to explain; None to take each image's ``top_k`` from its own row
            (only when ``per_image`` is 1, the rows being the images themselves).
        weights: (per_image,) float64 weight of each sample/step (default 1).
        pad_to: the model takes exactly this many inputs per call (a .pt2 with a fixed batch): chunks are
            padded with copies of their last row.
    """
    if classes is None and per_image != 1:
        raise ValueError("classes must be given when each image has several rows")
    chunk = min(batch_size, pad_to) if pad_to else batch_size
    total = count * per_image
    sums: torch.Tensor | None = None
    chosen = classes
    logits_seen: list[torch.Tensor] = []
    with torch.inference_mode(False), preserved_state(model), torch.enable_grad():
        for start in range(0, total, chunk):
            stop = min(total, start + chunk)
            inputs = rows(start, stop).detach()
            n = stop - start
            if pad_to is not None and n < pad_to:
                inputs = torch.cat([inputs, inputs[-1:].expand(pad_to - n, *inputs.shape[1:])])
            inputs = inputs.clone().requires_grad_(True)
            logits = select_logits(run_model(model, inputs), output_key)
            if logits.dim() != 2:
                raise UsageError(
                    f"the model's output has shape {tuple(logits.shape)}, not (N, classes); use --output KEY"
                )
            logits = logits[:n]
            if per_image == 1:
                logits_seen.append(logits.detach())
            if classes is None:
                these = choose_classes(logits.detach(), None, top_k)
            else:
                if start == 0:
                    check_class_range(classes, logits.shape[1])
                image_index = torch.arange(start, stop, device=classes.device) // per_image
                these = classes[image_index].to(logits.device)
            gradient = batched_gradients(logits.gather(1, these), inputs)[:n].detach()  # (n, K, C, H, W)
            if sums is None:
                sums = gradient.new_zeros((count, these.shape[1], *gradient.shape[2:]))
            if weights is not None:
                step = torch.arange(start, stop) % per_image
                gradient = gradient * weights[step].to(gradient)[:, None, None, None, None]
            owner = (torch.arange(start, stop) // per_image).to(gradient.device)
            sums.index_add_(0, owner, gradient)
    assert sums is not None, "no rows"
    logits_all = torch.cat(logits_seen) if logits_seen else None
    if chosen is None:
        assert logits_all is not None
        chosen = choose_classes(logits_all, None, top_k)
    return Gradients(sums, chosen, logits_all)


def check_class_range(classes: torch.Tensor, num_classes: int) -> None:
    """A UsageError naming the first class index that the model's ``num_classes`` outputs do not have."""
    outside = classes[(classes < 0) | (classes >= num_classes)]
    if outside.numel():
        raise UsageError(f"--class {int(outside[0])} is out of range: this model has classes 0..{num_classes - 1}")


def class_logits(
    model: nn.Module,
    inputs: torch.Tensor,
    *,
    output_key: str | None = None,
    batch_size: int = 32,
    pad_to: int | None = None,
) -> torch.Tensor:
    """The class scores (B, num_classes) of ``inputs``, without autograd, ``batch_size`` (or ``pad_to``) at a time."""
    chunk = min(batch_size, pad_to) if pad_to else batch_size
    parts = []
    with torch.no_grad(), preserved_state(model):
        for start in range(0, inputs.shape[0], chunk):
            part = inputs[start : start + chunk]
            n = part.shape[0]
            if pad_to is not None and n < pad_to:
                part = torch.cat([part, part[-1:].expand(pad_to - n, *part.shape[1:])])
            logits = select_logits(run_model(model, part), output_key)
            if logits.dim() != 2:
                raise UsageError(
                    f"the model's output has shape {tuple(logits.shape)}, not (N, classes); use --output KEY"
                )
            parts.append(logits[:n])
    return torch.cat(parts)


def _as_classes(classes: torch.Tensor | Sequence[int] | None, count: int, device: torch.device) -> torch.Tensor | None:
    if classes is None or isinstance(classes, torch.Tensor):
        return classes
    if not len(classes):
        return None
    return torch.tensor(list(classes), device=device).expand(count, -1)


def gradient(
    model: nn.Module,
    inputs: torch.Tensor,
    classes: torch.Tensor | Sequence[int] | None = None,
    *,
    top_k: int = 1,
    output_key: str | None = None,
    batch_size: int = 32,
    pad_to: int | None = None,
) -> Gradients:
    """Saliency (Simonyan et al. 2014) without the absolute value: d score / d input, per image and class.

    ``classes``: (B, K) per image, or class indices for every image, or None for each image's ``top_k``.
    """
    return summed_gradients(
        model,
        lambda start, stop: inputs[start:stop],
        inputs.shape[0],
        1,
        _as_classes(classes, inputs.shape[0], inputs.device),
        top_k=top_k,
        output_key=output_key,
        batch_size=batch_size,
        pad_to=pad_to,
    )


def smoothgrad(
    model: nn.Module,
    inputs: torch.Tensor,
    classes: torch.Tensor,
    *,
    samples: int = 25,
    noise_level: float = 0.15,
    noise: torch.Tensor | None = None,
    seed: int = 0,
    output_key: str | None = None,
    batch_size: int = 32,
    pad_to: int | None = None,
) -> torch.Tensor:
    """SmoothGrad (Smilkov et al. 2017): the mean gradient over ``samples`` noisy copies of each image.

    Args:
        classes: (B, K) classes to explain (chosen on the clean images).
        noise_level: the noise's standard deviation as a fraction of each image's value range
            (max - min over all its channels and pixels), the paper's sigma / (x_max - x_min).
        noise: (B, samples, C, H, W) the noise itself, to replay exactly (then ``noise_level`` is unused).
        seed: seeds the standard normal noise: sample s of every image is drawn on the CPU by a generator
            seeded with (seed, s), so an image's result does not depend on the device, the batch size or
            the other images of its batch (a resumed or sharded run gives the same pictures).

    Returns:
        (B, K, C, H, W) mean gradients.
    """
    count = inputs.shape[0]
    if noise is not None:
        if noise.shape != (count, samples, *inputs.shape[1:]):
            raise ValueError(f"noise must have shape {(count, samples, *inputs.shape[1:])}, not {tuple(noise.shape)}")

        def rows(start: int, stop: int) -> torch.Tensor:
            index = torch.arange(start, stop)
            return inputs[index // samples] + noise.flatten(0, 1)[index].to(inputs)

    else:
        flat = inputs.detach().flatten(1)
        sigma = noise_level * (flat.max(dim=1).values - flat.min(dim=1).values)  # (B,)

        def rows(start: int, stop: int) -> torch.Tensor:
            owner = torch.arange(start, stop) // samples
            drawn = torch.stack([sample_noise(seed, r % samples, inputs.shape[1:]) for r in range(start, stop)])
            return inputs[owner] + drawn.to(inputs) * sigma[owner.to(sigma.device)][:, None, None, None]

    sums = summed_gradients(
        model, rows, count, samples, classes, output_key=output_key, batch_size=batch_size, pad_to=pad_to
    ).sums
    return sums / samples


def sample_noise(seed: int, sample: int, shape: Sequence[int]) -> torch.Tensor:
    """SmoothGrad's standard normal noise for sample ``sample`` (float32, CPU): the same for a seed wherever it is
    drawn."""
    return torch.randn(tuple(shape), generator=torch.Generator().manual_seed(seed * 1_000_003 + sample))


def integrated_gradients(
    model: nn.Module,
    inputs: torch.Tensor,
    classes: torch.Tensor,
    baseline: torch.Tensor,
    *,
    steps: int = 32,
    rule: str = "gausslegendre",
    output_key: str | None = None,
    batch_size: int = 32,
    pad_to: int | None = None,
) -> torch.Tensor:
    """Integrated Gradients (Sundararajan et al. 2017): (x - x') * integral_0^1 d score(x' + a (x - x')) / dx da.

    The integral is approximated with ``steps`` points of ``rule`` (see ``integration_points``); all
    B x steps path points go through the model ``batch_size`` at a time. By completeness, each image's
    attributions add up to score(x) - score(x'), up to the integration error.

    Returns:
        (B, K, C, H, W) attributions for the (B, K) ``classes``.
    """
    alphas, weights = integration_points(steps, rule)
    difference = inputs - baseline
    alpha_on = alphas.to(inputs)

    def rows(start: int, stop: int) -> torch.Tensor:
        index = torch.arange(start, stop)
        owner = index // steps
        return baseline[owner] + alpha_on[index % steps][:, None, None, None].to(inputs.device) * difference[owner]

    sums = summed_gradients(
        model,
        rows,
        inputs.shape[0],
        steps,
        classes,
        weights,
        output_key=output_key,
        batch_size=batch_size,
        pad_to=pad_to,
    ).sums
    return difference[:, None] * sums


@dataclass
class AttributionBatch:
    """Pixel attributions for a batch: ``attributions[b, k]`` explains class ``classes[b, k]`` for image b."""

    attributions: torch.Tensor  # (B, K, C, H, W), at the model input's resolution
    classes: torch.Tensor  # (B, K) long
    probabilities: torch.Tensor  # (B, num_classes)
    method: str
    settings: dict[str, Any] = field(default_factory=dict)  # samples/noise/steps/baseline/rule, as used
    cams: torch.Tensor | None = None  # (B, K, H, W) in [0, 1]: the Grad-CAM maps the attributions were multiplied by
    layer: str | None = None
    layer_calls: int | None = None


def method_settings(
    method: str, *, samples: int, noise: float, steps: int, baseline: str, rule: str, seed: int
) -> dict[str, Any]:
    """The settings that decide ``method``'s result (and only those), for records and manifests."""
    if method == "smoothgrad":
        return {"samples": samples, "noise": noise, "seed": seed}
    if method == "integrated-gradients":
        return {"steps": steps, "baseline": baseline, "rule": rule, **({"seed": seed} if baseline == "noise" else {})}
    return {}


def compute_attributions(
    model: nn.Module,
    batch: torch.Tensor,
    *,
    method: str = "smoothgrad",
    classes: Sequence[int] | None = None,
    top_k: int = 1,
    samples: int = 25,
    noise: float = 0.15,
    steps: int = 32,
    baseline: str = "black",
    rule: str = "gausslegendre",
    mean: Sequence[float] = (0.485, 0.456, 0.406),
    std: Sequence[float] = (0.229, 0.224, 0.225),
    seed: int = 0,
    layer: str | None = None,
    output_key: str | None = None,
    batch_size: int = 32,
    fixed_batch: int | None = None,
    layer_calls: int | None = None,
) -> AttributionBatch:
    """Explain ``classes`` (or each image's top-k predictions) for a batch of model inputs, pixel by pixel.

    Args:
        model: any ``nn.Module``, any activation functions; left as it was (modes, ``.grad``, hooks).
        batch: normalized model inputs (B, C, H, W) on the model's device.
        method: one of ``SALIENCY_METHODS`` ("guided" needs nn.ReLU/ReLU6 modules).
        samples, noise: SmoothGrad's noisy copies per image and noise level (fraction of the image's range).
        steps, baseline, rule: Integrated Gradients' path points, starting image (``BASELINES``) and
            integration rule (``RULES``).
        mean, std: the normalization of ``batch`` (for the black and noise baselines).
        seed: seeds SmoothGrad's noise and the noise baseline.
        layer: also compute the Grad-CAM map of this layer for the same classes, and multiply the
            attributions by it (upsampled, in [0, 1]), as guided Grad-CAM does for guided backprop.
        batch_size: model inputs per forward pass (noisy samples and path points included).
        fixed_batch: the model takes exactly this many inputs per call (a .pt2 with a static batch).
        layer_calls: see ``cams.compute_cams``.

    Returns:
        ``AttributionBatch`` with attributions (B, K, C, H, W) at the input's resolution.
    """
    check_method(method)
    check_settings(samples=samples, noise=noise, steps=steps, baseline=baseline)
    count = batch.shape[0]
    padded = batch  # what methods that run the model on the batch as a whole (Grad-CAM, guided) are given
    if fixed_batch is not None and count < fixed_batch:
        padded = torch.cat([batch, batch[-1:].expand(fixed_batch - count, *batch.shape[1:])])
    wanted = _as_classes(classes, count, batch.device)
    probabilities: torch.Tensor | None = None
    cams = None
    if layer is not None:
        from .render import normalize_map

        cam = compute_cams(
            model,
            padded,
            layer=layer,
            classes=classes,
            top_k=top_k,
            output_key=output_key,
            layer_calls=layer_calls,
            fixed_batch=fixed_batch,
        )
        wanted, probabilities, layer_calls = cam.classes[:count], cam.probabilities[:count], cam.layer_calls
        cams = F.interpolate(
            normalize_map(cam.maps[:count].float()), size=batch.shape[-2:], mode="bilinear", align_corners=False
        )
    if method == "guided":
        if wanted is not None and wanted.shape[0] < padded.shape[0]:
            wanted = torch.cat([wanted, wanted[-1:].expand(padded.shape[0] - count, -1)])
        attributions, chosen, probs = guided_backprop(model, padded, wanted, top_k=top_k, output_key=output_key)
        attributions, chosen, probs = attributions[:count], chosen[:count], probs[:count]
    elif method in ("gradient", "inputxgradient"):
        result = gradient(
            model, batch, wanted, top_k=top_k, output_key=output_key, batch_size=batch_size, pad_to=fixed_batch
        )
        assert result.logits is not None  # the rows are the inputs themselves
        attributions, chosen, probs = result.sums, result.classes, result.logits.softmax(dim=1)
        if method == "inputxgradient":
            attributions = batch[:, None] * attributions
    else:
        if wanted is None or probabilities is None:  # the classes and scores of the clean images
            logits = class_logits(model, batch, output_key=output_key, batch_size=batch_size, pad_to=fixed_batch)
            if wanted is not None:
                check_class_range(wanted, logits.shape[1])
            wanted = wanted if wanted is not None else choose_classes(logits, None, top_k)
            probabilities = logits.softmax(dim=1)
        chosen, probs = wanted, probabilities
        if method == "smoothgrad":
            attributions = smoothgrad(
                model,
                batch,
                wanted,
                samples=samples,
                noise_level=noise,
                seed=seed,
                output_key=output_key,
                batch_size=batch_size,
                pad_to=fixed_batch,
            )
        else:
            attributions = integrated_gradients(
                model,
                batch,
                wanted,
                baseline_image(baseline, batch, mean, std, seed),
                steps=steps,
                rule=rule,
                output_key=output_key,
                batch_size=batch_size,
                pad_to=fixed_batch,
            )
    probabilities = probabilities if probabilities is not None else probs
    if cams is not None:
        attributions = attributions * cams[:, :, None]
    return AttributionBatch(
        attributions=attributions.detach(),
        classes=chosen,
        probabilities=probabilities.detach(),
        method=method,
        settings=method_settings(
            method, samples=samples, noise=noise, steps=steps, baseline=baseline, rule=rule, seed=seed
        ),
        cams=cams,
        layer=layer,
        layer_calls=layer_calls,
    )


def attribution_heat(attributions: torch.Tensor) -> torch.Tensor:
    """|attribution| summed over the channels: (..., C, H, W) -> (..., H, W)."""
    return attributions.abs().sum(dim=-3)


def heat_scaled(heat: torch.Tensor, percentile: float = 99.0) -> torch.Tensor:
    """A non-negative (H, W) map scaled to [0, 1] for display: the ``percentile``-th value becomes 1 (and above
    it stays 1), so a few extreme pixels do not leave the rest dark. A map of zeros stays zeros."""
    flat = heat.flatten().float()
    top = torch.quantile(flat[:: max(1, flat.numel() // 1_000_000)], percentile / 100) if flat.numel() else flat.sum()
    if float(top) <= 0:
        top = flat.max()
    return (heat / top).clamp(0, 1) if float(top) > 0 else torch.zeros_like(heat)
