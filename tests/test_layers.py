"""GroupedConv2d: nn.Conv2d's forward and derivatives, without the per-group double backward."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.autograd import gradcheck, gradgradcheck
from torch.profiler import ProfilerActivity, profile

from kdiga.losses import build_loss
from kdiga.models import (
    GroupedConv2d,
    build_model,
    grouped_conv2d,
    load_model,
    save_model,
    use_grouped_double_backward,
)


def _pair(conv: nn.Conv2d) -> GroupedConv2d:
    """A GroupedConv2d with ``conv``'s weights (a converted copy)."""
    other = type(conv)(
        conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
        conv.dilation, conv.groups, conv.bias is not None, dtype=conv.weight.dtype,
    )  # fmt: skip
    other.load_state_dict(conv.state_dict())
    assert use_grouped_double_backward(other) == (1 if conv.groups > 1 else 0)
    return other


def _iga_like(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The shape of KDIGA's student term: gx with create_graph, then d||gx||^2 / d params."""
    x = x.clone().requires_grad_(True)
    y = model(x)
    (gx,) = torch.autograd.grad((y.sin() * y).sum(), x, create_graph=True)
    loss = gx.square().sum() + y.square().mean()
    return loss, torch.autograd.grad(loss, [p for p in model.parameters()])


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("groups", [2, 4])
def test_gradcheck_and_gradgradcheck(stride, bias, groups):
    x = torch.randn(2, 4, 6, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 4 // groups, 3, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, dtype=torch.float64, requires_grad=True) if bias else None

    def f(x, w, *b):
        return grouped_conv2d(x, w, b[0] if b else None, stride, (1, 2), (1, 2), groups)

    args = (x, w, b) if bias else (x, w)
    assert gradcheck(f, args)
    assert gradgradcheck(f, args)


@settings(max_examples=20, deadline=None)
@given(
    channels=st.sampled_from([2, 3, 6]),
    depth_mult=st.sampled_from([1, 2]),
    kernel=st.sampled_from([1, 3, 5]),
    stride=st.sampled_from([1, 2, 3]),
    padding=st.integers(0, 2),
    size=st.integers(5, 9),
    bias=st.booleans(),
)
def test_same_values_and_derivatives_as_nn_conv2d(
    channels, depth_mult, kernel, stride, padding, size, bias
):
    """Forward and first-order gradients bit for bit; the double-backward term to 1e-10."""
    torch.manual_seed(channels * 100 + kernel * 10 + stride)
    conv = nn.Conv2d(
        channels, channels * depth_mult, kernel, stride, padding, groups=channels, bias=bias,
        dtype=torch.float64,
    )  # fmt: skip
    fast = _pair(conv)
    x = torch.randn(3, channels, size, size + 1, dtype=torch.float64)
    assert torch.equal(conv(x), fast(x))
    g_ref = torch.autograd.grad(conv(x).square().sum(), list(conv.parameters()))
    g_new = torch.autograd.grad(fast(x).square().sum(), list(fast.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(g_ref, g_new, strict=True))
    loss_ref, dd_ref = _iga_like(conv, x)
    loss_new, dd_new = _iga_like(fast, x)
    torch.testing.assert_close(loss_new, loss_ref, rtol=1e-10, atol=1e-10)
    for a, b in zip(dd_ref, dd_new, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-10)


def _conv_calls(model: nn.Module, x: torch.Tensor) -> int:
    """ATen convolution calls (forward and backward kernels) of one IGA-like step."""
    names = {"aten::convolution", "aten::convolution_backward", "aten::_convolution"}
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        _iga_like(model, x)
    return sum(e.count for e in prof.key_averages() if e.key in names)


def test_double_backward_makes_a_fixed_number_of_calls_whatever_the_groups():
    """nn.Conv2d's double backward loops over groups (about one call per channel); ours
    makes the same handful of calls for 8 and 64 channels."""
    calls = {}
    for c in (8, 64):
        conv = nn.Conv2d(c, c, 3, padding=1, groups=c, bias=False)
        x = torch.randn(2, c, 6, 6)
        calls[c] = (_conv_calls(conv, x), _conv_calls(_pair(conv), x))
    assert calls[8][1] == calls[64][1] <= 8, calls
    assert calls[64][0] >= 64, calls  # the loop this layer exists to avoid


def test_conversion_keeps_weights_keys_and_skips_what_it_cannot_take():
    class SamePad(nn.Conv2d):
        pass

    model = nn.Sequential(
        nn.Conv2d(4, 4, 3, padding=1, groups=4),  # converted
        nn.Conv2d(4, 8, 1),  # groups == 1: left alone
        nn.Conv2d(8, 8, 3, padding="same", groups=2),  # string padding: left alone
        nn.Conv2d(8, 8, 3, padding=1, groups=8, padding_mode="reflect"),  # left alone
        SamePad(8, 8, 3, padding=1, groups=8),  # a subclass with its own forward: left alone
    )
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(2, 4, 7, 7)
    before = model(x)
    assert use_grouped_double_backward(model) == 1
    assert [type(m).__name__ for m in model] == [
        "GroupedConv2d", "Conv2d", "Conv2d", "Conv2d", "SamePad"
    ]  # fmt: skip
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    assert torch.equal(model(x), before)
    with pytest.raises(ValueError, match="numeric zero padding"):
        GroupedConv2d(4, 4, 3, padding=1, groups=4, padding_mode="circular")
    with pytest.raises(ValueError, match="numeric padding"):
        grouped_conv2d(x, torch.randn(4, 1, 3, 3), padding="same", groups=4)


def test_built_mobilenet_uses_it_and_round_trips(tmp_path):
    model = build_model("mobilenet_v2", 10, width_mult=0.25)
    grouped = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.groups > 1]
    assert grouped and all(type(m) is GroupedConv2d for m in grouped)
    save_model(model, tmp_path / "m.pt")
    again, _ = load_model(tmp_path / "m.pt")
    assert all(
        type(m) is GroupedConv2d
        for m in again.modules()
        if isinstance(m, nn.Conv2d) and m.groups > 1
    )
    x = torch.rand(2, 3, 32, 32)
    model.eval(), again.eval()
    assert torch.equal(model(x), again(x))


def _mobilenets(width_mult: float) -> tuple[nn.Module, nn.Module]:
    """A MobileNetV2 (GroupedConv2d layers) and the same one with plain nn.Conv2d layers."""
    torch.manual_seed(0)
    fast = build_model("mobilenet_v2", 10, width_mult=width_mult)
    plain = build_model("mobilenet_v2", 10, width_mult=width_mult)
    plain.load_state_dict(fast.state_dict())
    for m in plain.modules():
        if type(m) is GroupedConv2d:
            m.__class__ = nn.Conv2d
    return fast, plain


def test_kdiga_loss_through_mobilenet_matches_plain_convs():
    """The KDIGA loss and its parameter gradients through a MobileNetV2 student (train mode,
    BatchNorm) equal those of the same student with plain nn.Conv2d layers."""
    fast, plain = _mobilenets(0.25)
    fast, plain = fast.double(), plain.double()
    teacher = build_model("small_cnn", 10, width=8).double().eval()
    loss = build_loss("kdiga", iga_weight=10.0)
    x, y = torch.rand(4, 3, 32, 32, dtype=torch.float64), torch.randint(0, 10, (4,))
    out = {}
    for name, model in (("fast", fast), ("plain", plain)):
        value = loss(model, teacher, x, y)["loss"]
        grads = torch.autograd.grad(value, list(model.parameters()))
        out[name] = (value, grads)
    torch.testing.assert_close(out["fast"][0], out["plain"][0], rtol=1e-10, atol=0)
    for a, b in zip(out["fast"][1], out["plain"][1], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_autocast_casts_like_conv2d():
    conv = nn.Conv2d(4, 4, 3, padding=1, groups=4)
    fast = _pair(conv)
    x = torch.randn(2, 4, 6, 6, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref, out = conv(x), fast(x)
        (gx,) = torch.autograd.grad(out.float().square().sum(), x, create_graph=True)
    assert out.dtype == ref.dtype == torch.bfloat16
    torch.testing.assert_close(out, ref)
    gx.square().sum().backward()
    assert fast.weight.grad is not None and fast.weight.grad.dtype == torch.float32


def test_plain_backward_is_nn_conv2d_backward():
    """Without create_graph the layer's backward is the native one (bit for bit), and its
    input gradient is not differentiable (no graph is kept)."""
    conv = nn.Conv2d(6, 6, 3, stride=2, padding=1, groups=3)
    fast = _pair(conv)
    x = torch.randn(2, 6, 9, 9, requires_grad=True)
    (g_ref,) = torch.autograd.grad(conv(x).sum(), x)
    (g_new,) = torch.autograd.grad(fast(x).sum(), x)
    assert torch.equal(g_ref, g_new) and not g_new.requires_grad
    assert torch.equal(F.conv2d(x, fast.weight, fast.bias, 2, 1, 1, 3), fast(x))


def test_meta_tensors_pass_through():
    """Shape inference on the meta device (no autocast there) works as for nn.Conv2d."""
    fast = GroupedConv2d(4, 8, 3, stride=2, padding=1, groups=4, device="meta")
    out = fast(torch.empty(2, 4, 9, 9, device="meta"))
    assert out.shape == (2, 8, 5, 5) and out.device.type == "meta"


@pytest.mark.gpu
def test_cuda_channels_last_and_bf16_autocast_match_nn_conv2d():
    """On CUDA (cuDNN), channels_last and under bf16 autocast: the IGA-like double backward
    through a MobileNetV2 student agrees with plain nn.Conv2d layers."""
    fast, plain = (m.cuda() for m in _mobilenets(0.5))
    x = torch.rand(8, 3, 32, 32, device="cuda").contiguous(memory_format=torch.channels_last)
    for amp in (False, True):
        out = {}
        for name, model in (("fast", fast), ("plain", plain)):
            model.to(memory_format=torch.channels_last)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
                loss, grads = _iga_like(model, x)
            out[name] = (loss.float(), [g.float() for g in grads])
        tol = 5e-2 if amp else 1e-3
        torch.testing.assert_close(out["fast"][0], out["plain"][0], rtol=tol, atol=tol)
        for a, b in zip(out["fast"][1], out["plain"][1], strict=True):
            torch.testing.assert_close(a, b, rtol=tol, atol=tol * max(1.0, b.abs().max().item()))
