"""What a model is made of: every module's output shape, its conv layers, and the default CAM layer."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .hooks import capture, run_model


@dataclass
class LayerInfo:
    name: str
    type: str
    output_shape: tuple[int, ...] | None  # None when the module did not run in the traced forward
    parameters: int  # including sub-modules
    calls: int
    is_conv: bool

    @property
    def is_spatial(self) -> bool:
        """A 4-D (N, C, H, W) output with more than one position: something a heatmap can show."""
        shape = self.output_shape
        return shape is not None and len(shape) == 4 and shape[2] * shape[3] > 1


def is_conv_layer(module: nn.Module) -> bool:
    """A 2-D convolution: nn.Conv2d, or an unflattened torch.export module that holds a 4-D weight and a conv op."""
    if isinstance(module, nn.Conv2d):
        return True
    weight = module._parameters.get("weight")
    if weight is None or weight.dim() != 4:
        return False
    graph = getattr(module, "graph", None)
    if graph is None:
        return isinstance(module, nn.modules.conv._ConvNd)
    return any(node.op == "call_function" and "conv" in str(node.target) for node in graph.nodes)


def conv_layer_names(model: nn.Module) -> list[str]:
    return [name for name, module in model.named_modules() if name and is_conv_layer(module)]


@dataclass
class ModelTrace:
    """Every module of a model with the output it produced for one dummy input."""

    layers: list[LayerInfo]
    finish_order: list[str]  # module names in the order their last call returned

    def default_cam_layer(self) -> str | None:
        """The module whose spatial output comes last, just before global pooling.

        Finish order makes a container (``layer4``) win over its last child. A
        shared activation module (one ReLU6 applied after every block) can be the
        answer: capture keeps its last call, which is the final activation, and
        post-activation maps are what CAMs need (a pre-activation BatchNorm output
        is mostly negative and leaves Score-CAM and CAM blank).
        """
        by_name = {info.name: info for info in self.layers}
        spatial = [name for name in self.finish_order if by_name[name].is_spatial]
        return spatial[-1] if spatial else None


def trace_layers(model: nn.Module, input_size: tuple[int, int], device: torch.device | str = "cpu",
                 batch: int = 1) -> ModelTrace:
    """Run one dummy forward and describe every module, in ``named_modules()`` order."""
    modules = [(name, module) for name, module in model.named_modules() if name]
    dummy = torch.zeros(batch, 3, *input_size, device=device)
    with capture(model, [name for name, _ in modules]) as activations:
        run_model(model, dummy)
    infos = []
    for name, module in modules:
        output = activations.get(name)
        infos.append(LayerInfo(
            name=name,
            type=type(module).__name__,
            output_shape=tuple(output.shape) if output is not None else None,
            parameters=sum(p.numel() for p in module.parameters()),
            calls=activations.calls.get(name, 0),
            is_conv=is_conv_layer(module),
        ))
    finished = list(dict.fromkeys(reversed(activations.order)))[::-1]  # each name at its last finish
    return ModelTrace(layers=infos, finish_order=finished)
