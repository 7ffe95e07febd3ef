"""What a model is made of: every module's output shape, its conv layers, and the default CAM layer."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .errors import UsageError
from .forward import run_model, select_logits
from .hooks import capture, hook_handles
from .spatial import Layout, spatial_layout, to_spatial
from .tables import format_table


@dataclass
class LayerInfo:
    """One module of a traced model."""

    name: str
    type: str  # class name; for a torch.export program, the original class that export recorded
    output_shape: tuple[int, ...] | None  # None when the module did not run in the traced forward
    parameters: int  # including sub-modules
    calls: int
    is_conv: bool
    layout: Layout | None = None  # how the output reads as a map (NCHW, channels-last, or tokens on a patch grid)

    @property
    def is_spatial(self) -> bool:
        """An output with more than one position on a grid: something a heatmap can show."""
        return self.layout is not None


def is_conv_layer(module: nn.Module) -> bool:
    """A 2-D convolution: nn.Conv2d, or an unflattened torch.export module that holds a 4-D weight and a conv op."""
    if isinstance(module, nn.Conv2d):
        return True
    return _exported_layer(module, weight_dim=4, ops=("conv",), fallback=nn.modules.conv._ConvNd)


def is_linear_layer(module: nn.Module) -> bool:
    """A fully connected layer: nn.Linear, or an unflattened torch.export module with a 2-D weight and a linear op."""
    if isinstance(module, nn.Linear):
        return True
    return _exported_layer(module, weight_dim=2, ops=("linear", "addmm"))


def _exported_layer(module: nn.Module, weight_dim: int, ops: tuple[str, ...], fallback: type | None = None) -> bool:
    """An exported module keeps its own weight and a graph; its op names say what it does."""
    weight = module._parameters.get("weight")
    if weight is None or weight.dim() != weight_dim:
        return False
    graph = getattr(module, "graph", None)
    if graph is None:
        return fallback is not None and isinstance(module, fallback)
    return any(node.op == "call_function" and any(op in str(node.target) for op in ops) for node in graph.nodes)


ACTIVATIONS = (
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.PReLU,
    nn.ELU,
    nn.SELU,
    nn.CELU,
    nn.GELU,
    nn.SiLU,
    nn.Mish,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.Hardtanh,
    nn.Sigmoid,
    nn.Tanh,
    nn.Softplus,
)
# The ops an exported activation module's graph holds (torch.export keeps each module's own ops).
ACTIVATION_OPS = (
    "aten.relu",
    "aten.relu6",
    "aten.leaky_relu",
    "aten.prelu",
    "aten.elu",
    "aten.selu",
    "aten.celu",
    "aten.gelu",
    "aten.silu",
    "aten.mish",
    "aten.hardswish",
    "aten.hardsigmoid",
    "aten.hardtanh",
    "aten.sigmoid",
    "aten.tanh",
    "aten.softplus",
)


def is_activation_layer(module: nn.Module) -> bool:
    """An activation function as a module (nn.ReLU, nn.GELU, nn.SiLU, ...), also unflattened from a torch.export program."""
    if isinstance(module, ACTIVATIONS):
        return True
    op = exported_op(module)
    return op is not None and op.startswith(ACTIVATION_OPS)


def exported_op(module: nn.Module) -> str | None:
    """The one op (``aten.relu.default``, ...) of a parameterless module unflattened from a torch.export program;
    None for any other module. Unflattening turns every module into an InterpreterModule: its graph says what it was."""
    graph = getattr(module, "graph", None)
    if graph is None or any(True for _ in module.parameters(recurse=False)):
        return None
    calls = [str(node.target) for node in graph.nodes if node.op == "call_function"]
    return calls[0] if len(calls) == 1 else None


def conv_layer_names(model: nn.Module) -> list[str]:
    """Every 2-D convolution of ``model``, in ``named_modules()`` order."""
    return [name for name, module in model.named_modules() if name and is_conv_layer(module)]


@dataclass
class ModelTrace:
    """Every module of a model with the output it produced for one dummy input."""

    layers: list[LayerInfo]  # in execution order (first call), then the modules that did not run
    finish_order: list[str]  # module names in the order their last call returned
    # Spatial layers where the top class's score depends on more than one position; None if that could not be computed.
    class_dependent: set[str] | None = None
    preferred: str | None = None  # the layer the model's kind calls for (``preferred_cam_layer``), if it has one
    # Modules that return a dict of several tensors (a Hugging Face ModelOutput): a hook sees the first one, which
    # need not be the one the rest of the model reads (ConvNeXt's head reads ``pooler_output``).
    several_outputs: set[str] = field(default_factory=set)

    def default_cam_layer(self) -> str | None:
        """The module whose spatial output comes last, just before global pooling.

        Finish order makes a container (``layer4``) win over its last child. A
        shared activation module (one ReLU6 applied after every block) can be the
        answer: capture keeps its last call, which is the final activation, and
        post-activation maps are what CAMs need (a pre-activation BatchNorm output
        is mostly negative and leaves Score-CAM and CAM blank).

        Only layers the class score depends on at several positions count: in a
        vision transformer only the class token reaches the head after the last
        attention, so the answer there is the last block's first LayerNorm
        (``encoder_layer_11.ln_1``), the input of that attention.

        Models whose kind names the layer (``preferred_cam_layer``: torchvision segmentation and detection
        models, timm and Hugging Face vision transformers) get that layer when it has a spatial output.
        """
        by_name = {info.name: info for info in self.layers}
        if self.preferred is not None and self.preferred in by_name and by_name[self.preferred].is_spatial:
            return self.preferred
        spatial = [name for name in self.finish_order if by_name[name].is_spatial]
        spatial = [name for name in spatial if name not in self.several_outputs] or spatial
        if self.class_dependent is not None:
            spatial = [name for name in spatial if name in self.class_dependent] or spatial
        return spatial[-1] if spatial else None


def layer_table(layers: list[LayerInfo], cam_layer: str | None) -> str:
    """The ``hookviz layers`` table: name, type, output shape, parameters; ``*`` marks ``cam_layer``."""
    rows = [["  layer", "type", "output shape", "params"]]
    for info in layers:
        shape = "x".join(map(str, info.output_shape[1:])) if info.output_shape else "-"
        marker = "*" if info.name == cam_layer else " "
        calls = f"(runs {info.calls}x)" if info.calls > 1 else ""
        rows.append([f"{marker} {info.name}", info.type, shape, f"{info.parameters:,}", calls])
    return format_table(rows, right=(3,), min_widths={2: 20, 3: 11})


def layer_records(layers: list[LayerInfo], cam_layer: str | None) -> list[dict[str, object]]:
    """The ``hookviz layers --json`` records."""
    return [
        {
            "name": info.name,
            "type": info.type,
            "output_shape": list(info.output_shape) if info.output_shape else None,
            "parameters": info.parameters,
            "calls": info.calls,
            "conv": info.is_conv,
            "cam_default": info.name == cam_layer,
        }
        for info in layers
    ]


def trace_layers(
    model: nn.Module,
    input_size: tuple[int, int],
    device: torch.device | str = "cpu",
    batch: int = 1,
    channels: int = 3,
) -> ModelTrace:
    """Run one forward pass on a fixed random input and describe every module.

    Layers come in execution order: the order in which each module's first call
    started, so a container comes before its children as in a tree. Modules that
    did not run follow in ``named_modules()`` order.

    A backward pass from the top class's score then finds which spatial outputs the score depends on.
    """
    modules = [(name, module) for name, module in model.named_modules() if name]
    type_names = module_type_names(model)
    try:
        dummy = torch.randn(batch, channels, *input_size, generator=torch.Generator().manual_seed(0)).to(device)
    except (RuntimeError, MemoryError):
        raise UsageError(
            f"cannot allocate a model input of {batch}x{channels}x{input_size[0]}x{input_size[1]}; check --size"
        ) from None
    started: dict[str, None] = {}  # module names in the order their first call started
    several: set[str] = set()
    with capture(model, [name for name, _ in modules], grad=True) as activations, hook_handles() as handles:
        for name, module in modules:
            handles.append(module.register_forward_pre_hook(_note_start(name, started)))
            handles.append(module.register_forward_hook(_note_several_outputs(name, several)))
        output = run_model(model, dummy)
        layouts = {name: spatial_layout(tensor.shape, input_size) for name, tensor in activations.items()}
        class_dependent = _class_dependent(
            output, {name: activations[name] for name, layout in layouts.items() if layout}, layouts
        )
    infos = []
    for name, module in modules:
        found = activations.get(name)
        infos.append(
            LayerInfo(
                name=name,
                type=type_names[name],
                output_shape=tuple(found.shape) if found is not None else None,
                parameters=sum(p.numel() for p in module.parameters()),
                calls=activations.calls.get(name, 0),
                is_conv=is_conv_layer(module),
                layout=layouts.get(name),
            )
        )
    position = {name: index for index, name in enumerate(started)}
    infos.sort(key=lambda info: position.get(info.name, len(position)))  # stable: the rest keep definition order
    finished = list(dict.fromkeys(reversed(activations.order)))[::-1]  # each name at its last finish
    return ModelTrace(
        layers=infos,
        finish_order=finished,
        class_dependent=class_dependent,
        preferred=preferred_cam_layer(model),
        several_outputs=several,
    )


def preferred_cam_layer(model: nn.Module) -> str | None:
    """The CAM layer that a model's kind calls for, found from its structure (no import of the libraries); else None.

    * torchvision segmentation models (FCN, DeepLabV3, LR-ASPP): the backbone's last stage, whose output the
      head reads (``backbone.layer4``; ``backbone.16`` for MobileNetV3), as pytorch-grad-cam's tutorial does.
    * torchvision detectors with an FPN (Faster/Mask/Keypoint R-CNN, RetinaNet, FCOS): ``backbone.fpn``, the
      feature pyramid the box heads read. Its output is an OrderedDict of levels; a hook takes the first, the
      highest-resolution level (P2 for R-CNN, P3 for RetinaNet/FCOS, stride 16 for the MobileNetV3 FPN).
    * SSD and SSDlite: ``backbone``, whose first map is the finest the box heads read.
    * Vision transformers from timm (``blocks``) and Hugging Face (``encoder.layer``, ``layers``): the last block's first
      norm, the input of the attention that mixes the patches into the class token (qkv projections come later
      in a forward pass but mix query, key and value channels).
    """
    backbone = getattr(model, "backbone", None)
    kind = type(model).__module__
    if isinstance(backbone, nn.Module) and kind.startswith("torchvision.models.segmentation"):
        returned = getattr(backbone, "return_layers", None)
        if isinstance(returned, Mapping) and returned:
            main = next((key for key, value in returned.items() if value in ("out", "high")), list(returned)[-1])
            return f"backbone.{main}"
    if isinstance(backbone, nn.Module) and kind.startswith("torchvision.models.detection"):
        children = dict(backbone.named_children())
        return "backbone.fpn" if "fpn" in children else "backbone"
    blocks = _transformer_blocks(model)
    if blocks is not None:
        prefix, last = blocks
        for norm in ("norm1", "layernorm_before", "ln_1", "norm"):
            if isinstance(getattr(last, norm, None), nn.Module):
                return f"{prefix}.{norm}"
    return None


def _transformer_blocks(model: nn.Module) -> tuple[str, nn.Module] | None:
    """The name and module of the last block of a timm (``blocks``) or Hugging Face (``*.encoder.layer``, ``*.layers``) ViT."""
    blocks = getattr(model, "blocks", None)
    if isinstance(blocks, (nn.Sequential, nn.ModuleList)) and hasattr(model, "num_prefix_tokens"):
        return (f"blocks.{len(blocks) - 1}", blocks[-1]) if len(blocks) else None
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "hidden_size") or hasattr(config, "hidden_sizes"):
        return None  # not a Hugging Face transformer (a ConvNeXt/ResNet config has hidden_sizes per stage)
    for name, module in model.named_modules():  # transformers 4: vit.encoder.layer; 5: vit.layers
        if name.endswith(("encoder.layer", "layers")) and isinstance(module, nn.ModuleList) and len(module):
            return f"{name}.{len(module) - 1}", module[-1]
    return None


def _note_start(name: str, started: dict[str, None]) -> Callable[[nn.Module, Any], None]:
    def pre_hook(module: nn.Module, inputs: Any) -> None:
        started.setdefault(name, None)  # a later call keeps the first call's place

    return pre_hook


def _note_several_outputs(name: str, several: set[str]) -> Callable[[nn.Module, Any, Any], None]:
    def hook(module: nn.Module, inputs: Any, output: Any) -> None:
        if isinstance(output, Mapping) and sum(isinstance(v, torch.Tensor) for v in output.values()) > 1:
            several.add(name)

    return hook


def module_type_names(model: nn.Module) -> dict[str, str]:
    """The class name of every module of ``model`` (``named_modules()`` names, the root as ``""``).

    An unflattened torch.export program is made of InterpreterModule objects (and
    plain Module objects for modules without ops of their own); for those the name
    is the original class that export recorded, where it did. Other modules keep
    their own class's name.
    """
    recorded = _recorded_types(model)
    return {
        name: recorded.get(name, type(module).__name__) if _stands_in(module) else type(module).__name__
        for name, module in model.named_modules()
    }


def _stands_in(module: nn.Module) -> bool:
    """A module that torch.export.unflatten made in place of the original one."""
    return type(module) is nn.Module or type(module).__module__ == "torch.export.unflatten"


# The stack torch.export gives a node that ran outside every module (in the unflattened root's graph).
_NO_MODULE_STACK = "_empty_nn_module_stack_from_metadata_hook"


def _recorded_types(model: nn.Module) -> dict[str, str]:
    """Module name -> original class name, as recorded in the graphs of the unflattened programs inside ``model``.

    Each node of an exported graph has ``meta["nn_module_stack"]``: {key: (module path, class)} for
    every module the node ran inside, outermost first (the exported model itself as path ""); the
    path is relative to the exported model and the class a qualified name ("torch.nn.modules.conv.Conv2d")
    or a class.
    A module's children's nodes name it too, so containers are found as well as leaves.
    """
    from torch.export.unflatten import UnflattenedModule

    recorded: dict[str, str] = {}
    for root_name, root in model.named_modules():
        if not isinstance(root, UnflattenedModule):
            continue
        prefix = f"{root_name}." if root_name else ""
        for module in root.modules():
            for graph in _graphs(module):
                for node in graph.nodes:
                    stack = node.meta.get("nn_module_stack")
                    if not isinstance(stack, Mapping):
                        continue
                    for key, entry in stack.items():
                        if key == _NO_MODULE_STACK or not (isinstance(entry, (tuple, list)) and len(entry) == 2):
                            continue
                        path, kind = entry
                        class_name = _class_name(kind)
                        if isinstance(path, str) and class_name:
                            recorded.setdefault(prefix + path if path else root_name, class_name)
    return recorded


def _graphs(module: nn.Module) -> Iterator[torch.fx.Graph]:
    """The graphs an unflattened module runs: its own, or those of the calls a dispatcher (a module run twice) picks."""
    for candidate in (module, *getattr(module, "_call_modules", ())):
        graph = getattr(candidate, "graph", None)
        if isinstance(graph, torch.fx.Graph):
            yield graph


def _class_name(kind: object) -> str | None:
    """The class name of a recorded type: "Conv2d" for "torch.nn.modules.conv.Conv2d" or the class itself."""
    if isinstance(kind, type):
        return kind.__name__
    if isinstance(kind, str) and kind:
        return kind.rsplit(".", 1)[-1]
    return None


def _class_dependent(
    output: object, spatial: dict[str, torch.Tensor], layouts: dict[str, Layout | None]
) -> set[str] | None:
    """The spatial layers whose gradient of the top class's score is non-zero at more than one position."""
    try:
        logits = select_logits(output)
    except Exception:  # no tensor output: keep the shape-only rule
        return None
    if logits.dim() != 2 or not logits.requires_grad:
        return None
    names = [name for name, tensor in spatial.items() if tensor.requires_grad]
    score = logits[:, logits[0].argmax()].sum()
    gradients = torch.autograd.grad(score, [spatial[name] for name in names], allow_unused=True)
    dependent = set()
    for name, gradient in zip(names, gradients, strict=True):
        if gradient is not None:
            layout = layouts[name]
            assert layout is not None  # only spatial layers were differentiated
            positions = to_spatial(gradient, layout).abs().sum(dim=(0, 1))
            if int((positions > 0).sum()) > 1:
                dependent.add(name)
    return dependent


def layer_calls(
    model: nn.Module,
    layers: list[str],
    input_size: tuple[int, int],
    device: torch.device | str = "cpu",
    batch: int = 1,
    channels: int = 3,
) -> dict[str, int]:
    """How many times each of ``layers`` runs in one forward pass (on zeros), e.g. to say which call a name means."""
    probe = torch.zeros(batch, channels, *input_size, device=device)
    with capture(model, layers) as activations:
        run_model(model, probe)
    return {layer: activations.calls.get(layer, 0) for layer in layers}
