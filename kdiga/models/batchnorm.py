"""Train-mode BatchNorm with an explicit double backward (the student's IGA term).

KDIGA's student term (paper eq. 5, Algorithm 1) differentiates the student's input gradient
``gs = ∇x CE(fs(x), y)`` with respect to the parameters: a double backward. Through a
train-mode BatchNorm the input gradient is, per channel over its ``M = B·H·W`` values,

    gx = w·r·P(gy),  P(u) = u − mean(u) − x̂·mean(u·x̂),  x̂ = (x − μ)·r,  r = 1/√(σ² + ε)

(``P`` is symmetric; it is also the Jacobian-transpose of ``x ↦ x̂`` up to the factor r).
PyTorch differentiates that with its generic ``batchnorm_double_backward``, about 80 tensor
operations, each reduction over (B, H, W) done as three sums in a row; profiled on CPU it was
43% of a MobileNetV2 student's IGA step.

:class:`IGABatchNorm2d` is an ``nn.BatchNorm2d`` (same parameters, buffers, state_dict keys,
momentum and ``num_batches_tracked`` semantics) whose train-mode forward runs PyTorch's own
kernel (``aten._batch_norm_impl_index``, what ``F.batch_norm`` calls: same output, same
running-statistics update, same first-order backward, bit for bit) and whose input gradient,
when the backward builds a graph (``create_graph=True``), is an autograd function with an
explicit backward. For a cotangent ``v`` of gx, with ``Ug = r·P(gy)``, ``Uv = r·P(v)``
(one call of the native BatchNorm backward kernel with unit weight), ``S_g = Σ gy·x̂``,
``S_v = Σ v·x̂``:

    ∂⟨v, gx⟩/∂gy = w·Uv
    ∂⟨v, gx⟩/∂w  = Σ v·Ug
    ∂⟨v, gx⟩/∂x  = −(w/M)·(r²·Σ v·Ug·(x − μ) + r·S_v·Ug + r·S_g·Uv)

plus the terms of cotangents of the first-order ``gw = S_g`` and ``gb = Σ gy`` (``∂/∂gy``:
``vw·x̂ + vb``; ``∂/∂x``: ``vw·Ug``). That is one fused kernel and about six element-wise
passes. Exact: tested in float64 with gradcheck and gradgradcheck, and against
``nn.BatchNorm2d`` (outputs, running statistics, state_dicts, input gradients and the
double-backward term) on every architecture of the registry.

Eval mode (running statistics) and forwards without grad are ``nn.BatchNorm2d.forward``
itself. :func:`use_batchnorm_double_backward` converts the plain ``nn.BatchNorm2d`` layers of a
model in place; :func:`kdiga.models.build_model` applies it to every model it builds (teachers
too: in eval mode nothing changes for them). Not converted: ``nn.SyncBatchNorm`` (no
``nn.BatchNorm2d``, and without any double backward in PyTorch), subclasses of
``nn.BatchNorm2d`` with their own forward (timm's ``BatchNormAct2d``) and layers with
``affine=False`` (no weight; left to PyTorch). :func:`kdiga.distributed.sync_batchnorm` still
swaps converted layers for ``SyncBatchNorm``. Third-order derivatives through a converted
layer are not supported (nothing in kdiga takes them).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.autograd.function import FunctionCtx, once_differentiable


def _channel(t: Tensor, like: Tensor) -> Tensor:
    """A per-channel ``[C]`` tensor shaped to broadcast against ``like`` ``[B, C, ...]``."""
    return t.reshape(1, -1, *([1] * (like.dim() - 2)))


def _normalized_grad(u: Tensor, x: Tensor, mean: Tensor, invstd: Tensor) -> tuple[Tensor, ...]:
    """``(r·P(u), Σ u·x̂, Σ u)`` per the module docstring: one native backward call."""
    return torch.ops.aten.native_batch_norm_backward(
        u, x, None, None, None, mean, invstd, True, 0.0, [True, True, True]
    )


def _reduce(t: Tensor) -> Tensor:
    """Sum over every dimension but the channels (dim 1): ``[B, C, ...] -> [C]``."""
    return t.sum(dim=[d for d in range(t.dim()) if d != 1])


class _BatchNormGrad(torch.autograd.Function):
    """``(gx, gw, gb)`` of train-mode BatchNorm as a function of ``(gy, x, w)`` (mean and
    inverse std are those of x, saved by the forward), with the explicit backward of the
    module docstring."""

    @staticmethod
    def forward(
        ctx: FunctionCtx, gy: Tensor, x: Tensor, w: Tensor, mean: Tensor, invstd: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        ug, s_g, sum_g = _normalized_grad(gy, x, mean, invstd)
        ctx.save_for_backward(ug, x, w, mean, invstd, s_g)
        ctx.set_materialize_grads(False)
        ctx.gy_dtype = gy.dtype
        gx = (ug * _channel(w, ug)).to(x.dtype)
        return gx, s_g.to(w.dtype), sum_g.to(w.dtype)

    @staticmethod
    @once_differentiable
    def backward(
        ctx: Any, v: Tensor | None, vw: Tensor | None, vb: Tensor | None
    ) -> tuple[Tensor | None, ...]:
        ug, x, w, mean, invstd, s_g = ctx.saved_tensors
        need_gy, need_x, need_w = ctx.needs_input_grad[:3]
        d_gy = d_x = d_w = None

        def c(t: Tensor) -> Tensor:
            return _channel(t, x)

        if v is not None:
            uv, s_v, _ = _normalized_grad(v, x, mean, invstd)
            dot = _reduce(v * ug)  # Σ v·Ug = ∂⟨v, gx⟩/∂w
            d_w = dot if need_w else None
            if need_x:
                k = -w * invstd / (x.numel() // x.shape[1])  # −w·r/M
                a = k * invstd * dot
                d_x = (x * c(a)).add_(c(-a * mean))  # not addcmul: slow with a broadcast self
                d_x = d_x.addcmul_(ug, c(k * s_v)).addcmul_(uv, c(k * s_g))
            if need_gy:
                d_gy = uv.mul_(c(w))  # uv is not needed after this
        if vw is not None:  # gw = Σ gy·x̂: ∂/∂gy = vw·x̂, ∂/∂x = vw·Ug
            if need_gy:
                xhat_vw = (x * c(invstd * vw)).add_(c(-mean * invstd * vw))
                d_gy = xhat_vw if d_gy is None else d_gy.add_(xhat_vw)
            if need_x:
                d_x = ug * c(vw) if d_x is None else d_x.addcmul_(ug, c(vw))
        if vb is not None and need_gy:  # gb = Σ gy
            d_gy = c(vb).expand_as(x) if d_gy is None else d_gy.add_(c(vb))
        return (
            None if d_gy is None else d_gy.to(ctx.gy_dtype),
            None if d_x is None else d_x.to(x.dtype),
            None if d_w is None else d_w.to(w.dtype),
            None,
            None,
        )


class _BatchNormTrain(torch.autograd.Function):
    """Train-mode ``F.batch_norm`` (native kernel, running statistics updated in place) whose
    input gradient is :class:`_BatchNormGrad` when the backward builds a graph."""

    @staticmethod
    def forward(
        ctx: FunctionCtx,
        x: Tensor,
        w: Tensor,
        b: Tensor | None,
        stats: tuple[Tensor | None, Tensor | None],
        momentum: float,
        eps: float,
    ) -> Tensor:
        running_mean, running_var = stats
        out, mean, invstd, reserve, impl = torch.ops.aten._batch_norm_impl_index(
            x,
            w,
            b,
            running_mean,
            running_var,
            True,
            momentum,
            eps,
            torch.backends.cudnn.enabled,
        )
        ctx.save_for_backward(x, w, mean, invstd, reserve)
        ctx.impl, ctx.eps, ctx.has_bias = impl, eps, b is not None
        return out

    @staticmethod
    def backward(ctx: Any, gy: Tensor) -> tuple[Tensor | None, ...]:
        x, w, mean, invstd, reserve = ctx.saved_tensors
        need = list(ctx.needs_input_grad[:3])
        if not torch.is_grad_enabled():  # a plain backward: the native kernels, one call
            if ctx.impl != 0:  # cuDNN / MIOpen take gy in x's layout (as PyTorch's own formula)
                gy = gy.contiguous(memory_format=_memory_format(x))
            gx, gw, gb = torch.ops.aten._batch_norm_impl_index_backward(
                ctx.impl, x, gy, w, None, None, mean, invstd, True, ctx.eps, need, reserve
            )
        else:  # create_graph=True: (gx, gw, gb) differentiable in (gy, x, w)
            gx, gw, gb = _BatchNormGrad.apply(gy, x, w, mean, invstd)
        return (
            gx if need[0] else None,
            gw if need[1] else None,
            gb if need[2] and ctx.has_bias else None,
            None,
            None,
            None,
        )


def _memory_format(x: Tensor) -> torch.memory_format:
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def batch_norm_train(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    momentum: float,
    eps: float,
) -> Tensor:
    """``F.batch_norm(x, running_mean, running_var, weight, bias, True, momentum, eps)`` with
    the double backward of the module docstring.

    Args:
        x: ``[B, C, ...]``; weight, bias: ``[C]``; running_mean, running_var: ``[C]`` buffers
            updated in place (both None: not tracked).

    Returns:
        ``[B, C, ...]``, equal to ``F.batch_norm`` with the same arguments.
    """
    if weight is None:
        raise ValueError("batch_norm_train needs a weight (affine=True); use F.batch_norm")
    return _BatchNormTrain.apply(x, weight, bias, (running_mean, running_var), momentum, eps)


class IGABatchNorm2d(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` whose train-mode double backward is the explicit one of the module
    docstring; everything else (eval mode, no grad, state) is ``nn.BatchNorm2d``'s.

    Same constructor, parameters, buffers and state_dict; ``affine=True`` only.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        _check_convertible(self)

    def forward(self, x: Tensor) -> Tensor:
        batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        if not (batch_stats and torch.is_grad_enabled()):
            return super().forward(x)
        self._check_input_dim(x)
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # cumulative moving average
                factor = 1.0 / float(self.num_batches_tracked)
        tracked = not self.training or self.track_running_stats
        return batch_norm_train(
            x,
            self.weight,
            self.bias,
            self.running_mean if tracked else None,
            self.running_var if tracked else None,
            factor,
            self.eps,
        )


def _check_convertible(bn: nn.BatchNorm2d) -> None:
    if not bn.affine:
        raise ValueError("IGABatchNorm2d needs affine=True (a weight); got affine=False")


def use_batchnorm_double_backward(model: nn.Module) -> int:
    """Turn every plain ``nn.BatchNorm2d`` with ``affine=True`` in ``model`` into an
    :class:`IGABatchNorm2d`, in place (parameters, buffers and hooks are kept).

    Subclasses of ``nn.BatchNorm2d`` (timm's ``BatchNormAct2d``), ``nn.SyncBatchNorm`` and
    ``affine=False`` layers are left alone.

    Returns:
        the number of layers converted.
    """
    count = 0
    for module in model.modules():
        if type(module) is nn.BatchNorm2d and module.affine:
            module.__class__ = IGABatchNorm2d
            count += 1
    return count
