"""Guided backpropagation agrees with Captum's GuidedBackprop, and leaves the model untouched."""

import torch
import torchvision
from captum.attr import GuidedBackprop
from torch import nn

from hookviz.guided import compute_guided, guided_backprop


def small_resnet():
    torch.manual_seed(0)
    return torchvision.models.resnet18(weights=None, num_classes=5).eval()


def test_guided_backprop_matches_captum():
    model = small_resnet()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    classes = torch.tensor([[1], [3]])

    ours, _, _ = guided_backprop(model, x, classes)
    # Captum's module backward hooks do not allow in-place ReLUs; the maths is the same without them.
    reference_model = small_resnet()
    for module in reference_model.modules():
        if isinstance(module, nn.ReLU):
            module.inplace = False
    theirs = torch.cat(
        [GuidedBackprop(reference_model).attribute(x[i : i + 1], target=int(classes[i, 0])) for i in range(2)]
    )

    assert theirs.abs().max() > 0
    correlation = torch.corrcoef(torch.stack([ours[:, 0].flatten(), theirs.flatten()]))[0, 1]
    assert correlation > 0.99
    torch.testing.assert_close(ours[:, 0], theirs, rtol=1e-3, atol=1e-5 * float(theirs.abs().max()))


def test_guided_leaves_no_hooks_and_no_grads():
    model = small_resnet().train()
    x = torch.randn(1, 3, 64, 64)
    result = compute_guided(model, x, layer="layer4", top_k=2)

    assert result.guided.shape == (1, 2, 3, 64, 64)
    assert result.guided_gradcam.abs().sum() <= result.guided.abs().sum()  # a [0, 1] map can only shrink it
    assert model.training
    assert all(len(m._forward_hooks) == 0 and len(m._forward_pre_hooks) == 0 for m in model.modules())
    assert all(p.grad is None for p in model.parameters())
