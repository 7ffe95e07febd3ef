"""hookviz.metrics against the papers' definitions (float64, written here) and the reference libraries on the
same maps and images: pytorch-grad-cam's ROAD and confidence-change metrics, torchcam's deletion/insertion.

Measured (resnet18, 10 classes, seeded random weights, 40x40 inputs):
* ROAD MoRF/LeRF at 10..90%: |hookviz - pytorch-grad-cam| at most 2.0e-6 in probability (imputation noise off in both;
  hookviz solves the imputation by conjugate gradients to a relative residual of 1e-4, the reference with
  scipy's sparse LU). pytorch-grad-cam's ``ROADMostRelevantFirst(percentile=p)`` removes the pixels *above* the
  p-th percentile, i.e. the (100 - p)% most relevant, where the ROAD paper's MoRF at p removes the p% most
  relevant: the test compares hookviz at p with the reference at 100 - p.
* Average Drop / Increase in Confidence: identical (difference 0) to CamMultImageConfidenceChange's; note
  that pytorch-grad-cam's ``DropInConfidence`` returns max(0, p - o) without dividing by p, where Grad-CAM++
  (eq. 19) divides by the original confidence: hookviz divides.
* Deletion/insertion: the float64 definition here agrees to 1e-5 (float32 model), torchcam 0.5.0 to 7.5e-9 in the area.
"""

from __future__ import annotations

import math
from contextlib import nullcontext

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hookviz import metrics
from hookviz.metrics import (
    Scorer,
    confidence_change,
    deletion_insertion,
    energy_game,
    linear_imputation,
    pointing_game,
    road,
    spearman_correlation,
    structural_similarity,
)

SIZE = 40  # 1600 pixels: 20 steps of 80 pixels, and every ROAD percentile a whole number of pixels


@pytest.fixture
def case(resnet18_10: nn.Module) -> tuple[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(model, inputs (2, 3, 40, 40), maps (2, 2, 40, 40) without ties, classes (2, 2))."""
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(2, 3, SIZE, SIZE, generator=generator)
    smooth = F.interpolate(torch.rand(2, 2, 5, 5, generator=generator), size=(SIZE, SIZE), mode="bilinear")
    maps = smooth + 1e-3 * torch.rand(2, 2, SIZE, SIZE, generator=generator)  # no two pixels equal
    classes = torch.tensor([[3, 7], [1, 1]])
    return resnet18_10, inputs, maps, classes


def float64_probability(model: nn.Module, image: torch.Tensor, class_index: int) -> float:
    model64 = metrics.model_copy(model).double()
    with torch.no_grad():
        return float(model64(image[None].double()).softmax(dim=1)[0, class_index])


def test_deletion_and_insertion_follow_the_rise_definition(case) -> None:
    """RISE: order the pixels by the map, most important first; after each step of N/steps pixels, the class
    probability with those pixels blurred (deletion) or restored into the blurred image (insertion); the score
    is the area under the curve (trapezoids over the fraction changed)."""
    model, inputs, maps, classes = case
    steps = 5
    canvas = metrics.blurred(inputs)
    curves = deletion_insertion(Scorer(model, chunk=7), inputs, maps, classes, steps=steps)
    model64 = metrics.model_copy(model).double()
    pixels = SIZE * SIZE
    for b in range(2):
        for m in range(2):
            order = np.argsort(-maps[b, m].flatten().double().numpy(), kind="stable")
            deletion, insertion = [], []
            for step in range(steps + 1):
                top = torch.from_numpy(order[: step * pixels // steps])
                removed = inputs[b].flatten(1).double().clone()
                removed[:, top] = canvas[b].flatten(1).double()[:, top]
                inserted = canvas[b].flatten(1).double().clone()
                inserted[:, top] = inputs[b].flatten(1).double()[:, top]
                with torch.no_grad():
                    both = model64(torch.stack([removed, inserted]).view(2, 3, SIZE, SIZE)).softmax(dim=1)
                deletion.append(float(both[0, classes[b, m]]))
                insertion.append(float(both[1, classes[b, m]]))
            fractions = [step / steps for step in range(steps + 1)]
            assert curves.deletion[b, m].tolist() == pytest.approx(deletion, abs=1e-5)
            assert curves.insertion[b, m].tolist() == pytest.approx(insertion, abs=1e-5)
            assert float(curves.area(curves.deletion)[b, m]) == pytest.approx(
                np.trapezoid(deletion, fractions), abs=1e-5
            )
            assert float(curves.area(curves.insertion)[b, m]) == pytest.approx(
                np.trapezoid(insertion, fractions), abs=1e-5
            )


def test_deletion_and_insertion_agree_with_torchcam(case) -> None:
    torchcam_metrics = pytest.importorskip("torchcam.metrics")
    model, inputs, maps, classes = case
    curves = deletion_insertion(Scorer(model), inputs, maps, classes, steps=20)

    class SameMaps:  # torchcam's CAM extractor interface, handing over hookviz's map of (b, m)
        def __init__(self, b: int, m: int) -> None:
            self.model, self.b, self.m = model, b, m

        def __call__(self, class_idx, scores=None, normalized=True, **kwargs):
            return [maps[self.b : self.b + 1, self.m]]

        def fuse_cams(self, cams):
            return cams[0]

        def _hooks_off(self):
            return nullcontext()

    for b in range(2):
        for m in range(2):
            reference = torchcam_metrics.DeletionInsertionMetric(
                SameMaps(b, m), lambda logits: logits.softmax(dim=-1), steps=20, baseline=metrics.blurred
            )
            reference.update(inputs[b : b + 1], class_idx=[int(classes[b, m])])
            summary = reference.summary()
            assert float(curves.area(curves.deletion)[b, m]) == pytest.approx(summary["deletion_auc"], abs=1e-6)
            assert float(curves.area(curves.insertion)[b, m]) == pytest.approx(summary["insertion_auc"], abs=1e-6)


def test_tied_pixels_are_removed_in_random_order_not_row_by_row() -> None:
    flat = torch.zeros(1, 1, 8, 8)
    flat[..., 0, 0] = 1.0
    ranks = metrics.pixel_ranks(flat)
    assert int(ranks[0, 0, 0]) == 0  # the one important pixel first
    first_row = ranks[0, 0, 1:8]  # the other pixels of the top row are not the next seven
    assert sorted(first_row.tolist()) != list(range(1, 8))


def test_road_agrees_with_pytorch_grad_cam_at_the_same_percentiles(case) -> None:
    road_module = pytest.importorskip("pytorch_grad_cam.metrics.road")
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputSoftmaxTarget

    model, inputs, maps, classes = case
    percentiles = (10, 30, 50, 70, 90)
    mine = road(Scorer(model), inputs, maps, classes, percentiles=percentiles, noise=0.0)
    for m in range(2):
        targets = [ClassifierOutputSoftmaxTarget(int(c)) for c in classes[:, m]]
        cams = maps[:, m].numpy()
        for p_index, p in enumerate(percentiles):
            # The reference's percentile is the share *kept*: see the module docstring.
            morf = road_module.ROADMostRelevantFirst(percentile=100 - p)
            lerf = road_module.ROADLeastRelevantFirst(percentile=100 - p)
            for metric in (morf, lerf):
                metric.perturbation.imputer.noise = 0.0
            with torch.no_grad():
                expected_morf = morf(inputs, cams, targets, model, return_diff=False)
                expected_lerf = lerf(inputs, cams, targets, model, return_diff=False)
            assert mine.morf[:, m, p_index].tolist() == pytest.approx(expected_morf.tolist(), abs=2e-5)
            assert mine.lerf[:, m, p_index].tolist() == pytest.approx(expected_lerf.tolist(), abs=2e-5)


def test_linear_imputation_solves_the_same_system_as_the_road_reference() -> None:
    road_module = pytest.importorskip("pytorch_grad_cam.metrics.road")
    generator = torch.Generator().manual_seed(1)
    image = torch.randn(3, 64, 48, generator=generator)
    removed = F.interpolate(torch.rand(1, 1, 4, 3, generator=generator), size=(64, 48), mode="bilinear") > 0.6
    expected = road_module.NoisyLinearImputer(noise=0.0)(image, (~removed[0, 0]).float())
    imputed = linear_imputation(image[None], removed, noise=0.0)[0]
    assert (imputed - expected).abs().max() < 1e-3
    assert torch.equal(imputed[:, ~removed[0, 0]], image[:, ~removed[0, 0]])  # kept pixels are untouched
    noisy = linear_imputation(image[None], removed, noise=0.01, generator=torch.Generator().manual_seed(0))[0]
    assert 0.005 < float((noisy - imputed)[:, removed[0, 0]].std()) < 0.02  # the paper's noise, on removed pixels


def test_drop_and_increase_agree_with_pytorch_grad_cam_on_the_same_maps(case) -> None:
    cam_mult = pytest.importorskip("pytorch_grad_cam.metrics.cam_mult_image")
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputSoftmaxTarget

    model, inputs, maps, classes = case
    scaled = metrics.scaled_maps(maps)  # both sides get maps already in [0, 1]
    drop, increase = confidence_change(Scorer(model), inputs, scaled, classes)
    for m in range(2):
        targets = [ClassifierOutputSoftmaxTarget(int(c)) for c in classes[:, m]]
        with torch.no_grad():
            change = cam_mult.CamMultImageConfidenceChange()(inputs, scaled[:, m].numpy(), targets, model)
            original = model(inputs).softmax(dim=1).gather(1, classes[:, m : m + 1])[:, 0].numpy()
        # Grad-CAM++'s Average Drop: max(0, Y - O) / Y; Increase in Confidence: O > Y.
        assert drop[:, m].tolist() == pytest.approx((np.maximum(-change, 0) / original).tolist(), abs=1e-6)
        assert increase[:, m].tolist() == (change > 0).astype(float).tolist()


def test_spearman_matches_scipy_including_ties() -> None:
    stats = pytest.importorskip("scipy.stats")
    generator = torch.Generator().manual_seed(2)
    first = torch.rand(3, 6, 5, generator=generator).round(decimals=1)  # many ties
    second = torch.rand(3, 6, 5, generator=generator).round(decimals=1)
    mine = spearman_correlation(first, second)
    for i in range(3):
        expected = stats.spearmanr(first[i].flatten().numpy(), second[i].flatten().numpy()).statistic
        assert float(mine[i]) == pytest.approx(expected, abs=1e-6)


def test_ssim_follows_wang_et_al() -> None:
    """Mean SSIM over valid 11x11 Gaussian windows (sigma 1.5), K1 = 0.01, K2 = 0.03, data range 1, in float64."""
    generator = torch.Generator().manual_seed(3)
    first = torch.rand(20, 24, generator=generator, dtype=torch.float64)
    second = (first + 0.2 * torch.rand(20, 24, generator=generator, dtype=torch.float64)).clamp(0, 1)
    g = np.exp(-((np.arange(11) - 5.0) ** 2) / (2 * 1.5**2))
    window = np.outer(g, g) / np.outer(g, g).sum()
    values = []
    x, y = first.numpy(), second.numpy()
    for top in range(20 - 10):
        for left in range(24 - 10):
            a, b = x[top : top + 11, left : left + 11], y[top : top + 11, left : left + 11]
            mu_a, mu_b = (window * a).sum(), (window * b).sum()
            var_a, var_b = (window * a * a).sum() - mu_a**2, (window * b * b).sum() - mu_b**2
            cov = (window * a * b).sum() - mu_a * mu_b
            c1, c2 = 0.01**2, 0.03**2
            values.append(((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2)))
    assert float(structural_similarity(first, second)) == pytest.approx(float(np.mean(values)), abs=1e-6)
    assert float(structural_similarity(first, first)) == pytest.approx(1.0)


def test_pointing_and_energy_games() -> None:
    maps = torch.zeros(1, 2, 10, 10)
    maps[0, 0, 2, 3] = 1.0  # peak inside the box
    maps[0, 1, 8, 8] = 1.0  # peak outside
    maps[0, 1, 2, 2] = 0.5
    truth = torch.zeros(1, 10, 10, dtype=torch.bool)
    truth[0, 1:5, 1:5] = True
    assert pointing_game(maps, truth).tolist() == [[1.0, 0.0]]
    near = truth.clone()
    near[0, :, :] = True
    assert pointing_game(maps, truth, near).tolist() == [[1.0, 1.0]]  # within the tolerance
    assert energy_game(maps, truth)[0].tolist() == pytest.approx([1.0, 0.5 / 1.5])
    assert all(math.isnan(v) for v in pointing_game(maps, torch.zeros_like(truth))[0].tolist())


def test_sanity_check_leaves_the_model_as_it_was(resnet18_10: nn.Module) -> None:
    before = {name: value.clone() for name, value in resnet18_10.state_dict().items()}
    inputs = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(4))
    curves = metrics.cascading_randomization(
        resnet18_10, inputs, torch.tensor([[2]]), method="gradcam", layer="layer3", max_steps=3
    )
    assert curves.blocks == ["fc", "layer2.1", "conv1"]  # 11 blocks from the output down: 3 of them compared
    assert curves.spearman.shape == (1, 1, 3)
    after = resnet18_10.state_dict()
    assert all(torch.equal(before[name], after[name]) for name in before)
    assert all(not module._forward_hooks and not module._forward_pre_hooks for module in resnet18_10.modules())
    assert not resnet18_10.training


def test_unknown_metric_names_close_matches() -> None:
    with pytest.raises(metrics.UsageError, match=r"^unknown metric 'delet'; did you mean deletion\?$"):
        metrics.check_metrics(["delet"])


class FlattensItsInput(nn.Module):
    """A classifier that ``view``s its input as rows: it cannot take a channels-last tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3 * 8 * 8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.view(x.shape[0], -1))


def test_scorer_runs_channels_last_and_falls_back_for_a_model_that_cannot(resnet18_10: nn.Module) -> None:
    """The scorer feeds image batches in channels-last memory order (faster convolutions on a CPU): the
    probabilities are those of ordinary inputs to float32 precision, and a model that cannot take such a
    tensor gets ordinary ones."""
    inputs = torch.randn(3, 3, 40, 40, generator=torch.Generator().manual_seed(5))
    scorer = Scorer(resnet18_10, chunk=2)
    with torch.no_grad():
        expected = resnet18_10(inputs).softmax(dim=1)
    torch.testing.assert_close(scorer.all_probabilities(inputs), expected, atol=1e-6, rtol=0)
    assert scorer.channels_last is True

    torch.manual_seed(0)
    flat = FlattensItsInput().eval()
    small = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(6))
    with pytest.raises(RuntimeError, match="view"):
        flat(small.contiguous(memory_format=torch.channels_last))
    scorer = Scorer(flat)
    classes = torch.tensor([0, 4, 2, 2])
    with torch.no_grad():
        expected = flat(small).softmax(dim=1).gather(1, classes[:, None])[:, 0]
    torch.testing.assert_close(scorer.probabilities(small, classes), expected)
    assert scorer.channels_last is False


def test_only_the_curves_asked_for_cost_forward_passes(case) -> None:
    model, inputs, maps, classes = case
    scored: list[int] = []

    class Counting(Scorer):
        def probabilities(self, inputs: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
            scored.append(inputs.shape[0])
            return super().probabilities(inputs, classes)

        def all_probabilities(self, inputs: torch.Tensor) -> torch.Tensor:
            scored.append(inputs.shape[0])
            return super().all_probabilities(inputs)

    both = deletion_insertion(Counting(model), inputs, maps, classes, steps=5)
    images, maps_per_image = classes.shape
    assert sum(scored) == 2 * images + images * maps_per_image * 4 * 2  # unchanged + blurred, 4 interior points x 2
    scored.clear()
    deletion = deletion_insertion(Counting(model), inputs, maps, classes, steps=5, curves=["deletion"])
    assert sum(scored) == 2 * images + images * maps_per_image * 4
    assert deletion.insertion is None and both.deletion is not None and deletion.deletion is not None
    torch.testing.assert_close(deletion.deletion, both.deletion, atol=1e-6, rtol=0)
    scored.clear()
    numbers = metrics.map_scores(Counting(model), inputs, maps, classes, ["insertion"], steps=5)
    assert sorted(numbers) == ["insertion"] and sum(scored) == 2 * images + images * maps_per_image * 4
