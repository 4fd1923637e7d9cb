"""Grouped (e.g. depthwise) convolution with a double backward that does not loop over groups.

KDIGA's student term (paper eq. 5, Algorithm 1) differentiates the student's input gradient
``gs = ∇x CE(fs(x), y)`` with respect to the parameters: a double backward. For a convolution
``y = conv(x, w)`` the input gradient is ``gx = conv_transpose(gy, w)``, and PyTorch's generic
double backward (``_convolution_double_backward`` in ATen) computes that term's weight
gradient with one convolution call *per group* when ``groups > 1``. A depthwise layer with C
channels therefore issues about 2C convolution calls per KDIGA step (profiled on CPU; the
same code path serves CUDA, where each call is a kernel launch), and a MobileNetV2 student,
whose depthwise layers hold about 7,000 channels at width 1.0, pays far more for the IGA term
than its MACs suggest.

:class:`GroupedConv2d` is an ``nn.Conv2d`` (same parameters, same state_dict keys, same
forward and first-order gradients, bit for bit) whose input gradient is an autograd function
with an explicit backward: ``∂/∂gy`` is the grouped convolution of the incoming cotangent
with ``w`` and ``∂/∂w`` is one grouped weight-gradient call
(``torch.ops.aten.convolution_backward``), each a single call whatever the number of groups.
Derivatives are exact: tested against ``nn.Conv2d`` (float64, gradcheck and gradgradcheck,
strides 1 and 2) and by counting the convolution calls of a double backward.

:func:`use_grouped_double_backward` converts the plain grouped ``nn.Conv2d`` layers of a model
in place; :func:`kdiga.models.build_model` applies it to every model it builds. Third-order
derivatives through a converted layer are not supported (nothing in kdiga takes them).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import FunctionCtx, once_differentiable

_Geometry = tuple[list[int], list[int], list[int], int]  # stride, padding, dilation, groups


def _conv_backward(
    grad_out: Tensor, x: Tensor, w: Tensor, geo: _Geometry, mask: tuple[bool, bool, bool]
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """(∂L/∂x, ∂L/∂w, ∂L/∂b) of ``conv2d(x, w, b)`` given ``grad_out`` = ∂L/∂y, the ones
    ``mask`` asks for; one ATen call."""
    stride, padding, dilation, groups = geo
    bias_sizes = [w.shape[0]] if mask[2] else None
    return torch.ops.aten.convolution_backward(
        grad_out, x, w, bias_sizes, stride, padding, dilation, False, [0, 0], groups, list(mask)
    )


class _InputGrad(torch.autograd.Function):
    """``gx = ∂⟨gy, conv2d(x, w)⟩/∂x`` as a function of (gy, w): linear in each.

    Its backward, for a cotangent ``v`` of gx's shape: ``∂/∂gy = conv2d(v, w)`` (a grouped
    forward) and ``∂/∂w = ∂⟨gy, conv2d(v, w)⟩/∂w`` (a grouped weight gradient).
    """

    @staticmethod
    def forward(ctx: FunctionCtx, gy: Tensor, w: Tensor, x: Tensor, geo: _Geometry) -> Tensor:
        ctx.save_for_backward(gy, w)
        ctx.geo = geo
        return _conv_backward(gy, x, w, geo, (True, False, False))[0]

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, v: Tensor) -> tuple[Tensor | None, ...]:
        gy, w = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.geo
        d_gy = F.conv2d(v, w, None, stride, padding, dilation, groups)
        d_gy = d_gy if ctx.needs_input_grad[0] else None
        d_w = None
        if ctx.needs_input_grad[1]:
            d_w = _conv_backward(gy, v, w, ctx.geo, (False, True, False))[1]
        return d_gy, d_w, None, None


class _GroupedConv(torch.autograd.Function):
    """``conv2d(x, w, b)`` whose input gradient stays differentiable through
    :class:`_InputGrad` when the backward builds a graph (``create_graph=True``)."""

    @staticmethod
    def forward(ctx: FunctionCtx, x: Tensor, w: Tensor, b: Tensor | None, geo: _Geometry) -> Tensor:
        ctx.save_for_backward(x, w)
        ctx.geo = geo
        stride, padding, dilation, groups = geo
        return F.conv2d(x, w, b, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx: Any, gy: Tensor) -> tuple[Tensor | None, ...]:
        x, w = ctx.saved_tensors
        need = tuple(ctx.needs_input_grad[:3])
        if not torch.is_grad_enabled():  # a plain backward: the native kernels, one call
            return (*_conv_backward(gy, x, w, ctx.geo, need), None)
        # create_graph=True: gx must be differentiable in (gy, w); the first-order weight
        # and bias gradients keep ATen's own derivatives. needs_input_grad cannot tell that
        # autograd.grad(..., inputs=x) will drop gw, so an IGA step computes (and discards)
        # one grouped weight gradient per layer that the native backward would skip.
        gx = _InputGrad.apply(gy, w, x, ctx.geo) if need[0] else None
        _, gw, gb = _conv_backward(gy, x, w, ctx.geo, (False, need[1], need[2]))
        return gx, gw, gb, None


def grouped_conv2d(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    stride: Any = 1,
    padding: Any = 0,
    dilation: Any = 1,
    groups: int = 1,
) -> Tensor:
    """``F.conv2d`` with the double backward of the module docstring.

    Args:
        x: ``[B, C_in, H, W]``; weight: ``[C_out, C_in / groups, kH, kW]``; bias: ``[C_out]``.
        stride, padding, dilation: ints or pairs (numeric padding only).

    Returns:
        ``[B, C_out, H', W']``, equal to ``F.conv2d`` with the same arguments.
    """
    if isinstance(padding, str):
        raise ValueError(f"grouped_conv2d takes numeric padding, got {padding!r}")
    pair = torch.nn.modules.utils._pair
    geo: _Geometry = (list(pair(stride)), list(pair(padding)), list(pair(dilation)), groups)
    kind = x.device.type
    if torch.amp.is_autocast_available(kind) and torch.is_autocast_enabled(kind):
        dtype = torch.get_autocast_dtype(kind)  # cast as autocast would, then run plain
        x, weight = x.to(dtype), weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
        with torch.autocast(kind, enabled=False):
            return _GroupedConv.apply(x, weight, bias, geo)
    return _GroupedConv.apply(x, weight, bias, geo)


class GroupedConv2d(nn.Conv2d):
    """``nn.Conv2d`` whose double backward makes one call per layer, not one per group.

    Same constructor, parameters and state_dict as ``nn.Conv2d``; zero padding only. With
    ``groups == 1`` it is exactly ``nn.Conv2d``.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        _check_convertible(self)

    def forward(self, x: Tensor) -> Tensor:
        if self.groups == 1:
            return super().forward(x)
        return grouped_conv2d(
            x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups
        )


def _convertible(conv: nn.Conv2d) -> bool:
    """Numeric zero padding: what :func:`grouped_conv2d` computes."""
    return conv.padding_mode == "zeros" and not isinstance(conv.padding, str)


def _check_convertible(conv: nn.Conv2d) -> None:
    if not _convertible(conv):
        raise ValueError(
            "GroupedConv2d supports numeric zero padding only, got "
            f"padding={conv.padding!r}, padding_mode={conv.padding_mode!r}"
        )


def use_grouped_double_backward(model: nn.Module) -> int:
    """Turn every plain ``nn.Conv2d`` with ``groups > 1`` and numeric zero padding in ``model``
    into a :class:`GroupedConv2d`, in place (parameters, buffers and hooks are kept).

    Subclasses of ``nn.Conv2d`` (e.g. timm's same-padding convs) are left alone.

    Returns:
        the number of layers converted.
    """
    count = 0
    for module in model.modules():
        if type(module) is nn.Conv2d and module.groups > 1 and _convertible(module):
            module.__class__ = GroupedConv2d
            count += 1
    return count
