"""Tests for kdiga.models: the registry, normalisation inside the model, double backward
through every architecture, the TRADES WRN key layout, and kdiga model files."""

from __future__ import annotations

import socket

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

from kdiga.artifacts import save_tensors
from kdiga.files import read_meta, sha256_file
from kdiga.models import (
    CheckpointError,
    CheckpointNotFoundError,
    NormalizedModel,
    build_model,
    list_models,
    load_model,
    read_model_record,
    save_model,
)
from kdiga.models.io import model_spec
from kdiga.utils import math_attention

BUILTIN = ["mobilenet_v2", "resnet18", "resnet34", "resnet50", "small_cnn", "wrn_34_10"]

#: small versions of every architecture: (name, build kwargs)
SMALL = {
    "small_cnn": {},
    "resnet18": {"width": 8},
    "resnet34": {"width": 8},
    "resnet50": {"width": 8},
    "mobilenet_v2": {"width_mult": 0.25},
    "wrn_34_10": {"depth": 10, "widen_factor": 1},
}
VIT = ("timm:vit_tiny_patch16_224", {"patch_size": 8, "depth": 2})
EXTERNAL = [VIT, ("torchvision:resnet18", {}), ("timm:resnet18", {"zero_init_last": False})]


@pytest.fixture
def no_network(monkeypatch, tmp_path):
    """Fail every connection at once, put the HF hub offline and point the weight caches at
    an empty folder, so nothing can hang and no cached download can make a test pass."""

    def refuse(*args, **kwargs):
        raise OSError("network disabled in tests")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "torch_hub"))


def double_backward(model: torch.nn.Module, in_chans: int = 3, size: int = 32) -> None:
    """grad of ||grad_x CE||^2 w.r.t. the parameters, as the IGA term needs (paper eq. 5)."""
    x = torch.rand(2, in_chans, size, size, requires_grad=True)
    y = torch.tensor([0, 3])
    loss = F.cross_entropy(model(x), y, reduction="sum")
    (gx,) = torch.autograd.grad(loss, x, create_graph=True)
    (gx**2).sum().backward()


# ----------------------------------------------------------------------------- registry


def test_list_models_names_every_builtin():
    assert list_models() == BUILTIN


@pytest.mark.parametrize("name", BUILTIN)
@pytest.mark.parametrize("in_chans", [1, 3])
def test_builtin_gives_logits(name, in_chans):
    model = build_model(name, 7, in_chans=in_chans, **SMALL[name])
    assert isinstance(model, NormalizedModel)
    assert (model.arch, model.num_classes, model.in_chans) == (name, 7, in_chans)
    assert model.mean.shape == model.std.shape == (1, in_chans, 1, 1)
    out = model(torch.rand(2, in_chans, 32, 32))
    assert out.shape == (2, 7) and torch.isfinite(out).all()


@pytest.mark.parametrize(
    ("name", "params"),
    [
        # parameter counts of the standard CIFAR-10 versions of these nets
        ("resnet18", 11_173_962),
        ("resnet34", 21_282_122),
        ("resnet50", 23_520_842),
        ("mobilenet_v2", 2_296_922),
    ],
)
def test_full_size_parameter_counts(name, params):
    model = build_model(name, 10)
    assert sum(p.numel() for p in model.parameters()) == params


def test_small_cnn_is_small_and_takes_digits():
    model = build_model("small_cnn", 10, in_chans=1, image_size=16)
    assert sum(p.numel() for p in model.parameters()) < 100_000
    assert model(torch.rand(3, 1, 16, 16)).shape == (3, 10)
    assert model(torch.rand(3, 1, 8, 8)).shape == (3, 10)


def test_no_inplace_relu_in_builtin_nets():
    for name in BUILTIN:
        net = build_model(name, 10, **SMALL[name]).net
        assert not any(getattr(m, "inplace", False) for m in net.modules()), name


@pytest.mark.parametrize(
    ("name", "kwargs", "match"),
    [
        ("resnet99", {}, "unknown model.*resnet18.*timm:"),
        ("timm:no_such_model_xyz", {}, "unknown timm model"),
        ("torchvision:no_such_model_xyz", {}, "unknown torchvision model"),
        ("timm:", {}, "names no model"),
        ("resnet18", {"pretrained": True}, "no pretrained weights"),
        ("resnet18", {"width": 0}, "width"),
        ("resnet18", {"colour": 3}, "bad options"),
        ("wrn_34_10", {"depth": 12}, "6n \\+ 4"),
        ("mobilenet_v2", {"width_mult": 0}, "width_mult"),
        ("small_cnn", {"std": [1.0, 0.0, 1.0]}, "positive"),
        ("small_cnn", {"mean": [0.1, 0.2]}, "1 or in_chans=3"),
        ("torchvision:resnet18", {"in_chans": 1}, "3 input channels"),
    ],
)
def test_bad_build_arguments_raise_value_error(name, kwargs, match):
    with pytest.raises(ValueError, match=match):
        build_model(name, 10, **kwargs)


@pytest.mark.parametrize("bad", [0, -1, 2.5, True])
def test_bad_num_classes(bad):
    with pytest.raises(ValueError, match="num_classes"):
        build_model("small_cnn", bad)


def test_wrong_input_shape_is_a_clear_error():
    model = build_model("small_cnn", 10, in_chans=1)
    with pytest.raises(ValueError, match=r"expects images \[B, 1, H, W\]"):
        model(torch.rand(2, 3, 16, 16))


# ----------------------------------------------------------------------------- normalisation


def test_default_normalisation_is_identity():
    model = build_model("small_cnn", 10, in_chans=3)
    x = torch.rand(2, 3, 16, 16)
    assert torch.equal(model.mean.flatten(), torch.zeros(3))
    assert torch.equal(model.std.flatten(), torch.ones(3))
    torch.testing.assert_close(model(x), model.net(x), rtol=0, atol=0)


@settings(max_examples=15, deadline=None)
@given(
    mean=st.lists(st.floats(-1, 1), min_size=3, max_size=3),
    std=st.lists(st.floats(0.05, 2), min_size=3, max_size=3),
)
def test_normalisation_lives_inside_the_model(mean, std):
    model = build_model("small_cnn", 5, in_chans=3, mean=mean, std=std, width=4)
    x = torch.rand(2, 3, 12, 12)
    m = torch.tensor(mean).view(1, 3, 1, 1)
    s = torch.tensor(std).view(1, 3, 1, 1)
    torch.testing.assert_close(model(x), model.net((x - m) / s))


def test_single_stat_value_is_broadcast_over_channels():
    model = build_model("small_cnn", 5, in_chans=3, mean=[0.5], std=[0.25])
    assert model.mean.flatten().tolist() == [0.5] * 3
    assert model.std.flatten().tolist() == [0.25] * 3


# ----------------------------------------------------------------------------- double backward


def _assert_param_grads(model):
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads, "no parameter received a gradient"
    assert all(torch.isfinite(g).all() for g in grads)
    assert sum(int(g.abs().sum() > 0) for g in grads) >= len(grads) // 2


@pytest.mark.parametrize("name", BUILTIN)
def test_double_backward_builtin(name):
    model = build_model(name, 10, **SMALL[name]).train()
    double_backward(model)
    _assert_param_grads(model)


@pytest.mark.parametrize(("name", "kwargs"), EXTERNAL, ids=[n for n, _ in EXTERNAL])
def test_double_backward_external_under_math_attention(name, kwargs):
    model = build_model(name, 10, **kwargs).train()
    with math_attention():
        double_backward(model)
    _assert_param_grads(model)


def test_vit_double_backward_fails_without_math_attention():
    """The fused SDPA kernels have no double backward (pytorch#116350): math_attention is
    what makes the ViT test above pass."""
    model = build_model(VIT[0], 10, **VIT[1])
    if not model.net.blocks[0].attn.fused_attn:
        pytest.skip("timm's fused attention is switched off here (TIMM_FUSED_ATTN)")
    with pytest.raises(RuntimeError, match="derivative"):
        double_backward(model)


def test_timm_vit_takes_image_size():
    model = build_model(VIT[0], 10, image_size=48, **VIT[1])
    assert model.net.patch_embed.img_size == (48, 48)
    assert model(torch.rand(1, 3, 48, 48)).shape == (1, 10)


@pytest.mark.parametrize("name", ["timm:vit_tiny_patch16_224", "torchvision:resnet18"])
def test_pretrained_offline_is_a_clear_error(name, no_network):
    with pytest.raises(RuntimeError, match=f"{name}.*could not be downloaded.*file:"):
        build_model(name, 10, pretrained=True)


# ----------------------------------------------------------------------------- TRADES WRN layout


def trades_keys(depth: int, widen: int, with_sub_block1: bool) -> list[str]:
    """Parameter and buffer names of yaodongyu/TRADES models/wideresnet.py."""
    n = (depth - 4) // 6
    bn = ["weight", "bias", "running_mean", "running_var", "num_batches_tracked"]
    widths = [16, 16 * widen, 32 * widen, 64 * widen]
    blocks = ["block1", "block2", "block3"] + (["sub_block1"] if with_sub_block1 else [])
    keys = ["conv1.weight"]
    for b in blocks:
        stage = 0 if b in ("block1", "sub_block1") else int(b[-1]) - 1
        for i in range(n):
            p = f"{b}.layer.{i}."
            keys += [p + "bn1." + k for k in bn] + [p + "conv1.weight"]
            keys += [p + "bn2." + k for k in bn] + [p + "conv2.weight"]
            if i == 0 and widths[stage] != widths[stage + 1]:
                keys.append(p + "convShortcut.weight")
    return keys + ["bn1." + k for k in bn] + ["fc.weight", "fc.bias"]


def test_wrn_key_layout_matches_trades():
    net = build_model("wrn_34_10", 10, depth=16, widen_factor=2).net
    assert sorted(net.state_dict()) == sorted(trades_keys(16, 2, with_sub_block1=False))
    shapes = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    assert shapes["conv1.weight"] == (16, 3, 3, 3)
    assert shapes["block1.layer.0.convShortcut.weight"] == (32, 16, 1, 1)
    assert shapes["block3.layer.1.conv2.weight"] == (128, 128, 3, 3)
    assert shapes["fc.weight"] == (10, 128)


def test_full_wrn_34_10_has_trades_shapes():
    net = build_model("wrn_34_10", 10).net
    sd = net.state_dict()
    assert sorted(sd) == sorted(trades_keys(34, 10, with_sub_block1=False))
    assert len(sd) == 191
    assert sd["block1.layer.0.conv1.weight"].shape == (160, 16, 3, 3)
    assert sd["block3.layer.4.conv2.weight"].shape == (640, 640, 3, 3)
    assert sd["fc.weight"].shape == (10, 640)
    assert sum(p.numel() for p in net.parameters()) == 46_160_474


def _randomise(net):
    with torch.no_grad():
        for name, t in net.state_dict().items():
            if t.is_floating_point():
                t.copy_(torch.rand_like(t) + 0.5 if "running_var" in name else torch.randn_like(t))


def trades_forward(sd, x, depth):
    """Independent functional forward with TRADES's semantics (eval-mode BN)."""

    def bn(p, t):
        return F.relu(
            F.batch_norm(
                t, sd[p + "running_mean"], sd[p + "running_var"], sd[p + "weight"], sd[p + "bias"]
            )
        )

    out = F.conv2d(x, sd["conv1.weight"], padding=1)
    for b, stride in (("block1", 1), ("block2", 2), ("block3", 2)):
        for i in range((depth - 4) // 6):
            p = f"{b}.layer.{i}."
            s = stride if i == 0 else 1
            act = bn(p + "bn1.", out)
            h = bn(p + "bn2.", F.conv2d(act, sd[p + "conv1.weight"], stride=s, padding=1))
            h = F.conv2d(h, sd[p + "conv2.weight"], padding=1)
            short = p + "convShortcut.weight"
            out = h + (F.conv2d(act, sd[short], stride=s) if short in sd else out)
    out = F.avg_pool2d(bn("bn1.", out), 8).flatten(1)
    return F.linear(out, sd["fc.weight"], sd["fc.bias"])


def test_trades_state_dict_loads_strict_and_computes_trades_forward():
    src = build_model("wrn_34_10", 10, depth=16, widen_factor=2).eval()
    _randomise(src.net)
    sd = src.net.state_dict()
    trades_sd = dict(sd)
    for k, v in sd.items():  # the TRADES file's unused copy of block1
        if k.startswith("block1."):
            trades_sd["sub_block1." + k[len("block1.") :]] = torch.randn_like(v.float()).to(v.dtype)
    assert sorted(trades_sd) == sorted(trades_keys(16, 2, with_sub_block1=True))
    dst = build_model("wrn_34_10", 10, depth=16, widen_factor=2).eval()
    dst.net.load_state_dict(trades_sd, strict=True)
    x = torch.rand(2, 3, 32, 32)
    torch.testing.assert_close(dst(x), src(x))
    torch.testing.assert_close(dst(x), trades_forward(sd, x, depth=16), rtol=1e-4, atol=1e-4)


def test_wrn_strict_load_still_rejects_other_unexpected_keys():
    net = build_model("wrn_34_10", 10, depth=10, widen_factor=1).net
    sd = dict(net.state_dict(), **{"block4.layer.0.conv1.weight": torch.zeros(1)})
    with pytest.raises(RuntimeError, match="block4"):
        net.load_state_dict(sd, strict=True)


# ----------------------------------------------------------------------------- model files


@pytest.mark.parametrize(
    ("name", "kwargs"),
    [("small_cnn", {"width": 4}), ("wrn_34_10", {"depth": 10, "widen_factor": 1}), VIT],
)
def test_save_load_round_trip(tmp_path, name, kwargs):
    model = build_model(name, 10, mean=[0.4, 0.5, 0.6], std=[0.2, 0.3, 0.25], **kwargs).eval()
    _randomise(model.net)
    path = tmp_path / "m.pt"
    save_model(model, path, meta={"clean_acc": 0.9, "note": ("a", 1)})
    loaded, meta = load_model(path)
    assert meta == {"clean_acc": 0.9, "note": ["a", 1]}
    assert (loaded.arch, loaded.build_kwargs) == (name, kwargs)
    assert torch.equal(loaded.mean, model.mean) and torch.equal(loaded.std, model.std)
    x = torch.rand(2, 3, 32, 32)
    torch.testing.assert_close(loaded.eval()(x), model(x), rtol=0, atol=0)
    record = read_meta(path)  # the safetensors header: plain JSON, no pickle
    assert record["format"] == "kdiga-model/2"
    assert {"arch", "num_classes", "in_chans", "image_size", "mean", "std", "kwargs"} <= set(record)
    assert set(load_file(path)) == set(model.net.state_dict())  # plain safetensors too


def test_saving_is_byte_stable(tmp_path):
    """The same weights give the same bytes, whatever the file is called (torch.save named
    its zip's folder after the temporary file and added a per-save id)."""
    model = build_model("small_cnn", 10, width=4)
    for name in ("a.safetensors", "b.safetensors", "c.safetensors"):
        save_model(model, tmp_path / name, meta={"x": [1.5, 2]})
    again = load_model(tmp_path / "a.safetensors")[0]
    save_model(again, tmp_path / "d.safetensors", meta={"x": [1.5, 2]})
    digests = {sha256_file(p) for p in tmp_path.iterdir()}
    assert len(digests) == 1


def test_older_model_files_are_refused_naming_the_job_to_rerun(tmp_path):
    """kdiga-model/1 files (one torch.save'd dict), like the first kdiga-model/2 files, carry
    no hash of their tensors: they are refused, with the job that wrote them to re-run."""
    model = build_model("small_cnn", 10, width=4).eval()
    meta = {"provenance": {"job": "distill-pgdat--kd--small_cnn--s0"}}
    record = {
        "format": "kdiga-model/1",
        **model_spec(model),
        "kwargs": {"width": 4},
        "state_dict": model.net.state_dict(),
        "meta": meta,
    }
    torch.save(record, tmp_path / "old.pt")
    with pytest.raises(
        CheckpointError, match=r"format 'kdiga-model/1'.*reads 'kdiga-model/2'"
    ) as e:
        load_model(tmp_path / "old.pt")
    assert "re-run its job 'distill-pgdat--kd--small_cnn--s0'" in str(e.value)


def test_a_file_of_another_architecture_is_refused(tmp_path):
    save_model(build_model("resnet18", 10), tmp_path / "small_cnn--kd.safetensors")
    with pytest.raises(CheckpointError, match=r"holds a 'resnet18' model, but 'small_cnn' is"):
        load_model(tmp_path / "small_cnn--kd.safetensors", arch="small_cnn")


def test_save_rejects_non_json_meta(tmp_path):
    model = build_model("small_cnn", 10, width=2)
    with pytest.raises(ValueError, match="meta"):
        save_model(model, tmp_path / "m.pt", meta={"x": object()})
    assert not list(tmp_path.iterdir())


@pytest.fixture
def saved(tmp_path):
    path = tmp_path / "model.pt"
    save_model(build_model("small_cnn", 10, width=2), path)
    return path


def test_missing_file(tmp_path):
    path = tmp_path / "nope.pt"
    with pytest.raises(CheckpointNotFoundError, match=r"nope\.pt"):
        load_model(path)
    with pytest.raises(FileNotFoundError):
        load_model(path)


@pytest.mark.parametrize("cut", [0, 10, 0.5, -20])
def test_truncated_file(saved, cut):
    data = saved.read_bytes()
    n = int(len(data) * cut) if isinstance(cut, float) else cut % len(data)
    saved.write_bytes(data[:n])
    with pytest.raises(CheckpointError, match=r"model\.pt"):
        load_model(saved)


def test_corrupt_file(saved):
    data = bytearray(saved.read_bytes())
    data[: len(data) // 2] = bytes(len(data) // 2)
    saved.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"model\.pt"):
        load_model(saved)


def test_raw_state_dict_is_not_a_model_file(tmp_path):
    path = tmp_path / "raw.pt"
    torch.save(build_model("small_cnn", 10).net.state_dict(), path)
    with pytest.raises(CheckpointError, match=r"raw\.pt.*not a kdiga model file"):
        load_model(path)


@pytest.mark.parametrize(
    "edit",
    [
        lambda r: r["state_dict"].pop("fc.bias"),
        lambda r: r["state_dict"].update({"fc.weight": torch.zeros(3, 3)}),
        lambda r: r.update({"num_classes": 11}),
        lambda r: r.update({"arch": "resnet99"}),
        lambda r: r.pop("std"),
    ],
)
def test_mismatched_record(saved, edit):
    record = read_model_record(saved)
    edit(record)
    tensors = record.pop("state_dict")
    save_tensors(tensors, saved, meta=record)
    with pytest.raises(CheckpointError, match=r"model\.pt"):
        load_model(saved)
