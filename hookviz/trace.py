"""A forward/backward trace: what every module received and produced, and the gradient that came back.

    trace = trace_model(model, batch)                 # backprop the top-1 logit
    print(format_trace(trace))
    json.dumps(trace.as_json())

Forward events come in the order modules are called (a container before its
children, a module called twice appears twice); backward events in the order
autograd delivers the gradient of each module's output, i.e. the order tensor
hooks on those outputs fire.

Gradients are taken with ``torch.autograd.grad`` with respect to the input,
made a leaf for the call: nothing is written to parameters' ``.grad``, and
tensor hooks are used rather than module backward hooks, which fail on
in-place ops such as ``ReLU(inplace=True)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from .errors import UsageError
from .forward import first_tensor, replace_first_tensor, run_model, select_logits
from .hooks import hook_handles, preserved_state
from .tables import format_table, json_float, short_number
from .targets import Target

FORWARD, BACKWARD = "forward", "backward"


@dataclass
class TensorSummary:
    """Shape and value range of one tensor; ``norm`` (L2, over the whole tensor) is filled for gradients."""

    shape: tuple[int, ...]
    dtype: str
    min: float
    max: float
    mean: float
    nonfinite: int = 0  # NaN/inf values, left out of min/max/mean/norm
    norm: float | None = None

    def as_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["shape"] = list(self.shape)
        return {key: json_float(value) if isinstance(value, float) else value for key, value in data.items()}


@dataclass
class TraceEvent:
    """One module call (forward) or the gradient of one call's output (backward)."""

    direction: str  # FORWARD or BACKWARD
    step: int  # position among events of its direction, from 0
    name: str  # qualified module name; "" is the model itself
    type: str
    depth: int  # 0 for the model, 1 for its children, ...
    call: int  # 1 for the module's first call in the forward pass, 2 for its second, ...
    inputs: list[TensorSummary] = field(default_factory=list)  # forward: the tensor positional arguments
    output: TensorSummary | None = None  # forward: the output; backward: the gradient w.r.t. it
    note: str | None = None  # "zero gradient", "non-finite gradient", ...

    def as_json(self) -> dict[str, Any]:
        return {
            "direction": self.direction,
            "step": self.step,
            "name": self.name,
            "type": self.type,
            "depth": self.depth,
            "call": self.call,
            "inputs": [summary.as_json() for summary in self.inputs],
            ("output" if self.direction == FORWARD else "gradient"): self.output.as_json() if self.output else None,
            "note": self.note,
        }


@dataclass
class Trace:
    """The events of one traced forward and backward pass, the classes explained, and the input's gradient."""

    events: list[TraceEvent]
    classes: list[int]  # the class whose logit was backpropagated, per image
    score: float  # the sum over the batch of those logits
    input_gradient: TensorSummary | None  # d score / d input

    @property
    def forward(self) -> list[TraceEvent]:
        return [event for event in self.events if event.direction == FORWARD]

    @property
    def backward(self) -> list[TraceEvent]:
        return [event for event in self.events if event.direction == BACKWARD]

    def as_json(self) -> dict[str, Any]:
        return {
            "classes": self.classes,
            "score": json_float(self.score),
            "events": [event.as_json() for event in self.events],
            "input_gradient": self.input_gradient.as_json() if self.input_gradient else None,
        }


def trace_model(
    model: nn.Module,
    batch: torch.Tensor,
    class_index: int | None = None,
    output_key: str | None = None,
    target: Target | None = None,
) -> Trace:
    """Run one forward and one backward pass of ``batch`` and record every module call, in order.

    The score is the logit of ``class_index`` (default: each image's top-1
    prediction), summed over the batch; or, with ``target`` (``hookviz.targets``),
    its score of ``class_index`` (default: its first choice), such as a
    segmentation class's logits over its pixels. The model runs in eval mode;
    modes, parameters' ``.grad`` and the hook lists are restored afterwards, also
    when the model fails.
    """
    # inference_mode(False): a caller's inference mode would forbid any tensor from requiring grad.
    with torch.inference_mode(False), torch.enable_grad(), preserved_state(model), hook_handles() as handles:
        recorder = _Recorder(model, handles)
        x = batch.detach().clone()
        if x.is_floating_point():
            x.requires_grad_(True)  # the graph then reaches every module, even with frozen parameters
        recorder.attach()
        if target is None:
            logits = select_logits(run_model(model, x), output_key)
            classes = _classes(logits, class_index)
            score = logits[torch.arange(logits.shape[0], device=logits.device), classes].sum()
        else:
            with target.hooked(model):
                selected = target.select(run_model(model, x), output_key)
            chosen = target.choose(selected.detach())[:, :1]
            if class_index is not None:
                chosen = torch.full_like(chosen, class_index)
            classes = chosen[:, 0]
            score = target.scores(selected, chosen).sum()
        input_gradient = _backward(model, score, x)
    return Trace(
        events=recorder.forward_events + recorder.backward_events,
        classes=classes.tolist(),
        score=float(score.detach()),
        input_gradient=input_gradient,
    )


def _classes(logits: torch.Tensor, class_index: int | None) -> torch.Tensor:
    if logits.dim() != 2:
        raise UsageError(f"the model's scores have shape {tuple(logits.shape)}; expected (batch, classes)")
    if class_index is None:
        return logits.detach().argmax(dim=1)
    if not 0 <= class_index < logits.shape[1]:
        raise UsageError(f"class {class_index} is out of range: the model has {logits.shape[1]} classes")
    return torch.full((logits.shape[0],), class_index, dtype=torch.long, device=logits.device)


def _backward(model: nn.Module, score: torch.Tensor, x: torch.Tensor) -> TensorSummary | None:
    """Backpropagate ``score``; the tensor hooks record on the way. Returns the input's gradient when there is one."""
    if not score.requires_grad:
        raise UsageError("the score does not depend on anything autograd can differentiate; cannot trace gradients")
    # Differentiating w.r.t. the input (or, for a non-float input, the parameters) runs the
    # whole backward pass; torch.autograd.grad returns the results instead of touching .grad.
    targets = [x] if x.requires_grad else [p for p in model.parameters() if p.requires_grad]
    gradients = torch.autograd.grad(score, targets, allow_unused=True)
    if x.requires_grad and gradients[0] is not None:
        return summarize(gradients[0], norm=True)
    return None


class _Recorder:
    """The hooks of one trace: module forward hooks that register a tensor hook on each output.

    Every hook goes into ``handles``, which the caller removes (``hooks.hook_handles``).
    """

    def __init__(self, model: nn.Module, handles: list[Any]) -> None:
        self.modules = list(model.named_modules())
        self.forward_events: list[TraceEvent] = []
        self.backward_events: list[TraceEvent] = []
        self.handles = handles
        self.calls: dict[int, int] = {}  # id(module) -> calls so far
        self.open: dict[int, list[TraceEvent]] = {}  # id(module) -> events of calls not returned yet

    def attach(self) -> None:
        for name, module in self.modules:
            self.handles.append(module.register_forward_pre_hook(self._pre_hook(name)))
            self.handles.append(module.register_forward_hook(self._hook()))

    def _pre_hook(self, name: str) -> Callable[[nn.Module, Any], None]:
        def pre_hook(module: nn.Module, inputs: Any) -> None:
            # Summarized now: the module itself may overwrite its input (ReLU(inplace=True)).
            key = id(module)
            self.calls[key] = self.calls.get(key, 0) + 1
            event = TraceEvent(
                direction=FORWARD,
                step=len(self.forward_events),
                name=name,
                type=type(module).__name__,
                depth=0 if name == "" else name.count(".") + 1,
                call=self.calls[key],
                inputs=[summarize(t) for t in _tensors(inputs)],
            )
            self.forward_events.append(event)
            self.open.setdefault(key, []).append(event)

        return pre_hook

    def _hook(self) -> Callable[[nn.Module, Any, Any], Any]:
        def hook(module: nn.Module, inputs: Any, output: Any) -> Any:
            event = self.open[id(module)].pop()
            tensor = first_tensor(output)
            if tensor is None:
                return None
            # Summarized before anything downstream runs, so an in-place op later cannot change it.
            event.output = summarize(tensor)
            if event.output.nonfinite:
                event.note = f"{event.output.nonfinite} non-finite values"
            if tensor.requires_grad:
                self.handles.append(tensor.register_hook(self._gradient_hook(event)))
            # The rest of the network gets a copy. A container returns its last child's output tensor
            # itself: without a copy per module both hooks would sit on one tensor and fire in the
            # wrong order. And in-place ops downstream (ReLU(inplace=True), out += identity) then
            # modify the copy, never the tensor whose gradient is recorded.
            return replace_first_tensor(output, tensor.clone())

        return hook

    def _gradient_hook(self, forward: TraceEvent) -> Callable[[torch.Tensor], None]:
        def gradient_hook(gradient: torch.Tensor) -> None:
            summary = summarize(gradient, norm=True)
            self.backward_events.append(
                TraceEvent(
                    direction=BACKWARD,
                    step=len(self.backward_events),
                    name=forward.name,
                    type=forward.type,
                    depth=forward.depth,
                    call=forward.call,
                    output=summary,
                    note=_gradient_note(summary),
                )
            )

        return gradient_hook


def _tensors(inputs: Any) -> list[torch.Tensor]:
    return [item for item in inputs if isinstance(item, torch.Tensor)] if isinstance(inputs, tuple) else []


def summarize(tensor: torch.Tensor, norm: bool = False) -> TensorSummary:
    """Shape, dtype and the range of the finite values (float64 reductions, so large tensors stay exact enough)."""
    values = tensor.detach()
    flat = values.flatten().double()
    finite = torch.isfinite(flat)
    nonfinite = int((~finite).sum())
    if nonfinite:
        flat = flat[finite]
    empty = flat.numel() == 0
    return TensorSummary(
        shape=tuple(values.shape),
        dtype=str(values.dtype).removeprefix("torch."),
        min=math.nan if empty else float(flat.min()),
        max=math.nan if empty else float(flat.max()),
        mean=math.nan if empty else float(flat.mean()),
        nonfinite=nonfinite,
        norm=(math.nan if empty else float(flat.norm())) if norm else None,
    )


def _gradient_note(summary: TensorSummary) -> str | None:
    """Flag a vanishing (all zero) or exploding (NaN/inf) gradient."""
    if summary.nonfinite:
        return f"non-finite gradient ({summary.nonfinite} values)"
    if summary.norm == 0:
        return "zero gradient"
    return None


# --- text ---------------------------------------------------------------------------------------------


def format_trace(trace: Trace | Iterable[TraceEvent]) -> str:
    """An aligned table: forward rows, then backward rows, module names indented by depth."""
    events = trace.events if isinstance(trace, Trace) else list(trace)
    header = ["dir", "#", "module", "type", "input", "output / gradient", "min", "max", "mean", "norm", "note"]
    repeated = {event.name for event in events if event.call > 1}
    rows = [header] + [_row(event, repeated) for event in events]
    if isinstance(trace, Trace) and trace.input_gradient is not None:
        gradient = trace.input_gradient
        rows.append(
            [
                "bwd",
                "",
                "(input)",
                "",
                "",
                _shape(gradient.shape),
                short_number(gradient.min),
                short_number(gradient.max),
                short_number(gradient.mean),
                short_number(gradient.norm),
                _gradient_note(gradient) or "",
            ]
        )
    return format_table(rows, right=(1, 6, 7, 8, 9))


def _row(event: TraceEvent, repeated: set[str]) -> list[str]:
    """A table row; a module that runs several times has each call numbered, as ``-l name#N`` takes it."""
    number = f"#{event.call}" if event.name in repeated else ""
    label = "  " * event.depth + (event.name or "(model)") + number
    summary = event.output
    inputs = ", ".join(_shape(item.shape) for item in event.inputs)
    values = (
        ["", "", "", ""]
        if summary is None
        else [
            short_number(summary.min),
            short_number(summary.max),
            short_number(summary.mean),
            "" if summary.norm is None else short_number(summary.norm),
        ]
    )
    return [
        "fwd" if event.direction == FORWARD else "bwd",
        str(event.step),
        label,
        event.type,
        inputs,
        "" if summary is None else _shape(summary.shape),
        *values,
        event.note or "",
    ]


def _shape(shape: tuple[int, ...]) -> str:
    return "x".join(map(str, shape)) if shape else "scalar"
