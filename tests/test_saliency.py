"""Pixel attribution (``hookviz saliency``, hookviz.attribution) for any activation function.

Each method is checked three ways on models with SiLU and GELU (which guided backprop cannot guide):
against Captum on the same model, target and input; against the paper's formula written out here in
float64 (an explicit loop over noisy copies or path points); and by what the method promises
(Integrated Gradients' completeness). Then the command: files at the original's resolution, records,
one-line errors, and on the pretrained demo model, heat on the cat.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from captum.attr import InputXGradient, IntegratedGradients, NoiseTunnel, Saliency
from cli_helpers import assert_usage_error, hookviz, json_lines, read_manifest, write_noise_image
from PIL import Image
from torch import nn

from hookviz.attribution import (
    attribution_heat,
    baseline_image,
    compute_attributions,
    gradient,
    integrated_gradients,
    sample_noise,
    smoothgrad,
)
from hookviz.cams import compute_cams
from hookviz.errors import UsageError
from hookviz.guided import compute_guided, guided_backprop, relu_modules
from hookviz.models import load_model
from hookviz.pipeline import prepare_image
from hookviz.preprocessing import IMAGENET_MEAN, IMAGENET_STD
from hookviz.render import heat_in_image, normalize_map


class SmoothNet(nn.Module):
    """conv-act-conv-act-GAP-linear with a smooth activation (SiLU or GELU): no nn.ReLU anywhere."""

    def __init__(self, activation: type[nn.Module] = nn.SiLU, num_classes: int = 5, seed: int = 0) -> None:
        super().__init__()
        generator_state = torch.random.get_rng_state()
        torch.manual_seed(seed)
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.act1 = activation()
        self.conv2 = nn.Conv2d(8, 12, 3, stride=2, padding=1)
        self.act2 = activation()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(12, num_classes)
        self.fc.weight.data.mul_(8)  # scores that depend on the image: gradients of order 0.01 to 1
        torch.random.set_rng_state(generator_state)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act2(self.conv2(self.act1(self.conv1(x))))
        return self.fc(self.pool(x).flatten(1))


@pytest.fixture(params=[nn.SiLU, nn.GELU], ids=["silu", "gelu"])
def smooth_net(request: pytest.FixtureRequest) -> nn.Module:
    return SmoothNet(request.param).eval()


def images(count: int = 2, size: int = 24, seed: int = 1) -> torch.Tensor:
    return torch.randn(count, 3, size, size, generator=torch.Generator().manual_seed(seed))


def close(ours: torch.Tensor, theirs: torch.Tensor, tolerance: float) -> None:
    """Equal to ``tolerance`` relative to the reference's largest value, which must not be negligible."""
    scale = float(theirs.abs().max())
    assert scale > 1e-3, "the reference is all (near) zero: the comparison would prove nothing"
    torch.testing.assert_close(ours, theirs, rtol=0, atol=tolerance * scale)


# --- agreement with Captum ---------------------------------------------------------------------------


def test_gradient_and_input_x_gradient_match_captum(smooth_net: nn.Module) -> None:
    x, classes = images(), torch.tensor([[1, 4], [3, 0]])  # two classes per image, different per image

    ours = gradient(smooth_net, x, classes, batch_size=1).sums  # one image per pass: chunks add up correctly
    for k in range(2):
        theirs = Saliency(smooth_net).attribute(x, target=classes[:, k].tolist(), abs=False)
        close(ours[:, k], theirs, 1e-5)

    result = compute_attributions(smooth_net, x, method="inputxgradient", classes=[2, 4])
    for k, c in enumerate([2, 4]):
        close(result.attributions[:, k], InputXGradient(smooth_net).attribute(x, target=c), 1e-5)
    assert result.classes.tolist() == [[2, 4], [2, 4]]


def test_a_vision_transformer_gets_the_same_attributions_as_from_captum() -> None:
    # torchvision's own ViT code (GELU, tokens, attention), at a size a test can afford.
    torch.manual_seed(0)
    model = torchvision.models.VisionTransformer(
        image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64, num_classes=6
    ).eval()
    nn.init.normal_(model.heads.head.weight, std=0.5)  # torchvision zero-initializes it: every gradient would be 0
    x = images(2, size=32, seed=3)

    result = compute_attributions(model, x, method="inputxgradient", top_k=1)
    theirs = InputXGradient(model).attribute(x, target=result.classes[:, 0].tolist())
    close(result.attributions[:, 0], theirs, 1e-5)

    start = baseline_image("blur", x, IMAGENET_MEAN, IMAGENET_STD)
    ours = integrated_gradients(model, x, result.classes, start, steps=8)[:, 0]
    theirs = IntegratedGradients(model).attribute(x, start, target=result.classes[:, 0].tolist(), n_steps=8)
    close(ours, theirs, 1e-4)


@pytest.mark.parametrize("rule", ["gausslegendre", "riemann_left", "riemann_middle", "riemann_right"])
def test_integrated_gradients_match_captum(smooth_net: nn.Module, rule: str) -> None:
    x, classes = images(), torch.tensor([[2], [0]])
    start = baseline_image("black", x, IMAGENET_MEAN, IMAGENET_STD)

    ours = integrated_gradients(smooth_net, x, classes, start, steps=12, rule=rule, batch_size=5)[:, 0]
    theirs = IntegratedGradients(smooth_net).attribute(
        x, start, target=classes[:, 0].tolist(), n_steps=12, method=rule, internal_batch_size=5
    )
    close(ours, theirs, 1e-4)


def test_trapezoid_rule_weighs_to_one_where_captum_weighs_to_n_minus_one_over_n(smooth_net: nn.Module) -> None:
    # Captum's riemann_trapezoid puts its n points at linspace(0, 1, n) but weighs them 1/n (ends halved), so its
    # weights sum to (n - 1)/n; the trapezoid rule on that grid weighs them 1/(n - 1). Ours = Captum's * n/(n - 1).
    x, classes, n = images(), torch.tensor([[1], [1]]), 10
    start = baseline_image("blur", x, IMAGENET_MEAN, IMAGENET_STD)
    ours = integrated_gradients(smooth_net, x, classes, start, steps=n, rule="riemann_trapezoid")[:, 0]
    theirs = IntegratedGradients(smooth_net).attribute(x, start, target=1, n_steps=n, method="riemann_trapezoid")
    close(ours, theirs * n / (n - 1), 1e-4)


def test_smoothgrad_matches_captum_with_the_same_noise(smooth_net: nn.Module) -> None:
    x, samples, stdev = images(), 4, 0.3
    torch.manual_seed(7)
    theirs = NoiseTunnel(Saliency(smooth_net)).attribute(
        x, nt_type="smoothgrad", nt_samples=samples, stdevs=stdev, target=3, abs=False
    )
    # Captum's draw: one normal sample per element of the inputs repeated nt_samples times (image-major).
    torch.manual_seed(7)
    noise = torch.normal(0, torch.tensor(stdev).repeat((2 * samples, *x.shape[1:])))

    ours = smoothgrad(smooth_net, x, torch.tensor([[3], [3]]), samples=samples, noise=noise.unflatten(0, (2, samples)))
    close(ours[:, 0], theirs, 1e-5)


# --- the papers' formulas, written out in float64 ----------------------------------------------------


def loop_gradient(model: nn.Module, point: torch.Tensor, c: int) -> torch.Tensor:
    """d model(point)[0, c] / d point for one (1, C, H, W) point, by plain autograd."""
    point = point.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(model(point)[0, c], point)
    return grad


def test_integrated_gradients_is_the_path_integral_and_complete() -> None:
    model = SmoothNet(nn.GELU, seed=3).double().eval()
    x = images(1, seed=4).double()
    start = baseline_image("noise", x, IMAGENET_MEAN, IMAGENET_STD, seed=5)
    m, c = 20, 2
    # Sundararajan et al., eq. (3): (x - x') * (1/m) sum_{k=1..m} dF(x' + k/m (x - x'))/dx
    expected = (x - start) * sum(loop_gradient(model, start + k / m * (x - start), c) for k in range(1, m + 1)) / m

    ours = integrated_gradients(model, x, torch.tensor([[c]]), start, steps=m, rule="riemann_right", batch_size=7)
    torch.testing.assert_close(ours[:, 0], expected, rtol=1e-10, atol=1e-12)

    # Completeness: the attributions add up to F(x) - F(x'), up to the integration error.
    for baseline in ("black", "blur", "noise"):
        start = baseline_image(baseline, x, IMAGENET_MEAN, IMAGENET_STD, seed=0)
        with torch.no_grad():
            difference = float(model(x)[0, c] - model(start)[0, c])
        result = compute_attributions(model, x, method="integrated-gradients", classes=[c], steps=48, baseline=baseline)
        assert abs(difference) > 0.01
        assert float(result.attributions.sum()) == pytest.approx(difference, rel=0.01)


def test_integrated_gradients_is_complete_on_a_relu_network_with_enough_steps(nets) -> None:
    # A ReLU network is piecewise linear: its path integrand jumps, so completeness needs more steps.
    model, x = nets.build_clinet().eval(), images(2, size=16, seed=8)
    result = compute_attributions(model, x, method="integrated-gradients", classes=[2, 6], steps=64)
    start = baseline_image("black", x, IMAGENET_MEAN, IMAGENET_STD)
    with torch.no_grad():
        differences = model(x)[:, [2, 6]] - model(start)[:, [2, 6]]
    assert differences.abs().min() > 1
    sums = result.attributions.flatten(2).sum(dim=2)  # (B, K)
    torch.testing.assert_close(sums, differences, rtol=0.01, atol=0)


def test_smoothgrad_is_the_mean_gradient_over_noisy_copies() -> None:
    model = SmoothNet(nn.SiLU, seed=5).double().eval()
    x = images(2, seed=6).double()
    samples, level, seed = 5, 0.2, 11
    result = compute_attributions(model, x, method="smoothgrad", top_k=1, samples=samples, noise=level, seed=seed)

    for b in range(2):
        c = int(result.classes[b, 0])
        assert c == int(model(x[b : b + 1]).argmax())  # chosen on the clean image
        sigma = level * float(x[b].max() - x[b].min())  # Smilkov et al.: sigma / (x_max - x_min) = noise level
        copies = [x[b : b + 1] + sigma * sample_noise(seed, s, x.shape[1:]).double() for s in range(samples)]
        expected = sum(loop_gradient(model, copy, c) for copy in copies) / samples
        torch.testing.assert_close(result.attributions[b, 0], expected[0], rtol=1e-10, atol=1e-12)
    assert result.settings == {"samples": samples, "noise": level, "seed": seed}


def test_an_image_gets_the_same_attribution_whatever_its_batch() -> None:
    # Noise is seeded per sample, so a resumed, sharded or re-batched run draws the same pictures.
    model = SmoothNet(nn.SiLU).eval()
    x = images(3)
    for method in ("smoothgrad", "integrated-gradients"):
        options = {"method": method, "samples": 6, "steps": 6, "baseline": "noise", "classes": [1]}
        together = compute_attributions(model, x, batch_size=4, **options).attributions
        alone = compute_attributions(model, x[2:], batch_size=1, **options).attributions
        padded = compute_attributions(model, x[2:], batch_size=4, fixed_batch=4, **options).attributions
        torch.testing.assert_close(alone[0], together[2], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(padded[0], together[2], rtol=1e-5, atol=1e-7)


def test_with_a_layer_the_attribution_is_weighted_by_its_grad_cam() -> None:
    model = SmoothNet(nn.SiLU).eval()
    x = images(2, size=32)
    plain = compute_attributions(model, x, method="gradient", top_k=2)
    product = compute_attributions(model, x, method="gradient", top_k=2, layer="act2")
    cam = compute_cams(model, x, layer="act2", top_k=2)
    weights = torch.nn.functional.interpolate(normalize_map(cam.maps), size=(32, 32), mode="bilinear")

    assert torch.equal(product.classes, cam.classes) and torch.equal(plain.classes, cam.classes)
    close(product.attributions, plain.attributions * weights[:, :, None], 1e-6)
    assert product.attributions.abs().sum() < plain.attributions.abs().sum()


def test_the_model_is_left_as_it_was() -> None:
    model = SmoothNet(nn.GELU).train()
    for method in ("gradient", "smoothgrad", "integrated-gradients"):
        compute_attributions(model, images(1), method=method, samples=2, steps=2, layer="act2")
        assert model.training
        assert all(p.grad is None for p in model.parameters())
        assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    with pytest.raises(UsageError):  # a failure half-way (here: a class the model does not have) changes nothing
        compute_attributions(model, images(1), method="smoothgrad", classes=[9], samples=2)
    assert model.training and all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("method", ["gradient", "smoothgrad", "integrated-gradients"])
def test_library_errors_are_one_line_usage_errors(method: str) -> None:
    model = SmoothNet().eval()
    with pytest.raises(UsageError) as error:
        compute_attributions(model, images(1), method=method, classes=[5], samples=1, steps=1)
    assert str(error.value) == "--class 5 is out of range: this model has classes 0..4"
    with pytest.raises(UsageError, match=r"^unknown method 'Smooth-Grad'; did you mean smoothgrad\?$"):
        compute_attributions(model, images(1), method="Smooth-Grad")


# --- guided backprop needs ReLUs ---------------------------------------------------------------------

GUIDED_ERROR = (
    "guided backpropagation needs nn.ReLU/ReLU6 modules and this model has none (its activations would not be "
    "guided); use 'hookviz saliency -m smoothgrad' (or gradient, inputxgradient, integrated-gradients), which work "
    "with any activation, or 'hookviz gradcam'"
)


@pytest.mark.parametrize("build", [lambda: SmoothNet(nn.SiLU), lambda: torchvision.models.efficientnet_b0()])
def test_guided_refuses_models_without_relus(build) -> None:
    model = build().eval()
    with pytest.raises(UsageError) as error:
        relu_modules(model)
    assert str(error.value) == GUIDED_ERROR
    with pytest.raises(UsageError, match="needs nn.ReLU/ReLU6"):
        guided_backprop(model, images(1, size=32))


def test_saliency_guided_is_guided_backprop_and_with_a_layer_guided_gradcam(nets) -> None:
    model, x = nets.build_clinet().eval(), images(2, size=16)
    expected, classes, _ = guided_backprop(model, x, top_k=1)
    result = compute_attributions(model, x, method="guided")
    assert torch.equal(result.classes, classes)
    torch.testing.assert_close(result.attributions, expected)

    with_layer = compute_attributions(model, x, method="guided", top_k=2, layer="relu2")
    reference = compute_guided(model, x, layer="relu2", top_k=2)
    assert torch.equal(with_layer.classes, reference.classes)
    torch.testing.assert_close(with_layer.attributions, reference.guided_gradcam)


# --- the command ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def silu_pt2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A SmoothNet (SiLU) saved as a torch.export .pt2 (32x32 input, dynamic batch): a MODEL any user could have."""
    model = SmoothNet(nn.SiLU).eval()
    program = torch.export.export(
        model, (torch.randn(2, 3, 32, 32),), dynamic_shapes=({0: torch.export.Dim("batch", min=1)},)
    )
    path = tmp_path_factory.mktemp("silu") / "silu.pt2"
    torch.export.save(program, path)
    return path


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["-m", "smothgrad"], "unknown method 'smothgrad'; did you mean smoothgrad?"),
        (
            ["-m", "lime"],
            "unknown method 'lime'; choose one of: gradient, inputxgradient, smoothgrad, integrated-gradients, guided",
        ),
        (["--samples", "0"], "--samples must be 1 or more (got 0)"),
        (["--steps", "-3"], "--steps must be 1 or more (got -3)"),
        (["--noise", "-0.1"], "--noise must be a number 0 or more (got -0.1)"),
        (["--noise", "nan"], "--noise must be a number 0 or more (got nan)"),
        (["--baseline", "blurr"], "unknown baseline 'blurr'; did you mean blur?"),
    ],
)
def test_bad_settings_fail_with_one_line(tmp_path: Path, silu_pt2: Path, args: list[str], message: str) -> None:
    image = write_noise_image(tmp_path / "a.png", seed=0)
    assert_usage_error(hookviz("saliency", silu_pt2, image, *args, "-o", tmp_path / "out"), message)
    assert not (tmp_path / "out").exists()


def test_guided_without_relus_fails_before_any_image(tmp_path: Path, silu_pt2: Path) -> None:
    image = write_noise_image(tmp_path / "a.png", seed=0)
    for command in (["saliency", silu_pt2, image, "-m", "guided"], ["guided", silu_pt2, image]):
        assert_usage_error(hookviz(*command, "-q", "-o", tmp_path / "out"), GUIDED_ERROR)
    assert not (tmp_path / "out" / "a").exists()


def test_saliency_writes_pictures_raw_maps_and_records(tmp_path: Path, silu_pt2: Path) -> None:
    image = write_noise_image(tmp_path / "photo.png", 80, 50, seed=3)  # not the model's 32x32, not square
    out = tmp_path / "out"
    args = ["-m", "integrated-gradients", "--steps", "8", "--baseline", "blur", "-k", "2", "--save-raw"]
    result = hookviz("saliency", silu_pt2, image, *args, "--no-caption", "--json", "-o", out)
    assert result.exit_code == 0, result.stderr

    (record,) = json_lines(result.stdout)
    assert record["status"] == "ok" and len(record["predictions"]) == 5
    outputs = record["outputs"]
    assert [(o["picture"], o["class"]) for o in outputs] == [
        ("heat", record["predictions"][0]["class"]),
        ("signed", record["predictions"][0]["class"]),
        ("heat", record["predictions"][1]["class"]),
        ("signed", record["predictions"][1]["class"]),
    ]
    for output in outputs:
        assert output["method"] == "integrated-gradients" and output["layer"] is None
        assert (output["steps"], output["baseline"], output["rule"]) == (8, "blur", "gausslegendre")
        with Image.open(output["png"]) as picture:
            assert picture.size == (80, 50)  # the original's resolution
    top = outputs[0]["class"]
    assert Path(outputs[0]["png"]).name == f"integrated-gradients-heat_c{top}.png"
    assert Path(outputs[1]["png"]).name == f"integrated-gradients_c{top}.png"

    # The raw map is |attribution| summed over channels, on the original's pixel grid, not normalized.
    raw = np.load(outputs[0]["raw"])
    assert raw.shape == (50, 80) and raw.dtype == np.float32
    loaded = load_model(str(silu_pt2), device="cpu")
    prepared = prepare_image(image, "photo", loaded.preprocessing, crop=False)
    expected = compute_attributions(
        loaded.module, prepared.tensor[None], method="integrated-gradients", classes=[top], steps=8, baseline="blur"
    )
    placed, _ = heat_in_image(attribution_heat(expected.attributions[0, 0]), prepared.view.box, prepared.size)
    np.testing.assert_allclose(raw, placed.numpy(), rtol=1e-4, atol=1e-6 * float(placed.max()))

    (entry,) = [e for e in read_manifest(out) if e["type"] == "input"]
    assert entry["outputs"] == outputs
    (header,) = [e for e in read_manifest(out) if e["type"] == "run"]
    assert json.dumps(header).count('"integrated-gradients"') >= 1


def test_saliency_with_a_layer_names_the_product(tmp_path: Path, silu_pt2: Path) -> None:
    image = write_noise_image(tmp_path / "photo.png", seed=4)
    result = hookviz("saliency", silu_pt2, image, "-m", "gradient", "-l", "act2", "-c", "3", "--json", "-o", tmp_path)
    assert result.exit_code == 0, result.stderr
    names = [Path(o["png"]).name for o in json_lines(result.stdout)[0]["outputs"]]
    assert names == ["gradient-gradcam-heat_act2_c3.png", "gradient-gradcam_act2_c3.png"]


# --- the pretrained demo model: heat on the cat ------------------------------------------------------


@pytest.mark.parametrize(
    "method", [["-m", "smoothgrad", "--samples", "8"], ["-m", "integrated-gradients", "--steps", "8"]]
)
def test_demo_model_puts_the_heat_on_the_cat(tmp_path: Path, demo_model: Path, cat_composites, method) -> None:
    paths = [path for path, _ in cat_composites]
    result = hookviz("saliency", demo_model, *paths, *method, "--save-raw", "--json", "-q", "-o", tmp_path)
    assert result.exit_code == 0, result.stderr
    for record, (_, (x0, y0, x1, y1)) in zip(json_lines(result.stdout), cat_composites, strict=True):
        assert 281 <= record["predictions"][0]["class"] <= 285  # a cat class
        heat = np.load(record["outputs"][0]["raw"])
        share = heat[y0:y1, x0:x1].sum() / heat.sum()
        assert share > 0.5, f"{record['input']}: only {share:.0%} of the heat is on the cat"
