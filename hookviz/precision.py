"""Lower-precision arithmetic for gradient ascent: bfloat16 where the CPU multiplies it natively.

    with lower_precision(torch.device("cpu"), ascent_dtype("auto", torch.device("cpu"))):
        score = model(pictures)  # float32 in and out, bfloat16 inside

Activation maximization (``hookviz filters``) runs thousands of forward and
backward passes whose gradients only need their direction: bfloat16 keeps it
(cosine about 0.96 to float32's on EfficientNet-Lite0) at half the work on a CPU
with AVX512-BF16 or AMX. torch's autocast does the casting, with one repair:
oneDNN's bfloat16 backward pass of a strided depthwise convolution (one per stage
of EfficientNets and MobileNets) is 10 to 30 times slower than its forward pass,
so those convolutions get their input gradient from a stride-1 convolution of the
zero-interleaved output gradient, which oneDNN runs fast. And constant padding
(TensorFlow's "same" padding before each such convolution) writes only its border
instead of filling the whole padded picture first.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from .errors import UsageError

PRECISIONS = ("auto", "float32", "bfloat16")


def ascent_dtype(precision: str, device: torch.device) -> torch.dtype:
    """The dtype a model computes in during gradient ascent for ``precision`` (one of ``PRECISIONS``) on ``device``:
    ``"auto"`` is bfloat16 on a CPU that multiplies it natively (emulated, it would be slower) and float32 elsewhere."""
    if precision not in PRECISIONS:
        raise UsageError(f"precision {precision!r}: use one of {', '.join(PRECISIONS)}")
    if precision == "float32":
        return torch.float32
    if precision == "bfloat16":
        return torch.bfloat16
    return torch.bfloat16 if device.type == "cpu" and native_cpu_bfloat16() else torch.float32


def native_cpu_bfloat16() -> bool:
    """Whether this CPU multiplies bfloat16 natively (AVX512-BF16 or AMX tiles)."""
    checks = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(check is not None and bool(check()) for check in checks)


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` as ``"bfloat16"``."""
    return str(dtype).removeprefix("torch.")


Scratch = dict[tuple[Any, ...], torch.Tensor]  # zero-bordered buffers kept between calls, by shape


@contextmanager
def lower_precision(device: torch.device, dtype: torch.dtype, scratch: Scratch | None = None) -> Iterator[None]:
    """For the block, models compute in ``dtype`` (autocast); a float32 ``dtype`` changes nothing.

    Gradients with respect to float32 inputs come back in float32. On a CPU, strided depthwise convolutions take
    their input gradient from ``strided_depthwise_input_gradient`` (the module's docstring says why). ``scratch``:
    a dict that keeps its buffers from one block to the next (a loop of same-sized steps writes no zeros again).
    """
    if dtype == torch.float32:
        yield
        return
    with torch.autocast(device.type, dtype=dtype):
        if device.type == "cpu":
            with _CpuRepairs(dtype, {} if scratch is None else scratch):
                yield
        else:
            yield


_CONVOLUTIONS = (torch.ops.aten.conv2d.default, F.conv2d)
_PADS = (torch.ops.aten.pad.default, torch.ops.aten.constant_pad_nd.default, F.pad)
_CONV_ARGUMENTS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")


class _CpuRepairs(TorchFunctionMode):
    """Routes strided depthwise conv2d calls through ``_StridedDepthwise`` (in ``dtype``) and constant 2-D padding
    through ``_ConstantPad``; other calls pass through."""

    def __init__(self, dtype: torch.dtype, scratch: Scratch) -> None:
        super().__init__()
        self.dtype = dtype
        self.scratch = scratch

    def __torch_function__(self, func: Any, types: Any, args: Sequence[Any] = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func in _CONVOLUTIONS:
            given = dict(zip(_CONV_ARGUMENTS, args, strict=False)) | kwargs
            plan = _strided_depthwise_plan(given)
            if plan is not None:
                stride, padding = plan
                inputs, weight, bias = given["input"], given["weight"], given.get("bias")
                with torch.autocast(inputs.device.type, enabled=False):
                    output = _StridedDepthwise.apply(
                        inputs.to(self.dtype), weight.to(self.dtype), stride, padding, self.scratch
                    )
                    return output if bias is None else output + bias.to(self.dtype).view(1, -1, 1, 1)
        if func in _PADS:
            pads = _constant_2d_pads(args, kwargs)
            if pads is not None:
                return _ConstantPad.apply(args[0], pads, float(_pad_value(args, kwargs)))
        return func(*args, **kwargs)


def _pair(value: Any) -> tuple[int, int] | None:
    if isinstance(value, int):
        return value, value
    if isinstance(value, (list, tuple)) and len(value) == 2 and all(isinstance(v, int) for v in value):
        return int(value[0]), int(value[1])
    if isinstance(value, (list, tuple)) and len(value) == 1 and isinstance(value[0], int):
        return int(value[0]), int(value[0])
    return None


def _strided_depthwise_plan(given: dict[str, Any]) -> tuple[tuple[int, int], tuple[int, int]] | None:
    """(stride, padding) of a conv2d call that is a strided, undilated depthwise one with ``padding <
    kernel``; None for any other call (those run as they are)."""
    inputs, weight, groups = given.get("input"), given.get("weight"), given.get("groups", 1)
    if not isinstance(inputs, torch.Tensor) or not isinstance(weight, torch.Tensor) or inputs.dim() != 4:
        return None
    if not isinstance(groups, int) or groups == 1 or groups != inputs.shape[1] or weight.shape[:2] != (groups, 1):
        return None
    stride, padding, dilation = (
        _pair(given.get(name, default)) for name, default in (("stride", 1), ("padding", 0), ("dilation", 1))
    )
    if stride is None or padding is None or dilation != (1, 1) or max(stride) == 1:
        return None
    if any(p >= k for p, k in zip(padding, weight.shape[2:], strict=True)):
        return None
    return stride, padding


def _pad_value(args: Sequence[Any], kwargs: dict[str, Any]) -> Any:
    value = kwargs.get("value", args[3] if len(args) > 3 else 0.0)
    if len(args) == 3 and not isinstance(args[2], str):  # constant_pad_nd(input, pad, value)
        value = args[2]
    return 0.0 if value is None else value


def _constant_2d_pads(args: Sequence[Any], kwargs: dict[str, Any]) -> tuple[int, int, int, int] | None:
    """(left, right, top, bottom) of a constant, non-negative padding of the last two dims of a 4-D tensor."""
    if not args or not isinstance(args[0], torch.Tensor) or args[0].dim() != 4:
        return None
    pads = args[1] if len(args) > 1 else kwargs.get("pad")
    mode = kwargs.get("mode", args[2] if len(args) > 2 and isinstance(args[2], str) else "constant")
    if mode != "constant" or not isinstance(pads, (list, tuple)) or len(pads) != 4:
        return None
    if not all(isinstance(p, int) and p >= 0 for p in pads) or not isinstance(_pad_value(args, kwargs), (int, float)):
        return None
    left, right, top, bottom = (int(p) for p in pads)
    return left, right, top, bottom


class _ConstantPad(torch.autograd.Function):
    """Constant padding that writes the border and copies the inside, in the input's memory order (``F.pad`` fills
    the whole padded tensor, then copies over most of it)."""

    @staticmethod
    def forward(ctx: Any, inputs: torch.Tensor, pads: tuple[int, int, int, int], value: float) -> torch.Tensor:
        left, right, top, bottom = pads
        count, channels, height, width = inputs.shape
        ctx.pads, ctx.size = pads, (height, width)
        layout = torch.channels_last if inputs.is_contiguous(memory_format=torch.channels_last) else None
        shape = (count, channels, height + top + bottom, width + left + right)
        padded = torch.empty(
            shape, dtype=inputs.dtype, device=inputs.device, memory_format=layout or torch.contiguous_format
        )
        padded[:, :, :top].fill_(value)
        padded[:, :, top + height :].fill_(value)
        padded[:, :, top : top + height, :left].fill_(value)
        padded[:, :, top : top + height, left + width :].fill_(value)
        padded[:, :, top : top + height, left : left + width].copy_(inputs)
        return padded

    @staticmethod
    def backward(ctx: Any, gradient: torch.Tensor) -> tuple[torch.Tensor | None, None, None]:
        left, _, top, _ = ctx.pads
        height, width = ctx.size
        return gradient[:, :, top : top + height, left : left + width], None, None


class _StridedDepthwise(torch.autograd.Function):
    """A strided depthwise convolution whose input gradient comes from ``strided_depthwise_input_gradient``."""

    @staticmethod
    def forward(
        ctx: Any,
        inputs: torch.Tensor,
        weight: torch.Tensor,
        stride: tuple[int, int],
        padding: tuple[int, int],
        scratch: Scratch,
    ) -> torch.Tensor:
        ctx.stride, ctx.padding, ctx.size, ctx.scratch = stride, padding, tuple(inputs.shape[2:]), scratch
        ctx.save_for_backward(inputs if ctx.needs_input_grad[1] else None, weight)
        return F.conv2d(inputs, weight, None, stride, padding, 1, inputs.shape[1])

    @staticmethod
    def backward(ctx: Any, gradient: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        inputs, weight = ctx.saved_tensors
        input_gradient = weight_gradient = None
        if ctx.needs_input_grad[0]:
            input_gradient = strided_depthwise_input_gradient(
                gradient, weight, ctx.size, ctx.stride, ctx.padding, ctx.scratch
            )
        if ctx.needs_input_grad[1]:
            weight_gradient = torch.ops.aten.convolution_backward(
                gradient,
                inputs,
                weight,
                None,
                list(ctx.stride),
                list(ctx.padding),
                [1, 1],
                False,
                [0, 0],
                weight.shape[0],
                [False, True, False],
            )[1]
        return input_gradient, weight_gradient, None, None, None


def strided_depthwise_input_gradient(
    gradient: torch.Tensor,
    weight: torch.Tensor,
    size: tuple[int, int],
    stride: tuple[int, int],
    padding: tuple[int, int],
    scratch: Scratch | None = None,
) -> torch.Tensor:
    """The gradient with respect to the (N, C, *size) input of ``conv2d(x, weight, stride=stride, padding=padding,
    groups=C)`` given ``gradient`` with respect to its output: a stride-1 depthwise convolution, with the flipped
    kernel, of the output gradient spread ``stride`` apart inside a zero border of ``kernel - 1 - padding``.

    Input pixel i receives ``sum_t gradient[o] * weight[t]`` over the taps with ``o * stride + t - padding == i``;
    placing ``gradient[o]`` at ``q + o * stride`` (``q = kernel - 1 - padding``) of a zero picture of size ``size
    + kernel - 1`` makes that sum a plain correlation with the flipped kernel. With ``scratch``, that picture is
    kept for the next call of the same shape: only the gradient's places are written again, the zeros stay.
    """
    count, channels, out_h, out_w = gradient.shape
    kernel_h, kernel_w = weight.shape[2:]
    (stride_h, stride_w), (pad_h, pad_w) = stride, padding
    top, left = kernel_h - 1 - pad_h, kernel_w - 1 - pad_w
    shape = (count, size[0] + kernel_h - 1, size[1] + kernel_w - 1, channels)
    key = (shape, gradient.dtype, gradient.device, stride, padding, out_h, out_w)
    spread = scratch.get(key) if scratch is not None else None
    if spread is None:
        # Channels-last, like the activations around it (oneDNN's fast depthwise kernels want it).
        spread = gradient.new_zeros(shape).permute(0, 3, 1, 2)
        if scratch is not None:
            scratch[key] = spread
    rows = slice(top, top + (out_h - 1) * stride_h + 1, stride_h)
    columns = slice(left, left + (out_w - 1) * stride_w + 1, stride_w)
    spread[:, :, rows, columns] = gradient
    return F.conv2d(spread, weight.flip(2, 3), groups=channels)
