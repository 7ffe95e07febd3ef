"""hookviz.cams.compute_cams against each method's formula, computed here independently.

Every expected map is built in this file from the paper's formula, in float64, from
activations and gradients obtained with a plain forward hook and one
``torch.autograd.grad`` call per (image, class) (tests/cam_models.py). hookviz computes
the same maps in float32 with its own capture hooks and one batched backward pass, so
the maps must agree to float32 precision: atol = 1e-5 x the expected map's maximum.

Usage under test:

    result = compute_cams(model, batch, layer="relu2", method="gradcam", classes=[1, 3])
    result.maps      # (B, K, h, w), >= 0, at the layer's resolution, not normalized
    result.classes   # (B, K) class explained by each map
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from cam_models import random_batch, reference_activations_and_gradients
from nets import DictOutput, SmallCNN, TupleOutput
from torch import nn

from hookviz.cams import compute_cams
from hookviz.errors import UsageError

METHODS = ["gradcam", "gradcam++", "xgradcam", "layercam", "hirescam", "scorecam", "eigencam", "cam"]
GRADIENT_METHODS = ["gradcam", "gradcam++", "xgradcam", "layercam", "hirescam"]
LAYER = "relu2"  # the last spatial layer of SmallCNN: followed only by global average pooling and fc
NUM_CLASSES = 4


# --- each method's formula, for one image and one class: A and g are (C, h, w), the map is (h, w) ------------


def gradcam_formula(A, g):
    """relu(sum_c mean_hw(g_c) A_c)"""
    weights = g.mean(dim=(1, 2))
    return torch.relu(torch.einsum("c,chw->hw", weights, A))


def gradcam_plus_plus_formula(A, g):
    """alpha = g^2 / (2 g^2 + sum_hw(A) g^3) (0 where g = 0); weights = sum_hw(relu(g) alpha)"""
    activation_sum = A.sum(dim=(1, 2), keepdim=True)
    alpha = torch.zeros_like(g)
    nonzero = g != 0
    denominator = 2 * g**2 + activation_sum * g**3
    alpha[nonzero] = (g**2)[nonzero] / denominator[nonzero]
    weights = (torch.relu(g) * alpha).sum(dim=(1, 2))
    return torch.relu(torch.einsum("c,chw->hw", weights, A))


def xgradcam_formula(A, g):
    """weights = sum_hw(g A) / sum_hw(A); a channel that never fires (sum 0) adds nothing."""
    activation_sum = A.sum(dim=(1, 2))
    weights = torch.where(activation_sum > 0, (g * A).sum(dim=(1, 2)) / activation_sum.clamp_min(1e-300), 0.0)
    return torch.relu(torch.einsum("c,chw->hw", weights, A))


def layercam_formula(A, g):
    """relu(sum_c relu(g_c) * A_c), weighted per position"""
    return torch.relu((torch.relu(g) * A).sum(dim=0))


def hirescam_formula(A, g):
    """relu(sum_c g_c * A_c)"""
    return torch.relu((g * A).sum(dim=0))


GRADIENT_FORMULAS = {
    "gradcam": gradcam_formula,
    "gradcam++": gradcam_plus_plus_formula,
    "xgradcam": xgradcam_formula,
    "layercam": layercam_formula,
    "hirescam": hirescam_formula,
}


def cam_formula(A, fc_weight, class_index):
    """relu(sum_c W[class, c] A_c), W the classifier after global average pooling"""
    return torch.relu(torch.einsum("c,chw->hw", fc_weight[class_index], A))


def eigencam_formula(A):
    """Projection of the centred (hw, C) activation matrix on its first right-singular vector, signed to
    correlate positively with the channel-mean map, then relu. numpy's SVD, float64."""
    channels, height, width = A.shape
    matrix = A.reshape(channels, -1).T.numpy()
    centred = matrix - matrix.mean(axis=0)
    _, singular_values, vt = np.linalg.svd(centred, full_matrices=False)
    assert singular_values[0] > 1.05 * singular_values[1], "first component not well separated: a fragile test input"
    projection = centred @ vt[0]
    if np.corrcoef(projection, matrix.mean(axis=1))[0, 1] < 0:
        projection = -projection
    return torch.from_numpy(np.maximum(projection, 0).reshape(height, width))


def scorecam_formula(model, x, A, class_index):
    """Per channel: upsample bilinearly to the input size, min-max to [0, 1], multiply the input; the
    softmax probability of the class for that masked input is the channel's weight. relu(sum_k w_k A_k).
    x is (3, H, W); one forward pass per channel."""
    weights = []
    for channel in A:
        upsampled = F.interpolate(channel[None, None], size=x.shape[-2:], mode="bilinear", align_corners=False)[0, 0]
        span = upsampled.max() - upsampled.min()
        mask = (upsampled - upsampled.min()) / span if span > 0 else torch.zeros_like(upsampled)
        with torch.no_grad():
            weights.append(model((x * mask)[None]).softmax(dim=1)[0, class_index])
    return torch.relu(torch.einsum("k,khw->hw", torch.stack(weights), A))


def expected_maps(
    model: nn.Module,
    x: torch.Tensor,
    method: str,
    classes: torch.Tensor,
    layer: str = LAYER,
    pick=lambda output: output,
) -> torch.Tensor:
    """(B, K, h, w) maps by the formulas above, in float64, on a double copy of the model."""
    model64 = copy.deepcopy(model).double().eval()
    x64 = x.double()
    A, G, _ = reference_activations_and_gradients(model64, x64, model64.get_submodule(layer), classes, pick)
    maps = torch.zeros(*classes.shape, *A.shape[-2:], dtype=torch.float64)
    for b in range(classes.shape[0]):
        for k in range(classes.shape[1]):
            c = int(classes[b, k])
            if method in GRADIENT_FORMULAS:
                maps[b, k] = GRADIENT_FORMULAS[method](A[b], G[b, k])
            elif method == "cam":
                maps[b, k] = cam_formula(A[b], model64.fc.weight.detach(), c)
            elif method == "eigencam":
                maps[b, k] = eigencam_formula(A[b])
            elif method == "scorecam":
                maps[b, k] = scorecam_formula(lambda t: pick(model64(t)), x64[b], A[b], c)
    return maps


def reference_logits(model: nn.Module, x: torch.Tensor, pick=lambda output: output) -> torch.Tensor:
    with torch.no_grad():
        return pick(copy.deepcopy(model).eval()(x))


def assert_maps_match(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Equal to float32 precision, per map, relative to the expected map's maximum; maps must not be blank."""
    assert actual.shape == expected.shape
    for index in np.ndindex(*expected.shape[:2]):
        peak = float(expected[index].max())
        assert peak > 0, f"expected map {index} is all zero: the test input says nothing"
        torch.testing.assert_close(
            actual[index].double(),
            expected[index],
            rtol=0,
            atol=1e-5 * peak,
            msg=lambda m, index=index: f"map {index}: {m}",
        )


@pytest.fixture
def model() -> SmallCNN:
    return SmallCNN(num_classes=NUM_CLASSES).eval()


# --- every method against its formula ------------------------------------------------------------------------


@pytest.mark.parametrize("classes", [[2], [1, 3]], ids=["one-class", "two-classes"])
@pytest.mark.parametrize("method", METHODS)
def test_method_matches_its_formula(model, method, classes):
    x = random_batch(2)
    result = compute_cams(model, x, layer=LAYER, method=method, classes=classes)

    chosen = torch.tensor([classes, classes])
    assert result.method == method and result.layer == LAYER
    assert torch.equal(result.classes.cpu(), chosen)
    assert result.maps.shape == (2, len(classes), 12, 16)  # relu2 of a 48x64 input: stride 4
    assert_maps_match(result.maps, expected_maps(model, x, method, chosen))


@pytest.mark.parametrize("method", ["gradcam", "layercam", "hirescam", "eigencam"])
def test_pre_activation_layer_with_negative_values(model, method):
    """conv2 (before its ReLU) has negative activations: the formulas hold there too."""
    x = random_batch(2, seed=5)
    result = compute_cams(model, x, layer="conv2", method=method, classes=[0])
    assert_maps_match(result.maps, expected_maps(model, x, method, torch.tensor([[0], [0]]), layer="conv2"))


def test_probabilities_are_the_softmax_of_the_logits(model):
    x = random_batch(3)
    result = compute_cams(model, x, layer=LAYER)
    torch.testing.assert_close(result.probabilities, reference_logits(model, x).softmax(dim=1))


@pytest.mark.parametrize("score_batch_size", [1, 4, 64])
def test_scorecam_does_not_depend_on_how_masked_inputs_are_batched(model, score_batch_size):
    x = random_batch(1, seed=3)
    result = compute_cams(model, x, layer=LAYER, method="scorecam", classes=[1], score_batch_size=score_batch_size)
    assert_maps_match(result.maps, expected_maps(model, x, "scorecam", torch.tensor([[1]])))


# --- batches and top-k -------------------------------------------------------------------------------------------


def three_images_with_different_predictions(model: nn.Module) -> tuple[torch.Tensor, list[int]]:
    candidates = random_batch(64, seed=0)
    predictions = reference_logits(model, candidates).argmax(dim=1).tolist()
    picked: dict[int, int] = {}
    for index, predicted in enumerate(predictions):
        picked.setdefault(predicted, index)
    assert len(picked) >= 3, f"the candidates are predicted as only {sorted(picked)}"
    indices = list(picked.values())[:3]
    return candidates[indices], [predictions[i] for i in indices]


@pytest.mark.parametrize("method", METHODS)
def test_each_image_of_a_batch_gets_its_own_map(model, method):
    x, top1 = three_images_with_different_predictions(model)
    result = compute_cams(model, x, layer=LAYER, method=method)

    assert result.classes[:, 0].tolist() == top1
    for b in range(3):
        alone = compute_cams(model, x[b : b + 1], layer=LAYER, method=method)
        assert alone.classes.tolist() == [[top1[b]]]
        torch.testing.assert_close(result.maps[b], alone.maps[0], rtol=0, atol=1e-5 * float(alone.maps.max()))
    assert_maps_match(result.maps, expected_maps(model, x, method, torch.tensor(top1)[:, None]))


@pytest.mark.parametrize("method", GRADIENT_METHODS + ["scorecam", "cam"])
def test_top_k_equals_one_computation_per_class(model, method):
    x = random_batch(2, seed=7)
    top3 = reference_logits(model, x).topk(3, dim=1).indices
    result = compute_cams(model, x, layer=LAYER, method=method, top_k=3)

    assert torch.equal(result.classes.cpu(), top3)
    for b in range(2):
        for k in range(3):
            single = compute_cams(model, x[b : b + 1], layer=LAYER, method=method, classes=[int(top3[b, k])])
            torch.testing.assert_close(
                result.maps[b, k], single.maps[0, 0], rtol=0, atol=1e-5 * float(single.maps.max()) + 1e-12
            )
    assert_maps_match(result.maps, expected_maps(model, x, method, top3))


class NumpyScale(torch.autograd.Function):
    """y = 2x with a backward pass that goes through numpy, which batched gradients (vmap) cannot trace."""

    @staticmethod
    def forward(ctx, x):
        return x * 2

    @staticmethod
    def backward(ctx, grad):
        return torch.from_numpy(grad.detach().numpy() * 2)


class NumpyHeadCNN(SmallCNN):
    def forward(self, x):
        return self.fc(self.pool(NumpyScale.apply(self.features(x))).flatten(1))


def test_top_k_through_an_op_that_batched_gradients_cannot_handle():
    """The batched backward (vmap) fails part-way on NumpyScale; the per-class fallback must still have the graph."""
    model = NumpyHeadCNN(num_classes=NUM_CLASSES).eval()
    x = random_batch(2, seed=8)
    top3 = reference_logits(model, x).topk(3, dim=1).indices
    result = compute_cams(model, x, layer=LAYER, method="gradcam", top_k=3)
    assert torch.equal(result.classes.cpu(), top3)
    assert_maps_match(result.maps, expected_maps(model, x, "gradcam", top3))


# --- the model as users have it -----------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["gradcam", "gradcam++", "layercam"])
def test_frozen_model(model, method):
    """Fine-tuned or exported models often have requires_grad=False everywhere: the maps must not change."""
    x = random_batch(2, seed=4)
    expected = expected_maps(model, x, method, torch.tensor([[3], [3]]))
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    result = compute_cams(model, x, layer=LAYER, method=method, classes=[3])
    assert_maps_match(result.maps, expected)
    assert all(not p.requires_grad and p.grad is None for p in model.parameters())


@pytest.mark.parametrize("method", ["gradcam", "hirescam", "eigencam"])
def test_inplace_relu_after_the_layer_does_not_change_its_activations(method):
    """relu2(inplace=True) overwrites conv2's output; the map at conv2 must still use the pre-ReLU values."""
    x = random_batch(2, seed=6)
    inplace = SmallCNN(num_classes=NUM_CLASSES, inplace=True).eval()
    plain = SmallCNN(num_classes=NUM_CLASSES).eval()  # the same weights, without the in-place op
    result = compute_cams(inplace, x, layer="conv2", method=method, classes=[2])
    assert_maps_match(result.maps, expected_maps(plain, x, method, torch.tensor([[2], [2]]), layer="conv2"))


@pytest.mark.parametrize("wrapper", [TupleOutput, DictOutput], ids=["tuple", "dict-with-logits"])
@pytest.mark.parametrize("method", ["gradcam", "cam", "scorecam"])
def test_model_returning_a_tuple_or_a_dict_uses_its_logits(model, method, wrapper):
    wrapped = wrapper(model).eval()  # a tuple's first tensor, or a dict's "logits" entry
    x = random_batch(2, seed=9)
    top1 = reference_logits(model, x).argmax(dim=1)[:, None]
    result = compute_cams(wrapped, x, layer=f"net.{LAYER}", method=method)
    assert torch.equal(result.classes.cpu(), top1)
    assert_maps_match(result.maps, expected_maps(model, x, method, top1))


@pytest.mark.parametrize("method", ["gradcam", "cam", "scorecam"])
def test_output_key_picks_a_named_entry(model, method):
    wrapped = DictOutput(model).eval()
    aux_head = copy.deepcopy(model)  # the same network, with the aux head as its classifier
    aux_head.fc = copy.deepcopy(wrapped.aux)
    x = random_batch(2, seed=10)
    aux_top1 = reference_logits(aux_head, x).argmax(dim=1)[:, None]
    assert not torch.equal(aux_top1, reference_logits(model, x).argmax(dim=1)[:, None]), "heads agree: weak test"

    result = compute_cams(wrapped, x, layer=f"net.{LAYER}", method=method, output_key="aux")
    assert torch.equal(result.classes.cpu(), aux_top1)
    torch.testing.assert_close(result.probabilities, reference_logits(aux_head, x).softmax(dim=1))
    assert_maps_match(result.maps, expected_maps(aux_head, x, method, aux_top1))


class SharedReluCNN(SmallCNN):
    """One ReLU module applied after both convolutions (as some torchvision models do)."""

    def features(self, x):
        return self.relu1(self.conv2(self.relu1(self.conv1(x))))


@pytest.mark.parametrize("method", ["gradcam", "scorecam", "cam"])
def test_shared_activation_module_is_explained_at_its_last_call(method):
    model = SharedReluCNN(num_classes=NUM_CLASSES).eval()
    x = random_batch(2, seed=14)
    top1 = reference_logits(model, x).argmax(dim=1)[:, None]
    result = compute_cams(model, x, layer="relu1", method=method)
    assert result.maps.shape[-2:] == (12, 16)  # the second call's output, not the first's (24x32)
    # The reference hook keeps the last output it sees, i.e. the second call's.
    assert_maps_match(result.maps, expected_maps(model, x, method, top1, layer="relu1"))


@pytest.mark.parametrize("method", ["gradcam", "layercam"])
def test_shared_module_records_autograd_only_from_its_last_call(method):
    """Told how often the layer runs, autograd skips the earlier calls: same maps, a shorter graph."""
    model = SharedReluCNN(num_classes=NUM_CLASSES).eval()
    x = random_batch(2, seed=15)
    first = compute_cams(model, x, layer="relu1", method=method)
    assert first.layer_calls == 2
    recorded = []
    hook = model.conv2.register_forward_hook(lambda module, inputs, output: recorded.append(inputs[0].requires_grad))
    try:
        learnt = compute_cams(model, x, layer="relu1", method=method, layer_calls=first.layer_calls)
    finally:
        hook.remove()
    assert recorded == [False], "conv2 runs between the two calls: with layer_calls=2 it must run without autograd"
    torch.testing.assert_close(learnt.maps, first.maps)
    top1 = reference_logits(model, x).argmax(dim=1)[:, None]
    assert_maps_match(learnt.maps, expected_maps(model, x, method, top1, layer="relu1"))


def test_layer_calls_larger_than_the_real_count_falls_back_to_the_last_call():
    model = SharedReluCNN(num_classes=NUM_CLASSES).eval()
    x = random_batch(2, seed=16)
    result = compute_cams(model, x, layer="relu1", layer_calls=5)
    torch.testing.assert_close(result.maps, compute_cams(model, x, layer="relu1").maps)


def _hook_count(model: nn.Module) -> int:
    names = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
    return sum(len(getattr(module, name, {})) for module in model.modules() for name in names)


@pytest.mark.parametrize("method", METHODS)
def test_model_is_left_as_it_was(method):
    """Train mode, .grad and hooks are restored, and the maps are computed in eval mode (BatchNorm running stats)."""
    model = SmallCNN(num_classes=NUM_CLASSES, batchnorm=True)
    x = random_batch(3, seed=12)
    expected = expected_maps(model, x, method, torch.tensor([[1], [1], [1]]))  # uses an eval-mode copy

    model.train()
    model.bn1.eval()  # a mixed state, e.g. frozen BatchNorm while fine-tuning
    model.fc.bias.grad = torch.full_like(model.fc.bias, 7.0)  # a gradient the user accumulated
    modes = {name: module.training for name, module in model.named_modules()}
    running_mean = model.bn1.running_mean.clone()

    result = compute_cams(model, x, layer=LAYER, method=method, classes=[1])

    assert_maps_match(result.maps, expected)
    assert {name: module.training for name, module in model.named_modules()} == modes
    assert torch.equal(model.bn1.running_mean, running_mean)
    assert torch.equal(model.fc.bias.grad, torch.full_like(model.fc.bias, 7.0))
    assert all(p.grad is None for name, p in model.named_parameters() if name != "fc.bias")
    assert _hook_count(model) == 0
    assert torch.is_grad_enabled()


def test_model_is_left_as_it_was_after_an_error(model):
    model.train()
    with pytest.raises(UsageError):
        compute_cams(model, random_batch(1), layer=LAYER, classes=[NUM_CLASSES])
    assert model.training and all(m.training for m in model.modules())
    assert _hook_count(model) == 0
    assert all(p.grad is None for p in model.parameters())
    assert torch.is_grad_enabled()


@pytest.mark.parametrize("method", ["gradcam", "layercam"])
def test_works_inside_no_grad(model, method):
    """A caller inside torch.no_grad() still gets gradient maps, and no_grad is still on afterwards."""
    x = random_batch(2, seed=13)
    with torch.no_grad():
        result = compute_cams(model, x, layer=LAYER, method=method, classes=[0])
        assert not torch.is_grad_enabled()
    assert_maps_match(result.maps, expected_maps(model, x, method, torch.tensor([[0], [0]])))


def test_works_inside_inference_mode(model):
    """set_grad_enabled(True) alone does nothing inside inference_mode: the engine has to lift it for the block."""
    x = random_batch(2, seed=13)
    with torch.inference_mode():
        result = compute_cams(model, x, layer=LAYER, method="gradcam", classes=[0])
        assert torch.is_inference_mode_enabled()
    assert_maps_match(result.maps, expected_maps(model, x, "gradcam", torch.tensor([[0], [0]])))


# --- errors --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad_class", [NUM_CLASSES, 99999, -1])
def test_class_out_of_range_names_the_valid_range(model, bad_class):
    with pytest.raises(UsageError, match=rf"{bad_class}.*0\.\.{NUM_CLASSES - 1}"):
        compute_cams(model, random_batch(1), layer=LAYER, classes=[0, bad_class])


def test_top_k_larger_than_the_number_of_classes(model):
    with pytest.raises(UsageError, match=str(NUM_CLASSES)):
        compute_cams(model, random_batch(1), layer=LAYER, top_k=NUM_CLASSES + 1)


@pytest.mark.parametrize("layer", ["conv1", "conv2"])
def test_cam_needs_a_layer_followed_by_pooling_and_the_classifier(model, layer):
    """conv1 has the wrong channel count for fc; conv2 has the right one but relu2 lies between it and the pool."""
    with pytest.raises(UsageError, match="cam"):
        compute_cams(model, random_batch(1), layer=layer, method="cam")


def test_cam_with_an_extra_linear_layer_before_the_classifier():
    class TwoLinear(SmallCNN):
        def __init__(self):
            super().__init__(num_classes=NUM_CLASSES)
            self.hidden = nn.Linear(6, 6)

        def forward(self, x):
            return self.fc(self.hidden(self.pool(self.features(x)).flatten(1)))

    with pytest.raises(UsageError, match="cam"):
        compute_cams(TwoLinear().eval(), random_batch(1), layer=LAYER, method="cam")


@pytest.mark.parametrize("layer", ["fc", "pool"])
@pytest.mark.parametrize("method", ["gradcam", "eigencam", "scorecam"])
def test_non_spatial_layer(model, layer, method):
    """fc gives (N, classes) and pool gives (N, C, 1, 1): nothing to draw a heatmap from."""
    with pytest.raises(UsageError, match=layer):
        compute_cams(model, random_batch(1), layer=layer, method=method)


def test_unknown_method_and_unknown_layer(model):
    with pytest.raises(UsageError, match="gradcam"):
        compute_cams(model, random_batch(1), layer=LAYER, method="grad-cam")
    with pytest.raises(UsageError, match="relu2"):
        compute_cams(model, random_batch(1), layer="relu_2")
