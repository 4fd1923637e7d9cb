"""GroupedConv2d and IGABatchNorm2d: the forward, state and derivatives of nn.Conv2d and
nn.BatchNorm2d, with a cheaper double backward (the per-group loop; autograd's generic
BatchNorm double backward)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.autograd import gradcheck, gradgradcheck
from torch.profiler import ProfilerActivity, profile

from kdiga.distributed import sync_batchnorm
from kdiga.methods import build_loss
from kdiga.models import (
    GroupedConv2d,
    build_model,
    grouped_conv2d,
    list_models,
    load_model,
    save_model,
    use_grouped_double_backward,
)
from kdiga.models.batchnorm import IGABatchNorm2d, batch_norm_train, use_batchnorm_double_backward


def _pair(conv: nn.Conv2d) -> GroupedConv2d:
    """A GroupedConv2d with ``conv``'s weights (a converted copy)."""
    other = type(conv)(
        conv.in_channels,
        conv.out_channels,
        conv.kernel_size,
        conv.stride,
        conv.padding,
        conv.dilation,
        conv.groups,
        conv.bias is not None,
        dtype=conv.weight.dtype,
    )
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
        channels,
        channels * depth_mult,
        kernel,
        stride,
        padding,
        groups=channels,
        bias=bias,
        dtype=torch.float64,
    )
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
        "GroupedConv2d",
        "Conv2d",
        "Conv2d",
        "Conv2d",
        "SamePad",
    ]
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


# --- IGABatchNorm2d -------------------------------------------------------------------------


def _bn_pair(channels: int = 4, dtype: torch.dtype = torch.float64, **kw):
    """An nn.BatchNorm2d with random affine parameters and a converted copy of it."""
    ref = nn.BatchNorm2d(channels, dtype=dtype, **kw)
    with torch.no_grad():
        ref.weight.uniform_(0.5, 1.5)
        ref.bias.normal_()
    fast = nn.BatchNorm2d(channels, dtype=dtype, **kw)
    fast.load_state_dict(ref.state_dict())
    assert use_batchnorm_double_backward(fast) == 1 and type(fast) is IGABatchNorm2d
    return ref, fast


def _states_equal(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_batchnorm_gradcheck_and_gradgradcheck_train_mode():
    """float64, both derivatives, every input (x, weight, bias) and every first-order output
    (gradgradcheck also feeds cotangents to the weight and bias gradients)."""
    x = torch.randn(2, 3, 3, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, dtype=torch.float64).add_(2).requires_grad_(True)
    b = torch.randn(3, dtype=torch.float64, requires_grad=True)

    def f(x, w, b):
        return batch_norm_train(x, w, b, None, None, 0.1, 1e-5)

    assert gradcheck(f, (x, w, b))
    assert gradgradcheck(f, (x, w, b))
    assert gradgradcheck(lambda x: f(x, w.detach(), b.detach()), (x,))  # only x needs grad


@pytest.mark.parametrize("training", [True, False])
def test_batchnorm_module_gradgradcheck(training):
    """Through the module: train mode (batch statistics; running stats updated on the side)
    and eval mode (running statistics)."""
    torch.manual_seed(1)
    _, fast = _bn_pair()
    fast.running_mean.normal_()
    fast.running_var.uniform_(0.5, 2.0)
    fast.train(training)
    x = torch.randn(2, 4, 3, 3, dtype=torch.float64, requires_grad=True)

    def f(x, w, b):
        return torch.func.functional_call(fast, {"weight": w, "bias": b}, (x,))

    args = (x, *(p.detach().clone().requires_grad_(True) for p in (fast.weight, fast.bias)))
    assert gradcheck(f, args)
    assert gradgradcheck(f, args)


@pytest.mark.parametrize(
    "kw", [{}, {"momentum": None}, {"momentum": 0.3}, {"track_running_stats": False}]
)
def test_batchnorm_running_stats_and_outputs_equal_nn_batchnorm(kw):
    """N train steps, each a train-mode forward and a KDIGA-like step (a second forward, the
    double backward, SGD on the affine parameters): outputs, running stats and
    num_batches_tracked bit for bit; the SGD updates (from double-backward gradients) to
    rounding, after which the parameters are re-synchronised. Then eval-mode outputs bit for
    bit."""
    torch.manual_seed(2)
    ref, fast = _bn_pair(6, torch.float32, **kw)
    opts = [torch.optim.SGD(m.parameters(), lr=1e-4) for m in (ref, fast)]
    for step in range(5):
        x = torch.randn(4, 6, 5, 5) * (step + 1) + step
        if step == 3:
            x = x.contiguous(memory_format=torch.channels_last)
        assert torch.equal(ref(x), fast(x))
        for m, opt in zip((ref, fast), opts, strict=True):
            for p, g in zip(m.parameters(), _iga_like(m, x)[1], strict=True):
                p.grad = g
            opt.step()
        assert all(torch.equal(a, b) for a, b in zip(ref.buffers(), fast.buffers(), strict=True))
        for a, b in zip(ref.parameters(), fast.parameters(), strict=True):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
            b.data.copy_(a.data)
    if fast.track_running_stats:
        assert int(fast.num_batches_tracked) == 10
    else:
        assert fast.running_mean is None and fast.num_batches_tracked is None
    ref.eval(), fast.eval()
    x = torch.randn(3, 6, 4, 4, requires_grad=True)
    assert torch.equal(ref(x), fast(x))
    with torch.no_grad():
        assert torch.equal(ref(x), fast(x))


def test_batchnorm_state_dict_round_trips_both_ways():
    torch.manual_seed(3)
    ref, fast = _bn_pair(5, momentum=None)
    ref.train()(torch.randn(4, 5, 3, 3, dtype=torch.float64))  # non-trivial running stats
    assert ref.state_dict().keys() == fast.state_dict().keys()
    fast.load_state_dict(ref.state_dict())
    assert _states_equal(ref, fast)
    fast(torch.randn(4, 5, 3, 3, dtype=torch.float64))
    fresh = nn.BatchNorm2d(5, momentum=None, dtype=torch.float64)
    fresh.load_state_dict(fast.state_dict())
    assert _states_equal(fresh, fast) and not _states_equal(fresh, ref)
    assert int(fresh.num_batches_tracked) == 2


def test_batchnorm_plain_backward_is_native_and_keeps_no_graph():
    """Without create_graph: nn.BatchNorm2d's gradients bit for bit, nothing differentiable."""
    ref, fast = _bn_pair(4, torch.float32)
    x = torch.randn(3, 4, 6, 6, requires_grad=True)
    g_ref = torch.autograd.grad(ref(x).sin().sum(), [x, ref.weight, ref.bias])
    g_new = torch.autograd.grad(fast(x).sin().sum(), [x, fast.weight, fast.bias])
    assert all(torch.equal(a, b) and not b.requires_grad for a, b in zip(g_ref, g_new, strict=True))


def _aten_ops(fn) -> int:
    """The number of ATen operator calls ``fn()`` makes."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.n += 1
            return func(*args, **(kwargs or {}))

    with Count():
        fn()
    return Count.n


def test_batchnorm_double_backward_is_a_handful_of_ops():
    """The backward of an IGA-like loss through one BatchNorm: with autograd's generic double
    backward (each reduction over (B, H, W) as three sums) about 100 operator calls, with ours
    35 (of which the loss's own and the first-order path's take about 15)."""
    counts = {}
    for name, m in zip(("ref", "fast"), _bn_pair(8, torch.float32), strict=True):
        x = torch.randn(4, 8, 5, 5, requires_grad=True)
        (gx,) = torch.autograd.grad(m(x).square().sum(), x, create_graph=True)
        loss, params = gx.square().sum(), list(m.parameters())
        counts[name] = _aten_ops(lambda loss=loss, params=params: torch.autograd.grad(loss, params))
    assert counts["fast"] <= 40 and counts["ref"] >= 2 * counts["fast"], counts


def test_batchnorm_conversion_skips_what_it_cannot_take():
    class Own(nn.BatchNorm2d):
        pass

    model = nn.Sequential(
        nn.BatchNorm2d(4), nn.BatchNorm2d(4, affine=False), Own(4), nn.BatchNorm1d(4)
    )
    assert use_batchnorm_double_backward(model) == 1
    assert [type(m).__name__ for m in model] == [
        "IGABatchNorm2d",
        "BatchNorm2d",
        "Own",
        "BatchNorm1d",
    ]
    with pytest.raises(ValueError, match="affine=True"):
        IGABatchNorm2d(4, affine=False)
    with pytest.raises(ValueError, match="affine=True"):
        batch_norm_train(torch.randn(2, 4, 3, 3), None, None, None, None, 0.1, 1e-5)


def test_batchnorm_autocast_and_meta_like_nn_batchnorm():
    ref, fast = _bn_pair(4, torch.float32)
    x = torch.randn(2, 4, 6, 6, requires_grad=True)
    for m in (ref, fast):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = m(x.bfloat16())
            (gx,) = torch.autograd.grad(y.float().square().sum(), x, create_graph=True)
        assert y.dtype == torch.bfloat16 and gx.dtype == torch.float32
        gx.square().sum().backward()
        assert m.weight.grad.dtype == torch.float32
    torch.testing.assert_close(fast.weight.grad, ref.weight.grad, rtol=0.1, atol=1e-2)
    meta = IGABatchNorm2d(4, device="meta")
    assert meta(torch.empty(2, 4, 3, 3, device="meta")).shape == (2, 4, 3, 3)


def test_sync_batchnorm_still_swaps_converted_layers():
    model = build_model("resnet18", 10, width=4)
    with sync_batchnorm(model):
        assert not any(type(m) is IGABatchNorm2d for m in model.modules())
        assert any(isinstance(m, nn.SyncBatchNorm) for m in model.modules())
    assert any(type(m) is IGABatchNorm2d for m in model.modules())


#: tiny options per registered architecture (a new one must be added here to be tested)
TINY = {
    "mobilenet_v2": {"width_mult": 0.1},
    "resnet18": {"width": 4},
    "resnet34": {"width": 4},
    "resnet50": {"width": 4},
    "small_cnn": {"width": 4},
    "wrn_34_10": {"depth": 10, "widen_factor": 1},
}


@pytest.mark.parametrize("name", list_models())
def test_every_architecture_keeps_outputs_and_input_gradients(name):
    """build_model's conversion against the same model with nn.BatchNorm2d (float64, train
    mode): outputs and input gradients bit for bit, the IGA-like double backward to rounding;
    eval-mode outputs bit for bit. Architectures without BatchNorm have nothing converted."""
    torch.manual_seed(4)
    fast = build_model(name, 10, **TINY[name]).double()
    ref = build_model(name, 10, **TINY[name]).double()
    ref.load_state_dict(fast.state_dict())
    converted = [m for m in fast.modules() if type(m) is IGABatchNorm2d]
    has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in fast.modules())
    assert bool(converted) == has_bn
    for m in ref.modules():
        if type(m) is IGABatchNorm2d:
            m.__class__ = nn.BatchNorm2d
    x = torch.rand(4, 3, 16, 16, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 10, (4,))
    out = {}
    for key, model in (("fast", fast), ("ref", ref)):
        logits = model.train()(x)
        (g1,) = torch.autograd.grad(F.cross_entropy(logits, y, reduction="sum"), x)
        loss, dd = _iga_like(model, x.detach())
        model.eval()
        out[key] = (logits, g1, loss, dd, model(x))
    assert torch.equal(out["fast"][0], out["ref"][0]) and torch.equal(out["fast"][1], out["ref"][1])
    torch.testing.assert_close(out["fast"][2], out["ref"][2], rtol=1e-10, atol=0)
    scale = max(g.abs().max() for g in out["ref"][3])
    for a, b in zip(out["fast"][3], out["ref"][3], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-10 * scale)
    assert torch.equal(out["fast"][4], out["ref"][4])
    assert _states_equal(fast, ref)


def test_built_models_save_and_load_with_batchnorm_converted(tmp_path):
    model = build_model("resnet18", 10, width=4)
    model.train()(torch.rand(4, 3, 16, 16))
    save_model(model, tmp_path / "m.safetensors")
    again, _ = load_model(tmp_path / "m.safetensors")
    assert any(type(m) is IGABatchNorm2d for m in again.modules())
    assert not any(type(m) is nn.BatchNorm2d for m in again.modules())
    assert _states_equal(model, again)
    x = torch.rand(2, 3, 16, 16)
    assert torch.equal(model.eval()(x), again.eval()(x))


@pytest.mark.gpu
def test_cuda_batchnorm_matches_nn_batchnorm():
    """On CUDA (cuDNN), channels_last, fp32 and bf16 autocast: train-mode outputs and running
    stats equal to nn.BatchNorm2d's bit for bit; the IGA-like double backward through a
    MobileNetV2 student agrees with plain nn.BatchNorm2d layers."""
    torch.manual_seed(0)
    fast = build_model("mobilenet_v2", 10, width_mult=0.5).cuda()
    plain = build_model("mobilenet_v2", 10, width_mult=0.5).cuda()
    plain.load_state_dict(fast.state_dict())
    for m in plain.modules():
        if type(m) is IGABatchNorm2d:
            m.__class__ = nn.BatchNorm2d
    x = torch.rand(16, 3, 32, 32, device="cuda").contiguous(memory_format=torch.channels_last)
    for amp in (False, True):
        out = {}
        for name, model in (("fast", fast), ("plain", plain)):
            model.to(memory_format=torch.channels_last)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
                logits = model(x)
                loss, grads = _iga_like(model, x)
            out[name] = (logits, loss.float(), [g.float() for g in grads])
        assert torch.equal(out["fast"][0], out["plain"][0])
        assert all(torch.equal(a, b) for a, b in zip(fast.buffers(), plain.buffers(), strict=True))
        tol = 5e-2 if amp else 1e-3
        torch.testing.assert_close(out["fast"][1], out["plain"][1], rtol=tol, atol=tol)
        for a, b in zip(out["fast"][2], out["plain"][2], strict=True):
            torch.testing.assert_close(a, b, rtol=tol, atol=tol * max(1.0, b.abs().max().item()))
